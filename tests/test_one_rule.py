"""Each rule written once, one path each: the model's options, its numerics style, its any-size forward, the weights'
metadata, the head rule and the format sniffer, each checked through every entry point that uses it."""
import dataclasses
import json

import pytest
import torch
from torch import nn

import vitkit
from vitkit.config import OPTIONS, Config, config_to_dict, load_config
from vitkit.data.transforms import AUGMENTS, NORMALIZATIONS, augment_transform, normalization_stats, train_transform
from vitkit.deploy.export import export_model
from vitkit.deploy.metadata import Preprocessing
from vitkit.engine.build import build_model, load_pretrained
from vitkit.engine.losses import LOSS_NAMES, build_loss
from vitkit.engine.lr_schedule import LR_MODES, build_lr_schedule
from vitkit.engine.optim import OPTIMIZER_NAMES, build_optimizer
from vitkit.errors import VitkitError
from vitkit.model.gelu import TanhGELU
from vitkit.model.formats.mindspore import read_mindspore_checkpoint
from vitkit.model.formats.pt2 import load_pt2_program
from vitkit.model.loading import load_state, sniff_format
from vitkit.model.vit import ARCH_DEFAULTS, ARCH_FIELDS, Block, ViTComponents, VisionTransformer, make_arch

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, image_size=32)
TINY_FLAGS = [f"--model.{key}={value}" for key, value in TINY.items()]


def _same_state(first: nn.Module, second: nn.Module) -> None:
    ours, theirs = first.state_dict(), second.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


# ---- one model, one default ------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", [None, "timm"])
def test_a_preset_through_the_config_and_through_create_model_is_the_same_model(style):
    flags = TINY_FLAGS + ([f"--model.style={style}"] if style else [])
    cfg = load_config(None, ["--model.name=vit_tiny_patch16", *flags])
    torch.manual_seed(0)
    from_config = build_model(cfg.model)
    torch.manual_seed(0)
    from_api = vitkit.create_model("vit_tiny_patch16", style=style, num_classes=1001, **TINY)
    assert from_config.arch == from_api.arch
    _same_state(from_config, from_api)  # same init scheme, drawn in the same order
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(from_config.eval()(images), from_api.eval()(images), rtol=0, atol=0)


def test_the_default_style_is_the_originals_numerics_everywhere():
    # The original's numerics, written out by hand (its LayerNorm epsilon, tanh GELU, dropout 0.1, DropPath 0.1).
    original = dict(ln_eps=1e-7, gelu="tanh", init="mindspore", drop_rate=0.1, proj_drop_rate=0.1,
                    mlp_drop_rate=0.1, attn_drop_rate=0.0, drop_path_rate=0.1)
    arch = make_arch("vit_tiny_patch16")
    model = load_config(None, []).model
    for name, value in original.items():
        assert getattr(arch, name) == value == getattr(model, name), name
    assert arch.style == model.style == "mindspore"
    assert isinstance(vitkit.create_model("vit_tiny_patch16", **TINY).blocks[0].mlp.act, TanhGELU)


def test_style_switches_every_numeric_and_an_explicit_value_wins():
    timm_numerics = dict(ln_eps=1e-6, gelu="erf", init="timm", drop_rate=0.0, proj_drop_rate=0.0,
                         mlp_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)
    model = load_config(None, ["--model.style=timm"]).model
    assert {name: getattr(model, name) for name in timm_numerics} == timm_numerics
    mixed = load_config(None, ["--model.style=timm", "--model.gelu=tanh", "--model.drop_path_rate=0.2"]).model
    assert (mixed.gelu, mixed.drop_path_rate, mixed.ln_eps) == ("tanh", 0.2, 1e-6)
    arch = make_arch("vit_tiny_patch16", style="timm", gelu="tanh", drop_path_rate=0.2)
    assert (arch.gelu, arch.drop_path_rate, arch.ln_eps) == ("tanh", 0.2, 1e-6)
    # A dumped config reads back to the same model options.
    from vitkit.config import dump_yaml
    import yaml

    again = yaml.safe_load(dump_yaml(load_config(None, ["--model.style=timm"])))["model"]
    assert again["style"] == "timm" and again["gelu"] == "erf"


