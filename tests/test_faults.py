"""Runs that go wrong: a diverging loss, unreadable data, a full disk, a corrupt newest checkpoint, leftovers of a
killed save, links that loop, and preemption by SIGTERM / SIGUSR1."""
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_MODEL, tiny_config, write_image_folder
from vitkit.data.folder import list_image_folder
from vitkit.engine import checkpoint as ckpt
from vitkit.engine.trainer import Trainer, train
from vitkit.errors import VitkitError


def cli_args(data, out, *extra):
    """tiny_config's settings as `vitkit train` flags, nothing random but the data order and flips."""
    return [*TINY_MODEL, f"--dataset_path={data / 'train'}", f"--eval_path={data / 'val'}",
            f"--save_checkpoint_path={out}", "--class_num=3", "--batch_size=8", "--eval_batch_size=5",
            "--train_num_workers=0", "--eval_num_workers=0", "--max_epoch=3", "--warmup_epochs=1", "--lr_max=0.001",
            "--save_checkpoint_epochs=1", "--autoaugment=0", "--mixup=0", "--keep_checkpoint_max=10",
            "--logging.progress=plain", "--logging.tensorboard=false", *extra]


def run_vitkit(args, env=None, limit=None) -> subprocess.CompletedProcess:
    def limits():
        if limit is not None:  # a file size limit stands in for a full disk: writes past it fail with EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "vitkit", "train", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, preexec_fn=limits)


def all_finite(path) -> bool:
    return all(torch.isfinite(tensor).all() for tensor in load_file(path).values())


def test_a_diverging_run_stops_at_the_first_nonfinite_loss_and_saves_nothing_of_it(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(VitkitError, match=r"loss was not finite at step \d+ \(epoch 0\).*no checkpoint was written"):
        train(tiny_config(tiny_dataset, out, "--lr_max=1e30", "--warmup_epochs=0"))
    assert ckpt.list_checkpoints(out) == []


def test_divergence_after_a_good_epoch_keeps_that_checkpoint(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_dataset, out, "--max_epoch=1"))
    with pytest.raises(VitkitError, match="the last good checkpoint is .*vit_tiny_patch16-1_4.pt"):
        train(tiny_config(tiny_dataset, out, "--max_epoch=3", "--train.resume=auto", "--lr_max=1e30"))
    assert [path.name for path in ckpt.list_checkpoints(out)] == ["vit_tiny_patch16-1_4.pt"]
    assert all_finite(out / "vit_tiny_patch16-1_4.safetensors")


