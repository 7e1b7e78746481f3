"""The report at the end of training: fine-tuned vs zero-shot base model vs TF-IDF, on the same test split.

- fine-tuned: the best checkpoint's weights, rank mode, full outputs in the run folder (eval_metrics.json,
  predictions.jsonl, confusion_matrix.png, per_class.md).
- zero-shot: the same model with its adapters disabled (LoRA off is exactly the base model, so no second
  copy is loaded), the same examples and answers, prompted with `data.prompt.zero_shot_system` (default: the
  training system prompt; a recipe whose fine-tuned prompt drops the label list keeps it there); cached
  under `paths.cache_dir/zero_shot/` by a key of the base model, quantization, prompts, answers and test
  examples, so repeated runs do not pay for it again.
- TF-IDF + logistic regression fitted on the same training examples (seconds), for scale.
`report.md` puts them side by side with the most confused pairs, training time, tokens/s and data counts;
the same numbers go to the W&B summary under `report/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path

from lmtune.core.digest import json_digest
from lmtune.evaluation.comparison import mcnemar, verdict
from lmtune.evaluation.metrics import most_confused
from lmtune.evaluation.modes import evaluate
from lmtune.evaluation.predictor import Predictor
from lmtune.model.loading import load_base_model

log = logging.getLogger(__name__)


def zero_shot_key(pretrained: str, model_cfg: dict, quant_cfg: dict | None, formatter, examples, precision) -> str:
    spec = {
        "version": 2,  # 2: metrics with bootstrap intervals and accuracy at coverage
        "precision": str(precision),
        "base": str(pretrained),
        "model": {k: model_cfg.get(k) for k in ("source", "name_or_path", "gguf_file", "dtype", "attn_implementation")},
        "quantization": quant_cfg,
        "prompt": [formatter.system_prompt, formatter.user_template, formatter.chat_template_kwargs],
        "answers": formatter.answer_ids,
        "examples": hashlib.sha256(
            json.dumps([[e.id, e.input_ids[: e.prompt_length]] for e in examples]).encode()
        ).hexdigest(),
    }
    return json_digest(spec, 16)


@contextlib.contextmanager
def base_model(module):
    """The fine-tuned module's base model, for zero-shot rows: its adapters switched off (no second copy), or, after
    full fine-tuning changed the weights themselves, the base loaded again."""
    if hasattr(module.model, "disable_adapter"):
        with module.model.disable_adapter():
            yield module.causal_lm
        return
    hp = module.hparams
    quant = hp.adapter_cfg.get("quantization")
    yield load_base_model(hp.pretrained, hp.model_cfg, quant, module.device).to(module.device)


def zero_shot_metrics(
    module, formatter, pad_id: int, records, examples, cache_dir: Path, out_dir: Path, precision: str | None = None
) -> dict:
    """Metrics of the base model on `records`, from the cache when this exact evaluation ran before."""
    hp = module.hparams
    quant = hp.adapter_cfg.get("quantization")
    key = zero_shot_key(hp.pretrained, hp.model_cfg, quant, formatter, examples, precision)
    cached = cache_dir / "zero_shot" / key
    if not (cached / "eval_metrics.json").is_file():
        with base_model(module) as causal_lm:
            predictor = Predictor(
                causal_lm, formatter, pad_id, source=f"zero-shot {hp.pretrained}", precision=precision
            )
            evaluate(predictor, records, "rank", cached.with_suffix(".tmp"), prefix="zero_shot")
        shutil.rmtree(cached, ignore_errors=True)
        cached.with_suffix(".tmp").rename(cached)
    else:
        log.info("zero-shot metrics from the cache: %s", cached)
    shutil.copytree(cached, out_dir, dirs_exist_ok=True)
    return json.loads((cached / "eval_metrics.json").read_text())["metrics"]


def tfidf_metrics(splits: dict, labels: list[str], out_dir: Path):
    """(TF-IDF + LR's test metrics, its predictions)."""
    from lmtune.evaluation.tfidf import evaluate_tfidf

    predictions, metrics, _ = evaluate_tfidf(splits["train"], splits["test"], labels, out_dir)
    return metrics, predictions


def _interval(m: dict, key: str) -> str:
    low, high = m.get(f"{key}_interval") or (None, None)
    return f"{m[key]:.3f} [{low:.3f}, {high:.3f}]" if low is not None else f"{m[key]:.3f}"


def trust_markdown(tuned: dict, comparison: str | None) -> list[str]:
    """What a user acting on each prediction needs: how far the probabilities hold, label sets, abstention, and
    whether the win over TF-IDF is more than chance."""
    lines = ["", "## Acting on the predictions (fine-tuned)", ""]
    if "temperature" in tuned:
        lines.append(
            f"- Calibration: temperature {tuned['temperature']:.3f} fitted on the validation split; expected "
            f"calibration error on the test split {tuned['ece_uncalibrated']:.3f} before, {tuned['ece']:.3f} after "
            f"(`reliability.png`); a perfectly calibrated model would show {tuned['ece_floor']:.3f} on this many "
            "papers from sampling alone."
        )
    sets = tuned.get("sets")
    if sets:
        any_label = (
            f"; a set holds one of the paper's labels {100 * sets['coverage_any_label']:.1f} %"
            if "coverage_any_label" in sets
            else ""
        )
        lines.append(
            f"- Label sets at coverage {sets['target']:.2f} (`predict.coverage`): they hold the true label on "
            f"{100 * sets['coverage']:.1f} % of the test rows, {sets['mean_size']:.2f} labels on average, a single "
            f"label {100 * sets['singletons']:.1f} % of the time{any_label}."
        )
    at = tuned.get("acc_at_coverage") or {}
    if at:
        lines.append(
            "- Abstention (`predict.min_confidence`): answering only the most confident "
            + ", ".join(f"{100 * float(c):.0f} % of rows gives accuracy {a:.3f}" for c, a in at.items())
            + f" (all rows: {tuned['acc']:.3f}; `risk_coverage.png`)."
        )
    if comparison:
        lines += ["", "## Fine-tuned against TF-IDF", "", comparison]
    return lines


def report_markdown(
    rows: dict[str, dict], confused: list, train: dict, data: dict, comparison: str | None = None
) -> str:
    any_label = any("acc_any_label" in m for m in rows.values())
    dates = data.get("dates") or {}
    split = f"split {data.get('split', 'random')}" + (
        " (" + "; ".join(f"{name} {a} to {b}" for name, (a, b) in dates.items()) + ")" if dates else ""
    )
    lines = [
        "# Report",
        "",
        f"Test split: {data.get('test_examples')} examples, labels {', '.join(data.get('labels', []))}; {split}.",
        "Brackets: 95% bootstrap intervals (1,000 resamples of the test rows, the same for every model).",
        "",
        "| model | accuracy | macro-F1 | ECE |" + (" one of the row's labels |" if any_label else ""),
        "|---|---:|---:|---:|" + ("---:|" if any_label else ""),
    ]
    for name, m in rows.items():
        ece = f"{m['ece']:.3f}" if "ece" in m else "-"
        extra = f" {m['acc_any_label']:.3f} |" if any_label and "acc_any_label" in m else " - |" if any_label else ""
        lines.append(f"| {name} | {_interval(m, 'acc')} | {_interval(m, 'macro_f1')} | {ece} |{extra}")
    lines += trust_markdown(rows["fine-tuned"], comparison)
    lines += ["", "## Most confused (fine-tuned): true -> predicted", ""]
    lines += [f"- {t} -> {p}: {n}" for t, p, n in confused] or ["- none"]
    lines += [
        "",
        "## Training",
        "",
        f"- {train.get('steps')} steps in {train.get('train_seconds')} s, {train.get('tokens_per_s')} tokens/s "
        f"(real tokens; padding {100 * train.get('padding_fraction', 0):.1f} %), peak memory "
        f"{train.get('peak_memory_mb')} MB",
        f"- data: {data.get('records')} records from {data.get('source')}; train/val/test = "
        f"{data.get('train_examples')}/{data.get('val_examples')}/{data.get('test_examples')}; "
        f"skipped {sum(data.get('skipped', {}).values())} ({data.get('skipped')}); truncated {data.get('truncated')}",
        "",
    ]
    return "\n".join(lines)


def final_report(
    module,
    datamodule,
    output_dir: Path,
    cache_dir: Path,
    report_cfg,
    train_stats: dict,
    precision: str,
    run=None,
    calibration=None,
) -> dict:
    """Evaluate fine-tuned (and zero-shot, TF-IDF), write report.md; returns the numbers for the summary and
    each model's test metrics by name (the fine-tuned model's are training's test metrics on one process)."""
    formatter, pad_id = datamodule.formatter, datamodule.collator.pad_token_id
    records, examples = datamodule.splits["test"], datamodule.examples["test"]
    module.eval()
    tuned = Predictor(
        module.causal_lm, formatter, pad_id, "fine-tuned (best checkpoint)", precision, calibration=calibration
    )
    kept, coverage = {}, float(report_cfg.get("coverage") or 0.9)
    tuned_metrics = evaluate(
        tuned, records, "rank", output_dir, wandb_run=run, prefix="test", coverage=coverage, keep=kept
    )["rank"]
    rows, comparison = {"fine-tuned": tuned_metrics}, None
    if report_cfg.get("zero_shot", True):
        rows["zero-shot"] = zero_shot_metrics(
            module,
            datamodule.zero_shot_formatter(),  # the label list in its system prompt even if training dropped it
            pad_id,
            records,
            examples,
            Path(cache_dir),
            output_dir / "zero_shot",
            precision,
        )
    if report_cfg.get("tfidf", True):
        name = f"TF-IDF + LR ({len(datamodule.splits['train'])} training examples)"
        rows[name], baseline = tfidf_metrics(datamodule.splits, datamodule.labels, output_dir / "tfidf")
        test = mcnemar(baseline.true, kept["rank"].pred, baseline.pred)  # the same rows, in the same order
        comparison = verdict("the fine-tuned model", "TF-IDF + LR", tuned_metrics["acc"], rows[name]["acc"], test)
        tuned_metrics["vs_tfidf"] = {**test, "verdict": comparison}
    confused = most_confused(rows["fine-tuned"], datamodule.labels)
    (output_dir / "report.md").write_text(report_markdown(rows, confused, train_stats, datamodule.stats, comparison))
    summary = {}
    for name, m in rows.items():
        key = name.split(" ")[0].lower()
        summary.update({f"report/{key}/acc": m["acc"], f"report/{key}/macro_f1": m["macro_f1"]})
        for metric in ("acc", "macro_f1"):
            if f"{metric}_interval" in m:
                low, high = m[f"{metric}_interval"]
                summary.update({f"report/{key}/{metric}_low": low, f"report/{key}/{metric}_high": high})
    for key in ("ece_uncalibrated", "ece_floor", "temperature"):
        if key in tuned_metrics:
            summary[f"report/fine-tuned/{key}"] = tuned_metrics[key]
    if "sets" in tuned_metrics:
        summary["report/fine-tuned/set_coverage"] = tuned_metrics["sets"]["coverage"]
        summary["report/fine-tuned/set_size"] = tuned_metrics["sets"]["mean_size"]
    if comparison:
        summary["report/vs_tfidf/p_value"] = tuned_metrics["vs_tfidf"]["p_value"]
        summary["report/vs_tfidf/verdict"] = comparison
    summary["report/most_confused"] = [f"{t} -> {p}: {n}" for t, p, n in confused]
    if run is not None:
        run.summary.update(summary)
    log.info("report: %s", output_dir / "report.md")
    return summary, rows
