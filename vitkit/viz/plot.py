"""Training curves of one or more runs in one PNG, read from the run folders' metrics.jsonl and steps.jsonl."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vitkit.errors import VitkitError
from vitkit.fileio import atomic_path

MAX_FILE_BYTES = 512 * 2**20  # a run's JSONL is kilobytes to megabytes; refuse to read anything this big
FIGURE_INCHES = (12, 8)
FIGURE_DPI = 100


def load_matplotlib(caller: str):
    """matplotlib, imported on first use with the Agg backend (no display needed); a VitkitError where it is missing.

    The backend is only switched when pyplot is not loaded yet, so a notebook's backend is left alone; the figures
    here are drawn with `matplotlib.figure.Figure`, which needs no pyplot backend at all.
    """
    try:
        import matplotlib
    except ImportError:
        raise VitkitError(f"{caller} needs matplotlib: pip install 'vitkit[viz]'") from None
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    return matplotlib


@dataclass
class Run:
    """One run folder's records: `epochs` keyed by 0-based epoch, `steps` sorted by global step (later wins)."""

    name: str
    folder: Path
    epochs: dict[int, dict] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file, one a line; blank lines are skipped.

    A last line without its newline that does not parse is the record a killed (or still running) run was
    writing, and is dropped; any other line that is not a JSON object is a VitkitError naming the file and line.
    """
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise VitkitError(f"{path} is {size / 2**20:.0f} MiB, over the {MAX_FILE_BYTES / 2**20:.0f} MiB a plot "
                          f"reads: it is not a run's log; point at a training run's output folder")
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = handle.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):  # unterminated last line: cut short while being written
                break
            raise VitkitError(f"{path} line {number} is not JSON: fix or delete that line") from None
        if not isinstance(record, dict):
            raise VitkitError(f"{path} line {number} is not a JSON object: fix or delete that line")
        records.append(record)
    return records


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _num(value) -> float:
    """A record's number, or NaN (a gap in the line) where it is missing, null or not a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def read_run(folder: str | Path, name: str | None = None) -> Run:
    folder = Path(folder)
    if not folder.exists():
        raise VitkitError(f"{folder} does not exist: point at a training run's output folder (checkpoint.output_dir)")
    if not folder.is_dir():
        raise VitkitError(f"{folder} is not a folder: point at a training run's output folder "
                          f"(checkpoint.output_dir), not a file in it")
    metrics, steps = folder / "metrics.jsonl", folder / "steps.jsonl"
    if not metrics.is_file() and not steps.is_file():
        raise VitkitError(f"no metrics.jsonl or steps.jsonl in {folder}: point at a training run's output folder "
                          f"(checkpoint.output_dir)")
    run = Run(name=name if name is not None else (folder.resolve().name or str(folder)), folder=folder)
    if metrics.is_file():
        for record in read_jsonl(metrics):
            epoch = _int(record.get("epoch"))
            if epoch is not None:
                run.epochs[epoch] = record  # a resumed run that appended an epoch again: the later record wins
    if steps.is_file():
        by_step = {}
        for record in read_jsonl(steps):
            global_step = _int(record.get("global_step"))
            if global_step is not None:
                by_step[global_step] = record
        run.steps = [by_step[key] for key in sorted(by_step)]
    return run


def _steps_per_epoch(run: Run) -> int | None:
    for record in reversed(run.steps):
        steps = _int(record.get("steps"))
        if steps:
            return steps
    return None


def train_series(run: Run, by_step: bool) -> dict[str, tuple[list[float], list[float]]]:
    """The loss and lr panels' lines of one run: {"loss_steps", "lr_steps", "loss_epochs", "lr_epochs"} -> (x, y).

    With `by_step`, x is the global step; a per-epoch record sits at (epoch + 1) * steps_per_epoch, the step that
    ended it, with steps_per_epoch read from steps.jsonl. Otherwise x is in epochs completed: a step record at
    epoch + step / steps, a per-epoch record at epoch + 1.
    """
    per_epoch = _steps_per_epoch(run) if by_step else None
    series = {}
    if by_step:
        xs = [_num(record.get("global_step")) for record in run.steps]
    else:
        xs = [_num(record.get("epoch")) + _num(record.get("step")) / _num(record.get("steps")) for record in run.steps]
    series["loss_steps"] = (xs, [_num(record.get("loss")) for record in run.steps])
    series["lr_steps"] = (xs, [_num(record.get("lr")) for record in run.steps])
    epochs = sorted(run.epochs)
    if by_step:
        ex = [float((epoch + 1) * per_epoch) if per_epoch else math.nan for epoch in epochs]
    else:
        ex = [float(epoch + 1) for epoch in epochs]
    series["loss_epochs"] = (ex, [_num(run.epochs[epoch].get("loss")) for epoch in epochs])
    series["lr_epochs"] = (ex, [_num(run.epochs[epoch].get("lr")) for epoch in epochs])
    return series


