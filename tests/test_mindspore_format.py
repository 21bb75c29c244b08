"""MindSpore `.ckpt` reading/writing and the model-zoo ViT name mapping, checked against files MindSpore wrote."""
from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitkit.errors import VitkitError
from vitkit.model.formats import mindspore
from vitkit.model.formats.mindspore import (
    is_mindspore_checkpoint,
    mindspore_name,
    mindspore_to_vitkit,
    read_mindspore_checkpoint,
    vitkit_to_mindspore,
    write_mindspore_checkpoint,
)

# Files made by the original MindSpore code, kept in tests/fixtures/mindspore so CI needs nothing else.
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mindspore"
INFERENCE = "ms_vit_tiny_cls.ckpt"
TRAINING = "ms_vit_tiny_train-3_2.ckpt"


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


def original_tags(depth: int) -> list[str]:
    """The model zoo's parameter tags in its order, spelled out independently of the module's table."""
    tags = ["cls", "pos_embedding", "stem.patch_to_embedding.dense.weight", "stem.patch_to_embedding.dense.bias"]
    for i in range(depth):
        attn, ff = f"body.layers.{i}.0.cell", f"body.layers.{i}.1.cell"
        tags += [f"{attn}.0.gamma", f"{attn}.0.beta"]
        tags += [f"{attn}.1.to_{part}.{kind}" for part in ("q", "k", "v", "out") for kind in ("weight", "bias")]
        tags += [f"{ff}.0.gamma", f"{ff}.0.beta"]
        tags += [f"{ff}.1.{layer}.dense.{kind}" for layer in ("ff1", "ff2") for kind in ("weight", "bias")]
    return tags + ["head.0.weight", "head.0.bias", "norm.gamma", "norm.beta"]


