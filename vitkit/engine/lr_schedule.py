"""Per-step learning-rate schedules with the original's exact formulas and warmup indexing, and the scheduler that applies them.

`build_lr_schedule` returns one float32 learning rate per optimizer step, T = steps_per_epoch·max_epoch of them, with
W = int(steps_per_epoch·warmup_epochs) warmup steps. Cosine-style modes warm up with (i + 1) so step W - 1 already reaches
lr_max; the other modes use i, so step 0 is exactly lr_init. If W >= T the whole run is warmup: the learning rate climbs
along the warmup line and never reaches the decay phase (the original's cloud recipe, 40 warmup epochs of 5, does this).
"""
from __future__ import annotations

import difflib

import numpy as np
import torch

from vitkit.errors import VitkitError

LR_MODES = ("cosine", "steps", "poly", "linear", "exp", "cosine_min")
# Step decay factors and where they start, as fractions of the whole run (the original's `steps` mode).
_STEP_DECAY = ((0.3, 0.1), (0.6, 0.01), (0.8, 0.001))
# exp mode's end value as a fraction of lr_max when lr_min is 0: exponential decay can never reach 0 itself.
_EXP_DEFAULT_END_RATIO = 1e-3


def _warmup(step: np.ndarray, warmup_steps: int, lr_init: float, lr_max: float) -> np.ndarray:
    """lr_init + (lr_max - lr_init)·step/W, written as the original writes it."""
    if warmup_steps == 0:  # no step is in warmup, and the slope would divide by zero
        return np.empty(0)
    return lr_init + (lr_max - lr_init) / warmup_steps * step


def build_lr_schedule(
    mode: str,
    lr_init: float,
    lr_max: float,
    lr_min: float,
    warmup_epochs: float,
    max_epoch: int,
    steps_per_epoch: int,
    poly_power: float = 2.0,
) -> np.ndarray:
    """The learning rate of every optimizer step of the run, as a float32 array of length steps_per_epoch·max_epoch.

    Modes (i is the step, W the warmup steps, T the total):
      cosine      warmup lr_init + (lr_max - lr_init)/W·(i + 1); then lr_max·(1 + cos(π(i + 1 - W)/(T - W)))/2.
                  Ignores lr_min and ends at exactly 0, as the original does.
      cosine_min  cosine's warmup; then lr_min + (lr_max - lr_min)·(1 + cos(π(i + 1 - W)/(T - W)))/2, ending at lr_min.
      steps       no warmup; lr_max, then ×0.1 from 0.3·T, ×0.01 from 0.6·T, ×0.001 from 0.8·T.
      poly        warmup lr_init + (lr_max - lr_init)/W·i; then (lr_max - lr_min)(1 - (i - W)/(T - W))^poly_power + lr_min.
      linear      poly's warmup; then lr_max - (lr_max - lr_min)(i - W)/(T - W). The original's fallback for any other name.
      exp         poly's warmup; then lr_max·(lr_end/lr_max)^((i - W)/(T - W)), where lr_end = lr_min if lr_min > 0 else
                  lr_max·1e-3. The original's README names this mode but never built it.
    """
    if mode not in LR_MODES:
        close = difflib.get_close_matches(str(mode), LR_MODES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise VitkitError(f"unknown lr_decay_mode '{mode}'{hint}: choose one of {', '.join(LR_MODES)}")
    if steps_per_epoch < 1 or max_epoch < 1:
        raise VitkitError(
            f"the schedule needs at least one step: got {steps_per_epoch} steps per epoch and max_epoch {max_epoch}; "
            "check the dataset size, batch size and max_epoch"
        )
    if warmup_epochs < 0:
        raise VitkitError(f"warmup_epochs must be 0 or more, got {warmup_epochs}")
    if lr_max <= 0 or lr_init < 0 or lr_min < 0:
        raise VitkitError(f"learning rates must be lr_max > 0, lr_init >= 0 and lr_min >= 0; got {lr_max}, {lr_init}, {lr_min}")

    total_steps = steps_per_epoch * max_epoch
    warmup_steps = int(steps_per_epoch * warmup_epochs)
    step = np.arange(total_steps, dtype=np.float64)
    # Everything past warmup is a function of the decay progress; when W >= T there is no such step (empty arrays).
    in_warmup = step < warmup_steps
    decay_step = step[~in_warmup]
    decay_steps = total_steps - warmup_steps

    if mode == "steps":
        lrs = np.full(total_steps, lr_max, dtype=np.float64)
        for start_fraction, factor in _STEP_DECAY:
            lrs[step >= start_fraction * total_steps] = lr_max * factor
        return lrs.astype(np.float32)

    lrs = np.empty(total_steps, dtype=np.float64)
    if mode in ("cosine", "cosine_min"):
        lrs[in_warmup] = _warmup(step[in_warmup] + 1, warmup_steps, lr_init, lr_max)
        cosine_factor = (1 + np.cos(np.pi * (decay_step + 1 - warmup_steps) / decay_steps)) / 2
        lr_floor = lr_min if mode == "cosine_min" else 0.0
        lrs[~in_warmup] = lr_floor + (lr_max - lr_floor) * cosine_factor
        return lrs.astype(np.float32)

    # poly, linear and exp share the warmup that starts at exactly lr_init.
    lrs[in_warmup] = _warmup(step[in_warmup], warmup_steps, lr_init, lr_max)
    progress = (decay_step - warmup_steps) / decay_steps
    if mode == "poly":
        lrs[~in_warmup] = np.maximum((lr_max - lr_min) * (1 - progress) ** poly_power + lr_min, 0.0)
    elif mode == "linear":
        lrs[~in_warmup] = lr_max - (lr_max - lr_min) * progress
    else:
        lr_end = lr_min if lr_min > 0 else lr_max * _EXP_DEFAULT_END_RATIO
        lrs[~in_warmup] = lr_max * (lr_end / lr_max) ** progress
    return lrs.astype(np.float32)


class PerStepLR:
    """Sets every param group's learning rate to lrs[i] for the i-th optimizer step (counting from 0), times the
    group's `lr_scale` where it has one (layer-wise lr decay, see optim.split_decay_groups).

    Call `step()` once after each `optimizer.step()`. Past the end of the schedule the last value is kept.
    The original meant exactly this; its custom AdamW never advanced the step on MindSpore >= 2.2, freezing lrs[0].
    `state_dict()` holds only the step count (the schedule is rebuilt from the config), so a resumed run continues
    where it stopped.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lrs, steps_done: int = 0):
        self.optimizer = optimizer
        self.lrs = np.asarray(lrs, dtype=np.float32)
        if self.lrs.ndim != 1 or self.lrs.size == 0:
            raise ValueError(f"PerStepLR needs a non-empty 1-D schedule, got shape {self.lrs.shape}")
        self.steps_done = steps_done
        self._apply()

    @property
    def current_lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        return float(self.lrs[min(self.steps_done, self.lrs.size - 1)])

    def _apply(self) -> None:
        lr = self.current_lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.steps_done += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The learning rate of each param group, as torch's schedulers report it."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = int(state["steps_done"])
        self._apply()
