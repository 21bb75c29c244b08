"""AdamW with the original's weight-decay parameter groups, and gradient centralization that actually runs.

Gradient clipping is plain `torch.nn.utils.clip_grad_norm_`; nothing here wraps it.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from vitkit.errors import VitkitError

OPTIMIZER_NAMES = ("adamw",)
# AdamW's moment decays: 0 keeps no history, 1 would never forget (and divide by zero in the bias correction).
BETA_RANGE = dict(ge=0, lt=1)


def _mindspore_aliases(name: str) -> list[str]:
    """The param's MindSpore tags; none for params the original never had (fc_norm, pre-logits, other models)."""
    # Imported on use, so the engine needs the checkpoint-format module only when a filter is actually matched.
    from vitkit.model.formats.mindspore import mindspore_name

    try:
        return mindspore_name(name)
    except VitkitError:
        return []


def split_decay_groups(
    model: nn.Module,
    no_weight_decay_filter: str,
    weight_decay: float,
    name_aliases: Callable[[str], Sequence[str]] | None = None,
    centralize: bool = False,
    layer_decay: float = 1.0,
) -> list[dict]:
    """The original's two parameter groups: trainable params decayed with `weight_decay`, and the rest at 0.

    `no_weight_decay_filter` is a comma-separated list of substrings (the original's "beta,bias"); empty entries and
    surrounding spaces are dropped. A param skips decay if any substring occurs in its vitkit name or in any of its
    other names from `name_aliases` (default: its MindSpore checkpoint tags), so filters written for the original
    ("beta", "pos_embedding", "to_q") keep meaning what they meant there. A fused tensor such as attn.qkv skips decay
    as a whole if any of its original tags matches. With the default filter both name sets agree: all biases and
    LayerNorm betas skip decay; every weight, LayerNorm gamma, the class token and the position embedding decay.

    An empty filter gives a single decayed group. The decayed group carries `"centralize": centralize` for
    `centralize_gradients`; the other group never centralizes. Frozen params are left out; empty groups are dropped.

    Every group has an `lr_scale`, the factor PerStepLR multiplies the scheduled rate by: 1 unless `layer_decay` < 1,
    which splits both groups per layer (`layer_lr_scales`), as timm's param_groups_layer_decay does.
    """
    filters = [part.strip() for part in no_weight_decay_filter.split(",") if part.strip()]
    aliases = _mindspore_aliases if name_aliases is None else name_aliases
    scales = layer_lr_scales(model, layer_decay) if layer_decay != 1.0 else {}
    groups: dict[tuple[float, bool], dict] = {}  # (lr_scale, decayed): in the order the params come
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        names = [name, *aliases(name)] if filters else [name]
        decays = not any(part in candidate for part in filters for candidate in names)
        scale = scales.get(name, 1.0)
        if (scale, decays) not in groups:
            groups[scale, decays] = {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                     "centralize": centralize and decays, "lr_scale": scale}
        groups[scale, decays]["params"].append(param)
    if not groups:
        raise VitkitError("the model has no trainable parameters: unfreeze some before building the optimizer")
    # Decayed groups first, as the original's two groups were ordered.
    return [groups[key] for key in sorted(groups, key=lambda key: not key[1])]


def layer_id(name: str, depth: int) -> int:
    """The layer of a ViT parameter for layer-wise lr decay, as timm's VisionTransformer.group_matcher assigns it:
    0 for the patch embedding, class token and position embedding, i + 1 for block i, depth + 1 for the rest (the
    final norm, fc_norm, pre-logits and head)."""
    if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match[1]) + 1 if match else depth + 1


def layer_lr_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """Each parameter's lr factor under layer-wise decay: layer_decay ** (depth + 1 - layer_id)."""
    if not 0.0 < layer_decay <= 1.0:
        raise VitkitError(f"layer_decay must be in (0, 1], got {layer_decay}: set optimizer.layer_decay")
    depth = len(model.blocks)
    return {name: layer_decay ** (depth + 1 - layer_id(name, depth)) for name, _ in model.named_parameters()}


@torch.no_grad()
def centralize_gradients(param_groups: Sequence[dict]) -> None:
    """Gradient centralization: in groups marked `centralize`, every grad with 2+ dims gets its mean over all dims but
    the first subtracted, so each output row's grad is zero-mean. 1-D grads (biases, norms) are left alone.

    The original only set a flag for this and never applied it. Runs in place on the device, with no host sync;
    call it after unscaling and before clipping and `optimizer.step()`.
    """
    for group in param_groups:
        if not group.get("centralize", False):
            continue
        for param in group["params"]:
            grad = param.grad
            if grad is None or grad.ndim < 2:
                continue
            grad.sub_(grad.mean(dim=tuple(range(1, grad.ndim)), keepdim=True))


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    no_weight_decay_filter: str,
    gc_flag: bool,
    fused: bool | None = None,
    name_aliases: Callable[[str], Sequence[str]] | None = None,
    layer_decay: float = 1.0,
) -> torch.optim.AdamW:
    """torch AdamW over `split_decay_groups`; its update is the original's (decoupled decay lr·wd·param, eps outside
    the square root of the bias-corrected second moment).

    `gc_flag` marks the decayed group for `centralize_gradients`. `fused=None` picks the fused kernel when every
    param is on the CPU or CUDA and lets torch choose otherwise. `lr` is only the starting value:
    PerStepLR sets the real one every step. `name_aliases` and `layer_decay` are passed to `split_decay_groups`.
    """
    if str(name).lower() not in OPTIMIZER_NAMES:
        raise VitkitError(f"unknown optimizer '{name}': only {', '.join(OPTIMIZER_NAMES)} is supported")
    beta1, beta2 = betas
    if not all(BETA_RANGE["ge"] <= beta < BETA_RANGE["lt"] for beta in (beta1, beta2)):
        raise VitkitError(f"beta1 and beta2 must be in [0, 1), got {beta1} and {beta2}")
    if eps <= 0:
        raise VitkitError(f"eps must be greater than 0, got {eps}")
    if weight_decay < 0:
        raise VitkitError(f"weight_decay must be 0 or more, got {weight_decay}")
    groups = split_decay_groups(model, no_weight_decay_filter, weight_decay, name_aliases, centralize=bool(gc_flag),
                                layer_decay=layer_decay)
    if fused is None:
        # One kernel over all parameters: torch's default on the CPU is a loop over the tensors, one at a time,
        # which costs a noticeable share of a CPU training step on a large model.
        fused = all(param.device.type in ("cpu", "cuda") for group in groups for param in group["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=eps, fused=fused)
