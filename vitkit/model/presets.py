"""The named ViT sizes: one table, the single source of every preset's shape."""
from __future__ import annotations

import difflib
import re

from vitkit.errors import VitkitError

# width, depth, heads per size; the MLP is 4x the width everywhere, as in the ViT paper.
_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
_PATCHES = {
    "tiny": (16, 32),
    "small": (16, 32),
    "base": (8, 16, 32),
    "large": (16, 32),
    "huge": (14,),
}


def _build_table() -> dict[str, dict]:
    table = {}
    for size, (width, depth, heads) in _SIZES.items():
        for patch in _PATCHES[size]:
            table[f"vit_{size}_patch{patch}"] = dict(
                patch_size=patch, embed_dim=width, depth=depth, num_heads=heads, mlp_dim=4 * width
            )
    return table


PRESETS: dict[str, dict] = _build_table()

# timm spells presets with the image size appended (vit_base_patch16_224); accept that too.
_SIZE_SUFFIX = re.compile(r"^(?P<base>.+?)_(?P<size>\d{2,4})$")


def list_models() -> list[str]:
    """Every preset name, sorted by size then patch."""
    order = list(_SIZES)
    return sorted(PRESETS, key=lambda n: (order.index(n.split("_")[1]), -PRESETS[n]["patch_size"]))


def resolve_preset(name: str) -> dict:
    """The architecture fields of a preset name, with image_size when the name carries one."""
    if name in PRESETS:
        return dict(PRESETS[name])
    match = _SIZE_SUFFIX.match(name)
    if match and match["base"] in PRESETS:
        return dict(PRESETS[match["base"]], image_size=int(match["size"]))
    close = difflib.get_close_matches(name, list(PRESETS), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise VitkitError(f"unknown model '{name}': {hint}`vitkit models` lists the presets")


def find_heads(embed_dim: int, depth: int) -> int | None:
    """The head count of the preset with this shape, if one matches (heads are not visible in weights)."""
    for arch in PRESETS.values():
        if (arch["embed_dim"], arch["depth"]) == (embed_dim, depth):
            return arch["num_heads"]
    return None
