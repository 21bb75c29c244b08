"""Fine-tuning from weights made elsewhere: another image size (resampled position embeddings), another head."""
from pathlib import Path

import pytest
import torch

import vitkit
from conftest import tiny_config
from test_formats_npz import flax_arrays, save_npz
from vitkit.config import load_config
from vitkit.engine.build import build_model, load_pretrained
from vitkit.engine.trainer import train

timm = pytest.importorskip("timm")
from timm.layers import resample_abs_pos_embed  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def tiny_npz(tmp_path, **kwargs):
    """A Flax ViT with conftest's TINY_MODEL shape (patch 8, width 32, depth 2, 2 heads, MLP 64) at 32 px, 5 classes."""
    return save_npz(tmp_path / "tiny.npz", flax_arrays("paper", **kwargs))


def test_load_at_a_new_size_with_a_new_head(tmp_path):
    path = tiny_npz(tmp_path)
    source = vitkit.load_model(path)
    model, card = vitkit.load_model(path, image_size=64, num_classes=3, with_card=True)
    assert model.head.out_features == 3 and card.class_names is None
    # timm's resampling of the same table is the reference: bicubic as Hugging Face and torchvision upsample it
    # (timm's default antialias=True switches torch to PIL's a=-0.5 cubic kernel even when upsampling).
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=(8, 8), num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(model.pos_embed.detach(), expected, atol=1e-6, rtol=0)
    for name, tensor in source.state_dict().items():
        if not name.startswith(("head.", "pos_embed")):
            assert torch.equal(model.state_dict()[name], tensor), name
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_representation_size_0_drops_the_pre_logits_layer(tmp_path):
    model = vitkit.load_model(tiny_npz(tmp_path, pre_logits=24), num_classes=4, representation_size=0)
    assert isinstance(model.pre_logits, torch.nn.Identity) and model.head.in_features == 32


def test_pretrained_npz_in_a_training_config(tiny_dataset, tmp_path):
    path = tiny_npz(tmp_path, pre_logits=24)
    cfg = tiny_config(tiny_dataset, tmp_path / "run", f"--model.pretrained={path}", "--train_image_size=48",
                      "--model.ln_eps=1e-6", "--model.init=timm")
    model = build_model(cfg.model)
    skipped = load_pretrained(model, str(path))
    # The ViT paper fine-tuned without the pre-logits layer and with a fresh head.
    assert sorted(skipped) == ["head.bias", "head.weight", "pre_logits.fc.bias", "pre_logits.fc.weight"]
    source = vitkit.load_model(path)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 32)


def test_numerics_that_differ_from_the_checkpoints_are_warned_about(tiny_dataset, tmp_path):
    path = tiny_npz(tmp_path)
    cfg = tiny_config(tiny_dataset, tmp_path / "run", "--model.gelu=erf")  # the npz was trained with tanh GELU, eps 1e-6
    with pytest.warns(UserWarning, match="model.gelu=tanh"):
        load_pretrained(build_model(cfg.model), str(path))


def test_a_hugging_face_folder_is_a_pretrained_path(tiny_dataset, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=16, patch_size=8, num_labels=7)
    reference = transformers.ViTForImageClassification(config)
    reference.save_pretrained(tmp_path / "hf")
    model = build_model(tiny_config(tiny_dataset, tmp_path / "run", "--model.ln_eps=1e-12", "--model.gelu=erf").model)
    assert sorted(load_pretrained(model, str(tmp_path / "hf"))) == ["head.bias", "head.weight"]
    assert torch.equal(model.norm.weight, reference.vit.layernorm.weight)


def test_finetune_config_runs_from_the_demo_run_folder(tiny_dataset, tmp_path):
    """configs/fashion_mnist_finetune.yml on tiny data, starting from a run folder of the demo's model (28 px)."""
    demo_cfg = load_config(str(CONFIGS / "fashion_mnist_vit.yml"), [])
    demo = build_model(demo_cfg.model)
    # What a demo run leaves: {backbone}-{epoch}_{step}.pt beside its weights; the folder stands for the newest weights.
    vitkit.save_model(demo, tmp_path / "demo" / "vit_tiny_patch16-8_468.safetensors")
    (tmp_path / "demo" / "vit_tiny_patch16-8_468.pt").touch()
    finetune = load_config(str(CONFIGS / "fashion_mnist_finetune.yml"), [
        f"--data.train_path={tiny_dataset / 'train'}", f"--data.val_path={tiny_dataset / 'val'}",
        "--data.num_workers=0", "--eval.num_workers=0", "--data.batch_size=12", "--eval.batch_size=11",
        "--schedule.max_epoch=1", "--logging.progress=plain",
        f"--checkpoint.output_dir={tmp_path / 'finetune'}", f"--model.pretrained={tmp_path / 'demo'}",
    ])
    assert (finetune.model.image_size, finetune.eval.image_size, finetune.data.random_crop) == (42, 42, False)
    train(finetune)
    tuned = vitkit.load_model(next((tmp_path / "finetune").glob("*.safetensors")))
    assert tuned.arch.image_size == 42 and tuned.pos_embed.shape == (1, 1 + 6 * 6, 96)
    # One small step from the demo's weights, not a fresh init: the blocks moved only a little.
    moved = (tuned.blocks[0].mlp.fc1.weight - demo.blocks[0].mlp.fc1.weight).abs().max()
    assert 0 < moved < 0.01
