"""Callbacks of our own: training throughput and peak memory, and a checkpoint that keeps last.ckpt current."""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory on GPU, else peak resident memory of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class TrainingStats(L.Callback):
    """Counts real (non-padding) and supervised tokens and wall time of the training steps."""

    def __init__(self):
        self.tokens = self.supervised_tokens = self.padded_tokens = 0
        self.seconds = 0.0
        self._start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds += time.perf_counter() - self._start
        self.tokens += int(batch["attention_mask"].sum())
        self.padded_tokens += batch["attention_mask"].numel()
        self.supervised_tokens += int((batch["labels"] != -100).sum())

    def summary(self, trainer) -> dict:
        seconds = max(self.seconds, 1e-9)
        return {
            "train_seconds": round(self.seconds, 2),
            "steps": trainer.global_step,
            "tokens": self.tokens,
            "supervised_tokens": self.supervised_tokens,
            "tokens_per_s": round(self.tokens / seconds, 1),
            "supervised_tokens_per_s": round(self.supervised_tokens / seconds, 1),
            "padding_fraction": round(1 - self.tokens / self.padded_tokens, 4) if self.padded_tokens else 0.0,
            "peak_memory_mb": round(peak_memory_mb(trainer.strategy.root_device), 1),
        }

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step and trainer.logger is not None:
            trainer.logger.log_metrics(
                {f"throughput/{k}": v for k, v in self.summary(trainer).items()}, step=trainer.global_step
            )


class LatestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` always holds the newest state, for resuming.

    Lightning 2.6 refreshes `last.ckpt` only at steps where a top-k checkpoint was written, so once
    `val/acc` stops improving, "last" would silently mean "best". This also writes it after every
    validation and when training ends.
    """

    def on_validation_end(self, trainer, pl_module):
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer)

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)

    def _refresh_last(self, trainer) -> None:
        if self.save_last and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            if self._last_global_step_saved != trainer.global_step:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
