"""Callbacks of our own: training throughput and peak memory, a checkpoint that keeps last.ckpt current, and
training progress in a log file."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from lmtune.utils.checkpoints import AtomicCheckpointIO
from lmtune.utils.hardware import peak_flops
from lmtune.utils.progress import Progress

log = logging.getLogger(__name__)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory on GPU, else peak resident memory of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class TrainingStats(ThroughputMonitor):
    """Training throughput: Lightning's ThroughputMonitor (FLOP/s and MFU from the module's `flops_per_batch`)
    plus what it lacks: real (non-padding) and supervised tokens/s, the padding fraction and peak memory.

    The MFU's peak is Lightning's datasheet figure on a GPU it knows, else `hardware.peak_flops`: the datasheet
    for other known GPUs and, on CPU, a large matrix product measured once per machine in the run's compute
    dtype. Logged as `throughput/*` every `log_every_n_steps` optimizer steps over the steps since the last log
    (so a slow phase shows up), and for the whole run at the end of training (also in metrics.json). Counts
    are this process's; under DDP/FSDP multiply tokens/s by the number of processes.
    """

    def __init__(self, cache_dir: str | None = None):
        super().__init__(batch_size_fn=lambda batch: batch["input_ids"].size(0))
        self.cache_dir = cache_dir
        self.total = self._counters()
        self.window = self._counters()
        self._batch_started = 0.0

    @staticmethod
    def _counters() -> dict:
        return {"tokens": 0, "supervised_tokens": 0, "padded_tokens": 0, "seconds": 0.0}

    def setup(self, trainer, pl_module, stage):
        # Lightning's rolling window reports nothing until it is full: make it one logging interval
        self.kwargs["window_size"] = max(2, trainer.log_every_n_steps + 1)
        super().setup(trainer, pl_module, stage)
        if self.available_flops is None:
            self.available_flops = peak_flops(trainer.strategy.root_device, trainer.precision, self.cache_dir)
            for throughput in self._throughputs.values():
                throughput.available_flops = self.available_flops

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        counts = {
            "seconds": time.perf_counter() - self._batch_started,
            "tokens": int(batch["attention_mask"].sum()),
            "padded_tokens": batch["attention_mask"].numel(),
            "supervised_tokens": int((batch["labels"] != -100).sum()),
        }
        for counters in (self.total, self.window):
            for key, value in counts.items():
                counters[key] += value
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _compute(self, trainer, iter_num=None) -> None:
        """Log Lightning's FLOP/s and MFU next to ours as `throughput/*`, for training steps only: evaluation
        batches would log at their own batch index, which moves the logger's step backwards."""
        if trainer.state.stage != RunningStage.TRAINING or not trainer._logger_connector.should_update_logs:
            return
        lightning = self._throughputs[RunningStage.TRAINING].compute()
        metrics = self._rates(self.window, trainer)
        for ours, theirs in (("flops_per_s", "device/flops_per_sec"), ("mfu", "device/mfu")):
            if theirs in lightning:
                metrics[ours] = lightning[theirs]
        trainer._logger_connector.log_metrics({f"throughput/{k}": v for k, v in metrics.items()})
        self.window = self._counters()

    def _rates(self, counts: dict, trainer) -> dict:
        seconds = max(counts["seconds"], 1e-9)
        return {
            "tokens_per_s": round(counts["tokens"] / seconds, 1),
            "supervised_tokens_per_s": round(counts["supervised_tokens"] / seconds, 1),
            "padding_fraction": round(1 - counts["tokens"] / counts["padded_tokens"], 4)
            if counts["padded_tokens"]
            else 0.0,
            "peak_memory_mb": round(peak_memory_mb(trainer.strategy.root_device), 1),
        }

    def summary(self, trainer) -> dict:
        """The whole run: time in training steps (data loading excluded), tokens, rates, FLOP/s and MFU."""
        flops_per_token = getattr(trainer.lightning_module, "flops_per_token", 0)
        flops_per_s = flops_per_token * self.total["tokens"] / max(self.total["seconds"], 1e-9)
        return {
            "train_seconds": round(self.total["seconds"], 2),
            "steps": trainer.global_step,
            "tokens": self.total["tokens"],
            "supervised_tokens": self.total["supervised_tokens"],
            **self._rates(self.total, trainer),
            "flops_per_token": flops_per_token,
            "flops_per_s": round(flops_per_s),
            "peak_flops": self.available_flops,
            "mfu": round(flops_per_s / self.available_flops, 4) if self.available_flops else None,
        }

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step and trainer.logger is not None:
            numbers = {k: v for k, v in self.summary(trainer).items() if isinstance(v, (int, float))}
            trainer.logger.log_metrics({f"throughput/{k}": v for k, v in numbers.items()}, step=trainer.global_step)


class LatestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` always holds the newest state, for resuming (`ckpt_path=last`).

    - Lightning 2.6 refreshes `last.ckpt` only at steps where a top-k checkpoint was written, so once
      `val/acc` stops improving, "last" would silently mean "best". This also writes it after every
      validation and when training ends, and every `every_n_train_steps` steps: unlike Lightning's option
      of that name, this writes only last.ckpt, and the top-k are still ranked at each validation.
    - On SIGTERM (a scheduler's preemption, `kill`), Lightning stops after the current step; this writes
      `last.ckpt` at the end of that step first, the same step boundary as the periodic saves, so the run
      resumes from there exactly. Skipped mid gradient accumulation and with several processes (ranks may
      see the signal at different steps): those resume from the previous checkpoint.
    - Writes are atomic (`AtomicCheckpointIO`, installed on the trainer at setup): a kill during a save
      leaves the previous checkpoint, never a truncated one.
    - Resumed into a new run folder (each Hydra run gets one), it keeps ranking against the interrupted
      run's best checkpoints, so the best checkpoint (and the final metrics) are those of an uninterrupted
      run. Those files stay where they are: ModelCheckpoint deletes only inside its own folder.
    """

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def __init__(self, every_n_train_steps: int | None = None, **kwargs):
        # Lightning's every_n_train_steps would replace ranking at validation end by ranking the top-k with
        # the previous validation's metric at every N-th step; here it only writes last.ckpt (for resume).
        super().__init__(**kwargs)
        self.last_every_n_train_steps = every_n_train_steps or 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # train_time_interval, if set
        if self.save_last is not True or trainer.fit_loop.epoch_loop._should_accumulate():
            return  # mid gradient accumulation, the gradients so far would not be in the checkpoint
        if self._should_skip_saving_checkpoint(trainer):
            return
        every = self.last_every_n_train_steps
        periodic = every >= 1 and trainer.global_step % every == 0
        sigterm = trainer.received_sigterm and trainer.world_size == 1
        if periodic or sigterm:
            ranked_step = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = ranked_step  # so this step's validation still ranks it for top-k
        if sigterm:
            log.warning("SIGTERM: saved %s at step %d; stopping", self.last_model_path, trainer.global_step)

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

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            return super().load_state_dict(state_dict)
        # a new run folder: rank against the interrupted run's checkpoints that still exist (not its last.ckpt)
        kept = {path: score for path, score in state_dict.get("best_k_models", {}).items() if os.path.isfile(path)}
        self.best_k_models = kept
        if kept:
            best, worst = (max, min) if self.mode == "max" else (min, max)
            self.best_model_path = best(kept, key=kept.get)
            self.best_model_score = kept[self.best_model_path]
            self.kth_best_model_path = worst(kept, key=kept.get)
            self.kth_value = kept[self.kth_best_model_path]
        elif os.path.isfile(state_dict.get("best_model_path") or ""):
            self.best_model_path = state_dict["best_model_path"]


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
