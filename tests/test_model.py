"""The ViT family: presets, parameter counts, numerics, init schemes, and the components hook."""
import math

import pytest
import torch
from torch import nn

import vitkit
from vitkit.model.summary import count_macs, count_params
from vitkit.model.vit import ViTComponents, make_arch, resample_pos_embed, sincos_pos_embed


def test_base_patch32_with_1001_classes_has_the_originals_parameter_count():
    # 88,225,001 is what the MindSpore model zoo's ViT-B/32 reports.
    model = vitkit.create_model("vit_base_patch32", num_classes=1001, style="mindspore")
    assert sum(p.numel() for p in model.parameters()) == 88_225_001
    assert count_params(model.arch) == 88_225_001


@pytest.mark.parametrize(
    "name, params",
    # timm's published counts for its ImageNet-1k models (1000 classes).
    [("vit_tiny_patch16_224", 5_717_416), ("vit_small_patch16_224", 22_050_664), ("vit_base_patch16_224", 86_567_656),
     ("vit_large_patch16_224", 304_326_632), ("vit_huge_patch14_224", 632_045_800)],
)
def test_preset_parameter_counts_match_timm_published_counts(name, params):
    assert count_params(make_arch(name)) == params


def test_required_presets_exist():
    names = set(vitkit.list_models())
    for size in ("tiny", "small", "base", "large"):
        for patch in (16, 32):
            assert f"vit_{size}_patch{patch}" in names
    assert {"vit_base_patch8", "vit_huge_patch14"} <= names


def test_macs_of_base_patch16_match_the_usual_17_6_gmacs():
    assert count_macs(make_arch("vit_base_patch16")) / 1e9 == pytest.approx(17.56, abs=0.01)


def test_mindspore_style_sets_the_originals_numerics_and_regularisation():
    model = vitkit.create_model("vit_tiny_patch16", style="mindspore")
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == 1e-7 for m in norms)
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert gelus and all(m.approximate == "tanh" for m in gelus)
    rates = [block.drop_path1.rate for block in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert all(b - a > 0 for a, b in zip(rates, rates[1:]))  # linear rise, as np.linspace(0, 0.1, depth)


def test_mindspore_init_matches_the_originals_distributions():
    torch.manual_seed(0)
    model = vitkit.create_model("vit_base_patch32", num_classes=1001, style="mindspore")
    # Xavier-uniform bounds observed on the original: 0.0625 for 768x768, 0.0395 for 768x3072, 0.0582 for the head.
    q_weight = model.blocks[0].attn.qkv.weight[:768]
    assert q_weight.abs().max().item() == pytest.approx(0.0625, rel=0.01)
    assert model.blocks[0].mlp.fc1.weight.abs().max().item() == pytest.approx(0.0395, rel=0.01)
    assert model.head.weight.abs().max().item() == pytest.approx(0.0582, rel=0.01)
    # The stem is a dense layer over 3*32*32 inputs: bound sqrt(6 / (3072 + 768)).
    assert model.patch_embed.proj.weight.abs().max().item() == pytest.approx(math.sqrt(6 / 3840), rel=0.01)
    assert all(m.bias.abs().max() == 0 for m in model.modules() if isinstance(m, nn.Linear))
    assert model.pos_embed.std().item() == pytest.approx(1.0, rel=0.05)  # N(0, 1), not 0.02


def test_timm_init_uses_small_truncated_normal_weights():
    torch.manual_seed(0)
    model = vitkit.create_model("vit_small_patch16", style="timm")
    assert model.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)


def test_dropout_is_off_in_eval_and_active_in_training():
    model = vitkit.create_model("vit_tiny_patch32", image_size=64, style="mindspore")
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_mean_pooling_without_class_token_uses_all_patches():
    model = vitkit.create_model("vit_tiny_patch16", image_size=32, class_token=False, pool="mean").eval()
    tokens = model.forward_features(torch.randn(1, 3, 32, 32))
    assert tokens.shape == (1, 4, 192)
    assert "cls_token" not in model.state_dict()
    torch.testing.assert_close(model.forward_head(tokens), model.head(tokens.mean(1)))


def test_sincos_position_embedding_is_fixed_and_not_saved():
    model = vitkit.create_model("vit_tiny_patch16", image_size=64, pos_embed="sincos")
    assert "pos_embed" not in model.state_dict()
    table = sincos_pos_embed(grid=4, width=192, num_prefix_tokens=1)
    assert table.shape == (1, 17, 192) and torch.all(table[0, 0] == 0)
    # Patch (row 0, col 1): the first quarter holds sin(col * freq), freq[0] = 1.
    assert table[0, 2, 0].item() == pytest.approx(math.sin(1.0))


def test_resampled_position_embedding_keeps_class_token_and_a_constant_grid():
    pos = torch.cat([torch.full((1, 1, 8), 7.0), torch.full((1, 16, 8), 3.0)], dim=1)
    out = resample_pos_embed(pos, new_grid=6, num_prefix_tokens=1)
    assert out.shape == (1, 37, 8)
    assert torch.all(out[0, 0] == 7.0)
    torch.testing.assert_close(out[0, 1:], torch.full((36, 8), 3.0))


def test_any_image_size_divisible_by_the_patch_and_any_class_count():
    model = vitkit.create_model("vit_tiny_patch16", image_size=48, num_classes=3).eval()
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 3)


class _ReluParts(ViTComponents):
    def activation(self, arch):
        return nn.ReLU()


def test_components_hook_swaps_a_part_by_class_or_dotted_path():
    by_class = vitkit.create_model("vit_tiny_patch16", image_size=32, components=_ReluParts)
    assert isinstance(by_class.blocks[0].mlp.act, nn.ReLU)
    by_path = vitkit.create_model("vit_tiny_patch16", image_size=32, components=f"{__name__}._ReluParts")
    assert isinstance(by_path.blocks[0].mlp.act, nn.ReLU)


def _logits_and_grads(model, images, forward):
    torch.manual_seed(11)  # the same stochastic-depth draws on both paths
    model.zero_grad()
    logits = forward(images)
    logits.square().sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_class_token_pooling_computes_only_the_class_token_in_the_last_block(qkv_bias):
    model = vitkit.create_model("vit_tiny_patch16", image_size=32, depth=3, num_classes=5, qkv_bias=qkv_bias,
                                drop_path_rate=0.2, style="timm")
    assert model._last_block_class_token_only()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    every_token = lambda x: model.forward_head(model.forward_features(x))  # noqa: E731 - all tokens, all blocks
    for training in (False, True):
        model.train(training)
        fast, fast_grads = _logits_and_grads(model, images, model)
        full, full_grads = _logits_and_grads(model, images, every_token)
        torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
        for name, grad in full_grads.items():
            # float32 sums in another order differ by up to about 1e-6 of the tensor's largest gradient (8e-7 seen
            # on torch 2.11 and 2.14); a wrong token or weight would differ by the gradients themselves.
            scale = grad.abs().max().item()
            torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    # The last block really shrank to one token: its MLP saw (batch, 1, width).
    seen = []
    model.blocks[-1].mlp.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    model.blocks[0].mlp.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    model(images)
    assert seen == [(4, 5, 192), (4, 1, 192)]


def test_class_token_only_last_block_trains_like_timm():
    # An independent truth for the shortcut: timm's model (every token through every block) with the same weights
    # gives the same training logits and the same gradient for every parameter.
    timm = pytest.importorskip("timm")
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, num_classes=5)
    model = vitkit.create_model("vit_tiny_patch16", image_size=32, depth=3, num_classes=5, style="timm")
    model.load_state_dict(reference.state_dict())
    assert model._last_block_class_token_only()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours, our_grads = _logits_and_grads(model.train(), images, model)
    theirs, their_grads = _logits_and_grads(reference.train(), images, reference)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert our_grads.keys() == their_grads.keys()
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


class _OwnBlock(vitkit.model.vit.Block):
    def forward(self, x):  # a swapped-in block without the keep_tokens argument
        return super().forward(x)


class _OwnBlockParts(ViTComponents):
    block = _OwnBlock


def test_mean_pooling_and_swapped_blocks_run_every_token():
    mean = vitkit.create_model("vit_tiny_patch16", image_size=32, depth=2, pool="mean", class_token=False)
    own = vitkit.create_model("vit_tiny_patch16", image_size=32, depth=2, components=_OwnBlockParts)
    assert not mean._last_block_class_token_only() and not own._last_block_class_token_only()
    images = torch.randn(2, 3, 32, 32)
    for model in (mean.eval(), own.eval()):
        torch.testing.assert_close(model(images), model.forward_head(model.forward_features(images)))
    # A block swapped in after the model was built runs whole too.
    late = vitkit.create_model("vit_tiny_patch16", image_size=32, depth=2).eval()
    late.blocks[-1] = own.blocks[-1]
    assert not late._last_block_class_token_only()
    torch.testing.assert_close(late(images), late.forward_head(late.forward_features(images)))


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: vitkit.create_model("vit_tiny_patch16", image_size=100), "not a multiple of patch_size 16"),
        (lambda: vitkit.create_model("vit_tinny_patch16"), "did you mean 'vit_tiny_patch16'"),
        (lambda: vitkit.create_model("vit_tiny_patch16", depht=3), "did you mean 'depth'"),
        (lambda: vitkit.create_model("vit_tiny_patch16", pool="max"), "pool 'max' is not one of"),
        (lambda: vitkit.create_model("vit_tiny_patch16", components="nosuchmodule.Parts"), "cannot import model components"),
        (lambda: vitkit.create_model("vit_tiny_patch16", components="Parts"), "not a dotted path"),
        (lambda: vitkit.create_model("vit_tiny_patch16", style="flax"), "unknown style 'flax'"),
        (lambda: vitkit.create_model("vit_tiny_patch16")(torch.randn(1, 3, 32, 32)), "input is 32x32"),
    ],
)
def test_bad_model_arguments_are_one_clear_line(make, fragment):
    with pytest.raises(vitkit.VitkitError) as caught:
        make()
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_the_originals_vit_config_path_key_swaps_components_from_a_config():
    from vitkit.config import load_config
    from vitkit.engine.build import build_model

    cfg = load_config(None, ["--backbone=vit_tiny_patch16", "--train_image_size=32", "--eval_image_size=32",
                             f"--vit_config_path={__name__}._ReluParts"])
    assert isinstance(build_model(cfg.model).blocks[0].mlp.act, nn.ReLU)
    default = load_config(None, ["--backbone=vit_tiny_patch16", "--vit_config_path=src.vit.VitConfig"])
    assert default.model.components == "" and any("src.vit.VitConfig" in note for note in default.notes)
