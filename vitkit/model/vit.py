"""The Vision Transformer family: one pre-norm ViT whose every size and numeric choice is a field of ViTArch."""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from vitkit.errors import VitkitError
from vitkit.model.gelu import TanhGELU
from vitkit.model.presets import resolve_preset

# The numerics and regularisation of each source framework. `style` picks one set; a field set explicitly wins.
STYLES = {
    # The MindSpore model zoo: LayerNorm eps 1e-7, tanh GELU, Xavier init, dropout 0.1 everywhere, DropPath to 0.1.
    "mindspore": dict(
        ln_eps=1e-7, gelu="tanh", init="mindspore",
        drop_rate=0.1, proj_drop_rate=0.1, mlp_drop_rate=0.1, attn_drop_rate=0.0, drop_path_rate=0.1,
    ),
    "timm": dict(
        ln_eps=1e-6, gelu="erf", init="timm",
        drop_rate=0.0, proj_drop_rate=0.0, mlp_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
    ),
}
# The one default for every entry point (create_model, make_arch, ViTArch and `vitkit train`): the original's numerics.
DEFAULT_STYLE = "mindspore"

# The largest value of each size field: far past every preset (ViT-H: width 1280, depth 32) yet far below what would
# exhaust memory before a shape check could fail. The config's options and the checks of a file's metadata both read
# these from the fields' metadata (`le=`).
MAX_PATCH = 1024
MAX_WIDTH = 16384  # ViT-22B is 6144 wide
MAX_DEPTH = 1024  # ViT-22B is 48 deep
MAX_HEADS = 1024
MAX_IMAGE_SIDE = 16384  # pixels; a 16384 x 16384 uint8 RGB image is 805 MB
MAX_CLASSES = 1_000_000
# Position-table elements (tokens x width) a file may imply: its sin-cos table is computed, not stored, so no shape
# check bounds it. ViT-H/14 at 518 pixels needs 1.8M; this is 268M (1 GiB of float32).
MAX_POSITION_ELEMENTS = 1 << 28


def _arch_field(default, help, *, choices=(), ge=None, gt=None, le=None, lt=None, config=None, preset=False):
    """A ViTArch field with its rule (choices or range) and help, written once for the model, file checks and config.

    `config` exposes the field as a `model.*` config option: a dict of what differs there (default, flat key, help
    or bounds), {} for nothing; None keeps it out of the config. A field whose default is None takes its value from
    the style (STYLES), and the config option's default is the default style's value. `preset` marks a size the
    preset table sets, which a config value of 0 leaves to the preset.
    """
    metadata = dict(help=help, choices=tuple(choices), ge=ge, gt=gt, le=le, lt=lt, config=config, preset=preset)
    return dataclasses.field(default=default, metadata=metadata)


def _preset_field(default, help, *, le, flat=None):
    """A size field that presets set: a config value of 0 means the preset's."""
    config = dict(default=0, help=f"{help}; 0 = the preset's", ge=0)
    if flat:
        config["flat"] = flat
    return _arch_field(default, help, ge=1, le=le, config=config, preset=True)


_RATE = dict(ge=0, lt=1)


