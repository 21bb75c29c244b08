"""From a resolved config to the objects a run needs: the device, the model, its pretrained weights."""
from __future__ import annotations

import contextlib
import warnings

import torch

from vitkit.errors import VitkitError
from vitkit.engine.checkpoint import newest_weights
from vitkit.model.loading import load_state, read_weights, source_numerics
from vitkit.model.vit import VisionTransformer, make_arch

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
    """The configured preset, any shape fields set in the config, its numerics, regularisation and components."""
    shape = {key: getattr(model_cfg, key) for key in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_dim")}
    arch = make_arch(
        model_cfg.name,
        **{key: value for key, value in shape.items() if value},
        num_classes=model_cfg.num_classes if num_classes is None else num_classes,
        image_size=model_cfg.image_size,
        init=model_cfg.init,
        ln_eps=model_cfg.ln_eps,
        gelu=model_cfg.gelu,
        pool=model_cfg.pool,
        class_token=model_cfg.pool == "token",
        pos_embed=model_cfg.pos_embed,
        drop_rate=model_cfg.drop_rate,
        proj_drop_rate=model_cfg.proj_drop_rate,
        mlp_drop_rate=model_cfg.mlp_drop_rate,
        attn_drop_rate=model_cfg.attn_drop_rate,
        drop_path_rate=model_cfg.drop_path_rate,
    )
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
    state = dict(weights.state_dict)
    own = model.state_dict()
    skipped = []
    for name in ("head.weight", "head.bias"):
        if name in state and (name not in own or state[name].shape != own[name].shape):
            skipped.append(name)
            del state[name]
    for name in [name for name in state if name.startswith("pre_logits.") and name not in own]:
        skipped.append(name)
        del state[name]
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