# ---- each rule once --------------------------------------------------------------------------------------------


def test_every_architecture_option_is_a_config_option_with_the_fields_own_rule():
    exposed = {name: item for name, item in ARCH_FIELDS.items() if item.metadata.get("config") is not None}
    assert {"patch_size", "num_classes", "pool", "style", "gelu", "drop_path_rate"} <= set(exposed)
    for name, item in exposed.items():
        option = OPTIONS[f"model.{name}"]
        assert option.choices == item.metadata["choices"], name
        assert option.help == item.metadata["config"].get("help", item.metadata["help"]), name
        assert option.default == item.metadata["config"].get("default", ARCH_DEFAULTS[name]), name
    # Fields the architecture keeps to itself do not leak into the config.
    assert "model.in_chans" not in OPTIONS and "model.dynamic_img_size" not in OPTIONS
    # The same rule refuses the same value on both sides, e.g. a pool the model does not have.
    with pytest.raises(VitkitError, match="token, mean"):
        load_config(None, ["--model.pool=max"])
    with pytest.raises(VitkitError, match="token, mean"):
        make_arch("vit_tiny_patch16", pool="max")
    with pytest.raises(VitkitError, match=r"model.drop_rate .*in \[0, 1\)"):
        load_config(None, ["--model.drop_rate=1"])
    with pytest.raises(VitkitError, match=r"drop_rate 1 is not in \[0, 1\)"):
        make_arch("vit_tiny_patch16", drop_rate=1)


def _refused(build) -> bool:
    try:
        build()
    except VitkitError:
        return True
    return False


# Each config choice list beside the code that acts on the value: (its owner's list, a call of that code).
_CHOICE_USERS = {
    "schedule.lr_decay_mode": (LR_MODES, lambda mode: build_lr_schedule(mode, 0.0, 0.1, 0.0, 1, 2, 3)),
    "data.augment": (AUGMENTS, lambda name: augment_transform(name, 2, 9)),
    "data.normalization": (tuple(NORMALIZATIONS), normalization_stats),
    "loss.name": (LOSS_NAMES, lambda name: build_loss(name, 10, 0.1)),
    "optimizer.name": (OPTIMIZER_NAMES,
                       lambda name: build_optimizer(nn.Linear(2, 2), name, 0.1, (0.9, 0.999), 1e-8, 0.0, "", False)),
}


@pytest.mark.parametrize("key", sorted(_CHOICE_USERS))
def test_the_config_offers_exactly_the_choices_the_code_acts_on(key):
    """Every value the config accepts works where it is used, and a value the code does not know is refused by the
    config too: one list, not two that drift apart."""
    owners_list, use = _CHOICE_USERS[key]
    assert OPTIONS[key].choices == owners_list  # the config offers the owner's whole list, nothing more
    for choice in OPTIONS[key].choices:
        use(choice)
        assert load_config(None, [f"--{key}={choice}"]) is not None
    for unknown in ("cosine_max", "autoaugment2", "imagenet21k", "ce_focal", "lamb"):
        assert _refused(lambda: use(unknown))
        assert _refused(lambda: load_config(None, [f"--{key}={unknown}"]))


@pytest.mark.parametrize("key, edges", [
    ("data.crop_min", {1.0: True, 0.5: True, 0.0: False, -0.1: False, 1.01: False}),
    ("optimizer.beta1", {0.0: True, 0.9: True, 0.999999: True, 1.0: False, -0.01: False}),
    ("optimizer.beta2", {0.0: True, 0.999: True, 1.0: False, 1.5: False}),
])
def test_the_config_and_the_code_draw_a_range_at_the_same_edges(key, edges):
    uses = {
        "data.crop_min": lambda value: train_transform(32, crop_min=value),
        "optimizer.beta1": lambda value: build_optimizer(nn.Linear(2, 2), "adamw", 0.1, (value, 0.999), 1e-8, 0.0, "",
                                                          False),
        "optimizer.beta2": lambda value: build_optimizer(nn.Linear(2, 2), "adamw", 0.1, (0.9, value), 1e-8, 0.0, "",
                                                          False),
    }
    for value, allowed in edges.items():
        assert _refused(lambda: uses[key](value)) is not allowed, (key, value)
        assert _refused(lambda: load_config(None, [f"--{key}={value}"])) is not allowed, (key, value)


def test_notes_and_explicit_keys_are_declared_fields_outside_the_options():
    names = {item.name for item in dataclasses.fields(Config)}
    assert {"notes", "explicit_keys"} <= names
    config = load_config(None, ["--device_target=GPU", "--model.depth=2"])
    assert config.notes and config.explicit_keys == {"model.depth"}
    assert "notes" not in config_to_dict(config) and "explicit_keys" not in config_to_dict(config)
    assert config == load_config(None, ["--model.depth=2"])  # what was noted is not configuration


# ---- one path each ---------------------------------------------------------------------------------------------


def _dynamic(model: VisionTransformer) -> VisionTransformer:
    dynamic = VisionTransformer(model.arch.replace(dynamic_img_size=True))
    dynamic.load_state_dict(model.state_dict())
    return dynamic.eval()


def test_dynamic_image_size_forward_matches_a_model_built_at_that_size():
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch16", style="timm", num_classes=3, **TINY).eval()
    dynamic = _dynamic(model)
    same = torch.randn(2, 3, 32, 32)
    bigger = torch.randn(2, 3, 48, 48)
    resized = vitkit.create_model("vit_tiny_patch16", style="timm", num_classes=3, **{**TINY, "image_size": 48})
    load_state(resized, model.state_dict())  # the loader's own (upsampling: bicubic, no antialias) resampling
    with torch.no_grad():
        torch.testing.assert_close(dynamic(same), model(same), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dynamic(bigger), resized.eval()(bigger), rtol=1e-5, atol=1e-5)
        with pytest.raises(VitkitError, match="whole 8-pixel patches"):
            dynamic(torch.randn(1, 3, 36, 32))
    with pytest.raises(VitkitError, match="input is 48x48"):
        model(bigger)


