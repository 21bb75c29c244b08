"""The fast decoding paths against the plain one (full decode, then the transform) on real JPEG photographs.

Tolerance of the reduced-size (DCT-scaled) decode: libjpeg's 1/2-1/8 decode keeps the low-frequency DCT
coefficients of each 8x8 block, a different low-pass filter from the bilinear antialiased resize that the plain path
applies to the full decode. The two agree to within a fraction of a grey level on average; they part only at sharp
edges (single pixels differ by up to ~40 levels on the star field). Each reduced image must stay within
REDUCED_MEAN_ABS grey levels on average and REDUCED_PSNR_DB of PSNR (measured: mean <= 1.3, PSNR >= 40 dB), while
every sample that the rule leaves at full size must be bit-identical to the plain path.
"""
import io
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from vitkit.data import folder
from vitkit.data.folder import ImageFolderDataset, decode_rgb, decode_transformed, dct_scale, list_image_folder
from vitkit.data.loader import ShardSampler, build_loader, derive_seed, sample_seed
from vitkit.data.transforms import OnPILImage, eval_transform, pil_to_tensor, tensor_to_pil, train_transform

skimage = pytest.importorskip("skimage")  # a test dependency (pyproject's `test` extra); its photos are the inputs

REDUCED_MEAN_ABS = 2.0
REDUCED_PSNR_DB = 36.0
SAMPLE_DIR = os.path.join(os.path.dirname(skimage.__file__), "data")
# Camera JPEGs shipped in the wheel: 1000x872 (reduced by 2 for large crops), 1411x1411 (by 2 or 4), 640x427 (never).
PHOTOS = ("hubble_deep_field.jpg", "retina.jpg", "rocket.jpg")


def photo_bytes(name: str) -> np.ndarray:
    return np.fromfile(os.path.join(SAMPLE_DIR, name), dtype=np.uint8)


def encoded(image: Image.Image, **options) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy()


def seeded(seed: int, call):
    torch.default_generator.manual_seed(seed)
    out = call()
    return out, torch.default_generator.get_state()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture
def crop_boxes(monkeypatch):
    """Every RandomResizedCrop box drawn, in order."""
    drawn = []
    original = v2.RandomResizedCrop.make_params

    def recording(self, flat_inputs):
        params = original(self, flat_inputs)
        drawn.append(dict(params))
        return params

    def recording_fast(stage, width, height):
        params = drawing_fast(stage, width, height)
        drawn.append(dict(params))
        return params

    drawing_fast = folder._draw_crop  # what the fast path calls instead of make_params
    monkeypatch.setattr(v2.RandomResizedCrop, "make_params", recording)
    monkeypatch.setattr(folder, "_draw_crop", recording_fast)
    return drawn


