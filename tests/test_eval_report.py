"""write_eval_report and confusion_matrix, checked against scikit-learn and hand counts."""
import csv
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from vitkit.errors import VitkitError
from vitkit.viz.eval_report import (THUMB, cell_origin, confusion_matrix, confusion_view, sheet_size,
                                    write_eval_report)

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def test_confusion_matrix_matches_sklearn_including_unseen_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 500)
    predictions = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 8, 500))
    ours = confusion_matrix(labels, predictions, num_classes=9)  # classes 7 (predicted only) and 8 (never seen)
    assert ours.dtype == np.int64 and ours.shape == (9, 9)
    np.testing.assert_array_equal(ours, sklearn_metrics.confusion_matrix(labels, predictions, labels=range(9)))


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(VitkitError, match=r"predicted class 5 is outside 0..4: pass num_classes"):
        confusion_matrix(np.array([0, 1]), np.array([1, 5]), 5)
    with pytest.raises(VitkitError, match="must be 1-D and of one length"):
        confusion_matrix(np.array([0, 1]), np.array([1]), 5)
    with pytest.raises(VitkitError, match="not integers"):
        confusion_matrix(np.array([0.0, 1.0]), np.array([1, 0]), 5)


def test_per_class_scores_match_sklearn_and_pairs_are_hand_counted(tmp_path):
    # zebra, ant, moth: indices and alphabetical order differ, so the ties below show the sort is by name.
    names = ["zebra", "ant", "moth", "wasp"]  # wasp: never true, never predicted
    pairs = {(0, 0): 4, (0, 1): 3, (1, 0): 1, (2, 0): 1, (0, 2): 1, (1, 2): 2, (2, 1): 2, (1, 1): 5}
    labels = np.array([t for (t, p), n in pairs.items() for _ in range(n)])
    predictions = np.array([p for (t, p), n in pairs.items() for _ in range(n)])
    # Moth is never predicted correctly; the other ranked guesses (columns 1..4) must not matter.
    top5 = np.stack([predictions] + [np.full_like(predictions, 3)] * 4, axis=1)
    written = write_eval_report(tmp_path / "report", names, labels, top5, [""] * len(labels))
    assert set(written) == {"confusion_matrix", "per_class", "confused_pairs", "misclassified"}
    assert all(path.parent == tmp_path / "report" and path.is_file() for path in written.values())

    assert _rows(written["confused_pairs"]) == [
        ["true", "predicted", "count"],
        ["zebra", "ant", "3"],
        ["ant", "moth", "2"], ["moth", "ant", "2"],
        ["ant", "zebra", "1"], ["moth", "zebra", "1"], ["zebra", "moth", "1"],
    ]

    rows = _rows(written["per_class"])
    assert rows[0] == ["class", "support", "correct", "precision", "recall", "f1"]
    assert [row[0] for row in rows[1:]] == names
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        labels, predictions, labels=range(4), zero_division=0)
    table = np.array([[float(value) for value in row[1:]] for row in rows[1:]])
    np.testing.assert_array_equal(table[:, 0], support)
    np.testing.assert_array_equal(table[:, 1], [4, 5, 0, 0])
    np.testing.assert_allclose(table[:, 2], precision, atol=1e-6)
    np.testing.assert_allclose(table[:, 3], recall, atol=1e-6)
    np.testing.assert_allclose(table[:, 4], f1, atol=1e-6)
    assert table[2, 2] == 0.0  # moth: predicted 3 times, never right

    assert _png_size(written["confusion_matrix"]) == (1000, 1000)
    # No paths: every misclassified image is skipped, and the sheet says so in one empty row.
    assert _png_size(written["misclassified"]) == sheet_size(0)


def test_precision_and_recall_match_sklearn_on_random_predictions(tmp_path):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 12, 400)
    predictions = np.where(rng.random(400) < 0.5, labels, rng.integers(0, 11, 400))
    predictions[predictions == 11] = 0  # class 11 never predicted: precision 0 by definition
    names = [f"c{i}" for i in range(12)]
    written = write_eval_report(tmp_path, names, labels, predictions[:, None], [""] * 400)
    table = np.array([[float(value) for value in row[1:]] for row in _rows(written["per_class"])[1:]])
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        labels, predictions, labels=range(12), zero_division=0)
    np.testing.assert_array_equal(table[:, 0], support)
    np.testing.assert_allclose(table[:, 2:], np.stack([precision, recall, f1], axis=1), atol=1e-6)
    assert table[11, 2] == 0.0
    np.testing.assert_array_equal(table[:, 1], np.diag(sklearn_metrics.confusion_matrix(labels, predictions)))


def test_a_thousand_classes_draw_the_25_most_confused(tmp_path):
    rng = np.random.default_rng(1)
    n = 20_000
    labels = rng.integers(0, 1000, n)
    predictions = np.where(rng.random(n) < 0.9, labels, rng.integers(0, 1000, n))
    # Planted confusions, far above the random ones; one into the 1001st logit, which has no folder.
    planted = {(10, 20): 40, (500, 501): 30, (501, 500): 25, (999, 1000): 20, (7, 300): 15}
    extra_labels = [t for (t, p), k in planted.items() for _ in range(k)]
    extra_predictions = [p for (t, p), k in planted.items() for _ in range(k)]
    labels = np.concatenate([labels, extra_labels])
    predictions = np.concatenate([predictions, extra_predictions])
    names = [f"n{i:08d}" for i in range(1000)]

    classes = np.arange(1001)
    shown, matrix, is_sub = confusion_view(labels, predictions, classes, 1001)
    assert is_sub and len(shown) == 25 and list(shown) == sorted(shown)
    assert {10, 20, 500, 501, 999, 1000, 7, 300} <= set(shown.tolist())
    position = {c: i for i, c in enumerate(shown.tolist())}
    full = confusion_matrix(labels, predictions, 1001)
    np.testing.assert_array_equal(matrix, full[np.ix_(shown, shown)])  # a true sub-matrix of the full one
    assert matrix[position[10], position[20]] >= 40

    written = write_eval_report(tmp_path, names, labels, predictions[:, None], [""] * len(labels))
    assert _png_size(written["confusion_matrix"]) == (1000, 1000)
    pairs = _rows(written["confused_pairs"])[1:]
    assert len(pairs) == 50
    assert pairs[:5] == [["n00000010", "n00000020", "40"], ["n00000500", "n00000501", "30"],
                         ["n00000501", "n00000500", "25"], ["n00000999", "class_1000", "20"],
                         ["n00000007", "n00000300", "15"]]
    counts = [int(row[2]) for row in pairs]
    assert counts == sorted(counts, reverse=True)
    per_class = _rows(written["per_class"])
    assert len(per_class) == 1 + 1001 and per_class[-1] == ["class_1000", "0", "0", "0.000000", "0.000000",
                                                             "0.000000"]


