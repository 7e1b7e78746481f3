"""Predict labels for rows of text with a trained export (or the zero-shot base model), as in training.

The prompt is rebuilt from the export's own tokenizer, label set and prompt templates (`formatting.json`),
and the answer tokens are checked against the ones training used, so a prediction sees exactly the tokens
the model was trained and evaluated on. Probabilities are a softmax over the label set's rank scores
(summed log-probabilities of each label's answer tokens, see `model/scoring.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lmtune.artifacts.checkpoints import load_checkpoint_weights
from lmtune.artifacts.export import load_export_model, load_formatter, read_export
from lmtune.core.progress import Progress
from lmtune.data.formatting import ChatFormatter
from lmtune.model.calibration import ABSTAIN, Calibration, checked_threshold, label_set
from lmtune.model.loading import load_for_inference
from lmtune.model.precision import autocast_for
from lmtune.model.scoring import SharedPrefix, left_pad, rank_scores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One input to classify: the columns the prompt reads, and an id if known."""

    fields: dict[str, str]
    id: str | None = None


@dataclass
class Prediction:
    id: str | None
    shown: dict[str, str]  # the prompt's first column, to recognise the row
    label: str  # the predicted label
    probs: dict[str, float]  # every label, most likely first; sums to 1 (calibrated where the export is)
    truncated: bool = False  # the truncate column was shortened to fit max_length
    label_set: list[str] | None = None  # with a coverage asked: the labels meant to hold the true one that often
    abstained: bool = False  # the top probability was under min_confidence: `label` is "abstain"

    @property
    def category(self) -> str:
        """The predicted label under the name predict's output has always used for it (`"category"`)."""
        return self.label

    def top(self, k: int) -> list[tuple[str, float]]:
        return list(self.probs.items())[:k]

    def to_dict(self) -> dict:
        # `label` as the server and the README name it; `category`, predict's name for it until 2026-12, kept as a
        # deprecated alias for one release
        answer = {"id": self.id, **self.shown, "label": self.label, "category": self.label, "probs": self.probs}
        if self.label_set is not None:
            answer["label_set"] = self.label_set
        return answer


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Predictor:
    """A causal LM and the formatter it was trained with; `predict` ranks the label set for each row."""

    def __init__(
        self,
        causal_lm,
        formatter: ChatFormatter,
        pad_id: int,
        source: str = "",
        precision: str | None = None,
        calibration: Calibration | None = None,
    ):
        self.causal_lm = causal_lm.eval()
        self.calibration = calibration  # the export's temperature and conformal scores; None: plain softmax
        self.formatter = formatter
        self.pad_id = pad_id
        self._opening: SharedPrefix | None = None  # the task's opening, encoded at the first call (weights are fixed)
        self.source = source  # what was loaded, for messages and output files
        # the trainer's precision: a model validated under bf16 autocast is scored under it too, so eval and
        # predict reproduce the numbers training reported (fp32 and bf16 scores differ by ~0.1 nats)
        self.precision = str(precision or "32-true")

    def _autocast(self):
        return autocast_for(self.causal_lm, self.precision)

    @property
    def labels(self) -> list[str]:
        return self.formatter.labels

    @classmethod
    def from_export(
        cls, export: str | Path, cache_dir: str | Path, device: torch.device, base: str | None = None, **kwargs
    ) -> Predictor:
        """Load the base model and the trained adapter (or the full model for adapter=none) of an export;
        `base`: where the base model is (a folder or hub id), when not where the export says."""
        export = read_export(export)
        formatter = load_formatter(export)
        model = load_export_model(export, cache_dir, device, base=base)
        log.info("loaded %s (%s, labels %s) on %s", export.path, export.cfg.adapter.kind, export.labels, device)
        log.info(formatter.chat_format.describe())
        kwargs.setdefault("precision", export.cfg.trainer.get("precision"))
        if export.calibration is not None:
            log.info("calibrated: temperature %.3f (%s)", export.calibration.temperature, export.calibration.fitted_on)
        return cls(
            model,
            formatter,
            formatter.tokenizer.pad_token_id,
            source=str(export.path),
            calibration=export.calibration,
            **kwargs,
        )

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path, cache_dir: str | Path, device: torch.device, **kwargs) -> Predictor:
        """A Lightning checkpoint of a run (e.g. an earlier step than the export): the run's export supplies
        the base model, tokenizer and prompts; the checkpoint's trainable weights replace the exported ones."""
        ckpt = Path(ckpt)
        run_dir = ckpt.parent.parent  # <run>/checkpoints/<name>.ckpt
        predictor = cls.from_export(run_dir, cache_dir, device, **kwargs)
        load_checkpoint_weights(predictor.causal_lm, ckpt, device)
        predictor.source = str(ckpt)
        return predictor

    @classmethod
    def zero_shot(
        cls,
        model_cfg,
        labels: list[str],
        prompt,
        cache_dir: str | Path,
        device: torch.device,
        max_length: int = 512,
        truncate_column: str | None = None,
        **kwargs,
    ) -> Predictor:
        """The base model with the task's prompt (`data.prompt`): the baseline a fine-tuned export is compared to."""
        pretrained, tokenizer, model, precision = load_for_inference(
            model_cfg, cache_dir, device, kwargs.pop("precision", None)
        )
        formatter = ChatFormatter(
            tokenizer,
            sorted(dict.fromkeys(labels)),
            max_length,
            system_prompt=prompt["system"],
            user_template=prompt["user"],
            truncate_column=truncate_column,
            eot_token=model_cfg.get("eot_token"),
            chat_template_kwargs=model_cfg.get("chat_template_kwargs"),
        )
        log.info(formatter.chat_format.describe())
        log.info("zero-shot labels: %s", formatter.labels)
        return cls(
            model, formatter, tokenizer.pad_token_id, source=f"zero-shot {pretrained}", precision=precision, **kwargs
        )

    def scores(self, rows: list[Row]) -> tuple[torch.Tensor, list[bool]]:
        """Rank scores (rows x labels) and whether each row's prompt had to be shortened. Each row is scored on
        its own (`model/scoring.py`): its scores are the same whatever else it is scored with."""
        fitted = self.formatter.fit_prompts([r.fields for r in rows])
        with self._autocast(), Progress(len(rows), f"rank scoring ({self.source})") as progress:
            if self._opening is None:
                self._opening = SharedPrefix.of(self.causal_lm, self.formatter.opening_ids)
            scores = rank_scores(
                self.causal_lm,
                [ids for ids, _ in fitted],
                self.formatter.answer_ids,
                self._opening,
                on_prompt=lambda: progress.advance(1),
            )
        return scores, [truncated for _, truncated in fitted]

    @torch.no_grad()
    def generate(self, rows: list[Row], max_new_tokens: int = 16, batch_size: int = 16) -> list[str]:
        """Greedy answers (text up to the end-of-turn token), for comparing free generation with rank scoring."""
        prompts = [ids for ids, _ in self.formatter.fit_prompts([r.fields for r in rows])]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        device = next(self.causal_lm.parameters()).device
        answers: list[str] = [""] * len(prompts)
        with Progress(len(rows), f"generating ({self.source})") as progress:
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                # left padding: every prompt ends where generation starts
                ids, mask = left_pad([prompts[i] for i in batch], self.pad_id)
                width = ids.shape[1]
                with self._autocast():
                    out = self.causal_lm.generate(
                        input_ids=ids.to(device),
                        attention_mask=mask.to(device),
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        use_cache=True,
                        eos_token_id=self.formatter.eot_id,
                        pad_token_id=self.pad_id,
                    )
                for r, i in enumerate(batch):
                    new = out[r, width:].tolist()
                    if self.formatter.eot_id in new:
                        new = new[: new.index(self.formatter.eot_id)]
                    answers[i] = self.formatter.tokenizer.decode(new, skip_special_tokens=True)
                progress.advance(len(batch))
        return answers

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Rank scores (rows x labels) -> probabilities: the export's temperature applied, if it has one."""
        if self.calibration is not None:
            return self.calibration.probs(scores)
        return torch.softmax(scores.double(), dim=-1)

    def predict(
        self, rows: list[Row], coverage: float | None = None, min_confidence: float | None = None
    ) -> list[Prediction]:
        """The top label and every label's probability per row; with `coverage`, the label set; with
        `min_confidence`, "abstain" where the top probability is under it."""
        threshold = checked_threshold(self.calibration, coverage, min_confidence, self.source)
        if not rows:
            return []
        scores, truncated = self.scores(rows)
        probs = self.probabilities(scores)
        first = self.formatter.columns[0]
        predictions = []
        for row, p, cut in zip(rows, probs.tolist(), truncated, strict=True):
            ranked = sorted(zip(self.labels, p, strict=True), key=lambda kv: -kv[1])
            unsure = min_confidence is not None and ranked[0][1] < min_confidence
            predictions.append(
                Prediction(
                    row.id,
                    {first: row.fields[first]},
                    ABSTAIN if unsure else ranked[0][0],
                    dict(ranked),
                    cut,
                    label_set(p, self.labels, threshold) if threshold is not None else None,
                    unsure,
                )
            )
        return predictions
