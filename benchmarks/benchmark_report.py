"""What every benchmark records beside its numbers: the command, the machine, the library versions."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable

from vitkit.fileio import atomic_path

_PACKAGES = ("torch", "torchvision", "timm", "pillow", "numpy", "onnx", "onnxruntime", "onnxscript")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    info = {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {},
    }
    for package in _PACKAGES:
        try:
            info["versions"][package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def alternating_rounds(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each run's measurement over `rounds` rounds, the order reversed every round so that a machine's drift hits
    every run alike."""
    measured: dict[str, list[float]] = {label: [] for label in runs}
    for index in range(rounds):
        for label in list(runs) if index % 2 == 0 else list(reversed(runs)):
            measured[label].append(runs[label]())
    return measured


def median_round_ratio(values: list[float], peer: list[float]) -> float:
    """The median of the per-round ratios: runs measured back to back share the load, so these drift less than the
    ratio of the medians."""
    return statistics.median(value / base for value, base in zip(values, peer))


def batch_per_model(parser, models: list[str], batches: list[int]) -> dict[str, int]:
    """`--batch` as one size for every model or one per model, as a {model: batch} map."""
    if len(batches) not in (1, len(models)):
        parser.error(f"--batch takes one size or one per model ({len(models)})")
    return dict(zip(models, batches * len(models) if len(batches) == 1 else batches))


def write_report(path: str | Path, report: dict, quiet: bool = False) -> Path:
    """The JSON beside the printed table, with the command line that produced it first."""
    path = Path(path)
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), **report}
    # Atomic: a run killed by a time limit while writing leaves the previous complete file, never half of one.
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(report, indent=2) + "\n")
    if not quiet:
        print(f"wrote {path}")
    return path
