"""Training progress as log lines where no progress bar can be seen (CI, a scheduler's log file)."""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import Callback

from lmtune.core.progress import Progress


class LogProgress(Callback):
    """Training progress as log lines (steps done, steps/s, time left) every ~10% of the steps when stderr is
    not a terminal (CI, a scheduler's log file), where the rich progress bar shows nothing until the end.
    On a terminal it does nothing: the bar is there."""

    def __init__(self, terminal: bool | None = None):
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.progress: Progress | None = None

    def on_train_start(self, trainer, pl_module):
        if self.terminal or not trainer.is_global_zero:
            return
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self.progress = Progress(int(total) - trainer.global_step, "training", unit="steps", terminal=False)
        self.done = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.progress is not None and trainer.global_step > self.done:  # optimizer steps, not micro-batches
            self.progress.advance(trainer.global_step - self.done)
            self.done = trainer.global_step
