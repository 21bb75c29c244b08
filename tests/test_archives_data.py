"""A split given as a .tar of class folders (the original's imagenet_train.tar): read in place through an index of
member offsets, it lists, trains and evaluates exactly as the same images extracted to a folder; hostile archives
are refused with one error line or have their bad members skipped."""
import gzip
import io
import json
import os
import tarfile
import warnings

import pytest
from safetensors.torch import load_file

from conftest import one_line_error, tiny_config, write_image_folder
from test_faults import cli_args
from vitkit.cli import main
from vitkit.data import archives
from vitkit.data.archives import list_labelled, list_tar, scan_tar
from vitkit.data.folder import ImageFolderDataset, list_image_folder
from vitkit.data.transforms import train_transform
from vitkit.deploy.infer import list_samples
from vitkit.engine.trainer import train


def make_tar(path, root, arcname, **options):
    with tarfile.open(path, "w", **options) as tar:
        tar.add(root, arcname=arcname)
    return path


@pytest.fixture
def tarred(tiny_dataset, tmp_path):
    """The tiny data set as folders and as tars: train.tar under a top folder (train/<class>/...), val.tar not."""
    make_tar(tmp_path / "train.tar", tiny_dataset / "train", "train")
    make_tar(tmp_path / "val.tar", tiny_dataset / "val", ".")
    return tiny_dataset, tmp_path / "train.tar", tmp_path / "val.tar"


def add_member(tar, name, data=b"", kind=tarfile.REGTYPE, **fields):
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def test_a_tar_lists_the_samples_classes_and_bytes_of_the_extracted_folder(tarred):
    folder, train_tar, val_tar = tarred
    for split, archive in (("train", train_tar), ("val", val_tar)):
        samples, classes = list_image_folder(folder / split)
        tar_samples, tar_classes, source = list_tar(str(archive))
        assert tar_classes == classes == ["ant", "bee", "cat"]
        assert [label for _, label in tar_samples] == [label for _, label in samples]
        # Same order: the member below the class folder is the file's path below it.
        assert [name.split(":", 1)[1].removeprefix("train/") for name, _ in tar_samples] == [
            os.path.relpath(path, folder / split) for path, _ in samples]
        for index, (path, _) in enumerate(samples):
            assert source.read(index).tobytes() == open(path, "rb").read()
    # Independent truth: tarfile's own offsets for the same members.
    with tarfile.open(train_tar) as tar:
        expected = {member.name: (member.offset_data, member.size) for member in tar.getmembers() if member.isfile()}
    members, folders, skipped = scan_tar(str(train_tar))
    assert {name: (offset, size) for name, offset, size in members} == expected
    assert sorted(folders) == ["train", "train/ant", "train/bee", "train/cat"] and skipped == {}


def test_a_tar_trains_to_the_weights_of_the_folder_and_evaluates_to_its_counts(tarred, tmp_path):
    folder, train_tar, val_tar = tarred
    flags = ("--max_epoch=1", "--mixup=0")
    train(tiny_config(folder, tmp_path / "folder_run", *flags))
    # The archive run reads through a forked loader worker (its own file descriptor) and the folder run in-process.
    train(tiny_config(folder, tmp_path / "tar_run", *flags, f"--dataset_path={train_tar}", f"--eval_path={val_tar}",
                      "--train_num_workers=1"))
    expected = load_file(tmp_path / "folder_run" / "vit_tiny_patch16-1_4.safetensors")
    got = load_file(tmp_path / "tar_run" / "vit_tiny_patch16-1_4.safetensors")
    assert expected.keys() == got.keys()
    assert all(expected[key].equal(got[key]) for key in expected), "weights differ from the folder's"
    records = [json.loads((tmp_path / run / "metrics.jsonl").read_text()) for run in ("folder_run", "tar_run")]
    assert records[0]["eval_images"] == records[1]["eval_images"] == 11
    assert records[0]["accuracy"] == records[1]["accuracy"] and records[0]["loss"] == records[1]["loss"]


