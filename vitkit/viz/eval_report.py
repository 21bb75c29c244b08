"""An evaluation's report: confusion matrix, per-class scores, most confused pairs, misclassified images."""
from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import numpy as np

from vitkit.errors import VitkitError
from vitkit.fileio import atomic_path
from vitkit.viz.plot import load_matplotlib

FULL_MATRIX_LIMIT = 25  # up to this many classes the whole matrix is drawn; above it, the 25 most confused
CONFUSION_INCHES = 10  # square, at 100 dpi: 1000 x 1000 pixels whatever the number of classes
CONFUSION_DPI = 100
TOP_PAIRS = 50
SHEET_IMAGES = 48
THUMB = 96  # a thumbnail's longer side, in pixels
MAX_IMAGE_PIXELS = 100_000_000  # a header promising more is not opened (a decompression bomb or a huge scan)
_PAD = 4
_COLUMNS = 8
_CAPTION_H = 28  # two lines of PIL's default font
_HEADER_H = 24
_CELL_W = THUMB + 2 * _PAD
_CELL_H = _PAD + THUMB + _CAPTION_H + _PAD
_MAX_DENSE_ENTRIES = 2**28  # 2 GiB of int64: ~16k classes


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """The (num_classes, num_classes) int64 matrix of counts: row = true class, column = predicted class."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.ndim != 1 or predictions.shape != labels.shape:
        raise VitkitError(f"labels {labels.shape} and predictions {predictions.shape} must be 1-D and of one length: "
                          f"pass one label and one predicted class per image")
    if num_classes < 1 or num_classes * num_classes > _MAX_DENSE_ENTRIES:
        raise VitkitError(f"num_classes={num_classes} is out of range for a dense confusion matrix (1 to "
                          f"{math.isqrt(_MAX_DENSE_ENTRIES)}): pass the model's number of classes")
    for what, values in (("label", labels), ("predicted class", predictions)):
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise VitkitError(f"{what}s are {values.dtype}, not integers: pass class indices")
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            bad = values.min() if values.min() < 0 else values.max()
            raise VitkitError(f"{what} {bad} is outside 0..{num_classes - 1}: pass num_classes covering every class")
    codes = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
    return np.bincount(codes, minlength=num_classes * num_classes).astype(np.int64).reshape(num_classes, num_classes)


def _names(class_names: list[str], num_classes: int) -> list[str]:
    """Class names for every index; predicted indices past the list (a head with more logits) are `class_<i>`."""
    return [str(name) for name in class_names] + [f"class_{i}" for i in range(len(class_names), num_classes)]


def confusion_view(labels: np.ndarray, predictions: np.ndarray, classes: np.ndarray, num_classes: int,
                   limit: int = FULL_MATRIX_LIMIT) -> tuple[np.ndarray, np.ndarray, bool]:
    """The classes to draw (sorted indices), their confusion matrix, and whether it is a sub-matrix.

    Up to `limit` classes, all of `classes`. Above, the classes of the most frequent confused pairs (true,
    predicted), taken pair by pair, most frequent first (ties: lower indices first), until `limit` are chosen, so
    the largest off-diagonal cells are on the picture; if the confusions involve fewer classes, the rest are those
    with the most images. The sub-matrix counts the images whose true and predicted classes are both shown.
    """
    if len(classes) <= limit:
        shown = np.sort(classes)
    else:
        wrong = labels != predictions
        codes, counts = np.unique(labels[wrong] * num_classes + predictions[wrong], return_counts=True)
        chosen: dict[int, None] = {}
        for code in codes[np.argsort(-counts, kind="stable")].tolist():
            for index in (code // num_classes, code % num_classes):
                if len(chosen) < limit:
                    chosen[index] = None
            if len(chosen) >= limit:
                break
        if len(chosen) < limit:
            support = np.bincount(labels, minlength=num_classes)[classes]
            for index in classes[np.lexsort((classes, -support))].tolist():
                if len(chosen) == limit:
                    break
                chosen.setdefault(index, None)
        shown = np.sort(np.fromiter(chosen, dtype=np.int64))
    position = np.full(num_classes, -1, dtype=np.int64)
    position[shown] = np.arange(len(shown))
    keep = (position[labels] >= 0) & (position[predictions] >= 0)
    matrix = confusion_matrix(position[labels[keep]], position[predictions[keep]], len(shown))
    return shown, matrix, len(shown) < len(classes)


def per_class_scores(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """support, correct, predicted counts and precision, recall (the class's accuracy), f1 for every class index.

    A class never predicted has precision 0; a class with no images has recall 0; f1 is 0 where both are 0.
    """
    support = np.bincount(labels, minlength=num_classes)
    predicted = np.bincount(predictions, minlength=num_classes)
    correct = np.bincount(labels[labels == predictions], minlength=num_classes)
    precision = np.divide(correct, predicted, out=np.zeros(num_classes), where=predicted > 0)
    recall = np.divide(correct, support, out=np.zeros(num_classes), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros(num_classes), where=total > 0)
    return {"support": support, "correct": correct, "predicted": predicted, "precision": precision,
            "recall": recall, "f1": f1}


def confused_pairs(labels: np.ndarray, predictions: np.ndarray, names: list[str],
                   top: int = TOP_PAIRS) -> list[tuple[str, str, int]]:
    """(true, predicted, count) of the wrong predictions, most frequent first, then by the names; at most `top`."""
    wrong = labels != predictions
    num_classes = len(names)
    codes, counts = np.unique(labels[wrong].astype(np.int64) * num_classes + predictions[wrong], return_counts=True)
    pairs = [(names[code // num_classes], names[code % num_classes], int(count))
             for code, count in zip(codes.tolist(), counts.tolist())]
    pairs.sort(key=lambda pair: (-pair[2], pair[0], pair[1]))
    return pairs[:top]


def _short(name: str, length: int = 24) -> str:
    return name if len(name) <= length else name[:length - 2] + ".."


def _draw_confusion(path: Path, shown: np.ndarray, matrix: np.ndarray, support: np.ndarray, names: list[str],
                    is_sub: bool, num_images: int, num_classes_shown: int) -> None:
    load_matplotlib("write_eval_report")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(CONFUSION_INCHES, CONFUSION_INCHES), dpi=CONFUSION_DPI, layout="constrained")
    ax = fig.subplots()
    rows = support[shown].astype(np.float64)
    share = np.divide(matrix, rows[:, None], out=np.zeros(matrix.shape), where=rows[:, None] > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.7, label="share of the true class's images")
    n = len(shown)
    label_size = 9 if n <= 12 else 7
    cell_size = 9 if n <= 12 else 6
    labels = [_short(names[index]) for index in shown]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=label_size)
    ax.set_yticks(range(n), labels, fontsize=label_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for row, col in zip(*np.nonzero(matrix)):
        ax.text(col, row, str(matrix[row, col]), ha="center", va="center", fontsize=cell_size,
                color="white" if share[row, col] > 0.5 else "black")
    if is_sub:
        title = (f"Confusion matrix: the {n} of {num_classes_shown} classes most involved in confusions\n"
                 f"({num_images} images; cells count those whose true and predicted classes are both shown)")
    else:
        title = f"Confusion matrix: {num_images} images, {n} classes"
    ax.set_title(title, fontsize=11)
    with atomic_path(path) as partial:
        fig.savefig(partial, format="png", dpi=CONFUSION_DPI)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_path(path) as partial:
        with open(partial, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)


def _thumbnail(path: str):
    """The image at `path` scaled to fit THUMB x THUMB, as RGB; None where it cannot be read or is too big."""
    from PIL import Image

    if not path:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    return None
                image.draft("RGB", (THUMB, THUMB))  # JPEGs decode at a reduced scale
                image.load()
                rgb = image.convert("RGB")
    except Exception:  # unreadable, truncated, not an image, a bomb PIL itself refuses: skipped
        return None
    scale = THUMB / max(rgb.size)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    return rgb.resize(size, Image.Resampling.BICUBIC)


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".."


def sheet_size(count: int) -> tuple[int, int]:
    """The contact sheet's (width, height) in pixels for `count` thumbnails (an empty sheet has one row)."""
    rows = max(1, math.ceil(count / _COLUMNS))
    return _COLUMNS * _CELL_W, _HEADER_H + rows * _CELL_H


def cell_origin(index: int) -> tuple[int, int]:
    """The top-left pixel of thumbnail `index`'s THUMB x THUMB box on the sheet."""
    row, col = divmod(index, _COLUMNS)
    return col * _CELL_W + _PAD, _HEADER_H + row * _CELL_H + _PAD


def _draw_sheet(path: Path, wrong: np.ndarray, labels: np.ndarray, predictions: np.ndarray, paths: list[str],
                names: list[str]) -> int:
    """The contact sheet of the first SHEET_IMAGES readable misclassified images; returns how many it shows."""
    from PIL import Image, ImageDraw, ImageFont

    thumbs, skipped = [], 0
    for index in np.flatnonzero(wrong).tolist():
        if len(thumbs) == SHEET_IMAGES:
            break
        thumb = _thumbnail(paths[index])
        if thumb is None:
            skipped += 1
        else:
            thumbs.append((thumb, names[labels[index]], names[predictions[index]]))
    sheet = Image.new("RGB", sheet_size(len(thumbs)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    total = int(wrong.sum())
    header = f"misclassified (true / predicted): {len(thumbs)} of {total}"
    if skipped:
        header += f", {skipped} skipped (unreadable, missing or over 100 megapixels)"
    draw.text((_PAD, 6), header, fill="black", font=font)
    if not thumbs:
        draw.text((_PAD, _HEADER_H + _CELL_H // 2), "no misclassified images to show", fill="gray", font=font)
    for i, (thumb, true, predicted) in enumerate(thumbs):
        x, y = cell_origin(i)
        sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        caption = f"{true} / {predicted}"
        if draw.textlength(caption, font=font) <= _CELL_W - 2:
            lines = [caption]
        else:
            lines = [_fit(draw, f"{true} /", font, _CELL_W - 2), _fit(draw, predicted, font, _CELL_W - 2)]
        for line_number, line in enumerate(lines):
            draw.text((x - _PAD + 1, y + THUMB + 2 + 13 * line_number), line, fill="black", font=font)
    with atomic_path(path) as partial:
        sheet.save(partial, format="PNG")
    return len(thumbs)


def write_eval_report(out_dir: str | Path, class_names: list[str], labels: np.ndarray, top5: np.ndarray,
                      paths: list[str]) -> dict[str, Path]:
    """Writes an evaluation's report into `out_dir` (created) and returns {name: path} of its four files.

    `labels` (N,) are the true class indices into `class_names`; `top5` (N, k) the predicted classes, best first
    (column 0 is the prediction); `paths` the N image files. A prediction past `class_names` (a head with more
    logits than folders) is named `class_<i>`.
      - confusion_matrix.png: rows true, columns predicted, counts in the cells, colour the share of the row's
        images; with more than 25 classes only the 25 in the most frequent confused pairs (the title says so).
      - per_class.csv: class, support, correct, precision, recall (the class's accuracy), f1; precision is 0 for
        a class never predicted. One row per named class, then any `class_<i>` that was predicted.
      - confused_pairs.csv: true, predicted, count of the 50 most frequent wrong predictions (ties by names).
      - misclassified.png: the first 48 readable misclassified images (in the order given), 96 px, captioned
        "true / predicted"; unreadable files and ones over 100 megapixels are skipped.
    """
    labels = np.asarray(labels)
    top5 = np.asarray(top5)
    if top5.ndim == 1:
        top5 = top5[:, None]
    n = len(labels)
    if not class_names:
        raise VitkitError("no class names: pass the class names the labels index")
    if labels.ndim != 1 or n == 0:
        raise VitkitError(f"labels have shape {labels.shape}: pass one true class index per evaluated image")
    if top5.ndim != 2 or top5.shape[0] != n or top5.shape[1] < 1:
        raise VitkitError(f"top5 has shape {top5.shape} for {n} labels: pass (N, k) ranked predictions, k >= 1")
    if len(paths) != n:
        raise VitkitError(f"{len(paths)} paths for {n} labels: pass one image path per evaluated image")
    for what, values in (("labels", labels), ("top5", top5)):
        if not np.issubdtype(values.dtype, np.integer):
            raise VitkitError(f"{what} are {values.dtype}, not integers: pass class indices")
    predictions = top5[:, 0].astype(np.int64)
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= len(class_names):
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise VitkitError(f"label {bad} is outside the {len(class_names)} class names: pass the class names the "
                          f"labels index")
    if predictions.min() < 0:
        raise VitkitError(f"predicted class {predictions.min()} is negative: pass class indices")
    num_classes = max(len(class_names), int(predictions.max()) + 1)
    names = _names(class_names, num_classes)
    # The report's classes: every named class, and the extra logits only where something was predicted as them.
    extra = np.unique(predictions[predictions >= len(class_names)])
    classes = np.concatenate([np.arange(len(class_names)), extra]).astype(np.int64)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {name: out_dir / file for name, file in (
        ("confusion_matrix", "confusion_matrix.png"), ("per_class", "per_class.csv"),
        ("confused_pairs", "confused_pairs.csv"), ("misclassified", "misclassified.png"))}

    scores = per_class_scores(labels, predictions, num_classes)
    _write_csv(written["per_class"], ["class", "support", "correct", "precision", "recall", "f1"],
               [[names[c], int(scores["support"][c]), int(scores["correct"][c]), f"{scores['precision'][c]:.6f}",
                 f"{scores['recall'][c]:.6f}", f"{scores['f1'][c]:.6f}"] for c in classes.tolist()])
    _write_csv(written["confused_pairs"], ["true", "predicted", "count"],
               [list(pair) for pair in confused_pairs(labels, predictions, names)])
    shown, matrix, is_sub = confusion_view(labels, predictions, classes, num_classes)
    _draw_confusion(written["confusion_matrix"], shown, matrix, scores["support"], names, is_sub, n, len(classes))
    _draw_sheet(written["misclassified"], labels != predictions, labels, predictions, list(paths), names)
    return written
