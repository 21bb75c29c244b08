"""Atomic file writes: a killed process never leaves a half-written file where a good one was."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from vitkit.faults import fault_point


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None, durable: bool = True):
    """Yields a temporary path beside `path`; on success it is fsynced (unless not `durable`) and renamed over `path`,
    else removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp_name)
        if durable:
            with open(tmp_name, "rb") as written:
                os.fsync(written.fileno())
        # mkstemp makes the file private (0600); the target gets what any new file would (or the given mode).
        os.chmod(tmp_name, mode if mode is not None else 0o666 & ~_umask())
        fault_point("atomic_replace")
        os.replace(tmp_name, target)
        if durable:
            _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _umask() -> int:
    current = os.umask(0o022)  # the only way to read it is to set it
    os.umask(current)
    return current


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
