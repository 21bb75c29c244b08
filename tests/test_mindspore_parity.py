"""Logits of MindSpore model-zoo checkpoints, read without MindSpore, against the logits the original code produced."""
from pathlib import Path

import numpy as np
import pytest
import torch

import vitkit

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mindspore"


def _fixture_logits(**overrides):
    model = vitkit.load_model(FIXTURES / "ms_vit_tiny_cls.ckpt", num_heads=4, **overrides)
    images = torch.from_numpy(np.load(FIXTURES / "ms_vit_tiny_cls_input.npy"))
    with torch.no_grad():
        return model(images).numpy()


def test_inference_checkpoint_gives_the_originals_logits():
    expected = np.load(FIXTURES / "ms_vit_tiny_cls_logits.npy")
    np.testing.assert_allclose(_fixture_logits(), expected, atol=1e-5, rtol=0)


def test_the_originals_numerics_are_what_makes_parity():
    # This tiny model's logits are small (|z| < 0.5), so timm's numerics stay near 5e-6; the original's land
    # 100x closer. A wrong head count is far off: the parity test above can fail.
    expected = np.load(FIXTURES / "ms_vit_tiny_cls_logits.npy")
    assert np.abs(_fixture_logits() - expected).max() < 1e-6
    assert np.abs(_fixture_logits(gelu="erf", ln_eps=1e-6) - expected).max() > 1e-6
    wrong_heads = vitkit.load_model(FIXTURES / "ms_vit_tiny_cls.ckpt", num_heads=2)
    with torch.no_grad():
        logits = wrong_heads(torch.from_numpy(np.load(FIXTURES / "ms_vit_tiny_cls_input.npy"))).numpy()
    assert np.abs(logits - expected).max() > 1e-4


def test_mindspore_checkpoint_infers_the_architecture_and_numerics():
    arch = vitkit.load_model(FIXTURES / "ms_vit_tiny_cls.ckpt", num_heads=4).arch
    assert (arch.patch_size, arch.embed_dim, arch.depth, arch.mlp_dim, arch.image_size, arch.num_classes) == (8, 64, 2, 128, 32, 10)
    assert (arch.ln_eps, arch.gelu, arch.pool) == (1e-7, "tanh", "token")


def test_training_checkpoint_with_adam_moments_loads_and_runs():
    model = vitkit.load_model(FIXTURES / "ms_vit_tiny_train-3_2.ckpt", num_heads=4)
    assert (model.arch.patch_size, model.arch.image_size, model.arch.num_classes) == (16, 64, 1001)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1001) and torch.isfinite(logits).all()


def test_mindspore_checkpoint_converts_to_safetensors_with_identical_logits(tmp_path):
    model = vitkit.load_model(FIXTURES / "ms_vit_tiny_cls.ckpt", num_heads=4)
    vitkit.save_model(model, tmp_path / "tiny.safetensors")
    again = vitkit.load_model(tmp_path / "tiny.safetensors")  # heads and numerics now travel in the metadata
    images = torch.from_numpy(np.load(FIXTURES / "ms_vit_tiny_cls_input.npy"))
    with torch.no_grad():
        assert torch.equal(again(images), model(images))


@pytest.mark.parametrize("name", ["ms_vit_tiny_cls.ckpt", "ms_vit_tiny_train-3_2.ckpt"])
def test_vitkit_writes_mindspore_checkpoints_that_read_back_bit_identical(tmp_path, name):
    model = vitkit.load_model(FIXTURES / name, num_heads=4)
    vitkit.save_model(model, tmp_path / "back.ckpt")
    again = vitkit.load_model(tmp_path / "back.ckpt", num_heads=4)
    for key, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key
