"""Training, resuming and evaluating with data and outputs in a bucket of a real S3 server (moto's, on 127.0.0.1),
and the original's ModelArts keys (configs/vit_patch32_imagenet2012_config_cloud.yml) against it.

The truth is the same run on local folders: 36 training images in batches of 8 are 4 steps an epoch, 2 epochs,
checkpoints every 3 global steps inside an epoch and at each epoch's end: 1_3, 1_4, 2_2 (step 6), 2_4. A run with
its data and checkpoints in the bucket must end on bit-identical weights, and so must one killed mid-run, while it
uploads a checkpoint, and resumed with --resume auto from the bucket."""
import json
import os
import tarfile

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("s3fs")

from conftest import TINY_MODEL, free_port, write_image_folder  # noqa: E402
from test_fault_injection import run_vitkit  # noqa: E402
from test_storage import S3_ENV, s3_server  # noqa: E402, F401 - s3_server is a fixture
from vitkit import storage  # noqa: E402
from vitkit.cli import main  # noqa: E402
from vitkit.engine import checkpoint as ckpt  # noqa: E402

FINAL = "vit_tiny_patch16-2_4.safetensors"
CLOUD_YAML = os.path.join(os.path.dirname(__file__), "..", "configs", "vit_patch32_imagenet2012_config_cloud.yml")


def train_flags(train: str, val: str, out: str, *extra: str) -> list[str]:
    return [*TINY_MODEL, f"--dataset_path={train}", f"--eval_path={val}", f"--save_checkpoint_path={out}",
            "--class_num=3", "--batch_size=8", "--eval_batch_size=5", "--train_num_workers=0", "--eval_num_workers=0",
            "--max_epoch=2", "--warmup_epochs=1", "--lr_max=0.001", "--save_checkpoint_epochs=1", "--autoaugment=0",
            "--mixup=0", "--keep_checkpoint_max=10", "--logging.progress=plain", "--logging.tensorboard=false",
            "--checkpoint.save_checkpoint_steps=3", *extra]


@pytest.fixture(scope="module")
def cloud(s3_server, tmp_path_factory):
    """The tiny data set, locally and in s3://data/tiny, and the final weights of an uninterrupted local run."""
    root = tmp_path_factory.mktemp("cloud")
    data = root / "data"
    write_image_folder(data / "train", {"ant": 12, "bee": 12, "cat": 12}, seed=1)
    write_image_folder(data / "val", {"ant": 4, "bee": 3, "cat": 4}, seed=2)
    storage.configure(s3_server)
    fs, _ = storage.filesystem("s3://data")
    for bucket in ("data", "runs"):
        fs.mkdir(bucket)
    storage.copy_tree_out(data, "s3://data/tiny")
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_server, "VITKIT_CACHE": str(root / "cache")}
    local = root / "local"
    assert main(["train", *train_flags(data / "train", data / "val", local)]) == 0
    storage.configure("")
    return {"root": root, "data": data, "env": env, "fs": fs, "local": local, "expected": load_file(local / FINAL)}