@pytest.mark.parametrize("scale, ratio", [((0.05, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (0.5, 0.5)), ((1.0, 1.0), (2.0, 3.0))])
def test_fast_crop_draw_is_make_params(scale, ratio):
    # Odd sizes and ratio bounds that no box fits, so that the centred fallback is drawn too.
    stage = v2.RandomResizedCrop(224, scale=scale, ratio=ratio)
    for width, height in [(500, 375), (375, 500), (1, 300), (300, 1), (7, 5), (2000, 30), (3, 3)]:
        for seed in range(30):
            fast, fast_state = seeded(seed, lambda: folder._draw_crop(stage, width, height))
            plain, plain_state = seeded(seed, lambda: stage.make_params([torch.zeros(3, height, width, dtype=torch.uint8)]))
            assert fast == plain and torch.equal(fast_state, plain_state), (width, height, seed)


@pytest.mark.parametrize("box, expected", [
    ((0, 0, 500, 375), 1),       # ImageNet's typical whole image: 375 / 2 < 224
    ((10, 20, 458, 468), 2),     # 448 x 448: exactly twice the output
    ((0, 0, 1000, 447), 1),      # one side short of 448
    ((0, 0, 1000, 900), 4),      # 1000 / 4 = 250, 900 / 4 = 225; / 8 is too small
    ((0, 0, 1792, 1792), 8),     # 1792 / 8 = 224
])
def test_dct_scale_never_leaves_the_box_smaller_than_the_output(box, expected):
    assert dct_scale(box, (224, 224)) == expected


@pytest.mark.parametrize("name", PHOTOS)
def test_train_crop_boxes_and_pixels_match_the_plain_path(name, crop_boxes):
    data = photo_bytes(name)
    transform = train_transform(224, augment="none")
    width, height = Image.open(io.BytesIO(data.tobytes())).size
    reduced = 0
    for seed in range(16):
        fast, fast_state = seeded(seed, lambda: decode_transformed(data, transform))
        plain, plain_state = seeded(seed, lambda: transform(decode_rgb(data)))
        fast_box, plain_box = crop_boxes[-2:]
        assert fast_box == plain_box
        assert torch.equal(fast_state, plain_state)  # the flip and anything after draw the same numbers too
        assert fast.dtype == torch.uint8 and fast.shape == plain.shape == (3, 224, 224)
        left, top = fast_box["left"], fast_box["top"]
        scale = dct_scale((left, top, left + fast_box["width"], top + fast_box["height"]), (224, 224))
        if scale == 1:
            assert torch.equal(fast, plain)
            continue
        reduced += 1
        difference = (fast.float() - plain.float()).abs().mean().item()
        assert difference <= REDUCED_MEAN_ABS and psnr(fast, plain) >= REDUCED_PSNR_DB, (seed, scale, difference)
    # The rocket (427 px high) never allows a reduced decode; the large photos do for their larger crops.
    assert (reduced > 0) == (min(width, height) >= 448)


@pytest.mark.parametrize("name, scale", [("retina.jpg", 4), ("hubble_deep_field.jpg", 2), ("rocket.jpg", 1)])
def test_eval_resize_matches_the_plain_path(name, scale):
    data = photo_bytes(name)
    transform = eval_transform(224)
    fast = decode_transformed(data, transform)
    plain = transform(decode_rgb(data))
    assert fast.shape == plain.shape == (3, 224, 224)
    width, height = Image.open(io.BytesIO(data.tobytes())).size
    # The shorter side goes to 256: the reduction keeps it at 256 or more.
    assert dct_scale((0, 0, width, height), (256, 256)) == scale
    if scale == 1:
        assert torch.equal(fast, plain)
    else:
        assert (fast.float() - plain.float()).abs().mean().item() <= REDUCED_MEAN_ABS
        assert psnr(fast, plain) >= REDUCED_PSNR_DB


def test_grey_jpeg_takes_the_reduced_path_and_gives_three_channels():
    camera = Image.open(os.path.join(SAMPLE_DIR, "camera.png")).convert("L")  # a real 512 x 512 grey photograph
    data = encoded(camera, quality=90)
    transform = eval_transform(112, resize_size=128)  # 512 / 4 = 128: decoded at a quarter of the size
    fast = decode_transformed(data, transform)
    plain = transform(decode_rgb(data))
    assert fast.shape == plain.shape == (3, 112, 112)
    assert torch.equal(fast[0], fast[1]) and torch.equal(fast[1], fast[2])
    assert not torch.equal(fast, plain)  # the reduced decoder really ran
    assert psnr(fast, plain) >= REDUCED_PSNR_DB


def test_cmyk_and_bicubic_take_the_plain_path():
    photo = Image.open(os.path.join(SAMPLE_DIR, "retina.jpg"))
    cmyk = encoded(photo.convert("CMYK"), quality=90)
    resize = eval_transform(224)
    assert torch.equal(decode_transformed(cmyk, resize), resize(decode_rgb(cmyk)))
    # PIL's and torch's bicubic kernels differ (a = -0.5 and -0.75), so only bilinear is decoded reduced.
    data = photo_bytes("retina.jpg")
    bicubic = eval_transform(224, interpolation="BICUBIC")
    assert torch.equal(decode_transformed(data, bicubic), bicubic(decode_rgb(data)))


def test_autoaugment_draws_the_same_operations_on_both_paths():
    data = photo_bytes("hubble_deep_field.jpg")
    transform = train_transform(224, augment="autoaugment", random_erasing=0.25)
    for seed in range(6):
        fast, fast_state = seeded(seed, lambda: decode_transformed(data, transform))
        plain, plain_state = seeded(seed, lambda: transform(decode_rgb(data)))
        assert torch.equal(fast_state, plain_state)
        assert fast.shape == plain.shape == (3, 224, 224)


@pytest.mark.parametrize("channels_last", [False, True])
def test_policy_on_pil_equals_torchvision_on_the_pil_image(channels_last):
    image = decode_rgb(photo_bytes("rocket.jpg"))[:, :224, :224].contiguous()
    if channels_last:  # the layout decode_jpeg hands over: a (3, H, W) view of (H, W, 3) memory
        image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    policy = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, fill=128)
    assert torch.equal(F.pil_to_tensor(tensor_to_pil(image)), image)
    assert torch.equal(pil_to_tensor(F.to_pil_image(image)), image)
    for seed in range(8):
        ours, ours_state = seeded(seed, lambda: OnPILImage(policy)(image))
        theirs, theirs_state = seeded(seed, lambda: F.pil_to_tensor(policy(F.to_pil_image(image))))
        assert torch.equal(ours, theirs) and torch.equal(ours_state, theirs_state)
        assert ours.is_contiguous()


def test_dataset_and_workers_give_the_plain_path_labels_and_boxes(tmp_path, crop_boxes):
    for label, name in enumerate(PHOTOS):
        (tmp_path / f"class{label}").mkdir()
        shutil.copy(os.path.join(SAMPLE_DIR, name), tmp_path / f"class{label}" / name)
    samples, _ = list_image_folder(tmp_path)
    transform = train_transform(224, augment="none")
    dataset = ImageFolderDataset(samples, transform, seed=3)
    dataset.set_epoch(2)
    for index, (path, label) in enumerate(samples):
        image, got_label, got_index = dataset[index]
        assert (got_label, got_index) == (label, index)
        fast_box = crop_boxes[-1]
        torch.default_generator.manual_seed(sample_seed(derive_seed(3, 2), index))
        plain = transform(decode_rgb(np.fromfile(path, dtype=np.uint8)))
        assert crop_boxes[-1] == fast_box
        assert psnr(image, plain) >= REDUCED_PSNR_DB
    in_process = {int(i): img for images, _, indices, _ in
                  build_loader(dataset, ShardSampler(3, shuffle=False, pad=False), 2, 0, drop_last=False)
                  for i, img in zip(indices, images)}
    loader = build_loader(dataset, ShardSampler(3, seed=5, pad=False), 1, 2, drop_last=False)
    for images, labels, indices, failed in loader:
        assert failed == 0 and labels.tolist() == [samples[int(indices[0])][1]]
        assert torch.equal(images[0], in_process[int(indices[0])])