def test_an_fp16_run_stops_once_its_loss_scale_is_spent(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(VitkitError, match="fp16 loss scale fell to"):
        train(tiny_config(tiny_dataset, out, "--train.precision=fp16", "--lr_max=1e30", "--warmup_epochs=0",
                          "--loss_scale=0.0001"))
    assert all(all_finite(path.with_suffix(".safetensors")) for path in ckpt.list_checkpoints(out))


def test_an_epoch_without_a_readable_image_is_an_error(tmp_path):
    data = tmp_path / "data"
    for name in ("ant", "bee", "cat"):
        (data / "train" / name).mkdir(parents=True)
        for index in range(27):
            (data / "train" / name / f"{index}.jpg").write_bytes(b"not a jpeg at all")
    write_image_folder(data / "val", {"ant": 2, "bee": 2, "cat": 2})
    with pytest.warns(UserWarning, match="unreadable"), pytest.raises(VitkitError, match="no image of epoch 0 .*80 unreadable"):
        train(tiny_config(data, tmp_path / "run"))


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tiny_dataset, tmp_path,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    real_save, saves = torch.save, {"n": 0}

    def save_until_full(obj, path, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:  # the second checkpoint's .pt: its .safetensors is already written
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save_until_full)
    with pytest.raises(VitkitError, match="could not write checkpoint vit_tiny_patch16-2_4 .*No space left on device.*"
                                          "vit_tiny_patch16-1_4.pt, is intact"):
        train(tiny_config(tiny_dataset, out))
    assert sorted(path.name for path in out.glob("vit_tiny_patch16-*")) == [
        "vit_tiny_patch16-1_4.pt", "vit_tiny_patch16-1_4.safetensors"]  # no half of the second save
    assert not list(out.glob(".*.tmp"))
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert train(tiny_config(tiny_dataset, out, "--train.resume=auto"))["global_step"] == 8


def test_a_file_size_limit_on_the_first_save_is_one_error_line(tiny_dataset, tmp_path):
    done = run_vitkit(cli_args(tiny_dataset, tmp_path / "run"), limit=40_000)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("vitkit: error: could not write checkpoint")
    assert "Traceback" not in done.stderr


def test_resume_auto_falls_back_to_the_newest_readable_checkpoint(tiny_dataset, tmp_path):
    whole, out = tmp_path / "whole", tmp_path / "run"
    train(tiny_config(tiny_dataset, whole, "--max_epoch=3"))
    train(tiny_config(tiny_dataset, out, "--max_epoch=2"))
    newest = out / "vit_tiny_patch16-2_4.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short, as by a disk that filled up under another program
    with pytest.warns(UserWarning, match="skipping checkpoint vit_tiny_patch16-2_4.pt"):
        trainer = Trainer(tiny_config(tiny_dataset, out, "--train.resume=auto", "--max_epoch=3"))
    assert trainer.progress.epoch == 1
    trainer.fit()
    final, expected = load_file(out / "vit_tiny_patch16-3_4.safetensors"), load_file(whole / "vit_tiny_patch16-3_4.safetensors")
    assert all(torch.equal(final[key], expected[key]) for key in expected)


def test_leftovers_of_a_killed_save_are_removed_when_a_run_starts(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_dataset, out, "--max_epoch=1"))
    (out / ".vit_tiny_patch16-2_4.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (out / "vit_tiny_patch16-2_4.safetensors").write_bytes(b"weights whose .pt never came")
    mine = out / "notes.safetensors"
    mine.write_bytes(b"not a checkpoint name: left alone")
    Trainer(tiny_config(tiny_dataset, out, "--train.resume=auto"))
    assert sorted(path.name for path in out.iterdir() if path.suffix in (".pt", ".safetensors", ".tmp")) == [
        "notes.safetensors", "vit_tiny_patch16-1_4.pt", "vit_tiny_patch16-1_4.safetensors"]


def test_links_that_loop_list_each_image_once(tmp_path):
    root = write_image_folder(tmp_path / "data", {"ant": 2, "bee": 2})
    (root / "ant" / "again").symlink_to(root / "ant")  # a loop
    (root / "ant" / "dot").symlink_to(".")  # two links to "."
    (root / "ant" / "dot2").symlink_to(".")
    (root / "bee" / "up").symlink_to(root)  # up the tree, to the other class too
    (root / "bee" / "more").mkdir()
    (root / "bee" / "more" / "back").symlink_to(root / "bee" / "more")
    samples, classes = list_image_folder(root)
    assert classes == ["ant", "bee"]
    assert sorted(os.path.relpath(path, root) for path, _ in samples) == [
        "ant/ant_000.png", "ant/ant_001.png", "bee/bee_000.png", "bee/bee_001.png"]


@pytest.mark.parametrize("signame, fault, stem", [
    ("TERM", "step_end:6", "vit_tiny_patch16-2_2"),  # mid-epoch
    ("USR1", "step_backward:3", "vit_tiny_patch16-1_3"),  # inside a step: it finishes first
    ("TERM", "eval_batch:2", "vit_tiny_patch16-1_4"),  # during an evaluation: the epoch's end is saved
])
def test_a_stop_signal_saves_the_exact_position_and_resumes_bit_identically(tiny_dataset, tmp_path, signame, fault,
                                                                          stem):
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert run_vitkit(cli_args(tiny_dataset, whole)).returncode == 0
    stopped = run_vitkit(cli_args(tiny_dataset, out), env={"VITKIT_FAULT": fault, "VITKIT_FAULT_SIGNAL": signame})
    assert stopped.returncode == 128 + getattr(signal, "SIG" + signame), stopped.stderr[-2000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert last == f"vitkit: stopped: received SIG{signame}: wrote {stem}.pt; resume with --resume auto"
    assert ckpt.list_checkpoints(out)[-1].name == f"{stem}.pt"
    assert run_vitkit(cli_args(tiny_dataset, out, "--train.resume=auto")).returncode == 0
    final, expected = load_file(out / "vit_tiny_patch16-3_4.safetensors"), load_file(whole / "vit_tiny_patch16-3_4.safetensors")
    assert all(torch.equal(final[key], expected[key]) for key in expected)
