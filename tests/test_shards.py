"""WebDataset shards: `vitkit data shard` writes them (locally and into a bucket on a loopback S3 server), webdataset
itself reads them back, and training, evaluation, mid-epoch resume and two-process evaluation read them through
their index with per-sample random access, to the same results as the image folder they came from."""
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TINY_MODEL, free_port, one_line_error, write_image_folder
from test_distributed import check_ok, torchrun
from test_fault_injection import run_vitkit
from test_faults import cli_args
from vitkit import storage
from vitkit.cli import main
from vitkit.data.archives import list_labelled
from vitkit.data.folder import list_image_folder

# 36 training images, batches of 8: 4 steps an epoch, 2 epochs; checkpoints at global steps 3 (1_3), 4 (1_4),
# 6 (2_2: in the middle of epoch 1) and 8 (2_4). One loader worker, so the shards are read in a forked process.
FLAGS = ("--checkpoint.save_checkpoint_steps=3", "--train_num_workers=1", "--max_epoch=2")
FINAL = "vit_tiny_patch16-2_4.safetensors"


def shard_splits(data, dest, *options):
    for split in ("train", "val"):
        assert main(["data", "shard", str(data / split), f"{dest}/{split}", *options]) == 0


def same_weights(first, second) -> bool:
    first, second = load_file(first), load_file(second)
    return first.keys() == second.keys() and all(first[key].equal(second[key]) for key in first)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The image folders, and the same splits as shards of at most 5 images (train: 8 shards, val: 3)."""
    root = tmp_path_factory.mktemp("shards")
    folders = root / "folders"
    write_image_folder(folders / "train", {"ant": 12, "bee": 12, "cat": 12}, seed=1, suffix=".jpg")
    write_image_folder(folders / "val", {"ant": 4, "bee": 3, "cat": 4}, seed=2)
    shard_splits(folders, root / "shards", "--shard-size=5")
    return folders, root / "shards"


def train_run(folders, split_root, out, *extra):
    args = cli_args(folders, out, *FLAGS, f"--dataset_path={split_root}/train", f"--eval_path={split_root}/val", *extra)
    assert main(["train", *args]) == 0
    return out


@pytest.fixture(scope="module")
def folder_run(data):
    folders, _ = data
    return train_run(folders, folders, folders.parent / "folder_run")


@pytest.fixture(scope="module")
def shard_run(data):
    folders, shards = data
    return train_run(folders, shards, folders.parent / "shard_run")


def test_webdataset_reads_the_shards_back_with_the_folders_bytes_and_classes(data):
    import webdataset

    folders, shards = data
    for split in ("train", "val"):
        samples, classes = list_image_folder(folders / split)
        urls = sorted(str(path) for path in (shards / split).glob("shard-*.tar"))
        read = list(webdataset.WebDataset(urls, shardshuffle=False))
        assert len(read) == len(samples)
        for (path, label), sample in zip(samples, read):
            extension = path.rsplit(".", 1)[1]
            assert set(sample) - {"__key__", "__url__", "__local_path__"} == {extension, "cls"}
            assert sample[extension] == open(path, "rb").read()
            assert int(sample["cls"]) == label
        assert json.loads((shards / split / "index.json").read_text())["vitkit"]["classes"] == classes


def test_the_index_is_a_wids_shard_list_whose_offsets_tarfile_agrees_with(data):
    _, shards = data
    index = json.loads((shards / "train" / "index.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    assert [shard["nsamples"] for shard in index["shardlist"]] == [5] * 7 + [1]
    for shard in index["shardlist"]:
        path = shards / "train" / shard["url"]
        assert path.stat().st_size == shard["filesize"]
        with tarfile.open(path) as tar:
            images = [member for member in tar.getmembers() if not member.name.endswith(".cls")]
        assert [member.name for member in images] == shard["members"]
        assert [member.offset_data for member in images] == shard["offsets"]
        assert [member.size for member in images] == shard["sizes"]
    assert not [name for name in os.listdir(shards / "train") if name.endswith(".tmp")]


def test_shards_list_the_samples_of_the_folder_with_their_bytes(data):
    folders, shards = data
    samples, classes = list_image_folder(folders / "train")
    shard_samples, shard_classes, source = list_labelled(str(shards / "train"), 3)
    assert shard_classes == classes and [label for _, label in shard_samples] == [label for _, label in samples]
    for index, (path, _) in enumerate(samples):
        assert source.read(index).tobytes() == open(path, "rb").read()
    # The index itself may be given too.
    assert list_labelled(str(shards / "train" / "index.json"))[0] == shard_samples


def test_max_shard_bytes_bounds_every_shard(data, tmp_path):
    folders, _ = data
    limit = 3 * max(path.stat().st_size for path in (folders / "train").rglob("*.jpg")) + 4096
    assert main(["data", "shard", str(folders / "train"), str(tmp_path / "bytes"), f"--max-shard-bytes={limit}"]) == 0
    sizes = [path.stat().st_size for path in (tmp_path / "bytes").glob("shard-*.tar")]
    assert len(sizes) > 3 and max(sizes) <= limit
    assert len(list_labelled(str(tmp_path / "bytes"))[0]) == 36


def test_training_from_shards_ends_on_the_weights_and_eval_counts_of_the_folder(folder_run, shard_run):
    assert same_weights(folder_run / FINAL, shard_run / FINAL)
    records = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (folder_run, shard_run)]
    assert [record["eval_images"] for record in records[1]] == [11, 11]
    assert [(r["accuracy"], r["loss"]) for r in records[0]] == [(r["accuracy"], r["loss"]) for r in records[1]]


def test_infer_over_shards_answers_as_over_the_folder(data, shard_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    folders, shards = data
    onnx = tmp_path / "tiny.onnx"
    assert main(["export", "--model", str(shard_run / FINAL), *TINY_MODEL, "--class_num=3", "--file_format=ONNX",
                 "--file_name", str(onnx)]) == 0
    answers = []
    for split in (folders / "val", shards / "val"):
        capsys.readouterr()
        assert main(["infer", "--model", str(onnx), "--data", str(split), "--json"]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert answers[0]["images"] == 11
    assert {key: answers[1][key] for key in ("images", "top1", "top5")} == {
        key: answers[0][key] for key in ("images", "top1", "top5")}


def test_a_run_killed_mid_epoch_resumes_from_shards_to_the_uninterrupted_weights(data, shard_run, tmp_path):
    folders, shards = data
    out = tmp_path / "run"
    args = cli_args(folders, out, *FLAGS, f"--dataset_path={shards}/train", f"--eval_path={shards}/val")
    killed = run_vitkit(args, tmp_path / "killed", env={"VITKIT_FAULT": "step_end:7"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(path.name for path in out.glob("*.pt"))[-1] == "vit_tiny_patch16-2_2.pt"  # epoch 1, step 2
    resumed = run_vitkit([*args, "--train.resume=auto"], tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {out / 'vit_tiny_patch16-2_2.pt'}" in resumed.stdout
    assert same_weights(out / FINAL, shard_run / FINAL)


def test_two_gloo_processes_evaluate_every_shard_sample_once(data, shard_run, capsys):
    folders, shards = data
    model = str(shard_run / FINAL)
    common = ["--model", model, "--eval_batch_size=4", "--eval_image_size=32", "--eval_num_workers=0", "--json"]
    capsys.readouterr()
    assert main(["eval", "--data", str(folders / "val"), *common]) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = check_ok(torchrun(2, "eval", "--data", str(shards / "val"), *common))
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    distributed = json.loads(lines[0])
    assert single["total"] == 11
    assert {key: distributed[key] for key in ("correct1", "correct5", "total", "failed")} == {
        key: single[key] for key in ("correct1", "correct5", "total", "failed")}


# ------------------------------------------------------------------------------------------------ hostile input

def _shard(index):
    return index["shardlist"][0]


HOSTILE = [
    ("parent url", lambda index: _shard(index).update(url="../train/shard-000000.tar"), "outside its folder"),
    ("absolute url", lambda index: _shard(index).update(url="/etc/passwd"), "outside its folder"),
    ("remote url", lambda index: _shard(index).update(url="s3://other/x.tar"), "outside its folder"),
    ("range past the end", lambda index: _shard(index)["offsets"].__setitem__(0, _shard(index)["filesize"]),
     "byte ranges outside"),
    ("huge member", lambda index: _shard(index)["sizes"].__setitem__(0, 1 << 40), "byte ranges outside"),
    ("label out of range", lambda index: _shard(index)["labels"].__setitem__(0, 3), "labels outside"),
    ("count mismatch", lambda index: _shard(index).update(nsamples=6), "list of 6 integers"),
    ("huge count", lambda index: _shard(index).update(nsamples=1 << 40), "sample count"),
    ("no classes", lambda index: index["vitkit"].update(classes=[]), "no class subfolders"),
    ("not vitkit's", lambda index: index.pop("vitkit"), "not a vitkit shard index"),
]


@pytest.mark.parametrize("case, change, message", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_a_hostile_index_is_one_error_line(data, tmp_path, case, change, message):
    _, shards = data
    copy = tmp_path / "train"
    shutil.copytree(shards / "train", copy)
    index = json.loads((copy / "index.json").read_text())
    change(index)
    (copy / "index.json").write_text(json.dumps(index))
    assert message in one_line_error(lambda: list_labelled(str(copy)))


def test_a_cut_short_shard_or_a_broken_index_is_one_error_line_from_the_cli(data, tmp_path, capsys):
    folders, shards = data
    copy = tmp_path / "train"
    shutil.copytree(shards / "train", copy)
    shard = copy / "shard-000003.tar"
    shard.write_bytes(shard.read_bytes()[:-1000])
    capsys.readouterr()
    assert main(["train", *cli_args(folders, tmp_path / "run", f"--dataset_path={copy}")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "shard-000003.tar has" in error[0] and "the index says" in error[0], error
    (copy / "index.json").write_text('{"wids_version": 1, "shardlist": [')
    assert "not valid JSON" in one_line_error(lambda: list_labelled(str(copy)))


def test_shards_are_written_where_the_scratch_folder_is_another_file_system(data, tmp_path, monkeypatch):
    folders, _ = data
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's folder")
    scratch = tempfile.mkdtemp(dir=shm)
    try:
        monkeypatch.setattr(tempfile, "tempdir", scratch)  # where the shards are written before they are stored
        assert main(["data", "shard", str(folders / "val"), str(tmp_path / "val"), "--shard-size=5"]) == 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert sorted(path.name for path in (tmp_path / "val").iterdir()) == [
        "index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_shard_refuses_a_destination_that_holds_shards_and_bad_sizes(data, capsys):
    folders, shards = data
    capsys.readouterr()
    assert main(["data", "shard", str(folders / "val"), str(shards / "val")]) == 2
    assert "already holds shards" in capsys.readouterr().err
    assert main(["data", "shard", str(folders / "val"), str(shards / "other"), "--shard-size=0"]) == 2
    assert "--shard-size must be" in capsys.readouterr().err
    assert main(["data", "shard", str(folders / "val")]) == 2
    assert "needs DEST" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- shards in a bucket

@pytest.fixture(scope="module")
def bucket():
    """A bucket on moto's S3 server on 127.0.0.1, with dummy credentials; vitkit.storage's clients made afresh."""
    import boto3
    from moto import server as moto_server

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", endpoint)):
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        storage.configure("")
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="vitkit-data")
        try:
            yield "s3://vitkit-data"
        finally:
            storage.configure("")
            server.stop()


def test_shards_in_a_bucket_train_and_evaluate_like_local_shards(data, shard_run, bucket, tmp_path, capfd,
                                                                 monkeypatch):
    folders, shards = data

    def copy_in(url, *args):
        raise AssertionError(f"{url} was copied in: shards must be read in place")

    monkeypatch.setattr(storage, "copy_tree_in", copy_in)
    shard_splits(folders, f"{bucket}/imagenet", "--shard-size=5")
    fs, _ = storage.filesystem(bucket)
    local_index = json.loads((shards / "train" / "index.json").read_text())
    remote_index = json.loads(fs.cat_file("vitkit-data/imagenet/train/index.json"))
    assert remote_index == local_index  # the same shards, byte ranges and all
    shard = "imagenet/train/shard-000002.tar"
    assert fs.cat_file(f"vitkit-data/{shard}") == (shards / "train" / "shard-000002.tar").read_bytes()
    samples, _, source = list_labelled(f"{bucket}/imagenet/train")
    assert samples[7][0] == f"{bucket}/imagenet/train/shard-000001.tar:00000007.jpg"
    assert source.read(7).tobytes() == open(list_image_folder(folders / "train")[0][7][0], "rb").read()
    remote_run = train_run(folders, f"{bucket}/imagenet", tmp_path / "remote_run")
    assert same_weights(remote_run / FINAL, shard_run / FINAL)
    records = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (shard_run, remote_run)]
    assert [(r["eval_images"], r["accuracy"]) for r in records[0]] == [(r["eval_images"], r["accuracy"])
                                                                      for r in records[1]]
    assert "skipping" not in capfd.readouterr().err  # no image failed to arrive, in the workers either
    assert main(["eval", "--model", str(remote_run / FINAL), "--data", f"{bucket}/imagenet/val",
                 "--eval_image_size=32", "--eval_num_workers=1", "--json"]) == 0
    output = capfd.readouterr()
    assert json.loads(output.out.strip().splitlines()[-1])["total"] == 11 and "skipping" not in output.err


def test_a_missing_remote_index_is_one_error_line(bucket):
    assert "does not exist" in one_line_error(lambda: list_labelled(f"{bucket}/nothing-here"))
