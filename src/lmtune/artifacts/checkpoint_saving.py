"""Where checkpoints are written: `LatestCheckpoint` decides when (last.ckpt always current, SIGTERM, top-k),
`AtomicCheckpointIO` how (a temp file renamed over the target, so a kill never leaves a truncated one)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from lmtune.core.errors import UserError
from lmtune.core.files import WRITE_ERRNOS, atomic_write

log = logging.getLogger(__name__)


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a local checkpoint to a temp file beside it, fsyncs it, then renames it over the target.

    Lightning's own save (`_atomic_save`) writes through an fsspec transaction whose temp file lives in the
    system temp folder; when that is another file system (tmpfs /tmp, cluster scratch), the final move is a
    copy into the target, and a kill during it leaves a truncated checkpoint. A rename within one folder is
    atomic: readers see the old checkpoint or the new one. Remote URLs keep Lightning's way.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            atomic_write(Path(path), lambda f: torch.save(checkpoint, f), mode="wb")
        except (OSError, RuntimeError) as e:
            if not _write_failed(e):
                raise
            reason = e.strerror if isinstance(e, OSError) else "the file system refused the write: full?"
            raise UserError(
                f"cannot write the checkpoint {path} ({reason}); the checkpoints saved before it are intact. Free "
                f"space in {Path(path).parent} (or write elsewhere: hydra.run.dir=<folder>) and resume from them."
            ) from None


def _write_failed(error: Exception) -> bool:
    """A full disk, a quota, a read-only folder; torch's zip writer reports these as a RuntimeError."""
    if isinstance(error, OSError):
        return error.errno in WRITE_ERRNOS
    return "write failed" in str(error)
