"""Flax ViT .npz files (ViT paper / AugReg / big_vision), generated here in their own layouts on random weights.

Oracle: timm's own npz loader (`timm.models.vision_transformer._load_weights`) into a timm model given the Flax
numerics (LayerNorm eps 1e-6, tanh GELU: flax.linen.gelu's default); where timm has no counterpart (the pre-logits
layer, sin-cos position embeddings) the rest is computed by hand from the file's arrays.
"""
import numpy as np
import pytest
import torch

import vitkit
from vitkit.cli import main

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT, _load_weights  # noqa: E402

WIDTH, DEPTH, HEADS, MLP, PATCH, IMAGE, CLASSES = 32, 2, 2, 64, 8, 32, 5
GRID = IMAGE // PATCH


def flax_arrays(layout="paper", class_token=True, pos="learn", pre_logits=0, seed=0):
    """The arrays a Flax ViT saves, by '/'-joined parameter path, with random values.

    layout 'paper': the ViT paper / AugReg module names; 'big_vision': big_vision's; 'scanned': big_vision's with
    every block stacked along a first axis. pos 'learn' stores the embedding as the layout does; 'none' stores none.
    """
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(name):
        return {f"{name}/scale": 1.0 + rand(WIDTH, scale=0.1), f"{name}/bias": rand(WIDTH, scale=0.1)}

    hd = WIDTH // HEADS
    attn, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if layout == "paper" else (
        "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    blocks = []
    for _ in range(DEPTH):
        block = {**norm("LayerNorm_0"), **norm(ln2)}
        for part in ("query", "key", "value"):
            block[f"{attn}/{part}/kernel"] = rand(WIDTH, HEADS, hd)
            block[f"{attn}/{part}/bias"] = rand(HEADS, hd, scale=0.1)
        block[f"{attn}/out/kernel"] = rand(HEADS, hd, WIDTH)
        block[f"{attn}/out/bias"] = rand(WIDTH, scale=0.1)
        block[f"{mlp}/Dense_0/kernel"], block[f"{mlp}/Dense_0/bias"] = rand(WIDTH, MLP), rand(MLP, scale=0.1)
        block[f"{mlp}/Dense_1/kernel"], block[f"{mlp}/Dense_1/bias"] = rand(MLP, WIDTH), rand(WIDTH, scale=0.1)
        blocks.append(block)
    arrays = {"embedding/kernel": rand(PATCH, PATCH, 3, WIDTH, scale=0.05), "embedding/bias": rand(WIDTH, scale=0.1)}
    if layout == "scanned":
        arrays.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]})
    else:
        for i, block in enumerate(blocks):
            arrays.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in block.items()})
    arrays.update({f"Transformer/{k}": v for k, v in norm("encoder_norm").items()})
    if class_token:
        arrays["cls"] = rand(1, 1, WIDTH)
    if pos == "learn" and layout == "paper":
        # The ViT paper concatenates the class token first, so its table has a slot for it.
        arrays["Transformer/posembed_input/pos_embedding"] = rand(1, GRID * GRID + int(class_token), WIDTH)
    elif pos == "learn":
        arrays["pos_embedding"] = rand(1, GRID * GRID, WIDTH)
    head_in = WIDTH
    if pre_logits:
        arrays["pre_logits/kernel"], arrays["pre_logits/bias"] = rand(WIDTH, pre_logits), rand(pre_logits)
        head_in = pre_logits
    arrays["head/kernel"], arrays["head/bias"] = rand(head_in, CLASSES), rand(CLASSES)
    return arrays


def save_npz(path, arrays, prefix=""):
    np.savez(path, **{prefix + name: value for name, value in arrays.items()})
    return path


def timm_oracle(path, class_token=True, embed_class=True, num_classes=CLASSES):
    model = TimmViT(
        img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / WIDTH,
        num_classes=num_classes, class_token=class_token, no_embed_class=not embed_class,
        global_pool="token" if class_token else "avg", fc_norm=False, act_layer="gelu_tanh",
    ).eval()
    _load_weights(model, str(path))
    return model


