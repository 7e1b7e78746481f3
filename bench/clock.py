"""One stopwatch for both trainers, so ours and the baseline are measured by the same code.

Each optimizer step is marked when it ends, with the real (non-padding) and padded tokens of its batch.
The first `warmup_steps` are excluded (allocator growth, kernel selection). Memory is the peak of the
training phase only: the peak RSS counter is reset when training starts (Linux `clear_refs`), so model
loading, which both sides do alike, does not hide what the training loop costs. The whole-process peak
is reported beside it.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import lightning as L
import torch

from lmtune.model.module import parameter_counts, training_flops_per_token


def reset_peak_rss() -> bool:
    """Restart this process's peak-RSS counter (VmHWM) at the current RSS; False where the OS cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def process_peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class StepClock:
    def __init__(self, warmup_steps: int = 2):
        if warmup_steps < 1:
            raise ValueError("warmup_steps must be >= 1: the first timed step starts where the last warm-up step ends")
        self.warmup_steps = warmup_steps
        self.marks: list[tuple[float, int, int]] = []  # (time at step end, real tokens, padded tokens)
        self.phase_peak_reset = False
        self.device = torch.device("cpu")

    def start(self, device: torch.device) -> None:
        self.device = device
        self.phase_peak_reset = reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.marks.clear()

    def step(self, real_tokens: int, padded_tokens: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append((time.perf_counter(), real_tokens, padded_tokens))

    def result(self) -> dict:
        if len(self.marks) <= self.warmup_steps:
            raise RuntimeError(f"only {len(self.marks)} steps ran; need more than warmup_steps={self.warmup_steps}")
        timed = self.marks[self.warmup_steps :]
        seconds = timed[-1][0] - self.marks[self.warmup_steps - 1][0]
        tokens = sum(m[1] for m in timed)
        padded = sum(m[2] for m in timed)
        out = {
            "timed_steps": len(timed),
            "seconds": round(seconds, 3),
            "tokens": tokens,
            "padded_tokens": padded,
            "tokens_per_s": tokens / seconds,
            "steps_per_s": len(timed) / seconds,
            "padding_fraction": 1 - tokens / padded,
            "train_peak_rss_mb": _status_mb("VmHWM") if self.phase_peak_reset else None,
            "process_peak_rss_mb": process_peak_rss_mb(),
        }
        if self.device.type == "cuda":
            out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            out["gpu"] = torch.cuda.get_device_name(self.device)
        return out


def write_result(path: str | Path, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))


class LightningClock(L.Callback):
    """Our side: added to `src/train.py` as `+callbacks.bench_clock._target_=clock.LightningClock`."""

    def __init__(self, out: str, warmup_steps: int = 2):
        self.out, self.clock = out, StepClock(warmup_steps)

    def on_train_start(self, trainer, pl_module):
        self.clock.start(trainer.strategy.root_device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock.step(int(batch["attention_mask"].sum()), batch["attention_mask"].numel())

    def on_train_end(self, trainer, pl_module):
        write_result(
            self.out,
            {
                **self.clock.result(),
                **parameter_counts(pl_module.causal_lm),
                "flops_per_token": training_flops_per_token(pl_module.causal_lm),
                "precision": str(trainer.precision),
            },
        )
