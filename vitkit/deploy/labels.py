"""The original's label file (create_imagenet2012_label.py): {image file name: class index}, one json.dump."""
from __future__ import annotations

import json
import os
from pathlib import Path

from vitkit import storage
from vitkit.data.folder import list_image_folder
from vitkit.errors import VitkitError


def folder_labels(img_path: str | os.PathLike) -> dict[str, int]:
    """Each image's file name and the position of its class folder among the sorted subfolders."""
    samples, _ = list_image_folder(img_path)
    labels: dict[str, int] = {}
    origin: dict[str, str] = {}
    for image, label in samples:
        name = os.path.basename(image)
        if name in labels:
            raise VitkitError(
                f"{origin[name]} and {image} share the file name '{name}', which the label file keys by: rename one"
            )
        labels[name] = label
        origin[name] = image
    return labels


def write_label_file(img_path: str | os.PathLike, output: str | os.PathLike = "imagenet_label.json") -> int:
    """Write the label file for the image folder `img_path`; returns the number of images."""
    labels = folder_labels(img_path)
    with storage.publish(output) as tmp:  # a local path or a URL
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(labels, handle)
    return len(labels)


def read_label_file(path: str | os.PathLike) -> dict[str, int]:
    path = Path(path)
    if not path.is_file():
        raise VitkitError(f"label file {path} does not exist: write it with `vitkit labels --img_path DATA_DIR`")
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise VitkitError(f"label file {path} is not JSON ({exc}): write it with `vitkit labels`") from None
    if not isinstance(labels, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        raise VitkitError(f"label file {path} is not an object of {{file name: class index}}: write it with `vitkit labels`")
    return labels
