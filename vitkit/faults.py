"""Named fault points for the fault-injection tests: VITKIT_FAULT=NAME[:N] kills this process at the N-th (1-based,
default 1) time the code passes the point named NAME, with SIGKILL, or with the signal VITKIT_FAULT_SIGNAL names
(e.g. TERM); under torchrun only in the process whose RANK is VITKIT_FAULT_RANK, if that is set. Unset, a point
costs one dictionary lookup."""
from __future__ import annotations

import os
import signal

_passes: dict[str, int] = {}


def fault_point(name: str) -> None:
    wanted = os.environ.get("VITKIT_FAULT")
    if not wanted:
        return
    if os.environ.get("VITKIT_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(count or 1):
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("VITKIT_FAULT_SIGNAL", "KILL")))
