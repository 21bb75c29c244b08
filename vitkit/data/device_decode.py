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
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from vitkit.data.folder import (ImageFolderDataset, UnreadableImage, _draw_params, _jpeg_size, _resize_geometry,
                                decode_rgb)
from vitkit.errors import VitkitError


class EncodedCrop(NamedTuple):
    """A JPEG still encoded, and where its training crop lies: (left, top, right, bottom) in source pixels."""

    data: np.ndarray  # uint8, 1-D
    box: tuple[int, int, int, int]
    flip: bool


class EncodedBatch(NamedTuple):
    """A batch's JPEGs as one byte buffer, so that a worker hands over one shared-memory block per batch rather than
    one per image (each costs a file descriptor and a mapping on both sides), and the pinning thread pins one."""

    data: torch.Tensor  # uint8: every JPEG's bytes, one after another
    lengths: torch.Tensor  # int64 (N,): each JPEG's byte count
    boxes: torch.Tensor  # int64 (N, 4): left, top, right, bottom
    flips: torch.Tensor  # bool (N,)
    positions: torch.Tensor  # int64 (N,): each JPEG's place in the batch
    decoded: list  # [(place in the batch, uint8 (3, S, S) image)] of the files the workers decoded


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

    def __init__(self, samples, transform: v2.Compose, seed: int = 0, max_image_pixels: int | None = None,
                 source=None):
        super().__init__(samples, transform, seed, source=source, **({} if max_image_pixels is None else
                                                                      {"max_image_pixels": max_image_pixels}))
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
        return EncodedCrop(data, tuple(int(v) for v in box), flip)


def collate_encoded(batch: Sequence[tuple]) -> tuple[EncodedBatch, torch.Tensor, torch.Tensor, int]:
    """(EncodedBatch, labels, indices, unreadable count) of dataset items that are EncodedCrops or decoded images."""
    kept = [sample for sample in batch if sample[0] is not None]
    items = [item for item, _, _ in kept]
    places = [place for place, item in enumerate(items) if isinstance(item, EncodedCrop)]
    encoded = [items[place] for place in places]
    data = np.concatenate([item.data for item in encoded]) if encoded else np.empty(0, dtype=np.uint8)
    batch_out = EncodedBatch(
        data=torch.from_numpy(data),
        lengths=torch.tensor([len(item.data) for item in encoded], dtype=torch.int64),
        boxes=torch.tensor([item.box for item in encoded], dtype=torch.int64).reshape(-1, 4),
        flips=torch.tensor([item.flip for item in encoded], dtype=torch.bool),
        positions=torch.tensor(places, dtype=torch.int64),
        decoded=[(place, item) for place, item in enumerate(items) if not isinstance(item, EncodedCrop)],
    )
    labels = torch.tensor([label for _, label, _ in kept], dtype=torch.int64)
    indices = torch.tensor([index for _, _, index in kept], dtype=torch.int64)
    return batch_out, labels, indices, len(batch) - len(kept)


def _decode_all(streams: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 images on `device`: one batched decode, else one by one on the CPU (None: unreadable)."""
    if not streams:
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29's note on TorchCodec
            return list(decode_jpeg(streams, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass  # one bad stream fails the whole batched call: find it image by image
    images = []
    for stream in streams:
        try:
            images.append(decode_rgb(stream.numpy()).to(device, non_blocking=True))
        except UnreadableImage as error:
            warnings.warn(f"skipping an unreadable training image: {error}")
            images.append(None)
    return images


def _resize_into(out: torch.Tensor, region: torch.Tensor) -> None:
    """out (1, 3, S, S) float32 = region (3, h, w) uint8 resized bilinearly with antialiasing (F.interpolate's
    arithmetic, as the CPU path's), straight into the batch: every image costs launches of its own, so none is spent
    on F.interpolate's argument handling or on a copy of the result."""
    if region.shape[-2:] == out.shape[-2:]:
        out[0].copy_(region)
    else:
        torch._C._nn._upsample_bilinear2d_aa(region[None].float(), list(out.shape[-2:]), False, None, None, out=out)


def decode_batch(batch: EncodedBatch, labels: torch.Tensor, device: torch.device,
                 size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A collate_encoded batch on `device` as (float32 (B, 3, H, W) images on the 0-255 scale, labels, unreadable
    count); `normalize_batch` takes it as it takes the workers' uint8 batches."""
    count = len(batch.positions) + len(batch.decoded)
    images = torch.empty((count, 3, *size), device=device)
    readable = torch.ones(count, dtype=torch.bool)
    streams = list(torch.split(batch.data, batch.lengths.tolist()))
    for place, box, image in zip(batch.positions.tolist(), batch.boxes.tolist(), _decode_all(streams, device)):
        if image is None:
            readable[place] = False
            continue
        left, top, right, bottom = box
        _resize_into(images[place:place + 1], image[:, top:bottom, left:right])
    for place, image in batch.decoded:
        images[place].copy_(image, non_blocking=True)
    flipped = batch.positions[batch.flips]
    if len(flipped):
        flipped = flipped.to(device, non_blocking=True)
        images[flipped] = images[flipped].flip(-1)
    if readable.all():
        return images, labels, 0
    keep = readable.nonzero()[:, 0]
    return images[keep.to(device)], labels[keep], int(count - len(keep))
