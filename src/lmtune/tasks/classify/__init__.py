"""The classify kind: the answer is one label of a label set. Validation rank-scores every label (accuracy,
macro-F1), the report puts the fine-tuned model beside the zero-shot one and TF-IDF + logistic regression, the
export records the label set and the answers' token ids."""

from __future__ import annotations

from lmtune.model.module import CausalLMClassifier


class Classify:
    name = "classify"

    def module(self, common: dict, datamodule) -> CausalLMClassifier:
        formatter = datamodule.formatter
        return CausalLMClassifier(
            **common,
            labels=formatter.labels,
            answer_ids=formatter.answer_ids,
            prompt_opening=formatter.opening_ids,
        )

    def callbacks(self, cfg) -> list:
        return []  # validation's rank scoring is the module's own

    report_is_test = True  # the report's fine-tuned row is the test evaluation: the split is scored once

    def report(self, module, datamodule, output_dir, cfg, train_stats: dict, precision, run):
        """(the report's summary, its rows by model, the fine-tuned model's test metrics)."""
        from lmtune.evaluation.report import final_report

        summary, rows = final_report(
            module, datamodule, output_dir, cfg.paths.cache_dir, cfg.report, train_stats, precision, run
        )
        tuned = rows["fine-tuned"]
        return summary, rows, {f"test/{k}": float(tuned[k]) for k in ("loss", "acc", "macro_f1")}

    def export_task(self, formatter, spec) -> tuple[dict, dict]:
        """(what formatting.json records of the task besides the formatter's settings: where a file keeps the
        label and the id; the export's other JSON files: the label set)."""
        task = {
            "label_column": list(spec.label) if spec else ["label"],
            "label_is_list": spec.label_is_list if spec else False,
            "id_column": spec.id if spec else "id",
        }
        return task, {"labels.json": formatter.labels}

    def card_inputs(self, summary: dict, report_rows: dict | None, test: dict) -> dict:
        """What the model card reports besides the export's settings: the data, the training and the test results
        (the report's rows beside each other, else the test metrics alone)."""
        if report_rows:
            results = {name: {"acc": m["acc"], "macro_f1": m["macro_f1"]} for name, m in report_rows.items()}
            per_class = report_rows["fine-tuned"].get("per_class")
        else:
            results = {"fine-tuned": {"acc": test.get("test/acc"), "macro_f1": test.get("test/macro_f1")}}
            per_class = None
        return {"results": results, "per_class": per_class}


KIND = Classify()