def plot_runs(run_dirs: list[str | Path], out: str | Path, names: list[str] | None = None) -> Path:
    """Draws the training curves of `run_dirs`, overlaid one colour per run, into one PNG at `out`; returns its path.

    Four panels, 12 x 8 inches at 100 dpi (1200 x 800 pixels):
      - loss and learning rate: the step records of steps.jsonl as a line, the per-epoch records of metrics.jsonl
        as dots (the epoch's mean loss, its last lr);
      - top-1 and top-5 accuracy in % (solid and dashed) on the evaluated epochs;
      - images per second of each epoch (metrics.jsonl's fps).
    The x axis of the loss and lr panels is the global step when every run has step records; if any run lacks
    steps.jsonl (older runs), the number of steps in an epoch is unknown for it, so both panels switch to epochs
    for all runs: a step record sits at epoch + step / steps, an epoch's record at epoch + 1. The accuracy and
    img/s panels count epochs from 1 (metrics.jsonl's 0-based epoch + 1), so epoch 3 on every panel is the end of
    the third epoch. A resumed run's repeated records count once (the later one). The run's name in the legend is
    `names[i]`, or by default the folder's name.
    """
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise VitkitError("no run folders to plot: pass at least one training run's output folder")
    if names is not None and len(names) != len(run_dirs):
        raise VitkitError(f"{len(names)} names for {len(run_dirs)} run folders: pass one name per run folder")
    runs = [read_run(folder, None if names is None else names[i]) for i, folder in enumerate(run_dirs)]
    out = Path(out)
    if out.is_dir():
        out = out / "training_curves.png"
    load_matplotlib("plot_runs")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    by_step = all(run.steps and _steps_per_epoch(run) for run in runs)
    x_label = "global step" if by_step else "epoch"
    fig = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI, layout="constrained")
    (ax_loss, ax_lr), (ax_acc, ax_fps) = fig.subplots(2, 2)
    any_accuracy = any_fps = False
    for index, run in enumerate(runs):
        colour = f"C{index % 10}"
        series = train_series(run, by_step)
        for ax, key in ((ax_loss, "loss"), (ax_lr, "lr")):
            if run.steps:
                ax.plot(*series[f"{key}_steps"], color=colour, linewidth=1.2, label=run.name)
                ax.plot(*series[f"{key}_epochs"], "o", color=colour, markersize=4)
            else:
                ax.plot(*series[f"{key}_epochs"], "o-", color=colour, markersize=4, label=run.name)
        evaluated = [epoch for epoch in sorted(run.epochs) if not math.isnan(_num(run.epochs[epoch].get("accuracy")))]
        if evaluated:
            any_accuracy = True
            xs = [epoch + 1 for epoch in evaluated]
            ax_acc.plot(xs, [100 * _num(run.epochs[e].get("accuracy")) for e in evaluated], "o-", color=colour,
                        markersize=4, label=f"{run.name} top-1")
            ax_acc.plot(xs, [100 * _num(run.epochs[e].get("top5")) for e in evaluated], "s--", color=colour,
                        markersize=3, label=f"{run.name} top-5")
        if run.epochs:
            epochs = sorted(run.epochs)
            fps = [_num(run.epochs[epoch].get("fps")) for epoch in epochs]
            any_fps = any_fps or any(not math.isnan(value) for value in fps)
            ax_fps.plot([epoch + 1 for epoch in epochs], fps, "o-", color=colour, markersize=4, label=run.name)
    ax_loss.set(title="training loss", xlabel=x_label, ylabel="loss")
    ax_lr.set(title="learning rate", xlabel=x_label, ylabel="lr")
    ax_acc.set(title="validation accuracy (solid top-1, dashed top-5)", xlabel="epoch", ylabel="accuracy (%)")
    ax_fps.set(title="throughput", xlabel="epoch", ylabel="images / s")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax, has_data, empty in ((ax_acc, any_accuracy, "no evaluated epochs"), (ax_fps, any_fps, "no epoch records")):
        if not has_data:
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="0.5")
    for ax in (ax_loss, ax_lr, ax_acc, ax_fps):
        ax.grid(True, alpha=0.3)
    for ax in (ax_acc, ax_fps) if by_step else (ax_loss, ax_lr, ax_acc, ax_fps):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.legend(fontsize=8, loc="best")
    if any_accuracy:
        ax_acc.legend(fontsize=8, loc="best")
    with atomic_path(out) as partial:
        fig.savefig(partial, format="png", dpi=FIGURE_DPI)
    return out
