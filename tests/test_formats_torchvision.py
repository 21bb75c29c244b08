"""torchvision ViT state_dicts, on random weights: torchvision's own model is the oracle."""
import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import vision_transformer as tv

import vitkit
from vitkit.cli import main


def small_torchvision_vit(**changes):
    torch.manual_seed(0)
    options = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=7)
    return tv.VisionTransformer(**{**options, **changes}).eval()


def test_vit_b_32_loads_to_torchvisions_logits(tmp_path):
    torch.manual_seed(0)
    reference = tv.vit_b_32(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "vit_b_32.pth")
    model = vitkit.load_model(tmp_path / "vit_b_32.pth")
    arch = model.arch
    assert (arch.patch_size, arch.embed_dim, arch.depth, arch.num_heads, arch.num_classes) == (32, 768, 12, 12, 1000)
    assert (arch.ln_eps, arch.gelu, arch.pool) == (1e-6, "erf", "token")
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pre_logits_variant_and_given_head_count(tmp_path, suffix):
    reference = small_torchvision_vit(representation_size=24)
    state = {name: tensor.contiguous() for name, tensor in reference.state_dict().items()}
    path = tmp_path / f"small{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    model = vitkit.load_model(path, num_heads=4)  # torchvision's tensors do not show the head count
    assert model.arch.representation_size == 24
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=0)


def test_pre_0_13_mlp_names_are_read(tmp_path):
    reference = small_torchvision_vit()
    renamed = {
        name.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): tensor
        for name, tensor in reference.state_dict().items()
    }
    assert any("linear_1" in name for name in renamed)
    torch.save(renamed, tmp_path / "old.pth")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vitkit.load_model(tmp_path / "old.pth", num_heads=4)(images), reference(images), atol=1e-5, rtol=0)


def test_convert_keeps_torchvision_numerics(tmp_path):
    reference = small_torchvision_vit(num_classes=3)
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    assert main(["convert", str(tmp_path / "tv.pth"), str(tmp_path / "tv.safetensors"), "--num-heads", "4"]) == 0
    converted = vitkit.load_model(tmp_path / "tv.safetensors")
    assert converted.arch.num_heads == 4 and converted.arch.gelu == "erf"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(images), reference(images), atol=1e-5, rtol=0)


def test_conv_stem_variant_is_refused_in_one_line(tmp_path):
    stem = [tv.ConvStemConfig(out_channels=16, kernel_size=3, stride=2) for _ in range(3)]
    torch.save(small_torchvision_vit(conv_stem_configs=stem).state_dict(), tmp_path / "stem.pth")
    with pytest.raises(vitkit.VitkitError, match="convolutional stem") as caught:
        vitkit.load_model(tmp_path / "stem.pth", num_heads=4)
    assert "\n" not in str(caught.value)
