"""Per-sample image transforms (uint8 in and out, in loader workers) and the batch normalization on the device."""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from vitkit.errors import VitkitError

# ImageNet mean and std on the 0-255 scale, as the original's Normalize uses them.
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)
# Mean and std 0.5 on the 0-255 scale (timm's IMAGENET_INCEPTION_MEAN/STD): what Flax .npz (ViT paper, AugReg,
# big_vision) and Hugging Face ViT weights were trained on; the inputs land in [-1, 1].
INCEPTION_MEAN_255 = (127.5, 127.5, 127.5)
INCEPTION_STD_255 = (127.5, 127.5, 127.5)
NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN_255, IMAGENET_STD_255),
    "inception": (INCEPTION_MEAN_255, INCEPTION_STD_255),
}

# The original's ratio range: 1.333, not 4/3.
CROP_RATIO = (0.75, 1.333)
# The original's AutoAugment fills uncovered pixels with (128, 128, 128); RandAugment and TrivialAugment follow it.
AUGMENT_FILL = 128
AUGMENTS = ("none", "autoaugment", "randaugment", "trivialaugment", "three_augment")
# The random resized crop's smallest area fraction: above 0 (a crop of no pixels), at most the whole image.
CROP_MIN_RANGE = dict(gt=0, le=1)

# Each name's filter. MindSpore's names are accepted: LINEAR and CUBIC are its bilinear and bicubic, PILCUBIC is
# PIL's bicubic, ANTIALIAS PIL's Lanczos, and AREA (OpenCV's INTER_AREA) becomes PIL's box filter: the same
# averages where an image shrinks by a whole factor, weights sampled at pixel centres rather than integrated over
# overlaps at other factors (a level or so apart), and nearest-neighbour rather than bilinear where it is enlarged.
INTERPOLATIONS = {
    "NEAREST": InterpolationMode.NEAREST,
    "BILINEAR": InterpolationMode.BILINEAR,
    "LINEAR": InterpolationMode.BILINEAR,
    "BICUBIC": InterpolationMode.BICUBIC,
    "CUBIC": InterpolationMode.BICUBIC,
    "PILCUBIC": InterpolationMode.BICUBIC,
    "LANCZOS": InterpolationMode.LANCZOS,
    "ANTIALIAS": InterpolationMode.LANCZOS,
    "BOX": InterpolationMode.BOX,
    "AREA": InterpolationMode.BOX,
    "HAMMING": InterpolationMode.HAMMING,
}
# Names whose resize runs on the PIL form of the image (OnPILImage), giving PIL's own pixels: torchvision's uint8
# tensor kernels have no BOX or HAMMING, have LANCZOS only in recent versions, and PILCUBIC names PIL's bicubic.
# The other names resize the tensor, within a level or two of PIL's pixels.
PIL_RESIZED = ("LANCZOS", "ANTIALIAS", "BOX", "AREA", "HAMMING", "PILCUBIC")


def interpolation_mode(name: str) -> InterpolationMode:
    """The torchvision mode for an interpolation name (case-insensitive); unknown names are an error, not BILINEAR."""
    mode = INTERPOLATIONS.get(str(name).upper())
    if mode is None:
        raise VitkitError(f"unknown interpolation {name!r}; choose one of {', '.join(INTERPOLATIONS)}")
    return mode


def _resize_on(interpolation: str, resize: v2.Transform) -> v2.Transform:
    """`resize` (made with interpolation_mode(interpolation)), on the PIL image where the name means PIL's filter."""
    return OnPILImage(resize) if str(interpolation).upper() in PIL_RESIZED else resize


# The eval resize's longer side is capped at this many times the shorter side's target (torchvision's max_size):
# shorter side to 256 makes a 1 x 65500 image 256 x 16.8 million (12.9 GB) before the center crop. Up to 64:1 (a
# panorama) nothing changes; past it the longer side stops at 64 x resize_size (16384 px for 256, 12.6 MB), the
# shorter one shrinks below resize_size, and the center crop pads it with zeros. An image so thin that its shorter
# side would shrink to 0 pixels (over 4096:1) cannot be resized: its dataset item is skipped as unreadable.
EVAL_MAX_ASPECT = 64


def eval_resize_size(image_size: int) -> int:
    """The eval resize of the shorter side before the center crop: the original's size / 0.875, rounded to 16."""
    return int(int(image_size / 0.875 / 16 + 0.5) * 16)


