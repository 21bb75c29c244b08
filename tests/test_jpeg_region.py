"""vitkit's JPEG region decoder (vitkit/data/_jpeg_region.c) against full decodes of real photographs.

The region decoder must give exactly the pixels that torchvision's full decode gives inside the box, for every
chroma subsampling, progressive files and grey ones; whatever it cannot decode cleanly it hands back as None, so
that the full decoder takes over and reports the problem in its own words.
"""
import io
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import folder
from vitkit.data.folder import UnreadableImage, decode_rgb, decode_transformed
from vitkit.data.transforms import eval_transform, train_transform

skimage = pytest.importorskip("skimage")  # its bundled photographs are the inputs
SAMPLE_DIR = os.path.join(os.path.dirname(skimage.__file__), "data")


def test_region_decoder_is_built():
    # setup.py builds it optionally; without it every JPEG is decoded whole, correct but slower. .ci/run installs the
    # compiler and headers and sets VITKIT_REQUIRE_EXTENSIONS=1, so there a missing build fails.
    if folder.decode_region is None and os.environ.get("VITKIT_REQUIRE_EXTENSIONS") != "1":
        pytest.skip("vitkit.data._jpeg_region is not built (no C compiler or libjpeg headers); JPEGs are decoded whole")
    assert folder.decode_region is not None, (
        "vitkit.data._jpeg_region is not built: install a C compiler and libjpeg's headers (Debian: gcc libjpeg-dev), "
        "then reinstall vitkit"
    )


decode_region = folder.decode_region
needs_decoder = pytest.mark.skipif(decode_region is None, reason="region decoder not built (see the test above)")


