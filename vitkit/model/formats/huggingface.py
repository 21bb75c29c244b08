"""Hugging Face `ViTForImageClassification` / `ViTModel` checkpoints as vitkit names, numerics and class names.

A checkpoint is a folder with config.json and model.safetensors or pytorch_model.bin (or their sharded forms
with an `.index.json`). Parameter names on disk are transformers 4's, which transformers 5 still writes:

    [vit.]embeddings.{cls_token, position_embeddings, patch_embeddings.projection}
    [vit.]encoder.layer.{i}.{layernorm_before, attention.attention.{query,key,value}, attention.output.dense,
                             layernorm_after, intermediate.dense, output.dense}
    [vit.]layernorm, classifier (ForImageClassification), pooler.dense (ViTModel: tanh(dense(class token)))

transformers 5's in-memory names (`layers.{i}.attention.{q,k,v,o}_proj`, `layers.{i}.mlp.fc{1,2}`) are read too.
The config decides the numerics: `layer_norm_eps` (1e-12 by default, not timm's 1e-6) and `hidden_act`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from vitkit.errors import VitkitError
from vitkit.model.formats.renaming import rename_by_tables
from vitkit.model.vit import check_arch_fields

# ViTConfig's defaults, for a lone weights file with no config.json beside it.
_DEFAULT_CONFIG = {"layer_norm_eps": 1e-12, "hidden_act": "gelu", "pooler_act": "tanh"}
# transformers' ACT2FN names for the two GELU forms vitkit has; gelu_new, gelu_fast and gelu_pytorch_tanh are all the
# tanh approximation.
_GELU_FORMS = {"gelu": "erf", "gelu_python": "erf", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu_pytorch_tanh": "tanh"}

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_SUFFIX = ".index.json"
# config.json with ImageNet-21k's id2label is about 1 MiB; an index of the largest models a few MiB.
MAX_JSON_BYTES = 16 << 20

_TOP_LEVEL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "pooler.dense.weight": "pre_logits.fc.weight",
    "pooler.dense.bias": "pre_logits.fc.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
# Per-block names, transformers 4 (on disk) and 5 (in memory); q, k and v are fused afterwards.
_IN_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_BLOCK = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
# Parameters of heads vitkit has no use for in classification: masked-image-modelling's mask token.
_IGNORED = ("embeddings.mask_token",)


def is_huggingface_vit(state: dict) -> bool:
    return any(name.endswith("embeddings.patch_embeddings.projection.weight") for name in state)


def is_huggingface_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and bool(weight_files(path, check=False))


def weight_files(folder: Path, check: bool = True) -> list[Path]:
    """The files holding a checkpoint folder's tensors: one file, or the shards its index names."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / (name + _INDEX_SUFFIX)
        if index.is_file():
            try:
                weight_map = json.loads(_read_text(index))["weight_map"]
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                raise VitkitError(f"'{index}' is not a sharded-checkpoint index ({exc}): re-save the model") from None
            if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
                raise VitkitError(f"'{index}' has a weight_map that is not an object of shard file names: re-save the model")
            return [_shard_inside(folder, index, shard) for shard in dict.fromkeys(weight_map.values())]
    if check:
        raise VitkitError(
            f"'{folder}' has no {' or '.join(WEIGHT_FILES)}: save the model with save_pretrained into that folder"
        )
    return []


def _read_text(path: Path) -> str:
    """A JSON file's text, refused unread when it is larger than any config or index."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise VitkitError(f"'{path}' is {size / (1 << 20):.1f} MiB, more than any Hugging Face config or index "
                          f"({MAX_JSON_BYTES >> 20} MiB): the folder is damaged or not a checkpoint")
    return path.read_text()


def _shard_inside(folder: Path, index: Path, shard: str) -> Path:
    """The shard an index names, refused unopened unless it lies in the folder. A Hugging Face cache snapshot
    (`<repo>/snapshots/<revision>/`) may link its files into the repo's `blobs/`, as huggingface_hub does."""
    root = folder.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    path = folder / shard
    if (
        not shard or Path(shard).is_absolute() or ".." in Path(shard).parts
        or not any(path.resolve().is_relative_to(place) for place in allowed)
    ):
        raise VitkitError(
            f"'{index}' names shard '{shard}', which lies outside the checkpoint folder: vitkit reads only the "
            "folder's own files; re-save the model"
        )
    return path


