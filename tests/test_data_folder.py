"""Folder listing and decoding on small images made here with PIL; corrupt files must warn, never crash."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line_error
from vitkit.data.folder import (
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    list_flat_folder,
    list_image_folder,
    read_bytes,
)
from vitkit.data.loader import collate_skipping_failures


def save_image(path, seed=0, size=(20, 30), mode="RGB"):
    """A random image of `size` (height, width) saved at `path` in the format its extension names."""
    rng = np.random.default_rng(seed)
    shape = size + ((3,) if mode == "RGB" else ())
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def test_classes_are_sorted_folders_and_labels_their_positions(tmp_path):
    for name, count in [("zebra", 2), ("ant", 3), ("moth", 1)]:
        for i in range(count):
            save_image(tmp_path / name / f"{i}.png", seed=i)
    save_image(tmp_path / "moth" / "deeper" / "x.JPG")  # nested and upper-case extension
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()  # hidden folders are not classes
    samples, classes = list_image_folder(tmp_path)
    assert classes == ["ant", "moth", "zebra"]
    assert [label for _, label in samples] == [0, 0, 0, 1, 1, 2, 2]
    assert [p.split("/")[-2:] for p, _ in samples[:3]] == [["ant", "0.png"], ["ant", "1.png"], ["ant", "2.png"]]
    assert samples[3][0].endswith("moth/0.png") and samples[4][0].endswith("moth/deeper/x.JPG")
    assert list_image_folder(tmp_path) == (samples, classes)


def test_num_classes_may_exceed_the_folders_but_not_fall_short(tmp_path):
    for name in ("a", "b", "c"):
        save_image(tmp_path / name / "0.png")
    samples, classes = list_image_folder(tmp_path, num_classes=1001)
    assert len(classes) == 3 and len(samples) == 3
    message = one_line_error(lambda: list_image_folder(tmp_path, num_classes=2))
    assert "3 class folders" in message and "num_classes is 2" in message


def test_listing_errors_name_the_problem(tmp_path):
    assert "does not exist" in one_line_error(lambda: list_image_folder(tmp_path / "missing"))
    (tmp_path / "file.png").write_bytes(b"x")
    assert "is a file" in one_line_error(lambda: list_image_folder(tmp_path / "file.png"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no class subfolders" in one_line_error(lambda: list_image_folder(empty))
    (empty / "cats").mkdir()
    (empty / "cats" / "readme.txt").write_text("no images here")
    assert "no images" in one_line_error(lambda: list_image_folder(empty))
    assert "no images" in one_line_error(lambda: list_flat_folder(empty))


def test_empty_class_folders_are_kept_with_a_warning(tmp_path):
    save_image(tmp_path / "a" / "0.png")
    (tmp_path / "b").mkdir()
    save_image(tmp_path / "c" / "0.png")
    with pytest.warns(UserWarning, match="hold no images"):
        samples, classes = list_image_folder(tmp_path)
    assert classes == ["a", "b", "c"]
    assert [label for _, label in samples] == [0, 2]


def test_flat_folder_lists_every_image_with_label_minus_one(tmp_path):
    for name in ("b.png", "a.jpg", "sub/c.bmp"):
        save_image(tmp_path / name)
    (tmp_path / "skip.txt").write_text("")
    samples = list_flat_folder(tmp_path)
    assert [p[len(str(tmp_path)) + 1:] for p, _ in samples] == ["a.jpg", "b.png", "sub/c.bmp"]
    assert {label for _, label in samples} == {-1}


@pytest.mark.parametrize("extension", IMAGE_EXTENSIONS)
def test_every_listed_format_decodes_to_uint8_rgb(tmp_path, extension):
    path = tmp_path / "x" / f"img{extension}"
    pixels = save_image(path, size=(20, 30))
    image, label, index = ImageFolderDataset([(str(path), 4)], transform=None)[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 20, 30)
    assert (label, index) == (4, 0)
    if extension in (".png", ".bmp", ".tif", ".tiff"):  # lossless formats give back the exact pixels
        assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))


def test_grayscale_png_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "gray.png"
    pixels = save_image(path, mode="L")
    image, _, _ = ImageFolderDataset([(str(path), 0)], transform=None)[0]
    assert image.shape == (3, 20, 30)
    for channel in range(3):
        assert torch.equal(image[channel], torch.from_numpy(pixels))


def test_corrupt_images_warn_with_their_name_and_are_dropped_by_collate(tmp_path):
    good = tmp_path / "good.png"
    save_image(good)
    random_bytes = tmp_path / "random.jpg"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(600))
    truncated = tmp_path / "truncated.png"
    save_image(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    samples = [(str(good), 0), (str(random_bytes), 1), (str(truncated), 2), (str(tmp_path / "vanished.png"), 3)]
    dataset = ImageFolderDataset(samples, transform=None)
    batch = []
    for index in range(len(dataset)):
        if index == 0:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the good image warns about nothing
                batch.append(dataset[index])
            continue
        with pytest.warns(UserWarning) as caught:
            batch.append(dataset[index])
        message = str(caught[0].message)
        assert samples[index][0] in message and "\n" not in message
    assert [image is None for image, _, _ in batch] == [False, True, True, True]
    images, labels, indices, failed = collate_skipping_failures(batch)
    assert images.shape == (1, 3, 20, 30)
    assert labels.tolist() == [0] and indices.tolist() == [0] and failed == 3
    assert labels.dtype == indices.dtype == torch.int64


def test_read_bytes_gives_the_files_bytes_as_a_writable_array(tmp_path):
    payload = bytes(range(256)) * 41
    (tmp_path / "file.bin").write_bytes(payload)
    (tmp_path / "empty.bin").write_bytes(b"")
    data = read_bytes(str(tmp_path / "file.bin"))
    assert data.dtype == np.uint8 and data.flags.writeable and data.tobytes() == payload
    assert read_bytes(str(tmp_path / "empty.bin")).shape == (0,)
    with pytest.raises(FileNotFoundError):
        read_bytes(str(tmp_path / "missing.bin"))


def test_read_bytes_keeps_reading_after_a_short_read(tmp_path, monkeypatch):
    # Network and FUSE filesystems may hand over fewer bytes than asked for; the rest must still be read.
    payload = bytes(range(256)) * 41
    (tmp_path / "file.bin").write_bytes(payload)
    real_open = open

    class Trickle:
        def __init__(self, file):
            self.file = file

        def readinto(self, buffer):
            return self.file.readinto(buffer[:1000])

        def fileno(self):
            return self.file.fileno()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr("builtins.open", lambda *args, **kwargs: Trickle(real_open(*args, **kwargs)))
    assert read_bytes(str(tmp_path / "file.bin")).tobytes() == payload
