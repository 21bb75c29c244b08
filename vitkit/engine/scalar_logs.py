"""Where a run's scalars go besides its log lines: TensorBoard event files and, if asked, Weights & Biases.

Rank 0 alone writes them. TensorBoard is on by default when its package is installed (the run says so once and
goes on without it otherwise); W&B is opt-in (`logging.wandb`), and `WANDB_MODE=offline` keeps it on the machine.
A resumed run passes the step its checkpoint holds: TensorBoard hides what the interrupted run wrote after that step;
W&B continues the same run (its id is kept in the log folder), where what was sent cannot be taken back.
"""
from __future__ import annotations

import secrets
from pathlib import Path

from vitkit.errors import VitkitError


class TensorBoardLog:
    def __init__(self, folder: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        # purge_step: every event at this step or later, from an earlier writer in the folder, is hidden.
        self.writer = SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str) -> None:
        # Markdown: four spaces keep the YAML as a preformatted block.
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), 0)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    ID_FILE = "wandb_run_id"

    def __init__(self, folder: Path, project: str, config: dict, resumed: bool):
        try:
            import wandb
        except ImportError:
            raise VitkitError("logging.wandb needs the wandb package: pip install 'vitkit[wandb]'") from None
        id_file = folder / self.ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(project=project, dir=str(folder), id=run_id, resume="allow", config=config,
                              name=folder.name)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def text(self, tag: str, text: str) -> None:
        pass  # the config travels as the run's config

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class ScalarLogs:
    """Every open log, fed the same scalars; values that are None (no eval this epoch, no scaler) are left out."""

    def __init__(self, logs: list):
        self.logs = logs

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        present = {tag: float(value) for tag, value in values.items() if value is not None}
        for log in self.logs:
            log.scalars(present, step)

    def text(self, tag: str, text: str) -> None:
        for log in self.logs:
            log.text(tag, text)

    def flush(self) -> None:
        for log in self.logs:
            log.flush()

    def close(self) -> None:
        for log in self.logs:
            log.close()


def open_scalar_logs(logging_cfg, folder: Path, config: dict, resume_step: int | None) -> tuple[ScalarLogs, list[str]]:
    """The run's scalar logs as logging.tensorboard and logging.wandb ask, and a line for each saying where."""
    logs, lines = [], []
    if logging_cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401 - torch's SummaryWriter needs it
        except ImportError:
            lines.append("TensorBoard logs off: pip install tensorboard (or 'vitkit[viz]') to get them")
        else:
            board = TensorBoardLog(folder / "tensorboard", resume_step)
            logs.append(board)
            lines.append(f"TensorBoard logs in {board.folder} (tensorboard --logdir {board.folder})")
    if logging_cfg.wandb:
        run = WandbLog(folder, logging_cfg.wandb_project, config, resumed=resume_step is not None)
        logs.append(run)
        lines.append(f"Weights & Biases run {run.run.id} in project {logging_cfg.wandb_project} ({run.run.dir})")
    return ScalarLogs(logs), lines
