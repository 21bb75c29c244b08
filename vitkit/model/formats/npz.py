"""Google's Flax ViT `.npz` files: the ViT paper's, AugReg's and big_vision's, as vitkit names and numerics.

The archive maps '/'-joined Flax parameter paths to arrays, optionally under a prefix (`opt/target/` for the ViT
paper's training checkpoints, `params/` for big_vision, `params/img/` for image towers). Two block layouts exist:

    ViT paper / AugReg   Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
                         MlpBlock_3}, position embedding at Transformer/posembed_input/pos_embedding (class slot included)
    big_vision           the same blocks named {LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0},
                         or stacked along a first axis under Transformer/encoderblock/ (scanned); position embedding at
                         pos_embedding without a class slot (posemb is added before the class token is prepended), or
                         absent for fixed 2-D sin-cos

Flax kernels are (in, out); attention kernels are split per head: query/key/value (width, heads, head_dim), out
(heads, head_dim, width), so the head count is read from the file. bf16 files store each array as 2-byte void
('V2', how numpy saves ml_dtypes.bfloat16); they are widened to float32 exactly.
"""
from __future__ import annotations

import io
import math
import re
import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from vitkit.errors import VitkitError
from vitkit.model.formats.archives import check_zip_directory, format_bytes

# flax.linen.LayerNorm's epsilon defaults to 1e-6 and flax.linen.gelu to approximate=True (the tanh form); the ViT
# paper's and big_vision's models use both defaults.
NUMERICS = {"ln_eps": 1e-6, "gelu": "tanh"}

_PREFIXES = ("opt/target/", "params/img/", "params/", "")
_POS_EMBED_KEYS = ("Transformer/posembed_input/pos_embedding", "pos_embedding", "Transformer/pos_embedding")
_PER_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")
_SCANNED = "Transformer/encoderblock/"
# A ViT paper training checkpoint (parameters plus two optimizer moments) of the deepest ViT has a few thousand.
_MAX_ARRAYS = 65536
# numpy's own limit on an .npy header (np.load's max_header_size), after the magic string and the length field.
_MAX_HEADER_BYTES = 10_000 + 12


