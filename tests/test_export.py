"""vitkit export: ONNX and .pt2 files that compute what the PyTorch model (and timm, as an oracle) computes."""
import collections
import functools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch

import vitkit
from conftest import tiny_config
from vitkit.cli import main
from vitkit.deploy import export as export_module
from vitkit.deploy.export import export_model
from vitkit.engine.trainer import train
from vitkit.errors import VitkitError
from vitkit.model.loading import load_model, load_state

TINY_ARCH = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, image_size=32, num_classes=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny ViT trained for an epoch on class-coloured images: its weights are no longer the init's."""
    from conftest import write_image_folder

    root = tmp_path_factory.mktemp("export")
    write_image_folder(root / "data" / "train", {"ant": 12, "bee": 12, "cat": 12}, seed=1)
    write_image_folder(root / "data" / "val", {"ant": 4, "bee": 3, "cat": 4}, seed=2)
    train(tiny_config(root / "data", root / "run", "--max_epoch=1"))
    return root / "run" / "vit_tiny_patch16-1_4.safetensors"


def _onnxruntime_logits(path, images: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]


def _timm_twin(model) -> torch.nn.Module:
    """timm's own ViT with the same weights: an implementation vitkit shares no code with."""
    arch = model.arch
    twin = timm.models.vision_transformer.VisionTransformer(
        img_size=arch.image_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim, depth=arch.depth,
        num_heads=arch.num_heads, mlp_ratio=arch.mlp_dim / arch.embed_dim, num_classes=arch.num_classes,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=arch.ln_eps),
        act_layer=functools.partial(torch.nn.GELU, approximate="tanh" if arch.gelu == "tanh" else "none"),
    )
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def test_cli_export_with_the_originals_keys_matches_timm_on_trained_weights(trained, tmp_path, capsys):
    out = tmp_path / "vit.mindir"
    code = main(["export", f"--pretrained={trained}", f"--file_name={out}", "--file_format=MINDIR", "--batch_size=2"])
    assert code == 0
    printed = capsys.readouterr().out
    written = tmp_path / "vit.onnx"  # MINDIR is a MindSpore format: the note says ONNX is written instead
    assert written.exists() and not out.exists()
    assert "note: file_format: MINDIR is a MindSpore-only format" in printed
    assert "input 'images' float32 [2, 3, 32, 32]" in printed and "output 'logits' [2, 3]" in printed
    diff = float(printed.split("logit difference: ")[1].split()[0])
    assert diff <= 1e-4
    model = load_model(trained)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = _timm_twin(model)(images).numpy()
    assert np.abs(_onnxruntime_logits(written, images) - expected).max() < 1e-4
    with pytest.raises(Exception):  # a fixed batch: onnxruntime itself refuses another one
        _onnxruntime_logits(written, images[:1])
    # The default opset (23) makes each block's attention one ONNX Attention node; the histogram printed is the file's.
    ops = collections.Counter(node.op_type for node in onnx.load(written).graph.node)
    assert "ONNX opset 23" in printed and ops["Attention"] == 2 and ops["Softmax"] == 0
    assert f"Attention {ops['Attention']}" in printed and f"MatMul {ops['MatMul']}" in printed


@pytest.mark.parametrize("opset", [18, 23])
def test_onnx_on_random_weights_any_batch_and_size(opset, tmp_path):
    # The original's init (N(0,1) class token and position embedding) gives large activations: a harder parity case.
    model = vitkit.create_model("vit_tiny_patch16", style="mindspore", **TINY_ARCH).eval()
    result = export_model(model, tmp_path / "any.onnx", opset=opset, dynamic_batch=True, dynamic_image_size=True)
    assert result.input_shape == ("batch", 3, "height", "width") and result.max_abs_diff <= 1e-4
    ops = collections.Counter(node.op_type for node in onnx.load(tmp_path / "any.onnx").graph.node)
    assert ops == result.op_counts
    # Never the generic masked, dropout or NaN-guarded attention path.
    assert not {"Where", "Dropout", "RandomUniformLike", "Bernoulli", "IsNaN"} & set(ops)
    if opset >= 23:
        assert ops["Attention"] == 2 and ops["Softmax"] == 0  # one fused ONNX Attention node per block
    else:
        # scaled_dot_product_attention's math form, q@k -> Softmax -> @v per block. Four projections per block,
        # plus one: the last block projects the class token's query apart from every token's keys and values.
        assert ops["Softmax"] == 2 and ops["Attention"] == 0 and ops["MatMul"] == 2 * 2 + 2 * 4 + 1
    images = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    resized = vitkit.create_model("vit_tiny_patch16", style="mindspore", **{**TINY_ARCH, "image_size": 48}).eval()
    load_state(resized, model.state_dict())  # position embeddings resampled by vitkit's loader, outside the graph
    with torch.no_grad():
        expected = resized(images).numpy()
    assert np.abs(_onnxruntime_logits(tmp_path / "any.onnx", images) - expected).max() < 1e-4


