"""Layer-wise lr decay (optimizer.layer_decay) against the formula by hand and timm's grouping; freezing
(train.freeze): frozen parameters get no gradients, stay out of the optimizer and keep their values bit for bit."""
import pytest
import torch

from conftest import tiny_config
from vitkit.engine.optim import layer_lr_scales
from vitkit.engine.trainer import Trainer, train
from vitkit.errors import VitkitError


def lr_of_each_parameter(trainer) -> dict[str, float]:
    by_id = {id(param): group["lr"] for group in trainer.optimizer.param_groups for param in group["params"]}
    return {name: by_id[id(param)] for name, param in trainer.model.named_parameters() if id(param) in by_id}


def by_hand(name: str) -> float:
    """The tiny model has 2 blocks: layers 0 (stem), 1 and 2 (blocks), 3 (norm and head); decay 0.5."""
    if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
        return 0.5**3
    if name.startswith("blocks.0."):
        return 0.5**2
    if name.startswith("blocks.1."):
        return 0.5
    return 1.0


def test_every_parameter_learns_at_the_scheduled_rate_times_its_layers_scale(tiny_dataset, tmp_path):
    trainer = Trainer(tiny_config(tiny_dataset, tmp_path / "run", "--optimizer.layer_decay=0.5", "--max_epoch=1"))
    names = [name for name, _ in trainer.model.named_parameters()]
    assert {"norm.weight", "head.weight", "cls_token", "pos_embed", "patch_embed.proj.weight"} <= set(names)
    for step in range(3):
        scheduled = float(trainer.lrs[step])
        assert scheduled > 0
        lrs = lr_of_each_parameter(trainer)
        assert lrs.keys() == set(names)
        for name in names:
            assert lrs[name] == pytest.approx(scheduled * by_hand(name), rel=1e-7), (step, name)
        trainer._train_step(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 0]))
    # Weight decay is still split by the filter within each layer: biases and LayerNorm betas skip it.
    decay = {id(p): group["weight_decay"] for group in trainer.optimizer.param_groups for p in group["params"]}
    params = dict(trainer.model.named_parameters())
    assert decay[id(params["blocks.0.attn.qkv.bias"])] == 0.0 and decay[id(params["blocks.0.attn.qkv.weight"])] == 0.05


def test_the_scales_are_timms_for_the_same_model():
    timm = pytest.importorskip("timm")
    from timm.optim import create_optimizer_v2

    from vitkit.model.vit import create_model

    theirs_model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=3)
    optimizer = create_optimizer_v2(theirs_model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.6)
    by_id = {id(param): group["lr_scale"] for group in optimizer.param_groups for param in group["params"]}
    theirs = {name: by_id[id(param)] for name, param in theirs_model.named_parameters()}
    ours_model = create_model("vit_tiny_patch16", patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_dim=64,
                              image_size=32, num_classes=3)
    ours = layer_lr_scales(ours_model, 0.6)
    assert ours.keys() == theirs.keys()
    # One known difference: timm's group_matcher puts the final norm in the last block's layer (its '^norm' pattern
    # sits in the blocks list); BEiT, which the formula comes from, and vitkit put it with the head, at depth + 1.
    assert theirs["norm.weight"] == theirs["blocks.2.norm1.weight"] and ours["norm.weight"] == ours["head.weight"]
    others = [name for name in ours if not name.startswith("norm.")]
    assert [ours[name] for name in others] == pytest.approx([theirs[name] for name in others], rel=1e-12)
    assert sorted(set(ours.values())) == pytest.approx([0.6**4, 0.6**3, 0.6**2, 0.6, 1.0])


def test_the_scales_survive_a_resume(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_dataset, out, "--optimizer.layer_decay=0.5", "--max_epoch=1"))
    resumed = Trainer(tiny_config(tiny_dataset, out, "--optimizer.layer_decay=0.5", "--max_epoch=2",
                                  "--train.resume=auto"))
    scheduled = float(resumed.lrs[4])
    for name, lr in lr_of_each_parameter(resumed).items():
        assert lr == pytest.approx(scheduled * by_hand(name), rel=1e-7), name


