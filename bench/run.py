"""`make bench`: every benchmark in one run -> bench/results/<date>-<host>-<cpu>.json and the table in bench/README.md.

Order matters: training throughput first (on a quiet machine), then accuracy (its fine-tuned export is what
the evaluation benchmark scores), then evaluation throughput; the GPU section runs when CUDA is available; then
data preparation at growing sizes (`data_scale.py`; 1M rows take ~10 minutes and under 1 GB), and training
tokens/s at growing lengths.
The JSON is rewritten after each part, so an interrupted run keeps what it measured.

    python bench/run.py                    (the full CPU benchmark: ~105 minutes on 2 cores, data and serve parts too)
    python bench/run.py --smoke --out /tmp/b --readme /tmp/b/README.md   (tiny model, under a minute: what tests run)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import accuracy
import data_scale
import eval_throughput
import learning_curve
import roofline
import serve_load
import torch
import train_throughput
from common import BENCH, ROOT, SHARED_ARXIV, machine, machine_name

START, END = "<!-- results:start -->", "<!-- results:end -->"


# --- the markdown table ---------------------------------------------------------------------------------
def _f(x, fmt="{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def _shown(overrides: list[str]) -> str:
    """Overrides as a reader would type them: adapter left out (one row each), paths relative to the repo."""
    kept = [o for o in overrides if not o.startswith("adapter=")]
    return " ".join(kept).replace(str(ROOT.parent), "..")


# (header, result key, format, target for the ratio)
CPU_COLUMNS = [
    ("real tokens/s", "tokens_per_s", "{:.0f}", "≥ 2"),
    ("padding", "padding_fraction", "{:.1%}", None),
    ("train peak RSS MB", "train_peak_rss_mb", "{:.0f}", "≤ 0.5"),
    ("useful GFLOP/s", "useful_gflops", "{:.0f}", None),
    ("MFU", "mfu", "{:.1%}", None),
    ("of model-shaped rate", "roofline_fraction", "{:.0%}", None),
]
GPU_COLUMNS = [
    ("real tokens/s", "tokens_per_s", "{:.0f}", None),
    ("padding", "padding_fraction", "{:.1%}", None),
    ("peak GPU MB", "peak_gpu_memory_mb", "{:.0f}", None),
    ("useful TFLOP/s", "useful_gflops", "{:.0f}", None),
    ("MFU", "mfu", "{:.1%}", None),
    ("of model-shaped rate", "roofline_fraction", "{:.0%}", None),
]


def _limits_line(by_adapter: dict) -> list[str]:
    """What MFU and the model-shaped share are measured against, per adapter."""
    lines = []
    for adapter, r in by_adapter.items():
        lim = r.get("limits")
        if lim:
            lines.append(
                f"- {adapter}: {r['ours'].get('precision', '?')}, {lim['dtype']} products; peak "
                f"{lim['peak_gflops']:.0f} GFLOP/s ({lim['peak_source']}); the model's layer shapes at "
                f"{lim['tokens']} tokens (forward + input gradient of q, k, v, o, gate, up, down): "
                f"{lim['model_shaped_gflops']:.0f} GFLOP/s"
            )
    return lines


def _throughput_table(by_adapter: dict, columns: list) -> list[str]:
    """One row per side and a ratio row per adapter (ratios exist for the metrics in METRICS)."""
    lines = [
        "| adapter | side | " + " | ".join(c[0] for c in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for adapter, r in by_adapter.items():
        for side in ("ours", "baseline"):
            cells = [_f(r[side].get(key), fmt) for _, key, fmt, _ in columns]
            lines.append(f"| {adapter} | {side} | " + " | ".join(cells) + " |")
        ratios = []
        for _, key, _, target in columns:
            ratio = r.get(f"{key}_ratio")
            cell = "" if ratio is None else f"{ratio:.3g}x"  # 0.504x, not a rounded 0.50x beside a 0.5 target
            ratios.append(f"**{cell}** (target {target})" if cell and target else cell)
        lines.append(f"| {adapter} | **ours / baseline** | " + " | ".join(ratios) + " |")
    return lines


def render(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Measured {m['date']} on `{m['host']}`: {m['cpu']} ({m.get('cpu_capability', '?')}, native bf16 "
        f"{'yes' if m.get('cpu_native_bf16') else 'no'}; `trainer.precision=auto` picks "
        f"{m.get('auto_precision', '?')}), {m['cores']} cores, {m['memory_gb']} GiB, "
        f"GPU: {m['gpu'] or 'none'}; torch {m['versions']['torch']}, transformers {m['versions']['transformers']}, "
        f"peft {m['versions']['peft']}, bitsandbytes {m['versions']['bitsandbytes']}, lightning "
        f"{m['versions']['lightning']}; commit {m['git']}. Raw numbers: `{results['file']}`.",
        "",
    ]
    train = results.get("train")
    if train:
        lines += [
            f"**1. Training throughput** ({train['preset']} preset, {train['steps']} steps of which the first "
            f"{train['warmup_steps']} are warm-up, median of {train['runs']} alternating runs; "
            f"`{_shown(next(iter(train['results'].values()))['overrides'])}`)",
            "",
        ]
        compiled = [a for a, r in train["results"].items() if "compile=true" in r.get("ours_overrides", ())]
        if compiled:
            lines += [
                f"Ours with `compile=true` for {', '.join(compiled)}: what `compile=auto` picks for the flagship's "
                "150 steps on this machine (compilation in the warm-up steps, not in the rate).",
                "",
            ]
        lines += _throughput_table(train["results"], CPU_COLUMNS)
        lines += ["", *_limits_line(train["results"]), ""]
    ev = results.get("eval")
    if ev:
        lines += [
            f"**2. Evaluation throughput** ({ev['examples']} test papers, {ev['runs']} run(s) each, "
            f"{ev['precision']}, mean prompt {ev['mean_prompt_tokens']:.0f} tokens, {len(ev['labels'])} labels of "
            f"{min(ev['answer_tokens'])}-{max(ev['answer_tokens'])} answer tokens)",
            "",
            "| method | examples/s | accuracy | note |",
            "|---|---|---|---|",
            f"| rank scoring (ours) | {ev['rank']['examples_per_s']:.2f} | {ev['rank']['acc']:.3f} | "
            "always a valid label |",
            f"| `generate()` greedy, stops at end-of-turn | {ev['generate']['examples_per_s']:.2f} | "
            f"{ev['generate']['acc']:.3f} | invalid answers {ev['generate']['invalid_rate']:.1%} |",
            f"| prefill only (one pass per prompt) | {ev['prefill_only']['examples_per_s']:.2f} | – | "
            "every prompt encoded in full: the floor for generation |",
            f"| prefill of what differs | {ev['prefill_shared_prefix_once']['examples_per_s']:.2f} | – | "
            f"the {ev['prefill_shared_prefix_once']['shared_prefix_tokens']} opening tokens all prompts share "
            "encoded once, as rank scoring does: its floor |",
            f"| naive rank scoring (one pass per label) | {ev['naive_rank']['examples_per_s']:.2f} | – | "
            f"first {ev['naive_rank']['examples']} papers; same label as ours on "
            f"{ev['naive_rank']['same_labels']:.0%} |",
            "",
            f"Rank / prefill only: **{ev['rank_over_prefill']:.2f}x** "
            "(target ≥ 0.95: scoring every label costs little beyond reading the prompt); rank / prefill of what "
            f"differs: **{ev['rank_over_prefill_shared_prefix_once']:.2f}x** (what the label pass itself costs). "
            f"Rank / generate: **{ev['rank_over_generate']:.2f}x** (target ≥ 5); they agree on "
            f"{ev['agreement']:.1%} of the papers. Prefill only / generate, the most any scoring method could gain: "
            f"{ev['prefill_only']['examples_per_s'] / ev['generate']['examples_per_s']:.2f}x. "
            "Rank / naive rank scoring: "
            f"**{ev['naive_rank']['rank_over_naive']:.1f}x**.",
            "",
        ]
    acc = results.get("accuracy")
    if acc:
        b = acc["budget"]
        names = {
            "tfidf_same": f"TF-IDF + LR, the LM's {acc['rows']['tfidf_same']['train_examples']} training papers",
            "tfidf_all": f"TF-IDF + LR, the whole train split ({acc['rows']['tfidf_all']['train_examples']} papers)",
            "zero_shot": "SmolLM2 zero-shot (rank scoring)" if acc["experiment"] != "smoke" else "zero-shot",
            "finetuned": f"fine-tuned ({acc['experiment']})",
        }
        lines += [
            f"**3. Accuracy** (test split, {b['test_examples']} papers, {len(b['labels'])} labels; fine-tuning budget: "
            f"{b['train_examples']} papers, {b['steps']} steps of {b['batch_size']} = {b['epochs']} epochs, "
            f"{b['train_seconds']:.0f} s in training steps, {b['run_wall_seconds']:.0f} s for the whole run with "
            f"validation and report; `{_shown(acc['overrides'])}`)",
            "",
            "| model | accuracy | macro-F1 |",
            "|---|---|---|",
        ]
        for key, name in names.items():
            row = acc["rows"][key]
            lines.append(f"| {name} | {row['acc']:.3f} | {row['macro_f1']:.3f} |")
        t = acc["targets"]
        lines += [
            "",
            f"Target (beats TF-IDF on the same papers): **{'met' if t['beats_tfidf_same'] else 'missed'}**; "
            f"stretch (beats TF-IDF on the whole train split): **{'met' if t['beats_tfidf_all'] else 'missed'}**.",
            "",
        ]
    roof = results.get("roofline")
    if roof:
        lines += [
            f"**Matrix-product limits** ({roof['device']}, {roof['tokens']} tokens for the model's layer shapes)",
            "",
        ]
        lines += ["| dtype | large square products GFLOP/s | model's layer shapes GFLOP/s |", "|---|---|---|"]
        for dtype, d in roof["dtypes"].items():
            squares = ", ".join(f"{n}³: {v:.0f}" for n, v in d["square_gflops"].items())
            lines.append(f"| {dtype} | {squares} | {d['model_shaped_gflops']:.0f} |")
        for dtype, why in roof.get("skipped", {}).items():
            lines.append(f"| {dtype} | not measured: {why} | |")
        lines.append("")
    gpu = results.get("gpu")
    if gpu is not None:
        lines.append("**4. GPU** (Llama-3.2-1B shape, random weights, bf16-mixed, seq 512)")
        lines.append("")
        if not gpu.get("measured"):
            lines.append(f"Not measured: {gpu['reason']}.")
        else:
            lines += _throughput_table(gpu["results"], GPU_COLUMNS)
            lines += ["", *_limits_line(gpu["results"])]
        lines.append("")
    lines += _data_lines(results.get("data"))
    lines += _serve_lines(results.get("serve"))
    return "\n".join(lines)


def _serve_lines(serve: dict | None) -> list[str]:
    """The HTTP server under closed-loop load beside the offline rate, and the soak."""
    if not serve:
        return []
    if serve.get("measured") is False:
        return [f"**6. Serving**: not measured ({serve['reason']}).", ""]
    when = f"; measured {serve['machine']['date'][:16]}, commit {serve['machine']['git']}" if "machine" in serve else ""
    lines = [
        f"**6. Serving** (`src/serve.py`, LitServe, max_batch_size {serve['max_batch_size']}, closed-loop clients "
        f"on the loopback, {serve['rows']} test rows; offline `Predictor.predict` on the same rows: "
        f"{serve['offline_rows_per_s']:.2f} rows/s; `bench/serve_load.py`{when})",
        "",
        f"{serve.get('bad_fraction', 0):.0%} of the requests are bad ones (an unpaired surrogate, a 30 KB title, a "
        "title that cannot fit, JSON nested 10,000 deep, a 5,000-digit number): each must get a 4xx, no good one an "
        "error; requests/s counts the good rows answered.",
        "",
        "| concurrency | good requests | requests/s | vs offline | p50 ms | p95 ms | p99 ms | errors "
        "| bad: sent, not 4xx |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in serve["levels"]:
        lines.append(
            f"| {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['vs_offline']:.2f}x | "
            f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | "
            f"{r.get('bad_requests', 0)}, {r.get('bad_not_4xx', 0)} |"
        )
    soak = serve.get("soak")
    if soak:
        growth = f"{soak['rss_growth']:+.1%}" if soak["rss_growth"] is not None else "not measured"
        lines += [
            "",
            f"Soak: {soak['seconds']:.0f} s at concurrency {soak['concurrency']}, {soak['requests']} good requests, "
            f"{soak['errors']} errors, {soak.get('bad_requests', 0)} bad ones "
            f"({soak.get('bad_not_4xx', 0)} not a 4xx), "
            f"server RSS {soak['rss_mb'][0] if soak['rss_mb'] else '?'} -> "
            f"{soak['rss_mb'][-1] if soak['rss_mb'] else '?'} MB ({growth}). Goals: ≥ 0.8x offline at concurrency "
            "32 with 0 errors; RSS growth < 5% over 10 minutes.",
        ]
    lines.append("")
    return lines


def _data_lines(data: dict | None) -> list[str]:
    """Data preparation as the file grows (first run on an empty cache, then the cached run), and training
    tokens/s as the examples grow longer."""
    if not data:
        return []
    when = f"; measured {data['machine']['date'][:16]}, commit {data['machine']['git']}" if "machine" in data else ""
    lines = [
        f"**5. Data preparation** (`{data['experiment']}`, every row tokenized, the shared file repeated with new "
        f"ids; a fresh process per run; `bench/data_scale.py`{when})",
        "",
        "| rows | file | first run | peak RSS | ms per row per core | cached run | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in data["sizes"]:
        first, second = size["first"], size["second"]
        if "seconds" not in first or "seconds" not in second:
            lines.append(f"| {size['rows']:,} | {size['file_mb']:.0f} MB | failed: {first.get('failed')} | | | | |")
            continue
        lines.append(
            f"| {size['rows']:,} | {size['file_mb']:.0f} MB | {first['seconds']:.1f} s | "
            f"{first['peak_rss_mb'] / 1024:.2f} GB | {size['ms_per_row_per_core']:.2f} | {second['seconds']:.1f} s | "
            f"{second['peak_rss_mb'] / 1024:.2f} GB |"
        )
    lines += ["", "Goals: peak RSS ≤ 4 GB at 1M rows, ≤ 1 ms per row per core, a cached run ≤ 10 s.", ""]
    runs = (data.get("lengths") or {}).get("lengths")
    if runs:
        lines += [
            "Training (LoRA, `src/train.py`) with every example filling max_length (abstracts repeated 4x, truncated):",
            "",
            "| max_length | tokens/s | steps/s | padding | peak RSS | precision |",
            "|---|---|---|---|---|---|",
        ]
        for r in runs:
            lines.append(
                f"| {r['max_length']} | {r['tokens_per_s']:.0f} | {r['steps_per_s']:.3f} | "
                f"{r['padding_fraction']:.1%} | {r['process_peak_rss_mb'] / 1024:.2f} GB | {r['precision']} |"
            )
        lines.append("")
    return lines


def other_machines(results: dict, folder: Path) -> list[str]:
    """One row per earlier results file in `folder` (other machines, other days): they are kept, never
    overwritten, and shown beside this run's."""
    rows = []
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if "machine" not in doc or doc.get("file") == results.get("file") or "results" not in doc.get("train", {}):
            continue  # not a training-throughput results file (roofline, curve, memory, compile...)
        m, lora = doc["machine"], doc["train"]["results"].get("lora", {})
        ours = lora.get("ours", {})
        cells = [
            m["date"][:10],
            f"`{m['host']}`: {m['cpu']} ({m.get('cpu_capability', '?')})",
            ours.get("precision", "bf16-mixed (shipped then)"),
            _f(ours.get("tokens_per_s"), "{:.0f}"),
            _f(lora.get("tokens_per_s_ratio"), "{:.2f}x"),
            _f(lora.get("train_peak_rss_mb_ratio"), "{:.2f}x"),
            _f(ours.get("mfu"), "{:.1%}"),
            _f(ours.get("roofline_fraction"), "{:.0%}"),
            f"`{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}`",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "**Other machines and earlier runs** (LoRA training throughput; each file keeps its whole run)",
        "",
        "| date | machine | precision | ours tokens/s | vs baseline | peak memory vs baseline | MFU "
        "| of model-shaped rate | results |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def write(results: dict, out: Path, readme: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if "train" not in results:  # a partial run (e.g. --parts eval) keeps the table of the last full run
        print(f"results in {out}; {readme} left as it is (no training-throughput part in this run)", file=sys.stderr)
        return
    text = readme.read_text() if readme.is_file() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    table = "\n".join([render(results), *other_machines(results, out.parent)])
    readme.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main(a) -> dict:
    stamp = dt.date.today().isoformat()
    out = a.out / f"{stamp}-{machine_name()}.json"
    work = a.work / out.stem
    results = {"machine": machine(), "file": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out)}
    parts = a.parts.split(",")
    preset = "smoke" if a.smoke else "cpu"
    extra = [] if a.smoke else [f"data.max_length={a.max_length}"]

    if "train" in parts:
        results["train"] = train_throughput.bench(
            preset, a.adapters.split(","), a.runs, a.steps, a.warmup, work / "train", extra
        )
        write(results, out, a.readme)
    export = None
    if "accuracy" in parts:
        experiment = "smoke" if a.smoke else "lora_arxiv"
        data = [] if a.smoke else [f"data.path={SHARED_ARXIV}", *a.accuracy_overrides]
        results["accuracy"] = accuracy.bench(experiment, data, work / "accuracy")
        export = results["accuracy"]["export"]
        write(results, out, a.readme)
    if "eval" in parts:
        overrides = ["experiment=smoke"] if a.smoke else [f"data.path={SHARED_ARXIV}"]
        limit, naive = (8, 2) if a.smoke else (a.eval_limit, a.naive_limit)
        results["eval"] = eval_throughput.bench(export or a.ckpt, overrides, limit, naive, a.eval_runs)
        write(results, out, a.readme)
    if "serve" in parts:  # the HTTP server under load, beside the offline rate (the accuracy part's export)
        ckpt = export or a.ckpt
        if ckpt is None:
            results["serve"] = {"measured": False, "reason": "no export: run the accuracy part too, or give --ckpt"}
        elif a.smoke:
            results["serve"] = serve_load.bench(ckpt, data_scale.SAMPLE, work, 16, 16, (1, 8), 3.0, 4)
        else:
            results["serve"] = serve_load.bench(ckpt, SHARED_ARXIV, work, 128, 128, (1, 8, 32), a.soak_seconds, 16)
        write(results, out, a.readme)
    if "gpu" in parts:
        if torch.cuda.is_available():
            gpu = train_throughput.bench("gpu", ["lora", "qlora"], a.runs, a.steps, a.warmup, work / "gpu")
            results["gpu"] = {"measured": True, **gpu}
        else:
            results["gpu"] = {"measured": False, "reason": "no CUDA device on this machine"}
        write(results, out, a.readme)
    if "curve" in parts:  # its own results file and plots (hours on a CPU): bench/learning_curve.py
        curve = learning_curve.main(
            learning_curve.parse(["--smoke"] * a.smoke + ["--out", str(a.out), "--work", str(a.work)])
        )
        results["curve"] = {"file": curve["file"], "plots": curve["plots"]}
    if "data" in parts:  # data preparation as the file grows (fresh processes; their own peak memory)
        sizes = [100, 200] if a.smoke else a.data_rows
        source, experiment = (data_scale.SAMPLE, "smoke") if a.smoke else (SHARED_ARXIV, "lora_arxiv")
        results["data"] = data_scale.bench(sizes, source, work / "data", experiment, [])
        write(results, out, a.readme)
        preset = [o for o in train_throughput.PRESETS["smoke" if a.smoke else "cpu"] if not o.startswith("data.path")]
        lengths = [128, 192] if a.smoke else a.data_lengths
        results["data"]["lengths"] = data_scale.lengths(lengths, source, work / "data", 4 if a.smoke else 6, 2, preset)
        write(results, out, a.readme)
    if "roofline" in parts:  # the matrix-product limits alone (the train parts measure them beside each run)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = ["experiment=smoke"] if a.smoke else ["model=llama3_2_1b_random"] if device == "cuda" else []
        results["roofline"] = roofline.bench(model, a.roofline_tokens, device, quick=a.smoke)
        write(results, out, a.readme)
    return results


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and sample data: checks the scripts run")
    parser.add_argument(
        "--parts",
        default="train,accuracy,eval,serve,gpu,data",
        help="also: roofline (the limits alone), curve (learning curve)",
    )
    parser.add_argument("--data-rows", type=int, nargs="*", default=[20000, 200000, 1000000], help="data part rows")
    parser.add_argument("--data-lengths", type=int, nargs="*", default=[256, 512, 1024], help="data part lengths")
    parser.add_argument("--roofline-tokens", type=int, default=4096, help="rows of the roofline part's products")
    parser.add_argument("--adapters", default="lora,qlora")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs per side (medians)")
    parser.add_argument("--steps", type=int, default=7, help="optimizer steps per training-throughput run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--max-length", type=int, default=512, help="data.max_length for the throughput runs")
    parser.add_argument("--eval-limit", type=int, default=200)
    parser.add_argument("--naive-limit", type=int, default=20)
    parser.add_argument("--eval-runs", type=int, default=1)
    parser.add_argument("--soak-seconds", type=float, default=600.0, help="the serve part's soak at concurrency 8")
    parser.add_argument("--ckpt", default=None, help="export for the eval part when the accuracy part is skipped")
    parser.add_argument("--accuracy-overrides", nargs="*", default=[], help="extra overrides for the fine-tune run")
    parser.add_argument("--render", type=Path, help="only rewrite the README table from this results file")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--readme", type=Path, default=BENCH / "README.md")
    parser.add_argument("--work", type=Path, default=ROOT / "logs" / "bench")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    if args.render:
        write(json.loads(args.render.read_text()), args.render, args.readme)
    else:
        main(args)
