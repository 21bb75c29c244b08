"""Gradient accumulation (train.accum_steps): micro-batches make the update of one big batch, the run counts optimizer
steps (schedule, step lines, checkpoints, resume), and under DDP only a step's last backward all-reduces."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from conftest import tiny_config
from test_distributed import check_ok, max_difference, torchrun, train_args
from vitkit.cli import main
from vitkit.engine.trainer import Trainer, train
from vitkit.errors import VitkitError

NO_DROPOUT = ("--model.drop_rate=0", "--model.proj_drop_rate=0", "--model.mlp_drop_rate=0", "--model.drop_path_rate=0",
              "--mixup=0")
# Weights after the same steps summed in another order: float round-off only, below AdamW's lr-sized steps.
WEIGHT_TOLERANCE = 1e-6
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no gloo backend")


def test_four_micro_batches_of_8_make_the_update_of_one_batch_of_32(tiny_dataset, tmp_path):
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(32) % 3
    accumulated = Trainer(tiny_config(tiny_dataset, tmp_path / "a", *NO_DROPOUT, "--train.accum_steps=4",
                                      "--max_epoch=1"))
    whole = Trainer(tiny_config(tiny_dataset, tmp_path / "b", *NO_DROPOUT, "--batch_size=32", "--max_epoch=1"))
    before = {name: value.clone() for name, value in whole.model.state_dict().items()}
    assert all(torch.equal(before[name], value) for name, value in accumulated.model.state_dict().items())

    losses = [float(accumulated._train_step(images[i:i + 8], labels[i:i + 8])) for i in range(0, 32, 8)]
    whole_loss = float(whole._train_step(images, labels))
    # The mean of the micro-batch means is the batch mean; one optimizer and schedule step was taken, not four.
    assert sum(losses) / 4 == pytest.approx(whole_loss, rel=1e-6)
    assert accumulated.scheduler.steps_done == whole.scheduler.steps_done == 1
    assert accumulated.optimizer.state[next(iter(accumulated.model.parameters()))]["step"] == 1
    for (name, param), other in zip(accumulated.model.named_parameters(), whole.model.parameters()):
        # Sums of the same terms in another order: equal to float32 round-off of the gradient's own scale.
        assert (param.grad - other.grad).abs().max() <= 1e-5 * other.grad.abs().max(), name
    moved = {name: (value - before[name]).abs().max().item() for name, value in whole.model.state_dict().items()}
    assert max(moved.values()) > 1e-4  # the step changed the weights, so equal weights mean equal updates
    assert max_difference(accumulated.model.state_dict(), whole.model.state_dict()) <= WEIGHT_TOLERANCE


def test_inner_micro_batches_leave_the_weights_and_schedule_alone(tiny_dataset, tmp_path):
    trainer = Trainer(tiny_config(tiny_dataset, tmp_path / "run", "--train.accum_steps=3", "--max_epoch=1"))
    before = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    images, labels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        trainer._train_step(images, labels)
        assert all(torch.equal(before[name], value) for name, value in trainer.model.state_dict().items())
        assert trainer.scheduler.steps_done == 0
    trainer._train_step(images, labels)
    assert trainer.scheduler.steps_done == 1
    assert not all(torch.equal(before[name], value) for name, value in trainer.model.state_dict().items())


def test_a_run_counts_optimizer_steps_and_ends_with_the_weights_of_the_big_batch(tiny_dataset, tmp_path):
    # 36 images: 9 micro-batches of 4, 4 optimizer steps of 2 (the 9th is left, as a short batch is), and
    # batch 8 gives the same 4 steps over the same 8 images each.
    accumulated, whole = tmp_path / "accumulated", tmp_path / "whole"
    common = (*NO_DROPOUT, "--logging.log_interval=1")
    assert main(["train", *train_args(tiny_dataset, accumulated, *common, "--batch_size=4",
                                      "--train.accum_steps=2")]) == 0
    assert main(["train", *train_args(tiny_dataset, whole, *common, "--batch_size=8")]) == 0
    assert sorted(path.name for path in accumulated.glob("*.pt")) == ["vit_tiny_patch16-1_4.pt",
                                                                      "vit_tiny_patch16-2_4.pt"]
    steps = [json.loads(line) for line in (accumulated / "steps.jsonl").read_text().splitlines()]
    whole_steps = [json.loads(line) for line in (whole / "steps.jsonl").read_text().splitlines()]
    assert [(r["step"], r["steps"], r["global_step"]) for r in steps] == [(s, 4, e * 4 + s) for e in (0, 1)
                                                                            for s in (1, 2, 3, 4)]
    assert [r["lr"] for r in steps] == [r["lr"] for r in whole_steps]  # the schedule in optimizer steps
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in whole_steps], rel=1e-5)
    epochs = [json.loads(line) for line in (accumulated / "metrics.jsonl").read_text().splitlines()]
    assert [r["fps"] > 0 and r["step_time"] == pytest.approx(r["epoch_time"] / 4) for r in epochs] == [True, True]
    final = "vit_tiny_patch16-2_4.safetensors"
    assert max_difference(load_file(accumulated / final), load_file(whole / final)) <= WEIGHT_TOLERANCE
    state = torch.load(accumulated / "vit_tiny_patch16-2_4.pt", weights_only=True)
    assert state["scheduler"]["steps_done"] == 8 and state["progress"]["step_samples"] == 8


def test_a_run_killed_inside_an_accumulation_window_resumes_exactly(tiny_dataset, tmp_path, monkeypatch):
    # Checkpoints fall between optimizer steps only: the one at global step 6 (epoch 2, step 2) is where the run
    # continues; the kill comes at the 15th micro-batch, the first of step 8, half-way through its window.
    # Dropout and mixup stay on: their draws must continue exactly too.
    extra = ("--max_epoch=3", "--batch_size=4", "--train.accum_steps=2", "--checkpoint.save_checkpoint_steps=3",
             "--mixup=0.2", "--keep_checkpoint_max=10")
    train(tiny_config(tiny_dataset, tmp_path / "whole", *extra))
    original_step = Trainer._train_step
    calls = {"n": 0}

    def dying_step(self, images, labels):
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return original_step(self, images, labels)

    monkeypatch.setattr(Trainer, "_train_step", dying_step)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_dataset, killed, *extra))
    assert sorted(path.name for path in killed.glob("*.pt")) == ["vit_tiny_patch16-1_3.pt", "vit_tiny_patch16-1_4.pt",
                                                                 "vit_tiny_patch16-2_2.pt"]
    monkeypatch.setattr(Trainer, "_train_step", original_step)
    train(tiny_config(tiny_dataset, killed, *extra, "--train.resume=auto"))
    whole = load_file(tmp_path / "whole" / "vit_tiny_patch16-3_4.safetensors")
    resumed = load_file(killed / "vit_tiny_patch16-3_4.safetensors")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_a_step_bigger_than_the_data_set_is_one_error_line(tiny_dataset, tmp_path):
    with pytest.raises(VitkitError, match="fewer than one step of 8 x 5 .*train.accum_steps"):
        Trainer(tiny_config(tiny_dataset, tmp_path / "run", "--train.accum_steps=5"))


def test_accum_steps_has_an_upper_bound(tiny_dataset, tmp_path):
    with pytest.raises(VitkitError, match="accum_steps"):
        tiny_config(tiny_dataset, tmp_path / "run", "--train.accum_steps=100000")


# ---- DDP: 2 gloo processes on the CPU ---------------------------------------------------------------------------
_SYNC_PROBE = """
import os, sys, torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from conftest import tiny_config
from vitkit.engine.trainer import Trainer, train
from pathlib import Path

