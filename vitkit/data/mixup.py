"""Batch-level MixUp (the original's MixUpBatch) and optional CutMix, applied on the device after the batch arrives."""
from __future__ import annotations

import math

import torch

from vitkit.errors import VitkitError


class BatchMixer:
    """Mixes each batch with a shuffled copy of itself and returns soft targets.

    MixUp, as the original (verified on MindSpore): one λ ~ Beta(α, α) per batch, a random permutation as every
    sample's partner (a sample may draw itself), x = λ·x + (1 - λ)·x[perm] and the same for the one-hot targets.
    λ is not folded to max(λ, 1 - λ). CutMix (new) pastes one box of area ≈ (1 - λ)·H·W from the partner at the
    same place in every sample, then sets λ to the share of the image the box left untouched. With both alphas
    above 0 each batch uses CutMix with probability `switch_prob`; with both at 0 the targets are plain one-hot.

    The per-batch randomness (the switch, λ, the box and the permutation, drawn in that order) comes from `generator`
    on the host, so a seeded generator reproduces a run; None uses torch's global generator. Only the permutation
    crosses to the device, without waiting for it. `last_lambda`, `last_permutation` and `last_box`
    (top, bottom, left, right, or None for MixUp) describe the latest batch.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.2,
        cutmix_alpha: float = 0.0,
        switch_prob: float = 0.5,
        generator: torch.Generator | None = None,
    ):
        if num_classes < 1:
            raise VitkitError(f"mixup needs num_classes of at least 1, got {num_classes}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise VitkitError(f"mixup and cutmix alphas must be 0 (off) or more, got {mixup_alpha} and {cutmix_alpha}")
        if not 0.0 <= switch_prob <= 1.0:
            raise VitkitError(f"the mixup/cutmix switch probability must be in [0, 1], got {switch_prob}")
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.switch_prob = switch_prob
        self.generator = generator
        self.last_lambda = 1.0
        self.last_permutation: torch.Tensor | None = None
        self.last_box: tuple[int, int, int, int] | None = None

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) float images and (B,) int labels -> mixed images and float32 (B, num_classes) targets."""
        if not images.is_floating_point():
            raise TypeError(f"BatchMixer needs float images (normalize first), got {images.dtype}")
        # scatter_ rather than F.one_hot: no (B, C) int64 intermediate, and never a host-side range check.
        targets = torch.zeros(labels.shape[0], self.num_classes, device=labels.device, dtype=torch.float32)
        targets.scatter_(1, labels.long().unsqueeze(1), 1.0)
        self.last_lambda, self.last_permutation, self.last_box = 1.0, None, None
        if not self.enabled:
            return images, targets

        use_cutmix = self._draw_use_cutmix()
        lam = self._draw_beta(self.cutmix_alpha if use_cutmix else self.mixup_alpha)
        box = self._draw_box(lam, images.shape[-2], images.shape[-1]) if use_cutmix else None
        permutation = torch.randperm(images.shape[0], generator=self.generator)
        self.last_permutation = permutation
        if images.device.type == "cuda":
            # A pinned source lets the copy run asynchronously instead of stalling the host on the stream.
            permutation = permutation.pin_memory()
        partner = permutation.to(images.device, non_blocking=True)

        if box is None:
            mixed = images * lam + images[partner] * (1.0 - lam)
        else:
            top, bottom, left, right = box
            mixed = images.clone()
            mixed[:, :, top:bottom, left:right] = images[partner, :, top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (images.shape[-2] * images.shape[-1])
        self.last_lambda, self.last_box = lam, box
        return mixed, targets * lam + targets[partner] * (1.0 - lam)

    def _draw_use_cutmix(self) -> bool:
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            return torch.rand((), generator=self.generator).item() < self.switch_prob
        return self.cutmix_alpha > 0

    def _draw_beta(self, alpha: float) -> float:
        # Beta(α, α) is the first coordinate of Dirichlet(α, α); torch has no public Beta sampler taking a generator.
        concentration = torch.tensor([alpha, alpha], dtype=torch.float64)
        return torch._sample_dirichlet(concentration, generator=self.generator)[0].item()

    def _draw_box(self, lam: float, height: int, width: int) -> tuple[int, int, int, int]:
        """A box with sides sqrt(1 - λ) of the image's, centred uniformly, clipped to the image."""
        side_ratio = math.sqrt(1.0 - lam)
        box_height, box_width = int(height * side_ratio), int(width * side_ratio)
        center_y = int(torch.randint(height, (), generator=self.generator))
        center_x = int(torch.randint(width, (), generator=self.generator))
        top, left = center_y - box_height // 2, center_x - box_width // 2
        return (
            max(top, 0),
            min(top + box_height, height),
            max(left, 0),
            min(left + box_width, width),
        )
