"""Progress bars for long commands: a tqdm bar on a terminal, nothing elsewhere (log files get lines, not bars)."""
from __future__ import annotations

import sys


class _NoBar:
    def update(self, count: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, description: str, setting: str = "auto", enabled: bool = True):
    """A bar of `total` steps: always with setting 'bar', never with 'plain' or when not `enabled` (other ranks),
    and with 'auto' only when standard error is a terminal. Bars go to standard error, so they never replace a line
    that standard output or a log file needs."""
    if not enabled or setting == "plain" or (setting == "auto" and not sys.stderr.isatty()):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)
