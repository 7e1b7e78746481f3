"""The run folder shows training whatever the logger: `metrics.jsonl`, lines in `train.log` and `curves.png`.

Every `trainer.log_every_n_steps` optimizer steps: the mean training loss of those steps, the learning rate and
tokens/s (real tokens in training steps, this process's: `TrainingStats`' counts, the same as W&B's
`throughput/tokens_per_s`); every validation: its metrics. Each goes to `metrics.jsonl` (one JSON object per line)
and to the log: the step lines to `train.log` only (the console has the progress bar), the validations to both.
`curves.png` (training and validation loss, validation accuracy against steps) is drawn at the end of every run,
finished or stopped. The history travels in checkpoints, so a resumed run's file and plot start at step 0.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from lmtune.core.files import atomic_write
from lmtune.training.throughput import TrainingStats

log = logging.getLogger(__name__)
steps_log = logging.getLogger("lmtune.steps")  # train.log only (conf/hydra/default.yaml)

METRICS_FILE, CURVES_FILE = "metrics.jsonl", "curves.png"


class RunLog(Callback):
    def __init__(self, output_dir: str | Path, stats: TrainingStats):
        self.output_dir = Path(output_dir)
        self.stats = stats  # counts the tokens and the seconds in training steps
        self.points: list[dict] = []  # every record written, in order (the checkpointed state)
        self._losses: list[float] = []  # of the micro-batches since the last record
        self._recorded_step: int | None = None
        self._counted = (0, 0.0)  # the stats' tokens and seconds at the last record

    # --- state in checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # with the losses of the steps since the last record: a run resumed mid-window logs the same mean loss
        # (its tokens/s counts from the resume)
        return {"points": self.points, "losses": self._losses}

    def load_state_dict(self, state_dict: dict) -> None:
        # from a checkpoint (untrusted): only records with a step and numbers; anything else is left out
        self.points = [
            p
            for p in state_dict.get("points", [])
            if isinstance(p, dict)
            and isinstance(p.get("step"), int)
            and all(isinstance(v, int | float | None) for v in p.values())
        ]
        self._losses = [float(x) for x in state_dict.get("losses", []) if isinstance(x, int | float)]

    # --- hooks -----------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module):
        if trainer.is_global_zero:  # a resumed run's history (restored before this hook) starts the file again
            atomic_write(self.output_dir / METRICS_FILE, lambda f: f.writelines(_line(p) for p in self.points))
        self._counted = (self.stats.total["tokens"], self.stats.total["seconds"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self._losses.append(float(loss))
        step = trainer.global_step
        if step == self._recorded_step or step % max(1, trainer.log_every_n_steps) or not self._losses:
            return  # inside an accumulation window, or not a logging step
        tokens, seconds = self.stats.total["tokens"], self.stats.total["seconds"]  # this batch counted already
        point = {
            "step": step,
            "epoch": trainer.current_epoch,
            "train/loss": sum(self._losses) / len(self._losses),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "tokens_per_s": (tokens - self._counted[0]) / max(seconds - self._counted[1], 1e-9),
        }
        self._losses, self._recorded_step, self._counted = [], step, (tokens, seconds)
        if trainer.is_global_zero:
            total = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
            steps_log.info(
                "step %d/%d (epoch %d): loss %.4f, lr %.3g, %.0f tokens/s",
                step,
                total,
                point["epoch"] + 1,
                point["train/loss"],
                point["lr"],
                point["tokens_per_s"],
            )
            self._record(point)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return  # the sanity check, or the validation pass after training (the best checkpoint's)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if not metrics or not trainer.is_global_zero:
            return
        log.info(
            "validation at step %d: %s",
            trainer.global_step,
            ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in sorted(metrics.items())),
        )
        self._record({"step": trainer.global_step, "epoch": trainer.current_epoch, **metrics})

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.draw()

    def on_exception(self, trainer, pl_module, exception):
        if trainer.is_global_zero and self.points:
            self.draw()  # what a stopped run got to is worth a look too

    # --- files -----------------------------------------------------------------------------------------------
    def _record(self, point: dict) -> None:
        self.points.append(point)
        with (self.output_dir / METRICS_FILE).open("a") as f:
            f.write(_line(point))

    def draw(self) -> Path:
        return draw_curves(self.points, self.output_dir / CURVES_FILE)


def _line(point: dict) -> str:
    return (
        json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in point.items()}) + "\n"
    )


def draw_curves(points: list[dict], path: Path) -> Path:
    """Training and validation loss (left) and validation accuracy and macro-F1 (right) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        xy = [(p["step"], p[key]) for p in points if p.get(key) is not None]
        return [x for x, _ in xy], [y for _, y in xy]

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for key, style, name in (("train/loss", "-", "training"), ("val/loss", "o-", "validation")):
        loss_ax.plot(*series(key), style, label=name, markersize=4)
    loss_ax.set(xlabel="step", ylabel="loss per answer token", title="loss")
    loss_ax.legend()
    for key, name in (("val/acc", "accuracy"), ("val/macro_f1", "macro-F1")):
        acc_ax.plot(*series(key), "o-", label=name, markersize=4)
    acc_ax.set(xlabel="step", ylabel="validation", title="validation", ylim=(0, 1.02))
    acc_ax.legend()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)
    return path
