"""Every config in configs/ loads and builds its model; the published recipes say where they come from and hold
their sources' settings."""
import re
from pathlib import Path

import pytest
import torch
from timm.optim import param_groups_weight_decay

from vitkit.config import load_config
from vitkit.engine.build import build_model
from vitkit.engine.optim import split_decay_groups

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ALL_CONFIGS = sorted(path.name for path in CONFIGS.glob("*.yml"))
# The ImageNet-1k recipes, each headed by its source, expected top-1, compute and the one command that runs it.
IMAGENET_RECIPES = ("vit_patch32_imagenet2012_config.yml", "vit_s16_imagenet1k_big_vision.yml",
                    "deit_small_imagenet1k.yml")


def build_on_meta(config):
    """The configured model with meta tensors: every shape checked, nothing allocated, however large the model."""
    with torch.device("meta"):
        return build_model(config.model)


def test_the_folder_holds_the_recipes():
    assert set(IMAGENET_RECIPES) | {"fashion_mnist_vit_92.yml"} <= set(ALL_CONFIGS)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_config_loads_and_builds_its_model(name):
    config = load_config(CONFIGS / name)
    model = build_on_meta(config)
    side = config.model.image_size
    logits = model(torch.empty(2, 3, side, side, device="meta"))
    assert logits.shape == (2, config.model.num_classes)


@pytest.mark.parametrize("name", IMAGENET_RECIPES)
def test_imagenet_recipes_name_their_source_accuracy_compute_and_command(name):
    header = "".join(line for line in (CONFIGS / name).read_text().splitlines(keepends=True) if line.startswith("#"))
    assert re.search(r"Expected: \d\d\.\d+ % top-1 after \d+ epochs", header)
    assert re.search(r"Ascend|TPU|GPU", header)
    assert f"--config_path configs/{name}" in header and "--dataset_path" in header


def decayed_names(model, config):
    groups = split_decay_groups(model, config.optimizer.no_weight_decay_filter, config.optimizer.weight_decay)
    names = {id(param): name for name, param in model.named_parameters()}
    return {names[id(param)] for group in groups if group["weight_decay"] > 0 for param in group["params"]}


def timm_decayed_names(model, no_weight_decay_list=()):
    groups = param_groups_weight_decay(model, weight_decay=1.0, no_weight_decay_list=no_weight_decay_list)
    names = {id(param): name for name, param in model.named_parameters()}
    return {names[id(param)] for group in groups if group["weight_decay"] > 0 for param in group["params"]}


def test_big_vision_recipe_holds_vit_s16_i1k():
    config = load_config(CONFIGS / "vit_s16_imagenet1k_big_vision.yml")
    model = build_on_meta(config)
    assert (config.model.embed_dim or 384, model.arch.embed_dim, model.arch.depth, model.arch.num_heads,
            model.arch.patch_size) == (384, 384, 12, 6, 16)
    assert model.cls_token is None and config.model.pool == "mean" and config.model.pos_embed == "sincos"
    assert config.data.normalization == "inception" and config.data.crop_min == 0.05
    assert (config.data.augment, config.data.randaugment_ops, config.data.randaugment_magnitude) == ("randaugment", 2, 10)
    assert config.data.mixup == 0.2 and config.data.cutmix == 0.0
    assert config.data.batch_size * 8 == 1024 and config.schedule.max_epoch == 90
    # big_vision's decay (1e-4, not scaled by the rate 1e-3) is torch AdamW's 0.1, on the kernels only: what timm
    # decays when nothing is listed (every tensor of 2 or more dimensions).
    assert config.schedule.lr_max == 1e-3 and config.optimizer.weight_decay == pytest.approx(1e-4 / 1e-3)
    assert decayed_names(model, config) == timm_decayed_names(model)
    # 10k warmup steps of 1024 images over ImageNet's 1,281,167 training images.
    assert config.schedule.warmup_epochs == pytest.approx(10_000 * 1024 / 1_281_167, abs=0.05)
    assert config.optimizer.clip_grad_norm == 1.0 and config.loss.name == "soft_ce"


def test_deit_recipe_holds_deits_defaults():
    config = load_config(CONFIGS / "deit_small_imagenet1k.yml")
    model = build_on_meta(config)
    assert (model.arch.embed_dim, model.arch.depth, model.arch.num_heads, model.arch.patch_size) == (384, 12, 6, 16)
    assert config.data.batch_size * 4 == 1024 and config.schedule.lr_max == pytest.approx(5e-4 * 1024 / 512)
    assert (config.schedule.warmup_epochs, config.schedule.max_epoch, config.schedule.lr_min) == (5, 300, 1e-5)
    assert config.optimizer.weight_decay == 0.05 and config.model.drop_path_rate == 0.1
    assert (config.data.mixup, config.data.cutmix, config.data.random_erasing) == (0.8, 1.0, 0.25)
    assert (config.data.repeated_aug, config.data.randaugment_magnitude, config.loss.label_smooth_factor) == (3, 9, 0.1)
    assert config.data.interpolation == "BICUBIC" and config.data.crop_min == 0.08
    # timm's optimizer factory: no decay for 1-D tensors and the model's no_weight_decay() list.
    assert decayed_names(model, config) == timm_decayed_names(model, {"pos_embed", "cls_token"})


def test_fashion_mnist_92_recipe_uses_49_tokens_and_mean_pooling():
    config = load_config(CONFIGS / "fashion_mnist_vit_92.yml")
    model = build_on_meta(config)
    assert model.pos_embed.shape == (1, 49, 64)  # 7 x 7 patches of 4 pixels, no class token
    assert model.cls_token is None and config.model.num_classes == 10


def test_fashion_mnist_gpu_recipe_is_the_demos_model_and_data_at_eight_times_the_batch():
    demo = load_config(CONFIGS / "fashion_mnist_vit.yml")
    gpu = load_config(CONFIGS / "fashion_mnist_vit_gpu.yml")
    assert gpu.model == demo.model and gpu.loss == demo.loss and gpu.optimizer == demo.optimizer
    assert gpu.data.batch_size == 8 * demo.data.batch_size
    for name in ("augment", "random_crop", "mixup", "normalization", "train_path", "val_path"):
        assert getattr(gpu.data, name) == getattr(demo.data, name), name
    assert gpu.checkpoint.output_dir != demo.checkpoint.output_dir  # the two runs never resume each other