@dataclass(frozen=True)
class ViTArch:
    """Everything that decides a ViT's shape and numerics: each field's default, choices and range live here.

    Fields left as None (numerics and regularisation) take the `style`'s value from STYLES."""

    patch_size: int = _preset_field(16, "patch side in pixels", le=MAX_PATCH)
    embed_dim: int = _preset_field(768, "token width", le=MAX_WIDTH)
    depth: int = _preset_field(12, "transformer blocks", le=MAX_DEPTH)
    num_heads: int = _preset_field(12, "attention heads, dividing embed_dim", le=MAX_HEADS)
    mlp_dim: int = _preset_field(3072, "MLP hidden width", le=4 * MAX_WIDTH)
    image_size: int = _arch_field(
        224, "training input side in pixels, a multiple of the patch size", ge=1, le=MAX_IMAGE_SIDE,
        config=dict(flat="train_image_size", ge=None, gt=0),
    )
    num_classes: int = _arch_field(
        1000, "classifier outputs; 0 = no head", ge=0, le=MAX_CLASSES,
        config=dict(default=1001, flat="class_num", ge=1, help="classifier outputs; the original's 1001 is ImageNet's "
                    "1000 plus one never-used logit"),
    )
    in_chans: int = _arch_field(3, "input channels", ge=1, le=64)
    class_token: bool = True
    pool: str = _arch_field(
        "token", "what the head sees: the class token or the mean of the tokens", choices=("token", "mean"), config={}
    )
    pos_embed: str = _arch_field(
        "learn", "position embedding: learned or fixed 2-D sin-cos", choices=("learn", "sincos"), config={}
    )
    fc_norm: bool = False  # LayerNorm after pooling (timm's mean-pool models) instead of before it
    qkv_bias: bool = True
    representation_size: int = _arch_field(
        0, "a tanh pre-logits layer of this width (the ViT paper's checkpoints); 0 = none", ge=0, le=MAX_WIDTH
    )
    style: str = _arch_field(
        DEFAULT_STYLE, "the source whose numerics and regularisation the fields left unset take: the original's "
        "(tanh GELU, LayerNorm eps 1e-7, Xavier init, dropout 0.1) or timm's (erf GELU, eps 1e-6, trunc-normal init, "
        "no dropout)", choices=tuple(STYLES), config={},
    )
    init: str = _arch_field(
        None, "weight init: the original's (N(0,1) cls/pos, Xavier-uniform, zero bias) or timm's",
        choices=("mindspore", "timm"), config={},
    )
    ln_eps: float = _arch_field(None, "LayerNorm epsilon (MindSpore's 1e-7; timm uses 1e-6)", gt=0, le=1,
                                config=dict(le=None))
    gelu: str = _arch_field(
        None, "GELU form: the tanh approximation (the original) or exact erf (timm)", choices=("tanh", "erf"), config={}
    )
    drop_rate: float = _arch_field(None, "dropout on the embedded tokens", **_RATE, config={})
    proj_drop_rate: float = _arch_field(None, "dropout after the attention output projection", **_RATE, config={})
    mlp_drop_rate: float = _arch_field(
        None, "dropout after the MLP activation and after its second layer", **_RATE, config={}
    )
    attn_drop_rate: float = _arch_field(
        None, "dropout on the attention probabilities (the original has none)", **_RATE, config={}
    )
    drop_path_rate: float = _arch_field(
        None, "stochastic depth of the last block, rising linearly from 0 at the first", **_RATE, config={}
    )
    # Inputs of any side that is a multiple of the patch, the position embedding resampled to their grid in forward
    # (bicubic, as timm's dynamic_img_size); export.dynamic_image_size traces this path.
    dynamic_img_size: bool = False

    def __post_init__(self):
        if self.style not in STYLES:
            raise VitkitError(f"unknown style '{self.style}': choose one of {', '.join(STYLES)}")
        for name, value in STYLES[self.style].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for item in dataclasses.fields(self):
            problem = _field_problem(item, getattr(self, item.name))
            if problem:
                raise VitkitError(f"model {item.name} {getattr(self, item.name)!r} is {problem}")
        problem = size_problem(image_size=self.image_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                               num_heads=self.num_heads)
        if problem:
            raise VitkitError(problem)
        if self.pool == "token" and not self.class_token:
            raise VitkitError("pool 'token' needs a class token: set pool to 'mean' or class_token to true")
        if self.dynamic_img_size and self.pos_embed != "learn":
            raise VitkitError(
                f"dynamic_img_size resamples learned position embeddings, but this model's are {self.pos_embed}: "
                "keep the image size fixed"
            )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.class_token else 0

    def replace(self, **changes) -> "ViTArch":
        return dataclasses.replace(self, **changes)


ARCH_FIELDS = {item.name: item for item in dataclasses.fields(ViTArch)}
# Each field's value when nothing sets it: the declared default, or the default style's.
ARCH_DEFAULTS = {
    name: STYLES[DEFAULT_STYLE][name] if item.default is None else item.default for name, item in ARCH_FIELDS.items()
}


