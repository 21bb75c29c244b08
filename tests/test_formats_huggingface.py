"""Hugging Face ViT checkpoints (save_pretrained folders), on small random configs: transformers is the oracle."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open

import vitkit
from vitkit.cli import main

transformers = pytest.importorskip("transformers")

LABELS = ["ant", "bee", "cat"]


def hf_config(**changes):
    options = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
        id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)},
    )
    return transformers.ViTConfig(**{**options, **changes})


def saved(model, folder):
    torch.manual_seed(0)
    # Random, not the init's zeros and ones, so that every tensor's mapping shows in the logits.
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            scale = 1.0 if "layernorm" in name and name.endswith("weight") else 0.0
            tensor.copy_(scale + torch.randn_like(tensor) * 0.2)
    model.eval().save_pretrained(folder)
    return model


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_image_classification_folder_gives_transformers_logits_and_labels(tmp_path, images):
    reference = saved(transformers.ViTForImageClassification(hf_config()), tmp_path / "vit")
    model, card = vitkit.load_model(tmp_path / "vit", with_card=True)
    assert list(card.class_names) == LABELS
    assert (model.arch.num_heads, model.arch.ln_eps, model.arch.gelu) == (4, 1e-12, "erf")
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(pixel_values=images).logits, atol=1e-5, rtol=0)


def test_pytorch_model_bin_folder_and_tanh_gelu_config(tmp_path, images):
    config = hf_config(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    reference = saved(transformers.ViTForImageClassification(config), tmp_path / "st")
    # The older format: the same on-disk names pickled into pytorch_model.bin.
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin" / "config.json")
    with safe_open(str(tmp_path / "st" / "model.safetensors"), "pt") as handle:
        torch.save({name: handle.get_tensor(name) for name in handle.keys()}, tmp_path / "bin" / "pytorch_model.bin")
    model = vitkit.load_model(tmp_path / "bin")
    assert (model.arch.gelu, model.arch.ln_eps) == ("tanh", 1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(pixel_values=images).logits, atol=1e-5, rtol=0)


def test_lone_weights_file_uses_the_config_beside_it(tmp_path, images):
    reference = saved(transformers.ViTForImageClassification(hf_config(layer_norm_eps=1e-5)), tmp_path / "vit")
    model, card = vitkit.load_model(tmp_path / "vit" / "model.safetensors", with_card=True)
    assert model.arch.ln_eps == 1e-5 and list(card.class_names) == LABELS
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(pixel_values=images).logits, atol=1e-5, rtol=0)


def test_vit_model_with_pooler_returns_pooler_output(tmp_path, images):
    reference = saved(transformers.ViTModel(hf_config()), tmp_path / "vit")
    model = vitkit.load_model(tmp_path / "vit")
    assert model.arch.num_classes == 0 and model.arch.representation_size == 32
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(pixel_values=images).pooler_output, atol=1e-5, rtol=0)


def test_vit_model_without_pooler_returns_the_class_token_features(tmp_path, images):
    reference = saved(transformers.ViTModel(hf_config(), add_pooling_layer=False), tmp_path / "vit")
    model = vitkit.load_model(tmp_path / "vit")
    with torch.no_grad():
        expected = reference(pixel_values=images).last_hidden_state[:, 0]
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=0)


def test_transformers_5_in_memory_names_are_read(tmp_path, images):
    reference = saved(transformers.ViTForImageClassification(hf_config()), tmp_path / "vit")
    assert any(".q_proj." in name for name in reference.state_dict())
    torch.save(reference.state_dict(), tmp_path / "plain.pth")  # no config.json beside it: ViTConfig's defaults
    model = vitkit.load_model(tmp_path / "plain.pth", num_heads=4)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(pixel_values=images).logits, atol=1e-5, rtol=0)


def test_larger_images_match_transformers_position_interpolation(tmp_path):
    reference = saved(transformers.ViTForImageClassification(hf_config()), tmp_path / "vit")
    model = vitkit.load_model(tmp_path / "vit", image_size=64)
    large = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(pixel_values=large, interpolate_pos_encoding=True).logits
        torch.testing.assert_close(model(large), expected, atol=1e-5, rtol=0)


def test_convert_to_safetensors_and_ckpt(tmp_path, capsys, images):
    reference = saved(transformers.ViTForImageClassification(hf_config()), tmp_path / "vit")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "vit"), str(tmp_path / "vit.safetensors")]) == 0
    converted, card = vitkit.load_model(tmp_path / "vit.safetensors", with_card=True)
    assert list(card.class_names) == LABELS and converted.arch.ln_eps == 1e-12
    with torch.no_grad():
        torch.testing.assert_close(converted(images), reference(pixel_values=images).logits, atol=1e-5, rtol=0)
    assert main(["convert", str(tmp_path / "vit"), str(tmp_path / "vit.ckpt")]) == 0
    assert "vitkit: warning:" in capsys.readouterr().err  # MindSpore will run these weights with its own numerics
    back = vitkit.load_model(tmp_path / "vit.ckpt", num_heads=4)
    for name, tensor in converted.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "edit, fragment",
    [
        ({"model_type": "deit"}, "'deit' model"),
        ({"hidden_act": "relu"}, "hidden_act 'relu'"),
        ({"image_size": [32, 64]}, "square images"),
    ],
)
def test_unsupported_configs_get_one_line(tmp_path, capsys, edit, fragment):
    saved(transformers.ViTForImageClassification(hf_config()), tmp_path / "vit")
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    (tmp_path / "vit" / "config.json").write_text(json.dumps({**config, **edit}))
    capsys.readouterr()  # save_pretrained's progress bar
    with pytest.raises(vitkit.VitkitError, match=fragment) as caught:
        vitkit.load_model(tmp_path / "vit")
    assert "\n" not in str(caught.value)
    assert main(["convert", str(tmp_path / "vit"), str(tmp_path / "out.safetensors")]) == 2
    assert capsys.readouterr().err.startswith("vitkit: error: ")


def test_folder_without_weights_or_config_is_explained(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(vitkit.VitkitError, match="Hugging Face model folder"):
        vitkit.load_model(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(vitkit.VitkitError, match="has no model.safetensors or pytorch_model.bin"):
        vitkit.load_model(tmp_path / "empty")


def test_sharded_checkpoint_folder_is_read_through_its_index(tmp_path, images):
    reference = saved(transformers.ViTForImageClassification(hf_config()), tmp_path / "vit")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    with torch.no_grad():
        model = vitkit.load_model(tmp_path / "sharded")
        torch.testing.assert_close(model(images), reference(pixel_values=images).logits, atol=1e-5, rtol=0)
