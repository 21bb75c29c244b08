"""Where a ViT looks: per-block attention probabilities, attention rollout (Abnar & Zuidema 2020), and a picture.

`attention_probabilities` recomputes each block's softmax(q k^T / sqrt(head width)) from the block's own norm1 and
fused qkv while the blocks run over every token, `attention_rollout` multiplies the head-fused, residual-mixed layer
matrices, and `explain_image` draws the rollout over the image beside the last block's per-head maps.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.errors import VitkitError
from vitkit.fileio import atomic_path

HEAD_FUSIONS = ("mean", "max", "min")
# The largest image (width x height, from the file's header) explain_image decodes.
MAX_PIXELS = 100_000_000
# The PNG explain_image writes: FIGURE_INCHES at FIGURE_DPI, i.e. 1400 x 600 pixels.
FIGURE_INCHES = (14.0, 6.0)
FIGURE_DPI = 100


def _stock_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks, each checked to be vitkit's Block around vitkit's Attention (forwards not overridden)."""
    from vitkit.model.vit import Attention, Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise VitkitError(f"attention maps need a vitkit VisionTransformer, got {type(model).__name__}: load it with vitkit.load_model")
    blocks = list(getattr(model, "blocks", None) or [])
    if not blocks:
        raise VitkitError("the model has no attention blocks to explain: give a ViT with depth of at least 1")
    for index, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not (isinstance(block, Block) and type(block).forward is Block.forward):
            raise VitkitError(
                f"block {index} is a {type(block).__name__}, not vitkit's stock Block: attention maps are computed only "
                "for the stock block; build the model without swapped components"
            )
        if not (isinstance(attn, Attention) and type(attn).forward is Attention.forward and isinstance(attn.qkv, nn.Linear)):
            raise VitkitError(
                f"block {index}'s attention is a {type(attn).__name__}, not vitkit's stock Attention: attention maps are "
                "computed only for the stock attention; build the model without swapped components"
            )
    return blocks


def _block_probabilities(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * head_width^-0.5) of one stock block over tokens x, as (B, heads, tokens, tokens) float32:
    the scale scaled_dot_product_attention uses by default, on q and k from the block's fused qkv of norm1(x)."""
    attn = block.attn
    batch, tokens, width = x.shape
    heads = attn.num_heads
    head_width = width // heads
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, heads, head_width).permute(2, 0, 3, 1, 4)
    q, k = qkv[0].float(), qkv[1].float()
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head_width))
    return scores.softmax(dim=-1)