def range_text(ge=None, gt=None, le=None, lt=None) -> str:
    """A range in words ('>= 1', 'in [0, 1)'), '' when any value goes."""
    lower = (">=", ge) if ge is not None else (">", gt) if gt is not None else None
    upper = ("<=", le) if le is not None else ("<", lt) if lt is not None else None
    if lower and upper:
        opening = "[" if lower[0] == ">=" else "("
        closing = "]" if upper[0] == "<=" else ")"
        return f"in {opening}{lower[1]}, {upper[1]}{closing}"
    bound = lower or upper
    return f"{bound[0]} {bound[1]}" if bound else ""


def broken_bound(value, ge=None, gt=None, le=None, lt=None) -> str:
    """The first bound `value` breaks, in words ('>= 1', '<= 100000'); '' when it is in range."""
    for word, bound, holds in ((">=", ge, operator.ge), (">", gt, operator.gt), ("<=", le, operator.le),
                               ("<", lt, operator.lt)):
        if bound is not None and not holds(value, bound):
            return f"{word} {bound}"
    return ""


def _field_problem(item: dataclasses.Field, value) -> str:
    """Which of the field's declared type, choices or range `value` breaks ('not one of token, mean'); '' if none."""
    metadata = item.metadata
    if metadata.get("choices"):
        ok = isinstance(value, str) and value in metadata["choices"]
        return "" if ok else f"not one of {', '.join(metadata['choices'])}"
    kind = type(ARCH_DEFAULTS[item.name])
    if kind is bool:
        return "" if type(value) is bool else "not true or false"
    if kind is int and type(value) is not int:
        return "not an integer"
    if kind is float and type(value) not in (int, float):
        return "not a number"
    bounds = {key: metadata.get(key) for key in ("ge", "gt", "le", "lt")}
    return f"not {range_text(**bounds)}" if broken_bound(value, **bounds) else ""


def size_problem(*, image_size=None, patch_size=None, embed_dim=None, num_heads=None) -> str:
    """The rule that ties the sizes together, for whichever of them are known: the patch divides the image and the
    head count divides the width. What is wrong, with the fix ('' if nothing)."""
    if image_size and patch_size and image_size % patch_size:
        nearest = patch_size * max(1, round(image_size / patch_size))
        return (f"image_size {image_size} is not a multiple of patch_size {patch_size}: use a multiple of "
                f"{patch_size}, e.g. {nearest}")
    if embed_dim and num_heads and embed_dim % num_heads:
        return f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}: pick a head count that divides it"
    return ""


