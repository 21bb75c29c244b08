"""A folder of ImageNet-like JPEGs made from the real photographs that scikit-image ships in its wheel.

    .venv/bin/pip install -e '.[bench]'                          # scikit-image, for its bundled photographs
    .venv/bin/python benchmarks/make_jpegs.py data/bench-jpegs   # 400 images, 8 classes, 500x375, ~95 KB
    .venv/bin/python benchmarks/make_jpegs.py data/bench-jpegs-large --size 1000x750   # larger photos

Each image is a 2x2 contact sheet of four crops of the photographs (random position, 50-100 % of the photo's side,
random horizontal flip), written at JPEG quality 92 with full-resolution chroma: ImageNet's photos are 500x375 and
about 110 KB on average, and single scikit-image photos are too smooth to reach that size at quality 90 (about
50 KB), because they are downscaled, clean sample images. Four crops per image bring the detail (and with it the
entropy-decoding work) to ImageNet's level without any synthetic pixels. The class of an image is the photograph
in its top-left quarter. Only files inside the installed wheel are read; nothing is downloaded.
The output is the same for the same --seed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# scikit-image's colour photographs (not its synthetic test patterns or grey scans).
PHOTOS = {
    "astronaut": "astronaut.png",
    "cat": "chelsea.png",
    "coffee": "coffee.png",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "rocket": "rocket.jpg",
    "hubble": "hubble_deep_field.jpg",
    "tissue": "ihc.png",
}


def load_photos() -> dict[str, Image.Image]:
    try:
        import skimage
    except ImportError:
        sys.exit("make_jpegs: scikit-image is missing; install it with: .venv/bin/pip install -e '.[bench]'")
    folder = Path(skimage.__file__).parent / "data"
    missing = [name for name in PHOTOS.values() if not (folder / name).is_file()]
    if missing:
        sys.exit(f"make_jpegs: scikit-image {skimage.__version__} lacks {', '.join(missing)} in {folder}; "
                 "install scikit-image>=0.19")
    return {label: Image.open(folder / name).convert("RGB") for label, name in PHOTOS.items()}


def photo_crop(photo: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random crop of `photo` with the aspect of `size`, scaled to `size` and flipped half the time."""
    width, height = photo.size
    side = rng.uniform(0.5, 1.0)
    crop_w = int(min(width, height * size[0] / size[1]) * side)
    crop_h = int(crop_w * size[1] / size[0])
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    tile = photo.resize(size, Image.Resampling.LANCZOS, box=(left, top, left + crop_w, top + crop_h))
    return tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else tile


def contact_sheet(size: tuple[int, int], photos: list[Image.Image], rng: np.random.Generator) -> Image.Image:
    width, height = size
    sheet = Image.new("RGB", size)
    tile_w, tile_h = width // 2, -(-height // 2)
    for position, photo in enumerate(photos):
        sheet.paste(photo_crop(photo, (tile_w, tile_h), rng), ((position % 2) * tile_w, (position // 2) * (height // 2)))
    return sheet


def image_size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write <class>/<class>_<n>.jpg into")
    parser.add_argument("--per-class", type=int, default=50, help="images per class (8 classes)")
    parser.add_argument("--size", type=image_size, default=(500, 375), help="WIDTHxHEIGHT of every image")
    parser.add_argument("--quality", type=int, default=92)
    parser.add_argument("--subsampling", choices=["4:4:4", "4:2:2", "4:2:0"], default="4:4:4")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from vitkit.fileio import atomic_path

    photos = load_photos()
    labels = list(photos)
    rng = np.random.default_rng(args.seed)
    sizes = []
    for label in labels:
        for n in range(args.per_class):
            others = [photos[labels[int(i)]] for i in rng.integers(0, len(labels), 3)]
            sheet = contact_sheet(args.size, [photos[label], *others], rng)
            path = args.out / label / f"{label}_{n:04d}.jpg"
            with atomic_path(path) as tmp:
                sheet.save(tmp, "JPEG", quality=args.quality, subsampling=args.subsampling)
            sizes.append(os.path.getsize(path))
    summary = {
        "images": len(sizes), "classes": len(labels), "size": list(args.size), "quality": args.quality,
        "subsampling": args.subsampling, "mean_kb": round(float(np.mean(sizes)) / 1000, 1),
        "min_kb": round(min(sizes) / 1000, 1), "max_kb": round(max(sizes) / 1000, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