@torch.no_grad()
def attention_probabilities(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's attention probabilities for a normalized float batch (B, 3, H, W) at the model's image size.

    The blocks run in order over all tokens from `model.embed(images)` (no class-token-only last block), in eval
    mode (the model's mode is restored after); each entry is a float32 (B, heads, tokens, tokens) tensor on the
    model's device whose rows sum to 1. Models with swapped-in blocks or attention are refused.
    """
    blocks = _stock_blocks(model)
    if images.ndim != 4:
        raise VitkitError(f"images must be a (batch, channels, height, width) batch, got shape {tuple(images.shape)}")
    parameter = next(model.parameters())
    images = images.to(device=parameter.device, dtype=parameter.dtype if parameter.is_floating_point() else torch.float32)
    was_training = model.training
    model.eval()
    try:
        x = model.embed(images)
        probabilities = []
        for block in blocks:
            probabilities.append(_block_probabilities(block, x))
            x = block(x)
    finally:
        model.train(was_training)
    return probabilities


def attention_rollout(
    probabilities: list[torch.Tensor] | tuple[torch.Tensor, ...],
    discard_ratio: float = 0.0,
    head_fusion: str = "mean",
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): (B, tokens, tokens), row i = how much token i's output draws on
    each input token through all layers.

    Per layer the heads are fused (mean, max or min); with `discard_ratio` the lowest int(ratio * n) of each row's
    n non-prefix entries are zeroed (the prefix-token columns, the first `num_prefix_tokens`, are never discarded;
    vit-explain's convention, per row); the identity is added for the residual path and each row renormalised to
    sum 1; the layer matrices are multiplied in order, rollout = A_L @ ... @ A_1.
    """
    if not probabilities:
        raise VitkitError("attention rollout needs the attention of at least one block, got none")
    if head_fusion not in HEAD_FUSIONS:
        raise VitkitError(f"unknown head fusion '{head_fusion}': choose one of {', '.join(HEAD_FUSIONS)}")
    if not 0.0 <= discard_ratio < 1.0:
        raise VitkitError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    shape = tuple(probabilities[0].shape)
    if len(shape) != 4 or shape[-1] != shape[-2]:
        raise VitkitError(f"attention probabilities must be (batch, heads, tokens, tokens), got shape {shape}")
    tokens = shape[-1]
    if not 0 <= num_prefix_tokens < tokens:
        raise VitkitError(f"num_prefix_tokens must be in [0, {tokens}), got {num_prefix_tokens}")
    rollout = None
    for index, layer in enumerate(probabilities):
        if tuple(layer.shape[:1]) + tuple(layer.shape[2:]) != shape[:1] + shape[2:] or layer.ndim != 4:
            raise VitkitError(f"block {index}'s attention has shape {tuple(layer.shape)}, unlike block 0's {shape}")
        if head_fusion == "mean":
            fused = layer.float().mean(dim=1)
        elif head_fusion == "max":
            fused = layer.float().amax(dim=1)
        else:
            fused = layer.float().amin(dim=1)
        eligible = tokens - num_prefix_tokens
        drop = int(discard_ratio * eligible)
        if drop > 0:
            fused = fused.clone()
            patches = fused[..., num_prefix_tokens:]
            lowest = patches.topk(drop, dim=-1, largest=False).indices
            patches.scatter_(-1, lowest, 0.0)  # a view into fused: the prefix columns stay as they are
        mixed = fused + torch.eye(tokens, dtype=fused.dtype, device=fused.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    return rollout


def _read_image(image_path: str | os.PathLike) -> torch.Tensor:
    """The image's uint8 (3, H, W) RGB pixels; a missing, unreadable or over-large file is a VitkitError."""
    from PIL import Image

    from vitkit.data.folder import UnreadableImage, decode_rgb, read_bytes

    path = os.fspath(image_path)
    if not os.path.exists(path):
        raise VitkitError(f"image {path} does not exist: check the path")
    if not os.path.isfile(path):
        raise VitkitError(f"{path} is not a file: give the path of one image")
    try:
        with warnings.catch_warnings():  # PIL's own bomb warning (89 MP and up): the bound below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as header:
                width, height = header.size
    except Image.DecompressionBombError:
        raise VitkitError(f"image {path} is too large to explain (over {MAX_PIXELS // 1_000_000} megapixels): resize it first") from None
    except Exception:  # noqa: BLE001 - PIL cannot read the header: the decoder below tries and says why
        width = height = 0
    if width * height > MAX_PIXELS:
        raise VitkitError(
            f"image {path} is {width}x{height}, over {MAX_PIXELS // 1_000_000} megapixels: resize it before explaining it"
        )
    try:
        return decode_rgb(read_bytes(path))
    except OSError as exc:
        raise VitkitError(f"cannot read image {path} ({exc}): check the file's permissions") from None
    except UnreadableImage as exc:
        raise VitkitError(f"{path} is not an image vitkit can read ({exc}): give a JPEG, PNG, BMP, TIFF or WebP file") from None


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise VitkitError("explaining an image needs matplotlib: pip install 'vitkit[viz]'") from None
    return Figure, FigureCanvasAgg


def _unit_range(values: torch.Tensor) -> torch.Tensor:
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else torch.zeros_like(values)


def explain_image(
    model: nn.Module,
    image_path: str | os.PathLike,
    out_png: str | os.PathLike,
    normalization: str = "imagenet",
    interpolation: str = "BILINEAR",
    resize_size: int = 0,
) -> dict:
    """One PNG of where `model` looks in an image, and its top-1 prediction.

    The image is preprocessed as `vitkit eval` does (shorter side to resize_size, 0 = the eval default, then the
    centre crop at the model's image size, then `normalization`). Left: the crop with the attention rollout of the
    class token (row 0; the mean of the patch rows for a model without a class token) over the patches, upsampled
    to the crop; right: the last block's per-head maps for the same row(s), titled "head i". The figure title
    gives the top-1 class (its name when the model carries class names) and probability. The PNG is
    FIGURE_INCHES x FIGURE_DPI pixels, written atomically. Returns {"path", "top1", "probability", "grid"}.
    """
    from vitkit.data.transforms import eval_transform, normalize_batch

    _stock_blocks(model)  # before any work: a model we cannot explain is refused first
    Figure, FigureCanvasAgg = _matplotlib()
    arch = model.arch
    pixels = eval_transform(arch.image_size, interpolation, resize_size=resize_size or None)(_read_image(image_path))
    parameter = next(model.parameters())
    images = normalize_batch(pixels.unsqueeze(0).to(parameter.device), normalization=normalization)
    images = images.to(parameter.dtype)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(images).float()
        probabilities = attention_probabilities(model, images)
    finally:
        model.train(was_training)
    class_probabilities = logits.softmax(dim=-1)[0]
    top1 = int(class_probabilities.argmax())
    probability = float(class_probabilities[top1])

    prefix, grid = arch.num_prefix_tokens, arch.grid_size
    pooled = arch.pool != "token" or prefix == 0
    rollout = attention_rollout(probabilities, num_prefix_tokens=prefix)[0]
    last = probabilities[-1][0]  # (heads, tokens, tokens)
    if pooled:
        heat = rollout[prefix:, prefix:].mean(dim=0)
        heads = last[:, prefix:, prefix:].mean(dim=1)
        which = "mean patch row"
    else:
        heat = rollout[0, prefix:]
        heads = last[:, 0, prefix:]
        which = "class token"
    heat = heat.reshape(1, 1, grid, grid)
    heat = F.interpolate(heat, size=tuple(pixels.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    heat = _unit_range(heat).cpu().numpy()
    heads = heads.reshape(-1, grid, grid).cpu().numpy()

    names = getattr(model, "class_names", None)
    label = str(names[top1]) if names and top1 < len(names) else str(top1)

    figure = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    figure.suptitle(f"{Path(image_path).name}: top-1 {label} (p = {probability:.3f})")
    layout = figure.add_gridspec(1, 2, width_ratios=(1.0, 1.2), left=0.03, right=0.97, bottom=0.04, top=0.88, wspace=0.12)
    overlay = figure.add_subplot(layout[0])
    overlay.imshow(pixels.permute(1, 2, 0).cpu().numpy())
    overlay.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    overlay.set_title(f"attention rollout ({which})")
    overlay.axis("off")
    count = heads.shape[0]
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    cells = layout[1].subgridspec(rows, columns, wspace=0.08, hspace=0.3)
    for index in range(rows * columns):
        axis = figure.add_subplot(cells[index // columns, index % columns])
        axis.axis("off")
        if index < count:
            axis.imshow(heads[index], cmap="viridis", interpolation="nearest")
            axis.set_title(f"head {index}", fontsize=9)

    out = Path(out_png)
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=FIGURE_DPI)
    return {"path": str(out), "top1": top1, "probability": probability, "grid": grid}