def encoded(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def photo(name: str) -> Image.Image:
    return Image.open(os.path.join(SAMPLE_DIR, name))


def jpeg_variants() -> dict[str, bytes]:
    rocket = photo("rocket.jpg").convert("RGB")  # 640 x 427 colour photograph
    variants = {
        "camera file as shipped": open(os.path.join(SAMPLE_DIR, "rocket.jpg"), "rb").read(),
        "grey": encoded(photo("camera.png").convert("L"), quality=90),
        "odd size 4:2:0": encoded(rocket.resize((333, 251)), quality=90, subsampling=2),
    }
    for subsampling, name in ((0, "4:4:4"), (1, "4:2:2"), (2, "4:2:0")):
        for progressive in (False, True):
            key = f"{name}{' progressive' if progressive else ''}"
            variants[key] = encoded(rocket, quality=90, subsampling=subsampling, progressive=progressive)
    return variants


def region(data: bytes, left: int, top: int, width: int, height: int) -> torch.Tensor:
    pixels = decode_region(data, left, top, width, height)
    assert pixels is not None
    return torch.frombuffer(pixels, dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)


@needs_decoder
@pytest.mark.parametrize("name, data", list(jpeg_variants().items()))
def test_region_pixels_equal_the_full_decode(name, data):
    full = decode_rgb(np.frombuffer(data, dtype=np.uint8).copy())
    height, width = full.shape[1:]
    boxes = [(0, 0, width, height), (0, 0, 1, 1), (width - 1, height - 1, 1, 1), (16, 0, 48, height), (0, 8, width, 3)]
    generator = random.Random(name)
    for _ in range(40):
        box_width, box_height = generator.randint(1, width), generator.randint(1, height)
        boxes.append((generator.randint(0, width - box_width), generator.randint(0, height - box_height),
                      box_width, box_height))
    for left, top, box_width, box_height in boxes:
        expected = full[:, top:top + box_height, left:left + box_width]
        assert torch.equal(region(data, left, top, box_width, box_height), expected), (name, left, top)


@needs_decoder
def test_streams_it_cannot_decode_cleanly_are_left_to_the_full_decoder():
    rocket = photo("rocket.jpg")
    data = encoded(rocket.convert("RGB"), quality=90)
    png = io.BytesIO()
    rocket.save(png, "PNG")
    corrupted = bytearray(data)
    corrupted[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    for what, stream in [
        ("CMYK", encoded(rocket.convert("CMYK"), quality=90)),
        ("truncated", data[: len(data) // 2]),  # the full decoder refuses it even where the box lies above the cut
        ("trailing bytes", data + b"tail"),  # the full decoder reads these; no shortcut for them
        ("PNG", png.getvalue()),
        ("empty", b""),
    ]:
        assert decode_region(stream, 0, 0, 64, 64) is None, what
    # Zeroed entropy data decodes without complaint in the full decoder (garbage pixels below the damage); the
    # region decoder gives the same pixels, above the damage and across it.
    full = decode_rgb(np.frombuffer(bytes(corrupted), dtype=np.uint8).copy())
    for left, top, width, height in [(0, 0, 640, 427), (0, 0, 64, 64), (100, 300, 200, 127)]:
        assert torch.equal(region(bytes(corrupted), left, top, width, height),
                           full[:, top:top + height, left:left + width])
    assert decode_region(data, 600, 0, 41, 10) is None  # 640 wide: the box runs past the right side
    assert decode_region(data, 0, 420, 10, 8) is None  # 427 high
    for bad_box in [(0, 0, 0, 10), (-1, 0, 10, 10), (0, 0, 65501, 1), (2**32, 0, 1, 1)]:
        with pytest.raises((ValueError, OverflowError)):
            decode_region(data, *bad_box)


@needs_decoder
def test_header_size_is_pils_and_only_for_streams_the_region_decoder_serves():
    for name, data in jpeg_variants().items():
        assert folder.jpeg_size(data) == Image.open(io.BytesIO(data)).size, name
    rocket = photo("rocket.jpg")
    data = encoded(rocket.convert("RGB"), quality=90)
    png = io.BytesIO()
    rocket.save(png, "PNG")
    for what, stream in [("CMYK", encoded(rocket.convert("CMYK"), quality=90)), ("PNG", png.getvalue()),
                         ("header cut short", data[:100]), ("empty", b""), ("no JPEG", b"\xff\xd8\xff")]:
        assert folder.jpeg_size(stream) is None, what


@needs_decoder
def test_a_stray_marker_below_the_box_is_refused_like_the_full_decoder_does():
    data = encoded(photo("rocket.jpg").convert("RGB"), quality=90)
    cut = len(data) * 9 // 10
    damaged = np.frombuffer(data[:cut] + b"\xff\xc4" + data[cut:], dtype=np.uint8).copy()
    with pytest.raises(UnreadableImage):
        decode_rgb(damaged)
    assert decode_region(damaged.tobytes(), 0, 0, 100, 20) is None  # the box lies far above the marker
    with pytest.raises(UnreadableImage):
        decode_transformed(damaged, train_transform(224, augment="none"))


@needs_decoder
def test_an_incomplete_progressive_file_is_left_to_the_full_decoder():
    # Cut before its third scan and closed with EOI: libjpeg block-smooths what it has, across the crop's margin.
    data = encoded(photo("rocket.jpg").convert("RGB"), quality=90, progressive=True)
    scans = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xda"]
    partial = data[:scans[2]] + b"\xff\xd9"
    assert decode_region(partial, 100, 0, 100, 213) is None
    assert decode_region(data, 100, 0, 100, 213) is not None  # the complete file takes the region path


@needs_decoder
def test_a_damaged_jpeg_gets_the_full_decoders_verdict():
    data = np.frombuffer(encoded(photo("rocket.jpg").convert("RGB"), quality=90), dtype=np.uint8)
    truncated = data[: len(data) // 2].copy()
    transform = train_transform(224, augment="none")
    try:
        torch.default_generator.manual_seed(0)
        plain = transform(decode_rgb(truncated))
    except UnreadableImage:
        with pytest.raises(UnreadableImage):
            decode_transformed(truncated, transform)
    else:
        torch.default_generator.manual_seed(0)
        assert torch.equal(decode_transformed(truncated, transform), plain)


def test_without_the_extension_the_whole_image_is_decoded_with_the_same_result(monkeypatch):
    data = np.fromfile(os.path.join(SAMPLE_DIR, "rocket.jpg"), dtype=np.uint8)  # 640 x 427: never reduced
    transform = train_transform(224, augment="none")
    results = []
    for region_decoder, header_reader in ((folder.decode_region, folder.jpeg_size), (None, None)):
        monkeypatch.setattr(folder, "decode_region", region_decoder)
        monkeypatch.setattr(folder, "jpeg_size", header_reader)  # PIL reads the header instead
        for seed in range(8):
            torch.default_generator.manual_seed(seed)
            results.append(decode_transformed(data, transform))
    plain = []
    for seed in range(8):
        torch.default_generator.manual_seed(seed)
        plain.append(transform(decode_rgb(data)))
    for result, expected in zip(results, plain + plain):
        assert torch.equal(result, expected)


@needs_decoder
@pytest.mark.parametrize("native_kernel", [True, False])
def test_both_resize_calls_give_torchvisions_pixels(monkeypatch, native_kernel):
    # The region is resized by torch's uint8 kernel directly, or through torchvision where torch has no vectorized
    # one; either way the result is the plain path's, flip and crop box included.
    monkeypatch.setattr(folder, "_NATIVE_UINT8_RESIZE", native_kernel)
    if not native_kernel:  # as on a CPU without a vectorized uint8 kernel: torchvision resizes a float copy
        from torchvision.transforms.v2.functional import _geometry
        monkeypatch.setattr(_geometry, "_do_native_uint8_resize_on_cpu", lambda interpolation: False)
    data = np.fromfile(os.path.join(SAMPLE_DIR, "rocket.jpg"), dtype=np.uint8)
    # eval_transform's Resize(427) leaves the 640 x 427 photo at its size: no resize at all.
    for transform in (train_transform(224, augment="none"), eval_transform(224, resize_size=427)):
        for seed in range(6):
            torch.default_generator.manual_seed(seed)
            fast = decode_transformed(data, transform)
            torch.default_generator.manual_seed(seed)
            assert torch.equal(fast, transform(decode_rgb(data))), seed
