"""Reading and writing model weights: detect a file's format, infer the ViT it holds, build it, load it."""
from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from vitkit.deploy.metadata import ModelCard, Preprocessing
from vitkit.errors import VitkitError
from vitkit.storage import fetch, is_url
from vitkit.fileio import atomic_path
from vitkit.model.formats.magic import HEAD_BYTES, kind_from_head
from vitkit.model.presets import find_heads
from vitkit.model.vit import ARCH_FIELDS, STYLES, ViTArch, VisionTransformer, check_arch_fields, resample_pos_embed

# The numerics each source framework trains with; only these, not its dropout rates, matter for loading.
_NUMERIC_KEYS = ("ln_eps", "gelu", "init")
# Tensors whose shapes infer_arch reads, and how many dimensions each has.
_SHAPE_SOURCES = {"patch_embed.proj.weight": 4, "blocks.0.mlp.fc1.weight": 2, "head.weight": 2,
                  "pre_logits.fc.weight": 2, "pos_embed": 3}
# Wrappers that other training loops put around a state_dict or its names.
_STATE_KEYS = ("model", "state_dict", "model_state_dict", "model_ema", "module")
_NAME_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclasses.dataclass
class Weights:
    """A state_dict in vitkit's names plus what the file said about itself."""

    state_dict: dict[str, torch.Tensor]
    source: str  # 'vitkit', 'timm', 'mindspore', 'npz', 'torchvision' or 'huggingface'
    arch: dict = dataclasses.field(default_factory=dict)  # architecture fields the file stores
    class_names: list[str] | None = None
    preprocessing: Preprocessing | None = None  # the eval preprocessing the weights were evaluated with
    extras: dict = dataclasses.field(default_factory=dict)  # e.g. a MindSpore training checkpoint's Adam moments

    def card(self, arch: ViTArch, new_head: bool = False) -> ModelCard:
        """What the weights say about themselves, for a model of `arch` built from them: no class names once its
        head was replaced, and the preprocessing at the model's image size (a resize derived from it when the
        size changed)."""
        preprocessing = self.preprocessing
        if preprocessing is not None and preprocessing.image_size != arch.image_size:
            preprocessing = dataclasses.replace(preprocessing, image_size=arch.image_size, resize_size=0)
        names = None if new_head or self.class_names is None else tuple(self.class_names)
        return ModelCard(preprocessing, names, arch.patch_size)


def sniff_format(path: Path) -> str:
    """'safetensors', 'torch', 'mindspore' or 'npz' from the file's first bytes, never from its name alone."""
    with open(path, "rb") as handle:
        head = handle.read(HEAD_BYTES)
    kind = kind_from_head(head)
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        # ValueError: an entry name that is not UTF-8; NotImplementedError: a later zip version than Python reads
        except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as exc:
            raise VitkitError(f"'{path}' is a damaged zip archive ({str(exc)[:200]}): copy or save it again") from None
        if any(name.endswith("data.pkl") for name in names):
            return "torch"
        if names and all(name.endswith(".npy") for name in names):
            return "npz"
        raise VitkitError(f"'{path}' is a zip archive but neither a PyTorch checkpoint nor an .npz of arrays")
    if kind == "safetensors":
        return "safetensors"
    if kind == "pickle":
        return "torch"  # PyTorch's legacy (non-zip) serialisation
    from vitkit.model.formats.mindspore import is_mindspore_checkpoint

    if is_mindspore_checkpoint(path):
        return "mindspore"
    raise VitkitError(
        f"'{path}' is not a checkpoint vitkit can read: expected safetensors, a PyTorch .pth/.pt, a MindSpore .ckpt "
        "or a Flax .npz"
    )


