"""Training progress as log lines where no progress bar can be seen (CI, a scheduler's log file)."""

from __future__ import annotations

import math
import sys

from lightning.pytorch.callbacks import Callback, RichProgressBar

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


def planned_epochs(trainer) -> int | None:
    """The epochs the run will do: `max_epochs`, or fewer when `max_steps` ends it first; None if unbounded."""
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    batches = trainer.num_training_batches
    if trainer.max_steps > 0 and isinstance(batches, int) and batches > 0:
        by_steps = math.ceil(trainer.max_steps / max(1, math.ceil(batches / trainer.accumulate_grad_batches)))
        epochs = min(epochs, by_steps) if epochs else by_steps
    return epochs


class ProgressBar(RichProgressBar):
    """Lightning's rich bar, counting epochs from 1 to the number the run will really do (Lightning's own shows
    `Epoch 0/-2` for a run bounded by `max_steps`), without the logger's version. Off when stderr is not a
    terminal: it would print only its last state there, and `LogProgress` writes lines instead."""

    def __init__(self, terminal: bool | None = None, **kwargs):
        super().__init__(**kwargs)
        if not (sys.stderr.isatty() if terminal is None else terminal):
            self.disable()

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def _get_train_description(self, current_epoch: int) -> str:
        total = planned_epochs(self.trainer)
        text = f"Epoch {current_epoch + 1}" + (f"/{total}" if total else "")
        return f"{text:{len(self.validation_description)}}"
