"""Hostile images: headers that promise billions of pixels, images a pixel thin, damaged PNG streams.

Every file here is a real small image written with PIL, then its header patched by hand: a JPEG's SOF0 frame size, a
PNG's IHDR size (with its CRC fixed, or PIL refuses it). The decoding runs under an address-space bound a couple
of GiB above what the process already maps, so a decoder that tries to allocate the header's 12.9 GB fails at once
instead of taking the machine's memory.
"""
import contextlib
import io
import json
import resource
import struct
import subprocess
import sys
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from vitkit.cli import main
from vitkit.data.folder import (
    ImageFolderDataset,
    UnreadableImage,
    decode_rgb,
    decode_transformed,
    read_bytes,
)
from vitkit.data.loader import collate_skipping_failures
from vitkit.data.transforms import eval_transform, train_transform
from vitkit.deploy.export import export_model
from vitkit.model.loading import save_model
from vitkit.model.vit import create_model

GiB = 2**30
MAX_IMAGE_PIXELS = 100_000_000  # the documented default of data.max_image_pixels


def _pixels(height=16, width=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A valid 16x16 JPEG whose SOF0 header says width x height: the marker's length, then the 1-byte precision,
    then height and width, 2 bytes each, big-endian."""
    buffer = io.BytesIO()
    Image.fromarray(_pixels()).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    position = 2
    while data[position + 1] != 0xC0:  # walk the marker segments (each: FF xx, 2-byte length) to the frame header
        position += 2 + struct.unpack(">H", data[position + 2:position + 4])[0]
    data[position + 5:position + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def png_claiming(width: int, height: int) -> bytes:
    """A valid 16x16 PNG whose IHDR says width x height, its CRC recomputed."""
    buffer = io.BytesIO()
    Image.fromarray(_pixels()).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).copy()


@contextlib.contextmanager
def memory_bound(extra: int = 2 * GiB):
    """Allocations beyond the address space mapped now plus `extra` fail instead of happening."""
    with open("/proc/self/status") as status:
        mapped = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    bound = mapped + extra if hard == resource.RLIM_INFINITY else min(mapped + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (bound, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


BOMBS = {
    "jpeg": (jpeg_claiming(65500, 65500), ".jpg"),
    "png": (png_claiming(65500, 65500), ".png"),
}


@pytest.mark.parametrize("kind", BOMBS)
def test_a_header_promising_too_many_pixels_is_refused_before_any_decode(kind):
    data, _ = BOMBS[kind]
    transforms = {"none": None, "eval": eval_transform(224), "train": train_transform(224, augment="none")}
    for name, transform in transforms.items():
        started = time.perf_counter()
        with memory_bound(), pytest.raises(UnreadableImage) as caught:
            decode_rgb(array(data)) if transform is None else decode_transformed(array(data), transform)
        message = str(caught.value)
        assert "65500x65500" in message and f"{MAX_IMAGE_PIXELS:,}" in message, (name, message)
        assert "data.max_image_pixels" in message and "\n" not in message
        assert time.perf_counter() - started < 1.0, name


def test_the_pixel_limit_is_a_parameter_and_a_dataset_attribute(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(_pixels(20, 30)).save(path)
    assert decode_rgb(read_bytes(str(path))).shape == (3, 20, 30)
    with pytest.raises(UnreadableImage, match="30x20"):
        decode_rgb(read_bytes(str(path)), max_pixels=599)
    dataset = ImageFolderDataset([(str(path), 0)], transform=None)
    assert dataset.max_image_pixels == MAX_IMAGE_PIXELS
    dataset.max_image_pixels = 599
    with pytest.warns(UserWarning, match="30x20"):
        assert dataset[0][0] is None


def write_hostile_folder(root):
    """One good image and one of each kind of hostile image, as files; returns {name: path}."""
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "good.jpg": None,
        "huge.jpg": jpeg_claiming(65500, 65500),
        "huge.png": png_claiming(65500, 65500),
        "thin.jpg": jpeg_claiming(65500, 1),  # 65,500 pixels, under any limit: its eval resize is the danger
        "tall.jpg": jpeg_claiming(1, 65500),
        "thin.png": png_claiming(65500, 1),  # its 16x16 pixel stream is far too short for the header
    }
    paths = {}
    for name, data in files.items():
        paths[name] = root / name
        if data is None:
            Image.fromarray(_pixels(40, 40)).save(paths[name])
        else:
            paths[name].write_bytes(data)
    return paths


# Which files each pipeline must skip. Undecoded (none) or randomly cropped (train), a 1 x 65500 JPEG is 65,500
# pixels and may decode (libjpeg fills the missing rows); its eval resize cannot be made (see EVAL_MAX_ASPECT).
MUST_SKIP = {
    "none": {"huge.jpg", "huge.png", "thin.png"},
    "eval": {"huge.jpg", "huge.png", "thin.png", "thin.jpg", "tall.jpg"},
    "train": {"huge.jpg", "huge.png", "thin.png"},
}


@pytest.mark.parametrize("pipeline", MUST_SKIP)
def test_the_dataset_skips_and_counts_every_hostile_image_with_a_warning(tmp_path, pipeline):
    paths = write_hostile_folder(tmp_path)
    transform = {"none": None, "eval": eval_transform(32), "train": train_transform(32, augment="none")}[pipeline]
    samples = [(str(path), label) for label, path in enumerate(paths.values())]
    dataset = ImageFolderDataset(samples, transform)
    items = []
    with memory_bound():
        for index, (name, path) in enumerate(paths.items()):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                started = time.perf_counter()
                items.append(dataset[index])
                assert time.perf_counter() - started < 2.0, name
            skips = [str(w.message) for w in caught if "skipping unreadable image" in str(w.message)]
            skipped = items[-1][0] is None
            assert skipped == bool(skips) and len(skips) <= 1, (name, skips)
            if name == "good.jpg":
                assert not skipped
            if name in MUST_SKIP[pipeline]:
                assert skipped, name
                assert str(path) in skips[0] and "\n" not in skips[0], skips
            if name.startswith("huge"):
                assert "65500x65500" in skips[0] and "data.max_image_pixels" in skips[0], skips
            if name == "thin.png":
                assert "PNG pixel data ends early" in skips[0], skips
    if transform is None:
        return  # undecoded images of different sizes do not stack
    images, labels, indices, failed = collate_skipping_failures(items)
    assert failed == sum(item[0] is None for item in items) >= len(MUST_SKIP[pipeline])
    assert labels.tolist()[0] == 0 and images.shape[1:] == (3, 32, 32)


@pytest.mark.parametrize("error", [MemoryError, RuntimeError, KeyError, ZeroDivisionError])
def test_any_exception_from_one_image_is_a_skipped_image_not_a_crash(tmp_path, error):
    path = tmp_path / "fine.png"
    Image.fromarray(_pixels()).save(path)

    def failing_transform(image):
        raise error("out of luck")

    dataset = ImageFolderDataset([(str(path), 7)], failing_transform)
    with pytest.warns(UserWarning) as caught:
        image, label, index = dataset[0]
    assert image is None and (label, index) == (7, 0)
    message = str(caught[0].message)
    assert str(path) in message and error.__name__ in message and "out of luck" in message


def test_the_eval_resize_of_a_very_thin_image_stays_small():
    # Shorter side 4 -> 256 makes the longer side 4.2 million pixels: 3.2 GB before the center crop, without a bound.
    thin = torch.full((3, 4, 65500), 200, dtype=torch.uint8)
    with memory_bound():
        out = eval_transform(224)(thin)
    assert out.shape == (3, 224, 224)
    resize = eval_transform(224).transforms[0]
    assert resize.max_size is not None and resize.max_size <= 64 * 256
    # A photo's aspect ratio is left alone: the bound changes nothing up to 64:1.
    wide = torch.randint(0, 256, (3, 10, 600), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    unbounded = v2.Compose([v2.Resize(10, antialias=True), v2.CenterCrop(8)])
    assert torch.equal(eval_transform(8, resize_size=10)(wide), unbounded(wide))
    assert eval_transform(224).transforms[0](torch.zeros((3, 100, 6400), dtype=torch.uint8)).shape == (3, 256, 16384)


_DAMAGED_PNG_PROBE = """
import io, sys, numpy as np
from PIL import Image
from vitkit.data.folder import UnreadableImage, decode_rgb
buffer = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
good = bytearray(buffer.getvalue())
flipped = bytearray(good)
flipped[flipped.find(b"IDAT") + 20] ^= 0xFF
for name, data in [("flipped bit in the pixel stream", flipped), ("header 40x40 over 16x16 pixels", sys.argv[1])]:
    data = bytes.fromhex(data) if isinstance(data, str) else bytes(data)
    try:
        decode_rgb(np.frombuffer(data, dtype=np.uint8).copy())
        print(name, "decoded")
    except UnreadableImage as error:
        print(name, "unreadable:", error)
"""


def test_a_damaged_png_stream_is_unreadable_not_a_crash():
    # torchvision's PNG decoder ends the process (SIGSEGV) when libpng fails on the pixel rows; run it apart.
    probe = subprocess.run([sys.executable, "-c", _DAMAGED_PNG_PROBE, png_claiming(40, 40).hex()],
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, (probe.returncode, probe.stderr[-2000:])
    lines = probe.stdout.splitlines()
    assert len(lines) == 2 and all("unreadable:" in line for line in lines), probe.stdout


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained tiny ViT at 32 px as a checkpoint and as ONNX: the images never reach it."""
    root = tmp_path_factory.mktemp("bombs")
    model = create_model("vit_tiny_patch16", patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                         image_size=32, num_classes=3).eval()
    save_model(model, root / "tiny.safetensors")
    export_model(model, root / "tiny.onnx")
    return root / "tiny.safetensors", root / "tiny.onnx"


def test_predict_gives_one_error_line_for_a_hostile_image(tiny_model, tmp_path, capsys):
    checkpoint, _ = tiny_model
    paths = write_hostile_folder(tmp_path)
    assert main(["predict", str(paths["good.jpg"]), "--model", str(checkpoint), "--eval_image_size=32"]) == 0
    capsys.readouterr()
    for name in ("huge.jpg", "huge.png", "thin.jpg", "tall.jpg", "thin.png"):
        with memory_bound():
            code = main(["predict", str(paths[name]), "--model", str(checkpoint), "--eval_image_size=32"])
        error = capsys.readouterr().err
        assert code == 2, (name, error)
        assert error.startswith("vitkit: error: ") and error.count("\n") == 1 and str(paths[name]) in error, error
    assert main(["predict", str(paths["good.jpg"]), "--model", str(checkpoint), "--eval_image_size=32",
                 "--data.max_image_pixels=1000"]) == 2
    error = capsys.readouterr().err
    assert "40x40" in error and "data.max_image_pixels" in error and error.count("\n") == 1


def test_infer_and_eval_skip_and_count_hostile_images(tiny_model, tmp_path, capsys):
    checkpoint, onnx_path = tiny_model
    write_hostile_folder(tmp_path / "flat")
    with memory_bound(3 * GiB), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["infer", "--model", str(onnx_path), "--data", str(tmp_path / "flat"), "--json",
                     "--workers", "0"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["images"] == 1 and record["skipped"] == 5
    write_hostile_folder(tmp_path / "labelled" / "a")
    with memory_bound(3 * GiB), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", "--model", str(checkpoint), "--data", str(tmp_path / "labelled"), "--json",
                     "--eval_image_size=32", "--eval_num_workers=0", "--class_num=3"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["total"] == 1 and record["failed"] == 5, record


def test_the_config_default_is_the_decoders_limit():
    from vitkit.config import OPTIONS
    from vitkit.data import folder

    assert OPTIONS["data.max_image_pixels"].default == folder.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS
