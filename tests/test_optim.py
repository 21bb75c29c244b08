"""Decay groups, gradient centralization and AdamW against the original's update written out in numpy."""
import numpy as np
import pytest
import torch
from torch import nn

import vitkit
from vitkit.engine.optim import build_optimizer, centralize_gradients, split_decay_groups
from vitkit.errors import VitkitError


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(width, 3 * width)
        self.attn.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(width, 2 * width)
        self.mlp.fc2 = nn.Linear(2 * width, width)


class TinyViTNames(nn.Module):
    """Only the parameter names and shapes of a timm-style ViT: no forward is needed to split groups."""

    def __init__(self, width=4, depth=2, num_classes=3):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, width))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, 2, stride=2)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)


def stand_in_aliases(name):
    """A few of the original's tags, enough to see aliases matched (the real table is vitkit.model.formats.mindspore)."""
    if name in ("cls_token", "pos_embed"):
        return {"cls_token": ["cls"], "pos_embed": ["pos_embedding"]}[name]
    if ".norm" in name or name.startswith("norm."):
        return [name.replace("weight", "gamma").replace("bias", "beta")]
    if ".attn.qkv." in name:
        return [name.replace("attn.qkv", f"cell.1.to_{part}") for part in "qkv"]
    return []


def names_in(groups, model, index):
    by_id = {id(param): name for name, param in model.named_parameters()}
    return {by_id[id(param)] for param in groups[index]["params"]}


@pytest.fixture(scope="module")
def vit_b32():
    with torch.device("meta"):  # names and shapes only: no memory, no init cost
        return vitkit.create_model("vit_base_patch32", num_classes=1001)


def test_vit_b32_default_filter_skips_biases_and_ln_betas_only(vit_b32):
    model = vit_b32
    groups = split_decay_groups(model, "beta,bias", 0.05)
    decayed, not_decayed = names_in(groups, model, 0), names_in(groups, model, 1)
    all_names = {name for name, _ in model.named_parameters()}
    assert not_decayed == {name for name in all_names if name.endswith(".bias")}
    assert decayed == all_names - not_decayed
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.0.norm1.weight", "blocks.11.norm2.weight", "head.weight"} <= decayed
    # The original's 101 decayed tensors, with each layer's to_q/to_k/to_v fused into one qkv: 101 - 2·12.
    assert len(decayed) == 77 and len(not_decayed) == 75
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0


def test_original_tag_filter_matches_through_the_real_mindspore_names(vit_b32):
    # "beta" is only in the original's names: the LayerNorm biases skip decay, the Linear biases keep it.
    not_decayed = names_in(split_decay_groups(vit_b32, "beta", 0.05), vit_b32, 1)
    assert not_decayed == {f"blocks.{i}.{norm}.bias" for i in range(12) for norm in ("norm1", "norm2")} | {"norm.bias"}


def test_tiny_model_default_filter():
    model = TinyViTNames()
    groups = split_decay_groups(model, "beta,bias", 0.05, stand_in_aliases)
    assert names_in(groups, model, 1) == {name for name, _ in model.named_parameters() if name.endswith("bias")}


@pytest.mark.parametrize(
    "filter_, expected",
    [
        ("gamma", {f"blocks.{i}.{norm}.weight" for i in (0, 1) for norm in ("norm1", "norm2")} | {"norm.weight"}),
        ("pos_embedding", {"pos_embed"}),
        ("cls", {"cls_token"}),
        ("to_k", {f"blocks.{i}.attn.qkv.{kind}" for i in (0, 1) for kind in ("weight", "bias")}),
        (" head ,, pos_embedding ,", {"head.weight", "head.bias", "pos_embed"}),
    ],
)
def test_filters_match_vitkit_names_or_aliases(filter_, expected):
    model = TinyViTNames()
    groups = split_decay_groups(model, filter_, 0.05, stand_in_aliases)
    assert names_in(groups, model, 1) == expected


@pytest.mark.parametrize("filter_", ["", ",", " , "])
def test_empty_filter_decays_everything_in_one_group(filter_):
    model = TinyViTNames()
    groups = split_decay_groups(model, filter_, 0.05, stand_in_aliases)
    assert len(groups) == 1
    assert len(groups[0]["params"]) == len(list(model.parameters()))
    assert groups[0]["weight_decay"] == 0.05


def test_frozen_params_are_left_out_and_centralize_marks_only_the_decayed_group():
    model = TinyViTNames()
    model.head.requires_grad_(False)
    groups = split_decay_groups(model, "bias", 0.05, stand_in_aliases, centralize=True)
    assert "head.weight" not in names_in(groups, model, 0) and "head.bias" not in names_in(groups, model, 1)
    assert [group["centralize"] for group in groups] == [True, False]


def test_no_trainable_params_is_an_error():
    model = TinyViTNames().requires_grad_(False)
    with pytest.raises(VitkitError, match="no trainable parameters"):
        split_decay_groups(model, "bias", 0.05, stand_in_aliases)


