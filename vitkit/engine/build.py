"""From a resolved config to the objects a run needs: the device, the model, its pretrained weights."""
from __future__ import annotations

import contextlib
import dataclasses
import warnings

import torch

from vitkit.errors import VitkitError
from vitkit.engine.checkpoint import newest_weights
from vitkit.engine.optim import layer_id
from vitkit.model.loading import drop_unfitting_head, load_state, read_weights, source_numerics
from vitkit.model.vit import ARCH_FIELDS, VisionTransformer, arch_from_options

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Checkpoint sources whose models were trained on inputs normalized with mean and std 0.5 (Flax .npz from the ViT
# paper, AugReg and big_vision; Hugging Face ViT). timm's own files do not say which statistics they used.
_INCEPTION_SOURCES = {"npz": "Flax .npz", "huggingface": "Hugging Face ViT"}


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VitkitError(f"train.device is '{name}' but no CUDA GPU is visible: use train.device=auto or cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` as the original meant its reduced precision: bf16 autocast on a GPU with bf16 matrix units, fp16 (with
    the dynamic loss scaler) on an older GPU, fp32 on the CPU, whose bf16 matrix products are slower than fp32 ones
    on most processors. Any other value is kept as given."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def autocast_context(precision: str, device: torch.device):
    """bf16/fp16 autocast for the forward pass; fp32 runs as written. `precision` is resolved (not `auto`)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


def build_model(model_cfg, num_classes: int | None = None) -> VisionTransformer:
    """The configured preset with every architecture option of the model group passed straight through, and its
    components. `num_classes` stands in for the configured count (a dataset's)."""
    options = {item.name: getattr(model_cfg, item.name) for item in dataclasses.fields(model_cfg) if item.name in ARCH_FIELDS}
    changes = {} if num_classes is None else {"num_classes": num_classes}
    arch = arch_from_options(model_cfg.name, options, **changes)
    return VisionTransformer(arch, components=model_cfg.components or None)


def load_pretrained(model: VisionTransformer, path: str, normalization: str = "imagenet") -> list[str]:
    """Non-strict start from any checkpoint load_model reads, or a training run's folder (its newest weights).

    A head for another class count is left freshly initialised (transfer learning, as the original's
    train_modelarts.py), and a pre-logits layer the model lacks is dropped (as the ViT paper fine-tuned);
    position embeddings are resampled when the image size differs. `normalization` is the run's input
    normalization, checked against what the checkpoint expects. Returns what was not loaded.
    """
    path = newest_weights(path)
    weights = read_weights(path)
    _warn_on_other_numerics(model, weights, path)
    warn_on_other_normalization(weights.source, normalization, path)
    own = model.state_dict()
    state, skipped = drop_unfitting_head(dict(weights.state_dict), {name: tensor.shape for name, tensor in own.items()})
    skipped += [name for name in own if name not in state and name not in skipped]
    unexpected = [name for name in state if name not in own]
    if unexpected:
        raise VitkitError(
            f"pretrained checkpoint '{path}' has {len(unexpected)} tensor(s) this model lacks (e.g. {unexpected[0]}): "
            "pick the model preset the checkpoint was trained with"
        )
    load_state(model, state, strict=False)
    return skipped


def _warn_on_other_numerics(model: VisionTransformer, weights, path: str) -> None:
    """Features trained with one LayerNorm eps or GELU form shift under another: say so, and which keys fix it."""
    source = source_numerics(weights)
    eps, gelu = source["ln_eps"], source["gelu"]
    if (eps, gelu) != (model.arch.ln_eps, model.arch.gelu):
        warnings.warn(
            f"pretrained '{path}' was trained with LayerNorm eps {eps:g} and {gelu} GELU, but the model uses "
            f"eps {model.arch.ln_eps:g} and {model.arch.gelu} GELU: set model.ln_eps={eps:g} and model.gelu={gelu} "
            "to start from the same features",
            stacklevel=3,
        )


def warn_on_other_normalization(source: str, normalization: str, path, stacklevel: int = 2) -> None:
    """Weights trained on mean/std 0.5 inputs score far lower on ImageNet-normalized ones: say so, not switch silently."""
    if source in _INCEPTION_SOURCES and normalization == "imagenet":
        warnings.warn(
            f"'{path}' ({_INCEPTION_SOURCES[source]}): this checkpoint expects inputs normalized with mean/std 0.5, "
            "not ImageNet's: set data.normalization=inception",
            stacklevel=stacklevel + 1,
        )


def freeze_parameters(model: VisionTransformer, spec: str) -> list[str]:
    """train.freeze: '' freezes nothing; 'backbone' everything but the head (a linear probe); an integer N the patch
    embedding, class token, position embedding and the first N blocks. Frozen parameters get requires_grad False,
    so they get no gradients and the optimizer (which takes trainable parameters only) never sees them. Returns the
    frozen parameters' names."""
    spec = str(spec).strip()
    if not spec:
        return []
    depth = len(model.blocks)
    if spec == "backbone":
        frozen = [name for name, _ in model.named_parameters() if not name.startswith("head.")]
    elif spec.isdigit() and len(spec) <= 4 and int(spec) <= depth:
        # Layer 0 is the stem, layer i + 1 block i: the numbering layer-wise lr decay uses.
        frozen = [name for name, _ in model.named_parameters() if layer_id(name, depth) <= int(spec)]
    else:
        raise VitkitError(f"train.freeze is '{spec[:40]}': use '' (train everything), 'backbone' (the head alone) or "
                          f"a number of blocks from 0 to the model's depth, {depth}")
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    return frozen
