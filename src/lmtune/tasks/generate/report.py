"""The generate kind's end-of-training report: the fine-tuned model's answers on the test split beside the zero-shot
base model's (the same conversations, the same prompt), scored by exact match, chrF and ROUGE-L, with a table of
examples (prompt, reference, zero-shot, fine-tuned) in `report.md` and in W&B."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from lmtune.core.digest import json_digest
from lmtune.evaluation.report import base_model
from lmtune.tasks.generate.evaluation import evaluate_generation
from lmtune.tasks.generate.predictor import ChatPredictor

log = logging.getLogger(__name__)

EXAMPLES = 8  # rows of the examples table
CELL = 300  # characters of a prompt shown in a table cell


def _cell(text: str, limit: int = CELL) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def report_markdown(rows: dict[str, dict], examples: list[dict], train: dict, data: dict) -> str:
    lines = [
        "# Report",
        "",
        f"Test split: {data.get('test_examples')} conversations; each model writes the last assistant turn.",
        "",
        "| model | exact match | chrF | ROUGE-L | answer words (reference) | cut at max_new_tokens |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows.items():
        lines.append(
            f"| {name} | {m['exact_match']:.3f} | {m['chrf']:.1f} | {m['rougeL']:.3f} | "
            f"{m['answer_words']:.1f} ({m['reference_words']:.1f}) | {m['cut_at_max_new_tokens']} |"
        )
    dropped = max(m.get("early_exchanges_dropped", 0) for m in rows.values())
    if dropped:
        lines += [
            "",
            f"{dropped} test conversations were answered without their early exchanges (left out to fit "
            "data.max_length): where those hold what the answer needs, raise data.max_length.",
        ]
    names = list(rows)
    lines += ["", "## Examples", "", "| prompt | reference | " + " | ".join(names) + " |"]
    lines.append("|---" * (2 + len(names)) + "|")
    for e in examples:
        lines.append("| " + " | ".join(_cell(e[k]) for k in ("prompt", "reference", *names)) + " |")
    lines += [
        "",
        "## Training",
        "",
        f"- {train.get('steps')} steps in {train.get('train_seconds')} s, {train.get('tokens_per_s')} tokens/s",
        f"- data: {data.get('records')} records from {data.get('source')}; train/val/test = "
        f"{data.get('train_examples')}/{data.get('val_examples')}/{data.get('test_examples')}; "
        f"skipped {sum(data.get('skipped', {}).values())} ({data.get('skipped')})",
        "",
    ]
    return "\n".join(lines)


def zero_shot_answers(module, formatter, records, cache_dir: Path, out_dir: Path, precision, max_new) -> tuple:
    """The base model's answers and metrics on `records`, from the cache when this exact evaluation ran before (a
    learning curve's runs share their test split)."""
    hp = module.hparams
    quant = hp.adapter_cfg.get("quantization")
    ids = [r.id for r in records]
    key = json_digest([hp.pretrained, hp.model_cfg, quant, formatter.fingerprint(), ids, str(precision), max_new])
    cached = cache_dir / "zero_shot" / f"generate-{key}"
    if not (cached / "eval_metrics.json").is_file():
        with base_model(module) as causal_lm:
            base = ChatPredictor(causal_lm, formatter, source=f"zero-shot {hp.pretrained}", precision=precision)
            evaluate_generation(base, records, cached.with_suffix(".tmp"), max_new)
        shutil.rmtree(cached, ignore_errors=True)
        cached.with_suffix(".tmp").rename(cached)
    else:
        log.info("zero-shot answers from the cache: %s", cached)
    shutil.copytree(cached, out_dir, dirs_exist_ok=True)
    metrics = json.loads((cached / "eval_metrics.json").read_text())["metrics"]
    rows = [json.loads(line) for line in (cached / "predictions.jsonl").read_text().splitlines()]
    return metrics, [r for r in rows if "answer" in r]


def generation_report(module, datamodule, output_dir: Path, cfg, train_stats: dict, precision, run=None):
    """(the summary's report/* numbers, the metrics by model, the fine-tuned model's test/* generation metrics)."""
    formatter = datamodule.formatter
    # the conversations the test loss was measured on: those training's formatting kept (one too long is skipped)
    kept = {e.id for e in datamodule.examples["test"]}
    records = [r for r in datamodule.splits["test"] if r.id in kept]
    max_new = cfg.report.get("max_new_tokens")
    module.eval()
    tuned = ChatPredictor(module.causal_lm, formatter, source="fine-tuned (best checkpoint)", precision=precision)
    rows, answers = {}, {}
    rows["fine-tuned"], answers["fine-tuned"] = evaluate_generation(tuned, records, output_dir / "generations", max_new)
    if cfg.report.get("zero_shot", True):
        rows["zero-shot"], answers["zero-shot"] = zero_shot_answers(
            module,
            formatter,
            records,
            Path(cfg.paths.cache_dir),
            output_dir / "zero_shot_generations",
            precision,
            max_new,
        )
    names = ["zero-shot", "fine-tuned"] if "zero-shot" in rows else ["fine-tuned"]
    rows = {name: rows[name] for name in names}
    examples = [
        {"prompt": r["prompt"], "reference": r["reference"], **{n: answers[n][i]["answer"] for n in names}}
        for i, r in enumerate(answers["fine-tuned"][:EXAMPLES])
    ]
    (output_dir / "report.md").write_text(report_markdown(rows, examples, train_stats, datamodule.stats))
    summary = {f"report/{n.replace('-', '_')}/{k}": v for n, m in rows.items() for k, v in m.items()}
    if run is not None:
        import wandb

        columns = ["prompt", "reference", *names]
        run.log({"report/examples": wandb.Table(columns=columns, data=[[e[c] for c in columns] for e in examples])})
        run.summary.update(summary)
    log.info("report: %s", output_dir / "report.md")
    tuned_metrics = rows["fine-tuned"]
    return summary, rows, {f"test/{k}": float(tuned_metrics[k]) for k in ("exact_match", "chrf", "rougeL")}
