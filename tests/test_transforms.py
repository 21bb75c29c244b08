"""Transforms against torchvision's functions applied independently, sizes worked out by hand, numpy normalization."""
import random

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2 import InterpolationMode

from vitkit.data.transforms import (
    IMAGENET_MEAN_255,
    IMAGENET_STD_255,
    UInt8RandomErasing,
    eval_resize_size,
    eval_transform,
    interpolation_mode,
    normalize_batch,
    train_transform,
)
from vitkit.errors import VitkitError

AUGMENTS = ["autoaugment", "randaugment", "trivialaugment", "none"]


def random_image(height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("image_size, expected", [
    (224, 256),  # 224 / 0.875 = 256; 256 / 16 = 16; int(16.5) = 16; 16 * 16 = 256
    (140, 160),  # 140 / 0.875 = 160; 160 / 16 = 10; int(10.5) = 10; 10 * 16 = 160
    (384, 432),  # 384 / 0.875 = 438.86; / 16 = 27.43; int(27.93) = 27; 27 * 16 = 432
    (32, 32),    # 32 / 0.875 = 36.57; / 16 = 2.29; int(2.79) = 2; 2 * 16 = 32
])
def test_eval_resize_size_follows_the_original_formula(image_size, expected):
    assert eval_resize_size(image_size) == expected


@pytest.mark.parametrize("augment", AUGMENTS)
def test_train_transform_gives_uint8_square_images(augment):
    transform = train_transform(32, augment=augment, random_erasing=0.5)
    for seed in range(4):
        torch.manual_seed(seed)
        out = transform(random_image(45, 70, seed))
        assert out.dtype == torch.uint8
        assert out.shape == (3, 32, 32)


def test_eval_transform_equals_torchvision_resize_then_center_crop():
    image = random_image(300, 400)
    out = eval_transform(224)(image)
    # Shorter side 300 -> 256 keeps the aspect: 400 * 256 / 300 = 341.3 -> 341 wide, then the middle 224 x 224.
    resized = F.resize(image, [256], interpolation=InterpolationMode.BILINEAR, antialias=True)
    assert resized.shape == (3, 256, 341)
    expected = F.center_crop(resized, [224, 224])
    assert out.dtype == torch.uint8
    assert torch.equal(out, expected)


def test_eval_transform_uses_the_named_interpolation():
    image = random_image(300, 400)
    out = eval_transform(224, interpolation="bicubic")(image)
    resized = F.resize(image, [256], interpolation=InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(out, F.center_crop(resized, [224, 224]))


def test_eval_resize_size_can_be_set():
    image = random_image(28, 28)
    # Resize to the crop size itself: the whole 28 x 28 image scaled to 32 x 32, nothing cropped.
    expected = F.resize(image, [32], interpolation=InterpolationMode.BILINEAR, antialias=True)
    assert torch.equal(eval_transform(32, resize_size=32)(image), expected)
    photo = random_image(300, 400)
    assert torch.equal(eval_transform(224, resize_size=0)(photo), eval_transform(224)(photo))
    with pytest.raises(VitkitError, match="below the crop size"):
        eval_transform(224, resize_size=200)


def test_random_resized_crop_has_the_original_scale_and_ratio():
    crop = train_transform(224, crop_min=0.05).transforms[0]
    assert isinstance(crop, v2.RandomResizedCrop)
    assert tuple(crop.scale) == (0.05, 1.0)
    assert tuple(crop.ratio) == (0.75, 1.333)
    # Every drawn box stays within those bounds (rounding to whole pixels aside).
    torch.manual_seed(0)
    image = random_image(200, 300)
    for _ in range(200):
        box = crop.make_params([image])
        area = box["height"] * box["width"] / (200 * 300)
        assert 0.05 * 0.95 <= area <= 1.0
        assert 0.75 * 0.95 <= box["width"] / box["height"] <= 1.333 * 1.05


def test_crop_min_one_on_a_square_image_resizes_the_whole_image():
    # Area fraction 1 with ratio 1 is the only box that fits a square, so the crop is the whole image, maybe flipped.
    image = random_image(64, 64)
    whole = F.resize(image, [32, 32], interpolation=InterpolationMode.BILINEAR, antialias=True)
    transform = train_transform(32, crop_min=1.0, augment="none")
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = transform(image)
        if torch.equal(out, whole):
            seen.add("plain")
        else:
            assert torch.equal(out, F.hflip(whole))
            seen.add("flipped")
    assert seen == {"plain", "flipped"}


def test_all_randomness_comes_from_torch_not_python_random():
    transform = train_transform(32, augment="autoaugment", random_erasing=0.5)
    image = random_image(48, 48)
    outputs = []
    for python_seed in (1, 2):
        random.seed(python_seed)
        np.random.seed(python_seed)
        torch.manual_seed(123)
        outputs.append(transform(image))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("name, mode", [
    ("BILINEAR", InterpolationMode.BILINEAR),
    ("bilinear", InterpolationMode.BILINEAR),
    ("NEAREST", InterpolationMode.NEAREST),
    ("BICUBIC", InterpolationMode.BICUBIC),
    ("PILCUBIC", InterpolationMode.BICUBIC),
    ("LINEAR", InterpolationMode.BILINEAR),
    ("CUBIC", InterpolationMode.BICUBIC),
    ("AREA", InterpolationMode.BOX),
    ("ANTIALIAS", InterpolationMode.LANCZOS),
    ("LANCZOS", InterpolationMode.LANCZOS),
    ("BOX", InterpolationMode.BOX),
    ("HAMMING", InterpolationMode.HAMMING),
])
def test_interpolation_names_map_to_tensor_modes(name, mode):
    assert interpolation_mode(name) == mode
    out = train_transform(16, interpolation=name, augment="none")(random_image(30, 40))
    assert out.shape == (3, 16, 16)


def test_unknown_interpolation_is_one_line_listing_the_choices():
    with pytest.raises(VitkitError) as caught:
        train_transform(224, interpolation="SUPERSMOOTH")
    message = str(caught.value)
    assert "\n" not in message
    assert "SUPERSMOOTH" in message and "BILINEAR" in message and "ANTIALIAS" in message
    with pytest.raises(VitkitError):
        eval_transform(224, interpolation="SUPERSMOOTH")


def test_unknown_augment_and_bad_probabilities_are_errors():
    with pytest.raises(VitkitError, match="autoaugment"):
        train_transform(224, augment="mixmatch")
    with pytest.raises(VitkitError, match="crop_min"):
        train_transform(224, crop_min=0.0)
    with pytest.raises(VitkitError, match="random_erasing"):
        train_transform(224, random_erasing=1.5)


def test_random_erasing_fills_the_box_with_noise_around_the_imagenet_mean():
    torch.manual_seed(0)
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    erased = UInt8RandomErasing(p=1.0)(image)
    changed = erased.ne(0).any(dim=0)
    fraction = changed.float().mean().item()
    assert 0.01 < fraction < 0.34
    pixels = erased[:, changed].float()
    assert pixels.std().item() > 20  # per-pixel noise, not a constant fill
    # The mean of mean + std * z is the ImageNet mean (clipping at 0 and 255 is symmetric enough to stay within 8).
    for channel, mean in enumerate(IMAGENET_MEAN_255):
        assert abs(pixels[channel].mean().item() - mean) < 8


def test_normalize_batch_matches_the_unit_scale_formula():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    original = images.clone()
    x = images.numpy().astype(np.float64)
    mean = np.array(IMAGENET_MEAN_255).reshape(1, 3, 1, 1) / 255
    std = np.array(IMAGENET_STD_255).reshape(1, 3, 1, 1) / 255
    expected = (x / 255 - mean) / std
    out = normalize_batch(images)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(images, original)
    half = normalize_batch(images, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    np.testing.assert_allclose(half.float().numpy(), expected, rtol=1e-2, atol=1e-2)
    single = normalize_batch(images[0])
    assert torch.equal(single, out[0])


def test_normalize_batch_gives_planar_floats_for_a_channels_last_batch():
    batch = torch.randint(0, 256, (2, 3, 6, 5), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255
    for layout in (torch.contiguous_format, torch.channels_last):
        normalized = normalize_batch(batch.contiguous(memory_format=layout))
        assert normalized.is_contiguous() and normalized.dtype == torch.float32
        torch.testing.assert_close(normalized, (batch.float() - mean) / std, atol=1e-6, rtol=0)
    grey = batch[:, :1]  # one channel broadcasts against the three means, as before
    torch.testing.assert_close(normalize_batch(grey), (grey.float() - mean) / std, atol=1e-6, rtol=0)


def _pil_resized(image: torch.Tensor, width: int, height: int, pil_filter) -> torch.Tensor:
    """PIL's own resize of the image: the oracle for the filters torchvision runs only on PIL images."""
    from PIL import Image

    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((width, height), pil_filter)
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1)


@pytest.mark.parametrize("name, pil_name", [
    ("LANCZOS", "LANCZOS"), ("ANTIALIAS", "LANCZOS"), ("BOX", "BOX"), ("AREA", "BOX"), ("HAMMING", "HAMMING"),
    ("PILCUBIC", "BICUBIC"),
])
def test_pil_filters_resize_exactly_as_pil_does(name, pil_name):
    from PIL import Image

    pil_filter = getattr(Image.Resampling, pil_name)
    image = random_image(90, 120, seed=3)
    # Eval: shorter side 90 -> 36, longer 120 * 36 / 90 = 48; the centre 32 x 32 starts at (2, 8).
    expected = _pil_resized(image, 48, 36, pil_filter)[:, 2:34, 8:40]
    assert torch.equal(eval_transform(32, interpolation=name, resize_size=36)(image), expected)
    # Training without the random crop: the whole image to 32 x 32, then flipped or not.
    resized = _pil_resized(image, 32, 32, pil_filter)
    out = train_transform(32, interpolation=name, augment="none", random_crop=False)(image)
    assert torch.equal(out, resized) or torch.equal(out, resized.flip(-1))
    # Not the tensor bicubic kernel these names fell back to before.
    assert not torch.equal(resized, F.resize(image, [32, 32], interpolation=InterpolationMode.BICUBIC, antialias=True))


@pytest.mark.parametrize("name, same_as", [("LINEAR", "BILINEAR"), ("CUBIC", "BICUBIC")])
def test_mindspores_linear_and_cubic_are_accepted_as_bilinear_and_bicubic(name, same_as):
    from vitkit.config import load_config

    assert load_config(None, [f"--interpolation={name.lower()}"]).data.interpolation == name
    image = random_image(50, 70, seed=4)
    assert torch.equal(eval_transform(32, interpolation=name)(image), eval_transform(32, interpolation=same_as)(image))
