"""The generate kind: free-form answers and whole conversations (`data=chat`). Validation and test measure the
answers' loss and perplexity (every supervised token); the report has the fine-tuned and zero-shot models write the
test split's answers (exact match, chrF, ROUGE-L, examples); the export records how a conversation is built."""

from __future__ import annotations

from lmtune.model.module import CausalLMModule


class Generate:
    name = "generate"

    def module(self, common: dict, datamodule, cfg=None) -> CausalLMModule:
        return CausalLMModule(**common)

    def callbacks(self, cfg) -> list:
        """Answers written at each validation (`val_answers.count`), scored as val/chrf, val/rougeL, val/exact_match."""
        settings = cfg.get("val_answers") or {}
        if not settings.get("count"):
            return []
        from lmtune.tasks.generate.validation import ValidationAnswers

        return [ValidationAnswers(settings["count"], settings.get("max_new_tokens") or 64)]

    report_is_test = False  # the report adds generation metrics; the test loss comes from a test pass

    def calibrate(self, module, datamodule, precision):
        return None  # written answers have no label probabilities to calibrate

    def report(self, module, datamodule, output_dir, cfg, train_stats: dict, precision, run, calibration=None):
        """The fine-tuned and zero-shot models' answers on the test split (`report.py`)."""
        from lmtune.tasks.generate.report import generation_report

        return generation_report(module, datamodule, output_dir, cfg, train_stats, precision, run)

    def export_task(self, formatter, spec, calibration=None) -> tuple[dict, dict]:
        """(what formatting.json records besides the formatter's settings: the id column; no other files)."""
        return {"id_column": spec.id if spec else "id"}, {}

    def card_inputs(self, summary: dict, report_rows: dict | None, test: dict) -> dict:
        """The model card's results: the report's models beside each other, else the test metrics alone."""
        if report_rows:
            results = {name: dict(m) for name, m in reversed(report_rows.items())}  # fine-tuned first
        else:
            results = {"fine-tuned": {k.removeprefix("test/"): v for k, v in test.items()}}
        return {"results": results}


KIND = Generate()
