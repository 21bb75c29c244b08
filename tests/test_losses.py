"""Losses against targets and log-probabilities written out by hand with numpy, and timm's losses as oracles."""
import math

import numpy as np
import pytest
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from vitkit.engine.losses import build_loss, ce_ignore, ce_smooth, ce_smooth_mixup, soft_ce
from vitkit.errors import VitkitError

# Four classes, smoothing 0.1: small enough to write every target out.
LOGITS = np.array([[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0], [3.0, -2.0, 0.0, 1.0]])
LABELS = np.array([1, 3, 0])
SMOOTHING = 0.1
LOG_4 = math.log(4.0)


def numpy_log_softmax(z):
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def numpy_soft_ce(z, t):
    return float(np.mean(-(t * numpy_log_softmax(z)).sum(axis=1)))


def torch_inputs():
    return torch.tensor(LOGITS, dtype=torch.float32), torch.tensor(LABELS)


def test_ce_smooth_int_labels_match_hand_targets():
    # on = 1 - 0.1 = 0.9, off = 0.1 / (4 - 1) = 0.0333...: every row sums to 1.
    off = 0.1 / 3
    targets = np.full((3, 4), off)
    targets[[0, 1, 2], LABELS] = 0.9
    logits, labels = torch_inputs()
    loss = ce_smooth(logits, labels, SMOOTHING)
    assert loss.item() == pytest.approx(numpy_soft_ce(LOGITS, targets), rel=1e-6)


def test_ce_smooth_uniform_logits_give_log_c():
    loss = ce_smooth(torch.zeros(2, 4), torch.tensor([0, 2]), SMOOTHING)
    assert loss.item() == pytest.approx(LOG_4, rel=1e-6)


def test_ce_smooth_soft_targets_are_plain_soft_ce():
    targets = np.array([[0.3, 0.7, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.5, 0.0, 0.0, 0.5]])
    logits, _ = torch_inputs()
    loss = ce_smooth(logits, torch.tensor(targets, dtype=torch.float32), SMOOTHING)
    assert loss.item() == pytest.approx(numpy_soft_ce(LOGITS, targets), rel=1e-6)


def test_ce_smooth_mixup_mixed_targets():
    # t_c = 0.9·y_c + [y_c == 0]·0.1/(4 - 2): [0.27, 0.63, 0.05, 0.05], which sums to exactly 1.
    mixed = np.array([[0.3, 0.7, 0.0, 0.0]])
    hand_targets = np.array([[0.27, 0.63, 0.05, 0.05]])
    loss = ce_smooth_mixup(torch.tensor(LOGITS[:1], dtype=torch.float32), torch.tensor(mixed, dtype=torch.float32), SMOOTHING)
    assert loss.item() == pytest.approx(numpy_soft_ce(LOGITS[:1], hand_targets), rel=1e-6)


def test_ce_smooth_mixup_pure_one_hot_sums_past_one():
    # The original's quirk: a pure one-hot gives 0.9 + 3·0.05 = 1.05 = 1 + s/(C - 2), so uniform logits cost 1.05·log 4.
    one_hot = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    loss = ce_smooth_mixup(torch.zeros(1, 4), one_hot, SMOOTHING)
    assert loss.item() == pytest.approx(1.05 * LOG_4, rel=1e-6)


def test_ce_smooth_mixup_accepts_int_labels_as_one_hot():
    # The original crashes without mixup; here int labels mean their one-hot, quirk included.
    logits, labels = torch_inputs()
    hand_targets = np.full((3, 4), 0.05)
    hand_targets[[0, 1, 2], LABELS] = 0.9
    from_ints = ce_smooth_mixup(logits, labels, SMOOTHING)
    from_one_hot = ce_smooth_mixup(logits, torch.nn.functional.one_hot(labels, 4).float(), SMOOTHING)
    assert from_ints.item() == pytest.approx(numpy_soft_ce(LOGITS, hand_targets), rel=1e-6)
    assert from_ints.item() == from_one_hot.item()


def test_soft_ce_int_labels_hand_and_timm():
    # off = 0.1/4 = 0.025, on = 0.9 + 0.025 = 0.925.
    hand_targets = np.full((3, 4), 0.025)
    hand_targets[[0, 1, 2], LABELS] = 0.925
    logits, labels = torch_inputs()
    loss = soft_ce(logits, labels, SMOOTHING)
    assert loss.item() == pytest.approx(numpy_soft_ce(LOGITS, hand_targets), rel=1e-6)
    assert loss.item() == pytest.approx(LabelSmoothingCrossEntropy(SMOOTHING)(logits, labels).item(), rel=1e-6)


def test_soft_ce_soft_targets_match_timm():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 10, generator=generator)
    targets = torch.softmax(torch.randn(8, 10, generator=generator), dim=-1)
    expected = SoftTargetCrossEntropy()(logits, targets)
    assert soft_ce(logits, targets, SMOOTHING).item() == pytest.approx(expected.item(), rel=1e-6)


def test_ce_ignore_averages_over_labelled_pixels():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, 2, 2, generator=generator)
    labels = torch.tensor([[[0, 255], [2, 1]]])
    # Per pixel: -log_softmax over the class axis at the label; the 255 pixel is left out of sum and count.
    log_probs = numpy_log_softmax(logits.numpy()[0].reshape(3, 4).T)
    kept = [(0, 0), (2, 2), (3, 1)]  # (flattened pixel, label)
    expected = -np.mean([log_probs[pixel, label] for pixel, label in kept])
    assert ce_ignore(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert build_loss("ce_ignore", 3, 0.0)(logits, labels).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["ce_smooth", "ce_smooth_mixup", "soft_ce"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_computed_in_fp32(name, dtype):
    logits, labels = torch_inputs()
    low = logits.to(dtype)
    loss = build_loss(name, 4, SMOOTHING)(low, labels)
    assert loss.dtype == torch.float32
    assert loss.item() == build_loss(name, 4, SMOOTHING)(low.float(), labels).item()


def test_build_loss_smoothing_zero_is_plain_cross_entropy():
    logits, labels = torch_inputs()
    expected = torch.nn.functional.cross_entropy(logits, labels).item()
    for name in ("ce_smooth", "ce_smooth_mixup", "soft_ce"):
        assert build_loss(name, 4, 0.0)(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_build_loss_unknown_name_lists_choices():
    with pytest.raises(VitkitError, match="ce_smooth_mixup") as error:
        build_loss("ce_smoth", 4, 0.1)
    assert "did you mean 'ce_smooth'" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "name, num_classes, smoothing, message",
    [("ce_smooth", 4, 1.0, "label_smooth_factor"), ("ce_smooth", 4, -0.1, "label_smooth_factor"),
     ("ce_smooth_mixup", 2, 0.1, "at least 3 classes"), ("ce_smooth", 1, 0.1, "at least 2 classes")],
)
def test_build_loss_rejects_bad_config(name, num_classes, smoothing, message):
    with pytest.raises(VitkitError, match=message):
        build_loss(name, num_classes, smoothing)


def test_loss_module_rejects_wrong_class_count():
    logits, labels = torch_inputs()
    with pytest.raises(ValueError, match="built for 10"):
        build_loss("ce_smooth", 10, 0.1)(logits, labels)