@pytest.fixture
def in_bucket(cloud, monkeypatch, tmp_path):
    """This process pointed at the server, as the subprocesses are, with its own cache and working folder."""
    for key, value in {**cloud["env"], "VITKIT_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    storage.configure("")
    yield cloud
    storage.configure("")
    storage._settings["cache_dir"] = ""


def point_at_server(cloud, tmp_path) -> None:
    storage.configure(cloud["env"]["AWS_ENDPOINT_URL"])
    storage._settings["cache_dir"] = str(tmp_path / "reader_cache")


def remote_weights(cloud, url_path: str) -> dict:
    return load_file(storage.fetch(f"s3://{url_path}"))


def assert_same_weights(final: dict, expected: dict) -> None:
    assert final.keys() == expected.keys()
    assert not [key for key in expected if not torch.equal(final[key], expected[key])]


def remote_checkpoints(cloud, prefix: str) -> list[str]:
    names = sorted(path.rsplit("/", 1)[-1] for path in cloud["fs"].find(prefix))
    return [name for name in names if name.endswith((".pt", ".safetensors"))]


def test_train_from_and_to_a_bucket_equals_the_local_run(in_bucket, tmp_path):
    cloud = in_bucket
    assert main(["train", *train_flags("s3://data/tiny/train", "s3://data/tiny/val", "s3://runs/whole")]) == 0
    assert remote_checkpoints(cloud, "runs/whole") == sorted(
        f"vit_tiny_patch16-{stem}{suffix}" for stem in ("1_3", "1_4", "2_2", "2_4") for suffix in (".pt", ".safetensors"))
    assert_same_weights(remote_weights(cloud, f"runs/whole/{FINAL}"), cloud["expected"])
    names = [path.rsplit("/", 1)[-1] for path in cloud["fs"].find("runs/whole")]
    assert "metrics.jsonl" in names and any(name.endswith("_rank_0.log") for name in names)
    # issue 16: a URL is never a local folder named after its scheme
    assert not (tmp_path / "s3:").exists() and os.listdir(tmp_path) == ["cache"]


def test_sigkill_during_an_upload_then_resume_from_the_bucket_is_bit_identical(in_bucket, tmp_path, capsys):
    """A SIGKILL mid-run, while a checkpoint is being uploaded: the bucket's newest complete checkpoint is the one
    before, readable; --resume auto continues from it and ends on the uninterrupted run's weights."""
    flags = train_flags("s3://data/tiny/train", "s3://data/tiny/val", "s3://runs/upload")
    cloud = in_bucket
    # the second checkpoint's marker: 1_4's .safetensors is in the bucket, its .pt is not
    killed = run_vitkit(flags, tmp_path / "killed", env={**cloud["env"], "VITKIT_FAULT": "upload_marker:2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert remote_checkpoints(cloud, "runs/upload") == [
        "vit_tiny_patch16-1_3.pt", "vit_tiny_patch16-1_3.safetensors", "vit_tiny_patch16-1_4.safetensors"]
    point_at_server(cloud, tmp_path)
    # what a reader of the bucket takes as the newest checkpoint is the complete one before
    assert ckpt.newest_weights("s3://runs/upload") == "s3://runs/upload/vit_tiny_patch16-1_3.safetensors"
    state = torch.load(storage.fetch("s3://runs/upload/vit_tiny_patch16-1_3.pt"), weights_only=True)
    assert state["format"] == "vitkit-train" and state["progress"]["global_step"] == 3
    capsys.readouterr()
    assert main(["train", *flags, "--resume", "auto"]) == 0
    assert "vit_tiny_patch16-1_3.pt at epoch 0, step 3" in capsys.readouterr().out
    assert_same_weights(remote_weights(cloud, f"runs/upload/{FINAL}"), cloud["expected"])
    assert remote_checkpoints(cloud, "runs/upload") == sorted(
        f"vit_tiny_patch16-{stem}{suffix}" for stem in ("1_3", "1_4", "2_2", "2_4") for suffix in (".pt", ".safetensors"))


def test_eval_from_the_bucket_equals_eval_of_the_local_folder(in_bucket, tmp_path, capsys):
    cloud = in_bucket
    storage.configure(cloud["env"]["AWS_ENDPOINT_URL"])
    storage.copy_tree_out(cloud["local"], "s3://runs/evaluated")
    common = [*TINY_MODEL, "--class_num=3", "--eval_batch_size=5", "--eval_num_workers=0", "--json"]
    assert main(["eval", "--model", str(cloud["local"]), "--data", str(cloud["data"] / "val"), *common]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", "s3://runs/evaluated", "--data", "s3://data/tiny/val", *common,
                 "--report", "s3://runs/evaluated/report"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert remote["model"].endswith(FINAL) and local["model"].endswith(FINAL)
    assert {key: remote[key] for key in ("top1", "top5", "total", "correct1")} == \
        {key: local[key] for key in ("top1", "top5", "total", "correct1")}
    assert local["total"] == 11
    assert cloud["fs"].find("runs/evaluated/report")  # the report was published at the URL


def test_a_tar_in_the_bucket_evaluates_like_the_local_folder(in_bucket, tmp_path, capsys):
    """The original's ImageNet arrives as val/imagenet_val.tar: in a bucket it is copied once and read in place."""
    cloud = in_bucket
    archive = tmp_path / "tiny_val.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(cloud["data"] / "val", arcname="val")
    storage.configure(cloud["env"]["AWS_ENDPOINT_URL"])
    storage.upload_file(archive, "s3://data/tars/tiny_val.tar")
    common = ["--model", str(cloud["local"] / FINAL), *TINY_MODEL, "--class_num=3", "--eval_batch_size=5",
              "--eval_num_workers=0", "--json"]
    answers = []
    for data in (str(cloud["data"] / "val"), "s3://data/tars/tiny_val.tar"):
        assert main(["eval", *common, "--data", data]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert answers[0]["total"] == 11
    assert {key: answers[1][key] for key in ("top1", "top5", "total", "correct1")} == \
        {key: answers[0][key] for key in ("top1", "top5", "total", "correct1")}


def test_export_to_the_bucket_then_infer_and_predict_from_it_equal_local(in_bucket, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    cloud = in_bucket
    model = ["--model", str(cloud["local"] / FINAL), *TINY_MODEL, "--class_num=3", "--file_format=ONNX"]
    assert main(["export", *model, "--file_name", str(tmp_path / "tiny")]) == 0
    assert main(["export", *model, "--file_name", "s3://runs/exported/tiny"]) == 0
    assert "uploaded to s3://runs/exported/tiny.onnx" in capsys.readouterr().out
    assert cloud["fs"].cat_file("runs/exported/tiny.onnx") == (tmp_path / "tiny.onnx").read_bytes()
    val = str(cloud["data"] / "val")
    answers = []
    for onnx, data in ((str(tmp_path / "tiny.onnx"), val), ("s3://runs/exported/tiny.onnx", "s3://data/tiny/val")):
        assert main(["infer", "--model", onnx, "--data", data, "--json"]) == 0
        infer = json.loads(capsys.readouterr().out)
        assert main(["predict", os.path.join(val, "ant", sorted(os.listdir(os.path.join(val, "ant")))[0]),
                     "--model", onnx, "--json"]) == 0
        answers.append((infer["images"], infer["top1"], json.loads(capsys.readouterr().out)[0]["top5"]))
    assert answers[0] == answers[1] and answers[0][0] == 11


def test_labels_result_files_and_postprocess_in_the_bucket_equal_local(in_bucket, tmp_path, capsys):
    """The original's C++ inference flow, each file in the bucket: label file, result files, the accuracy line."""
    pytest.importorskip("onnxruntime")
    cloud = in_bucket
    onnx = str(tmp_path / "tiny.onnx")
    assert main(["export", "--model", str(cloud["local"] / FINAL), *TINY_MODEL, "--class_num=3", "--file_format=ONNX",
                 "--file_name", onnx]) == 0
    lines = []
    for folder, val in ((str(tmp_path / "local"), str(cloud["data"] / "val")), ("s3://runs/deployed", "s3://data/tiny/val")):
        assert main(["labels", "--img_path", val, "--output", f"{folder}/labels.json"]) == 0
        assert main(["infer", "--model", onnx, "--data", val, "--save-logits", f"{folder}/result_Files"]) == 0
        capsys.readouterr()
        assert main(["postprocess", "--result_path", f"{folder}/result_Files", "--label_path", f"{folder}/labels.json"]) == 0
        lines.append(capsys.readouterr().out)
    assert lines[0] == lines[1] and lines[0].startswith("Total data: 11,")
    assert len(cloud["fs"].find("runs/deployed/result_Files")) == 11 and cloud["fs"].exists("runs/deployed/labels.json")
    assert not (tmp_path / "s3:").exists()


def test_every_deploy_command_takes_the_endpoint_from_storage_endpoint_url(in_bucket, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    cloud = in_bucket
    endpoint = cloud["env"]["AWS_ENDPOINT_URL"]
    onnx = tmp_path / "tiny.onnx"
    assert main(["export", "--model", str(cloud["local"] / FINAL), *TINY_MODEL, "--class_num=3", "--file_format=ONNX",
                 "--file_name", str(onnx)]) == 0
    storage.configure(endpoint)
    storage.upload_file(onnx, "s3://runs/endpoint/tiny.onnx")
    storage.configure("")
    # The variable names a closed loopback port, so that the config's endpoint must win, and a command that ignored
    # it would fail on loopback rather than reach for AWS.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    remote = ["--model", "s3://runs/endpoint/tiny.onnx", f"--storage.endpoint_url={endpoint}", "--json"]
    capsys.readouterr()
    assert main(["infer", *remote, "--data", "s3://data/tiny/val"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 11
    image = cloud["data"] / "val" / "ant" / sorted(os.listdir(cloud["data"] / "val" / "ant"))[0]
    assert main(["predict", str(image), *remote]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["top5"]) == 3
    # The commands that take no config take the same flag. Each starts with the endpoint unset, as a fresh process
    # would: one that ignored the flag would go to the closed port.
    flag = f"--storage.endpoint_url={endpoint}"
    storage.configure("")
    assert main(["labels", "--img_path", "s3://data/tiny/val", "--output", "s3://runs/endpoint/labels.json", flag]) == 0
    storage.configure("")
    assert main(["infer", *remote[:3], "--data", "s3://data/tiny/val", "--save-logits", "s3://runs/endpoint/results"]) == 0
    capsys.readouterr()
    storage.configure("")
    assert main(["postprocess", "--result_path", "s3://runs/endpoint/results",
                 "--label_path", "s3://runs/endpoint/labels.json", flag]) == 0
    assert capsys.readouterr().out.startswith("Total data: 11,")
    storage.configure("")
    assert main(["data", "shard", "s3://data/tiny/val", "s3://runs/endpoint/shards", flag]) == 0
    assert cloud["fs"].exists("runs/endpoint/shards/index.json")
    assert main(["labels", "--img_path", "s3://data/tiny/val", "--storage.endpoint_url=ftp://x"]) == 2


def test_the_original_cloud_yaml_runs_against_the_bucket(in_bucket, tmp_path):
    """The cloud file unchanged; only the tiny model, the bucket URLs and the local caches are overridden."""
    cloud = in_bucket
    storage.configure(cloud["env"]["AWS_ENDPOINT_URL"])
    storage.copy_tree_out(cloud["local"] / FINAL, "s3://runs/pretrained/start.safetensors")
    cache = tmp_path / "modelarts"
    flags = [a for a in train_flags(f"{cache}/data/train", f"{cache}/data/val", "./outputs") if "mixup" not in a]
    code = main(["train", "--config_path", CLOUD_YAML, *flags, "--max_epoch=1", "--mixup=0.2",
                 "--data_url=s3://data/tiny", "--train_url=s3://runs/modelarts",
                 "--checkpoint_url=s3://runs/pretrained/start.safetensors",
                 f"--data_path={cache}/data", f"--output_path={cache}/train", f"--load_path={cache}/start.safetensors",
                 f"--pretrained={cache}/start.safetensors",
                 "--keep_checkpoint_max=1", "--eval_interval=100"])  # no evaluation: no best to keep but the newest
    assert code == 0
    # the original's sync: data_url -> data_path, checkpoint_url -> load_path, output_path -> train_url
    assert sorted(os.listdir(cache / "data" / "train")) == ["ant", "bee", "cat"]
    assert (cache / "start.safetensors").read_bytes() == (cloud["local"] / FINAL).read_bytes()
    # a relative save_checkpoint_path lies in output_path; retention (keep 1) removed 1_3 from the bucket too
    assert remote_checkpoints(cloud, "runs/modelarts/outputs") == ["vit_tiny_patch16-1_4.pt",
                                                                   "vit_tiny_patch16-1_4.safetensors"]
    assert sorted(path.name for path in ckpt.list_checkpoints(cache / "train" / "outputs")) == [
        "vit_tiny_patch16-1_4.pt"]
    (log,) = (cache / "train" / "outputs").glob("*_rank_0.log")
    assert f"loaded pretrained weights from {cache}/start.safetensors" in log.read_text()


@pytest.mark.parametrize("case", ["bad scheme", "missing bucket", "unreachable endpoint", "missing data"])
def test_storage_problems_are_one_error_line_before_training(in_bucket, tmp_path, capsys, monkeypatch, case):
    data, out = "s3://data/tiny", "s3://runs/never"
    if case == "bad scheme":
        out, expected = "foo://bucket/run", "scheme 'foo://'"
    elif case == "missing bucket":
        out, expected = "s3://nobucket/run", "the bucket 'nobucket' of s3://nobucket/run does not exist"
    elif case == "unreachable endpoint":
        endpoint = f"http://127.0.0.1:{free_port()}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        expected = f"cannot reach the storage endpoint {endpoint}"
    else:
        data, expected = "s3://data/nothing", "s3://data/nothing/train does not exist"
    code = main(["train", *train_flags(f"{data}/train", f"{data}/val", out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("vitkit: error: ") and expected in err, err
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "foo:").exists()
    assert not in_bucket["fs"].exists("runs/never")
