"""An exponential moving average of a model's weights, updated after every optimizer step (timm's ModelEmaV3).

The average covers every floating-point entry of the model's state_dict (parameters and persistent buffers);
other entries are copied. Its decay at the n-th update (n counted from 1) is, as ModelEmaV3's `get_decay(n)`:
0 at the first update (the average starts as a copy of the weights), then `decay` or, with warm-up,
min(decay, 1 - (1 + n - 1) ** -WARMUP_POWER).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from vitkit.errors import VitkitError

# ModelEmaV3's defaults (warmup_gamma 1, warmup_power 2/3): the decay reaches 0.999 after about 31.6k updates.
WARMUP_POWER = 2 / 3


def ema_decay_at(update: int, decay: float, warmup: bool) -> float:
    """The decay of the `update`-th update, counted from 1."""
    since_first = update - 1
    if since_first <= 0:
        return 0.0
    if not warmup:
        return decay
    return min(decay, 1 - (1 + since_first) ** -WARMUP_POWER)


class ModelEma:
    """A frozen copy of the model in eval mode whose weights follow the trained ones. `updates` counts the optimizer
    steps averaged in; it and the weights are all a checkpoint needs to continue the average bit for bit."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise VitkitError(f"the EMA decay must be between 0 and 1 (exclusive), got {decay}: set train.ema_decay")
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self._source, self._pairs = None, ([], [], [], [])

    def _paired(self, model: nn.Module) -> tuple[list, list, list, list]:
        """(averaged, current, copied, current) tensors of the copy and `model`, found once per model: training
        updates weights in place, so the same tensors stand for the model on every later step."""
        if model is not self._source:
            pairs = ([], [], [], [])
            for ema_value, value in zip(self.module.state_dict().values(), model.state_dict().values()):
                offset = 0 if ema_value.is_floating_point() else 2
                pairs[offset].append(ema_value)
                pairs[offset + 1].append(value)
            self._source, self._pairs = model, pairs
        return self._pairs

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Average the model's current weights in; returns the decay used."""
        self.updates += 1
        decay = ema_decay_at(self.updates, self.decay, self.warmup)
        averaged, current, copied, copied_from = self._paired(model)
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        for ema_value, value in zip(copied, copied_from):
            ema_value.copy_(value)
        return decay

    def state_dict(self) -> dict:
        return {"updates": self.updates, "weights": {name: value.detach().cpu().clone()
                                                     for name, value in self.module.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