def _bomb_png(path, width=11_000, height=10_000):
    """A PNG whose header promises 110 megapixels: over the report's bound, under PIL's own refusal."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    return path


def test_contact_sheet_shows_readable_misclassified_images_in_order(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    colours = [(220, 30, 30), (30, 200, 40), (40, 50, 220), (230, 220, 30), (200, 40, 200)]
    sizes = [(50, 40), (200, 100), (20, 20), (64, 64), (30, 90)]  # (height, width): shrunk, upscaled, tall
    paths = []
    for i, ((r, g, b), (h, w)) in enumerate(zip(colours, sizes)):
        pixels = np.array([r, g, b]) + rng.integers(-10, 10, size=(h, w, 3))
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    bomb = _bomb_png(tmp_path / "bomb.png")
    # Order: img0 (wrong), broken (wrong), img1 (right, so not shown), bomb (wrong), img2, missing, img3, img4.
    order = [paths[0], str(broken), paths[1], str(bomb), paths[2], str(tmp_path / "missing.png"), paths[3], paths[4]]
    names = ["cat", "dog", "elephant shrew of the northern hills"]
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    predictions = np.array([1, 2, 2, 2, 0, 0, 2, 2])

    loaded_sizes = []
    real_load = ImageFile.ImageFile.load

    def recording_load(self):
        loaded_sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    written = write_eval_report(tmp_path / "out", names, labels, predictions[:, None], order)
    assert (11_000, 10_000) not in loaded_sizes  # refused from its header, never decoded

    shown = [0, 2, 3, 4]  # the readable misclassified: img0, img2, img3, img4
    with Image.open(written["misclassified"]) as sheet:
        assert sheet.size == sheet_size(len(shown))
        pixels = np.asarray(sheet.convert("RGB")).astype(int)
    for cell, image_index in enumerate(shown):
        x, y = cell_origin(cell)
        centre = pixels[y + THUMB // 2, x + THUMB // 2]
        assert np.abs(centre - colours[image_index]).max() <= 25, (cell, centre)
        # The thumbnail fits the 96 px box: its longer side fills it (small images are scaled up too).
        box = pixels[y:y + THUMB, x:x + THUMB]
        coloured = np.abs(box - colours[image_index]).max(axis=-1) <= 30
        rows, cols = np.nonzero(coloured)
        h, w = sizes[image_index]
        long_side = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
        short_side = min(rows.max() - rows.min(), cols.max() - cols.min()) + 1
        assert long_side == THUMB and abs(short_side - THUMB * min(h, w) / max(h, w)) <= 1
        # The caption under the thumbnail is written: dark pixels in the band below it.
        caption = pixels[y + THUMB: y + THUMB + 28, x - 4: x + THUMB + 4]
        assert (caption.max(axis=-1) < 100).sum() > 30
    x, y = cell_origin(len(shown))  # the next cell is blank
    assert (pixels[y: y + THUMB + 28, x: x + THUMB] == 255).all()


def test_every_image_right_leaves_no_pairs_and_an_empty_sheet(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (10, 10), "red").save(image)
    written = write_eval_report(tmp_path / "r", ["a", "b"], np.array([0, 1]), np.array([[0, 1], [1, 0]]),
                                [str(image)] * 2)
    assert _rows(written["confused_pairs"]) == [["true", "predicted", "count"]]
    assert _png_size(written["misclassified"]) == sheet_size(0)
    assert _rows(written["per_class"])[1:] == [["a", "1", "1", "1.000000", "1.000000", "1.000000"],
                                               ["b", "1", "1", "1.000000", "1.000000", "1.000000"]]


def test_bad_input_is_a_one_line_error(tmp_path):
    labels, top5 = np.array([0, 3]), np.array([[0], [1]])
    with pytest.raises(VitkitError, match=r"^label 3 is outside the 2 class names: pass the class names"):
        write_eval_report(tmp_path, ["a", "b"], labels, top5, ["", ""])
    with pytest.raises(VitkitError, match=r"^1 paths for 2 labels"):
        write_eval_report(tmp_path, ["a", "b", "c", "d"], labels, top5, [""])
    with pytest.raises(VitkitError, match=r"top5 has shape \(2, 0\)"):
        write_eval_report(tmp_path, ["a", "b", "c", "d"], labels, np.zeros((2, 0), dtype=int), ["", ""])
    assert not list(tmp_path.iterdir())  # nothing written before the input is checked


def test_missing_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(VitkitError, match=r"^write_eval_report needs matplotlib: pip install 'vitkit\[viz\]'$"):
        write_eval_report(tmp_path, ["a", "b"], np.array([0, 1]), np.array([[1], [0]]), ["", ""])