def expected_shapes(width, depth, mlp, patch, image, classes) -> dict[str, tuple]:
    tokens = (image // patch) ** 2 + 1
    shapes = {}
    for tag in original_tags(depth):
        if tag == "cls":
            shapes[tag] = (1, 1, width)
        elif tag == "pos_embedding":
            shapes[tag] = (1, tokens, width)
        elif tag.startswith("stem") and tag.endswith("weight"):
            shapes[tag] = (width, 3 * patch * patch)
        elif tag.startswith("head"):
            shapes[tag] = (classes, width) if tag.endswith("weight") else (classes,)
        elif "ff1" in tag:
            shapes[tag] = (mlp, width) if tag.endswith("weight") else (mlp,)
        elif "ff2" in tag:
            shapes[tag] = (width, mlp) if tag.endswith("weight") else (width,)
        elif ".to_" in tag and tag.endswith("weight"):
            shapes[tag] = (width, width)
        else:
            shapes[tag] = (width,)
    return shapes


# --- the fixtures MindSpore wrote -------------------------------------------------------------------------------------


def test_inference_fixture_has_the_documented_tags_dtypes_and_shapes(fixtures):
    tensors = read_mindspore_checkpoint(fixtures / INFERENCE)
    shapes = expected_shapes(width=64, depth=2, mlp=128, patch=8, image=32, classes=10)
    assert list(tensors) == list(shapes)
    assert {tag: tuple(t.shape) for tag, t in tensors.items()} == shapes
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_training_fixture_has_parameters_then_optimizer_state(fixtures):
    tensors = read_mindspore_checkpoint(fixtures / TRAINING)
    shapes = expected_shapes(width=64, depth=2, mlp=128, patch=16, image=64, classes=1001)
    expected_order = [
        *shapes, "global_step", *(f"adam_m.{t}" for t in shapes), *(f"adam_v.{t}" for t in shapes),
        "beta1_power", "beta2_power", "learning_rate",
    ]
    assert list(tensors) == expected_order
    for tag, shape in shapes.items():
        assert tensors[tag].shape == tensors[f"adam_m.{tag}"].shape == tensors[f"adam_v.{tag}"].shape == shape
    assert tensors["global_step"].dtype == torch.int32 and tensors["global_step"].shape == (1,)
    # MindSpore >= 2.2 never advances the original optimizer's global_step, while the beta powers count all
    # 3 epochs x 2 steps.
    assert tensors["global_step"].item() == 0
    assert tensors["beta1_power"].item() == pytest.approx(0.9**6, rel=1e-6)
    assert tensors["beta2_power"].item() == pytest.approx(0.999**6, rel=1e-6)
    assert tensors["learning_rate"].dtype == torch.float32 and tensors["learning_rate"].shape == (6,)
    assert tensors["adam_v.head.0.weight"].abs().max() > 0


def test_stem_reshape_equals_the_originals_patch_flattening(fixtures):
    tensors = read_mindspore_checkpoint(fixtures / INFERENCE)
    state_dict, _ = mindspore_to_vitkit(tensors)
    images = np.load(fixtures / "ms_vit_tiny_cls_input.npy")
    batch, channels, height, width = images.shape
    patch = 8
    dense_weight = tensors["stem.patch_to_embedding.dense.weight"].numpy()
    dense_bias = tensors["stem.patch_to_embedding.dense.bias"].numpy()
    # The original's VitStem: patches flattened in (channel, row, column) order, then the Dense.
    patches = (
        images.reshape(batch, channels, height // patch, patch, width // patch, patch)
        .transpose(0, 2, 4, 1, 3, 5)
        .reshape(batch, -1, channels * patch * patch)
    )
    expected = patches @ dense_weight.T + dense_bias
    conv = F.conv2d(
        torch.from_numpy(images),
        state_dict["patch_embed.proj.weight"],
        state_dict["patch_embed.proj.bias"],
        stride=patch,
    )
    np.testing.assert_allclose(conv.flatten(2).transpose(1, 2).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [INFERENCE, TRAINING])
def test_rewriting_a_fixture_reproduces_its_bytes(fixtures, tmp_path, name):
    tensors = read_mindspore_checkpoint(fixtures / name)
    write_mindspore_checkpoint(tmp_path / "direct.ckpt", tensors)
    assert (tmp_path / "direct.ckpt").read_bytes() == (fixtures / name).read_bytes()
    # Through vitkit's names and back: fusion, reshape and tag order all have to match the original's.
    state_dict, extras = mindspore_to_vitkit(tensors)
    write_mindspore_checkpoint(tmp_path / "mapped.ckpt", vitkit_to_mindspore(state_dict, extras))
    assert (tmp_path / "mapped.ckpt").read_bytes() == (fixtures / name).read_bytes()


def test_training_extras_are_mapped_to_vitkit_names(fixtures):
    tensors = read_mindspore_checkpoint(fixtures / TRAINING)
    state_dict, extras = mindspore_to_vitkit(tensors)
    assert list(extras) == ["global_step", "adam_m", "adam_v", "beta1_power", "beta2_power", "learning_rate"]
    for kind in ("adam_m", "adam_v"):
        assert list(extras[kind]) == list(state_dict)
        assert all(extras[kind][name].shape == state_dict[name].shape for name in state_dict)
        assert torch.equal(
            extras[kind]["blocks.1.attn.qkv.weight"][64:128], tensors[f"{kind}.body.layers.1.0.cell.1.to_k.weight"]
        )
    assert torch.equal(extras["learning_rate"], tensors["learning_rate"])
    assert mindspore_to_vitkit(read_mindspore_checkpoint(fixtures / INFERENCE))[1] == {}


def test_fixtures_are_sniffed_as_mindspore(fixtures):
    assert is_mindspore_checkpoint(fixtures / INFERENCE)
    assert is_mindspore_checkpoint(fixtures / TRAINING)


# --- writing and reading back -----------------------------------------------------------------------------------------


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_every_dtype_round_trips_bit_identically(tmp_path):
    generator = torch.Generator().manual_seed(0)
    floats = torch.randn(3, 4, 5, generator=generator)
    tensors = {
        "float32": floats,
        "float16": floats.half(),
        "float64": floats.double(),
        "bfloat16": floats.bfloat16(),
        "int8": torch.randint(-128, 128, (7,), generator=generator, dtype=torch.int8),
        "int16": torch.randint(-(2**15), 2**15, (2, 3), generator=generator, dtype=torch.int16),
        "int32": torch.randint(-(2**31), 2**31, (4,), generator=generator, dtype=torch.int32),
        "int64": torch.tensor([-(2**63), 2**63 - 1, 0]),
        "uint8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "non_contiguous": floats.transpose(0, 2),
        "nan_payloads": torch.tensor([float("nan"), float("inf"), -0.0]),
    }
    path = tmp_path / "all.ckpt"
    write_mindspore_checkpoint(path, tensors)
    loaded = read_mindspore_checkpoint(path)
    assert list(loaded) == list(tensors)
    for tag, tensor in tensors.items():
        assert loaded[tag].dtype == tensor.dtype and loaded[tag].shape == tensor.shape, tag
        assert raw_bytes(loaded[tag]) == raw_bytes(tensor), tag
    assert loaded["scalar"].dim() == 0


def test_written_file_is_read_only_and_replaces_atomically(tmp_path):
    path = tmp_path / "model.ckpt"
    write_mindspore_checkpoint(path, {"a": torch.ones(2)})
    write_mindspore_checkpoint(path, {"b": torch.zeros(3)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert list(read_mindspore_checkpoint(path)) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt"]


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(VitkitError, match="complex64"):
        tensors = {"a": torch.ones(2), "z": torch.zeros(2, dtype=torch.complex64)}
        write_mindspore_checkpoint(tmp_path / "bad.ckpt", tensors)
    assert os.listdir(tmp_path) == []


def test_writing_into_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(VitkitError, match="does not exist"):
        write_mindspore_checkpoint(tmp_path / "nowhere" / "model.ckpt", {"a": torch.ones(1)})


def test_large_tensors_are_split_into_consecutive_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(mindspore, "_SLICE_BYTES", 64)
    path = tmp_path / "split.ckpt"
    write_mindspore_checkpoint(path, {"w": torch.zeros(200, dtype=torch.int8), "x": torch.arange(50.0)})
    # Zero content cannot contain the tag field's bytes, so each occurrence is one entry: 64 + 64 + 64 + 8 bytes.
    assert path.read_bytes().count(b"\x0a\x01w") == 4
    loaded = read_mindspore_checkpoint(path)
    assert torch.equal(loaded["w"], torch.zeros(200, dtype=torch.int8))
    assert torch.equal(loaded["x"], torch.arange(50.0))


def test_crc_trailer_is_written_checked_and_stripped(tmp_path):
    path = tmp_path / "crc.ckpt"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7], dtype=torch.int32)}
    write_mindspore_checkpoint(path, tensors, crc_check=True)
    data = path.read_bytes()
    assert data[-17:-10] == b"crc_num"
    loaded = read_mindspore_checkpoint(path)
    assert all(torch.equal(loaded[tag], tensors[tag]) for tag in tensors)
    damaged = bytearray(data)
    damaged[-20] ^= 0xFF
    (tmp_path / "damaged.ckpt").write_bytes(bytes(damaged))
    with pytest.raises(VitkitError, match="CRC"):
        read_mindspore_checkpoint(tmp_path / "damaged.ckpt")


# --- hand-made protobuf: encodings MindSpore accepts but does not write -----------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def field(number: int, wire_type: int, payload) -> bytes:
    key = varint(number << 3 | wire_type)
    if wire_type == 0:
        return key + varint(payload)
    if wire_type == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def entry(tag: str, tensor_fields: bytes, *, extra: bytes = b"") -> bytes:
    value = field(1, 2, tag.encode()) + extra + field(2, 2, tensor_fields)
    return field(1, 2, value)


def tensor_proto(dims, type_name: str, content: bytes, *, packed=False, extra: bytes = b"") -> bytes:
    if packed:
        dims_bytes = field(1, 2, b"".join(varint(d) for d in dims))
    else:
        dims_bytes = b"".join(field(1, 0, d) for d in dims)
    return dims_bytes + extra + field(2, 2, type_name.encode()) + field(3, 2, content)


def test_hand_made_encodings_are_read(tmp_path):
    values = np.arange(6, dtype="<f4")
    unknown_fields = field(9, 0, 300) + field(10, 1, b"\x01" * 8) + field(11, 5, b"\x02" * 4) + field(12, 2, b"skip")
    data = b"".join(
        [
            entry("packed", tensor_proto([2, 3], "Float32", values.tobytes(), packed=True)),
            unknown_fields,
            entry("unknown_fields", tensor_proto([3], "Int16", b"\x01\x00\x02\x00\x03\x00", extra=unknown_fields),
                  extra=unknown_fields),
            entry("name", tensor_proto([0], "str", "vit".encode("utf-32-le"))),
            field(1, 2, field(1, 2, b"map") + field(3, 2, field(1, 2, tensor_proto([1], "Int64", bytes(8))))),
            entry("scalar", tensor_proto([], "Float64", np.float64(1.5).tobytes())),
            entry("split", tensor_proto([2, 2], "Int32", np.array([1, 2], "<i4").tobytes())),
            entry("split", tensor_proto([2, 2], "Int32", np.array([3, 4], "<i4").tobytes())),
            entry("bfloat16", tensor_proto([2], "BFloat16", torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
                                           .view(torch.int16).numpy().tobytes())),
        ]
    )
    path = tmp_path / "hand.ckpt"
    path.write_bytes(data)
    loaded = read_mindspore_checkpoint(path)
    assert list(loaded) == ["packed", "unknown_fields", "scalar", "split", "bfloat16"]
    assert torch.equal(loaded["packed"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(loaded["unknown_fields"], torch.tensor([1, 2, 3], dtype=torch.int16))
    assert loaded["scalar"].shape == () and loaded["scalar"].item() == 1.5
    assert torch.equal(loaded["split"], torch.tensor([[1, 2], [3, 4]], dtype=torch.int32))
    assert torch.equal(loaded["bfloat16"], torch.tensor([1.0, -2.0], dtype=torch.bfloat16))


def test_content_that_does_not_fit_its_shape_is_rejected(tmp_path):
    path = tmp_path / "short.ckpt"
    path.write_bytes(entry("w", tensor_proto([4], "Float32", bytes(12))))
    with pytest.raises(VitkitError, match="12 bytes"):
        read_mindspore_checkpoint(path)


def test_unsupported_tensor_type_names_the_entry(tmp_path):
    path = tmp_path / "complex.ckpt"
    path.write_bytes(entry("w", tensor_proto([1], "Complex64", bytes(8))))
    with pytest.raises(VitkitError, match="'w'.*Complex64"):
        read_mindspore_checkpoint(path)


# --- files that are not readable MindSpore checkpoints ----------------------------------------------------------------


def _bad_file(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "torch_zip":
        torch.save({"w": torch.ones(3)}, path)
    elif kind == "pickle":
        torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    elif kind == "truncated":
        tensors = {"a": torch.arange(100.0), "b": torch.arange(100.0)}
        write_mindspore_checkpoint(tmp_path / "whole.ckpt", tensors)
        path.write_bytes((tmp_path / "whole.ckpt").read_bytes()[:-150])
    elif kind == "encrypted":
        # MindSpore's AES-GCM block layout: little-endian magic 0x7F3A5ED8, block length, IV length, IV, ...
        path.write_bytes(bytes.fromhex("d85e3a7f") + random.Random(1).randbytes(200))
    elif kind == "folder":
        path.mkdir()
    return path


@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing", "does not exist"),
        ("folder", "is a folder"),
        ("empty", "is empty"),
        ("random", "not a MindSpore checkpoint"),
        ("torch_zip", "PyTorch"),
        ("pickle", "pickle"),
        ("truncated", "truncated"),
        ("encrypted", "dec_key"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, kind, words):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(VitkitError) as error:
        read_mindspore_checkpoint(path)
    message = str(error.value)
    assert words in message
    assert "\n" not in message
    assert not is_mindspore_checkpoint(path) or kind == "truncated"


def test_truncated_fixture_copy_is_reported_as_truncated(fixtures, tmp_path):
    data = (fixtures / INFERENCE).read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VitkitError, match="truncated"):
        read_mindspore_checkpoint(path)


# --- names ------------------------------------------------------------------------------------------------------------


def random_vitkit_state_dict(depth=3, width=8, patch=4, classes=5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(depth)

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    state_dict = {
        "cls_token": rand(1, 1, width),
        "pos_embed": rand(1, 10, width),
        "patch_embed.proj.weight": rand(width, 3, patch, patch),
        "patch_embed.proj.bias": rand(width),
    }
    for i in range(depth):
        block = f"blocks.{i}"
        state_dict.update(
            {
                f"{block}.norm1.weight": rand(width), f"{block}.norm1.bias": rand(width),
                f"{block}.attn.qkv.weight": rand(3 * width, width), f"{block}.attn.qkv.bias": rand(3 * width),
                f"{block}.attn.proj.weight": rand(width, width), f"{block}.attn.proj.bias": rand(width),
                f"{block}.norm2.weight": rand(width), f"{block}.norm2.bias": rand(width),
                f"{block}.mlp.fc1.weight": rand(2 * width, width), f"{block}.mlp.fc1.bias": rand(2 * width),
                f"{block}.mlp.fc2.weight": rand(width, 2 * width), f"{block}.mlp.fc2.bias": rand(width),
            }
        )
    state_dict.update(
        {
            "norm.weight": rand(width),
            "norm.bias": rand(width),
            "head.weight": rand(classes, width),
            "head.bias": rand(classes),
        }
    )
    return state_dict


def test_vitkit_to_mindspore_to_vitkit_is_identity():
    state_dict = random_vitkit_state_dict()
    extras = {
        "global_step": torch.tensor([12], dtype=torch.int32),
        "adam_m": random_vitkit_state_dict(),
        "adam_v": random_vitkit_state_dict(),
        "beta1_power": torch.tensor([0.5]),
        "beta2_power": torch.tensor([0.9]),
        "learning_rate": torch.linspace(1, 0, 12),
    }
    tensors = vitkit_to_mindspore(state_dict, extras)
    params = original_tags(3)
    assert list(tensors) == [
        *params, "global_step", *(f"adam_m.{t}" for t in params), *(f"adam_v.{t}" for t in params),
        "beta1_power", "beta2_power", "learning_rate",
    ]
    assert tensors["stem.patch_to_embedding.dense.weight"].shape == (8, 48)
    assert torch.equal(tensors["body.layers.2.0.cell.1.to_v.bias"], state_dict["blocks.2.attn.qkv.bias"][16:])
    back, back_extras = mindspore_to_vitkit(tensors)
    assert back.keys() == state_dict.keys() and all(torch.equal(back[n], state_dict[n]) for n in state_dict)
    assert back_extras.keys() == extras.keys()
    for kind in ("adam_m", "adam_v"):
        assert all(torch.equal(back_extras[kind][n], extras[kind][n]) for n in state_dict)


def test_mindspore_name_covers_every_parameter(fixtures):
    tensors = read_mindspore_checkpoint(fixtures / INFERENCE)
    state_dict, _ = mindspore_to_vitkit(tensors)
    tags = [tag for name in state_dict for tag in mindspore_name(name)]
    assert sorted(tags) == sorted(tensors)
    assert mindspore_name("blocks.1.attn.qkv.weight") == [
        "body.layers.1.0.cell.1.to_q.weight",
        "body.layers.1.0.cell.1.to_k.weight",
        "body.layers.1.0.cell.1.to_v.weight",
    ]
    assert mindspore_name("cls_token") == ["cls"]
    assert mindspore_name("norm.weight") == ["norm.gamma"]


def test_original_no_decay_filter_through_mindspore_name():
    state_dict = random_vitkit_state_dict(depth=2)
    no_decay = {
        name for name in state_dict if any(word in tag for tag in mindspore_name(name) for word in ("beta", "bias"))
    }
    # The original excludes every bias and LayerNorm beta; LayerNorm gamma, cls and pos_embedding decay.
    assert no_decay == {name for name in state_dict if name.endswith(".bias")}


def test_unknown_vitkit_name_is_rejected():
    with pytest.raises(VitkitError, match="fc_norm.weight"):
        mindspore_name("fc_norm.weight")
    with pytest.raises(VitkitError, match="fc_norm.weight"):
        vitkit_to_mindspore({**random_vitkit_state_dict(depth=1), "fc_norm.weight": torch.ones(8)})


def test_unknown_tags_are_rejected_with_a_listing():
    tensors = vitkit_to_mindspore(random_vitkit_state_dict(depth=1))
    tensors.update({f"resnet.layer{i}.weight": torch.ones(1) for i in range(7)})
    expected = "not a MindSpore model-zoo ViT checkpoint.*'resnet.layer0.weight'.*2 more"
    with pytest.raises(VitkitError, match=expected) as error:
        mindspore_to_vitkit(tensors)
    assert "\n" not in str(error.value)


def test_incomplete_attention_is_rejected():
    tensors = vitkit_to_mindspore(random_vitkit_state_dict(depth=1))
    del tensors["body.layers.0.0.cell.1.to_k.weight"]
    with pytest.raises(VitkitError, match="to_k"):
        mindspore_to_vitkit(tensors)


def test_stem_that_is_not_rgb_patches_is_rejected():
    tensors = vitkit_to_mindspore(random_vitkit_state_dict(depth=1))
    tensors["stem.patch_to_embedding.dense.weight"] = torch.ones(8, 50)
    with pytest.raises(VitkitError, match="stem weight"):
        mindspore_to_vitkit(tensors)


# --- save_model / convert to .ckpt: back to MindSpore ---------------------------------------------------------------


def test_loading_a_mindspore_file_and_saving_it_reproduces_its_bytes(fixtures, tmp_path):
    import vitkit

    model = vitkit.load_model(fixtures / INFERENCE, num_heads=4)
    vitkit.save_model(model, tmp_path / "again.ckpt")
    assert (tmp_path / "again.ckpt").read_bytes() == (fixtures / INFERENCE).read_bytes()


def test_saved_ckpt_has_the_originals_tags_float32_and_mode_and_reads_back_bit_identical(tmp_path):
    import vitkit

    torch.manual_seed(0)
    model = vitkit.create_model(
        "vit_tiny_patch16", style="mindspore", patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_dim=128,
        image_size=32, num_classes=6,
    ).eval()
    path = vitkit.save_model(model.to(torch.bfloat16), tmp_path / "model.ckpt")
    tensors = read_mindspore_checkpoint(path)
    assert list(tensors) == original_tags(3)
    assert {tag: tuple(t.shape) for tag, t in tensors.items()} == expected_shapes(64, 3, 128, 8, 32, 6)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    back = vitkit.load_model(path, num_heads=4)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor.float()), name
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(images), model.float()(images))


def test_mean_pool_model_saves_without_class_token_like_the_originals_mean_variant(tmp_path):
    import vitkit

    model = vitkit.create_model("vit_tiny_patch16", style="mindspore", image_size=32, depth=1, pool="mean", class_token=False)
    path = vitkit.save_model(model, tmp_path / "mean.ckpt")
    assert "cls" not in read_mindspore_checkpoint(path)
    back = vitkit.load_model(path, num_heads=3)
    assert back.arch.pool == "mean" and not back.arch.class_token
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(images), model.eval()(images))


def test_models_the_original_cannot_hold_are_refused_before_writing(tmp_path):
    import vitkit

    sincos = vitkit.create_model("vit_tiny_patch16", image_size=32, depth=1, pos_embed="sincos")
    with pytest.raises(VitkitError, match="sin-cos"):
        vitkit.save_model(sincos, tmp_path / "sincos.ckpt")
    pre_logits = vitkit.create_model("vit_tiny_patch16", image_size=32, depth=1, representation_size=8)
    with pytest.raises(VitkitError, match="no counterpart"):
        vitkit.save_model(pre_logits, tmp_path / "pre_logits.ckpt")
    assert list(tmp_path.iterdir()) == []


# The original's flat YAML naming its backbone, narrowed to a 96-wide, 2-block model: vit_tiny's 3 heads, 32 wide.
NARROW_TINY_YAML = """\
backbone: 'vit_tiny_patch16'
class_num: 3
train_image_size: 32
eval_image_size: 32
eval_num_workers: 0
model.patch_size: 8
model.embed_dim: 96
model.depth: 2
model.mlp_dim: 192
"""


def test_a_ckpt_without_heads_warns_the_real_head_width_and_takes_the_heads_from_the_originals_yaml(tmp_path, capsys):
    import json

    import onnxruntime

    import vitkit
    from conftest import write_image_folder
    from vitkit.cli import main

    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch16", style="mindspore", patch_size=8, embed_dim=96, depth=2,
                                mlp_dim=192, image_size=32, num_classes=3).eval()
    assert model.arch.num_heads == 3
    ckpt = vitkit.save_model(model, tmp_path / "narrow.ckpt")
    images = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"assuming 1 \(96 per head\)"):
        guessed = vitkit.load_model(ckpt)
    with torch.no_grad():
        assert not torch.allclose(guessed(images), model(images), atol=1e-3)  # the head count changes the logits
    config = tmp_path / "vit_config.yml"
    config.write_text(NARROW_TINY_YAML)
    with_config = ["--config_path", str(config)]

    assert main(["convert", str(ckpt), str(tmp_path / "narrow.safetensors"), *with_config]) == 0
    captured = capsys.readouterr()
    assert "heads 3" in captured.out and "assuming" not in captured.err
    with torch.no_grad():
        torch.testing.assert_close(vitkit.load_model(tmp_path / "narrow.safetensors")(images), model(images),
                                   atol=1e-5, rtol=0)

    onnx_path = tmp_path / "narrow.onnx"
    assert main(["export", "--model", str(ckpt), f"--file_name={onnx_path}", *with_config]) == 0
    assert "assuming" not in capsys.readouterr().err
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: images[:1].numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(onnx_logits, model(images[:1]).numpy(), atol=1e-4)

    val = write_image_folder(tmp_path / "val", {"ant": 3, "bee": 3, "cat": 3}, size=32)
    picture = str(sorted(val.glob("*/*.png"))[0])
    tops = []
    for argv in (["--model", str(ckpt), *with_config], ["--model", str(onnx_path)]):
        assert main(["predict", picture, "--json", *argv]) == 0
        captured = capsys.readouterr()
        assert "assuming" not in captured.err
        tops.append(json.loads(captured.out)[0]["top5"])
    assert [t["index"] for t in tops[0]] == [t["index"] for t in tops[1]]
    assert np.allclose([t["probability"] for t in tops[0]], [t["probability"] for t in tops[1]], atol=1e-5)

    assert main(["eval", "--model", str(ckpt), "--data", str(val), "--json", *with_config]) == 0
    captured = capsys.readouterr()
    assert "assuming" not in captured.err
    assert main(["infer", "--model", str(onnx_path), "--data", str(val), "--json"]) == 0
    assert json.loads(captured.out)["top1"] == json.loads(capsys.readouterr().out)["top1"]
