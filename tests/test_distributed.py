"""Data-parallel training and evaluation under torchrun: real processes, gloo on CPU, the tiny model.

The runs are shared by the tests through module fixtures, because each torchrun launch costs seconds of start-up.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from conftest import TINY_MODEL, tiny_config, write_image_folder
from vitkit.cli import main
from vitkit.engine.trainer import Trainer
from vitkit.errors import VitkitError
from vitkit.model.loading import load_model

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no gloo backend")

LAUNCH_TIMEOUT_S = 300
# Weights compared across world sizes: only the order of float sums differs (DDP averages two half-batch gradients).
WEIGHT_TOLERANCE = 1e-6


def train_args(data, out, *extra):
    """tiny_config's settings as command-line flags, with everything random but the data order switched off
    (dropout, stochastic depth, mixup, autoaugment), so that runs on different world sizes can agree."""
    return [
        *TINY_MODEL,
        f"--dataset_path={data / 'train'}", f"--eval_path={data / 'val'}", f"--save_checkpoint_path={out}",
        "--class_num=3", "--eval_batch_size=4", "--train_num_workers=0", "--eval_num_workers=0",
        "--max_epoch=2", "--warmup_epochs=1", "--lr_max=0.001", "--save_checkpoint_epochs=1", "--autoaugment=0",
        "--mixup=0", "--model.drop_rate=0", "--model.proj_drop_rate=0", "--model.mlp_drop_rate=0",
        "--model.drop_path_rate=0", "--logging.progress=plain", "--distributed.timeout_s=60", *extra,
    ]


def torchrun(nproc: int, *vitkit_args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
               "-m", "vitkit", *vitkit_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)


def check_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def weights(folder, stem):
    return load_file(folder / f"{stem}.safetensors")


def without_key_bias(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The attention's key bias has a gradient of exactly zero in exact arithmetic (it adds the same amount to all
    of a query's scores, which softmax ignores), so what it gets is float round-off, different for every world
    size, and AdamW turns even round-off into steps of about lr. The query and value biases stay compared."""
    if not name.endswith("attn.qkv.bias"):
        return tensor
    width = tensor.shape[0] // 3
    return torch.cat([tensor[:width], tensor[2 * width:]])


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((without_key_bias(key, first[key]) - without_key_bias(key, second[key])).abs().max().item()
               for key in first)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist") / "data"
    write_image_folder(root / "train", {"ant": 12, "bee": 12, "cat": 12}, seed=1)  # 36 images
    write_image_folder(root / "val", {"ant": 4, "bee": 3, "cat": 4}, seed=2)  # 11: no multiple of 2 x 4
    return root


@pytest.fixture(scope="module")
def two_process_run(data):
    """2 processes with 4 images each per step: 36 images give 18 per rank, 4 steps per epoch."""
    out = data.parent / "two"
    result = check_ok(torchrun(2, "train", *train_args(data, out, "--batch_size=4")))
    out.joinpath("console.txt").write_text(result.stdout)
    return out


@pytest.fixture(scope="module")
def one_process_run(data):
    """1 process with 8 images per step: the same 4 steps, each over the same 8 images as the two ranks' step."""
    out = data.parent / "one"
    assert main(["train", *train_args(data, out, "--batch_size=8")]) == 0
    return out