def check_arch_fields(fields, where: str) -> dict:
    """The ViTArch fields a file states (its metadata or config), each of ViTArch's type, choices and range.

    Checked before anything is built from them, so that no file can make vitkit allocate a model its tensors do not
    hold; `where` names the metadata in the VitkitError. Fields ViTArch does not have are left for the caller to drop.
    """
    if not isinstance(fields, dict):
        raise VitkitError(f"{where} is not a JSON object of architecture fields: the file is damaged or not vitkit's")
    for name, value in fields.items():
        if name in ARCH_FIELDS and value is not None:
            problem = _field_problem(ARCH_FIELDS[name], value)
            if problem:
                raise VitkitError(f"{where} has {name} {value!r}, {problem}: the file is damaged or not vitkit's")
    patch, image, width, heads = (fields.get(name) for name in ("patch_size", "image_size", "embed_dim", "num_heads"))
    problem = size_problem(image_size=image, patch_size=patch, embed_dim=width, num_heads=heads)
    if problem:
        raise VitkitError(f"{where}: {problem.partition(':')[0]}; the file is damaged or not vitkit's")
    if patch and image and width and (image // patch) ** 2 * width > MAX_POSITION_ELEMENTS:
        raise VitkitError(f"{where} has image_size {image} at patch_size {patch} and embed_dim {width}: a position "
                          f"table of {(image // patch) ** 2 * width} elements, more than vitkit builds "
                          f"({MAX_POSITION_ELEMENTS})")
    return fields


def arch_from_options(name: str, options: dict, **changes) -> ViTArch:
    """The architecture a config's model group describes: its ViTArch options passed straight through, except a
    preset size of 0 (the preset's), with a class token exactly when the head reads it (the original's rule)."""
    fields = {key: value for key, value in options.items() if not (ARCH_FIELDS[key].metadata.get("preset") and not value)}
    if "pool" in fields:
        fields.setdefault("class_token", fields["pool"] == "token")
    fields.update(changes)
    return make_arch(name, **fields)


def make_arch(name: str | None = None, style: str | None = None, **overrides) -> ViTArch:
    """A preset's architecture in a source style's numerics (default DEFAULT_STYLE), with any field overridden."""
    fields = resolve_preset(name) if name else {}
    if style is not None:
        fields["style"] = style
    for key in overrides:
        if key not in ARCH_FIELDS:
            close = difflib.get_close_matches(key, sorted(ARCH_FIELDS), n=1)
            hint = f": did you mean '{close[0]}'?" if close else f": valid ones are {', '.join(sorted(ARCH_FIELDS))}"
            raise VitkitError(f"unknown model argument '{key}'{hint}")
    fields.update(overrides)
    return ViTArch(**fields)


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample, scaling the survivors by 1/keep."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class PatchEmbed(nn.Module):
    """Cuts the image into patches and projects each; a strided conv equals the original's per-patch dense layer."""

    def __init__(self, arch: ViTArch, components: "ViTComponents"):
        super().__init__()
        self.patch_size = arch.patch_size
        self.proj = nn.Conv2d(arch.in_chans, arch.embed_dim, arch.patch_size, stride=arch.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, arch: ViTArch, components: "ViTComponents"):
        super().__init__()
        self.num_heads = arch.num_heads
        self.qkv = nn.Linear(arch.embed_dim, 3 * arch.embed_dim, bias=arch.qkv_bias)
        self.attn_drop_rate = arch.attn_drop_rate
        self.proj = nn.Linear(arch.embed_dim, arch.embed_dim)
        self.proj_drop = nn.Dropout(arch.proj_drop_rate)

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """Self-attention over all tokens; with `queries`, only the first `queries` tokens ask (and get an output),
        while every token still answers as key and value."""
        batch, tokens, width = x.shape
        heads, head_width = self.num_heads, width // self.num_heads
        if queries is None:
            qkv = self.qkv(x).reshape(batch, tokens, 3, heads, head_width).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            # The fused projection split by rows: queries for the first tokens only, keys and values for all.
            weight, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, :queries], weight[:width], None if bias is None else bias[:width])
            q = q.reshape(batch, queries, heads, head_width).transpose(1, 2)
            kv = F.linear(x, weight[width:], None if bias is None else bias[width:])
            k, v = kv.reshape(batch, tokens, 2, heads, head_width).permute(2, 0, 3, 1, 4).unbind(0)
        dropout = self.attn_drop_rate if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        x = x.transpose(1, 2).reshape(batch, q.shape[2], width)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, arch: ViTArch, components: "ViTComponents"):
        super().__init__()
        self.fc1 = nn.Linear(arch.embed_dim, arch.mlp_dim)
        self.act = components.activation(arch)
        self.drop1 = nn.Dropout(arch.mlp_drop_rate)
        self.fc2 = nn.Linear(arch.mlp_dim, arch.embed_dim)
        self.drop2 = nn.Dropout(arch.mlp_drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block; both residual branches share the block's stochastic-depth rate, as in the original."""

    def __init__(self, arch: ViTArch, components: "ViTComponents", drop_path_rate: float):
        super().__init__()
        self.norm1 = components.norm(arch, arch.embed_dim)
        self.attn = components.attention(arch, components)
        self.drop_path1 = DropPath(drop_path_rate)
        self.norm2 = components.norm(arch, arch.embed_dim)
        self.mlp = components.mlp(arch, components)
        self.drop_path2 = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor, keep_tokens: int | None = None) -> torch.Tensor:
        """The block over all tokens; with `keep_tokens`, the output of only the first `keep_tokens` tokens (their
        attention still reads every token), for when nothing else is read from the block."""
        if keep_tokens is None:
            x = x + self.drop_path1(self.attn(self.norm1(x)))
        else:
            x = x[:, :keep_tokens] + self.drop_path1(self.attn(self.norm1(x), queries=keep_tokens))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ViTComponents:
    """The swappable parts of a ViT: the PyTorch counterpart of the original's `vit_config_path` hook.

    Subclass it, replace any attribute, and name the subclass in the config (`model.components: mypkg.MyParts`)
    or pass it to `create_model(..., components=MyParts)`.
    """

    patch_embed = PatchEmbed
    attention = Attention
    mlp = Mlp
    block = Block
    # Whether the last block may compute the class token alone (Block's and Attention's `keep_tokens`/`queries`
    # arguments) when class-token pooling reads nothing else. None: only when `block` and `attention` are vitkit's
    # own; a subclass whose swapped-in block and attention take those arguments sets True.
    class_token_only_last_block: bool | None = None

    def last_block_class_token_only(self) -> bool:
        if self.class_token_only_last_block is not None:
            return bool(self.class_token_only_last_block)
        return self.block is Block and self.attention is Attention

    def norm(self, arch: ViTArch, width: int) -> nn.Module:
        return nn.LayerNorm(width, eps=arch.ln_eps)

    def activation(self, arch: ViTArch) -> nn.Module:
        return TanhGELU() if arch.gelu == "tanh" else nn.GELU()


