"""BatchMixer: the original's MixUp (one λ per batch, permutation partner, no folding) and the optional CutMix."""
import numpy as np
import pytest
import torch

from vitkit.data.mixup import BatchMixer
from vitkit.errors import VitkitError

NUM_CLASSES = 10


def make_batch(batch_size=8, seed=0, size=6):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    labels = torch.randint(NUM_CLASSES, (batch_size,), generator=generator)
    return images, labels


def one_hot(labels):
    return torch.eye(NUM_CLASSES)[labels]


def test_mixup_reconstructed_from_the_seed():
    images, labels = make_batch()
    mixer = BatchMixer(NUM_CLASSES, mixup_alpha=0.2, generator=torch.Generator().manual_seed(7))
    mixed, targets = mixer(images, labels)

    # Replay the same generator: λ ~ Beta(0.2, 0.2) as a Dirichlet coordinate, then the permutation.
    replay = torch.Generator().manual_seed(7)
    lam = torch._sample_dirichlet(torch.tensor([0.2, 0.2], dtype=torch.float64), generator=replay)[0].item()
    permutation = torch.randperm(8, generator=replay)
    assert mixer.last_lambda == lam and torch.equal(mixer.last_permutation, permutation)
    assert torch.equal(mixed, images * lam + images[permutation] * (1 - lam))
    assert torch.equal(targets, one_hot(labels) * lam + one_hot(labels[permutation]) * (1 - lam))
    assert targets.dtype == torch.float32
    np.testing.assert_allclose(targets.sum(dim=1).numpy(), 1.0, rtol=1e-6)


