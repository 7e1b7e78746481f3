"""Training throughput and memory: our `src/train.py` vs the Hugging Face Trainer baseline (`hf_baseline.py`).

Both run as fresh processes from the same Hydra overrides (same data slice, model, adapter, batch size,
steps, seed, precision), alternating ours/baseline and flipping which goes first each round, so a slow
spell on a shared machine hits both. Each process times its steps with the same `StepClock`.

    python bench/train_throughput.py --runs 3 --steps 12             (CPU: SmolLM2-135M, LoRA and QLoRA)
    python bench/train_throughput.py --preset gpu --runs 3            (CUDA: Llama-3.2-1B shape, seq 512)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import BENCH, ROOT, SHARED_ARXIV, run_logged

# The settings each preset trains with; `adapter=` is added per measured configuration.
PRESETS = {
    "cpu": ["experiment=lora_arxiv", f"data.path={SHARED_ARXIV}"],
    "gpu": [
        "experiment=lora_arxiv",
        f"data.path={SHARED_ARXIV}",
        "model=llama3_2_1b_random",
        "trainer=gpu",
        "data.max_length=512",
    ],
    "smoke": ["experiment=smoke"],
}
# Only the training loop is measured: no validation, test, report, logger or checkpoints in either run.
OURS_ONLY_TRAINING = [
    "trainer.limit_val_batches=0",
    "+trainer.limit_test_batches=0",
    "report.enabled=false",
    "logger=none",
    "callbacks=none",
    "optimized_metric=null",  # nothing validated, nothing to return to a sweep
]
# Peak dense bf16 tensor FLOP/s by GPU name (vendor datasheets), for MFU; first match wins.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L4", 121e12)]


def run_worker(cmd: list[str], out: Path, log: Path) -> dict:
    run_logged(cmd, log)
    return json.loads(out.read_text())


def ours(overrides: list[str], work: Path, warmup: int) -> dict:
    out = work / "result.json"
    cmd = [
        sys.executable,
        str(ROOT / "src" / "train.py"),
        *overrides,
        *OURS_ONLY_TRAINING,
        "+callbacks.bench_clock._target_=clock.LightningClock",
        f"+callbacks.bench_clock.out={out}",
        f"+callbacks.bench_clock.warmup_steps={warmup}",
        f"hydra.run.dir={work}",
    ]
    return run_worker(cmd, out, work / "log.txt")


def baseline(overrides: list[str], work: Path, warmup: int) -> dict:
    out = work / "result.json"
    cmd = [sys.executable, str(BENCH / "hf_baseline.py"), "--out", str(out), "--warmup-steps", str(warmup), *overrides]
    return run_worker(cmd, out, work / "log.txt")


def flops_per_token(params_total: int, params_trainable: int) -> int:
    """Training FLOPs per token: 6 per weight (forward 2, input gradients 2, weight gradients 2) when the weight
    trains; a frozen weight skips its weight gradient, so 4. Full fine-tuning is the usual 6·N; with adapters it
    is 4·N_frozen + 6·N_adapter. Attention's sequence-length term is left out, as in the usual 6·N."""
    return 4 * (params_total - params_trainable) + 6 * params_trainable


def mfu(result: dict) -> float | None:
    gpu = result.get("gpu")
    peak = next((flops for name, flops in PEAK_BF16_FLOPS if gpu and name in gpu), None)
    if peak is None:
        return None
    return flops_per_token(result["params/total"], result["params/trainable"]) * result["tokens_per_s"] / peak


METRICS = ("tokens_per_s", "steps_per_s", "train_peak_rss_mb", "process_peak_rss_mb", "peak_gpu_memory_mb", "mfu")


def summarize(runs: list[dict]) -> dict:
    """Medians over runs of every metric, plus the raw runs."""
    for r in runs:
        r["mfu"] = mfu(r)
    med = {k: statistics.median(r[k] for r in runs) for k in METRICS if all(r.get(k) is not None for r in runs)}
    keep = ("padding_fraction", "timed_steps", "params/total", "params/trainable", "gpu")
    return {**med, **{k: runs[0][k] for k in keep if k in runs[0]}, "runs": runs}


def ratios(ours_: dict, base: dict) -> dict:
    return {f"{k}_ratio": ours_[k] / base[k] for k in METRICS if k in ours_ and k in base and base[k]}


def bench(preset: str, adapters: list[str], runs: int, steps: int, warmup: int, work: Path, extra=()) -> dict:
    results = {}
    for adapter in adapters:
        overrides = [*PRESETS[preset], f"adapter={adapter}", f"trainer.max_steps={steps}", *extra]
        measured = {"ours": [], "baseline": []}
        for i in range(runs):
            order = ["ours", "baseline"] if i % 2 == 0 else ["baseline", "ours"]
            for side in order:
                started = time.perf_counter()
                run = (ours if side == "ours" else baseline)(overrides, work / adapter / f"{side}-{i}", warmup)
                run["process_seconds"] = round(time.perf_counter() - started, 1)
                measured[side].append(run)
                print(
                    f"[train {preset} {adapter} run {i + 1}/{runs}] {side}: {run['tokens_per_s']:.0f} tokens/s, "
                    f"peak RSS {run['process_peak_rss_mb']:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
        o, b = summarize(measured["ours"]), summarize(measured["baseline"])
        results[adapter] = {"ours": o, "baseline": b, **ratios(o, b), "overrides": overrides}
    return {"preset": preset, "runs": runs, "steps": steps, "warmup_steps": warmup, "results": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--adapters", default="lora,qlora")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "logs" / "bench" / "train_throughput")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both sides")
    a = parser.parse_args()
    print(json.dumps(bench(a.preset, a.adapters.split(","), a.runs, a.steps, a.warmup, a.work, a.overrides), indent=2))