def read_weights(path: str | Path) -> Weights:
    """The weights in any supported file (or URL: read from its local copy), renamed to vitkit's (timm's) names."""
    if is_url(path):
        path = fetch(path)
    path = Path(path)
    if not path.exists():
        raise VitkitError(f"checkpoint '{path}' does not exist: check the path")
    if path.is_dir():
        return _read_huggingface_folder(path)
    try:
        kind = sniff_format(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise VitkitError(f"cannot read checkpoint '{path}': {exc}") from None
    if kind == "mindspore":
        from vitkit.model.formats.mindspore import mindspore_to_vitkit, read_mindspore_checkpoint

        state, extras = mindspore_to_vitkit(read_mindspore_checkpoint(path))
        return Weights(state, "mindspore", extras=extras)
    if kind == "npz":
        from vitkit.model.formats.npz import read_npz

        state, arch = read_npz(path)
        return Weights(state, "npz", arch)
    if kind == "safetensors":
        return _read_safetensors(path)
    return _read_torch(path)


def _read_huggingface_folder(folder: Path) -> Weights:
    from vitkit.model.formats.huggingface import read_config, weight_files

    if not (folder / "config.json").is_file():
        raise VitkitError(
            f"'{folder}' is a folder: give the checkpoint file inside it, or a Hugging Face model folder (config.json "
            "and model.safetensors or pytorch_model.bin)"
        )
    config = read_config(folder / "config.json")
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        if not file.is_file():
            raise VitkitError(f"shard '{file}' named by the checkpoint index is missing: download the whole folder")
        state.update(_safetensors_tensors(file)[0] if sniff_format(file) == "safetensors" else _torch_tensors(file)[0])
    weights = _foreign_weights(state, folder, config)
    if weights is None:
        raise VitkitError(
            f"'{folder}' holds no Hugging Face ViT (its tensors are e.g. {', '.join(list(state)[:3])}): "
            "vitkit reads ViTModel and ViTForImageClassification folders"
        )
    return weights


def _foreign_weights(state: dict[str, torch.Tensor], path: Path, hf_config: dict | None = None) -> Weights | None:
    """torchvision's or Hugging Face's state_dicts in vitkit names with their source's numerics; None for others."""
    from vitkit.model.formats.huggingface import huggingface_to_vitkit, is_huggingface_vit, read_config
    from vitkit.model.formats.torchvision import is_torchvision_vit, torchvision_to_vitkit

    if is_huggingface_vit(state):
        # A weights file passed on its own still has its config.json beside it when it came from save_pretrained.
        sibling = path.parent / "config.json" if path.is_file() else None
        if hf_config is None and sibling is not None and sibling.is_file():
            hf_config = read_config(sibling)
        converted, arch, class_names = huggingface_to_vitkit(state, hf_config)
        return Weights(converted, "huggingface", arch, class_names)
    if is_torchvision_vit(state):
        converted, arch = torchvision_to_vitkit(state)
        return Weights(converted, "torchvision", arch)
    return None


def _safetensors_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise VitkitError(f"'{path}' is not a readable safetensors file ({exc}): the file may be truncated") from None
    return state, metadata


def _read_safetensors(path: Path) -> Weights:
    state, metadata = _safetensors_tensors(path)
    arch = _metadata_json(path, metadata, "vitkit.arch", dict)
    check_arch_fields(arch, f"'{path}' metadata 'vitkit.arch'")
    names = _checked_names(_metadata_json(path, metadata, "vitkit.class_names", list) or None,
                           f"'{path}' metadata 'vitkit.class_names'")
    preprocessing = Preprocessing.from_metadata(
        _metadata_json(path, metadata, "vitkit.preprocessing", dict) or None, f"'{path}' metadata 'vitkit.preprocessing'"
    )
    state = _strip_prefixes(state)
    if not arch and (foreign := _foreign_weights(state, path)):
        return foreign
    return Weights(state, "vitkit" if arch else "timm", arch, names, preprocessing)


def _checked_names(names, where: str) -> list[str] | None:
    if names is not None and not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
        raise VitkitError(f"{where} is not a list of names: the file is damaged or not vitkit's")
    return names


def _metadata_json(path: Path, metadata: dict, key: str, kind: type):
    """A safetensors metadata entry holding JSON of one kind (empty when absent), or a one-line VitkitError."""
    if key not in metadata:
        return kind()
    try:
        value = json.loads(metadata[key])
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, kind):
        what = "a JSON object" if kind is dict else "a JSON list"
        raise VitkitError(f"'{path}' metadata '{key}' is not {what}: the file is damaged or not vitkit's")
    return value


