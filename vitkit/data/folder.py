"""Image folders: listing samples (class subfolders or a plain folder) and the dataset that decodes and augments."""
from __future__ import annotations

import io
import math
import os
import platform
import re
import struct
import warnings
import zlib
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from vitkit.data.loader import check_seed, derive_seed, sample_seed, split_sample_key
from vitkit.errors import VitkitError

try:
    from vitkit.data._jpeg_region import decode_region, jpeg_size
except ImportError:  # built without a C compiler or libjpeg's headers: JPEGs are decoded whole
    decode_region = jpeg_size = None

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
    """Every image below `folder`, sorted, skipping hidden subfolders. Links to folders are followed, each real
    folder once, and never up to `folder` or a folder above it: such links would list images again and again."""
    found, seen = [], set()
    top = os.path.realpath(folder)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        above = dirpath != folder and (real == top or top.startswith(real.rstrip(os.sep) + os.sep))
        if real in seen or above:
            dirnames[:] = []
            continue
        seen.add(real)
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
    check_class_count(path, class_names, num_classes)
    samples = [
        (image, label)
        for label, name in enumerate(class_names)
        for image in _images_under(os.path.join(path, name))
    ]
    check_labelled_samples(path, samples, class_names)
    return samples, class_names


def check_class_count(where: str, class_names: list[str], num_classes: int | None) -> None:
    """Some classes, and no more than num_classes of them (None: any number); `where` names the folder or archive."""
    if not class_names:
        raise VitkitError(f"{where} has no class subfolders; arrange the images as {where}/<class>/<image>")
    if num_classes is not None and num_classes < len(class_names):
        raise VitkitError(
            f"{where} has {len(class_names)} class folders but num_classes is {num_classes}; "
            f"set num_classes to at least {len(class_names)}"
        )


def check_labelled_samples(where: str, samples: list[Sample], class_names: list[str]) -> None:
    """At least one image; a warning naming the classes that have none (their labels are never targets)."""
    if not samples:
        extensions = ", ".join(IMAGE_EXTENSIONS)
        raise VitkitError(f"no images ({extensions}) in the class folders of {where}; check the data path")
    empty = sorted(set(class_names) - {class_names[label] for _, label in samples})
    if empty:
        shown = ", ".join(empty[:3]) + (", ..." if len(empty) > 3 else "")
        warnings.warn(f"{len(empty)} class folders of {where} hold no images ({shown}); their labels are never targets")


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


class UnreadableImage(ValueError):
    """Neither decoder could read the bytes, or the header promises too many pixels; the message says which."""


# The most pixels an image's header may promise before anything is decoded (data.max_image_pixels): PIL's own
# bound (Image.MAX_IMAGE_PIXELS, 89,478,485) rounded up. A decoder allocates what the header says before it reads a
# pixel, so a 100 KB file claiming 65500x65500 would cost 12.9 GB. 100 million RGB pixels are 300 MB decoded.
MAX_IMAGE_PIXELS = 100_000_000

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel of each PNG colour type
_INFLATE_PIECE = 1 << 20  # a damaged PNG's pixel stream is inflated this many bytes at a time, never all at once


def _png_header(data: np.ndarray) -> tuple[int, int, int, int, int] | None:
    """(width, height, bit depth, colour type, interlace method) from a PNG's IHDR, None for anything else."""
    if len(data) < 33 or data[:8].tobytes() != PNG_SIGNATURE or data[12:16].tobytes() != b"IHDR":
        return None
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29].tobytes())
    return width, height, depth, colour, interlace


def header_size(data: np.ndarray) -> tuple[int, int] | None:
    """(width, height) from the header alone, nothing decoded: the PNG IHDR, libjpeg's header reader for colour and
    grey JPEGs, PIL's lazy open for the rest. None when no reader recognizes the header: then the decoders say why.

    PIL refuses to open a header over twice its own Image.MAX_IMAGE_PIXELS; that is reported as an UnreadableImage.
    """
    png = _png_header(data)
    if png is not None:
        return png[0], png[1]
    if jpeg_size is not None and data[:2].tobytes() == b"\xff\xd8":
        size = jpeg_size(data)
        if size is not None:
            return size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller applies its own limit
            with Image.open(io.BytesIO(data)) as opened:
                return opened.size
    except Image.DecompressionBombError as error:
        raise UnreadableImage(
            f"{_reason(error)} (PIL's own limit, which data.max_image_pixels cannot raise for this format)"
        ) from None
    except Exception:  # noqa: BLE001 - no header PIL knows: the decoders report the file
        return None