class UInt8RandomErasing(v2.RandomErasing):
    """Random erasing on uint8 images, filling the box with per-pixel noise.

    torchvision's 'random' value draws N(0, 1) per pixel, which only makes sense after normalization (cast to uint8 it
    is nearly all 0 and 1). This draws the same noise and maps it to the pixel a normalized N(0, 1) value stands for,
    mean + std * z on the 0-255 scale, rounded and clipped to [0, 255] (about ±2.1 std): after the device-side
    normalization the box looks like timm's and torchvision's random erasing, clipped at ±2.1 std (±1 for the
    inception normalization, whose std is half the range). The box and the noise come from torch's global
    generator, like every other random transform here.
    """

    def __init__(self, p: float, normalization: str = "imagenet"):
        super().__init__(p=p, value="random")
        self.mean_255, self.std_255 = normalization_stats(normalization)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        params = super().make_params(flat_inputs)
        noise = params["v"]
        if noise is not None:
            mean = torch.tensor(self.mean_255).view(-1, 1, 1)
            std = torch.tensor(self.std_255).view(-1, 1, 1)
            params["v"] = (mean + std * noise).round_().clamp_(0, 255).to(torch.uint8)
        return params


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """A uint8 (3, H, W) tensor as an RGB PIL image.

    Merging the three planes costs a fifth of transposing to (H, W, 3) first: torch's and numpy's transposing
    copies of uint8 are slow, and PIL stores RGB interleaved anyway.
    """
    if image.permute(1, 2, 0).is_contiguous():
        return Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")
    return Image.merge("RGB", [Image.fromarray(plane) for plane in image.contiguous().numpy()])


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a contiguous uint8 (3, H, W) tensor, split plane by plane for the same reason."""
    return torch.from_numpy(np.stack([np.asarray(plane) for plane in image.convert("RGB").split()]))


class OnPILImage(v2.Transform):
    """Runs a torchvision transform on the PIL form of a uint8 (3, H, W) tensor and hands back such a tensor.

    The augment policies are faster on PIL images than on tensors (PIL shears, rotates and equalizes
    uint8 pixels in C; the tensor kernels go through float grids and per-channel histograms), which more than pays
    for the two conversions. The policy draws the same random numbers whatever the input type, so the operations
    and magnitudes chosen for a sample do not change, only each operation's rounding. The original ran its policy
    on PIL images too.
    """

    def __init__(self, inner: v2.Transform):
        super().__init__()
        self.inner = inner

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return pil_to_tensor(self.inner(tensor_to_pil(image)))

    def extra_repr(self) -> str:
        return repr(self.inner)


class ThreeAugment(v2.Transform):
    """DeiT III's 3-Augment on PIL images: one of grayscale, solarization and Gaussian blur, chosen uniformly, then
    color jitter. `augment_transform` runs it through OnPILImage, as the other policies.

    As DeiT III's augment.py, which ran on PIL images too: grayscale with three equal channels, solarization
    inverting every value of 128 or more (ImageOps.solarize), PIL's Gaussian blur with a radius (its standard
    deviation) uniform in [0.1, 2.0], then ColorJitter(brightness, contrast and saturation `color_jitter`, no hue)
    in a random order. DeiT III draws the choice and the radius with Python's `random`; here every draw comes from
    torch's generator, which the dataset seeds per sample (`make_params`: the operation, the radius, then the
    jitter's order and factors).
    """

    OPERATIONS = ("grayscale", "solarize", "blur")
    SOLARIZE_THRESHOLD = 128
    BLUR_RADIUS = (0.1, 2.0)

    def __init__(self, color_jitter: float = 0.3):
        super().__init__()
        if not 0.0 <= color_jitter <= 1.0:
            raise VitkitError(f"3-Augment's color jitter must be in [0, 1], got {color_jitter}")
        self.jitter = v2.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        operation = self.OPERATIONS[int(torch.randint(len(self.OPERATIONS), ()))]
        radius = float(torch.empty(()).uniform_(*self.BLUR_RADIUS))
        jitter = self.jitter.make_params(flat_inputs) if self.jitter is not None else None
        return dict(operation=operation, radius=radius, jitter=jitter)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, Image.Image):
            raise TypeError(f"ThreeAugment works on PIL images (wrap it in OnPILImage), got {type(inpt).__name__}")
        operation = params["operation"]
        if operation == "grayscale":
            inpt = inpt.convert("L").convert("RGB")
        elif operation == "solarize":
            inpt = ImageOps.solarize(inpt, self.SOLARIZE_THRESHOLD)
        else:
            # PIL's own blur, as DeiT III's: three box blurs approximating the Gaussian, several times faster than
            # torchvision's exact convolution.
            inpt = inpt.filter(ImageFilter.GaussianBlur(params["radius"]))
        if params["jitter"] is not None:
            inpt = self.jitter.transform(inpt, params["jitter"])
        return inpt


def augment_transform(augment: str, randaugment_ops: int, randaugment_magnitude: int) -> v2.Transform | None:
    """The policy transform for an augment name (run on PIL images), or None for 'none'."""
    name = str(augment).lower()
    if name == "autoaugment":
        return OnPILImage(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, fill=AUGMENT_FILL))
    if name == "randaugment":
        return OnPILImage(v2.RandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude, fill=AUGMENT_FILL))
    if name == "trivialaugment":
        return OnPILImage(v2.TrivialAugmentWide(fill=AUGMENT_FILL))
    if name == "three_augment":
        return OnPILImage(ThreeAugment())
    if name == "none":
        return None
    raise VitkitError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}")


def train_transform(
    image_size: int,
    crop_min: float = 0.05,
    interpolation: str = "BILINEAR",
    augment: str = "autoaugment",
    randaugment_ops: int = 2,
    randaugment_magnitude: int = 9,
    random_erasing: float = 0.0,
    random_crop: bool = True,
    normalization: str = "imagenet",
) -> v2.Compose:
    """The training pipeline on a uint8 (3, H, W) image: random resized crop, horizontal flip, policy, erasing.

    As the original: crop area in [crop_min, 1] of the image and aspect ratio in [0.75, 1.333], flip with p 0.5,
    then the augment policy on the cropped image. All randomness comes from torch's global generator, which the
    dataset seeds per sample. Without `random_crop` the whole image is resized (a no-op at the right size), which
    costs a quarter of the crop on 28 px images. `normalization` is the one the batch gets later: random erasing's
    noise is drawn in its units.
    """
    if not CROP_MIN_RANGE["gt"] < crop_min <= CROP_MIN_RANGE["le"]:
        raise VitkitError(f"crop_min must be in (0, 1], got {crop_min}")
    if not 0.0 <= random_erasing <= 1.0:
        raise VitkitError(f"random_erasing is a probability in [0, 1], got {random_erasing}")
    mode = interpolation_mode(interpolation)
    if random_crop:
        resize = v2.RandomResizedCrop(image_size, scale=(crop_min, 1.0), ratio=CROP_RATIO, interpolation=mode, antialias=True)
    else:
        resize = v2.Resize((image_size, image_size), interpolation=mode, antialias=True)
    stages: list[v2.Transform] = [_resize_on(interpolation, resize), v2.RandomHorizontalFlip(0.5)]
    policy = augment_transform(augment, randaugment_ops, randaugment_magnitude)
    if policy is not None:
        stages.append(policy)
    if random_erasing > 0:
        stages.append(UInt8RandomErasing(random_erasing, normalization))
    return v2.Compose(stages)


def eval_transform(image_size: int, interpolation: str = "BILINEAR", resize_size: int | None = None) -> v2.Compose:
    """The evaluation pipeline: the shorter side to `resize_size`, then the center image_size x image_size crop.

    resize_size None or 0 is the original's eval_resize_size(image_size), 256 for 224. Small images (28 px
    Fashion-MNIST) want resize_size = image_size instead: the formula would crop away 40% of them. The longer side
    is capped at EVAL_MAX_ASPECT x resize_size.
    """
    resize_size = resize_size or eval_resize_size(image_size)
    if resize_size < image_size:
        raise VitkitError(f"the eval resize size {resize_size} is below the crop size {image_size}; raise it or use 0")
    return v2.Compose([
        _resize_on(interpolation, v2.Resize(resize_size, interpolation=interpolation_mode(interpolation),
                                            antialias=True, max_size=EVAL_MAX_ASPECT * resize_size)),
        v2.CenterCrop(image_size),
    ])


def normalization_stats(normalization: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) on the 0-255 scale for a normalization name; unknown names are an error."""
    stats = NORMALIZATIONS.get(str(normalization).lower())
    if stats is None:
        raise VitkitError(f"unknown normalization {normalization!r}; choose one of {', '.join(NORMALIZATIONS)}")
    return stats


