"""Classification losses: the original's three (`ce_smooth`, `ce_smooth_mixup`, `ce_ignore`) plus plain soft-target CE.

Every loss takes logits and either integer labels (B,) or soft targets (B, C) such as BatchMixer's output, and returns
the batch mean as an fp32 scalar: logits are upcast first so bf16/fp16 autocast never rounds the log-softmax.
Label smoothing is the loss's job, never the mixer's, as in the original.
"""
from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.errors import VitkitError

IGNORE_LABEL = 255


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), dim=-1)


def _soft_target_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets.float() * _log_probs(logits)).sum(dim=-1).mean()


def _smoothed_int_label_ce(logits: torch.Tensor, labels: torch.Tensor, on_value: float, off_value: float) -> torch.Tensor:
    """CE against targets `on_value` at the label and `off_value` elsewhere, without building the (B, C) target."""
    log_probs = _log_probs(logits)
    label_log_prob = log_probs.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    other_log_probs = log_probs.sum(dim=-1) - label_log_prob
    return -(on_value * label_log_prob + off_value * other_log_probs).mean()


def ce_smooth(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """The original's CrossEntropySmooth: on = 1 - s, off = s / (C - 1), so the target sums to exactly 1.

    Soft (B, C) targets (after mixup) are used as given: the original never saw them here, and smoothing an
    already-mixed target would need a rule it does not define.
    """
    if target.is_floating_point():
        return _soft_target_ce(logits, target)
    num_classes = logits.shape[-1]
    return _smoothed_int_label_ce(logits, target, 1.0 - smoothing, smoothing / (num_classes - 1))


def ce_smooth_mixup(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """The original's CrossEntropySmoothMixup (its default loss): t_c = (1 - s)·y_c + [y_c == 0]·s / (C - 2).

    The C - 2 is the original's number, kept so losses match it: a target mixed from two classes sums to exactly 1,
    but a pure one-hot (λ = 1, or a sample mixed with itself) sums to 1 + s / (C - 2). Integer labels (mixup off,
    where the original crashes) are one-hot encoded first, so they get that same 1 + s / (C - 2) sum.
    """
    num_classes = logits.shape[-1]
    if not target.is_floating_point():
        target = F.one_hot(target.long(), num_classes)
    target = target.float()
    smoothed = (1.0 - smoothing) * target + (target == 0).float() * (smoothing / (num_classes - 2))
    return _soft_target_ce(logits, smoothed)


def soft_ce(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Standard soft-target CE: integer labels get the usual smoothing (off = s/C, on = 1 - s + s/C); soft targets as given."""
    if target.is_floating_point():
        return _soft_target_ce(logits, target)
    num_classes = logits.shape[-1]
    off_value = smoothing / num_classes
    return _smoothed_int_label_ce(logits, target, 1.0 - smoothing + off_value, off_value)


def ce_ignore(logits: torch.Tensor, target: torch.Tensor, ignore_label: int = IGNORE_LABEL) -> torch.Tensor:
    """The original's CrossEntropyIgnore, a segmentation leftover: per-pixel CE on (N, C, H, W) logits and (N, H, W)
    labels, averaged over the pixels whose label is not `ignore_label` (NaN if every pixel is ignored, as there)."""
    return F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_label)


_SMOOTHED_LOSSES = {"ce_smooth": ce_smooth, "ce_smooth_mixup": ce_smooth_mixup, "soft_ce": soft_ce}
LOSS_NAMES = (*_SMOOTHED_LOSSES, "ce_ignore")
# The off-value divides by C - 1 (ce_smooth) or C - 2 (ce_smooth_mixup), so these losses need more classes than that.
_MIN_CLASSES = {"ce_smooth": 2, "ce_smooth_mixup": 3, "soft_ce": 1}


class SmoothedClassificationLoss(nn.Module):
    """One of the label-smoothing losses above as a module with its smoothing and class count fixed."""

    def __init__(self, name: str, num_classes: int, smoothing: float):
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.smoothing = smoothing
        self._loss_fn = _SMOOTHED_LOSSES[name]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # A mismatch here would otherwise surface as an out-of-range index deep inside a CUDA kernel.
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"{self.name}: logits have {logits.shape[-1]} classes, the loss was built for {self.num_classes}")
        return self._loss_fn(logits, target, self.smoothing)

    def extra_repr(self) -> str:
        return f"{self.name}, num_classes={self.num_classes}, smoothing={self.smoothing}"


class IgnoreLabelLoss(nn.Module):
    """`ce_ignore` as a module."""

    def __init__(self, ignore_label: int = IGNORE_LABEL):
        super().__init__()
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ce_ignore(logits, target, self.ignore_label)

    def extra_repr(self) -> str:
        return f"ignore_label={self.ignore_label}"


def build_loss(name: str, num_classes: int, smoothing: float = 0.0) -> nn.Module:
    """The loss called `name` (the config's `loss_name`).

    `smoothing` is the label-smoothing factor actually applied: the caller passes 0 when `use_label_smooth` is off,
    as the original's train.py does. `ce_ignore` takes no smoothing and ignores label 255.
    """
    if name not in LOSS_NAMES:
        close = difflib.get_close_matches(str(name), LOSS_NAMES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise VitkitError(f"unknown loss_name '{name}'{hint}: choose one of {', '.join(LOSS_NAMES)}")
    if name == "ce_ignore":
        return IgnoreLabelLoss()
    if not 0.0 <= smoothing < 1.0:
        raise VitkitError(f"label_smooth_factor must be in [0, 1), got {smoothing}")
    if num_classes < _MIN_CLASSES[name]:
        raise VitkitError(f"loss_name '{name}' needs at least {_MIN_CLASSES[name]} classes, got class_num {num_classes}")
    return SmoothedClassificationLoss(name, num_classes, smoothing)