def test_same_seed_same_batches():
    images, labels = make_batch()
    first = BatchMixer(NUM_CLASSES, generator=torch.Generator().manual_seed(3))
    second = BatchMixer(NUM_CLASSES, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        (x1, t1), (x2, t2) = first(images, labels), second(images, labels)
        assert torch.equal(x1, x2) and torch.equal(t1, t2)


def test_lambda_is_beta_distributed_and_not_folded():
    images, labels = make_batch(batch_size=2, size=2)
    mixer = BatchMixer(NUM_CLASSES, mixup_alpha=0.2, generator=torch.Generator().manual_seed(0))
    lambdas = []
    for _ in range(2000):
        mixer(images, labels)
        lambdas.append(mixer.last_lambda)
    lambdas = np.array(lambdas)
    assert abs(lambdas.mean() - 0.5) < 0.03  # Beta(α, α) has mean 1/2
    assert 0.4 < (lambdas < 0.5).mean() < 0.6  # folding to max(λ, 1 - λ) would leave none below 1/2
    # Beta(0.2, 0.2) is U-shaped: its variance 1/(4(2α + 1)) = 0.179 is far above the uniform's 0.083.
    assert abs(lambdas.var() - 0.25 / 1.4) < 0.02


def test_each_sample_mixes_with_exactly_one_partner_from_a_permutation():
    images = torch.arange(NUM_CLASSES, dtype=torch.float32).reshape(NUM_CLASSES, 1, 1, 1).expand(-1, 3, 2, 2)
    labels = torch.arange(NUM_CLASSES)  # sample i has label i, so a target row names its partner
    mixer = BatchMixer(NUM_CLASSES, mixup_alpha=1.0, generator=torch.Generator().manual_seed(5))
    for _ in range(10):
        mixed, targets = mixer(images, labels)
        lam, permutation = mixer.last_lambda, mixer.last_permutation
        assert sorted(permutation.tolist()) == list(range(NUM_CLASSES))
        # Row i holds λ at its own label and 1 - λ at its partner's (both at once when it drew itself).
        expected = lam * torch.eye(NUM_CLASSES)
        expected[torch.arange(NUM_CLASSES), permutation] += 1 - lam
        torch.testing.assert_close(targets, expected)
        expected_pixels = lam * labels.float() + (1 - lam) * permutation.float()
        torch.testing.assert_close(mixed, expected_pixels.reshape(-1, 1, 1, 1).expand(-1, 3, 2, 2))


def test_cutmix_box_area_sets_lambda():
    images, labels = make_batch(batch_size=6, size=32)
    mixer = BatchMixer(NUM_CLASSES, mixup_alpha=0.0, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(2))
    for _ in range(20):
        mixed, targets = mixer(images, labels)
        top, bottom, left, right = mixer.last_box
        partner = mixer.last_permutation
        assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
        assert mixer.last_lambda == pytest.approx(1 - (bottom - top) * (right - left) / 32**2)
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert torch.equal(mixed[..., inside], images[partner][..., inside])
        assert torch.equal(mixed[..., ~inside], images[..., ~inside])
        lam = mixer.last_lambda
        torch.testing.assert_close(targets, one_hot(labels) * lam + one_hot(labels[partner]) * (1 - lam))
        np.testing.assert_allclose(targets.sum(dim=1).numpy(), 1.0, rtol=1e-6)


def test_unclipped_cutmix_box_has_area_one_minus_lambda():
    # Before clipping the box has sides sqrt(1 - λ) of the image's, so its area is (1 - λ)·H·W up to rounding.
    mixer = BatchMixer(NUM_CLASSES, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(0))
    unclipped = 0
    for lam in np.linspace(0.05, 0.95, 40):
        top, bottom, left, right = mixer._draw_box(lam, 1000, 1000)
        if top > 0 and left > 0 and bottom < 1000 and right < 1000:
            unclipped += 1
            assert (bottom - top) * (right - left) == pytest.approx((1 - lam) * 1000**2, rel=0.01)
    assert unclipped >= 5


@pytest.mark.parametrize("switch_prob, uses_cutmix", [(0.0, False), (1.0, True)])
def test_switch_prob_picks_mixup_or_cutmix(switch_prob, uses_cutmix):
    images, labels = make_batch()
    mixer = BatchMixer(NUM_CLASSES, mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=switch_prob,
                       generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        mixer(images, labels)
        assert (mixer.last_box is not None) == uses_cutmix


def test_switch_prob_half_uses_both():
    images, labels = make_batch()
    mixer = BatchMixer(NUM_CLASSES, mixup_alpha=0.2, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(0))
    used_cutmix = []
    for _ in range(200):
        mixer(images, labels)
        used_cutmix.append(mixer.last_box is not None)
    assert 0.35 < np.mean(used_cutmix) < 0.65


def test_both_alphas_zero_gives_plain_one_hot():
    images, labels = make_batch()
    mixer = BatchMixer(NUM_CLASSES, mixup_alpha=0.0, cutmix_alpha=0.0)
    mixed, targets = mixer(images, labels)
    assert mixed is images
    assert torch.equal(targets, one_hot(labels))
    assert mixer.last_lambda == 1.0 and not mixer.enabled


def test_low_precision_images_keep_their_dtype():
    images, labels = make_batch()
    mixed, targets = BatchMixer(NUM_CLASSES)(images.to(torch.bfloat16), labels)
    assert mixed.dtype == torch.bfloat16 and targets.dtype == torch.float32


def test_integer_images_are_refused():
    images, labels = make_batch()
    with pytest.raises(TypeError, match="float images"):
        BatchMixer(NUM_CLASSES)(images.to(torch.uint8), labels)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(num_classes=0), "num_classes"), (dict(mixup_alpha=-0.1), "alphas"), (dict(cutmix_alpha=-1.0), "alphas"),
     (dict(switch_prob=1.5), "switch probability")],
)
def test_bad_config_raises_vitkit_error(kwargs, message):
    arguments = dict(num_classes=NUM_CLASSES)
    arguments.update(kwargs)
    with pytest.raises(VitkitError, match=message):
        BatchMixer(**arguments)
