"""Training JPEGs decoded on the training device (nvJPEG on a CUDA GPU), for when the CPU cores cannot keep up.

The loader workers still do the cheap part: read the file, read the JPEG's header and draw the sample's crop box and
flip with the same seeded draws as the workers' own decoding (`decode_transformed`). What they hand over is the
encoded bytes and that plan (`EncodedCrop`). The main process then decodes the whole batch in one
`torchvision.io.decode_jpeg` call on the device, cuts each box out, resizes it (bilinear, antialiased, as the CPU path)
and flips it there. Only the geometric stages (random resized crop or resize, then a horizontal flip) have a device
form; a policy such as AutoAugment or random erasing needs the workers' decoding.

Files the plan cannot serve (PNGs, CMYK JPEGs) are decoded by the workers as usual and join the batch as pixels; a
batch nvJPEG refuses is decoded image by image on the CPU, and an image neither can read is dropped and counted,
as the workers' path does.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from vitkit.data.folder import (ImageFolderDataset, UnreadableImage, _draw_params, _jpeg_size, _resize_geometry,
                                decode_rgb)
from vitkit.errors import VitkitError


class EncodedCrop(NamedTuple):
    """A JPEG still encoded, and where its training crop lies: (left, top, right, bottom) in source pixels."""

    data: torch.Tensor  # uint8, 1-D
    box: tuple[int, int, int, int]
    flip: bool


def device_stages(transform: v2.Compose) -> tuple[v2.Transform, float]:
    """(resizing first stage, flip probability) of a training pipeline the device can run, else a VitkitError."""
    stages = list(transform.transforms) if isinstance(transform, v2.Compose) else []
    first = stages[0] if stages else None
    flip = stages[1] if len(stages) > 1 else None
    resizes = (isinstance(first, (v2.RandomResizedCrop, v2.Resize)) and first.size is not None
               and first.interpolation == InterpolationMode.BILINEAR and first.antialias)
    if not resizes or len(stages) > 2 or (flip is not None and type(flip) is not v2.RandomHorizontalFlip):
        raise VitkitError(
            "data.decode_on=device runs the random resized crop and the flip on the device, and nothing else: set "
            "data.augment=none, data.random_erasing=0 and data.interpolation=BILINEAR, or decode on the "
            "workers (data.decode_on=workers)"
        )
    return first, (flip.p if flip is not None else 0.0)


class EncodedCropDataset(ImageFolderDataset):
    """ImageFolderDataset whose JPEGs come out encoded with their crop plan (`EncodedCrop`); other files decoded."""

    def __init__(self, samples, transform: v2.Compose, seed: int = 0):
        super().__init__(samples, transform, seed)
        self._first, self._flip_p = device_stages(transform)

    def _decode_transformed_seeded(self, data: np.ndarray, index: int):
        size = _jpeg_size(data)
        if size is None:  # not a colour or grey JPEG: the workers' own path
            return super()._decode_transformed_seeded(data, index)
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(self.augmentation_seed(index))
        try:
            # The same draws, in the same order, as decode_transformed on the workers: crop box, then flip.
            params = _draw_params(self._first, *size)
            flip = bool(torch.rand(1) < self._flip_p) if self._flip_p > 0 else False
        finally:
            generator.set_state(saved)
        box, _ = _resize_geometry(self._first, params, *size)
        return EncodedCrop(torch.from_numpy(data), tuple(int(v) for v in box), flip)


def collate_encoded(batch: Sequence[tuple]) -> tuple[list, torch.Tensor, torch.Tensor, int]:
    """(items, labels, indices, unreadable count); items are EncodedCrops or decoded (3, S, S) uint8 images."""
    kept = [sample for sample in batch if sample[0] is not None]
    labels = torch.tensor([label for _, label, _ in kept], dtype=torch.int64)
    indices = torch.tensor([index for _, _, index in kept], dtype=torch.int64)
    return [item for item, _, _ in kept], labels, indices, len(batch) - len(kept)


def _decode_all(encoded: list[EncodedCrop], device: torch.device) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 images on `device`: one batched decode, else one by one on the CPU (None: unreadable)."""
    if not encoded:
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29's note on TorchCodec
            return list(decode_jpeg([item.data for item in encoded], mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass  # one bad stream fails the whole batched call: find it image by image
    images = []
    for item in encoded:
        try:
            images.append(decode_rgb(item.data.numpy()).to(device, non_blocking=True))
        except UnreadableImage as error:
            warnings.warn(f"skipping an unreadable training image: {error}")
            images.append(None)
    return images


def _crop_resize(image: torch.Tensor, item: EncodedCrop, size: tuple[int, int]) -> torch.Tensor:
    """The box cut out and resized to `size`, flipped if planned: float32 on the 0-255 scale, not rounded (the
    batch is normalized next), in as few kernels as the steps allow: each image costs a launch or two of its own."""
    left, top, right, bottom = item.box
    region = image[None, :, top:bottom, left:right].float()
    if region.shape[-2:] != size:
        region = F.interpolate(region, size=size, mode="bilinear", align_corners=False, antialias=True)
    return region[0].flip(-1) if item.flip else region[0]


def decode_batch(items: list, labels: torch.Tensor, device: torch.device,
                 size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A collate_encoded batch on `device` as (float32 (B, 3, H, W) images on the 0-255 scale, labels, unreadable
    count); `normalize_batch` takes it as it takes the workers' uint8 batches."""
    encoded_at = [i for i, item in enumerate(items) if isinstance(item, EncodedCrop)]
    decoded = _decode_all([items[i] for i in encoded_at], device)
    images = [item.to(device, non_blocking=True).float() if not isinstance(item, EncodedCrop) else None
              for item in items]
    for i, image in zip(encoded_at, decoded):
        images[i] = None if image is None else _crop_resize(image, items[i], size)
    keep = [i for i, image in enumerate(images) if image is not None]
    if not keep:
        return torch.empty((0, 3, *size), device=device), labels[:0], len(items)
    return torch.stack([images[i] for i in keep]), labels[keep], len(items) - len(keep)
