"""Image folders: listing samples (class subfolders or a plain folder) and the dataset that decodes and augments."""
from __future__ import annotations

import io
import os
import re
import warnings
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from vitkit.data.loader import check_seed, derive_seed
from vitkit.errors import VitkitError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

Sample = tuple[str, int]


def is_image_file(name: str) -> bool:
    """An image by extension (any case); hidden files such as macOS '._x.jpg' resource forks are not images."""
    return not os.path.basename(name).startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _check_folder(root: str | os.PathLike, what: str) -> str:
    path = os.fspath(root)
    if not os.path.exists(path):
        raise VitkitError(f"{what} {path} does not exist; check the data path")
    if not os.path.isdir(path):
        raise VitkitError(f"{what} {path} is a file, not a folder; point the data path at the folder of images")
    return path


def _images_under(folder: str) -> list[str]:
    """Every image below `folder`, sorted, skipping hidden subfolders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        found.extend(os.path.join(dirpath, name) for name in filenames if is_image_file(name))
    return sorted(found)


def list_image_folder(root: str | os.PathLike, num_classes: int | None = None) -> tuple[list[Sample], list[str]]:
    """Samples of an ImageFolder tree `root/<class>/.../<image>` and the class names.

    Classes are the sorted subfolder names (hidden ones skipped) and a label is its class's position, as in the
    original. `num_classes` may exceed the folder count (the original's 1001 logits over 1000 ImageNet folders,
    where the extra logit is never a target) but not fall short of it. Samples are sorted by label, then path.
    """
    path = _check_folder(root, "data folder")
    with os.scandir(path) as entries:
        class_names = sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))
    if not class_names:
        raise VitkitError(f"{path} has no class subfolders; arrange the images as {path}/<class>/<image>")
    if num_classes is not None and num_classes < len(class_names):
        raise VitkitError(
            f"{path} has {len(class_names)} class folders but num_classes is {num_classes}; "
            f"set num_classes to at least {len(class_names)}"
        )
    samples = [
        (image, label)
        for label, name in enumerate(class_names)
        for image in _images_under(os.path.join(path, name))
    ]
    if not samples:
        extensions = ", ".join(IMAGE_EXTENSIONS)
        raise VitkitError(f"no images ({extensions}) in the class folders of {path}; check the data path")
    empty = sorted(set(class_names) - {class_names[label] for _, label in samples})
    if empty:
        shown = ", ".join(empty[:3]) + (", ..." if len(empty) > 3 else "")
        warnings.warn(f"{len(empty)} class folders of {path} hold no images ({shown}); their labels are never targets")
    return samples, class_names


def list_flat_folder(root: str | os.PathLike) -> list[Sample]:
    """Every image below `root` (subfolders included), sorted, with label -1: input for inference."""
    path = _check_folder(root, "image folder")
    images = _images_under(path)
    if not images:
        raise VitkitError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}; check the path")
    return [(image, -1) for image in images]


def _reason(error: Exception) -> str:
    """The useful part of a decoder's message: no C++ source location, no Python object address."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    text = re.sub(r"^.*?\.cpp:\d+, ", "", text)
    return re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", text)


def decode_rgb(data: np.ndarray) -> torch.Tensor:
    """Encoded image bytes (a uint8 array) to a uint8 (3, H, W) RGB tensor; grayscale and 16-bit images included.

    torchvision decodes JPEG, PNG, GIF and WebP; PIL takes the rest (BMP, TIFF, and WebP where torchvision was built
    without it). EXIF orientation is not applied, like the original and torchvision's ImageFolder. Raises ValueError
    naming both decoders' reasons when neither can read the data.
    """
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work, and this package
            # stays on them while it supports torchvision 0.26.
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(torch.from_numpy(data), mode=ImageReadMode.RGB)
        return image if image.dtype == torch.uint8 else TF.to_dtype(image, torch.uint8, scale=True)
    except Exception as torchvision_error:  # noqa: BLE001 - any decoder failure means: try PIL
        try:
            with Image.open(io.BytesIO(data)) as opened:
                rgb = np.array(opened.convert("RGB"))
        except Exception as pil_error:  # noqa: BLE001 - reported together with torchvision's reason
            raise ValueError(f"torchvision: {_reason(torchvision_error)}; PIL: {_reason(pil_error)}") from pil_error
        return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


class ImageFolderDataset(Dataset):
    """Decoded, augmented samples: dataset[i] is (uint8 (3, H, W) image, label, i).

    An image that cannot be read or decoded gives a warning naming the file and the image None, which
    `collate_skipping_failures` drops and counts, so one bad file never stops a run.

    Augmentation is a pure function of (seed, epoch, index): torch's global CPU generator (which torchvision's
    transforms draw from) is seeded from the three right before the transform and restored right after. The
    result is the same whatever the worker count, worker assignment, order or resume point, and the main
    process's stream (which dropout draws from) is untouched when there are no workers. The epoch lives in shared
    memory, so `set_epoch` reaches persistent workers started in an earlier epoch.

    Paths are kept in one numpy array rather than a list of strings: workers then share the parent's pages instead
    of copying them as reference counts change (a known DataLoader memory growth).
    """

    def __init__(self, samples: list[Sample], transform: Callable[[torch.Tensor], torch.Tensor] | None, seed: int = 0):
        self._paths = np.array([os.fsencode(path) for path, _ in samples], dtype=np.bytes_)
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.transform = transform
        self.seed = check_seed(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) < 0:
            raise VitkitError(f"epochs count from 0, got {epoch}")
        self._epoch.fill_(int(epoch))

    def path(self, index: int) -> str:
        return os.fsdecode(self._paths[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, int]:
        index = int(index)
        path = self.path(index)
        label = int(self.labels[index])
        try:
            image = decode_rgb(np.fromfile(path, dtype=np.uint8))
        except (OSError, ValueError) as error:
            warnings.warn(f"skipping unreadable image {path}: {error}")
            return None, label, index
        if self.transform is not None:
            image = self._transform_seeded(image, index)
        return image, label, index

    def _transform_seeded(self, image: torch.Tensor, index: int) -> torch.Tensor:
        generator = torch.default_generator
        saved = generator.get_state()
        # The CPU generator only: torch.manual_seed would also reseed every CUDA generator.
        generator.manual_seed(derive_seed(self.seed, self.epoch, index))
        try:
            return self.transform(image)
        finally:
            generator.set_state(saved)
