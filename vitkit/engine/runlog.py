"""What a run prints and writes: the original's log lines, a log file per rank, and a JSONL file of metrics."""
from __future__ import annotations

import json
import logging
import socket
import sys
import time
from pathlib import Path

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
        if self.jsonl_path is not None and fresh:
            self.jsonl_path.unlink(missing_ok=True)  # a new run starts its own record; a resumed one appends

    def info(self, message: str) -> None:
        self.logger.info(message)

    def args(self, flat_config: dict) -> None:
        """The original's `Args:` block: one `--> key: value` line per setting, then an empty line."""
        lines = ["Args:"] + [f"--> {key}: {value}" for key, value in flat_config.items()] + [""]
        self.logger.info("\n".join(lines))

    def metrics(self, record: dict) -> None:
        if self.jsonl_path is not None:
            with open(self.jsonl_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        for handler in list(self.logger.handlers):
            handler.flush()
            handler.close()
            self.logger.removeHandler(handler)
