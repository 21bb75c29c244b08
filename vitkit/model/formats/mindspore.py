"""MindSpore `.ckpt` files: read, write, and map the model-zoo ViT's tags to vitkit's names.

A `.ckpt` is protobuf (schema in MindSpore's `mindspore/train/checkpoint_pb2.py`, proto2):

    message Checkpoint     { repeated Value value = 1; }
    message Value          { required string tag = 1; oneof { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
    message TensorProto    { repeated int64 dims = 1; required string tensor_type = 2;
                             required bytes tensor_content = 3; }

MindSpore writes one serialized one-entry `Checkpoint` per parameter, back to back, which parses as one `Checkpoint`
with every entry. The decoder below is hand-written so that neither MindSpore nor protoc is needed, and it only ever
slices bytes: nothing in a file is executed.
"""
from __future__ import annotations

import itertools
import math
import os
import re
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from vitkit.errors import VitkitError
from vitkit.fileio import atomic_path
from vitkit.model.formats.magic import kind_from_head
from vitkit.model.vit import MAX_DEPTH

# MindSpore's `tensor_type` strings. Element bytes are little-endian, as on every host torch runs on.
_TORCH_DTYPES = {
    "Float16": torch.float16,
    "Float32": torch.float32,
    "Float64": torch.float64,
    "BFloat16": torch.bfloat16,
    "Int8": torch.int8,
    "Int16": torch.int16,
    "Int32": torch.int32,
    "Int64": torch.int64,
    "UInt8": torch.uint8,
    "UInt16": torch.uint16,
    "UInt32": torch.uint32,
    "UInt64": torch.uint64,
    "Bool": torch.bool,
}
_TYPE_NAMES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}
# MindSpore stores string parameters as UTF-32 text under this type; they are not tensors, so readers skip them.
_STRING_TYPE = "str"

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5

# MindSpore splits a tensor over several consecutive entries with the same tag past this many content bytes.
_SLICE_BYTES = 512 * 1024 * 1024

# `save_checkpoint(crc_check=True)` appends this mark and a 10-byte big-endian CRC32 of everything before it.
_CRC_MARK = b"crc_num"
_CRC_TRAILER_BYTES = len(_CRC_MARK) + 10

# MindSpore's encrypted files (enc_key=...) are blocks that each start with one of these little-endian magic numbers
# (AES-GCM, AES-CBC, SM4-CBC; `mindspore/core/utils/crypto.h`).
_CIPHER_MAGICS = {0x7F3A5ED8, 0x7F3A5ED9, 0x7F3A5EDA}

_SNIFF_BYTES = 256


class _Truncated(Exception):
    """The data ends inside a field."""


class _Malformed(Exception):
    """The bytes are not the protobuf a checkpoint holds; the message says what is wrong."""


class _Unsupported(Exception):
    """A well-formed entry holds a tensor type torch cannot represent."""


# --- protobuf wire format -------------------------------------------------------------------------------------------


def _read_varint(buf, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise _Truncated
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Malformed("a varint is longer than 10 bytes")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) for every field of one message; the value is an int or a byte slice."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise _Malformed("a field has number 0")
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire_type in (_LENGTH_DELIMITED, _FIXED64, _FIXED32):
            if wire_type == _LENGTH_DELIMITED:
                width, pos = _read_varint(buf, pos)
            else:
                width = 8 if wire_type == _FIXED64 else 4
            if pos + width > len(buf):
                raise _Truncated
            value = buf[pos : pos + width]
            pos += width
        else:
            raise _Malformed(f"wire type {wire_type} does not occur in checkpoints")
        yield number, wire_type, value