def resolve_components(components) -> ViTComponents:
    """A ViTComponents instance from an instance, a subclass, or a dotted 'module.Class' path ('' = default)."""
    if components is None or components == "":
        return ViTComponents()
    if isinstance(components, str):
        module_name, _, attr = components.rpartition(".")
        if not module_name:
            raise VitkitError(f"model components '{components}' is not a dotted path: write it as 'package.module.Class'")
        # Importing the module runs it: a config that names one is code its user trusts. What it names is then
        # checked before anything of it is called: a class, and a ViTComponents one.
        try:
            found = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise VitkitError(f"cannot import model components '{components}' ({exc}): check the module is on PYTHONPATH") from None
        if not (isinstance(found, type) and issubclass(found, ViTComponents)):
            kind = f"class {found.__name__}" if isinstance(found, type) else f"a {type(found).__name__}"
            raise VitkitError(
                f"model components '{components}' is {kind}, not a subclass of vitkit.ViTComponents: "
                "name a class that subclasses it"
            )
        components = found
    if isinstance(components, type):
        if not issubclass(components, ViTComponents):
            raise VitkitError(f"model components must subclass vitkit.ViTComponents, got class {components.__name__}")
        components = components()
    if not isinstance(components, ViTComponents):
        raise VitkitError(f"model components must subclass vitkit.ViTComponents, got {type(components).__name__}")
    return components


