"""Preemption: SIGTERM (how SLURM, Kubernetes and spot instances stop a job) and SIGUSR1 (SLURM's `--signal`) let
the current step finish, then the run writes an exact mid-epoch checkpoint and exits with 128 + the signal's number,
the status of a process that the signal ended, which schedulers and torchrun read as "stopped, restart me"."""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised after the checkpoint is written; the command exits with `exit_code`."""

    def __init__(self, signum: int, checkpoint: Path | None):
        self.signum, self.checkpoint = signum, checkpoint
        self.exit_code = 128 + signum
        done = (f"wrote {checkpoint.name}; resume with --resume auto" if checkpoint is not None else
                "wrote no checkpoint (checkpoint.save_checkpoint is off)")
        super().__init__(f"received {signal.Signals(signum).name}: {done}")


class StopRequests:
    """Notes SIGTERM / SIGUSR1 while installed (main thread only); `agreed()` is the signal every rank stops for."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread: a run inside a thread is not preemptible
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._note)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _note(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self, device: torch.device, world_size: int) -> int:
        """The signal to stop for (0: none). With several processes every rank must call it at the same steps: the
        ranks agree on the highest signal any of them received, so all stop at the same step."""
        if world_size <= 1:
            return self.signum
        flag = torch.tensor([self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def ignore_stop_signals(worker_id: int = 0) -> None:
    """For loader workers: the signal meant for the run reaches the whole process group, and a worker that dies of
    it would end the run before its checkpoint; the main process ends the workers itself."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
