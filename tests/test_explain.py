"""Attention maps and rollout against independent truths: timm's blocks, hand-set attention, hand products."""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.data.transforms import eval_transform, normalize_batch
from vitkit.errors import VitkitError
from vitkit.model.vit import Block, ViTComponents
from vitkit.viz.explain import FIGURE_DPI, FIGURE_INCHES, attention_probabilities, attention_rollout, explain_image

pytest.importorskip("matplotlib")

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, image_size=32, num_classes=3)


def _tiny(seed: int = 0, **overrides) -> vitkit.VisionTransformer:
    torch.manual_seed(seed)
    return vitkit.create_model("vit_tiny_patch16", **{**TINY, **overrides}).eval()


def _write_png(path, width=50, height=40, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_attention_probabilities_match_timm_by_hand():
    timm = pytest.importorskip("timm")
    model = _tiny(style="timm")  # timm's numerics (erf GELU, LayerNorm eps 1e-6), the reference's
    with torch.no_grad():  # far from init: distinct tokens and sharp attention, so the comparison means something
        model.cls_token.normal_()
        model.pos_embed.normal_()
        for block in model.blocks:
            block.attn.qkv.weight.normal_(std=0.5)
            block.attn.qkv.bias.normal_()
    reference = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        mlp_ratio=2.0, num_classes=3,
    ).eval()
    reference.load_state_dict(model.state_dict())
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    # timm runs every token through every block; its norm1 outputs give q and k by hand.
    inputs = []
    hooks = [block.norm1.register_forward_hook(lambda m, a, out: inputs.append(out)) for block in reference.blocks]
    with torch.no_grad():
        reference.forward_features(images)
    for hook in hooks:
        hook.remove()
    expected = []
    for block, normed in zip(reference.blocks, inputs):
        attn = block.attn
        batch, tokens, width = normed.shape
        qkv = attn.qkv(normed).reshape(batch, tokens, 3, attn.num_heads, width // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        expected.append(((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1).detach())

    got = attention_probabilities(model, images)
    assert len(got) == 2
    for ours, theirs in zip(got, expected):
        assert ours.shape == (3, 2, 17, 17)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # The maps are far from uniform (1/17 per entry).
    assert all((layer.amax(dim=-1) > 0.5).any() for layer in got)


def test_rollout_of_uniform_attention_matches_hand_product():
    model = _tiny()
    with torch.no_grad():  # q = k = 0: every score 0, every attention row uniform
        for block in model.blocks:
            block.attn.qkv.weight[:64].zero_()
            block.attn.qkv.bias[:64].zero_()
    probabilities = attention_probabilities(model, torch.randn(2, 3, 32, 32))
    tokens = 17
    uniform = np.full((tokens, tokens), 1.0 / tokens)
    for layer in probabilities:
        np.testing.assert_allclose(layer.numpy(), np.broadcast_to(uniform, layer.shape), atol=1e-7)
    layer = 0.5 * uniform + 0.5 * np.eye(tokens)  # (U + I) with rows renormalised
    expected = layer @ layer
    np.testing.assert_allclose(expected, 0.75 * uniform + 0.25 * np.eye(tokens), atol=1e-12)  # U @ U = U
    rollout = attention_rollout(probabilities)
    assert rollout.shape == (2, tokens, tokens)
    for sample in rollout:
        np.testing.assert_allclose(sample.numpy(), expected, atol=1e-6)


def test_rollout_of_three_tokens_by_hand():
    # Two layers, two heads, three tokens (token 0 the class token); no ties among a row's patch entries.
    first = torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]],
                          [[0.2, 0.2, 0.6], [0.4, 0.4, 0.2], [0.3, 0.3, 0.4]]])
    second = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.25, 0.25], [0.0, 0.5, 0.5]],
                           [[0.0, 0.6, 0.4], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]])
    probabilities = [first[None], second[None]]

    # Mean of heads, plus I; each row then sums to 2. Worked out by hand.
    a1 = np.array([[1.4, 0.25, 0.35], [0.3, 1.45, 0.25], [0.2, 0.2, 1.6]]) / 2
    a2 = np.array([[1.5, 0.3, 0.2], [0.5, 1.275, 0.225], [0.1, 0.35, 1.55]]) / 2
    np.testing.assert_allclose(attention_rollout(probabilities)[0].numpy(), a2 @ a1, atol=1e-6)

    # Max over heads: rows no longer sum to 1 before the identity, so each renormalises by its own sum.
    m1 = np.array([[1.6, 0.3, 0.6], [0.4, 1.5, 0.3], [0.3, 0.3, 1.8]])
    m2 = np.array([[2.0, 0.6, 0.4], [0.5, 1.3, 0.25], [0.2, 0.5, 1.6]])
    m1, m2 = m1 / m1.sum(1, keepdims=True), m2 / m2.sum(1, keepdims=True)
    np.testing.assert_allclose(attention_rollout(probabilities, head_fusion="max")[0].numpy(), m2 @ m1, atol=1e-6)

    # discard_ratio 0.5: of each row's two patch entries (columns 1, 2) the lower is zeroed; column 0 never is
    # (layer 1's last row keeps its class-token 0.2 though it equals the dropped patch entry).
    d1 = np.array([[1.4, 0.0, 0.35], [0.3, 1.45, 0.0], [0.2, 0.0, 1.6]])
    d2 = np.array([[1.5, 0.3, 0.0], [0.5, 1.275, 0.0], [0.1, 0.0, 1.55]])
    d1, d2 = d1 / d1.sum(1, keepdims=True), d2 / d2.sum(1, keepdims=True)
    got = attention_rollout(probabilities, discard_ratio=0.5)[0].numpy()
    np.testing.assert_allclose(got, d2 @ d1, atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)
    # Without prefix tokens every column may go: layer 2 alone, int(0.34 * 3) = 1 entry per row, row 2 loses column 0.
    n2 = np.array([[1.5, 0.3, 0.0], [0.5, 1.275, 0.0], [0.0, 0.35, 1.55]])
    n2 = n2 / n2.sum(1, keepdims=True)
    got = attention_rollout(probabilities[1:], discard_ratio=0.34, num_prefix_tokens=0)[0].numpy()
    np.testing.assert_allclose(got, n2, atol=1e-6)

    with pytest.raises(VitkitError, match="head fusion"):
        attention_rollout(probabilities, head_fusion="median")
    with pytest.raises(VitkitError, match="discard_ratio"):
        attention_rollout(probabilities, discard_ratio=1.0)


