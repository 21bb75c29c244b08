"""Fashion-MNIST from the Debian package's IDX files, exported as an image-folder tree read like ImageNet."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from vitkit.errors import VitkitError
from vitkit.progress import progress_bar

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` or pass the folder that holds the .gz files"

# Folder names sort in label order, so list_image_folder gives every class its canonical label.
CLASS_NAMES = (
    "0_t-shirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
    "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot",
)
# Output split name -> (images file, labels file).
SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Written last, inside the folder that is then renamed into place: its presence means the export is whole.
MARKER_NAME = ".complete"
IDX_UNSIGNED_BYTE = 0x08
# PNG encoding and file creation release the GIL: threads measured as fast as a process pool on 2 cores, without
# process start-up, pickling or fork-safety questions.
WRITER_THREADS = min(4, os.cpu_count() or 1)
CHUNK_SIZE = 1000


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A gzipped IDX array of unsigned bytes with `ndim` dimensions (images 3, labels 1), its header validated.

    IDX layout: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then each dimension
    as a big-endian uint32, then the data in C order.
    """
    try:
        with gzip.open(path, "rb") as stream:
            data = stream.read()
    except (OSError, EOFError, zlib.error) as error:
        raise VitkitError(f"{path} is not a readable gzip file ({error}); reinstall it") from error
    header_size = 4 + 4 * ndim
    magic = (IDX_UNSIGNED_BYTE << 8) | ndim
    if len(data) < header_size or int.from_bytes(data[:4], "big") != magic:
        raise VitkitError(f"{path} is not a {ndim}-D unsigned-byte IDX file (bad magic number); reinstall it")
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    values = np.frombuffer(data, dtype=np.uint8, offset=header_size)
    if values.size != int(np.prod(shape)):
        raise VitkitError(f"{path} holds {values.size} bytes of data but its header says {shape}; reinstall it")
    return values.reshape(shape)


def _read_split(source: Path, images_name: str, labels_name: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(source / images_name, ndim=3)
    labels = read_idx(source / labels_name, ndim=1)
    if len(images) != len(labels) or labels.max(initial=0) >= len(CLASS_NAMES):
        raise VitkitError(f"{source / images_name} and {source / labels_name} do not match; reinstall them")
    return images[:limit], labels[:limit]


def _write_pngs(split_dir: str, first_index: int, images: np.ndarray, labels: np.ndarray) -> None:
    # File names are the sample's position in the IDX split, zero-padded so that sorted order is file order.
    for offset, (image, label) in enumerate(zip(images, labels)):
        path = os.path.join(split_dir, CLASS_NAMES[label], f"{first_index + offset:05d}.png")
        Image.fromarray(image).save(path, format="PNG")  # 2-D uint8: grayscale "L"


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER_NAME).read_text())
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise VitkitError(f"{out / MARKER_NAME} is damaged ({error}); export into another out_dir") from error


def _existing_export(out: Path, limit_per_split: int | None) -> dict | None:
    """The summary of a complete export already at `out`, None when `out` is absent or empty; else an error."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise VitkitError(f"{out} is a file; choose a folder for the Fashion-MNIST export")
    marker = _read_marker(out)
    if marker is not None:
        if marker.get("limit_per_split") != limit_per_split:
            raise VitkitError(
                f"{out} already holds a Fashion-MNIST export with limit_per_split={marker.get('limit_per_split')}, "
                f"not {limit_per_split}; choose another out_dir"
            )
        return {**marker, "out_dir": str(out)}
    if any(out.iterdir()):
        raise VitkitError(f"{out} is not empty and is not a Fashion-MNIST export; choose an empty or new out_dir")
    return None


def write_fashion_mnist(
    out_dir: str | os.PathLike,
    source_dir: str | os.PathLike = DEFAULT_SOURCE_DIR,
    limit_per_split: int | None = None,
) -> dict:
    """Writes out_dir/{train,val}/<class>/<n>.png (60,000 and 10,000 28x28 grayscale PNGs) from the IDX files.

    `limit_per_split` keeps the first N images of each split (the files are shuffled, so classes stay roughly
    balanced; every class folder exists even if it gets none). Returns {"train": count, "val": count,
    "limit_per_split": ..., "classes": [...], "out_dir": ...}.

    Safe to repeat and to interrupt: a complete export with the same limit is returned at once; any other non-empty
    out_dir is refused, never touched. The tree is built in a hidden temporary folder beside out_dir, the marker file
    written last, then renamed into place, so a killed export never leaves a folder that looks complete.
    """
    if limit_per_split is not None and limit_per_split < 1:
        raise VitkitError(f"limit_per_split must be at least 1 (or None for everything), got {limit_per_split}")
    out = Path(out_dir)
    existing = _existing_export(out, limit_per_split)
    if existing is not None:
        return existing

    source = Path(source_dir)
    missing = [name for files in SPLITS.values() for name in files if not (source / name).is_file()]
    if missing:
        raise VitkitError(f"Fashion-MNIST not found in {source} (missing {', '.join(missing)}); {INSTALL_HINT}")
    splits = {split: _read_split(source, *files, limit_per_split) for split, files in SPLITS.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        jobs = []
        for split, (images, labels) in splits.items():
            for name in CLASS_NAMES:
                (staging / split / name).mkdir(parents=True)
            jobs += [
                (str(staging / split), start, images[start:start + CHUNK_SIZE], labels[start:start + CHUNK_SIZE])
                for start in range(0, len(images), CHUNK_SIZE)
            ]
        pool = ThreadPoolExecutor(WRITER_THREADS)
        try:
            # Taking each result makes a failed write raise here.
            bar = progress_bar(len(jobs), f"writing {out}")
            for _ in pool.map(lambda job: _write_pngs(*job), jobs):
                bar.update(1)
            bar.close()
        finally:
            # On an error or Ctrl-C, drop the queued chunks instead of writing them into a folder about to go.
            pool.shutdown(cancel_futures=True)
        summary = {
            **{split: int(len(labels)) for split, (_, labels) in splits.items()},
            "limit_per_split": limit_per_split,
            "classes": list(CLASS_NAMES),
        }
        (staging / MARKER_NAME).write_text(json.dumps(summary, indent=1) + "\n")
        # rename replaces an empty out_dir and fails on a non-empty one, so nothing written meanwhile is lost.
        try:
            os.rename(staging, out)
        except OSError as error:
            raise VitkitError(
                f"could not move the export into {out} ({error.strerror}); make sure nothing else writes there, rerun"
            ) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {**summary, "out_dir": str(out)}