def read_npz(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A Flax ViT `.npz` as a vitkit state_dict plus the architecture fields the file states (heads, numerics)."""
    try:
        _check_arrays(path)
        archive = np.load(path, allow_pickle=False)
    # zlib.error: a damaged deflated entry; NotImplementedError: a compression method Python lacks
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error, NotImplementedError) as exc:
        raise VitkitError(f"cannot read '{path}' as .npz ({exc}): the file may be truncated") from None
    with archive:
        prefix = next((p for p in _PREFIXES if f"{p}embedding/kernel" in archive.files), None)
        if prefix is None:
            raise VitkitError(
                f"'{path}' is an .npz without a ViT patch embedding ('embedding/kernel'): "
                "it is not a ViT paper / AugReg / big_vision checkpoint"
            )
        names = {name[len(prefix) :] for name in archive.files if name.startswith(prefix)}

        cache: dict[str, torch.Tensor] = {}

        def read(name: str) -> torch.Tensor:
            # A scanned file stacks every block in one array: read it once, not once per block.
            if name not in cache:
                try:
                    array = archive[prefix + name]
                except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as exc:
                    raise VitkitError(f"cannot read array '{prefix + name}' of '{path}' ({exc}): the file is damaged") from None
                cache[name] = _to_float32(array, path, prefix + name)
            return cache[name]

        try:
            return _flax_to_vitkit(names, read, path)
        except (IndexError, RuntimeError) as exc:  # an array of a shape no ViT layer has fails its reshape or index
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise VitkitError(f"'{path}' has arrays of shapes no ViT has ({reason}): the file is damaged or not a "
                              "ViT checkpoint") from None


def _check_arrays(path) -> None:
    """Every member's size and its .npy header checked before numpy reads anything: np.load allocates whatever
    shape a header claims, and zipfile inflates whatever size a member declares."""
    with zipfile.ZipFile(path) as archive:
        for info in check_zip_directory(path, archive, max_entries=_MAX_ARRAYS, what=".npz"):
            with archive.open(info) as member:
                head = io.BytesIO(member.read(min(info.file_size, _MAX_HEADER_BYTES)))
            name = info.filename.removesuffix(".npy")
            try:
                version = np.lib.format.read_magic(head)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(head)
            except (ValueError, TypeError, SyntaxError, tokenize.TokenError) as exc:  # TokenError: unbalanced brackets
                raise VitkitError(f"array '{name}' of '{path}' has no readable .npy header ({exc}): the file is damaged") from None
            if any(size < 0 for size in shape):
                raise VitkitError(f"array '{name}' of '{path}' has negative shape {shape}: the file is damaged")
            claimed = math.prod(shape) * dtype.itemsize
            held = info.file_size - head.tell()
            if claimed > held:
                raise VitkitError(
                    f"array '{name}' of '{path}' claims shape {shape} of {dtype} ({format_bytes(claimed)}) but holds "
                    f"{format_bytes(held)}: the file is damaged or not a checkpoint"
                )


def _to_float32(array: np.ndarray, path, name: str) -> torch.Tensor:
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        # bfloat16 is the upper half of a float32: shifting its bits up 16 widens it exactly.
        widened = (array.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return torch.from_numpy(np.ascontiguousarray(widened))
    if array.dtype.kind != "f":
        raise VitkitError(f"'{path}': array '{name}' has dtype {array.dtype}, not a float type: it is not a weight")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _flax_to_vitkit(names: set[str], read, path) -> tuple[dict[str, torch.Tensor], dict]:
    for marker, what in (("MAPHead_0/probe", "an attention-pooling (MAP) head"), ("conv_root/kernel", "a ResNet stem (hybrid ViT)")):
        if marker in names:
            raise VitkitError(f"'{path}' is a ViT with {what}, which vitkit's ViT does not have: use a class-token or GAP model")
    state = {}
    stem = read("embedding/kernel")
    if stem.dim() != 4:
        raise VitkitError(f"'{path}': embedding/kernel has shape {tuple(stem.shape)}, not a (patch, patch, channels, width) conv")
    state["patch_embed.proj.weight"] = stem.permute(3, 2, 0, 1).contiguous()
    state["patch_embed.proj.bias"] = read("embedding/bias")
    if "cls" in names:
        state["cls_token"] = read("cls").reshape(1, 1, -1)
    pos_key = next((key for key in _POS_EMBED_KEYS if key in names), None)
    if pos_key is not None:
        state["pos_embed"] = _pos_embed(read(pos_key), "cls" in names, path)
    blocks, num_heads = _blocks(names, read, path)
    state.update(blocks)
    state["norm.weight"] = read("Transformer/encoder_norm/scale")
    state["norm.bias"] = read("Transformer/encoder_norm/bias")
    if "pre_logits/kernel" in names:
        state["pre_logits.fc.weight"] = read("pre_logits/kernel").T.contiguous()
        state["pre_logits.fc.bias"] = read("pre_logits/bias")
    if "head/kernel" in names:
        state["head.weight"] = read("head/kernel").T.contiguous()
        state["head.bias"] = read("head/bias")
    arch = dict(NUMERICS, num_heads=num_heads)
    if pos_key is None:
        arch["pos_embed"] = "sincos"  # big_vision's posemb='sincos2d' stores nothing
    return state, arch


def _pos_embed(table: torch.Tensor, has_class_token: bool, path) -> torch.Tensor:
    table = table.reshape(1, -1, table.shape[-1])
    tokens = table.shape[1]
    if has_class_token and _is_square(tokens):
        # big_vision adds the position embedding before prepending the class token: its slot is zero.
        return torch.cat([torch.zeros_like(table[:, :1]), table], dim=1)
    if not _is_square(tokens - int(has_class_token)):
        raise VitkitError(f"'{path}': the position embedding has {tokens} tokens, not a square grid: vitkit takes square images")
    return table


def _is_square(count: int) -> bool:
    return count > 0 and int(round(count**0.5)) ** 2 == count


def _blocks(names: set[str], read, path) -> tuple[dict[str, torch.Tensor], int]:
    per_block = sorted({int(match[1]) for name in names if (match := _PER_BLOCK.match(name))})
    if per_block:
        prefixes = [(f"Transformer/encoderblock_{i}/", None) for i in per_block]
        if per_block != list(range(len(per_block))):
            raise VitkitError(f"'{path}': encoder blocks {per_block} are not numbered 0..{len(per_block) - 1}: the file is incomplete")
    elif any(name.startswith(_SCANNED) for name in names):
        depth = read(_SCANNED + "LayerNorm_0/scale").shape[0]
        prefixes = [(_SCANNED, i) for i in range(depth)]
    else:
        raise VitkitError(f"'{path}' has no Transformer/encoderblock arrays: it is not a ViT checkpoint")
    base = prefixes[0][0]
    # The ViT paper numbers a block's four modules 0..3; big_vision numbers each module type from 0.
    paper = f"{base}MultiHeadDotProductAttention_1/query/kernel" in names
    attn, norm2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if paper else (
        "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    state: dict[str, torch.Tensor] = {}
    num_heads = 0
    for index, (block, layer) in enumerate(prefixes):

        def get(name: str) -> torch.Tensor:
            key = block + name
            if key not in names:
                raise VitkitError(f"'{path}' lacks '{key}': the file is incomplete or not a ViT checkpoint")
            value = read(key)
            return value if layer is None else value[layer]

        out = f"blocks.{index}."
        state[out + "norm1.weight"], state[out + "norm1.bias"] = get("LayerNorm_0/scale"), get("LayerNorm_0/bias")
        query = get(f"{attn}/query/kernel")
        num_heads = query.shape[1]
        kernels = [get(f"{attn}/{part}/kernel") for part in ("query", "key", "value")]
        state[out + "attn.qkv.weight"] = torch.cat([k.reshape(k.shape[0], -1).T for k in kernels]).contiguous()
        state[out + "attn.qkv.bias"] = torch.cat([get(f"{attn}/{part}/bias").reshape(-1) for part in ("query", "key", "value")])
        proj = get(f"{attn}/out/kernel")
        state[out + "attn.proj.weight"] = proj.reshape(-1, proj.shape[-1]).T.contiguous()
        state[out + "attn.proj.bias"] = get(f"{attn}/out/bias")
        state[out + "norm2.weight"], state[out + "norm2.bias"] = get(f"{norm2}/scale"), get(f"{norm2}/bias")
        for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            state[out + f"mlp.{fc}.weight"] = get(f"{mlp}/{dense}/kernel").T.contiguous()
            state[out + f"mlp.{fc}.bias"] = get(f"{mlp}/{dense}/bias")
    return state, num_heads
