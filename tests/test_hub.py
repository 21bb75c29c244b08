"""torch.hub entry points from the repository folder (source='local': nothing is downloaded)."""
import importlib.util
from pathlib import Path

import pytest
import torch

import vitkit

REPO = str(Path(__file__).resolve().parent.parent)


@pytest.fixture
def tiny_ckpt(tmp_path):
    """A vit_tiny_patch32-shaped model saved as the original's .ckpt, which does not record the head count."""
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch32", style="mindspore", image_size=64, num_classes=5).eval()
    return model, vitkit.save_model(model, tmp_path / "tiny.ckpt")


def test_every_preset_is_an_entry_point_and_nothing_else():
    # What torch.hub.list reports for a repository: hubconf's public callables.
    spec = importlib.util.spec_from_file_location("hubconf", Path(REPO) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
    assert sorted(entries) == sorted(vitkit.list_models())
    assert "vit_base_patch32" in entries and "width 768" in hubconf.vit_base_patch32.__doc__


def test_load_with_weights_takes_heads_from_the_preset(tiny_ckpt):
    reference, path = tiny_ckpt
    model = torch.hub.load(REPO, "vit_tiny_patch32", source="local", weights=str(path))
    assert model.arch.num_heads == 3 and model.arch.gelu == "tanh" and not model.training
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))


def test_num_classes_gives_a_fresh_head_and_image_size_resamples(tiny_ckpt):
    reference, path = tiny_ckpt
    model = torch.hub.load(REPO, "vit_tiny_patch32", source="local", weights=str(path), num_classes=7, image_size=96)
    assert model.head.out_features == 7 and model.pos_embed.shape == (1, 1 + 3 * 3, 192)
    assert torch.equal(model.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 7)


def test_weights_of_another_shape_are_refused(tiny_ckpt):
    _, path = tiny_ckpt
    with pytest.raises(vitkit.VitkitError, match="not vit_small_patch32's"):
        torch.hub.load(REPO, "vit_small_patch32", source="local", weights=str(path))


def test_without_weights_a_random_preset_is_built():
    model = torch.hub.load(REPO, "vit_tiny_patch16", source="local", num_classes=10, image_size=32, style="mindspore")
    assert (model.arch.embed_dim, model.arch.num_heads, model.arch.num_classes) == (192, 3, 10)
    assert model.arch.ln_eps == 1e-7
    with pytest.raises(vitkit.VitkitError, match="ships no weights"):
        torch.hub.load(REPO, "vit_tiny_patch16", source="local", pretrained=True)
