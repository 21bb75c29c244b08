"""LR schedules against the original's formulas evaluated step by step with `math`, and its recorded numbers."""
import math

import numpy as np
import pytest
import torch

from vitkit.engine.lr_schedule import LR_MODES, PerStepLR, build_lr_schedule
from vitkit.errors import VitkitError

# The original's 8-device ImageNet recipe: 625 steps/epoch, 300 epochs, 40 warmup epochs, lr_max 0.00044375·8.
STEPS, EPOCHS, WARMUP_EPOCHS, LR_MAX = 625, 300, 40, 0.00355
T, W = STEPS * EPOCHS, STEPS * WARMUP_EPOCHS


@pytest.fixture(autouse=True)
def fail_on_numpy_division_by_zero():
    with np.errstate(all="raise"):
        yield


@pytest.fixture(scope="module")
def default_cosine():
    return build_lr_schedule("cosine", 0.0, LR_MAX, 0.0, WARMUP_EPOCHS, EPOCHS, STEPS)


def test_cosine_8p_defaults_match_the_original(default_cosine):
    lrs = default_cosine
    assert lrs.dtype == np.float32 and lrs.shape == (187_500,)
    assert lrs[0] == np.float32(1.42e-7)  # the lr the original froze for the whole run
    assert lrs[W - 1] == np.float32(LR_MAX)  # warmup counts i + 1, so its last step reaches lr_max
    # The log's lr after epoch 0 is lrs[625 - 1]; the README prints it as 0.000089.
    assert lrs[STEPS - 1] == np.float32(8.875e-5)
    assert f"{lrs[STEPS - 1]:.6f}" == "0.000089"
    assert lrs[-1] == 0.0


@pytest.mark.parametrize("i", [W, W + 1, 100_000, T - 2])
def test_cosine_decay_steps_match_formula(default_cosine, i):
    expected = LR_MAX * (1 + math.cos(math.pi * (i + 1 - W) / (T - W))) / 2
    assert default_cosine[i] == pytest.approx(expected, rel=1e-6)


def test_cosine_matches_the_original_training_checkpoint():
    # learning_rate stored in tests/fixtures/mindspore/ms_vit_tiny_train-3_2.ckpt, written by the original
    # (3 epochs x 2 steps, 1 warmup epoch, lr_init 0, lr_max 0.00355).
    recorded = np.array([0.0017750000115484, 0.0035500000230968, 0.0030301145743578672,
                         0.0017750000115484, 0.0005198854487389326, 0.0], dtype=np.float32)
    lrs = build_lr_schedule("cosine", 0.0, LR_MAX, 0.0, 1, 3, 2)
    np.testing.assert_array_equal(lrs, recorded)


def test_cosine_ignores_lr_min():
    lrs = build_lr_schedule("cosine", 0.0, 1.0, 0.5, 1, 10, 10)
    assert lrs[-1] == 0.0


def test_cosine_min_warms_up_like_cosine_and_ends_at_lr_min():
    lr_min = 1e-5
    cosine = build_lr_schedule("cosine", 1e-6, 1e-3, lr_min, 2, 10, 10)
    cosine_min = build_lr_schedule("cosine_min", 1e-6, 1e-3, lr_min, 2, 10, 10)
    np.testing.assert_array_equal(cosine_min[:20], cosine[:20])
    assert cosine_min[-1] == np.float32(lr_min)
    i = 50
    expected = lr_min + (1e-3 - lr_min) * (1 + math.cos(math.pi * (i + 1 - 20) / 80)) / 2
    assert cosine_min[i] == pytest.approx(expected, rel=1e-6)
    assert np.all(np.diff(cosine_min[19:]) <= 0)


def test_steps_boundaries_at_30_60_80_percent():
    lrs = build_lr_schedule("steps", 0.0, 1.0, 0.0, 5, 10, 10)  # T = 100; warmup does not apply
    expected = {0: 1.0, 29: 1.0, 30: 0.1, 59: 0.1, 60: 0.01, 79: 0.01, 80: 0.001, 99: 0.001}
    for i, value in expected.items():
        assert lrs[i] == np.float32(value), i


def test_poly_starts_at_lr_init_and_follows_formula():
    lr_init, lr_max, lr_min = 1e-4, 1e-2, 1e-5
    lrs = build_lr_schedule("poly", lr_init, lr_max, lr_min, 1, 10, 10)  # W = 10, T = 100
    assert lrs[0] == np.float32(lr_init)
    assert lrs[5] == pytest.approx(lr_init + (lr_max - lr_init) / 10 * 5, rel=1e-6)
    assert lrs[10] == np.float32(lr_max)
    for i in (10, 37, 99):
        expected = (lr_max - lr_min) * (1 - (i - 10) / 90) ** 2 + lr_min
        assert lrs[i] == pytest.approx(expected, rel=1e-6)
    cubic = build_lr_schedule("poly", lr_init, lr_max, lr_min, 1, 10, 10, poly_power=3.0)
    assert cubic[37] == pytest.approx((lr_max - lr_min) * (1 - 27 / 90) ** 3 + lr_min, rel=1e-6)


