"""Size and cost of a ViT: parameter counts and multiply-accumulates per image."""
from __future__ import annotations

import torch

from vitkit.model.presets import list_models
from vitkit.model.vit import ViTArch, VisionTransformer, make_arch


def count_params(arch: ViTArch) -> int:
    """Parameters of the model this architecture builds, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = VisionTransformer(arch)
    return sum(p.numel() for p in model.parameters())


def count_macs(arch: ViTArch) -> int:
    """Multiply-accumulates of one forward pass on one image (matmuls only, as fvcore and timm count)."""
    width, tokens = arch.embed_dim, arch.grid_size**2 + arch.num_prefix_tokens
    patch_inputs = arch.in_chans * arch.patch_size**2
    stem = arch.grid_size**2 * patch_inputs * width
    attention = tokens * width * 3 * width + 2 * tokens * tokens * width + tokens * width * width
    mlp = 2 * tokens * width * arch.mlp_dim
    head_in = arch.representation_size or width
    head = (width * arch.representation_size if arch.representation_size else 0) + head_in * arch.num_classes
    return stem + arch.depth * (attention + mlp) + head


def preset_rows(num_classes: int = 1000) -> list[dict]:
    rows = []
    for name in list_models():
        arch = make_arch(name, num_classes=num_classes)
        macs = count_macs(arch)
        rows.append(
            dict(
                name=name, patch=arch.patch_size, width=arch.embed_dim, depth=arch.depth, heads=arch.num_heads,
                image=arch.image_size, params=count_params(arch), gmacs=macs / 1e9, gflops=2 * macs / 1e9,
            )
        )
    return rows