@pytest.fixture
def images():
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("prefix", ["", "opt/target/"])
def test_vit_paper_layout_matches_timms_npz_loader(tmp_path, images, prefix):
    arrays = flax_arrays("paper")
    if prefix:
        # The ViT paper's training checkpoints keep the optimizer state beside the weights.
        arrays["../state/param_states/head/kernel/v"] = np.ones((WIDTH, CLASSES), np.float32)
    path = save_npz(tmp_path / "ViT-tiny.npz", arrays, prefix)
    model = vitkit.load_model(path)
    assert (model.arch.num_heads, model.arch.ln_eps, model.arch.gelu, model.arch.pool) == (HEADS, 1e-6, "tanh", "token")
    with torch.no_grad():
        torch.testing.assert_close(model(images), timm_oracle(path)(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["big_vision", "scanned"])
def test_big_vision_gap_layout_matches_timms_npz_loader(tmp_path, images, layout):
    path = save_npz(tmp_path / "bv.npz", flax_arrays(layout, class_token=False), prefix="params/")
    model = vitkit.load_model(path)
    assert model.arch.pool == "mean" and not model.arch.class_token and not model.arch.fc_norm
    with torch.no_grad():
        torch.testing.assert_close(model(images), timm_oracle(path, class_token=False)(images), atol=1e-5, rtol=0)


def test_big_vision_class_token_without_a_position_slot(tmp_path, images):
    # big_vision adds the position embedding before prepending the class token (timm: no_embed_class).
    path = save_npz(tmp_path / "tok.npz", flax_arrays("big_vision", class_token=True), prefix="params/")
    model = vitkit.load_model(path)
    oracle = timm_oracle(path, embed_class=False)
    with torch.no_grad():
        torch.testing.assert_close(model(images), oracle(images), atol=1e-5, rtol=0)


def test_gelu_is_flaxs_tanh_form_not_timms_erf_default(tmp_path, images):
    path = save_npz(tmp_path / "paper.npz", flax_arrays("paper"), prefix="")
    erf = TimmViT(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                  mlp_ratio=MLP / WIDTH, num_classes=CLASSES).eval()
    _load_weights(erf, str(path))
    with torch.no_grad():
        gap = (vitkit.load_model(path)(images) - erf(images)).abs().max()
    assert gap > 1e-4  # the check above would catch the wrong GELU


def test_pre_logits_layer_is_tanh_dense_before_the_head(tmp_path, images):
    arrays = flax_arrays("paper", pre_logits=24)
    path = save_npz(tmp_path / "ViT-B_16-i21k-like.npz", arrays)
    model = vitkit.load_model(path)
    assert model.arch.representation_size == 24
    with torch.no_grad():
        # timm dropped the pre-logits layer; apply it by hand on timm's pooled features, in Flax's (in, out) layout.
        pooled = timm_oracle(path, num_classes=0)(images).numpy()
        hidden = np.tanh(pooled @ arrays["pre_logits/kernel"] + arrays["pre_logits/bias"])
        expected = hidden @ arrays["head/kernel"] + arrays["head/bias"]
        torch.testing.assert_close(model(images), torch.from_numpy(expected), atol=1e-5, rtol=0)


def test_bfloat16_file_loads_exactly_like_its_float32_twin(tmp_path, images):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = {name: value.astype(ml_dtypes.bfloat16) for name, value in flax_arrays("paper").items()}
    bf16_path = save_npz(tmp_path / "bf16.npz", bf16)
    assert np.load(bf16_path)["cls"].dtype == np.dtype("V2")  # how numpy stores ml_dtypes' bfloat16
    twin = save_npz(tmp_path / "fp32.npz", {name: value.astype(np.float32) for name, value in bf16.items()})
    model = vitkit.load_model(bf16_path)
    reference = vitkit.load_model(twin)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert model.pos_embed.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(images), timm_oracle(twin)(images), atol=1e-5, rtol=0)


def posemb_sincos_2d(grid, width, temperature=10_000.0):
    """big_vision's fixed position embedding, written from its definition (MoCo v3)."""
    y, x = np.mgrid[:grid, :grid]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
    y, x = np.outer(y.flatten(), omega), np.outer(x.flatten(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(np.float32)


def test_sincos_file_without_position_table_uses_big_visions_formula(tmp_path, images):
    arrays = flax_arrays("big_vision", class_token=False, pos="none")
    path = save_npz(tmp_path / "sincos.npz", arrays, prefix="params/")
    model = vitkit.load_model(path, image_size=IMAGE)  # nothing in the file says the size: 224 unless told
    assert model.arch.pos_embed == "sincos"
    # The same weights with the table written out, for timm, which only reads learned tables.
    table = save_npz(tmp_path / "table.npz", {**arrays, "pos_embedding": posemb_sincos_2d(GRID, WIDTH)}, prefix="params/")
    with torch.no_grad():
        torch.testing.assert_close(model(images), timm_oracle(table, class_token=False)(images), atol=1e-5, rtol=0)


def test_convert_to_safetensors_keeps_flax_numerics(tmp_path, images):
    path = save_npz(tmp_path / "paper.npz", flax_arrays("paper"))
    assert main(["convert", str(path), str(tmp_path / "paper.safetensors")]) == 0
    converted = vitkit.load_model(tmp_path / "paper.safetensors")
    assert converted.arch == vitkit.load_model(path).arch and converted.arch.gelu == "tanh"
    with torch.no_grad():
        torch.testing.assert_close(converted(images), timm_oracle(path)(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"MAPHead_0/probe": np.zeros((1, 1, WIDTH), np.float32)}, "attention-pooling (MAP) head"),
        ({"conv_root/kernel": np.zeros((7, 7, 3, 64), np.float32)}, "ResNet stem"),
        ({"Transformer/encoderblock_0/LayerNorm_0/scale": None}, "lacks 'Transformer/encoderblock_0/LayerNorm_0/scale'"),
        ({"embedding/kernel": None}, "without a ViT patch embedding"),
        ({"head/kernel": np.array(["a", "b"])}, "not a float type"),
    ],
)
def test_unreadable_npz_files_get_one_line(tmp_path, capsys, change, fragment):
    arrays = flax_arrays("paper")
    for name, value in change.items():
        arrays.pop(name) if value is None else arrays.__setitem__(name, value)
    path = save_npz(tmp_path / "bad.npz", arrays)
    with pytest.raises(vitkit.VitkitError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as caught:
        vitkit.load_model(path)
    assert "\n" not in str(caught.value)
    assert main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
    assert capsys.readouterr().err.startswith("vitkit: error: ")


def test_truncated_npz_is_reported(tmp_path):
    whole = save_npz(tmp_path / "whole.npz", flax_arrays("paper"))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(vitkit.VitkitError) as caught:
        vitkit.load_model(cut)
    assert "\n" not in str(caught.value)


def test_damaged_array_inside_an_intact_archive_is_reported(tmp_path):
    path = save_npz(tmp_path / "whole.npz", flax_arrays("paper"))
    data = bytearray(path.read_bytes())
    member = data.find(b"embedding/kernel.npy")
    data[member + 200 : member + 400] = bytes(200)  # inside the array's bytes: its CRC no longer matches
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(bytes(data))
    with pytest.raises(vitkit.VitkitError, match="damaged") as caught:
        vitkit.load_model(damaged)
    assert "\n" not in str(caught.value)