@pytest.mark.parametrize("layer_decay", ["0", "1.5"])
def test_layer_decay_outside_0_1_is_refused(tiny_dataset, tmp_path, layer_decay):
    with pytest.raises(VitkitError, match="layer_decay"):
        tiny_config(tiny_dataset, tmp_path, f"--optimizer.layer_decay={layer_decay}")


def run_steps(trainer, steps: int = 3) -> None:
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=generator)
        trainer._train_step(images, torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("freeze, trains", [
    ("backbone", lambda name: name.startswith("head.")),
    ("1", lambda name: not name.startswith(("patch_embed.", "cls_token", "pos_embed", "blocks.0."))),
    ("2", lambda name: name.startswith(("norm.", "head."))),
    ("0", lambda name: not name.startswith(("patch_embed.", "cls_token", "pos_embed"))),
])
def test_frozen_parameters_get_no_gradients_no_optimizer_state_and_stay_bit_identical(tiny_dataset, tmp_path, freeze,
                                                                                      trains):
    trainer = Trainer(tiny_config(tiny_dataset, tmp_path / "run", f"--train.freeze={freeze}", "--max_epoch=1"))
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    run_steps(trainer)
    optimized = {id(param) for group in trainer.optimizer.param_groups for param in group["params"]}
    for name, param in trainer.model.named_parameters():
        if trains(name):
            assert param.requires_grad and id(param) in optimized and param.grad is not None, name
            assert not torch.equal(param, before[name]), name
        else:
            assert not param.requires_grad and id(param) not in optimized and param.grad is None, name
            assert torch.equal(param, before[name]), name
            assert param not in trainer.optimizer.state


@pytest.mark.parametrize("freeze", ["3", "head", "-1", "1.5", "9" * 30])
def test_a_freeze_the_model_cannot_have_is_one_error(tiny_dataset, tmp_path, freeze):
    with pytest.raises(VitkitError, match="train.freeze .*'backbone'.*depth, 2"):
        Trainer(tiny_config(tiny_dataset, tmp_path / "run", f"--train.freeze={freeze}", "--max_epoch=1"))


def test_the_fine_tuning_recipe_starts_from_a_timm_checkpoint_with_layer_decay_and_ema(tiny_dataset, tmp_path):
    # configs/vit_finetune_layer_decay.yml as written, but with the tiny shape and data: it loads a timm state_dict,
    # trains with its layer decay, accumulation and EMA, and writes the EMA weights beside each checkpoint.
    timm = pytest.importorskip("timm")
    from pathlib import Path

    from conftest import TINY_MODEL
    from vitkit.config import load_config

    recipe = Path(__file__).resolve().parent.parent / "configs" / "vit_finetune_layer_decay.yml"
    header = [line for line in recipe.read_text().splitlines() if line.startswith("#")]
    assert any("layer" in line and "EMA" in line for line in header) and any("--ema" in line for line in header)
    pretrained = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=7)
    torch.save(pretrained.state_dict(), tmp_path / "timm_tiny.pth")
    config = load_config(recipe, [
        *TINY_MODEL, f"--model.pretrained={tmp_path / 'timm_tiny.pth'}", f"--dataset_path={tiny_dataset / 'train'}",
        f"--eval_path={tiny_dataset / 'val'}", f"--save_checkpoint_path={tmp_path / 'run'}", "--class_num=3",
        "--batch_size=4", "--eval_batch_size=5", "--train_num_workers=0", "--eval_num_workers=0", "--max_epoch=1",
        "--data.augment=none", "--logging.progress=plain"])
    assert config.optimizer.layer_decay == 0.65 and config.train.ema_decay == 0.9999 and config.train.accum_steps == 2
    trainer = Trainer(config)
    theirs = pretrained.state_dict()
    for name, value in trainer.model.state_dict().items():  # every tensor but the 7-class head came from the file
        assert name.startswith("head.") or torch.equal(value, theirs[name]), name
    assert sorted({group["lr_scale"] for group in trainer.optimizer.param_groups}) == pytest.approx(
        [0.65**3, 0.65**2, 0.65, 1.0])
    trainer.fit()
    assert (tmp_path / "run" / "vit_tiny_patch16-1_4.ema.safetensors").is_file()
