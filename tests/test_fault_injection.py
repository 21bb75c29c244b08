"""SIGKILL at points spread over a run (inside a step, at the data loader, between and inside each file of a
checkpoint write, during evaluation): `--train.resume=auto` then ends on final weights bit-identical to a run that
was never interrupted, with no temporary file left and every listed checkpoint readable.

The run: 36 training images in batches of 8 are 4 steps an epoch, 3 epochs (global steps 1-12), one loader worker.
Checkpoints every 3 global steps inside an epoch and at each epoch's end, in this order: 1_3 (step 3), 1_4, 2_2
(step 6), 2_4, 3_1 (step 9), 3_4. Each save passes `atomic_replace` twice (.safetensors, then .pt), so its passes
are 1-2 (1_3), 3-4 (1_4), 5-6 (2_2), 7-8 (2_4), 9-10 (3_1), 11-12 (3_4); a fresh run rewrites no metrics file.
11 validation images in batches of 5 are 3 `eval_batch` passes an epoch, after its training steps and before its
end-of-epoch save."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_image_folder
from test_faults import cli_args
from vitkit.engine import checkpoint as ckpt

FINAL = "vit_tiny_patch16-3_4.safetensors"
FLAGS = ("--checkpoint.save_checkpoint_steps=3", "--train_num_workers=1")


def run_vitkit(args, logs: Path, env=None) -> subprocess.CompletedProcess:
    """`vitkit train` in a session of its own, its output in files under `logs`. Once the main process has died,
    what is left of the session (a loader worker of a killed run, which would otherwise hold output pipes open until
    its watchdog notices the orphaning, seconds later) is killed too, as a machine's preemption would."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "w+") as out, open(logs / "stderr", "w+") as err:
        process = subprocess.Popen([sys.executable, "-m", "vitkit", "train", *args], stdout=out, stderr=err,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            returncode = process.wait(timeout=300)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(process.args, returncode, out.read(), err.read())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny data set and the final weights of one uninterrupted run with the same flags as every case."""
    data = tmp_path_factory.mktemp("fault_injection") / "data"
    write_image_folder(data / "train", {"ant": 12, "bee": 12, "cat": 12}, seed=1)
    write_image_folder(data / "val", {"ant": 4, "bee": 3, "cat": 4}, seed=2)
    whole = data.parent / "whole"
    done = run_vitkit(cli_args(data, whole, *FLAGS), data.parent / "whole_logs")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [path.stem for path in ckpt.list_checkpoints(whole)] == [
        "vit_tiny_patch16-1_3", "vit_tiny_patch16-1_4", "vit_tiny_patch16-2_2", "vit_tiny_patch16-2_4",
        "vit_tiny_patch16-3_1", "vit_tiny_patch16-3_4"]
    return data, load_file(whole / FINAL)


# (VITKIT_FAULT, the newest checkpoint listed after the kill, globs of what the kill leaves half-written)
CASES = [
    # the first batch of epoch 0 has come from the loader worker: nothing saved, the resume starts afresh
    ("batch_fetched:1", None, ()),
    # the first checkpoint's .pt (1_3) is complete under its temporary name: its .safetensors is there without it
    ("atomic_replace:2", None, (".vit_tiny_patch16-1_3.pt.*.tmp", "vit_tiny_patch16-1_3.safetensors")),
    # 1_4's .safetensors is written, its .pt not yet begun: the resume continues from 1_3
    ("checkpoint_weights_written:2", "1_3", ("vit_tiny_patch16-1_4.safetensors",)),
    # global step 5 (epoch 1, step 1) is done, no save since 1_4
    ("step_end:5", "1_4", ()),
    # inside global step 7 (epoch 1, step 3): after backward, before the optimizer step; 2_2 was saved at step 6
    ("step_backward:7", "2_2", ()),
    # 2_4's .safetensors is complete under its temporary name, before the rename
    ("atomic_replace:7", "2_2", (".vit_tiny_patch16-2_4.safetensors.*.tmp",)),
    # just after epoch 1's end-of-epoch checkpoint 2_4
    ("epoch_saved:2", "2_4", ()),
    # 3_1's .pt is complete under its temporary name, its .safetensors already renamed into place
    ("atomic_replace:10", "2_4", (".vit_tiny_patch16-3_1.pt.*.tmp", "vit_tiny_patch16-3_1.safetensors")),
    # the batch of global step 11 (epoch 2, step 3) has come from the loader worker; 3_1 was saved at step 9
    ("batch_fetched:11", "3_1", ()),
    # the second evaluation batch of the last epoch: all 12 steps trained, 3_4 not yet saved
    ("eval_batch:8", "3_1", ()),
]


@pytest.mark.parametrize("fault, newest, leftovers", CASES, ids=[case[0] for case in CASES])
def test_sigkill_then_resume_is_bit_identical(reference, tmp_path, fault, newest, leftovers):
    data, expected = reference
    out = tmp_path / "run"
    killed = run_vitkit(cli_args(data, out, *FLAGS), tmp_path / "killed", env={"VITKIT_FAULT": fault})
    assert killed.returncode == -9, f"{fault}: not killed by SIGKILL\n{killed.stderr[-2000:]}"
    listed = [path.stem.rpartition("-")[2] for path in ckpt.list_checkpoints(out)]
    assert (listed[-1] if listed else None) == newest, f"{fault} killed elsewhere than meant: {listed}"
    for pattern in leftovers:  # what the killed save left half-done, removed when the resume starts
        assert list(out.glob(pattern)), f"{fault} left no {pattern}: {sorted(os.listdir(out))}"

    resumed = run_vitkit(cli_args(data, out, *FLAGS, "--train.resume=auto"), tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if newest:  # continued from there, not started afresh (which would end on the same weights too)
        where = out / f"vit_tiny_patch16-{newest}.pt"
        assert f"resumed from {where} at epoch" in resumed.stdout, resumed.stdout[-2000:]
    else:
        assert "resumed from" not in resumed.stdout
    final = load_file(out / FINAL)
    assert final.keys() == expected.keys()
    differing = [key for key in expected if not torch.equal(final[key], expected[key])]
    assert not differing, f"{fault}: the resumed run's final weights differ from the uninterrupted run's: {differing}"
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    for path in ckpt.list_checkpoints(out):
        state = ckpt.load_training_checkpoint(path)
        assert state["format"] == "vitkit-train"
        load_file(path.with_suffix(".safetensors"))
