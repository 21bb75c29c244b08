"""Model EMA (train.ema_decay): the average and its warm-up against hand-computed values and timm's ModelEmaV3,
its evaluation beside the raw weights, its checkpoints and bit-exact resume, and --ema in eval, convert and predict."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config, whole_and_resumed_runs, write_image_folder
from vitkit.cli import main
from vitkit.engine.ema import ModelEma, ema_decay_at
from vitkit.engine.trainer import Trainer, train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_the_decay_of_each_update_by_hand():
    assert ema_decay_at(1, 0.5, warmup=True) == 0.0  # the first update copies the weights
    assert ema_decay_at(2, 0.5, warmup=True) == pytest.approx(1 - 2 ** (-2 / 3))  # 0.370, below 0.5
    assert ema_decay_at(3, 0.5, warmup=True) == 0.5  # 1 - 3^(-2/3) = 0.519 is capped
    assert ema_decay_at(1, 0.9, warmup=False) == 0.0 and ema_decay_at(2, 0.9, warmup=False) == 0.9


def test_three_training_steps_give_the_hand_computed_average_and_timms(tiny_dataset, tmp_path):
    from timm.utils.model_ema import ModelEmaV3

    trainer = Trainer(tiny_config(tiny_dataset, tmp_path / "run", "--train.ema_decay=0.5", "--max_epoch=1"))
    timm_ema = ModelEmaV3(trainer.model, decay=0.5, use_warmup=True)  # warm-up power 2/3, gamma 1: its defaults
    generator = torch.Generator().manual_seed(0)
    raw = []
    for update in (1, 2, 3):
        images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=generator)
        trainer._train_step(images, torch.tensor([0, 1, 2, 0]))
        raw.append({name: value.clone() for name, value in trainer.model.state_dict().items()})
        timm_ema.update(trainer.model, step=update)
    d2, d3 = 1 - 2 ** (-2 / 3), 0.5
    ours, theirs = trainer.ema.module.state_dict(), timm_ema.module.state_dict()
    assert trainer.ema.updates == 3
    for name, (w1, w2, w3) in ((name, (raw[0][name], raw[1][name], raw[2][name])) for name in raw[0]):
        by_hand = d3 * (d2 * w1 + (1 - d2) * w2) + (1 - d3) * w3
        assert torch.allclose(ours[name], by_hand, rtol=1e-6, atol=1e-7), name
        assert torch.equal(ours[name], theirs[name]), name
    assert not torch.equal(ours["head.weight"], raw[2]["head.weight"])  # an average, not the last weights


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """2 epochs of 4 steps with the EMA, checkpoints every 3 steps; TensorBoard on."""
    root = tmp_path_factory.mktemp("ema")
    data = root / "data"
    write_image_folder(data / "train", {"ant": 12, "bee": 12, "cat": 12}, seed=1)
    write_image_folder(data / "val", {"ant": 4, "bee": 3, "cat": 4}, seed=2)
    out = root / "run"
    train(tiny_config(data, out, "--train.ema_decay=0.6", "--checkpoint.save_checkpoint_steps=3",
                      "--keep_checkpoint_max=10"))
    return data, out


def test_the_ema_is_evaluated_beside_the_raw_weights_and_saved_in_every_checkpoint(ema_run, capsys):
    data, out = ema_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    log = next(out.glob("*_rank_0.log")).read_text()
    lines = re.findall(r"epoch\[\d\], .*accuracy=(\d\.\d{6}), eval_cost=[\d.]+, ema_accuracy=(\d\.\d{6})", log)
    assert [(float(a), float(e)) for a, e in lines] == [(round(r["accuracy"], 6), round(r["ema_accuracy"], 6))
                                                         for r in records]
    for stem in ("vit_tiny_patch16-1_3", "vit_tiny_patch16-1_4", "vit_tiny_patch16-2_4"):
        state = torch.load(out / f"{stem}.pt", weights_only=True)
        on_file = load_file(out / f"{stem}.ema.safetensors")
        assert all(torch.equal(on_file[name], value) for name, value in state["ema"]["weights"].items())
    assert torch.load(out / "vit_tiny_patch16-2_4.pt", weights_only=True)["ema"]["updates"] == 8
    # The in-training EMA accuracy is what `vitkit eval --ema` measures on the saved EMA weights.
    capsys.readouterr()
    args = ["eval", "--model", str(out), "--data", str(data / "val"), "--eval_batch_size=5", "--eval_image_size=32",
            "--eval_num_workers=0", "--json"]
    assert main([*args, "--ema"]) == 0
    ema_eval = json.loads(capsys.readouterr().out)
    assert ema_eval["model"].endswith("vit_tiny_patch16-2_4.ema.safetensors")
    assert ema_eval["top1"] == pytest.approx(records[-1]["ema_accuracy"])
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(records[-1]["accuracy"])


def test_tensorboard_gets_both_accuracies(ema_run):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    _, out = ema_run
    reader = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    reader.Reload()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ema = [event.value for event in reader.Scalars("eval/ema_top1")]
    assert ema == pytest.approx([r["ema_accuracy"] for r in records])
    assert [event.step for event in reader.Scalars("eval/ema_top5")] == [4, 8]


def test_convert_and_predict_read_the_ema_weights(ema_run, tmp_path, capsys):
    data, out = ema_run
    target = tmp_path / "ema.safetensors"
    assert main(["convert", str(out / "vit_tiny_patch16-2_4.pt"), str(target), "--ema"]) == 0
    saved = load_file(out / "vit_tiny_patch16-2_4.ema.safetensors")
    converted = load_file(target)
    assert all(torch.equal(converted[name], saved[name]) for name in saved)
    image = str(next((data / "val" / "ant").iterdir()))
    capsys.readouterr()
    assert main(["predict", image, "--model", str(out), "--ema", "--json"]) == 0
    with_flag = json.loads(capsys.readouterr().out)
    assert main(["predict", image, "--model", str(out / "vit_tiny_patch16-2_4.ema.safetensors"), "--json"]) == 0
    assert with_flag == json.loads(capsys.readouterr().out)
    assert main(["predict", image, "--model", str(out), "--json"]) == 0
    assert with_flag != json.loads(capsys.readouterr().out)  # the raw weights give other probabilities


def test_ema_without_ema_weights_is_one_error_line(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "plain"
    train(tiny_config(tiny_dataset, out, "--max_epoch=1"))
    assert not list(out.glob("*.ema.safetensors"))
    capsys.readouterr()
    assert main(["convert", str(out), str(tmp_path / "x.safetensors"), "--ema"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitkit: error: ") and err.count("\n") == 1 and "train.ema_decay" in err
    assert main(["convert", str(tmp_path / "nowhere.safetensors"), str(tmp_path / "x.safetensors"), "--ema"]) == 2
    assert "is none" in capsys.readouterr().err


def test_a_run_killed_mid_epoch_resumes_its_ema_bit_for_bit(tiny_dataset, tmp_path, monkeypatch):
    extra = ("--max_epoch=3", "--train.ema_decay=0.7", "--checkpoint.save_checkpoint_steps=3", "--mixup=0.2",
             "--keep_checkpoint_max=10")
    # Killed after the step-6 checkpoint, in epoch 2.
    whole_and_resumed_runs(tiny_dataset, tmp_path, monkeypatch, extra, die_at_call=8)
    for name in ("vit_tiny_patch16-3_4.safetensors", "vit_tiny_patch16-3_4.ema.safetensors"):
        whole, resumed = load_file(tmp_path / "whole" / name), load_file(tmp_path / "killed" / name)
        assert all(torch.equal(whole[key], resumed[key]) for key in whole), name
    assert not torch.equal(load_file(tmp_path / "whole" / "vit_tiny_patch16-3_4.ema.safetensors")["head.weight"],
                           load_file(tmp_path / "whole" / "vit_tiny_patch16-3_4.safetensors")["head.weight"])


def test_pruning_and_leftover_cleaning_take_the_ema_file_with_its_checkpoint(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_dataset, out, "--max_epoch=1", "--train.ema_decay=0.5", "--keep_checkpoint_max=1",
                      "--checkpoint.save_checkpoint_steps=2", "--eval.interval=100"))  # no eval, no best to keep
    assert sorted(path.name for path in out.glob("*.ema.safetensors")) == ["vit_tiny_patch16-1_4.ema.safetensors"]
    # A save killed before its .pt leaves weights files that the next start removes.
    (out / "vit_tiny_patch16-2_1.ema.safetensors").write_bytes(b"partial")
    from vitkit.engine.checkpoint import remove_leftovers

    assert [path.name for path in remove_leftovers(out)] == ["vit_tiny_patch16-2_1.ema.safetensors"]
    assert (out / "vit_tiny_patch16-1_4.ema.safetensors").is_file()


def test_the_ema_copy_is_frozen_and_in_eval_mode(tiny_dataset, tmp_path):
    trainer = Trainer(tiny_config(tiny_dataset, tmp_path / "run", "--train.ema_decay=0.9", "--max_epoch=1"))
    assert isinstance(trainer.ema, ModelEma) and not trainer.ema.module.training
    assert not any(param.requires_grad for param in trainer.ema.module.parameters())
    optimized = {id(param) for group in trainer.optimizer.param_groups for param in group["params"]}
    assert not optimized & {id(param) for param in trainer.ema.module.parameters()}