def test_linear_warmup_and_decay():
    lr_init, lr_max, lr_min = 0.0, 1.0, 0.1
    lrs = build_lr_schedule("linear", lr_init, lr_max, lr_min, 2, 10, 5)  # W = 10, T = 50
    assert lrs[0] == 0.0
    assert lrs[4] == pytest.approx(0.4, rel=1e-6)
    assert lrs[10] == 1.0
    for i in (10, 30, 49):
        assert lrs[i] == pytest.approx(lr_max - (lr_max - lr_min) * (i - 10) / 40, rel=1e-6)


@pytest.mark.parametrize("lr_min, lr_end", [(0.0, 1e-3 * 0.5), (1e-4, 1e-4)])
def test_exp_decays_monotonically_towards_lr_end(lr_min, lr_end):
    lr_max = 0.5
    lrs = build_lr_schedule("exp", 0.0, lr_max, lr_min, 1, 10, 10)  # W = 10, T = 100
    assert lrs[0] == 0.0 and lrs[10] == np.float32(lr_max)
    assert np.all(np.diff(lrs[10:]) < 0)
    for i in (10, 55, 99):
        assert lrs[i] == pytest.approx(lr_max * (lr_end / lr_max) ** ((i - 10) / 90), rel=1e-5)
    # The last step is one step short of lr_end, like linear's last step is one step short of lr_min.
    assert lr_end < lrs[-1] < lr_end * (lr_max / lr_end) ** (1.5 / 90)


@pytest.mark.parametrize("mode", LR_MODES)
def test_no_warmup(mode):
    lrs = build_lr_schedule(mode, 0.0, 1.0, 0.01, 0, 4, 5)
    assert lrs.shape == (20,) and np.all(np.isfinite(lrs))
    # Cosine counts i + 1 even in decay, so without warmup its first step is already one step down from lr_max.
    cosine_factor = (1 + math.cos(math.pi / 20)) / 2
    expected_first = {"cosine": cosine_factor, "cosine_min": 0.01 + 0.99 * cosine_factor}.get(mode, 1.0)
    assert lrs[0] == pytest.approx(expected_first, rel=1e-6)


@pytest.mark.parametrize("mode", ["cosine", "cosine_min", "poly", "linear", "exp"])
def test_warmup_longer_than_the_run_is_all_warmup(mode):
    # The original's cloud recipe: 40 warmup epochs in a 5-epoch run never leaves warmup.
    lrs = build_lr_schedule(mode, 0.0, 1.0, 0.0, 40, 5, 2)
    first = 1 if mode.startswith("cosine") else 0
    np.testing.assert_allclose(lrs, (np.arange(10) + first) / 80, rtol=1e-6)


def test_fractional_warmup_epochs_truncate():
    lrs = build_lr_schedule("linear", 0.0, 1.0, 0.0, 0.55, 2, 10)  # W = int(5.5) = 5
    assert lrs[5] == 1.0 and lrs[4] == pytest.approx(0.8)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(mode="expo"), "did you mean 'exp'"), (dict(mode="cos"), "lr_decay_mode"),
     (dict(steps_per_epoch=0), "at least one step"), (dict(max_epoch=0), "at least one step"),
     (dict(warmup_epochs=-1), "warmup_epochs"), (dict(lr_max=0.0), "lr_max > 0"), (dict(lr_min=-1.0), "lr_min")],
)
def test_bad_arguments_raise_vitkit_error(kwargs, message):
    arguments = dict(mode="cosine", lr_init=0.0, lr_max=1.0, lr_min=0.0, warmup_epochs=1, max_epoch=2, steps_per_epoch=3)
    arguments.update(kwargs)
    with pytest.raises(VitkitError, match=message):
        build_lr_schedule(**arguments)


def make_optimizer():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    return torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=123.0)


def test_per_step_lr_uses_lrs_i_for_the_ith_step_and_clamps():
    lrs = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    optimizer = make_optimizer()
    scheduler = PerStepLR(optimizer, lrs)
    seen = []
    for _ in range(5):
        seen.append([group["lr"] for group in optimizer.param_groups])
        scheduler.step()
    assert seen == [[float(v)] * 2 for v in np.float32([0.1, 0.2, 0.3, 0.3, 0.3])]
    assert scheduler.get_last_lr() == [float(np.float32(0.3))] * 2


def test_per_step_lr_resumes_from_state_dict():
    lrs = build_lr_schedule("cosine", 0.0, 1.0, 0.0, 1, 3, 4)
    first = PerStepLR(make_optimizer(), lrs)
    for _ in range(6):
        first.step()
    state = first.state_dict()
    assert state == {"steps_done": 6}

    optimizer = make_optimizer()
    resumed = PerStepLR(optimizer, lrs)
    resumed.load_state_dict(state)
    assert optimizer.param_groups[0]["lr"] == float(lrs[6]) == resumed.current_lr
    resumed.step()
    assert optimizer.param_groups[1]["lr"] == float(lrs[7])


def test_per_step_lr_rejects_empty_schedule():
    with pytest.raises(ValueError, match="non-empty"):
        PerStepLR(make_optimizer(), [])