def test_export_with_a_dynamic_image_size_is_the_models_own_forward(tmp_path):
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch16", num_classes=3, **TINY).eval()
    result = export_model(model, tmp_path / "any.pt2", "PT2", dynamic_image_size=True)
    assert result.input_shape == (1, 3, "height", "width")
    assert not model.arch.dynamic_img_size  # the caller's model is as it was
    program = load_pt2_program(tmp_path / "any.pt2")[0].module()
    images = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(program(images), _dynamic(model)(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_class_names_and_eval_preprocessing_round_trip_as_weights_metadata(tmp_path, suffix):
    model = vitkit.create_model("vit_tiny_patch16", num_classes=3, **TINY)
    preprocessing = Preprocessing(32, 40, "BICUBIC", "inception")
    path = vitkit.save_model(model, tmp_path / f"m{suffix}", class_names=["ant", "bee", "cat"],
                             preprocessing=preprocessing)
    loaded, card = vitkit.load_model(path, with_card=True)
    assert not hasattr(loaded, "class_names")  # metadata of the weights, not an attribute of the module
    assert (card.class_names, card.preprocessing, card.patch_size) == (("ant", "bee", "cat"), preprocessing, 8)
    # At another size the preprocessing follows the model; with a new head the names no longer apply.
    _, resized = vitkit.load_model(path, image_size=48, with_card=True)
    assert resized.preprocessing == Preprocessing(48, 0, "BICUBIC", "inception")
    _, new_head = vitkit.load_model(path, num_classes=5, with_card=True)
    assert new_head.class_names is None and new_head.preprocessing == preprocessing
    # A copy written from the card keeps both.
    again = vitkit.save_model(loaded, tmp_path / f"again{suffix}", card=card)
    assert vitkit.load_model(again, with_card=True)[1] == card


@pytest.mark.parametrize("preprocessing, fragment", [
    ({"image_size": 10**9}, "image_size 1000000000"),
    ({"image_size": 224, "interpolation": "SPLINE"}, "interpolation 'SPLINE'"),
    ({"image_size": 224, "exec": "rm"}, "has fields"),
    ([224], "not a JSON object"),
])
def test_hostile_preprocessing_metadata_is_one_line(tmp_path, preprocessing, fragment):
    from safetensors.torch import save_file

    model = vitkit.create_model("vit_tiny_patch16", num_classes=3, **TINY)
    arch = json.dumps(dataclasses.asdict(model.arch))
    path = tmp_path / "bad.safetensors"
    save_file(model.state_dict(), str(path),
              metadata={"vitkit.arch": arch, "vitkit.preprocessing": json.dumps(preprocessing)})
    with pytest.raises(VitkitError, match="damaged or not vitkit's") as caught:
        vitkit.load_model(path)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_one_head_rule_for_load_model_and_a_pretrained_start(tmp_path):
    # A paper-style checkpoint: a tanh pre-logits layer and 3 classes; the new task has 5 classes and no pre-logits.
    source = vitkit.create_model("vit_tiny_patch16", num_classes=3, representation_size=16, **TINY)
    path = vitkit.save_model(source, tmp_path / "paper.safetensors")
    loaded = vitkit.load_model(path, num_classes=5, representation_size=0)
    started = vitkit.create_model("vit_tiny_patch16", num_classes=5, **TINY)
    skipped = load_pretrained(started, str(path))
    assert sorted(skipped) == ["head.bias", "head.weight", "pre_logits.fc.bias", "pre_logits.fc.weight"]
    for model in (loaded, started):
        assert isinstance(model.pre_logits, nn.Identity) and model.head.out_features == 5
    body = {name: tensor for name, tensor in source.state_dict().items() if not name.startswith(("head.", "pre_logits."))}
    for model in (loaded, started):
        own = model.state_dict()
        assert all(torch.equal(own[name], tensor) for name, tensor in body.items())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 3")
def test_legacy_pickle_protocol_3_checkpoints_are_read_and_named(tmp_path):
    # torch.save's legacy format with pickle protocol 3 starts with b'\x80\x03'; the sniffer once knew only 2, 4, 5.
    model = vitkit.create_model("vit_tiny_patch16", num_classes=3, **TINY)
    path = tmp_path / "legacy.pth"
    torch.save(model.state_dict(), path, pickle_protocol=3, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:2] == b"\x80\x03"
    assert sniff_format(path) == "torch"
    loaded = vitkit.load_model(path, num_heads=2)
    _same_state(loaded, model)
    with pytest.raises(VitkitError, match="is a Python pickle"):
        read_mindspore_checkpoint(path)


class _KeepTokensBlock(Block):
    """A swapped-in block that still takes keep_tokens, and says so through its components."""

    def forward(self, x, keep_tokens=None):
        return super().forward(x, keep_tokens)


class _DeclaredParts(ViTComponents):
    block = _KeepTokensBlock
    class_token_only_last_block = True


class _WholeParts(ViTComponents):
    class_token_only_last_block = False


def test_the_class_token_only_last_block_is_declared_by_the_components():
    declared = vitkit.create_model("vit_tiny_patch16", components=_DeclaredParts, **TINY).eval()
    whole = vitkit.create_model("vit_tiny_patch16", components=_WholeParts, **TINY).eval()
    assert declared._last_block_class_token_only() and not whole._last_block_class_token_only()
    whole.load_state_dict(declared.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(declared(images), whole(images), rtol=1e-5, atol=1e-5)
