"""The Fashion-MNIST export, on tiny IDX files written here and (with the Debian package installed) the real ones."""
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitkit.data import fashion_mnist
from vitkit.data.fashion_mnist import CLASS_NAMES, write_fashion_mnist
from vitkit.data.folder import list_image_folder
from vitkit.errors import VitkitError

REAL_SOURCE = Path(fashion_mnist.DEFAULT_SOURCE_DIR)
needs_real_data = pytest.mark.skipif(
    not (REAL_SOURCE / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST is not installed in {REAL_SOURCE} (apt-get install dataset-fashion-mnist)",
)


def write_idx(path, array, magic_type=0x08):
    header = struct.pack(">BBBB", 0, 0, magic_type, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def raw_split(source, images_name, labels_name):
    """The split read with plain offsets (16-byte image header, 8-byte label header), independently of read_idx."""
    with gzip.open(source / images_name) as stream:
        images = np.frombuffer(stream.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(source / labels_name) as stream:
        labels = np.frombuffer(stream.read(), dtype=np.uint8, offset=8)
    return images, labels


@pytest.fixture
def tiny_source(tmp_path):
    """12 training and 6 validation random 28x28 images with labels cycling through the classes."""
    source = tmp_path / "source"
    source.mkdir()
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 6)):
        images_name, labels_name = fashion_mnist.SPLITS[split]
        write_idx(source / images_name, rng.integers(0, 256, (count, 28, 28)))
        write_idx(source / labels_name, np.arange(count) % 10)
    return source


def png_count(folder):
    return len(list(folder.rglob("*.png")))


def test_export_writes_class_folders_and_a_marker(tmp_path, tiny_source):
    out = tmp_path / "fmnist"
    summary = write_fashion_mnist(out, source_dir=tiny_source)
    assert summary["train"] == 12 and summary["val"] == 6 and summary["out_dir"] == str(out)
    for split, count in (("train", 12), ("val", 6)):
        assert sorted(p.name for p in (out / split).iterdir()) == list(CLASS_NAMES)
        assert png_count(out / split) == count
    assert json.loads((out / ".complete").read_text())["train"] == 12
    images, _ = raw_split(tiny_source, *fashion_mnist.SPLITS["train"])
    assert np.array_equal(np.asarray(Image.open(out / "train" / CLASS_NAMES[11 % 10] / "00011.png")), images[11])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fmnist", "source"]  # no staging folder left behind


def test_second_export_returns_the_first_without_rewriting(tmp_path, tiny_source):
    out = tmp_path / "fmnist"
    first = write_fashion_mnist(out, source_dir=tiny_source, limit_per_split=5)
    marker_time = (out / ".complete").stat().st_mtime_ns
    assert write_fashion_mnist(out, source_dir=tmp_path / "gone", limit_per_split=5) == first
    assert (out / ".complete").stat().st_mtime_ns == marker_time
    with pytest.raises(VitkitError, match="limit_per_split=5"):
        write_fashion_mnist(out, source_dir=tiny_source)


def test_export_refuses_a_foreign_non_empty_folder(tmp_path, tiny_source):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(VitkitError, match="not empty"):
        write_fashion_mnist(out, source_dir=tiny_source)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_fashion_mnist(empty, source_dir=tiny_source)["val"] == 6


def test_missing_or_broken_source_is_a_one_line_error(tmp_path, tiny_source):
    with pytest.raises(VitkitError) as caught:
        write_fashion_mnist(tmp_path / "out", source_dir=tmp_path / "nowhere")
    assert "apt-get install dataset-fashion-mnist" in str(caught.value) and "\n" not in str(caught.value)
    write_idx(tiny_source / fashion_mnist.SPLITS["val"][1], np.zeros(6), magic_type=0x0D)  # float type code
    with pytest.raises(VitkitError, match="magic"):
        write_fashion_mnist(tmp_path / "out", source_dir=tiny_source)
    assert not (tmp_path / "out").exists()


def test_an_interrupted_export_leaves_nothing_that_looks_complete(tmp_path, tiny_source, monkeypatch):
    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(fashion_mnist, "_write_pngs", fail)
    with pytest.raises(KeyboardInterrupt):
        write_fashion_mnist(tmp_path / "out", source_dir=tiny_source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


@needs_real_data
def test_real_export_matches_the_idx_bytes(tmp_path):
    out = tmp_path / "fmnist"
    summary = write_fashion_mnist(out, limit_per_split=50)
    assert (summary["train"], summary["val"]) == (50, 50)
    for split in ("train", "val"):
        images, labels = raw_split(REAL_SOURCE, *fashion_mnist.SPLITS[split])
        samples, classes = list_image_folder(out / split)
        assert classes == list(CLASS_NAMES)
        # Sorted by class, then by zero-padded position: the raw labels of the first 50, in that order.
        positions = [int(Path(path).stem) for path, _ in samples]
        assert [label for _, label in samples] == [int(labels[i]) for i in positions]
        assert sorted(positions) == list(range(50))
        path, label = samples[0]
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
        assert pixels.min() < pixels.max()
        assert np.array_equal(pixels, images[int(Path(path).stem)])


def test_the_data_command_reads_the_idx_files_from_a_given_source(tmp_path, tiny_source, capsys):
    from vitkit.cli import main

    assert main(["data", "fashion-mnist", str(tmp_path / "out"), "--source", str(tiny_source)]) == 0
    assert "12 training images" in capsys.readouterr().out
    assert png_count(tmp_path / "out" / "val") == 6
    assert main(["data", "fashion-mnist", str(tmp_path / "other"), "--source", str(tmp_path / "gone")]) == 2
    assert "vitkit: error: Fashion-MNIST not found in" in capsys.readouterr().err
