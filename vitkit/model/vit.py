"""The Vision Transformer family: one pre-norm ViT whose every size and numeric choice is a field of ViTArch."""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.errors import VitkitError
from vitkit.model.gelu import TanhGELU
from vitkit.model.presets import resolve_preset

_CHOICES = {
    "pool": ("token", "mean"),
    "pos_embed": ("learn", "sincos"),
    "gelu": ("erf", "tanh"),
    "init": ("timm", "mindspore"),
}


# The largest value of each size field that vitkit reads from a file (its metadata or its block names), well past
# every preset (ViT-H: width 1280, depth 32) yet far below what would exhaust memory before a shape check could fail.
ARCH_LIMITS = {
    "patch_size": 1024, "embed_dim": 16384, "depth": 1024, "num_heads": 1024, "mlp_dim": 65536, "image_size": 16384,
    "num_classes": 1_000_000, "in_chans": 64, "representation_size": 16384,
}
MAX_DEPTH = ARCH_LIMITS["depth"]
# Position-table elements (tokens x width) a file may imply: its sin-cos table is computed, not stored, so no shape
# check bounds it. ViT-H/14 at 518 pixels needs 1.8M; this is 268M (1 GiB of float32).
MAX_POSITION_ELEMENTS = 1 << 28
_INT_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_dim", "image_size", "num_classes", "in_chans",
               "representation_size")
_BOOL_FIELDS = ("class_token", "fc_norm", "qkv_bias")
_RATE_FIELDS = ("drop_rate", "proj_drop_rate", "mlp_drop_rate", "attn_drop_rate", "drop_path_rate")


