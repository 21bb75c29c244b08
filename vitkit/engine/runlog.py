"""What a run prints and writes: the original's log lines, a log file per rank, and a JSONL file of metrics."""
from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import time
from pathlib import Path

from vitkit.fileio import atomic_path

# The original's formats (src/logging.py, src/callback.py), kept field for field.
_CONSOLE_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"
_CONSOLE_DATEFMT = "%Y-%m-%d %H:%M:%S"


def format_epoch_line(epoch: int, epoch_time: float, step_time: float, loss: float, lr: float, fps: float,
                      accuracy: float | None = None, eval_cost: float | None = None) -> str:
    line = (
        f"epoch[{epoch}], epoch time: {epoch_time:.2f}s, per step time: {step_time:.4f}s, "
        f"loss={loss:.6f}, lr={lr:.6f}, fps={fps:.2f}"
    )
    if accuracy is not None:
        line += f", accuracy={accuracy:.6f}, eval_cost={eval_cost:.2f}"
    return line


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_step_line(record: dict, eta_epoch: float, eta_run: float) -> str:
    """The line every logging.log_interval steps, from a steps.jsonl record and the two ETAs in seconds."""
    line = (
        f"epoch[{record['epoch']}], step[{record['step']}/{record['steps']}], loss={record['loss']:.6f}, "
        f"lr={record['lr']:.6f}, img/s={record['img_s']:.1f}, data_wait={record['data_wait']:.1%}, "
        f"eta_epoch={_clock(eta_epoch)}, eta_run={_clock(eta_run)}"
    )
    if record.get("grad_norm") is not None:
        line += f", grad_norm={record['grad_norm']:.4g}"
    if record.get("loss_scale") is not None:
        line += f", loss_scale={record['loss_scale']:g}"
    return line


class StepWindow:
    """The steps since the last step line: their wall time, the part spent waiting for the loader, their images."""

    def __init__(self, first_step: int):
        self.first_step = first_step
        self.started = time.perf_counter()
        self.wait = 0.0
        self.images = 0

    @contextlib.contextmanager
    def waiting(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.wait += time.perf_counter() - started

    def seconds(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)


def host_ip() -> str:
    """The original logs gethostbyname(gethostname()); a host without DNS for itself still gets a line."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class RunLog:
    """Rank 0 logs to the console; every rank writes `{time}_rank_{rank}.log` in the log folder."""

    def __init__(self, log_dir: str | Path, rank: int = 0, console: bool = True, jsonl: bool = True,
                 fresh: bool = True):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.logger = logging.getLogger(f"vitkit.run.rank{rank}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
            handler.close()
        stamp = time.strftime("%Y-%m-%d_time_%H_%M_%S")
        self.log_path = self.log_dir / f"{stamp}_rank_{rank}.log"
        file_handler = logging.FileHandler(self.log_path)
        file_handler.setFormatter(logging.Formatter(_CONSOLE_FORMAT))
        self.logger.addHandler(file_handler)
        if console:
            console_handler = logging.StreamHandler(sys.stdout)
            console_handler.setFormatter(logging.Formatter(_CONSOLE_FORMAT, datefmt=_CONSOLE_DATEFMT))
            self.logger.addHandler(console_handler)
        self.jsonl_path = self.log_dir / "metrics.jsonl" if jsonl and rank == 0 else None
        self.steps_path = self.log_dir / "steps.jsonl" if jsonl and rank == 0 else None
        for path in (self.jsonl_path, self.steps_path):
            if path is not None and fresh:
                path.unlink(missing_ok=True)  # a new run starts its own record; a resumed one appends

    def forget_after(self, epoch: int, global_step: int) -> None:
        """A resumed run's records stop where its checkpoint does: epochs from `epoch` on and steps after
        `global_step`, which the interrupted run wrote after that checkpoint, are dropped (they are run again)."""
        keep = {self.jsonl_path: lambda record: record.get("epoch", -1) < epoch,
                self.steps_path: lambda record: record.get("global_step", -1) <= global_step}
        for path, wanted in keep.items():
            if path is None or not path.exists():
                continue
            with open(path) as handle:
                lines = [line for line in handle if line.strip()]
            kept = []
            for line in lines:
                try:
                    if wanted(json.loads(line)):
                        kept.append(line)
                except ValueError:
                    pass  # a line cut short by the kill
            if len(kept) != len(lines):
                with atomic_path(path) as partial:
                    partial.write_text("".join(kept))

    def info(self, message: str) -> None:
        self.logger.info(message)

    def args(self, flat_config: dict) -> None:
        """The original's `Args:` block: one `--> key: value` line per setting, then an empty line."""
        lines = ["Args:"] + [f"--> {key}: {value}" for key, value in flat_config.items()] + [""]
        self.logger.info("\n".join(lines))

    def metrics(self, record: dict) -> None:
        """An epoch's record in metrics.jsonl."""
        self._append(self.jsonl_path, record)

    def step(self, record: dict) -> None:
        """A step line's record in steps.jsonl."""
        self._append(self.steps_path, record)

    @staticmethod
    def _append(path: Path | None, record: dict) -> None:
        if path is not None:
            with open(path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        for handler in list(self.logger.handlers):
            handler.flush()
            handler.close()
            self.logger.removeHandler(handler)