def test_centralize_gradients_zero_means_rows_and_leaves_1d_alone():
    weight = nn.Parameter(torch.zeros(3, 4))
    token = nn.Parameter(torch.zeros(1, 2, 4))
    bias = nn.Parameter(torch.zeros(4))
    untouched = nn.Parameter(torch.zeros(2, 2))
    no_grad = nn.Parameter(torch.zeros(2, 2))
    generator = torch.Generator().manual_seed(0)
    for param in (weight, token, bias, untouched):
        param.grad = torch.randn(param.shape, generator=generator)
    bias_grad, untouched_grad, weight_grad = bias.grad.clone(), untouched.grad.clone(), weight.grad.clone()
    groups = [{"params": [weight, token, bias, no_grad], "centralize": True}, {"params": [untouched], "centralize": False}]

    centralize_gradients(groups)

    np.testing.assert_allclose(weight.grad.numpy(), (weight_grad - weight_grad.mean(dim=1, keepdim=True)).numpy())
    np.testing.assert_allclose(weight.grad.sum(dim=1).numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(token.grad.sum().item(), 0.0, atol=1e-6)
    assert torch.equal(bias.grad, bias_grad) and torch.equal(untouched.grad, untouched_grad)
    assert no_grad.grad is None


def adamw_by_hand(params, grads_per_step, lrs, weight_decays, beta1=0.9, beta2=0.999, eps=1e-8):
    """The original's AdamW (decoupled decay, eps outside the bias-corrected root), one numpy array per param."""
    params = [p.copy() for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    beta1_power = beta2_power = 1.0
    for grads, lr in zip(grads_per_step, lrs):
        beta1_power *= beta1
        beta2_power *= beta2
        for k, (param, grad, weight_decay) in enumerate(zip(params, grads, weight_decays)):
            m[k] = beta1 * m[k] + (1 - beta1) * grad
            v[k] = beta2 * v[k] + (1 - beta2) * grad**2
            update = (m[k] / (1 - beta1_power)) / (eps + np.sqrt(v[k] / (1 - beta2_power)))
            if weight_decay:
                update = update + weight_decay * param
            params[k] = param - lr * update
    return params


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_matches_the_original_update_for_three_steps(fused):
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4, generator=generator, dtype=torch.float64))
            self.bias = nn.Parameter(torch.randn(4, generator=generator, dtype=torch.float64))

    generator = torch.Generator().manual_seed(0)
    layer = Layer()
    start = [layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()]
    grads = [[np.random.default_rng(step).standard_normal(p.shape) for p in start] for step in range(3)]
    lrs = [1e-2, 3e-2, 5e-3]
    optimizer = build_optimizer(layer, "AdamW", lrs[0], (0.9, 0.999), 1e-8, 0.05, "beta,bias", False, fused=fused,
                                name_aliases=stand_in_aliases)
    for step_grads, lr in zip(grads, lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        layer.weight.grad, layer.bias.grad = (torch.from_numpy(g) for g in step_grads)
        optimizer.step()

    expected_weight, expected_bias = adamw_by_hand(start, grads, lrs, [0.05, 0.0])
    np.testing.assert_allclose(layer.weight.detach().numpy(), expected_weight, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.bias.detach().numpy(), expected_bias, rtol=1e-10, atol=1e-12)


def test_build_optimizer_groups_and_defaults_on_cpu():
    model = TinyViTNames()
    optimizer = build_optimizer(model, "adamw", 1e-3, (0.9, 0.999), 1e-8, 0.05, "beta,bias", True, name_aliases=stand_in_aliases)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.0]
    assert [group["centralize"] for group in optimizer.param_groups] == [True, False]
    assert optimizer.param_groups[0]["fused"]  # the fused kernel on the CPU too: several times torch's default there


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(name="sgd"), "only adamw"), (dict(betas=(0.9, 1.0)), "beta1 and beta2"), (dict(eps=0.0), "eps"),
     (dict(weight_decay=-0.1), "weight_decay")],
)
def test_build_optimizer_rejects_bad_config(kwargs, message):
    arguments = dict(name="adamw", lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05,
                     no_weight_decay_filter="bias", gc_flag=False, name_aliases=stand_in_aliases)
    arguments.update(kwargs)
    with pytest.raises(VitkitError, match=message):
        build_optimizer(TinyViTNames(), **arguments)


def test_params_the_original_never_had_match_by_their_own_name():
    model = TinyViTNames()
    model.fc_norm = nn.LayerNorm(4)  # timm's mean-pool norm: no MindSpore tag exists for it
    not_decayed = names_in(split_decay_groups(model, "beta,bias", 0.05), model, 1)
    assert {"fc_norm.bias", "blocks.1.norm2.bias", "head.bias"} <= not_decayed
    assert "fc_norm.weight" not in not_decayed