def sincos_pos_embed(grid: int, width: int, num_prefix_tokens: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MoCo v3 / big_vision), zeros for the class token."""
    if width % 4:
        raise VitkitError(f"sincos position embeddings need a width divisible by 4, got {width}")
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    quarter = width // 4
    freqs = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1))
    by_col = cols.flatten()[:, None] * freqs[None]
    by_row = rows.flatten()[:, None] * freqs[None]
    table = torch.cat([by_col.sin(), by_col.cos(), by_row.sin(), by_row.cos()], dim=1)
    table = torch.cat([torch.zeros(num_prefix_tokens, width, dtype=torch.float64), table])
    return table.float().unsqueeze(0)


class VisionTransformer(nn.Module):
    """Pre-norm ViT (Dosovitskiy et al. 2021). Parameter names follow timm, so timm state_dicts load unchanged."""

    def __init__(self, arch: ViTArch, components=None):
        super().__init__()
        self.arch = arch
        parts = resolve_components(components)
        self.patch_embed = parts.patch_embed(arch, parts)
        width, tokens = arch.embed_dim, arch.grid_size**2 + arch.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if arch.class_token else None
        if arch.pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, tokens, width))
        else:
            self.register_buffer("pos_embed", sincos_pos_embed(arch.grid_size, width, arch.num_prefix_tokens), persistent=False)
        self.pos_drop = nn.Dropout(arch.drop_rate)
        last = max(arch.depth - 1, 1)
        rates = [arch.drop_path_rate * index / last for index in range(arch.depth)]
        self.blocks = nn.Sequential(*[parts.block(arch, parts, rate) for rate in rates])
        self.norm = nn.Identity() if arch.fc_norm else parts.norm(arch, width)
        self.fc_norm = parts.norm(arch, width) if arch.fc_norm else nn.Identity()
        if arch.representation_size:
            self.pre_logits = nn.Sequential()
            self.pre_logits.add_module("fc", nn.Linear(width, arch.representation_size))
            self.pre_logits.add_module("act", nn.Tanh())
            head_in = arch.representation_size
        else:
            self.pre_logits = nn.Identity()
            head_in = width
        self.head = nn.Linear(head_in, arch.num_classes) if arch.num_classes > 0 else nn.Identity()
        # The block the components declared able to compute the class token alone; a block swapped in later is
        # not that object, so it runs whole. Held in a tuple so that it is not registered as a second submodule.
        shortcut = arch.pool == "token" and len(self.blocks) > 0 and parts.last_block_class_token_only()
        self._class_token_only_block = (self.blocks[-1],) if shortcut else ()
        self.grad_checkpointing = False  # model.grad_checkpointing: recompute each block in the backward pass
        init_weights(self, arch.init)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Token features after the final norm, shape (batch, prefix + patches, width)."""
        return self.norm(self.blocks(self.embed(images)))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the class token and position embedding added, before the first block."""
        height, width = images.shape[-2:]
        arch = self.arch
        if arch.dynamic_img_size:
            if height % arch.patch_size or width % arch.patch_size:
                raise VitkitError(
                    f"input is {height}x{width}, not whole {arch.patch_size}-pixel patches: resize or crop it to a "
                    f"multiple of {arch.patch_size}"
                )
        elif (height, width) != (arch.image_size, arch.image_size):
            raise VitkitError(
                f"input is {height}x{width} but the model takes {arch.image_size}x{arch.image_size}: "
                "resize the input or rebuild the model with image_size set (position embeddings are resampled), "
                "or with dynamic_img_size=True"
            )
        x = self.patch_embed(images)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.pos_drop(x + self._pos_embed(height // arch.patch_size, width // arch.patch_size).to(x.dtype))

    def _pos_embed(self, rows, cols) -> torch.Tensor:
        """The position embedding for a rows x cols grid of patches.

        With dynamic_img_size it is always resampled (bicubic, no antialiasing, as timm's dynamic_img_size), even at
        the trained grid where that is exact: a traced export then holds one graph for every size."""
        if not self.arch.dynamic_img_size:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, (rows, cols), self.arch.num_prefix_tokens, antialias=False,
                                  always=True)

    def _last_block_class_token_only(self) -> bool:
        """Whether the last block computes the class token alone: declared by the components at build time
        (ViTComponents.class_token_only_last_block), for the block built then."""
        return any(block is self.blocks[-1] for block in self._class_token_only_block)

    def pooled_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The blocks and final norm over embedded tokens, keeping what forward_head reads.

        With class-token pooling the last block's query, projection and MLP run for the class token alone: the same
        logits for roughly 1/depth less work (6-7 % of a 12-block ViT's matrix products, training and inference).
        """
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        last_kwargs = {"keep_tokens": 1} if self._last_block_class_token_only() else {}
        for index, block in enumerate(self.blocks):
            kwargs = last_kwargs if index == len(self.blocks) - 1 else {}
            if checkpointed:
                # The block's activations are recomputed in the backward pass (with the RNG state of the forward,
                # so dropout draws the same masks) instead of kept: memory for about one more forward pass.
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, use_reentrant=False, **kwargs)
            else:
                tokens = block(tokens, **kwargs)
        return self.norm(tokens)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.arch.pool == "token":
            x = tokens[:, 0]
        else:
            x = tokens[:, self.arch.num_prefix_tokens :].mean(dim=1)
        x = self.pre_logits(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.pooled_tokens(self.embed(images)))

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head for another class count (transfer learning), initialised by the model's scheme."""
        self.arch = self.arch.replace(num_classes=num_classes)
        head_in = self.arch.representation_size or self.arch.embed_dim
        device = next(self.parameters()).device
        self.head = nn.Linear(head_in, num_classes, device=device) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_linear(self.head, self.arch.init)