@functools.lru_cache(maxsize=None)
def _normalization_constants(device: torch.device, normalization: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device: building them each step would copy from the host, and such a copy waits for the device.
    mean, std = normalization_stats(normalization)
    mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1).to(device)
    std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1).to(device)
    return mean, std


def normalize_batch(
    images: torch.Tensor, dtype: torch.dtype = torch.float32, normalization: str = "imagenet"
) -> torch.Tensor:
    """(x - mean) / std per channel for uint8 (or float, 0-255) (B, 3, H, W) or (3, H, W) images, on the images' device, as a
    contiguous (planar) tensor whatever the images' memory layout.

    `normalization` picks mean and std: 'imagenet' (the original's) or 'inception' (0.5 and 0.5 on the 0-1 scale).
    The arithmetic is float32 whatever `dtype` is, so a bfloat16 result is rounded once, at the end.
    """
    mean, std = _normalization_constants(images.device, normalization)
    # Into a new planar float32 tensor, whatever the batch's layout (the loader's batches are channels-last): the
    # model's layout, in the same pass as the arithmetic; the caller's batch stays intact.
    planar = torch.empty(torch.broadcast_shapes(images.shape, mean.shape), dtype=torch.float32, device=images.device)
    return torch.sub(images, mean, out=planar).div_(std).to(dtype)
