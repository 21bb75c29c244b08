"""Step lines, steps.jsonl and TensorBoard event files, read back with TensorBoard's own reader."""
import json
import re
import time

import pytest
import torch

from conftest import tiny_config
from vitkit.engine.trainer import Trainer

STEP_LINE = re.compile(
    r"INFO:epoch\[(\d+)\], step\[(\d+)/(\d+)\], loss=([\d.]+), lr=([\d.]+), img/s=([\d.]+), data_wait=([\d.]+)%, "
    r"eta_epoch=\d+:\d\d:\d\d, eta_run=\d+:\d\d:\d\d, grad_norm=([\d.e+-]+)(, loss_scale=(\d+))?$"
)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def scalars(folder):
    """{tag: [(step, value)]} from the event files, through TensorBoard's own reader."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    reader = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    reader.Reload()
    return {tag: [(event.step, event.value) for event in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def test_step_lines_reach_the_log_file_every_interval(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(tiny_dataset, out, "--logging.log_interval=2", "--train.precision=fp16")).fit()
    log_file = next(out.glob("*_rank_0.log"))
    lines = [STEP_LINE.search(line) for line in log_file.read_text().splitlines()]
    found = [match.groups() for match in lines if match]
    # 36 images / batch 8 = 4 steps an epoch, 2 epochs, a line every 2 steps.
    assert [(int(e), int(s), int(n)) for e, s, n, *_ in found] == [(0, 2, 4), (0, 4, 4), (1, 2, 4), (1, 4, 4)]
    assert all(match[-1] == "1024" for match in found)  # the fp16 loss scale
    records = read_jsonl(out / "steps.jsonl")
    assert [r["global_step"] for r in records] == [2, 4, 6, 8]
    epochs = read_jsonl(out / "metrics.jsonl")
    # The last step line of an epoch carries the epoch's mean loss, which the epoch line prints too.
    assert records[1]["loss"] == pytest.approx(epochs[0]["loss"], rel=1e-9)
    assert records[3]["loss"] == pytest.approx(epochs[1]["loss"], rel=1e-9)
    for record, match in zip(records, found):
        assert f"{record['loss']:.6f}" == match[3] and 0.0 <= record["data_wait"] <= 1.0 and record["img_s"] > 0
        assert record["grad_norm"] > 0


def test_no_step_lines_with_interval_zero(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(tiny_dataset, out, "--logging.log_interval=0", "--max_epoch=1")).fit()
    assert not any(STEP_LINE.search(line) for line in next(out.glob("*_rank_0.log")).read_text().splitlines())
    assert not (out / "steps.jsonl").exists()


def test_the_grad_norm_is_the_gradients_global_norm(tiny_dataset, tmp_path):
    trainer = Trainer(tiny_config(tiny_dataset, tmp_path / "run", "--max_epoch=1"))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    trainer._train_step(images, torch.tensor([0, 1, 2, 0]))
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    assert trainer._grad_norm() == pytest.approx(float(grads.double().norm()), rel=1e-5)


def test_tensorboard_scalars_equal_the_jsonl_records(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(tiny_dataset, out, "--logging.log_interval=2")).fit()
    board = scalars(out / "tensorboard")
    steps, epochs = read_jsonl(out / "steps.jsonl"), read_jsonl(out / "metrics.jsonl")
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/img_s", "img_s"),
                     ("train/data_wait", "data_wait"), ("train/grad_norm", "grad_norm")):
        assert [step for step, _ in board[tag]] == [r["global_step"] for r in steps]
        assert [value for _, value in board[tag]] == pytest.approx([r[key] for r in steps], rel=1e-6)
    assert "train/loss_scale" not in board  # fp32: no scaler
    assert [value for _, value in board["eval/top1"]] == pytest.approx([r["accuracy"] for r in epochs], rel=1e-6)
    assert [value for _, value in board["epoch/loss"]] == pytest.approx([r["loss"] for r in epochs], rel=1e-6)
    assert [step for step, _ in board["eval/top5"]] == [4, 8]


def test_a_resumed_run_continues_the_curves_without_duplicates(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(tiny_dataset, out, "--logging.log_interval=1", "--max_epoch=3")).fit()
    first_epoch = next(out.glob("vit_tiny_patch16-1_4.pt"))
    # Back to the end of epoch 1, as after a kill there: epochs 2 and 3 run again.
    Trainer(tiny_config(tiny_dataset, out, "--logging.log_interval=1", "--max_epoch=3",
                        f"--train.resume={first_epoch}")).fit()
    board = scalars(out / "tensorboard")
    assert [step for step, _ in board["train/loss"]] == list(range(1, 13))
    assert [step for step, _ in board["eval/top1"]] == [4, 8, 12]
    assert [r["global_step"] for r in read_jsonl(out / "steps.jsonl")] == list(range(1, 13))
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]


def test_tensorboard_off(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(tiny_dataset, out, "--logging.tensorboard=false", "--max_epoch=1")).fit()
    assert not (out / "tensorboard").exists()


def test_a_tensorboard_server_on_loopback_serves_the_runs_scalars(tiny_dataset, tmp_path):
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    Trainer(tiny_config(tiny_dataset, out, "--logging.log_interval=2", "--max_epoch=1")).fit()
    expected = [r["loss"] for r in read_jsonl(out / "steps.jsonl")]
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(out / "tensorboard"), "--host", "127.0.0.1",
         "--port", "0", "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )
    try:
        address = None
        deadline = time.monotonic() + 60
        while address is None and time.monotonic() < deadline:  # it prints its address once it listens
            line = server.stdout.readline()
            found = re.search(r"http://(127\.0\.0\.1:\d+)/", line)
            address = found and found.group(1)
            assert line or server.poll() is None, "tensorboard exited before listening"
        assert address, "tensorboard did not start within 60 s"
        url = f"http://{address}/data/plugin/scalars/scalars?run=.&tag=train/loss"
        served = []
        for _ in range(30):  # bounded: the first scan of the folder may still be running
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    served = json.load(response)
            except urllib.error.HTTPError:  # the run is not loaded yet
                served = []
            if served:
                break
            time.sleep(1)
        assert [step for _, step, _ in served] == [2, 4]
        assert [value for _, _, value in served] == pytest.approx(expected, rel=1e-6)
    finally:
        server.terminate()
        server.wait(timeout=30)


def wandb_history(path):
    """{step: {key: value}} of an offline W&B run's .wandb file: LevelDB-log framing (7-byte file header, 32 KiB
    blocks, 7-byte record headers: crc32, little-endian length, type) around wandb's own Record protobufs."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending, history = 7, b"", {}
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        if left_in_block < 7:  # a block's tail too short for a header is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item}
                history.setdefault(items["_step"], {}).update(items)
    return history


