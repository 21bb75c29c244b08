"""load_model / save_model / convert: timm as the oracle, round trips, and every bad checkpoint answered in one line."""
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

import vitkit
from vitkit.cli import main
from vitkit.model.loading import read_weights

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch32_224", "vit_base_patch16_224"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_loads_to_timms_logits(tmp_path, name, suffix):
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False).eval()
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".pth":
        torch.save(reference.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = vitkit.load_model(path)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=0)
    assert model.arch.ln_eps == 1e-6 and model.arch.gelu == "erf" and not model.training


def test_timm_mean_pool_model_with_fc_norm_loads(tmp_path):
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool="avg", img_size=64).eval()
    torch.save(reference.state_dict(), tmp_path / "avg.pth")
    model = vitkit.load_model(tmp_path / "avg.pth")
    assert model.arch.pool == "mean" and model.arch.fc_norm and model.arch.image_size == 64
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_vitkit_files_keep_architecture_numerics_and_class_names(tmp_path, suffix):
    # Six heads and tanh GELU cannot be read from the shapes: the file's metadata must carry them.
    model = vitkit.create_model("vit_tiny_patch16", image_size=32, num_heads=6, num_classes=3, style="mindspore").eval()
    path = vitkit.save_model(model, tmp_path / f"m{suffix}", class_names=["cat", "dog", "eel"])
    loaded, card = vitkit.load_model(path, with_card=True)
    assert loaded.arch == model.arch
    assert card.class_names == ("cat", "dog", "eel")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_ddp_and_compile_prefixes_and_wrapping_dicts_are_unwrapped(tmp_path):
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    wrapped = {"epoch": 3, "state_dict": {f"module._orig_mod.{k}": v for k, v in reference.state_dict().items()}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    model = vitkit.load_model(tmp_path / "wrapped.pth")
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=0)


def test_load_at_a_new_image_size_resamples_position_embeddings(tmp_path):
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), tmp_path / "t.pth")
    model = vitkit.load_model(tmp_path / "t.pth", image_size=384)
    assert model.pos_embed.shape == (1, 1 + 24 * 24, 192)
    assert model(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


def test_head_count_is_guessed_with_a_warning_when_nothing_says_it(tmp_path):
    model = vitkit.create_model("vit_tiny_patch16", image_size=32, embed_dim=128, num_heads=4, mlp_dim=256, depth=2)
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    with pytest.warns(UserWarning, match="assuming 2"):
        guessed = vitkit.load_model(tmp_path / "plain.pth")
    assert guessed.arch.num_heads == 2
    assert vitkit.load_model(tmp_path / "plain.pth", num_heads=4).arch.num_heads == 4


def test_convert_command_writes_safetensors_that_load_back(tmp_path, capsys):
    reference = timm.create_model("vit_small_patch32_224", pretrained=False).eval()
    torch.save(reference.state_dict(), tmp_path / "s.pth")
    assert main(["convert", str(tmp_path / "s.pth"), str(tmp_path / "s.safetensors")]) == 0
    assert "heads 6" in capsys.readouterr().out
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(vitkit.load_model(tmp_path / "s.safetensors")(images), reference(images), atol=1e-5, rtol=0)


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def _write_bad_files(tmp_path):
    reference = vitkit.create_model("vit_tiny_patch16", image_size=32, depth=2)
    state = reference.state_dict()
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "noise.bin").write_bytes(bytes(range(256)) * 4)
    torch.save({"model": state, "payload": _Payload()}, tmp_path / "unsafe.pth")
    good = tmp_path / "good.safetensors"
    vitkit.save_model(reference, good)
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:2000])
    missing = dict(state)
    del missing["blocks.1.mlp.fc2.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    torch.save({**state, "blocks.0.attn.q_norm.weight": torch.ones(64)}, tmp_path / "extra.pth")
    torch.save({"optimizer": {"lr": torch.tensor(0.1)}, "step": torch.tensor(3)}, tmp_path / "notvit.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")
    (tmp_path / "folder").mkdir()


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("absent.pth", "does not exist"),
        ("empty.pth", "not a checkpoint vitkit can read"),
        ("noise.bin", "not a checkpoint vitkit can read"),
        ("unsafe.pth", "never runs"),
        ("truncated.safetensors", "not a readable safetensors file"),
        ("missing.pth", "missing 1 tensor(s) e.g. blocks.1.mlp.fc2.weight"),
        ("extra.pth", "1 unexpected e.g. blocks.0.attn.q_norm.weight"),
        ("notvit.pth", "not a ViT"),
        ("list.pth", "not a state_dict"),
        ("other.zip", "neither a PyTorch checkpoint"),
        ("folder", "is a folder"),
    ],
)
def test_bad_checkpoints_get_one_line_and_exit_status_2(tmp_path, capsys, name, fragment):
    _write_bad_files(tmp_path)
    with pytest.raises(vitkit.VitkitError) as caught:
        vitkit.load_model(tmp_path / name)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    assert main(["convert", str(tmp_path / name), str(tmp_path / "out.safetensors")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("vitkit: error: ")
    assert "pickled code ran" not in captured.out
    assert not (tmp_path / "out.safetensors").exists()


def test_a_failed_convert_never_replaces_an_existing_output(tmp_path):
    model = vitkit.create_model("vit_tiny_patch16", image_size=32, depth=1)
    out = vitkit.save_model(model, tmp_path / "out.safetensors")
    before = out.read_bytes()
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    assert main(["convert", str(tmp_path / "bad.pth"), str(out)]) == 2
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "out.safetensors"]


def test_read_weights_never_unpickles_arbitrary_objects(tmp_path):
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(vitkit.VitkitError):
        read_weights(tmp_path / "evil.pth")
