"""The original's per-image result files: `<image stem>_0.bin`, the image's raw float32 logits, nothing else.

Like the original's C++ program (native byte order, one (1, classes) tensor per file), but any class count: the
reader takes it from the file size instead of a hard-coded 1001.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vitkit.errors import VitkitError

SUFFIX = "_0.bin"


def result_name(image_path: str | os.PathLike) -> str:
    """'n01440764_10026.JPEG' -> 'n01440764_10026_0.bin'."""
    return Path(image_path).stem + SUFFIX


def image_stem(result_file: str | os.PathLike) -> str:
    return Path(result_file).name[: -len(SUFFIX)]


def check_unique_stems(image_paths: list[str]) -> None:
    """Result files are named by image stem alone, so two images with one stem would overwrite each other."""
    seen: dict[str, str] = {}
    for path in image_paths:
        stem = Path(path).stem
        if stem in seen:
            raise VitkitError(
                f"images {seen[stem]} and {path} share the name '{stem}', so their result files would collide: "
                "rename one (result files are named <image name>_0.bin, as in the original)"
            )
        seen[stem] = path


def write_result(folder: Path, image_path: str, logits: np.ndarray) -> None:
    """One image's logits, replaced in one rename so a reader never sees half a file.

    No fsync per file: one disk flush per image would dominate the run, and guards only against power loss.
    """
    target = folder / result_name(image_path)
    partial = folder / f".{target.name}.partial"
    np.ascontiguousarray(logits, dtype=np.float32).reshape(1, -1).tofile(partial)
    os.replace(partial, target)


def list_results(folder: str | os.PathLike) -> list[Path]:
    path = Path(folder)
    if not path.is_dir():
        raise VitkitError(f"result folder {path} does not exist: run `vitkit infer --save-logits {path}` first")
    files = sorted(entry for entry in path.iterdir() if entry.name.endswith(SUFFIX) and not entry.name.startswith("."))
    if not files:
        raise VitkitError(f"no *{SUFFIX} result files in {path}: run `vitkit infer --save-logits {path}` first")
    return files


def read_result(path: Path, num_classes: int | None = None) -> np.ndarray:
    """The (classes,) logits in one result file; the class count is the size / 4 unless given."""
    size = path.stat().st_size
    if size == 0 or size % 4:
        raise VitkitError(f"{path} is {size} bytes, not whole float32 logits: it is not a result file, or truncated")
    if num_classes is not None and size != 4 * num_classes:
        raise VitkitError(
            f"{path} holds {size // 4} logits but other result files hold {num_classes}: "
            "the folder mixes results of different models; use a fresh folder"
        )
    return np.fromfile(path, dtype=np.float32)
