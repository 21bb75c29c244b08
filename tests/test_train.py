"""`vitkit train` and `vitkit eval` end to end on small real image folders."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import vitkit
from conftest import TINY_MODEL, tiny_config, whole_and_resumed_runs
from vitkit.cli import main
from vitkit.data.transforms import eval_transform, normalize_batch
from vitkit.engine.runlog import format_epoch_line
from vitkit.engine.trainer import Trainer, train
from vitkit.errors import VitkitError

# The original's lines (src/callback.py), as regular expressions over our console output.
EPOCH_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d:INFO:epoch\[(\d+)\], epoch time: \d+\.\d\ds, per step time: \d+\.\d{4}s, "
    r"loss=\d+\.\d{6}, lr=\d+\.\d{6}, fps=\d+\.\d\d(, accuracy=\d\.\d{6}, eval_cost=\d+\.\d\d)?$"
)


def test_epoch_line_matches_the_originals_format_byte_for_byte():
    # The README of the original shows: epoch[0], epoch time: 149.10s, per step time: 0.2386s, loss=6.729037, ...
    line = format_epoch_line(0, 149.1, 0.2386, 6.729037, 0.000089, 8584.97, 0.01494, 1.58)
    assert line == ("epoch[0], epoch time: 149.10s, per step time: 0.2386s, loss=6.729037, lr=0.000089, "
                    "fps=8584.97, accuracy=0.014940, eval_cost=1.58")


def test_training_prints_the_originals_lines_and_writes_checkpoints_and_metrics(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train(tiny_config(tiny_dataset, out))
    lines = capsys.readouterr().out.splitlines()
    assert any(line.endswith("INFO:Args:") for line in lines)
    assert any(line == "--> batch_size: 8" for line in lines)
    epochs = [EPOCH_LINE.match(line) for line in lines if ":INFO:epoch[" in line]
    assert [m[1] for m in epochs] == ["0", "1"] and all(m[2] for m in epochs)  # standalone runs evaluate too
    assert any(re.search(r"INFO:training time used=\d+\.\d\ds$", line) for line in lines)
    assert any(re.search(r"INFO:last_metric\[[0-9.]+\]$", line) for line in lines)
    assert any(re.search(r"INFO:ip\[.+\], mean_fps\[\d+\.\d\d\]$", line) for line in lines)
    # 36 training images, batch 8, remainder dropped: 4 steps per epoch, names {backbone}-{epoch}_{step}.
    assert sorted(p.name for p in out.glob("*.pt")) == ["vit_tiny_patch16-1_4.pt", "vit_tiny_patch16-2_4.pt"]
    assert (out / "vit_tiny_patch16-2_4.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and records[-1]["eval_images"] == 11
    assert summary["best_acc"] == max(r["accuracy"] for r in records)
    assert list(out.glob("*_rank_0.log"))


def test_loss_logged_is_the_epoch_mean_not_the_last_step(tiny_dataset, tmp_path, monkeypatch):
    seen = []
    original_step = Trainer._train_step

    def recording_step(self, images, labels):
        loss = original_step(self, images, labels)
        seen.append(loss.item())
        return loss

    monkeypatch.setattr(Trainer, "_train_step", recording_step)
    out = tmp_path / "run"
    train(tiny_config(tiny_dataset, out, "--max_epoch=1"))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["loss"] == pytest.approx(sum(seen) / len(seen), rel=1e-6)


def test_same_seed_gives_bit_identical_weights(tiny_dataset, tmp_path):
    for name in ("a", "b"):
        train(tiny_config(tiny_dataset, tmp_path / name, "--mixup=0.2", "--autoaugment=1"))
    first = load_file(tmp_path / "a" / "vit_tiny_patch16-2_4.safetensors")
    second = load_file(tmp_path / "b" / "vit_tiny_patch16-2_4.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_killed_mid_epoch_and_resumed_ends_with_the_same_weights(tiny_dataset, tmp_path, monkeypatch, workers):
    extra = ("--max_epoch=3", "--checkpoint.save_checkpoint_steps=3", "--mixup=0.2", f"--train_num_workers={workers}",
             "--keep_checkpoint_max=10")
    # Killed after the step-6 checkpoint, in epoch 2.
    whole_and_resumed_runs(tiny_dataset, tmp_path, monkeypatch, extra, die_at_call=8)

    whole = load_file(tmp_path / "whole" / "vit_tiny_patch16-3_4.safetensors")
    resumed = load_file(tmp_path / "killed" / "vit_tiny_patch16-3_4.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_new_run_never_overwrites_another_runs_checkpoints(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_dataset, out, "--max_epoch=1"))
    before = (out / "vit_tiny_patch16-1_4.pt").read_bytes()
    with pytest.raises(VitkitError, match="already holds another run's checkpoints"):
        train(tiny_config(tiny_dataset, out, "--max_epoch=1"))
    assert (out / "vit_tiny_patch16-1_4.pt").read_bytes() == before
    train(tiny_config(tiny_dataset, out, "--max_epoch=1", "--checkpoint.overwrite=true"))


def test_keep_checkpoint_max_keeps_the_newest_and_the_best(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_dataset, out, "--max_epoch=4", "--keep_checkpoint_max=1"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best_epoch = max(range(4), key=lambda e: (records[e]["accuracy"], -e))
    kept = sorted(p.name for p in out.glob("*.pt"))
    assert "vit_tiny_patch16-4_4.pt" in kept
    assert f"vit_tiny_patch16-{best_epoch + 1}_4.pt" in kept
    assert len(kept) <= 2


def test_a_corrupt_image_is_skipped_with_a_warning_and_counted(tiny_dataset, tmp_path):
    (tiny_dataset / "train" / "bee" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="broken.png"):
        train(tiny_config(tiny_dataset, out, "--max_epoch=1", "--batch_size=37"))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["failed_images"] == 1


def test_eval_counts_every_image_once_and_matches_per_image_predictions(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(tiny_dataset, out, "--max_epoch=1"))
    capsys.readouterr()
    weights = out / "vit_tiny_patch16-1_4.safetensors"
    # Independent truth: each image alone through the model, the label from its folder.
    model = vitkit.load_model(weights)
    transform = eval_transform(32)
    from torchvision.io import ImageReadMode, decode_image

    correct = 0
    images = sorted((tiny_dataset / "val").glob("*/*.png"))
    for path in images:
        image = transform(decode_image(str(path), mode=ImageReadMode.RGB))
        with torch.no_grad():
            predicted = model(normalize_batch(image[None])).argmax(1).item()
        correct += predicted == ["ant", "bee", "cat"].index(path.parent.name)
    assert main(["eval", "--model", str(weights), "--data", str(tiny_dataset / "val"), "--eval_batch_size=4",
                 "--eval_image_size=32", "--eval_num_workers=0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["total"] == len(images) == 11  # 11 is no multiple of 4: nothing dropped, nothing padded
    assert result["correct1"] == correct and result["top5"] == 1.0  # 3 classes: the truth is always in the top 5
    assert main(["eval", "--model", str(weights), "--data", str(tiny_dataset / "val"), "--eval_image_size=32",
                 "--eval_num_workers=0"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^accuracy=\d\.\d{6}$", text, re.M) and f"accuracy={correct / 11:.6f}" in text


def test_pretrained_with_another_class_count_gets_a_new_head(tiny_dataset, tmp_path):
    source = vitkit.create_model("vit_tiny_patch16", patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                                 image_size=48, num_classes=7)
    vitkit.save_model(source, tmp_path / "source.safetensors")
    trainer = Trainer(tiny_config(tiny_dataset, tmp_path / "run", f"--pretrained={tmp_path / 'source.safetensors'}"))
    assert trainer.model.head.weight.shape == (3, 32)
    assert torch.equal(trainer.model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert trainer.model.pos_embed.shape == (1, 17, 32)  # resampled from 48 px (37 tokens) to 32 px (17 tokens)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu_with_fp32_weights(tiny_dataset, tmp_path, precision):
    trainer = Trainer(tiny_config(tiny_dataset, tmp_path / "run", f"--train.precision={precision}", "--max_epoch=1",
                                  "--loss_scale=1024"))
    before = trainer.model.blocks[0].mlp.fc1.weight.detach().clone()
    summary = trainer.fit()
    assert summary["global_step"] == 4
    weight = trainer.model.blocks[0].mlp.fc1.weight
    assert weight.dtype == torch.float32 and torch.isfinite(weight).all() and not torch.equal(weight, before)
    if precision == "fp16":
        assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() <= 1024.0  # the original's 1024 starts it


def test_ce_smooth_mixup_works_with_mixup_off(tiny_dataset, tmp_path):
    summary = train(tiny_config(tiny_dataset, tmp_path / "run", "--mixup=0", "--loss_name=ce_smooth_mixup",
                                "--max_epoch=1"))
    assert summary["global_step"] == 4


@pytest.mark.parametrize("interval, offset, max_epoch, expected", [
    (1, -1, 3, [0, 1, 2]),
    (2, -1, 5, [0, 2, 4]),  # offset -1 becomes max_epoch % interval = 1: epochs with (e+1) % 2 == 1
    (2, 0, 4, [1, 3]),
])
def test_eval_cadence_follows_the_originals_formula(tiny_dataset, tmp_path, interval, offset, max_epoch, expected):
    trainer = Trainer(tiny_config(tiny_dataset, tmp_path / "run", f"--eval_interval={interval}",
                                  f"--eval_offset={offset}", f"--max_epoch={max_epoch}"))
    assert [e for e in range(max_epoch) if trainer._should_evaluate(e)] == expected


@pytest.mark.parametrize("args, fragment", [
    (["--dataset_path=/no/such/folder"], "/no/such/folder"),
    (["--batch_size=-4"], "batch_size"),
    (["--train_image_size=30"], "not a multiple of patch_size 8"),
    (["--resume", "/no/such.pt"], "does not exist"),
])
def test_bad_training_input_is_one_line_and_exit_2(tiny_dataset, tmp_path, capsys, args, fragment):
    base = [f"--dataset_path={tiny_dataset / 'train'}", f"--eval_path={tiny_dataset / 'val'}",
            f"--save_checkpoint_path={tmp_path / 'run'}", "--class_num=3", "--batch_size=8", *TINY_MODEL]
    assert main(["train", *base, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitkit: error: ") and err.count("\n") == 1 and fragment in err


def test_missing_validation_folder_fails_before_training(tiny_dataset, tmp_path):
    shutil.rmtree(tiny_dataset / "val")
    with pytest.raises(VitkitError, match="val"):
        Trainer(tiny_config(tiny_dataset, tmp_path / "run"))


def test_profiler_writes_a_trace_and_says_where(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(tiny_dataset, out, "--open_profiler=1", "--max_epoch=1", "--batch_size=4"))
    assert (out / "profile_rank0.json").is_file()
    assert "profiler trace written to" in capsys.readouterr().out


def test_a_checkpoint_without_a_loss_scaler_resumes_into_fp16(tiny_dataset, tmp_path):
    # A bf16 (or fp32) run's scaler is off and saves an empty state; an fp16 resume starts its own at loss_scale.
    Trainer(tiny_config(tiny_dataset, tmp_path / "run", "--train.precision=bf16", "--max_epoch=1")).fit()
    trainer = Trainer(tiny_config(tiny_dataset, tmp_path / "run", "--train.precision=fp16", "--max_epoch=2",
                                  "--train.resume=auto", "--loss_scale=512"))
    assert trainer.progress.epoch == 1 and trainer.scaler.get_scale() == 512.0
    assert trainer.fit()["global_step"] == 8


class _CompilesOnFirstCall(torch.nn.Module):
    """Stands in for torch.compile's module: the first call takes COMPILE_SECONDS longer, as compiling does."""

    COMPILE_SECONDS = 0.3

    def __init__(self, inner):
        super().__init__()
        self.inner, self.compiled = inner, False

    def forward(self, images):
        if not self.compiled:
            import time

            time.sleep(self.COMPILE_SECONDS)
            self.compiled = True
        return self.inner(images)


def test_compile_time_is_the_measured_first_compiled_step_and_absent_without_compile(tiny_dataset, tmp_path, capsys,
                                                                                   monkeypatch):
    monkeypatch.setattr(torch, "compile", _CompilesOnFirstCall)
    train(tiny_config(tiny_dataset, tmp_path / "compiled", "--max_epoch=1", "--train.compile=true"))
    times = [float(m[1]) for line in capsys.readouterr().out.splitlines()
             if (m := re.search(r"INFO:compile time used=(\d+\.\d\d)s$", line))]
    assert len(times) == 1 and times[0] >= _CompilesOnFirstCall.COMPILE_SECONDS
    train(tiny_config(tiny_dataset, tmp_path / "eager", "--max_epoch=1"))
    assert "compile time" not in capsys.readouterr().out  # nothing was compiled: no made-up 0.00s