def _expected_top1(model, path):
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    images = normalize_batch(eval_transform(32)(pixels)[None])
    with torch.no_grad():
        probabilities = model(images).softmax(dim=-1)[0]
    return int(probabilities.argmax()), float(probabilities.max())


@pytest.mark.parametrize("overrides", [{}, {"pool": "mean", "class_token": False}], ids=["class-token", "mean-pooled"])
def test_explain_image_writes_the_figure_and_the_models_top1(tmp_path, overrides):
    model = _tiny(seed=3, **overrides)
    with torch.no_grad():  # a decisive head, so the top-1 is not a near tie
        model.head.weight.normal_(std=1.0)
    model.class_names = ["ant", "bee", "cat"]
    image = _write_png(tmp_path / "photo.png")
    out = tmp_path / "maps" / "explain.png"

    result = explain_image(model, image, out)

    top1, probability = _expected_top1(model, image)
    assert result == {"path": str(out), "top1": top1, "probability": pytest.approx(probability, rel=1e-5), "grid": 4}
    with Image.open(out) as written:
        assert written.format == "PNG"
        assert written.size == (int(FIGURE_INCHES[0] * FIGURE_DPI), int(FIGURE_INCHES[1] * FIGURE_DPI))
    assert not [p for p in out.parent.iterdir() if p.name != "explain.png"]  # no temporary file left


def test_explain_image_errors_are_one_line(tmp_path):
    model = _tiny()
    missing = tmp_path / "nowhere.jpg"
    with pytest.raises(VitkitError, match="nowhere.jpg does not exist"):
        explain_image(model, missing, tmp_path / "out.png")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image\n")
    with pytest.raises(VitkitError, match="notes.jpg is not an image"):
        explain_image(model, text, tmp_path / "out.png")
    # A PNG whose header claims 12000 x 10000 pixels (120 MP) over a few bytes of data: refused before decoding.
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 12000, 10000, 8, 2, 0, 0, 0)
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))
    with pytest.raises(VitkitError, match="12000x10000, over 100 megapixels"):
        explain_image(model, huge, tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


class _OwnBlock(Block):
    def forward(self, x):
        return super().forward(x)


class _OwnParts(ViTComponents):
    block = _OwnBlock


def test_swapped_components_and_blockless_models_are_refused(tmp_path):
    own = vitkit.create_model("vit_tiny_patch16", components=_OwnParts, **TINY)
    with pytest.raises(VitkitError, match="_OwnBlock, not vitkit's stock Block"):
        attention_probabilities(own, torch.randn(1, 3, 32, 32))
    empty = _tiny()
    empty.blocks = torch.nn.Sequential()
    with pytest.raises(VitkitError, match="no attention blocks"):
        explain_image(empty, _write_png(tmp_path / "a.png"), tmp_path / "out.png")
