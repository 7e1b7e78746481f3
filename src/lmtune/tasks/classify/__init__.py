"""The classify kind: the answer is one label of a label set. Validation rank-scores every label (accuracy,
macro-F1), the report puts the fine-tuned model beside the zero-shot one and TF-IDF + logistic regression, the
export records the label set and the answers' token ids."""

from __future__ import annotations

import logging

from lmtune.model.module import CausalLMClassifier

log = logging.getLogger(__name__)


class Classify:
    name = "classify"

    def module(self, common: dict, datamodule, cfg=None) -> CausalLMClassifier:
        formatter = datamodule.formatter
        return CausalLMClassifier(
            **common,
            labels=formatter.labels,
            answer_ids=formatter.answer_ids,
            prompt_opening=formatter.opening_ids,
            class_weights=class_weights(cfg, datamodule),
        )

    def callbacks(self, cfg) -> list:
        return []  # validation's rank scoring is the module's own

    def calibrate(self, module, datamodule, precision):
        """The temperature and conformal scores (`model/calibration.py`), fitted on the validation split's rank
        scores of the weights that are exported."""
        from lmtune.evaluation.predictor import Predictor, Row
        from lmtune.model.calibration import Calibration

        formatter, records = datamodule.formatter, datamodule.calibration_split(datamodule.calibration_rows)
        if len(records) < 2:
            return None
        module.eval()
        predictor = Predictor(
            module.causal_lm, formatter, datamodule.collator.pad_token_id, "validation split", precision
        )
        scores, _ = predictor.scores([Row(r.fields, r.id) for r in records])
        true = [formatter.labels.index(r.label) for r in records]
        return Calibration.fit(scores, true, f"validation split, {len(records)} rows")

    report_is_test = True  # the report's fine-tuned row is the test evaluation: the split is scored once

    def report(self, module, datamodule, output_dir, cfg, train_stats: dict, precision, run, calibration=None):
        """(the report's summary, its rows by model, the fine-tuned model's test metrics)."""
        from lmtune.evaluation.report import final_report

        summary, rows = final_report(
            module, datamodule, output_dir, cfg.paths.cache_dir, cfg.report, train_stats, precision, run, calibration
        )
        tuned = rows["fine-tuned"]
        return summary, rows, {f"test/{k}": float(tuned[k]) for k in ("loss", "acc", "macro_f1")}

    def export_task(self, formatter, spec, calibration=None) -> tuple[dict, dict]:
        """(what formatting.json records of the task besides the formatter's settings: where a file keeps the
        label and the id; the export's other JSON files: the label set, the calibration)."""
        task = {
            "label_column": list(spec.label) if spec else ["label"],
            "label_is_list": spec.label_is_list if spec else False,
            "id_column": spec.id if spec else "id",
        }
        files = {"labels.json": formatter.labels}
        if calibration is not None:
            files["calibration.json"] = calibration.to_dict()
        return task, files

    def card_inputs(self, summary: dict, report_rows: dict | None, test: dict) -> dict:
        """What the model card reports besides the export's settings: the data, the training and the test results
        (the report's rows beside each other, else the test metrics alone)."""
        shown = ("acc", "macro_f1", "acc_interval", "macro_f1_interval")
        trust = {}
        if report_rows:
            results = {name: {k: m[k] for k in shown if k in m} for name, m in report_rows.items()}
            tuned = report_rows["fine-tuned"]
            per_class = tuned.get("per_class")
            trust = {
                k: tuned[k]
                for k in ("temperature", "ece", "ece_uncalibrated", "ece_floor", "sets", "vs_tfidf")
                if k in tuned
            }
        else:
            results = {"fine-tuned": {"acc": test.get("test/acc"), "macro_f1": test.get("test/macro_f1")}}
            per_class = None
        return {"results": results, "per_class": per_class, "trust": trust}


def class_weights(cfg, datamodule) -> list[float] | None:
    """`loss.class_weights`: null (every example weighs 1) or balanced (n / (labels x count of its label) over the
    training split, as scikit-learn's `class_weight="balanced"`: each label weighs the same in total)."""
    setting = cfg.get("loss", {}).get("class_weights") if cfg is not None else None
    if setting is None:
        return None
    counts = [0] * len(datamodule.labels)
    for label in datamodule.splits["train"].column("label"):
        counts[datamodule.labels.index(label)] += 1
    n, k = sum(counts), len(counts)
    weights = [n / (k * c) if c else 0.0 for c in counts]
    log.info(
        "class weights (balanced): %s",
        ", ".join(f"{lab} {w:.2f}" for lab, w in zip(datamodule.labels, weights, strict=True)),
    )
    return weights


KIND = Classify()
