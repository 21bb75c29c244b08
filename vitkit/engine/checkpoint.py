"""Training checkpoints: full state for an exact resume, a weights-only file beside it, keep-newest-plus-best."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from vitkit.errors import VitkitError
from vitkit.fileio import atomic_path
from vitkit.model.loading import save_model

FULL_SUFFIX = ".pt"
WEIGHTS_SUFFIX = ".safetensors"


def checkpoint_stem(backbone: str, epoch: int, step: int) -> str:
    """The original's names: `{backbone}-{epoch}_{step_in_epoch}` with the epoch counted from 1."""
    return f"{backbone}-{epoch}_{step}"


def _position(path: Path) -> tuple[int, int]:
    match = re.search(r"-(\d+)_(\d+)$", path.stem)
    return (int(match[1]), int(match[2])) if match else (-1, -1)


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Full checkpoints in a folder, oldest first by (epoch, step)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"*-*_*{FULL_SUFFIX}") if _position(p) != (-1, -1)]
    return sorted(found, key=_position)


def save_training_checkpoint(folder: Path, stem: str, state: dict, model) -> Path:
    """Write `stem.pt` (everything a resume needs) and `stem.safetensors` (weights only), each atomically."""
    full = folder / f"{stem}{FULL_SUFFIX}"
    with atomic_path(full) as tmp:
        torch.save(state, tmp)
    save_model(model, folder / f"{stem}{WEIGHTS_SUFFIX}", class_names=state.get("class_names"))
    return full


def prune_checkpoints(folder: Path, keep: int, protect: str = "") -> None:
    """Keep the `keep` newest checkpoints, and the one named `protect` (the best so far) whatever its age."""
    for old in list_checkpoints(folder)[:-keep]:
        if old.stem != protect:
            for path in (old, old.with_suffix(WEIGHTS_SUFFIX)):
                path.unlink(missing_ok=True)


def newest_weights(path: str) -> str:
    """A training run's folder stands for the weights of its newest checkpoint; anything else is itself."""
    if not Path(path).is_dir():
        return path
    found = list_checkpoints(path)
    if not found:
        raise VitkitError(f"'{path}' is a folder without vitkit checkpoints: pass a checkpoint file with --model")
    return str(found[-1].with_suffix(WEIGHTS_SUFFIX))


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


def resolve_resume(resume: str, folder: Path) -> Path | None:
    """`auto` means the newest full checkpoint in the output folder (none yet: start fresh); else a path."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(folder)
        return found[-1] if found else None
    return Path(resume)


def arch_dict(model) -> dict:
    return dataclasses.asdict(model.arch)