def check_image_size(data: np.ndarray, max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
    """An UnreadableImage if the header promises more than `max_pixels` pixels (None: no limit)."""
    if max_pixels is None:
        return
    size = header_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        width, height = size
        raise UnreadableImage(
            f"its header says {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}: "
            "a decompression bomb or a huge scan; raise data.max_image_pixels if it is a real image"
        )


def _png_problem(data: np.ndarray) -> str | None:
    """Why torchvision must not decode this PNG, or None when it may.

    torchvision's PNG decoder (0.29) ends the process with a segmentation fault when libpng fails on the pixel rows:
    a flipped bit in the compressed stream, fewer rows than the header says, a bad row filter. Neither a try nor a
    loader worker survives that. So the pixel stream is inflated here first, a piece at a time, and checked: its
    chunk CRCs, its zlib integrity, its length against the header's size and each row's filter byte. That costs one
    more inflate of the pixel stream, the price of never crashing the process on a damaged file. Anything it cannot
    vouch for (interlaced rows, extra data) goes to PIL, which raises instead of crashing.
    """
    header = _png_header(data)
    if header is None:
        return None  # not a PNG: torchvision's other decoders raise on damaged data
    width, height, depth, colour, interlace = header
    samples = _PNG_SAMPLES.get(colour)
    if samples is None or depth not in (1, 2, 4, 8, 16):
        return None  # libpng refuses the header itself, which torchvision reports as an error
    if interlace:
        return "interlaced PNG, decoded by PIL"
    stride = (width * samples * depth + 7) // 8 + 1  # each row: a filter byte, then the packed samples
    expected, inflated = stride * height, 0
    inflater = zlib.decompressobj()
    buffer, position, in_rows = memoryview(data), 8, False
    while position + 8 <= len(data) and not inflater.eof:
        length = struct.unpack(">I", buffer[position:position + 4])[0]
        kind = buffer[position + 4:position + 8].tobytes()
        if kind != b"IDAT":
            if in_rows or kind == b"IEND":
                break  # libpng wants the rows' IDAT chunks one after another: the stream ends early
            position += 12 + length
            continue
        in_rows = True
        if position + 12 + length > len(data):
            return "PNG pixel data cut short"
        stored = struct.unpack(">I", buffer[position + 8 + length:position + 12 + length])[0]
        if zlib.crc32(buffer[position + 4:position + 8 + length]) != stored:
            return "PNG pixel data damaged (a chunk's CRC does not match)"
        piece = buffer[position + 8:position + 8 + length]
        while piece:
            try:
                rows = inflater.decompress(piece, min(_INFLATE_PIECE, expected - inflated + 1))
            except zlib.error as error:
                return f"PNG pixel data damaged (zlib: {error})"
            piece = inflater.unconsumed_tail
            filters = np.frombuffer(rows, dtype=np.uint8)[(-inflated) % stride:max(0, expected - inflated):stride]
            if filters.size and int(filters.max()) > 4:
                return "PNG pixel data damaged (a row filter that does not exist)"
            inflated += len(rows)
            if inflated > expected:
                return "PNG pixel data longer than its header's size"
        position += 12 + length
    if inflated < expected or not inflater.eof:
        return f"PNG pixel data ends early ({inflated:,} of {expected:,} bytes)"
    return None


def decode_rgb(data: np.ndarray, max_pixels: int | None = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Encoded image bytes (a uint8 array) to a uint8 (3, H, W) RGB tensor; grayscale and 16-bit images included.

    torchvision decodes JPEG, PNG, GIF and WebP; PIL takes the rest (BMP, TIFF, and WebP where torchvision was built
    without it), and PNGs whose pixel stream fails the check that keeps torchvision from crashing (_png_problem).
    EXIF orientation is not applied, like the original and torchvision's ImageFolder. Raises UnreadableImage (a
    ValueError) naming both decoders' reasons when neither can read the data, and, before decoding anything, when
    the header promises more than `max_pixels` pixels (None: the caller has checked).
    """
    check_image_size(data, max_pixels)
    reason = _png_problem(data)
    if reason is None:
        try:
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work, and this package
                # stays on them while it supports torchvision 0.26.
                warnings.simplefilter("ignore", DeprecationWarning)
                image = decode_image(torch.from_numpy(data), mode=ImageReadMode.RGB)
            return image if image.dtype == torch.uint8 else TF.to_dtype(image, torch.uint8, scale=True)
        except Exception as torchvision_error:  # noqa: BLE001 - any decoder failure means: try PIL
            reason = f"torchvision: {_reason(torchvision_error)}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size was checked above
            with Image.open(io.BytesIO(data)) as opened:
                rgb = np.array(opened.convert("RGB"))
    except Exception as pil_error:  # noqa: BLE001 - reported together with torchvision's reason
        raise UnreadableImage(f"{reason}; PIL: {_reason(pil_error)}") from pil_error
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


# torchvision resizes uint8 images with torch's own uint8 kernel where torch has a vectorized one (AVX2, AVX-512, Arm);
# elsewhere it resizes a float copy and rounds, which _decode_box then leaves to torchvision.
_NATIVE_UINT8_RESIZE = (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                        or platform.machine() in ("aarch64", "arm64"))

# libjpeg decodes straight to 1/2, 1/4 or 1/8 of the size by keeping only the low-frequency DCT coefficients.
DCT_SCALES = (8, 4, 2)
# Colour JPEGs (YCbCr) and grey ones; CMYK/YCCK are converted differently by PIL and torchvision, so they take the
# plain path.
REDUCIBLE_MODES = ("RGB", "L")


def _jpeg_header(data: np.ndarray) -> Image.Image | None:
    """The lazily opened JPEG (header read, pixels not decoded) when the reduced decode can serve it, else None."""
    if data[:2].tobytes() != b"\xff\xd8":
        return None
    try:
        image = Image.open(io.BytesIO(data.tobytes()), formats=["JPEG"])
    except Exception:  # noqa: BLE001 - an unreadable header: the plain path reports it
        return None
    return image if image.mode in REDUCIBLE_MODES else None


def _jpeg_size(data: np.ndarray) -> tuple[int, int] | None:
    """(width, height) of a colour (YCbCr) or grey JPEG from its header, else None.

    PIL's reader, used where the extension is not built, is less strict: it also passes RGB-coded JPEGs and headers
    libjpeg warns about, whose large crops then take the reduced decode rather than the plain one."""
    if jpeg_size is not None:
        return jpeg_size(data)  # libjpeg's header reader: no PIL image object to open
    header = _jpeg_header(data)
    return None if header is None else header.size


def _image_of_size(width: int, height: int) -> torch.Tensor:
    """A (3, height, width) uint8 tensor over one zero byte: what a stage's make_params reads (the size)."""
    return torch.zeros((1, 1, 1), dtype=torch.uint8).expand(3, height, width)


def _draw_crop(stage: v2.RandomResizedCrop, width: int, height: int) -> dict[str, int]:
    """What stage.make_params draws for an image of this size: the same numbers from torch's generator in the same
    order, without the inspection of its inputs around them, which costs more than the draws.

    Up to ten tries of an area fraction (uniform in `scale`) and an aspect ratio (log-uniform in `ratio`, drawn in
    float32 as torchvision does) whose rounded box fits, placed uniformly; else the largest centred box within the
    ratio bounds. tests/test_fast_decode.py holds it to make_params, generator state included.
    """
    area = height * width
    low, high = stage._log_ratio.tolist()  # the float32 log bounds make_params reads, computed when it was built
    for _ in range(10):
        fraction = torch.empty(1).uniform_(stage.scale[0], stage.scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(low, high)).item()
        box_width = int(round(math.sqrt(area * fraction * aspect)))
        box_height = int(round(math.sqrt(area * fraction / aspect)))
        if 0 < box_width <= width and 0 < box_height <= height:
            top = torch.randint(0, height - box_height + 1, size=(1,)).item()
            left = torch.randint(0, width - box_width + 1, size=(1,)).item()
            return dict(top=top, left=left, height=box_height, width=box_width)
    if width / height < min(stage.ratio):
        box_width, box_height = width, int(round(width / min(stage.ratio)))
    elif width / height > max(stage.ratio):
        box_width, box_height = int(round(height * max(stage.ratio))), height
    else:
        box_width, box_height = width, height
    return dict(top=(height - box_height) // 2, left=(width - box_width) // 2, height=box_height, width=box_width)


def _draw_params(stage: v2.RandomResizedCrop | v2.Resize, width: int, height: int) -> dict:
    if type(stage) is v2.RandomResizedCrop:
        return _draw_crop(stage, width, height)
    return stage.make_params([_image_of_size(width, height)])


def _resize_geometry(stage: v2.RandomResizedCrop | v2.Resize, params: dict, width: int, height: int):
    """(box in source pixels (left, top, right, bottom), output (height, width)) of a resizing first stage."""
    if isinstance(stage, v2.RandomResizedCrop):
        left, top = params["left"], params["top"]
        return (left, top, left + params["width"], top + params["height"]), tuple(stage.size)
    if len(stage.size) == 2:
        return (0, 0, width, height), tuple(stage.size)
    # torchvision's rule for one number: the shorter side to it, the longer one scaled and truncated.
    short, long = sorted((height, width))
    new_short, new_long = stage.size[0], int(stage.size[0] * long / short)
    if stage.max_size is not None and new_long > stage.max_size:
        new_short, new_long = int(stage.max_size * new_short / new_long), stage.max_size
    return (0, 0, width, height), ((new_short, new_long) if height <= width else (new_long, new_short))


def dct_scale(box: tuple[float, float, float, float], output_size: tuple[int, int]) -> int:
    """The largest JPEG decode reduction that still leaves the box at least output_size: never upsampling what
    the full decode would have downsampled, so detail down to the output's pixel pitch survives."""
    box_width, box_height = box[2] - box[0], box[3] - box[1]
    for scale in DCT_SCALES:
        if box_width / scale >= output_size[1] and box_height / scale >= output_size[0]:
            return scale
    return 1


def _decode_reduced(data: np.ndarray, scale: int, box, output_size: tuple[int, int]) -> torch.Tensor | None:
    """The box of the JPEG decoded at 1/scale and resized to output_size by PIL, or None if that fails."""
    header = _jpeg_header(data)
    if header is None:
        return None
    width, height = header.size
    try:
        header.draft(header.mode, (width // scale, height // scale))
        # draft picks its own power of two from the requested size; read back which it took.
        taken = next((s for s in (*DCT_SCALES, 1) if header.size == (-(-width // s), -(-height // s))), 1)
        if taken == 1:
            return None
        resized = header.resize(
            (output_size[1], output_size[0]),
            Image.Resampling.BILINEAR,
            box=tuple(coordinate / taken for coordinate in box),
        )
        # (3, H, W) over PIL's interleaved pixels, like the region path's, so that the loader stacks them as they lie.
        return torch.from_numpy(np.array(resized.convert("RGB"))).permute(2, 0, 1)
    except Exception:  # noqa: BLE001 - a damaged stream: the plain path decodes it or reports why it cannot
        return None


def _decode_box(data: np.ndarray, box, output_size: tuple[int, int]) -> torch.Tensor | None:
    """Only the box's pixels, decoded by libjpeg-turbo (the same pixels a full decode gives) and resized by
    torchvision's own kernel, or None where the region decoder is not built or cannot read the stream."""
    if decode_region is None:
        return None
    left, top, right, bottom = box
    pixels = decode_region(data, left, top, right - left, bottom - top)
    if pixels is None:
        return None
    # A (1, 3, H, W) view of (H, W, 3) memory: torch's uint8 antialiased resize runs faster on this layout than on
    # planar memory (its kernel works on interleaved pixels), and computes the same pixels.
    region = torch.frombuffer(pixels, dtype=torch.uint8).view(1, bottom - top, right - left, 3).permute(0, 3, 1, 2)
    if tuple(region.shape[2:]) == output_size:
        return region[0]
    if _NATIVE_UINT8_RESIZE:
        # The kernel torchvision's resize ends in, called without the two layers of Python dispatch above it, which
        # cost half as much as the resize itself.
        return torch._C._nn._upsample_bilinear2d_aa(region, list(output_size), False, None)[0]
    return TF.resize_image(region, list(output_size), InterpolationMode.BILINEAR, antialias=True)[0]


def decode_transformed(
    data: np.ndarray, transform: Callable[[torch.Tensor], torch.Tensor], max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> torch.Tensor:
    """transform(decode_rgb(data)), decoding only the JPEG's crop box, at 1/2, 1/4 or 1/8 of its size where the
    first stage allows. A header promising more than `max_pixels` pixels is an UnreadableImage, as in decode_rgb.

    When the transform is a Compose whose first stage is a bilinear, antialiased RandomResizedCrop or Resize, the
    stage's parameters (the crop box) are drawn from the header's image size first, with exactly the random draws
    the stage would make on the decoded image (`_draw_crop`). If the box is at least 2x the output on both sides
    (dct_scale), the JPEG is decoded at reduced size and the box resized by PIL from there, with the same box and
    output size; the later stages (flip, policy, erasing) then run unchanged. Pixels of that reduced path differ
    from the plain path's by the difference between libjpeg's DCT-domain downscale and a bilinear one (see
    tests/test_fast_decode.py). At full size only the box is decoded (`decode_region`: the rows above it are
    entropy-decoded only, the rows below it not at all), which gives exactly the plain path's pixels. Anything else,
    or a stream either decoder refuses, is decoded in full and the stage applied with the parameters already drawn:
    exactly the plain path.
    """
    check_image_size(data, max_pixels)
    stages = transform.transforms if isinstance(transform, v2.Compose) else []
    first = stages[0] if stages else None
    reducible = (
        isinstance(first, (v2.RandomResizedCrop, v2.Resize))
        and first.size is not None  # Resize(None, max_size=...) bounds the longer side only: left to torchvision
        and first.interpolation == InterpolationMode.BILINEAR
        and first.antialias
    )
    size = _jpeg_size(data) if reducible else None
    if size is None:
        return transform(decode_rgb(data, max_pixels=None))
    params = _draw_params(first, *size)
    box, output_size = _resize_geometry(first, params, *size)
    scale = dct_scale(box, output_size)
    image = _decode_reduced(data, scale, box, output_size) if scale > 1 else _decode_box(data, box, output_size)
    if image is None:
        image = first.transform(decode_rgb(data, max_pixels=None), params)
    for stage in stages[1:]:
        image = _run_stage(stage, image)
    return image


def _run_stage(stage: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """stage(image); a horizontal flip takes its own draw and kernel without the v2 dispatch around them, which
    costs three times the flip itself."""
    if type(stage) is v2.RandomHorizontalFlip:
        return TF.horizontal_flip_image(image) if torch.rand(1) < stage.p else image
    return stage(image)


def read_bytes(path: str) -> np.ndarray:
    """A file's bytes as a writable uint8 array, read straight into it (one read, no intermediate copy)."""
    with open(path, "rb", buffering=0) as file:
        data = bytearray(os.fstat(file.fileno()).st_size)
        view, size = memoryview(data), 0
        while size < len(data):  # one read is the rule on local disks; network filesystems may return less
            got = file.readinto(view[size:])
            if not got:
                break
            size += got
    return np.frombuffer(data, dtype=np.uint8)[:size]


class FileSource:
    """Where sample i's bytes come from when each sample is a file: read(i) reads it whole, name(i) is its path.
    Other sources (vitkit.data.archives: a tar member or a shard's byte range) offer the same two methods.

    Paths are kept in one numpy array rather than a list of strings: workers then share the parent's pages instead
    of copying them as reference counts change (a known DataLoader memory growth)."""

    def __init__(self, paths: list[str]):
        self._paths = np.array([os.fsencode(path) for path in paths], dtype=np.bytes_)

    def __len__(self) -> int:
        return len(self._paths)

    def name(self, index: int) -> str:
        return os.fsdecode(self._paths[index])

    def read(self, index: int) -> np.ndarray:
        return read_bytes(self.name(index))


class ImageFolderDataset(Dataset):
    """Decoded, augmented samples: dataset[i] is (uint8 (3, H, W) image, label, i).

    An image that cannot be read, decoded or transformed (any exception, MemoryError included), or whose header
    promises more than `max_image_pixels` pixels, gives a warning naming the file and the image None, which
    `collate_skipping_failures` drops and counts, so one bad file never stops a run. `max_image_pixels` is
    data.max_image_pixels.

    Augmentation is a pure function of (seed, epoch, key), the key being the index or, under repeated augmentation,
    a copy's key (`split_sample_key`): torch's global CPU generator (which torchvision's transforms draw from) is
    seeded from the three (`sample_seed`) right before the transform and restored right after. The result is the
    same whatever the worker count, worker assignment, order or resume point, and the main process's stream (which
    dropout draws from) is untouched when there are no workers. The epoch lives in shared memory, so `set_epoch`
    reaches persistent workers started in an earlier epoch.

    The bytes come from `source` (FileSource when None: each sample's path is a file), which must hold the samples
    in the same order; the rest (decode, augmentation, seeds) is the same whatever the source.
    """

    def __init__(self, samples: list[Sample], transform: Callable[[torch.Tensor], torch.Tensor] | None, seed: int = 0,
                 max_image_pixels: int | None = MAX_IMAGE_PIXELS, source=None):
        self.max_image_pixels = max_image_pixels
        self.source = FileSource([path for path, _ in samples]) if source is None else source
        if len(self.source) != len(samples):
            raise ValueError(f"the byte source holds {len(self.source)} samples, the list {len(samples)}")
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.transform = transform
        self.seed = check_seed(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._epoch_key = (-1, 0)  # (epoch, derive_seed(seed, epoch)), per process

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
        return self.source.name(index)

    def __getitem__(self, key: int) -> tuple[torch.Tensor | None, int, int]:
        # A key past the last sample is another copy of one under repeated augmentation (ShardSampler's repeats):
        # the same image, augmented from the key's own seed.
        index, _ = split_sample_key(int(key), len(self))
        path = self.path(index)
        label = int(self.labels[index])
        try:
            data = self.source.read(index)
            # Before any decoder (the device's nvJPEG included) allocates what the header promises.
            check_image_size(data, self.max_image_pixels)
            image = (decode_rgb(data, max_pixels=None) if self.transform is None
                     else self._decode_transformed_seeded(data, int(key)))
        except Exception as error:  # noqa: BLE001 - whatever one file does (MemoryError included), the run goes on
            reason = _reason(error) if isinstance(error, (OSError, UnreadableImage)) else (
                f"{type(error).__name__}: {_reason(error)}")
            warnings.warn(f"skipping unreadable image {path}: {reason[:500]}")
            return None, label, index
        return image, label, index

    def _key_of_epoch(self) -> int:
        epoch = self.epoch
        if self._epoch_key[0] != epoch:
            self._epoch_key = (epoch, derive_seed(self.seed, epoch))
        return self._epoch_key[1]

    def augmentation_seed(self, key: int) -> int:
        """The seed that sample key `key` (an index, or a copy's key) of the current epoch is augmented with."""
        return sample_seed(self._key_of_epoch(), key)

    def _decode_transformed_seeded(self, data: np.ndarray, index: int) -> torch.Tensor:
        generator = torch.default_generator
        saved = generator.get_state()
        # The CPU generator only: torch.manual_seed would also reseed every CUDA generator.
        generator.manual_seed(self.augmentation_seed(index))
        try:
            return decode_transformed(data, self.transform, max_pixels=None)  # __getitem__ checked the size
        finally:
            generator.set_state(saved)