def read_config(path: Path) -> dict:
    try:
        config = json.loads(_read_text(path))
    except (OSError, ValueError, RecursionError) as exc:
        raise VitkitError(f"cannot read '{path}' ({exc}): it should be the model's config.json") from None
    if not isinstance(config, dict):
        raise VitkitError(f"'{path}' is not a Hugging Face config (a JSON object): re-save the model with save_pretrained")
    model_type = config.get("model_type", "vit")
    if model_type != "vit":
        raise VitkitError(f"'{path}' describes a '{model_type}' model: vitkit reads Hugging Face ViT ('vit') checkpoints only")
    return config


def huggingface_to_vitkit(
    state: dict[str, torch.Tensor], config: dict | None
) -> tuple[dict[str, torch.Tensor], dict, list[str] | None]:
    """A Hugging Face ViT state_dict in vitkit names, the architecture fields its config states, and its labels."""
    config = {**_DEFAULT_CONFIG, **(config or {})}
    state = {name.removeprefix("vit."): tensor for name, tensor in state.items()}
    if "classifier.weight" in state:
        # ViTForImageClassification classifies the class token directly; a pooler saved beside it is never used.
        state = {name: tensor for name, tensor in state.items() if not name.startswith("pooler.")}
    converted, blocks, unknown = rename_by_tables(state, _TOP_LEVEL, _BLOCK, _IN_BLOCK, _IGNORED)
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for entry in blocks:
        if entry.part in ("q", "k", "v"):
            qkv.setdefault((entry.block, entry.suffix), {})[entry.part] = entry.tensor
        else:
            converted[f"blocks.{entry.block}.{entry.part}.{entry.suffix}"] = entry.tensor
    if unknown:
        raise VitkitError(
            f"not a Hugging Face ViT checkpoint: unexpected tensors {', '.join(unknown[:3])}: "
            "vitkit reads ViTModel and ViTForImageClassification"
        )
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise VitkitError(f"Hugging Face checkpoint block {block} lacks some of query/key/value {kind}: the file is incomplete")
        converted[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted, _arch_fields(config, "pre_logits.fc.weight" in converted), _class_names(config, converted)


def _arch_fields(config: dict, has_pooler: bool) -> dict:
    act = config["hidden_act"]
    if not isinstance(act, str) or act not in _GELU_FORMS:
        raise VitkitError(f"the checkpoint's hidden_act '{act}' is not a GELU vitkit has: one of {', '.join(_GELU_FORMS)}")
    if has_pooler and config.get("pooler_act", "tanh") != "tanh":
        raise VitkitError(f"the checkpoint's pooler_act '{config['pooler_act']}' is not tanh, the only pooler vitkit has")
    image_size, patch_size = config.get("image_size"), config.get("patch_size")
    for name, value in (("image_size", image_size), ("patch_size", patch_size)):
        if isinstance(value, (list, tuple)) and not all(isinstance(side, int) for side in value):
            raise VitkitError(f"the checkpoint's {name} is {str(value)[:100]}, not a list of pixel counts: "
                              "the config.json is damaged; re-save the model with save_pretrained")
        if isinstance(value, (list, tuple)) and len(set(value)) > 1:
            raise VitkitError(f"the checkpoint's {name} is {list(value)}: vitkit's ViT takes square images and patches")
    if config["layer_norm_eps"] is None:  # check_arch_fields takes None for 'not stated'; the config states it
        raise VitkitError("the checkpoint's layer_norm_eps is null: the config.json is damaged; re-save the model "
                          "with save_pretrained")
    fields = {"ln_eps": config["layer_norm_eps"], "gelu": _GELU_FORMS[act]}
    if "num_attention_heads" in config:
        fields["num_heads"] = config["num_attention_heads"]
    check_arch_fields(fields, "the Hugging Face config (layer_norm_eps, num_attention_heads)")
    fields["ln_eps"] = float(fields["ln_eps"])
    return fields


def _class_names(config: dict, state: dict) -> list[str] | None:
    labels = config.get("id2label")
    if not isinstance(labels, dict) or "head.weight" not in state:
        return None
    try:
        names = [str(labels[key]) for key in sorted(labels, key=int)]
    except (ValueError, TypeError):
        return None
    # transformers fills id2label with LABEL_0, LABEL_1, ... when nobody named the classes.
    if len(names) != state["head.weight"].shape[0] or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names