@pytest.mark.parametrize("weights", ["random", "trained"])
def test_pt2_program_matches_pytorch(weights, trained, tmp_path):
    model = load_model(trained) if weights == "trained" else vitkit.create_model("vit_tiny_patch16", style="mindspore", **TINY_ARCH)
    model.eval()
    batch = 5 if weights == "random" else 1
    result = export_model(model, tmp_path / "m.pt2", "PT2", dynamic_batch=weights == "random")
    assert result.max_abs_diff <= 1e-4
    program = torch.export.load(tmp_path / "m.pt2").module()
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(program(images), model(images), atol=1e-5)


def test_a_failed_check_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)  # every difference, even 0, is then too large
    model = vitkit.create_model("vit_tiny_patch16", **TINY_ARCH).eval()
    with pytest.raises(VitkitError, match="differ from PyTorch"):
        export_model(model, tmp_path / "bad.pt2", "PT2")
    assert list(tmp_path.iterdir()) == []


def test_int8_copy_is_quantized_and_mostly_agrees(trained, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(trained), f"--file_name={out}", "--export.dynamic_batch=true", "--export.int8=true"]) == 0
    int8 = tmp_path / "m.int8.onnx"
    assert f"wrote {int8}" in capsys.readouterr().out
    ops = collections.Counter(node.op_type for node in onnx.load(int8).graph.node)
    assert ops["DynamicQuantizeLinear"] > 0 and ops["MatMulInteger"] > 0 and ops["ConvInteger"] == 0
    assert int8.stat().st_size < out.stat().st_size
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    fp32, quantized = _onnxruntime_logits(out, images), _onnxruntime_logits(int8, images)
    assert (fp32.argmax(1) == quantized.argmax(1)).mean() >= 0.75


def test_bad_checkpoints_are_one_line_errors(tmp_path, capsys):
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    for model, expected in ((tmp_path / "missing.safetensors", "does not exist"), (corrupt, "truncated")):
        assert main(["export", "--model", str(model), f"--file_name={tmp_path / 'x.onnx'}"]) == 2
        error = capsys.readouterr().err
        assert error.startswith("vitkit: error: ") and error.count("\n") == 1 and expected in error
    assert main(["export", "--model", str(corrupt), "--export.opset=17"]) == 2
    assert "export.opset" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_an_onnx_runtime_too_old_for_the_opset_is_a_one_line_error(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ort, "__version__", "1.22.1")  # the last release without opset 23's Attention
    existing = tmp_path / "m.onnx"
    existing.write_bytes(b"an earlier export")
    assert main(["export", "--model", str(trained), f"--file_name={existing}"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "needs onnxruntime >= 1.23, but 1.22.1 is installed" in error
    assert "export.opset=18" in error and existing.read_bytes() == b"an earlier export"


def test_sincos_models_refuse_a_dynamic_image_size_and_pt2_gets_its_own_suffix(tmp_path):
    # Sin-cos position embeddings are computed per grid, not resampled: a resampled table would give other logits.
    model = vitkit.create_model("vit_tiny_patch16", **TINY_ARCH, pos_embed="sincos")
    with pytest.raises(VitkitError, match="dynamic_image_size.*sincos"):
        export_model(model, tmp_path / "model.onnx", dynamic_image_size=True)
    assert not list(tmp_path.iterdir())
    from vitkit.config import load_config

    config = load_config(None, ["--file_format=PT2"])  # the default file name ends in .onnx
    assert config.export.file_name == "vit_base_patch32.pt2"


def test_models_over_two_gigabytes_are_refused_as_onnx(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "_ONNX_SINGLE_FILE_LIMIT", 1000)  # stands for ViT-H's 2.5 GB
    model = vitkit.create_model("vit_tiny_patch16", **TINY_ARCH)
    with pytest.raises(VitkitError, match="2 GB single-file limit: export it as PT2"):
        export_model(model, tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())


def test_export_leaves_the_callers_model_as_it_was(tmp_path):
    model = vitkit.create_model("vit_tiny_patch16", **TINY_ARCH).train()
    export_model(model, tmp_path / "m.pt2", "PT2")
    assert model.training  # the caller's training loop goes on with dropout as it was


def test_a_file_name_without_the_formats_suffix_gets_it_as_the_originals_export_did(trained, tmp_path, capsys,
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--model", str(trained), "--file_name=model", "--file_format=ONNX"]) == 0
    assert "wrote model.onnx (ONNX" in capsys.readouterr().out
    assert [path.name for path in tmp_path.iterdir()] == ["model.onnx"]
    assert _onnxruntime_logits(tmp_path / "model.onnx", torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    # MindSpore appends the suffix to any name that does not end in it, dots in the name or not.
    for name, file_format, written in (("model", "PT2", "model.pt2"), ("vit.b32", "ONNX", "vit.b32.onnx"),
                                       ("out/kept.ONNX", "ONNX", "out/kept.ONNX"), ("kept.pt2", "pt2", "kept.pt2")):
        assert export_module.with_format_suffix(name, file_format) == Path(written)