def check_arch_fields(fields, where: str) -> dict:
    """The ViTArch fields a file states (its metadata or config), each of ViTArch's type and within ARCH_LIMITS.

    Checked before anything is built from them, so that no file can make vitkit allocate a model its tensors do not
    hold; `where` names the metadata in the VitkitError. Fields ViTArch does not have are left for the caller to drop.
    """
    if not isinstance(fields, dict):
        raise VitkitError(f"{where} is not a JSON object of architecture fields: the file is damaged or not vitkit's")

    def bad(name: str, why: str) -> VitkitError:
        return VitkitError(f"{where} has {name} {fields[name]!r}, {why}: the file is damaged or not vitkit's")

    for name, value in fields.items():
        if name in _INT_FIELDS:
            low = 0 if name in ("num_classes", "representation_size") else 1
            if type(value) is not int:
                raise bad(name, "not an integer")
            if not low <= value <= ARCH_LIMITS[name]:
                raise bad(name, f"outside {low}..{ARCH_LIMITS[name]}")
        elif name in _BOOL_FIELDS and type(value) is not bool:
            raise bad(name, "not true or false")
        elif name in _CHOICES and (not isinstance(value, str) or value not in _CHOICES[name]):
            raise bad(name, f"not one of {', '.join(_CHOICES[name])}")
        elif name == "ln_eps" and not (type(value) in (int, float) and 0 < value <= 1):
            raise bad(name, "not a number in (0, 1]")
        elif name in _RATE_FIELDS and not (type(value) in (int, float) and 0 <= value < 1):
            raise bad(name, "not a rate in [0, 1)")
    patch, image, width, heads = (fields.get(name) for name in ("patch_size", "image_size", "embed_dim", "num_heads"))
    if patch and image and (patch > image or image % patch):
        raise VitkitError(f"{where} has image_size {image} and patch_size {patch}, which does not divide it: "
                          "the file is damaged or not vitkit's")
    if width and heads and width % heads:
        raise VitkitError(f"{where} has num_heads {heads}, which does not divide embed_dim {width}: "
                          "the file is damaged or not vitkit's")
    if patch and image and width and (image // patch) ** 2 * width > MAX_POSITION_ELEMENTS:
        raise VitkitError(f"{where} has image_size {image} at patch_size {patch} and embed_dim {width}: a position "
                          f"table of {(image // patch) ** 2 * width} elements, more than vitkit builds "
                          f"({MAX_POSITION_ELEMENTS})")
    return fields


@dataclass(frozen=True)
class ViTArch:
    """Everything that decides a ViT's shape and numerics. Defaults are timm's; the original's are in STYLES."""

    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    image_size: int = 224
    num_classes: int = 1000
    in_chans: int = 3
    class_token: bool = True
    pool: str = "token"
    pos_embed: str = "learn"
    fc_norm: bool = False  # LayerNorm after pooling (timm's mean-pool models) instead of before it
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    gelu: str = "erf"
    representation_size: int = 0  # a tanh pre-logits layer of this width (the ViT paper's checkpoints); 0 = none
    drop_rate: float = 0.0  # after adding the position embedding
    proj_drop_rate: float = 0.0  # after the attention output projection
    mlp_drop_rate: float = 0.0  # after the MLP activation and after its second layer
    attn_drop_rate: float = 0.0  # on the attention probabilities; the original has none
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly from 0 at the first block to this at the last
    init: str = "timm"

    def __post_init__(self):
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise VitkitError(f"model {name} '{getattr(self, name)}' is not one of {', '.join(choices)}")
        for name in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_dim", "image_size", "in_chans"):
            if getattr(self, name) < 1:
                raise VitkitError(f"model {name} must be at least 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise VitkitError(
                f"image size {self.image_size} is not divisible by patch size {self.patch_size}: "
                f"use a multiple of {self.patch_size}, e.g. {self.patch_size * max(1, self.image_size // self.patch_size)}"
            )
        if self.embed_dim % self.num_heads:
            raise VitkitError(f"width {self.embed_dim} is not divisible by {self.num_heads} heads: pick a head count that divides it")
        if self.pool == "token" and not self.class_token:
            raise VitkitError("pool 'token' needs a class token: set pool to 'mean' or class_token to true")
        for name in ("drop_rate", "proj_drop_rate", "mlp_drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise VitkitError(f"model {name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.class_token else 0

    def replace(self, **changes) -> "ViTArch":
        return dataclasses.replace(self, **changes)


# The numerics and regularisation of each source framework, applied together by `style=`.
STYLES = {
    "timm": dict(ln_eps=1e-6, gelu="erf", init="timm"),
    # The MindSpore model zoo: LayerNorm eps 1e-7, tanh GELU, Xavier init, dropout 0.1 everywhere, DropPath to 0.1.
    "mindspore": dict(
        ln_eps=1e-7, gelu="tanh", init="mindspore",
        drop_rate=0.1, proj_drop_rate=0.1, mlp_drop_rate=0.1, drop_path_rate=0.1,
    ),
}


def make_arch(name: str | None = None, style: str | None = None, **overrides) -> ViTArch:
    """A preset's architecture, with a source style's numerics and any field overridden."""
    fields = resolve_preset(name) if name else {}
    if style is not None:
        if style not in STYLES:
            raise VitkitError(f"unknown style '{style}': choose one of {', '.join(STYLES)}")
        fields.update(STYLES[style])
    known = {f.name for f in dataclasses.fields(ViTArch)}
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f": did you mean '{close[0]}'?" if close else f": valid ones are {', '.join(sorted(known))}"
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
        init_weights(self, arch.init)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Token features after the final norm, shape (batch, prefix + patches, width)."""
        return self.norm(self.blocks(self.embed(images)))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the class token and position embedding added, before the first block."""
        height, width = images.shape[-2:]
        if (height, width) != (self.arch.image_size, self.arch.image_size):
            raise VitkitError(
                f"input is {height}x{width} but the model takes {self.arch.image_size}x{self.arch.image_size}: "
                "resize the input or rebuild the model with image_size set (position embeddings are resampled)"
            )
        x = self.patch_embed(images)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.pos_drop(x + self.pos_embed.to(x.dtype))

    def _last_block_class_token_only(self) -> bool:
        """Whether the last block may compute the class token alone: class-token pooling reads nothing else, and the
        stock block and attention take the arguments. Swapped-in ones with their own forward (at build time or
        later) may not, so they run whole. FSDP2's sharded blocks keep the stock forward."""
        last = self.blocks[-1] if len(self.blocks) else None
        return (
            self.arch.pool == "token"
            and isinstance(last, Block) and type(last).forward is Block.forward
            and isinstance(last.attn, Attention) and type(last.attn).forward is Attention.forward
        )

    def pooled_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The blocks and final norm over embedded tokens, keeping what forward_head reads.

        With class-token pooling the last block's query, projection and MLP run for the class token alone: the same
        logits for roughly 1/depth less work (6-7 % of a 12-block ViT's matrix products, training and inference).
        """
        if not self._last_block_class_token_only():
            return self.norm(self.blocks(tokens))
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        return self.norm(self.blocks[-1](tokens, keep_tokens=1))

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


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int) -> torch.Tensor:
    """Bicubic resampling of a learned (1, prefix + g*g, d) position embedding to a new square grid."""
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(grid_tokens.shape[1])
    if old_grid * old_grid != grid_tokens.shape[1]:
        raise VitkitError(f"position embedding has {grid_tokens.shape[1]} patch tokens, not a square grid: cannot resample it")
    if old_grid == new_grid:
        return pos_embed
    width = grid_tokens.shape[-1]
    grid = grid_tokens.reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=new_grid < old_grid)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, width).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def create_model(name: str, *, style: str | None = None, components=None, **overrides) -> VisionTransformer:
    """A preset ViT, e.g. create_model('vit_base_patch32', num_classes=1001, style='mindspore')."""
    return VisionTransformer(make_arch(name, style=style, **overrides), components=components)
