"""Training checkpoints: full state for an exact resume, a weights-only file beside it, keep-newest-plus-best."""
from __future__ import annotations

import dataclasses
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from vitkit import storage
from vitkit.errors import VitkitError
from vitkit.faults import fault_point
from vitkit.fileio import atomic_path
from vitkit.model.formats.huggingface import is_huggingface_folder
from vitkit.deploy.metadata import Preprocessing
from vitkit.model.loading import save_model

FULL_SUFFIX = ".pt"
WEIGHTS_SUFFIX = ".safetensors"
EMA_SUFFIX = ".ema.safetensors"  # the EMA of the weights (train.ema_decay), beside the raw ones
SHARDS_SUFFIX = ".dcp"  # a torch.distributed.checkpoint folder: each rank's shards of the model and optimizer
# Full tensors on rank 0's CPU, nothing on the other ranks: one rank writes, no GPU holds a second copy.
_FULL_ON_RANK_ZERO = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_stem(backbone: str, epoch: int, step: int) -> str:
    """The original's names: `{backbone}-{epoch}_{step_in_epoch}` with the epoch counted from 1."""
    return f"{backbone}-{epoch}_{step}"


def _position(path: Path) -> tuple[int, int]:
    match = re.search(r"-(\d+)_(\d+)$", path.stem)
    return (int(match[1]), int(match[2])) if match else (-1, -1)


def is_checkpoint_marker(name: str) -> bool:
    """The file whose presence makes a checkpoint listed: its .pt, written (and uploaded) after its other files."""
    return name.endswith(FULL_SUFFIX) and _position(Path(name)) != (-1, -1)


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Full checkpoints in a folder, oldest first by (epoch, step)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"*-*_*{FULL_SUFFIX}") if _position(p) != (-1, -1)]
    return sorted(found, key=_position)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def gather_full_state(model, optimizer) -> tuple[dict, dict]:
    """Model and optimizer state as full CPU tensors keyed by parameter name, the same for one process, DDP and
    FSDP, so a checkpoint resumes under any strategy. A collective: every rank calls it; rank 0 gets the tensors."""
    return gather_full_weights(model), get_optimizer_state_dict(model, optimizer, options=_FULL_ON_RANK_ZERO)


def gather_full_weights(model) -> dict:
    return get_model_state_dict(model, options=_FULL_ON_RANK_ZERO)


def restore_full_state(model, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Load gathered state into a model of any strategy; FSDP keeps only its own shard of each tensor."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if any(isinstance(key, int) for key in optimizer_state.get("state", {})):
        optimizer.load_state_dict(optimizer_state)  # keyed by parameter index: written before vitkit 0.2
    else:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def save_shards(folder: Path, stem: str, model, optimizer) -> str:
    """Every rank writes its own shards into `stem.dcp/` (a collective). Written under a temporary name and renamed
    by rank 0 once all ranks are done, so a killed run never leaves a half-written folder under the final name."""
    import torch.distributed.checkpoint as dcp

    final, partial = folder / f"{stem}{SHARDS_SUFFIX}", folder / f".{stem}{SHARDS_SUFFIX}.partial"
    is_main = not _distributed() or dist.get_rank() == 0
    if is_main:
        shutil.rmtree(partial, ignore_errors=True)
    if _distributed():
        dist.barrier()
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=partial)
    if _distributed():
        dist.barrier()
    if is_main:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    return final.name


def load_shards(folder: Path, name: str, model, optimizer) -> None:
    """Read `name` (a .dcp folder) into this run's model and optimizer, re-sharded for its process count."""
    import torch.distributed.checkpoint as dcp

    path = folder / name
    if not path.is_dir():
        raise VitkitError(f"the sharded state '{path}' of this checkpoint is missing: resume from another checkpoint")
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def save_training_checkpoint(folder: Path, stem: str, state: dict, model, weights: dict, ema_model=None) -> Path:
    """Write `stem.safetensors` (the full weights), `stem.ema.safetensors` (the EMA's, when `ema_model` is given) and
    then `stem.pt` (everything else a resume needs, plus the model and optimizer unless they are in a `stem.dcp`
    folder), each atomically. The .pt comes last: a checkpoint is only listed once every file it names is complete,
    and a save that fails takes its weights files back. A failed write (a full disk, a quota, a file size limit) is
    a VitkitError; the checkpoints written before are untouched."""
    weights_path, full = folder / f"{stem}{WEIGHTS_SUFFIX}", folder / f"{stem}{FULL_SUFFIX}"
    ema_path = folder / f"{stem}{EMA_SUFFIX}"
    try:
        preprocessing = Preprocessing(**state["preprocessing"]) if state.get("preprocessing") else None
        save_model(model, weights_path, class_names=state.get("class_names"), state_dict=weights,
                   preprocessing=preprocessing)
        if ema_model is not None:
            save_model(ema_model, ema_path, class_names=state.get("class_names"), preprocessing=preprocessing)
        fault_point("checkpoint_weights_written")
        with atomic_path(full) as tmp:
            torch.save(state, tmp)
    except Exception as error:  # noqa: BLE001 - safetensors and torch.save report a short write in their own types
        if not full.exists():
            weights_path.unlink(missing_ok=True)
            ema_path.unlink(missing_ok=True)
        previous = [path.name for path in list_checkpoints(folder)]
        kept = f"the newest checkpoint, {previous[-1]}, is intact" if previous else "no checkpoint was written before"
        reason = " ".join(str(error).split())[:200]
        raise VitkitError(f"could not write checkpoint {stem} in {folder} ({reason}): {kept}; if the disk is full, "
                          "free space there or lower checkpoint.keep_checkpoint_max, then resume with --resume auto"
                          ) from None
    return full