def test_an_offline_wandb_run_gets_the_same_scalars(tiny_dataset, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    Trainer(tiny_config(tiny_dataset, out, "--logging.log_interval=2", "--logging.wandb=true",
                        "--logging.tensorboard=false")).fit()
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    assert run_file.name == f"run-{(out / 'wandb_run_id').read_text().strip()}.wandb"
    history = wandb_history(run_file)
    steps = read_jsonl(out / "steps.jsonl")
    assert sorted(history) == [r["global_step"] for r in steps]
    for record in steps:
        assert history[record["global_step"]]["train/loss"] == pytest.approx(record["loss"], rel=1e-9)
        assert history[record["global_step"]]["train/lr"] == pytest.approx(record["lr"], rel=1e-9)
    epochs = read_jsonl(out / "metrics.jsonl")
    assert [history[s]["eval/top1"] for s in (4, 8)] == pytest.approx([r["accuracy"] for r in epochs], rel=1e-9)
    assert not (out / "tensorboard").exists()


def test_a_resumed_run_logs_to_the_same_wandb_run(tiny_dataset, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    flags = ("--logging.log_interval=2", "--logging.wandb=true", "--logging.tensorboard=false")
    Trainer(tiny_config(tiny_dataset, out, *flags, "--max_epoch=1")).fit()
    run_id = (out / "wandb_run_id").read_text().strip()
    time.sleep(1.1)  # W&B names an offline run's folder by the second it started
    Trainer(tiny_config(tiny_dataset, out, *flags, "--max_epoch=2", "--train.resume=auto")).fit()
    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {path.name for path in files} == {f"run-{run_id}.wandb"}
    assert sorted(wandb_history(files[1])) == [6, 8]  # the second part of the run: epoch 2's steps