data, out = Path(sys.argv[1]), Path(sys.argv[2])
trainer = Trainer(tiny_config(data, out, "--batch_size=2", "--train.accum_steps=3", "--max_epoch=1",
                              "--distributed.timeout_s=60"))
all_reduces = []

def counting_hook(state, bucket):
    all_reduces.append(1)
    return allreduce_hook(None, bucket)

trainer.train_model.register_comm_hook(None, counting_hook)
counts = []
for micro_batch in range(6):
    trainer._train_step(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1]))
    counts.append(len(all_reduces))
if trainer.dist.rank == 0:
    print("COUNTS", counts, flush=True)
# The reducer holds a Python comm hook; tearing it down at interpreter exit can abort (std::terminate) on gloo, so
# the probe leaves once both ranks have counted, without that teardown.
torch.distributed.barrier()
os._exit(0)
"""


@needs_gloo
def test_under_ddp_only_the_last_micro_batch_of_a_step_all_reduces(tiny_dataset, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(_SYNC_PROBE)
    tests = str(Path(__file__).parent)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script),
               str(tiny_dataset), str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": tests})
    check_ok(result)
    counts = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("COUNTS"))[7:])
    per_step = counts[2]
    assert per_step > 0 and counts == [0, 0, per_step, per_step, per_step, 2 * per_step]


@needs_gloo
def test_two_processes_with_accumulation_ema_layer_decay_freezing_checkpointing_match_one(tiny_dataset, tmp_path):
    # 2 processes x 2 images x 2 micro-batches and 1 process x 4 images x 2 micro-batches: 8 images a step, the
    # same 8 (ranks read interleaved positions of one permutation). The EMA, layer decay, freezing and activation
    # checkpointing ride along, so that each is checked under torchrun with one launch.
    two, one = tmp_path / "two", tmp_path / "one"
    features = ("--train.accum_steps=2", "--train.ema_decay=0.9", "--optimizer.layer_decay=0.7", "--train.freeze=1",
                "--model.grad_checkpointing=true")
    check_ok(torchrun(2, "train", *train_args(tiny_dataset, two, "--batch_size=2", *features)))
    assert main(["train", *train_args(tiny_dataset, one, "--batch_size=4", *features)]) == 0
    for final in ("vit_tiny_patch16-2_4.safetensors", "vit_tiny_patch16-2_4.ema.safetensors"):
        assert max_difference(load_file(two / final), load_file(one / final)) <= WEIGHT_TOLERANCE
    start = Trainer(tiny_config(tiny_dataset, tmp_path / "start", "--max_epoch=1"))
    trained = load_file(two / "vit_tiny_patch16-2_4.safetensors")
    for name, value in start.model.state_dict().items():  # built from the same seed: the frozen start
        frozen = name.startswith(("patch_embed.", "cls_token", "pos_embed", "blocks.0."))
        assert torch.equal(trained[name], value) == frozen, name
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    one_records = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["ema_accuracy"] for r in records] == [r["ema_accuracy"] for r in one_records]