def remove_leftovers(folder: Path) -> list[Path]:
    """What a save killed half-way leaves: temporary files of atomic writes and a checkpoint's .safetensors without
    its .pt. Rank 0 removes them when a run starts in the folder; returns what it removed."""
    if not folder.is_dir():
        return []
    leftovers = [path for path in folder.glob(".*.tmp") if path.is_file()]
    leftovers += [path for path in folder.glob(f"*-*_*{WEIGHTS_SUFFIX}")
                  if _position(path) != (-1, -1) and not path.with_suffix(FULL_SUFFIX).exists()]
    leftovers += [path for path in folder.glob(f"*-*_*{EMA_SUFFIX}")
                  if not folder.joinpath(path.name.removesuffix(EMA_SUFFIX) + FULL_SUFFIX).exists()]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def prune_checkpoints(folder: Path, keep: int, protect: str = "") -> None:
    """Keep the `keep` newest checkpoints, and the one named `protect` (the best so far) whatever its age."""
    for old in list_checkpoints(folder)[:-keep]:
        if old.stem != protect:
            old.unlink(missing_ok=True)  # first, so that a checkpoint is never listed without its other files
            old.with_suffix(WEIGHTS_SUFFIX).unlink(missing_ok=True)
            old.with_suffix(EMA_SUFFIX).unlink(missing_ok=True)
            shutil.rmtree(old.with_suffix(SHARDS_SUFFIX), ignore_errors=True)
    # Shards of a save that died before its .pt was written: every save is complete when rank 0 prunes.
    for shards in [*folder.glob(f"*{SHARDS_SUFFIX}"), *folder.glob(f".*{SHARDS_SUFFIX}.partial")]:
        if not shards.with_suffix(FULL_SUFFIX).is_file():
            shutil.rmtree(shards, ignore_errors=True)


def newest_weights(path: str) -> str:
    """A training run's folder stands for the weights of its newest checkpoint; anything else is itself.

    A Hugging Face model folder is a checkpoint of its own, read whole by load_model. A URL is read the same way
    from the bucket: a run folder there stands for the URL of its newest weights, which load_model fetches.
    """
    if storage.is_url(path):
        return _newest_remote_weights(path)
    if not Path(path).is_dir() or is_huggingface_folder(Path(path)):
        return path
    found = list_checkpoints(path)
    if not found:
        raise VitkitError(f"'{path}' is a folder without vitkit checkpoints: pass a checkpoint file with --model")
    return str(found[-1].with_suffix(WEIGHTS_SUFFIX))


def _newest_remote_weights(url: str) -> str:
    if not storage.isdir(url):
        return url
    names = storage.listdir(url)
    if "config.json" in names:  # a Hugging Face folder: load_model fetches it whole
        return url
    found = sorted((name for name in names if is_checkpoint_marker(name)), key=lambda name: _position(Path(name)))
    if not found:
        raise VitkitError(f"'{url}' is a folder without vitkit checkpoints: pass a checkpoint file with --model")
    return url.rstrip("/") + "/" + Path(found[-1]).with_suffix(WEIGHTS_SUFFIX).name


def load_training_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise VitkitError(f"checkpoint '{path}' to resume from does not exist: give a .pt file or --resume auto")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is not a usable checkpoint
        raise VitkitError(f"cannot resume from '{path}' ({str(exc).splitlines()[0][:120]}): it is not a vitkit training checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != "vitkit-train":
        raise VitkitError(f"'{path}' is not a vitkit training checkpoint (no optimizer state): use it as model.pretrained instead")
    return state


def load_resume_state(resume: str, folder: Path) -> tuple[Path | None, dict | None]:
    """(path, state) of the checkpoint to continue from: none for '' (a fresh run); for `auto` the newest readable
    full checkpoint in the output folder (none yet: a fresh run), each unreadable newer one skipped with a warning
    that names it; else the given path, which must be readable."""
    if not resume:
        return None, None
    if resume != "auto":
        return Path(resume), load_training_checkpoint(resume)
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load_training_checkpoint(path)
        except VitkitError as error:
            warnings.warn(f"skipping checkpoint {path.name}, which cannot be read ({error}); trying an older one")
    return None, None


def arch_dict(model) -> dict:
    return dataclasses.asdict(model.arch)


def ema_weights(path: str) -> str:
    """What --ema reads: the EMA weights saved beside a training checkpoint (its .pt or .safetensors) or beside a run
    folder's newest one, `<stem>.ema.safetensors`; such a file itself is returned as it is."""
    path = str(path)
    if path.endswith(EMA_SUFFIX):
        return path
    weights = newest_weights(path)
    for suffix in (WEIGHTS_SUFFIX, FULL_SUFFIX):
        if weights.endswith(suffix) and _position(Path(weights.removesuffix(suffix))) != (-1, -1):
            found = weights.removesuffix(suffix) + EMA_SUFFIX
            break
    else:
        raise VitkitError(f"--ema reads the EMA weights of a vitkit training checkpoint, and '{path}' is none: give "
                          "a run folder or its <name>-<epoch>_<step>.pt / .safetensors, or drop --ema")
    if not storage.is_url(found) and not Path(found).is_file():
        raise VitkitError(f"'{path}' has no EMA weights ({Path(found).name} is missing): train with "
                          "train.ema_decay > 0 to keep them, or drop --ema")
    return found