def _torch_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a pickled state_dict (unwrapped from a training loop's dict) and the whole loaded dict."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe pickle"
        raise VitkitError(
            f"'{path}' needs arbitrary code to unpickle, which vitkit never runs ({first_line[:120]}): "
            "re-save it as a plain state_dict (torch.save(model.state_dict(), ...)) or as safetensors"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a damaged pickle fails the weights-only unpickler with any type
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise VitkitError(f"cannot read PyTorch checkpoint '{path}' ({reason}): the file may be truncated or damaged") from None
    if not isinstance(loaded, dict):
        raise VitkitError(f"'{path}' holds a {type(loaded).__name__}, not a state_dict: save model.state_dict() instead")
    if loaded.get("format") == "vitkit-train" and "shards" in loaded:
        raise VitkitError(f"'{path}' is a sharded training checkpoint (its tensors are in {loaded['shards']}): "
                          f"use the weights beside it, {Path(path).with_suffix('.safetensors').name}")
    state = loaded
    for key in _STATE_KEYS:
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise VitkitError(f"'{path}' holds no tensors: expected a model state_dict")
    return tensors, loaded


def _read_torch(path: Path) -> Weights:
    tensors, loaded = _torch_tensors(path)
    arch = loaded.get("arch") if isinstance(loaded.get("arch"), dict) else {}
    check_arch_fields(arch, f"'{path}' entry 'arch'")
    state = _strip_prefixes(tensors)
    if not arch and (foreign := _foreign_weights(state, path)):
        return foreign
    names = _checked_names(loaded.get("class_names"), f"'{path}' entry 'class_names'")
    preprocessing = Preprocessing.from_metadata(loaded.get("preprocessing"), f"'{path}' entry 'preprocessing'")
    return Weights(state, "vitkit" if arch else "timm", dict(arch), names, preprocessing)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the 'module.' (DDP), '_orig_mod.' (torch.compile) or 'model.' wrappers around every name."""
    changed = True
    while changed:
        changed = False
        for prefix in _NAME_PREFIXES:
            if state and all(name.startswith(prefix) for name in state):
                state = {name[len(prefix) :]: value for name, value in state.items()}
                changed = True
    return state


def infer_arch(weights: Weights, **overrides) -> ViTArch:
    """The architecture a state_dict was made with: from its shapes, then the file's metadata, then arguments."""
    state = weights.state_dict
    if "patch_embed.proj.weight" not in state:
        raise VitkitError(
            f"the checkpoint has no patch embedding ('patch_embed.proj.weight'; it has e.g. {', '.join(list(state)[:3])}): "
            "it is not a ViT in timm, vitkit or MindSpore model-zoo layout"
        )
    for name, dims in _SHAPE_SOURCES.items():
        if name in state and state[name].dim() != dims:
            raise VitkitError(
                f"the checkpoint's '{name}' has shape {tuple(state[name].shape)}, not {dims}-dimensional: "
                "the file is damaged or not a ViT state_dict"
            )
    embed = state["patch_embed.proj.weight"]
    fields: dict = {"embed_dim": embed.shape[0], "in_chans": embed.shape[1], "patch_size": embed.shape[2]}
    block_ids = {int(match[1]) for name in state if (match := re.match(r"blocks\.(\d+)\.", name))}
    fields["depth"] = len(block_ids)
    if fields["depth"] == 0:
        raise VitkitError("the checkpoint has no transformer blocks ('blocks.N.*'): it is not a ViT state_dict")
    if "blocks.0.mlp.fc1.weight" not in state:
        raise VitkitError("the checkpoint's first block has no MLP ('blocks.0.mlp.fc1.weight'): it is not a ViT state_dict")
    fields["mlp_dim"] = state["blocks.0.mlp.fc1.weight"].shape[0]
    fields["qkv_bias"] = "blocks.0.attn.qkv.bias" in state
    fields["class_token"] = "cls_token" in state
    fields["fc_norm"] = "fc_norm.weight" in state
    fields["pool"] = "token" if fields["class_token"] and not fields["fc_norm"] else "mean"
    fields["num_classes"] = state["head.weight"].shape[0] if "head.weight" in state else 0
    if "pre_logits.fc.weight" in state:
        fields["representation_size"] = state["pre_logits.fc.weight"].shape[0]
    if "pos_embed" in state:
        fields["pos_embed"] = "learn"
        grid_tokens = state["pos_embed"].shape[1] - (1 if fields["class_token"] else 0)
        grid = math.isqrt(grid_tokens)
        fields["image_size"] = grid * fields["patch_size"]
    else:
        fields["pos_embed"] = "sincos"
    numerics = source_numerics(weights)
    # The style whose numerics the weights have, so that what the file does not state (its dropout rates) follows it.
    fields["style"] = next(
        (style for style, values in STYLES.items() if all(values[key] == numerics[key] for key in _NUMERIC_KEYS)),
        _style_of(weights.source),
    )
    fields.update(numerics)
    fields.update({key: value for key, value in weights.arch.items() if key in ARCH_FIELDS})
    if "num_heads" not in weights.arch and "num_heads" not in overrides:
        fields["num_heads"] = _guess_heads(fields["embed_dim"], fields["depth"])
    unknown = sorted(set(overrides) - ARCH_FIELDS.keys())
    if unknown:
        raise VitkitError(f"unknown model argument(s) {', '.join(unknown)}: valid ones are {', '.join(sorted(ARCH_FIELDS))}")
    fields.update(overrides)
    return ViTArch(**fields)


def source_numerics(weights: Weights) -> dict:
    """The numerics (LayerNorm eps, GELU form, init) the weights were trained with: the file's word, else its source's."""
    numerics = {key: value for key, value in STYLES[_style_of(weights.source)].items() if key in _NUMERIC_KEYS}
    numerics.update({key: value for key, value in weights.arch.items() if key in _NUMERIC_KEYS})
    return numerics


def _style_of(source: str) -> str:
    return "mindspore" if source == "mindspore" else "timm"


def _guess_heads(width: int, depth: int) -> int:
    heads = find_heads(width, depth)
    if heads is None:
        # The most heads at least 64 wide (ViT's usual head width) that divide the width: 96 wide gives 1 of 96.
        heads = max(count for count in range(1, max(1, width // 64) + 1) if width % count == 0)
        warnings.warn(
            f"the checkpoint does not say how many attention heads it has; assuming {heads} ({width // heads} per "
            "head). Pass num_heads=... (on the command line: the run's config, --config_path, or --model.num_heads) "
            "if that is wrong: the logits depend on it.",
            stacklevel=3,
        )
    return heads


def load_state(model: VisionTransformer, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """load_state_dict with one-line errors, resampling position embeddings to the model's grid."""
    state = dict(state)
    if "pos_embed" in state and isinstance(model.pos_embed, torch.nn.Parameter):
        if state["pos_embed"].shape != model.pos_embed.shape:
            state["pos_embed"] = resample_pos_embed(state["pos_embed"], model.arch.grid_size, model.arch.num_prefix_tokens)
    _check_fit({name: tensor.shape for name, tensor in model.state_dict().items()}, state, strict)
    model.load_state_dict(state, strict=False)


def _check_fit(own: dict[str, torch.Size], state: dict[str, torch.Tensor], strict: bool, resampled=()) -> None:
    """A one-line VitkitError unless `state` fits a model with parameters of the shapes in `own` (names in
    `resampled` may differ in shape: load_state resamples them)."""
    missing = [name for name in own if name not in state]
    extra = [name for name in state if name not in own]
    mismatched = [
        f"{name} {tuple(state[name].shape)} vs {tuple(own[name])}"
        for name in own
        if name in state and state[name].shape != own[name] and name not in resampled
    ]
    if mismatched:
        raise VitkitError(
            f"checkpoint tensors do not fit the model ({len(mismatched)} mismatched, e.g. {mismatched[0]}): "
            "build the model with the checkpoint's architecture (patch, width, classes)"
        )
    if strict and (missing or extra):
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensor(s) e.g. {', '.join(missing[:3])}")
        if extra:
            problems.append(f"{len(extra)} unexpected e.g. {', '.join(extra[:3])}")
        raise VitkitError(
            f"checkpoint does not match the model: {'; '.join(problems)}: check depth/pooling/head or load non-strictly"
        )


def load_model(path: str | Path, *, device: str | torch.device = "cpu", components=None, with_card: bool = False,
               **overrides):
    """The ViT in any checkpoint vitkit reads, ready for eval.

    The architecture comes from the tensors' shapes; what shapes cannot tell (the head count, numerics) from the
    file's metadata or, failing that, the source's conventions; any ViTArch field can be overridden, e.g.
    num_heads=4 or image_size=384 (position embeddings are resampled bicubically).

    For fine-tuning, num_classes other than the file's gives a freshly initialised head (and no class names), and
    representation_size=0 drops a pre-logits layer, as the ViT paper did when it fine-tuned.

    with_card=True returns (model, ModelCard): the class names and eval preprocessing saved with the weights.
    """
    model, card = model_from_weights(read_weights(path), components=components, with_card=True, **overrides)
    model = model.to(device).eval()
    return (model, card) if with_card else model


def model_from_weights(weights: Weights, *, components=None, with_card: bool = False, **overrides):
    """load_model's work on weights already read (see there); the model stays on the CPU in training mode."""
    arch = infer_arch(weights, **overrides)
    state, dropped = dict(weights.state_dict), []
    if "num_classes" in overrides or "representation_size" in overrides:
        state, dropped = drop_unfitting_head(state, _shapes_of(arch, components))
    new_head = any(name.startswith("head.") for name in dropped)
    # Built headless so that the strict load still checks every other tensor; the fresh head comes afterwards.
    build = arch.replace(num_classes=0) if new_head else arch
    # The tensors are checked against the architecture on a model without storage first: a file whose metadata
    # claims a far larger model than its tensors hold is refused before anything that size is allocated. Position
    # embeddings may differ only where the caller asked for another image size (they are then resampled).
    _check_fit(_shapes_of(build, components), state, True, ("pos_embed",) if "image_size" in overrides else ())
    model = VisionTransformer(build, components=components)
    load_state(model, state)
    if new_head:
        model.reset_classifier(arch.num_classes)
    return (model, weights.card(model.arch, new_head)) if with_card else model


def drop_unfitting_head(state: dict[str, torch.Tensor], own: dict[str, torch.Size]) -> tuple[dict, list[str]]:
    """The one rule for starting a model from weights trained for another task: pre-logits tensors the model
    lacks (the ViT paper fine-tuned without them), and head tensors it lacks or that have another shape (another
    class count, or a head that read the dropped pre-logits), are left out; the model keeps its own, freshly
    initialised. Returns the state without them and their names."""
    dropped = [
        name for name in state
        if (name.startswith("pre_logits.") and name not in own)
        or (name.startswith("head.") and (name not in own or state[name].shape != own[name]))
    ]
    return {name: tensor for name, tensor in state.items() if name not in dropped}, dropped


def model_for_config(weights: Weights, model_cfg, *, with_card: bool = False, **overrides):
    """model_from_weights for `vitkit eval`, `export`, `predict` and `convert`: the checkpoint's model with the
    config's model.components (the parts the run was trained with, whose tensors the stock ViT lacks) and, unless
    `overrides` names it, the config's head count (config_heads). `model_cfg` None is vitkit's defaults."""
    if model_cfg is not None and "num_heads" not in overrides and (heads := config_heads(weights, model_cfg)):
        overrides["num_heads"] = heads
    components = (model_cfg.components or None) if model_cfg is not None else None
    return model_from_weights(weights, components=components, with_card=with_card, **overrides)


def config_heads(weights: Weights, model_cfg) -> int | None:
    """The head count a config gives the checkpoint: model.num_heads when set; else, for a file that does not say
    (a MindSpore .ckpt, a bare state_dict), the config's preset's when the config's width and depth are the file's.
    The original's YAML names only its backbone, which holds the heads its checkpoints were trained with."""
    if model_cfg.num_heads:
        return model_cfg.num_heads
    if "num_heads" in weights.arch:
        return None
    from vitkit.model.presets import resolve_preset

    preset = resolve_preset(model_cfg.name)
    width, depth = model_cfg.embed_dim or preset["embed_dim"], model_cfg.depth or preset["depth"]
    try:
        shape = infer_arch(weights, num_heads=1)  # one head fits any width: the shape alone, without the guess
    except VitkitError:
        return None  # not a ViT: model_from_weights says why
    return preset["num_heads"] if (shape.embed_dim, shape.depth) == (width, depth) else None


def _shapes_of(arch: ViTArch, components=None) -> dict[str, torch.Size]:
    """The state_dict shapes of the model `arch` describes, from a build on the meta device (no storage)."""
    with torch.device("meta"):
        return {name: tensor.shape for name, tensor in VisionTransformer(arch, components=components).state_dict().items()}


def _write_mindspore(arch: ViTArch, state: dict[str, torch.Tensor], path: Path) -> None:
    """The original's .ckpt: its tags, Float32 throughout (what its network holds), read-only."""
    from vitkit.model.formats.mindspore import vitkit_to_mindspore, write_mindspore_checkpoint

    if arch.pos_embed != "learn":
        raise VitkitError(
            f"cannot write '{path}': the model uses fixed sin-cos position embeddings, and MindSpore's ViT learns them; "
            "save it as .safetensors instead"
        )
    tensors = vitkit_to_mindspore({name: t.float() if t.is_floating_point() else t for name, t in state.items()})
    mindspore = STYLES["mindspore"]
    if (arch.ln_eps, arch.gelu) != (mindspore["ln_eps"], mindspore["gelu"]):
        warnings.warn(
            f"'{path}' holds weights trained with LayerNorm eps {arch.ln_eps:g} and {arch.gelu} GELU; MindSpore's ViT "
            f"runs them with eps {mindspore['ln_eps']:g} and {mindspore['gelu']} GELU (a .ckpt cannot record numerics), "
            "so its logits will differ slightly: keep a .safetensors copy for exact predictions",
            stacklevel=3,
        )
    write_mindspore_checkpoint(path, tensors)


def save_model(model: VisionTransformer, path: str | Path, class_names: list[str] | None = None,
               state_dict: dict[str, torch.Tensor] | None = None, preprocessing: Preprocessing | None = None,
               card: ModelCard | None = None) -> Path:
    """Write the weights atomically: .safetensors (with the architecture, class names and eval preprocessing as
    metadata), .pth/.pt, or MindSpore .ckpt (tensors only). `card` (what load_model(with_card=True) returned)
    supplies class names and preprocessing that are not passed; `state_dict` stands in for the model's own when
    that is sharded (FSDP): the gathered full weights."""
    path = Path(path)
    source = model.state_dict() if state_dict is None else state_dict
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in source.items()}
    arch = dataclasses.asdict(model.arch)
    if card is not None:
        class_names = class_names if class_names is not None else card.class_names
        preprocessing = preprocessing or card.preprocessing
    names = list(class_names) if class_names is not None else None
    preprocessing_fields = dataclasses.asdict(preprocessing) if preprocessing is not None else None
    suffix = path.suffix.lower()
    if suffix == ".ckpt":
        _write_mindspore(model.arch, state, path)
        return path
    with atomic_path(path) as tmp:
        if suffix in (".pth", ".pt"):
            torch.save({"arch": arch, "class_names": names, "preprocessing": preprocessing_fields, "model": state}, tmp)
        elif suffix == ".safetensors":
            from safetensors.torch import save_file

            metadata = {"format": "pt", "vitkit.arch": json.dumps(arch)}
            if names is not None:
                metadata["vitkit.class_names"] = json.dumps(names)
            if preprocessing_fields is not None:
                metadata["vitkit.preprocessing"] = json.dumps(preprocessing_fields)
            save_file(state, str(tmp), metadata=metadata)
        else:
            raise VitkitError(f"cannot write '{path}': use a .safetensors, .pth or .ckpt file name")
    return path
