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

import roofline
import yaml
from common import BENCH, ROOT, SHARED_ARXIV, run_logged

from lmtune.model.precision import AUTO, choose_compile, compute_dtype_name, current_hardware

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


def shipped_compile(adapter: str, preset: str, extra) -> list[str]:
    """The `compile=` the flagship's own run gets on this machine (`compile=auto` at `lora_arxiv`'s step budget):
    the benchmark's runs are a few steps long, which auto would leave eager, so the choice is passed explicitly
    and the shipped training is what gets measured. Nothing is added when the overrides set `compile=`."""
    if preset == "smoke" or any(o.startswith("compile=") for o in extra):
        return []
    steps = yaml.safe_load((ROOT / "conf" / "experiment" / "lora_arxiv.yaml").read_text())["trainer"]["max_steps"]
    checkpointing = any(o.startswith("model.gradient_checkpointing=") and not o.endswith("=false") for o in extra)
    hardware = current_hardware("gpu" if preset == "gpu" else "cpu")
    on, _ = choose_compile(
        AUTO, hardware, max_steps=steps, quantized=adapter == "qlora", strategy="single", checkpointing=checkpointing
    )
    return [f"compile={str(on).lower()}"]


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


def with_limits(result: dict, peak_gflops: float | None, model_shaped_gflops: float | None) -> dict:
    """Useful FLOP/s of a side (matrix-product FLOPs per real token x real tokens/s, the same count for both
    sides: `training_flops_per_token`), its MFU against the machine's peak and its share of the rate the
    model's own layer shapes reach (`roofline.py`)."""
    useful = result["flops_per_token"] * result["tokens_per_s"]
    result["useful_gflops"] = useful / 1e9
    result["mfu"] = useful / 1e9 / peak_gflops if peak_gflops else None
    result["roofline_fraction"] = useful / 1e9 / model_shaped_gflops if model_shaped_gflops else None
    return result


METRICS = (
    "tokens_per_s",
    "steps_per_s",
    "train_peak_rss_mb",
    "process_peak_rss_mb",
    "peak_gpu_memory_mb",
    "useful_gflops",
    "mfu",
    "roofline_fraction",
)


def summarize(runs: list[dict]) -> dict:
    """Medians over runs of every metric, plus the raw runs."""
    med = {k: statistics.median(r[k] for r in runs) for k in METRICS if all(r.get(k) is not None for r in runs)}
    keep = (
        "padding_fraction",
        "timed_steps",
        "params/total",
        "params/trainable",
        "flops_per_token",
        "precision",
        "gpu",
    )
    return {**med, **{k: runs[0][k] for k in keep if k in runs[0]}, "runs": runs}


def ratios(ours_: dict, base: dict) -> dict:
    return {f"{k}_ratio": ours_[k] / base[k] for k in METRICS if k in ours_ and k in base and base[k]}


def bench(preset: str, adapters: list[str], runs: int, steps: int, warmup: int, work: Path, extra=()) -> dict:
    results = {}
    for adapter in adapters:
        overrides = [*PRESETS[preset], f"adapter={adapter}", f"trainer.max_steps={steps}", *extra]
        ours_overrides = [*overrides, *shipped_compile(adapter, preset, extra)]
        measured = {"ours": [], "baseline": []}
        for i in range(runs):
            order = ["ours", "baseline"] if i % 2 == 0 else ["baseline", "ours"]
            for side in order:
                started = time.perf_counter()
                if side == "ours":
                    run = ours(ours_overrides, work / adapter / f"ours-{i}", warmup)
                else:
                    run = baseline(overrides, work / adapter / f"baseline-{i}", warmup)
                run["process_seconds"] = round(time.perf_counter() - started, 1)
                measured[side].append(run)
                print(
                    f"[train {preset} {adapter} run {i + 1}/{runs}] {side}: {run['tokens_per_s']:.0f} tokens/s, "
                    f"peak RSS {run['process_peak_rss_mb']:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
        limits = machine_limits(overrides, measured["ours"])
        for run in measured["ours"] + measured["baseline"]:
            with_limits(run, limits["peak_gflops"], limits["model_shaped_gflops"])
        o, b = summarize(measured["ours"]), summarize(measured["baseline"])
        results[adapter] = {
            "ours": o,
            "baseline": b,
            **ratios(o, b),
            "limits": limits,
            "overrides": overrides,
            "ours_overrides": ours_overrides,
        }
    return {"preset": preset, "runs": runs, "steps": steps, "warmup_steps": warmup, "results": results}


def machine_limits(overrides: list[str], ours_runs: list[dict]) -> dict:
    """The roofline in the runs' compute dtype, at the mean token count of our batches (padding included: those
    are the rows the products have), measured right after the runs on the same machine."""
    first = ours_runs[0]
    tokens = round(statistics.mean(r["padded_tokens"] / r["timed_steps"] for r in ours_runs))
    device = "cuda" if first.get("gpu") else "cpu"
    dtype = compute_dtype_name(first["precision"])
    measured = roofline.bench(overrides, tokens, device, quick=overrides[0] == "experiment=smoke", dtypes=(dtype,))
    limits = measured["dtypes"][dtype]
    peak = measured.get("datasheet_bf16_gflops") if device == "cuda" and dtype != "float32" else None
    return {
        "dtype": dtype,
        "tokens": tokens,
        "peak_gflops": peak or limits["peak_gflops"],
        "peak_source": "datasheet" if peak else "measured large products",
        "model_shaped_gflops": limits["model_shaped_gflops"],
        "roofline": measured,
    }


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