def _init_linear(layer: nn.Linear, scheme: str) -> None:
    if scheme == "mindspore":
        nn.init.xavier_uniform_(layer.weight)
    else:
        nn.init.trunc_normal_(layer.weight, std=0.02)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


@torch.no_grad()
def init_weights(model: VisionTransformer, scheme: str) -> None:
    """'mindspore': the original's Xavier-uniform weights, zero biases, N(0,1) class token and position embedding.
    'timm': truncated normal 0.02 for weights and position embedding, class token N(0, 1e-6)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            _init_linear(module, scheme)
    if scheme == "mindspore":
        # The original keeps q, k and v as three (d, d) layers; Xavier bounds come from each one's fans, not the fused (3d, d).
        for block in model.blocks:
            qkv = getattr(getattr(block, "attn", None), "qkv", None)
            if isinstance(qkv, nn.Linear):
                for part in qkv.weight.chunk(3, dim=0):
                    nn.init.xavier_uniform_(part)
        # The original's stem is a dense layer over flattened patches: fans are (3*p*p, d), not the conv's.
        proj = getattr(model.patch_embed, "proj", None)
        if isinstance(proj, nn.Conv2d):
            nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
            nn.init.zeros_(proj.bias)
        if model.cls_token is not None:
            nn.init.normal_(model.cls_token, std=1.0)
        if isinstance(model.pos_embed, nn.Parameter):
            nn.init.normal_(model.pos_embed, std=1.0)
    else:
        if model.cls_token is not None:
            nn.init.normal_(model.cls_token, std=1e-6)
        if isinstance(model.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(model.pos_embed, std=0.02)


def resample_pos_embed(pos_embed: torch.Tensor, new_grid, num_prefix_tokens: int, *, antialias: bool | None = None,
                       always: bool = False) -> torch.Tensor:
    """Bicubic resampling of a learned (1, prefix + g*g, d) position embedding to a new grid: a side, or (rows, cols).

    `antialias` defaults to on when shrinking (what loading at a smaller image size wants); `always` resamples even
    to the same grid (an exact copy), so that a traced graph does not depend on the input size."""
    rows, cols = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(grid_tokens.shape[1])
    if old_grid * old_grid != grid_tokens.shape[1]:
        raise VitkitError(f"position embedding has {grid_tokens.shape[1]} patch tokens, not a square grid: cannot resample it")
    if not always and (rows, cols) == (old_grid, old_grid):
        return pos_embed
    if antialias is None:
        antialias = rows < old_grid or cols < old_grid
    width = grid_tokens.shape[-1]
    grid = grid_tokens.reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2)
    dtype = grid.dtype
    grid = F.interpolate(grid.float(), size=(rows, cols), mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, width).to(dtype)
    return torch.cat([prefix, grid], dim=1)


def create_model(name: str, *, style: str | None = None, components=None, **overrides) -> VisionTransformer:
    """A preset ViT, e.g. create_model('vit_base_patch32', num_classes=1001). Its numerics are DEFAULT_STYLE's (the
    original's, as `vitkit train` builds it) unless style='timm' or a field says otherwise."""
    return VisionTransformer(make_arch(name, style=style, **overrides), components=components)
