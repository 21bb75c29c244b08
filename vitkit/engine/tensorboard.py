"""TensorBoard event files for a run: the step and epoch scalars, and the resolved config as text.

Written by rank 0 into `<log folder>/tensorboard/`, when the tensorboard package is installed (it is optional: the
run says so once and goes on without it). A resumed run passes the step it resumes from: TensorBoard drops the
events the interrupted run wrote after it, so the curves continue without duplicated steps.
"""
from __future__ import annotations

from pathlib import Path


class TensorBoardLog:
    def __init__(self, folder: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        # purge_step: every event at this step or later, from an earlier writer in the folder, is hidden.
        self.writer = SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1)

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str) -> None:
        # Markdown: four spaces keep the YAML as a preformatted block.
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), 0)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(enabled: bool, folder: Path, resume_step: int | None = None) -> tuple[TensorBoardLog | None, str]:
    """(the log, or None, and a line saying which) for the run's log folder."""
    if not enabled:
        return None, ""
    try:
        import tensorboard  # noqa: F401 - torch's SummaryWriter needs it
    except ImportError:
        return None, "TensorBoard logs off: pip install tensorboard (or 'vitkit[viz]') to get them"
    board = TensorBoardLog(folder / "tensorboard", resume_step)
    return board, f"TensorBoard logs in {board.folder} (tensorboard --logdir {board.folder})"
