"""Training throughput: tokens/s, FLOP/s, MFU against the machine's peak, and peak memory, logged as a
callback (`TrainingStats`) and summed up for metrics.json."""

from __future__ import annotations

import logging
import resource
import sys
import time

import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage

from lmtune.model.precision import cached_measurement, compute_dtype_name, cpu_hardware, measured_rate, random_operands

log = logging.getLogger(__name__)

# dense bf16 tensor FLOP/s (vendor datasheets) for GPUs whose names Lightning's table does not match
# (it knows "H200 SXM1", not the plain "NVIDIA H200" the driver reports); first match wins
GPU_PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L4", 121e12)]


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory on GPU, else peak resident memory of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class TrainingStats(ThroughputMonitor):
    """Training throughput: Lightning's ThroughputMonitor (FLOP/s and MFU from the module's `flops_per_batch`)
    plus what it lacks: real (non-padding) and supervised tokens/s, the padding fraction and peak memory.

    The MFU's peak is Lightning's datasheet figure on a GPU it knows, else `peak_flops`: the datasheet
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


def peak_flops(device: torch.device, precision: str, cache_dir=None) -> float | None:
    """Peak FLOP/s for MFU: on a known GPU the datasheet's dense bf16 figure (under mixed precision), on CPU a
    measured large matrix product in the precision's compute dtype (cached per machine); else None."""
    dtype = compute_dtype_name(precision)
    if device.type == "cuda":
        from lightning.fabric.utilities.throughput import get_available_flops

        known = get_available_flops(device, getattr(torch, dtype))
        if known or dtype == "float32":
            return known
        name = torch.cuda.get_device_name(device)
        return next((f for n, f in GPU_PEAK_BF16 if n in name), None)
    if device.type != "cpu":
        return None
    # only the dtype the run computes in: bf16 where the CPU emulates it would cost minutes for nothing
    rates = cached_measurement(
        cache_dir, f"matmul-peak-{dtype}", cpu_hardware(), lambda: cpu_peak(2048, dtypes=(dtype,))
    )()
    return rates[dtype] * 1e9 if dtype in rates else None


def cpu_peak(size: int = 4096, seconds: float = 0.5, dtypes=("float32", "bfloat16")) -> dict:
    """GFLOP/s of a large square matrix product per dtype: the machine's matrix-product roofline.

    In a linear layer's layout (`x·Wᵀ`, `F.linear`): without native bf16, torch runs a plain bf16 `a @ b` in a
    generic kernel (measured on an AVX2 EPYC: 0.3 GFLOP/s at 2048³, a minute per product) but `F.linear` through
    oneDNN (15 GFLOP/s), and `F.linear` is what the model runs."""
    flops = 2 * size**3
    out = {}
    with torch.no_grad():
        for name in dtypes:
            a, b = random_operands((size, size), (size, size), dtype=getattr(torch, name))
            out[name] = round(measured_rate(lambda a=a, b=b: torch.nn.functional.linear(a, b), flops, seconds), 1)
    return out