def test_two_processes_end_with_the_weights_of_one_process_with_twice_the_batch(two_process_run, one_process_run):
    two = weights(two_process_run, "vit_tiny_patch16-2_4")
    one = weights(one_process_run, "vit_tiny_patch16-2_4")
    assert max_difference(two, one) <= WEIGHT_TOLERANCE
    # The logged loss is the mean over both ranks, so it is the one-process loss over the same images.
    two_records = [json.loads(line) for line in (two_process_run / "metrics.jsonl").read_text().splitlines()]
    one_records = [json.loads(line) for line in (one_process_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in two_records] == [0, 1]
    for two_record, one_record in zip(two_records, one_records):
        assert two_record["loss"] == pytest.approx(one_record["loss"], rel=1e-5)
        assert two_record["eval_images"] == 11 and two_record["accuracy"] == one_record["accuracy"]


def test_rank_zero_alone_writes_checkpoints_and_the_console_and_every_rank_its_log(two_process_run):
    assert (two_process_run / "console.txt").read_text().count(":INFO:epoch[") == 2  # rank 0's lines, once
    assert sorted(p.name for p in two_process_run.glob("*.pt")) == ["vit_tiny_patch16-1_4.pt",
                                                                    "vit_tiny_patch16-2_4.pt"]
    for rank in (0, 1):
        logs = list(two_process_run.glob(f"*_rank_{rank}.log"))
        assert len(logs) == 1 and logs[0].read_text().count(":INFO:epoch[") == 2


def test_distributed_eval_counts_every_image_once_like_one_process(data, two_process_run, capsys):
    model = str(two_process_run / "vit_tiny_patch16-2_4.safetensors")
    args = ["eval", "--model", model, "--data", str(data / "val"), "--eval_batch_size=4", "--eval_image_size=32",
            "--eval_num_workers=0", "--json"]
    capsys.readouterr()
    assert main(args) == 0
    single = json.loads(capsys.readouterr().out)
    result = check_ok(torchrun(2, *args))
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    distributed = json.loads(lines[0])
    assert single["total"] == 11
    for key in ("correct1", "correct5", "total", "failed"):
        assert distributed[key] == single[key]


def test_epoch_end_checkpoints_resume_on_another_world_size(data, two_process_run, one_process_run):
    # Written by 2 processes, continued by 1 (batch 8), and the other way round (batch 4 per process): both end
    # where the uninterrupted runs ended.
    for source, nproc, batch, reference in ((two_process_run, 1, 8, one_process_run),
                                            (one_process_run, 2, 4, two_process_run)):
        out = data.parent / f"resumed_on_{nproc}"
        out.mkdir()
        shutil.copy(source / "vit_tiny_patch16-1_4.pt", out)
        args = ["train", *train_args(data, out, f"--batch_size={batch}"), "--resume", "auto"]
        if nproc == 1:
            assert main(args) == 0
        else:
            check_ok(torchrun(nproc, *args))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [1]
        resumed = weights(out, "vit_tiny_patch16-2_4")
        assert max_difference(resumed, weights(reference, "vit_tiny_patch16-2_4")) <= WEIGHT_TOLERANCE


def test_mid_epoch_checkpoint_converts_to_another_step_size(data, tmp_path):
    # 8 samples a step here, as 2 processes x 4 would be; the conversion works in samples, whatever their split.
    out = tmp_path / "run"
    assert main(["train", *train_args(data, out, "--batch_size=8", "--max_epoch=1",
                                      "--checkpoint.save_checkpoint_steps=2")]) == 0
    middle = out / "vit_tiny_patch16-1_2.pt"  # 16 samples into epoch 0
    assert middle.is_file()
    resumed = tmp_path / "resumed"
    # Batch 4: 16 samples are 4 of its 9 steps, so 5 steps remain.
    assert main(["train", *train_args(data, resumed, "--batch_size=4", "--max_epoch=1"), "--resume", str(middle)]) == 0
    assert (resumed / "vit_tiny_patch16-1_9.pt").is_file()
    state = torch.load(resumed / "vit_tiny_patch16-1_9.pt", weights_only=True)
    assert state["progress"]["global_step"] == 9 and state["progress"]["epoch"] == 1


def test_mid_epoch_checkpoint_that_splits_a_step_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *train_args(data, out, "--batch_size=8", "--max_epoch=1",
                                      "--checkpoint.save_checkpoint_steps=1", "--keep_checkpoint_max=10")]) == 0
    capsys.readouterr()
    # 8 samples are no whole number of 3-sample steps.
    args = ["train", *train_args(data, tmp_path / "resumed", "--batch_size=3", "--max_epoch=1"),
            "--resume", str(out / "vit_tiny_patch16-1_1.pt")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitkit: error: ") and err.count("\n") == 1
    assert "world size, batch_size and accum_steps that wrote it" in err and "epoch's end" in err


def test_an_error_on_one_rank_ends_the_job_with_its_message(data, two_process_run, tmp_path):
    # Rank 0 refuses to overwrite another run's checkpoints; rank 1 is then left waiting in DDP's first broadcast,
    # and torchrun must end it rather than hang.
    out = tmp_path / "taken"
    out.mkdir()
    shutil.copy(two_process_run / "vit_tiny_patch16-1_4.pt", out)
    started = time.perf_counter()
    result = torchrun(2, "train", *train_args(data, out, "--batch_size=4"))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "vitkit: error: " in output and "already holds another run's checkpoints" in output
    assert time.perf_counter() - started < LAUNCH_TIMEOUT_S


def test_a_batch_of_only_unreadable_images_still_joins_the_gradient_all_reduce(data, tmp_path):
    # Under DDP the other ranks' backward waits for this rank's gradients, so the step must run, with zero gradients.
    trainer = Trainer(tiny_config(data, tmp_path / "run"))
    loss = trainer._train_step(torch.empty((0, 3, 0, 0), dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in trainer.model.parameters())


# ---- FSDP2 ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fsdp_sharded_run(data):
    """The two-process run under FSDP with sharded checkpoints. Eval batches of 5 give the ranks 6 and 5 of the 11
    validation images, 2 batches and 1: the rank with fewer must still join every all-gather."""
    out = data.parent / "fsdp"
    check_ok(torchrun(2, "train", *train_args(data, out, "--batch_size=4", "--distributed.strategy=fsdp",
                                              "--checkpoint.sharded=true", "--eval_batch_size=5")))
    return out


def test_fsdp_ends_with_the_weights_of_one_process_and_counts_every_eval_image(fsdp_sharded_run, one_process_run):
    assert max_difference(weights(fsdp_sharded_run, "vit_tiny_patch16-2_4"),
                          weights(one_process_run, "vit_tiny_patch16-2_4")) <= WEIGHT_TOLERANCE
    fsdp_records = [json.loads(line) for line in (fsdp_sharded_run / "metrics.jsonl").read_text().splitlines()]
    one_records = [json.loads(line) for line in (one_process_run / "metrics.jsonl").read_text().splitlines()]
    for fsdp_record, one_record in zip(fsdp_records, one_records, strict=True):
        assert fsdp_record["eval_images"] == 11 and fsdp_record["accuracy"] == one_record["accuracy"]
        assert fsdp_record["loss"] == pytest.approx(one_record["loss"], rel=1e-5)


def test_sharded_checkpoint_written_by_two_processes_resumes_on_one(data, fsdp_sharded_run, one_process_run):
    stem = "vit_tiny_patch16-1_4"
    state = torch.load(fsdp_sharded_run / f"{stem}.pt", weights_only=True)
    assert "model" not in state and "optimizer" not in state and state["shards"] == f"{stem}.dcp"
    with pytest.raises(VitkitError, match=f"sharded training checkpoint.*use the weights beside it, {stem}.safetensors"):
        load_model(fsdp_sharded_run / f"{stem}.pt")
    out = data.parent / "sharded_resumed_on_1"
    out.mkdir()
    shutil.copy(fsdp_sharded_run / f"{stem}.pt", out)
    shutil.copytree(fsdp_sharded_run / f"{stem}.dcp", out / f"{stem}.dcp")
    assert main(["train", *train_args(data, out, "--batch_size=8", "--checkpoint.sharded=true"), "--resume", "auto"]) == 0
    assert max_difference(weights(out, "vit_tiny_patch16-2_4"),
                          weights(one_process_run, "vit_tiny_patch16-2_4")) <= WEIGHT_TOLERANCE
    assert not list(out.glob(".*partial"))  # the temporary shard folders were all renamed into place


def test_consolidated_checkpoint_of_one_process_resumes_under_fsdp_on_two(data, one_process_run, two_process_run):
    out = data.parent / "fsdp_resumed_on_2"
    out.mkdir()
    shutil.copy(one_process_run / "vit_tiny_patch16-1_4.pt", out)
    check_ok(torchrun(2, "train", *train_args(data, out, "--batch_size=4", "--distributed.strategy=fsdp"),
                      "--resume", "auto"))
    assert max_difference(weights(out, "vit_tiny_patch16-2_4"),
                          weights(two_process_run, "vit_tiny_patch16-2_4")) <= WEIGHT_TOLERANCE
    # FSDP gathered the full model and optimizer into rank 0's file: a plain single-process state.
    state = torch.load(out / "vit_tiny_patch16-2_4.pt", weights_only=True)
    plain = load_file(one_process_run / "vit_tiny_patch16-2_4.safetensors")
    assert {name: tuple(t.shape) for name, t in state["model"].items()} == {n: tuple(t.shape) for n, t in plain.items()}
    assert state["optimizer"]["state"]["blocks.0.attn.qkv.weight"]["exp_avg"].shape == plain["blocks.0.attn.qkv.weight"].shape


# ---- elastic restart ----------------------------------------------------------------------------------------------
def _worker_pids(launcher_pid: int) -> list[int]:
    """The processes torchrun started (its children), found through /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == launcher_pid:
                children.append(int(entry))
    return sorted(children)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_a_killed_rank_restarts_under_max_restarts_and_resumes_from_the_newest_checkpoint(data, tmp_path):
    out = tmp_path / "elastic"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               "--max-restarts=1", "-m", "vitkit", "train",
               *train_args(data, out, "--batch_size=4", "--max_epoch=10")]  # no --resume: a restart implies it
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not list(out.glob("*.pt")) and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.02)
        workers = _worker_pids(launcher.pid)
        assert len(workers) == 2, "torchrun's two workers should be running when the first checkpoint appears"
        os.kill(workers[-1], signal.SIGKILL)
        output, _ = launcher.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output[-3000:]
    # Each start writes its own timestamped log: the restarted one continued from a checkpoint, not from scratch.
    rank0_logs = [path.read_text() for path in sorted(out.glob("*_rank_0.log"))]
    assert len(rank0_logs) == 2 and "resumed from" in rank0_logs[-1]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["epoch"] == 9 and (out / "vit_tiny_patch16-10_4.pt").is_file()


def test_a_restarted_process_continues_from_the_newest_checkpoint_not_the_one_it_was_told(data, one_process_run,
                                                                                        tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    for stem in ("vit_tiny_patch16-1_4", "vit_tiny_patch16-2_4"):
        shutil.copy(one_process_run / f"{stem}.pt", out)
    args = train_args(data, out, "--batch_size=8", "--max_epoch=3", f"--train.resume={out / 'vit_tiny_patch16-1_4.pt'}")
    from vitkit.config import load_config

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    trainer = Trainer(load_config(None, args))
    assert trainer.progress.epoch == 2  # from -2_4, the job's newest; the command's -1_4 would redo an epoch
    trainer.log.close()


def test_pruning_removes_shards_whose_checkpoint_was_never_completed(tmp_path):
    from vitkit.engine.checkpoint import prune_checkpoints

    for stem in ("vit-1_4", "vit-2_4"):
        (tmp_path / f"{stem}.pt").write_bytes(b"")
        (tmp_path / f"{stem}.dcp").mkdir()
    (tmp_path / "vit-3_4.dcp").mkdir()  # renamed into place, then the run died before writing vit-3_4.pt
    (tmp_path / ".vit-3_8.dcp.partial").mkdir()  # died while writing shards
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["vit-2_4.dcp", "vit-2_4.pt"]


def test_a_stop_signal_to_one_rank_stops_every_rank_at_the_same_step(data, two_process_run, tmp_path):
    out = tmp_path / "stopped"
    # Rank 1 alone gets SIGTERM after its second step; rank 0 learns of it when the ranks agree at the epoch's end.
    stopped = torchrun(2, "train", *train_args(data, out, "--batch_size=4"),
                       env={"VITKIT_FAULT": "step_end:2", "VITKIT_FAULT_SIGNAL": "TERM", "VITKIT_FAULT_RANK": "1"})
    assert stopped.returncode != 0
    assert stopped.stderr.count("vitkit: stopped: received SIGTERM: wrote vit_tiny_patch16-1_4.pt") == 2  # both ranks
    assert [path.name for path in sorted(out.glob("*.pt"))] == ["vit_tiny_patch16-1_4.pt"]
    check_ok(torchrun(2, "train", *train_args(data, out, "--batch_size=4", "--train.resume=auto")))
    final, expected = weights(out, "vit_tiny_patch16-2_4"), weights(two_process_run, "vit_tiny_patch16-2_4")
    assert all(torch.equal(final[key], expected[key]) for key in expected)


# The original's 8-device Ascend rank table, as hccl_tools.py writes it (abridged to one device).
HCCL_RANK_TABLE = {
    "version": "1.0", "server_count": "1",
    "server_list": [{"server_id": "10.0.0.1", "device": [{"device_id": "0", "device_ip": "192.168.100.101",
                                                           "rank_id": "0"}], "host_nic_ip": "reserve"}],
    "status": "completed",
}


def test_the_originals_rank_table_first_is_one_line_naming_the_config(tmp_path):
    from pathlib import Path

    rank_table = tmp_path / "hccl_8p.json"
    rank_table.write_text(json.dumps(HCCL_RANK_TABLE, indent=4))
    config = tmp_path / "vit_config.yml"
    config.write_text("batch_size: 8\n")
    script = Path(__file__).resolve().parents[1] / "scripts" / "run_train_distribute.sh"
    result = subprocess.run(["bash", str(script), str(rank_table), str(config)], capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT_S, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("vitkit: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "rank table" in result.stderr and "not needed" in result.stderr
    assert f"{script.name} {config}" in result.stderr  # the command to run instead
    assert "unknown config key" not in result.stderr and result.stdout == ""
