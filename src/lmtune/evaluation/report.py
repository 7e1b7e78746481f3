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
from lmtune.evaluation.metrics import most_confused
from lmtune.evaluation.modes import evaluate
from lmtune.evaluation.predictor import Predictor
from lmtune.model.loading import load_base_model

log = logging.getLogger(__name__)


def zero_shot_key(pretrained: str, model_cfg: dict, quant_cfg: dict | None, formatter, examples, precision) -> str:
    spec = {
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


def tfidf_metrics(splits: dict, labels: list[str], out_dir: Path) -> dict:
    from lmtune.evaluation.tfidf import evaluate_tfidf

    return evaluate_tfidf(splits["train"], splits["test"], labels, out_dir)[1]


def report_markdown(rows: dict[str, dict], confused: list, train: dict, data: dict) -> str:
    lines = [
        "# Report",
        "",
        f"Test split: {data.get('test_examples')} examples, labels {', '.join(data.get('labels', []))}.",
        "",
        "| model | accuracy | macro-F1 | ECE |",
        "|---|---:|---:|---:|",
    ]
    for name, m in rows.items():
        ece = f"{m['ece']:.3f}" if "ece" in m else "-"
        lines.append(f"| {name} | {m['acc']:.4f} | {m['macro_f1']:.4f} | {ece} |")
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
    module, datamodule, output_dir: Path, cache_dir: Path, report_cfg, train_stats: dict, precision: str, run=None
) -> dict:
    """Evaluate fine-tuned (and zero-shot, TF-IDF), write report.md; returns the numbers for the summary and
    each model's test metrics by name (the fine-tuned model's are training's test metrics on one process)."""
    formatter, pad_id = datamodule.formatter, datamodule.collator.pad_token_id
    records, examples = datamodule.splits["test"], datamodule.examples["test"]
    module.eval()
    tuned = Predictor(module.causal_lm, formatter, pad_id, source="fine-tuned (best checkpoint)", precision=precision)
    rows = {"fine-tuned": evaluate(tuned, records, "rank", output_dir, wandb_run=run, prefix="test")["rank"]}
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
        rows[f"TF-IDF + LR ({len(datamodule.splits['train'])} training examples)"] = tfidf_metrics(
            datamodule.splits, datamodule.labels, output_dir / "tfidf"
        )
    confused = most_confused(rows["fine-tuned"], datamodule.labels)
    (output_dir / "report.md").write_text(report_markdown(rows, confused, train_stats, datamodule.stats))
    summary = {}
    for name, m in rows.items():
        key = name.split(" ")[0].lower()
        summary.update({f"report/{key}/acc": m["acc"], f"report/{key}/macro_f1": m["macro_f1"]})
    summary["report/most_confused"] = [f"{t} -> {p}: {n}" for t, p, n in confused]
    if run is not None:
        run.summary.update(summary)
    log.info("report: %s", output_dir / "report.md")
    return summary, rows