def test_eval_of_a_tar_counts_like_the_folder(tarred, tmp_path, capsys):
    folder, _, val_tar = tarred
    train(tiny_config(folder, tmp_path / "run", "--max_epoch=1"))
    model = str(tmp_path / "run" / "vit_tiny_patch16-1_4.safetensors")
    results = []
    for data in (folder / "val", val_tar):
        capsys.readouterr()
        assert main(["eval", "--model", model, "--data", str(data), "--eval_image_size=32", "--eval_num_workers=0",
                     "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["total"] == 11
    assert {key: results[1][key] for key in ("correct1", "correct5", "total", "failed")} == {
        key: results[0][key] for key in ("correct1", "correct5", "total", "failed")}


def test_inference_input_may_be_a_tar_with_or_without_class_folders(tarred, tmp_path):
    folder, _, val_tar = tarred
    samples, labelled, source = list_samples(val_tar, 3)
    assert labelled and [label for _, label in samples] == [0] * 4 + [1] * 3 + [2] * 4
    flat = make_tar(tmp_path / "flat.tar", folder / "val" / "bee", ".")
    samples, labelled, source = list_samples(flat, 3)
    assert not labelled and [label for _, label in samples] == [-1] * 3
    assert source.read(2).tobytes() == (folder / "val" / "bee" / "bee_002.png").read_bytes()


def test_a_tar_sample_decodes_and_augments_like_the_file(tarred):
    folder, train_tar, _ = tarred
    samples, _ = list_image_folder(folder / "train")
    tar_samples, _, source = list_tar(str(train_tar))
    transform = train_transform(24, augment="autoaugment", random_erasing=0.5)
    from_files = ImageFolderDataset(samples, transform, seed=5)
    from_tar = ImageFolderDataset(tar_samples, transform, seed=5, source=source)
    for dataset in (from_files, from_tar):
        dataset.set_epoch(2)
    for index in (0, 17, 35):
        image, label, _ = from_tar[index]
        assert image.equal(from_files[index][0]) and label == from_files[index][1]
    assert from_tar.path(0) == f"{train_tar}:train/ant/ant_000.png"


# ---------------------------------------------------------------------------------------------- hostile archives

def test_members_with_unsafe_names_links_and_devices_are_skipped_with_one_warning(tmp_path):
    png = (write_image_folder(tmp_path / "src", {"ant": 1}) / "ant" / "ant_000.png").read_bytes()
    path = tmp_path / "hostile.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "ant/good.png", png)
        add_member(tar, "../ant/up.png", png)
        add_member(tar, "ant/../../etc/x.png", png)
        add_member(tar, "/ant/absolute.png", png)
        add_member(tar, "bee/link.png", kind=tarfile.SYMTYPE, linkname="/etc/passwd")
        add_member(tar, "bee/hard.png", kind=tarfile.LNKTYPE, linkname="ant/good.png")
        add_member(tar, "bee/fifo.png", kind=tarfile.FIFOTYPE)
        add_member(tar, "bee/" + "long" * 100 + ".png", png)  # a GNU long-name record
    with tarfile.open(path, "a", format=tarfile.PAX_FORMAT) as tar:
        add_member(tar, "ant/pax.png", png, pax_headers={"path": "../../pax-escape.png"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples, classes, source = list_tar(str(path))
    assert classes == ["ant", "bee"]
    assert [name.split(":", 1)[1] for name, _ in samples] == ["ant/good.png", "bee/" + "long" * 100 + ".png"]
    assert all(source.read(i).tobytes() == png for i in range(2))
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1 and "3 not a regular file" in messages[0] and "4 unsafe name" in messages[0], messages


def test_members_over_the_size_bound_are_skipped_before_any_read(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "src", {"ant": 2, "bee": 1})
    write_image_folder(tmp_path / "big", {"ant": 1}, size=120)
    os.replace(tmp_path / "big" / "ant" / "ant_000.png", root / "ant" / "big.png")
    path = make_tar(tmp_path / "data.tar", root, ".")
    small = max(file.stat().st_size for file in root.glob("*/*_00*.png"))
    assert (root / "ant" / "big.png").stat().st_size > small
    monkeypatch.setattr(archives, "MAX_MEMBER_BYTES", small)
    with pytest.warns(UserWarning, match=r"1 too large"):
        samples, _, _ = list_tar(str(path))
    assert [name.rsplit("/", 1)[1] for name, _ in samples] == ["ant_000.png", "ant_001.png", "bee_000.png"]


def test_cut_short_damaged_compressed_and_huge_header_archives_are_one_error_line(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "src", {"ant": 3, "bee": 3})
    whole = make_tar(tmp_path / "whole.tar", root, ".").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[:len(whole) // 2 + 100])
    assert "cut short" in one_line_error(lambda: list_tar(str(cut)))
    not_tar = tmp_path / "not.tar"
    not_tar.write_bytes(os.urandom(4096))
    assert "not a tar archive" in one_line_error(lambda: list_tar(str(not_tar)))
    gz = tmp_path / "data.tar"
    gz.write_bytes(gzip.compress(whole))
    assert "compressed" in one_line_error(lambda: list_tar(str(gz)))
    # A header that claims a petabyte (GNU base-256 size): refused from the header, nothing allocated.
    block = bytearray(whole[:512])
    block[124:136] = b"\x80" + (1 << 50).to_bytes(11, "big")
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    huge = tmp_path / "huge.tar"
    huge.write_bytes(bytes(block) + whole[512:])
    assert "run past the end" in one_line_error(lambda: list_tar(str(huge)))
    # A GNU long-name record over the bound is refused before its bytes are read.
    long_name = tmp_path / "long.tar"
    with tarfile.open(long_name, "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "ant/" + "x" * 300 + ".png", b"data")
    monkeypatch.setattr(archives, "MAX_HEADER_RECORD_BYTES", 256)
    assert "name record" in one_line_error(lambda: list_tar(str(long_name)))


def test_a_tar_cut_between_members_is_cut_short_too(tmp_path):
    root = write_image_folder(tmp_path / "src", {"ant": 3, "bee": 3})
    whole = make_tar(tmp_path / "whole.tar", root, ".", format=tarfile.USTAR_FORMAT)
    with tarfile.open(whole) as tar:
        boundary = tar.getmembers()[4].offset  # the header of a later member: all before it is complete
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:boundary])
    assert "without the end-of-archive marker" in one_line_error(lambda: list_tar(str(cut)))


def test_a_cut_short_tar_ends_vitkit_train_with_one_error_line(tiny_dataset, tmp_path, capsys):
    whole = make_tar(tmp_path / "train.tar", tiny_dataset / "train", ".").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[:len(whole) // 2])
    capsys.readouterr()
    assert main(["train", *cli_args(tiny_dataset, tmp_path / "run", f"--dataset_path={cut}")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitkit: error: archive ") and "cut short" in lines[0], lines


def test_list_labelled_keeps_folders_as_before(tiny_dataset):
    samples, classes, source = list_labelled(str(tiny_dataset / "train"))
    assert (samples, classes) == list_image_folder(tiny_dataset / "train") and source is None