def _text(value: memoryview, what: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(f"{what} is not UTF-8 text") from None


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _decode_tensor_proto(buf: memoryview) -> tuple[list[int], str, memoryview]:
    dims: list[int] = []
    type_name = None
    content = memoryview(b"")
    for number, wire_type, value in _fields(buf):
        if number == 1 and wire_type == _VARINT:
            dims.append(_int64(value))
        elif number == 1 and wire_type == _LENGTH_DELIMITED:
            # Packed encoding: proto2 parsers accept it for repeated scalars even though MindSpore writes unpacked.
            pos = 0
            while pos < len(value):
                dim, pos = _read_varint(value, pos)
                dims.append(_int64(dim))
        elif number == 2 and wire_type == _LENGTH_DELIMITED:
            type_name = _text(value, "a tensor type")
        elif number == 3 and wire_type == _LENGTH_DELIMITED:
            content = value
        elif number in (1, 2, 3):
            raise _Malformed(f"tensor field {number} has wire type {wire_type}")
    if type_name is None:
        raise _Malformed("a tensor has no type")
    if any(dim < 0 for dim in dims):
        raise _Malformed(f"a tensor has negative dimensions {dims}")
    return dims, type_name, content


def _decode_value(buf: memoryview) -> tuple[str, tuple[list[int], str, memoryview] | None]:
    """One entry's tag and tensor; the tensor is None for a MapTensorProto, which vitkit has no use for."""
    tag = None
    tensor = None
    is_map = False
    try:
        for number, wire_type, value in _fields(buf):
            if number not in (1, 2, 3):
                continue
            if wire_type != _LENGTH_DELIMITED:
                raise _Malformed(f"entry field {number} has wire type {wire_type}")
            if number == 1:
                tag = _text(value, "a tag")
            elif number == 2:
                tensor, is_map = _decode_tensor_proto(value), False
            else:
                tensor, is_map = None, True
    except _Truncated:
        # The entry's own length said where it ends, so an overrun inside it is corruption, not a short file.
        raise _Malformed("a field runs past the end of its entry") from None
    if tag is None:
        raise _Malformed("an entry has no tag")
    if tensor is None and not is_map:
        raise _Malformed(f"entry '{tag}' holds no tensor")
    return tag, tensor


def _decode_entries(buf: memoryview) -> Iterator[tuple[str, tuple[list[int], str, memoryview] | None]]:
    for number, wire_type, value in _fields(buf):
        if number != 1:
            continue
        if wire_type != _LENGTH_DELIMITED:
            raise _Malformed(f"checkpoint field 1 has wire type {wire_type}")
        yield _decode_value(value)


def _to_tensor(tag: str, dims: list[int], type_name: str, contents: list[memoryview]) -> torch.Tensor:
    dtype = _TORCH_DTYPES.get(type_name)
    if dtype is None:
        raise _Unsupported(f"entry '{tag}' has tensor type '{type_name}'")
    raw = bytearray().join(contents)
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise _Malformed(f"entry '{tag}' holds {len(raw)} bytes but shape {dims} of {type_name} needs {expected}")
    if not raw:
        return torch.empty(dims, dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).reshape(dims)


def _decode_checkpoint(buf: memoryview) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for tag, group in itertools.groupby(_decode_entries(buf), key=lambda entry: entry[0]):
        pieces = [tensor for _, tensor in group]
        if tag in seen:
            raise _Malformed(f"tag '{tag}' occurs twice")
        seen.add(tag)
        if any(piece is None for piece in pieces):
            continue
        type_names = {type_name for _, type_name, _ in pieces}
        if len(type_names) > 1:
            raise _Malformed(f"the pieces of entry '{tag}' have different types {sorted(type_names)}")
        dims, type_name, _ = pieces[-1]
        if type_name == _STRING_TYPE:
            continue
        tensors[tag] = _to_tensor(tag, dims, type_name, [content for _, _, content in pieces])
    return tensors


# --- reading --------------------------------------------------------------------------------------------------------


def _starts_like_checkpoint(head: bytes) -> bool:
    """True when `head` opens like a serialized Checkpoint: field 1 (an entry) whose first field is a text tag."""
    try:
        if head[0] != 0x0A:
            return False
        entry_length, pos = _read_varint(head, 1)
        if head[pos] != 0x0A:
            return False
        tag_length, pos = _read_varint(head, pos + 1)
    except (IndexError, _Truncated, _Malformed):
        return False
    visible_tag = head[pos : pos + tag_length]
    return 0 < tag_length < entry_length and bool(visible_tag) and all(0x20 <= b < 0x7F for b in visible_tag)


def _other_format(head: bytes) -> str | None:
    """What a file that is not a MindSpore checkpoint is, with the fix, when its first bytes tell."""
    if len(head) >= 4 and int.from_bytes(head[:4], "little") in _CIPHER_MAGICS:
        return (
            "is an encrypted MindSpore checkpoint, which vitkit does not support: decrypt it with MindSpore "
            "(mindspore.load_checkpoint(path, dec_key=..., dec_mode=...)) and re-save it with "
            "mindspore.save_checkpoint without enc_key"
        )
    return _OTHER_FORMATS.get(kind_from_head(head))


_OTHER_FORMATS = {
    "zip": "is a zip archive (how torch.save writes PyTorch checkpoints), not a MindSpore .ckpt: "
           "load it as a PyTorch checkpoint",
    "pickle": "is a Python pickle (a legacy torch.save file), not a MindSpore .ckpt: load it as a PyTorch checkpoint",
    "npy": "is a NumPy .npy array, not a MindSpore .ckpt: pass the checkpoint file instead",
    "safetensors": "is a safetensors file, not a MindSpore .ckpt: load it as a safetensors checkpoint",
}


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise VitkitError(f"checkpoint {path} does not exist: check the path") from None
    except IsADirectoryError:
        raise VitkitError(f"{path} is a folder, not a checkpoint file: pass the .ckpt file inside it") from None
    except PermissionError:
        raise VitkitError(f"cannot read checkpoint {path}: permission denied; make it readable (chmod u+r)") from None


def _strip_crc_trailer(path: Path, data: memoryview) -> memoryview:
    if len(data) < _CRC_TRAILER_BYTES or data[-_CRC_TRAILER_BYTES:-10] != _CRC_MARK:
        return data
    body = data[:-_CRC_TRAILER_BYTES]
    if zlib.crc32(body) != int.from_bytes(data[-10:], "big"):
        raise VitkitError(f"{path} is damaged: its CRC32 check fails; copy or save the checkpoint again")
    return body


def read_mindspore_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a MindSpore `.ckpt`, by tag, in file order.

    Tensors split over several entries are joined, scalars come back 0-d, and entries that are not tensors
    (string parameters, MapTensors) are left out. Bad files raise VitkitError.
    """
    path = Path(path)
    data = _read_bytes(path)
    if not data:
        raise VitkitError(f"checkpoint {path} is empty (0 bytes): it was not written completely; save or copy it again")
    head = data[:_SNIFF_BYTES]
    other = _other_format(head)
    if other:
        raise VitkitError(f"{path} {other}")
    not_a_checkpoint = (
        f"{path} is not a MindSpore checkpoint (its bytes are not a protobuf Checkpoint message): "
        "pass a .ckpt written by mindspore.save_checkpoint"
    )
    if not _starts_like_checkpoint(head):
        raise VitkitError(not_a_checkpoint)
    body = _strip_crc_trailer(path, memoryview(data))
    try:
        return _decode_checkpoint(body)
    except _Truncated:
        raise VitkitError(
            f"{path} is truncated (its last entry runs past the end of the file): copy or save it again"
        ) from None
    except _Malformed as exc:
        raise VitkitError(f"{not_a_checkpoint} ({exc})") from None
    except _Unsupported as exc:
        raise VitkitError(
            f"{path}: {exc}, which vitkit cannot load; cast that parameter to a float type in MindSpore and re-save"
        ) from None


def is_mindspore_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the file's first bytes look like a MindSpore `.ckpt` (a cheap sniff; unreadable paths give False)."""
    try:
        with open(path, "rb") as file:
            head = file.read(_SNIFF_BYTES)
    except OSError:
        return False
    return _starts_like_checkpoint(head)


# --- writing --------------------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(number: int, payload_length: int) -> bytes:
    """A length-delimited field's key and length; its payload follows."""
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(payload_length)


def _entry_messages(tag: str, tensor: torch.Tensor) -> Iterator[tuple[bytes, memoryview]]:
    """The one-entry Checkpoint messages MindSpore writes for one tensor, each as (header bytes, content slice)."""
    type_name = _TYPE_NAMES.get(tensor.dtype)
    if type_name is None:
        raise VitkitError(
            f"cannot write '{tag}' to a MindSpore checkpoint: dtype {tensor.dtype} has no MindSpore type; "
            f"convert it to one of {', '.join(map(str, _TYPE_NAMES))}"
        )
    content = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    type_bytes = type_name.encode()
    tag_bytes = tag.encode()
    dims_field = b"".join(_varint(1 << 3 | _VARINT) + _varint(dim) for dim in tensor.shape)
    type_field = _length_delimited(2, len(type_bytes)) + type_bytes
    tag_field = _length_delimited(1, len(tag_bytes)) + tag_bytes
    # An empty tensor still gets its one entry.
    for start in range(0, max(len(content), 1), _SLICE_BYTES):
        piece = content[start : start + _SLICE_BYTES]
        tensor_head = dims_field + type_field + _length_delimited(3, len(piece))
        tensor_length = len(tensor_head) + len(piece)
        value_head = tag_field + _length_delimited(2, tensor_length)
        value_length = len(value_head) + tensor_length
        yield _length_delimited(1, value_length) + value_head + tensor_head, piece


def write_mindspore_checkpoint(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *, crc_check: bool = False
) -> None:
    """Write `tensors` as MindSpore's `save_checkpoint` does, byte for byte, in the mapping's order.

    `crc_check` appends MindSpore's CRC trailer. The file appears atomically and, like MindSpore's, read-only (0400).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise VitkitError(f"cannot write {path}: folder {path.parent} does not exist; create it first")
    with atomic_path(path, mode=0o400) as tmp, open(tmp, "wb") as file:
        crc = 0
        for tag, tensor in tensors.items():
            for head, content in _entry_messages(tag, tensor):
                file.write(head)
                file.write(content)
                crc = zlib.crc32(content, zlib.crc32(head, crc))
        if crc_check:
            file.write(_CRC_MARK + crc.to_bytes(10, "big"))


# --- names ----------------------------------------------------------------------------------------------------------

# (model-zoo tag, vitkit name, which slice of the fused qkv it is) in the original's parameter order. Block entries
# are suffixes after `body.layers.{i}.` and `blocks.{i}.`.
_BEFORE_BLOCKS = (
    ("cls", "cls_token", None),
    ("pos_embedding", "pos_embed", None),
    ("stem.patch_to_embedding.dense.weight", "patch_embed.proj.weight", None),
    ("stem.patch_to_embedding.dense.bias", "patch_embed.proj.bias", None),
)
_BLOCK = (
    ("0.cell.0.gamma", "norm1.weight", None),
    ("0.cell.0.beta", "norm1.bias", None),
    ("0.cell.1.to_q.weight", "attn.qkv.weight", 0),
    ("0.cell.1.to_q.bias", "attn.qkv.bias", 0),
    ("0.cell.1.to_k.weight", "attn.qkv.weight", 1),
    ("0.cell.1.to_k.bias", "attn.qkv.bias", 1),
    ("0.cell.1.to_v.weight", "attn.qkv.weight", 2),
    ("0.cell.1.to_v.bias", "attn.qkv.bias", 2),
    ("0.cell.1.to_out.weight", "attn.proj.weight", None),
    ("0.cell.1.to_out.bias", "attn.proj.bias", None),
    ("1.cell.0.gamma", "norm2.weight", None),
    ("1.cell.0.beta", "norm2.bias", None),
    ("1.cell.1.ff1.dense.weight", "mlp.fc1.weight", None),
    ("1.cell.1.ff1.dense.bias", "mlp.fc1.bias", None),
    ("1.cell.1.ff2.dense.weight", "mlp.fc2.weight", None),
    ("1.cell.1.ff2.dense.bias", "mlp.fc2.bias", None),
)
_AFTER_BLOCKS = (
    ("head.0.weight", "head.weight", None),
    ("head.0.bias", "head.bias", None),
    ("norm.gamma", "norm.weight", None),
    ("norm.beta", "norm.bias", None),
)
_STEM_WEIGHT = "patch_embed.proj.weight"
_MINDSPORE_BLOCK = re.compile(r"^body\.layers\.(\d+)\.")
_VITKIT_BLOCK = re.compile(r"^blocks\.(\d+)\.")

# A training checkpoint's extras, in the order MindSpore's ModelCheckpoint writes them after the network parameters.
_MOMENTS = ("adam_m", "adam_v")
_TRAINING_SCALARS = ("global_step", "beta1_power", "beta2_power", "learning_rate")
_TRAINING_ORDER = ("global_step", *_MOMENTS, "beta1_power", "beta2_power", "learning_rate")


def _name_table(depth: int) -> list[tuple[str, str, int | None]]:
    """(model-zoo tag, vitkit name, qkv slice) for every parameter of a `depth`-block ViT, in the original's order."""
    blocks = [
        (f"body.layers.{index}.{tag}", f"blocks.{index}.{name}", part)
        for index in range(depth)
        for tag, name, part in _BLOCK
    ]
    return [*_BEFORE_BLOCKS, *blocks, *_AFTER_BLOCKS]


def _depth(names, block_pattern: re.Pattern, prefix: str = "") -> int:
    """One more than the largest block index; a file's indices are bounded before any table is sized by them."""
    depth = 0
    for name in names:
        match = block_pattern.match(name)
        if match:
            index = int(match[1])
            if index >= MAX_DEPTH:
                raise VitkitError(
                    f"'{prefix}{name}' names block {index}, but a ViT vitkit reads has at most {MAX_DEPTH} blocks: "
                    "the file is damaged or not a model-zoo ViT checkpoint"
                )
            depth = max(depth, index + 1)
    return depth


def _listing(names: list[str]) -> str:
    shown = ", ".join(f"'{name}'" for name in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _dense_to_conv(weight: torch.Tensor) -> torch.Tensor:
    """The stem Dense `(D, 3·p·p)` as the equivalent `(D, 3, p, p)` conv kernel.

    The original flattens each patch in (channel, row, column) order, which is exactly the conv kernel's layout.
    """
    if weight.dim() == 2:
        patch = math.isqrt(weight.shape[1] // 3)
        if patch > 0 and 3 * patch * patch == weight.shape[1]:
            return weight.reshape(weight.shape[0], 3, patch, patch)
    raise VitkitError(
        f"the stem weight has shape {list(weight.shape)}, not (width, 3·patch·patch): "
        "the file is not a model-zoo ViT checkpoint for RGB images"
    )


def _params_to_vitkit(params: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    table = {tag: (name, part) for tag, name, part in _name_table(_depth(params, _MINDSPORE_BLOCK, prefix))}
    unknown = [prefix + tag for tag in params if tag not in table]
    if unknown:
        raise VitkitError(
            f"not a MindSpore model-zoo ViT checkpoint: unexpected tags {_listing(unknown)}; "
            "vitkit imports checkpoints of official/cv/VIT only"
        )
    state_dict: dict[str, torch.Tensor | None] = {}
    qkv_parts: dict[str, list[torch.Tensor | None]] = {}
    for tag, tensor in params.items():
        name, part = table[tag]
        if part is None:
            state_dict[name] = tensor
        else:
            # Reserve the fused name's place at its first slice so the result keeps the file's order.
            state_dict.setdefault(name, None)
            qkv_parts.setdefault(name, [None, None, None])[part] = tensor
    for name, parts in qkv_parts.items():
        if any(part is None for part in parts):
            block = name.rsplit(".attn.", 1)[0].replace("blocks.", "body.layers.")
            missing = [f"to_{letter}" for letter, part in zip("qkv", parts) if part is None]
            raise VitkitError(
                f"incomplete MindSpore ViT checkpoint: {prefix}{block} lacks {', '.join(missing)}; "
                "pass a checkpoint saved from the whole network"
            )
        if len({tuple(part.shape) for part in parts}) > 1 or parts[0].dim() not in (1, 2):
            block = name.rsplit(".attn.", 1)[0].replace("blocks.", "body.layers.")
            kind = name.rsplit(".", 1)[1]
            shapes = ", ".join(f"to_{letter} {list(part.shape)}" for letter, part in zip("qkv", parts))
            raise VitkitError(
                f"MindSpore ViT checkpoint {prefix}{block} has attention {kind}s of shapes {shapes}: q, k and v "
                "must be one (width, width) shape; the file is damaged or not a model-zoo ViT checkpoint"
            )
        state_dict[name] = torch.cat(parts, dim=0)
    if _STEM_WEIGHT in state_dict:
        state_dict[_STEM_WEIGHT] = _dense_to_conv(state_dict[_STEM_WEIGHT])
    return state_dict


def _params_to_mindspore(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    table = _name_table(_depth(state_dict, _VITKIT_BLOCK))
    known = {name for _, name, _ in table}
    unknown = [name for name in state_dict if name not in known]
    if unknown:
        raise VitkitError(
            f"cannot save as a MindSpore model-zoo ViT checkpoint: {_listing(unknown)} have no counterpart in "
            "the original; only class-token ViTs with the original's layers can be exported"
        )
    tensors = {}
    for tag, name, part in table:
        if name not in state_dict:
            continue
        tensor = state_dict[name]
        if name == _STEM_WEIGHT:
            tensor = tensor.reshape(tensor.shape[0], -1)
        if part is not None:
            if tensor.shape[0] % 3:
                raise VitkitError(f"'{name}' has {tensor.shape[0]} rows, not a multiple of 3: it is not a fused q,k,v")
            tensor = tensor.chunk(3, dim=0)[part]
        tensors[tag] = tensor
    return tensors


def mindspore_to_vitkit(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """A model-zoo ViT checkpoint's tensors as a vitkit state_dict plus its training extras.

    The extras hold what the file has of `global_step`, `beta1_power`, `beta2_power`, `learning_rate` (tensors as
    stored) and `adam_m` / `adam_v` (dicts keyed by vitkit names, fused and reshaped like the parameters); an
    inference checkpoint gives an empty dict.
    """
    params: dict[str, torch.Tensor] = {}
    moments: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in _MOMENTS}
    scalars: dict[str, torch.Tensor] = {}
    for tag, tensor in tensors.items():
        kind, _, param_tag = tag.partition(".")
        if tag in _TRAINING_SCALARS:
            scalars[tag] = tensor
        elif kind in moments and param_tag:
            moments[kind][param_tag] = tensor
        else:
            params[tag] = tensor
    state_dict = _params_to_vitkit(params)
    extras: dict = {}
    for key in _TRAINING_ORDER:
        if key in scalars:
            extras[key] = scalars[key]
        elif key in moments and moments[key]:
            extras[key] = _params_to_vitkit(moments[key], prefix=f"{key}.")
    return state_dict, extras


def vitkit_to_mindspore(
    state_dict: Mapping[str, torch.Tensor], training_extras: Mapping | None = None
) -> dict[str, torch.Tensor]:
    """The inverse of `mindspore_to_vitkit`: tags and tensors in the order the original writes them.

    With `training_extras` (the dict `mindspore_to_vitkit` returns) the result is a training checkpoint.
    """
    tensors = _params_to_mindspore(state_dict)
    extras = dict(training_extras or {})
    unknown = [key for key in extras if key not in _TRAINING_ORDER]
    if unknown:
        raise VitkitError(f"unknown training extras {_listing(unknown)}: expected some of {', '.join(_TRAINING_ORDER)}")
    for key in _TRAINING_ORDER:
        if key not in extras:
            continue
        if key in _MOMENTS:
            tensors.update({f"{key}.{tag}": tensor for tag, tensor in _params_to_mindspore(extras[key]).items()})
        else:
            tensors[key] = extras[key]
    return tensors


def mindspore_name(vitkit_name: str) -> list[str]:
    """The model-zoo tag(s) of one vitkit parameter: three (q, k, v) for a fused qkv, one otherwise."""
    tags = [tag for tag, name, _ in _name_table(_depth([vitkit_name], _VITKIT_BLOCK)) if name == vitkit_name]
    if not tags:
        raise VitkitError(f"'{vitkit_name}' is not a vitkit ViT parameter with a counterpart in the MindSpore original")
    return tags
