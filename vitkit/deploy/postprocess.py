"""`vitkit postprocess`: top-1/top-5 from the per-image result files and the label file, as the original's postprocess.py."""
from __future__ import annotations

import os

import numpy as np

from vitkit.deploy.labels import read_label_file
from vitkit.deploy.result_files import image_stem, list_results, read_result
from vitkit.errors import VitkitError
from vitkit.metrics import TopKCounts


class Accuracy(TopKCounts):
    def line(self) -> str:
        """The original's summary line, to the character."""
        return f"Total data: {self.total}, top1 accuracy: {self.top1}, top5 accuracy: {self.top5}."


def count_hits(logits: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """Top-1 and top-5 hits of (N, classes) logits against N labels; fewer than 5 classes means top-k of all."""
    k = min(5, logits.shape[1])
    top_k = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    hits = top_k == labels[:, None]
    return int(hits[:, 0].sum()), int(hits.any(axis=1).sum())


def postprocess(result_path: str | os.PathLike, label_path: str | os.PathLike) -> Accuracy:
    """Accuracy over every result file; labels are matched by image name whatever its extension."""
    files = list_results(result_path)
    by_stem = {os.path.splitext(name)[0]: label for name, label in read_label_file(label_path).items()}
    missing = [image_stem(path) for path in files if image_stem(path) not in by_stem]
    if missing:
        raise VitkitError(
            f"{len(missing)} result file(s) have no entry in {label_path} (e.g. {missing[0]}): "
            "write the label file from the same image folder the results came from"
        )
    first = read_result(files[0])
    logits = np.stack([first] + [read_result(path, first.shape[0]) for path in files[1:]])
    labels = np.array([by_stem[image_stem(path)] for path in files], dtype=np.int64)
    correct1, correct5 = count_hits(logits, labels)
    return Accuracy(correct1, correct5, len(files))
