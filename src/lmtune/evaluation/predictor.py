"""Predict labels for rows of text with a trained export (or the zero-shot base model), as in training.

The prompt is rebuilt from the export's own tokenizer, label set and prompt templates (`formatting.json`),
and the answer tokens are checked against the ones training used, so a prediction sees exactly the tokens
the model was trained and evaluated on. Probabilities are a softmax over the label set's rank scores
(summed log-probabilities of each label's answer tokens, see `scoring.py`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtune.data.formatting import ChatFormatter
from lmtune.errors import UserError
from lmtune.evaluation.scoring import left_pad, rank_scores
from lmtune.model.loading import load_base_model, load_tokenizer, resolve_pretrained
from lmtune.utils.export import read_formatting
from lmtune.utils.hardware import AUTO, frozen_dtype, resolve_precision
from lmtune.utils.progress import Progress

log = logging.getLogger(__name__)

EXPORT_FILES = ("labels.json", "formatting.json", "config.yaml")


@dataclass(frozen=True)
class Row:
    """One input to classify: the columns the prompt reads (e.g. title and abstract), and an id if known."""

    fields: dict[str, str]
    id: str | None = None


@dataclass
class Prediction:
    id: str | None
    shown: dict[str, str]  # the prompt's first column, to recognise the row (arXiv: its title)
    category: str  # the predicted label
    probs: dict[str, float]  # every label, most likely first; sums to 1
    truncated: bool = False  # the truncate column was shortened to fit max_length

    def top(self, k: int) -> list[tuple[str, float]]:
        return list(self.probs.items())[:k]

    def to_dict(self) -> dict:
        return {"id": self.id, **self.shown, "category": self.category, "probs": self.probs}


def find_export(path: str | Path) -> Path:
    """The export folder from itself or from its run folder; a clear error for anything else."""
    path = Path(path)
    for candidate in (path, path / "export"):
        if all((candidate / name).is_file() for name in EXPORT_FILES):
            return candidate
    if path.suffix == ".ckpt":
        hint = f"use the export folder of that run instead: {path.parent.parent / 'export'}"
    else:
        hint = "give the export/ folder that train.py writes into its run folder, or ckpt=null for zero-shot"
    raise UserError(f"ckpt={path}: not a trained export (needs {', '.join(EXPORT_FILES)}); {hint}.")


def export_and_checkpoint(ckpt: str | Path) -> tuple[Path, Path | None]:
    """`ckpt=` as eval and the merged export take it: an export or run folder, or a `.ckpt` of a run (whose
    export supplies the rest). Returns the export folder and the checkpoint, if one was given."""
    path = Path(ckpt)
    if path.suffix != ".ckpt":
        return find_export(path), None
    if not path.is_file():
        raise UserError(f"ckpt={path}: checkpoint not found.")
    return find_export(path.parent.parent), path


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_export_model(export: Path, cfg, formatting: dict, cache_dir, device: torch.device, quantized: bool = True):
    """The export's model: the full model for adapter=none (and merged exports), else its base with the adapter.
    `quantized=False` loads a QLoRA run's base unquantized, in `cfg.model.dtype` (what a merged export needs)."""
    if cfg.adapter.kind == "none":  # a fully fine-tuned or merged model is the export itself
        return AutoModelForCausalLM.from_pretrained(export, dtype=getattr(torch, cfg.model.dtype)).to(device)
    from peft import PeftModel

    base_path = formatting.get("base_model")
    if not base_path or not Path(base_path).is_dir():  # trained elsewhere: rebuild from the config
        base_path = resolve_pretrained(cfg.model, cache_dir)
    quant = cfg.adapter.get("quantization") if quantized else None
    base = load_base_model(base_path, cfg.model, quant, device)
    return PeftModel.from_pretrained(base if quant else base.to(device), export)


def load_checkpoint_weights(model, ckpt: Path, device: torch.device) -> None:
    """Replace the trainable weights of `model` (its run's export) with those of a Lightning checkpoint."""
    trained = torch.load(ckpt, map_location=device, weights_only=False)["state_dict"]
    weights = {k.removeprefix("model."): v for k, v in trained.items()}
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys or not weights:
        raise UserError(
            f"{ckpt}: its weights do not fit the model of {ckpt.parent.parent / 'export'} "
            f"(unexpected: {result.unexpected_keys[:3]}); evaluate a checkpoint together with its own run."
        )


class Predictor:
    """A causal LM and the formatter it was trained with; `predict` ranks the label set for each row."""

    def __init__(
        self,
        causal_lm,
        formatter: ChatFormatter,
        pad_id: int,
        max_rows: int = 64,
        source: str = "",
        precision: str | None = None,
    ):
        self.causal_lm = causal_lm.eval()
        self.formatter = formatter
        self.pad_id = pad_id
        self.max_rows = max_rows
        self.source = source  # what was loaded, for messages and output files
        # the trainer's precision: a model validated under bf16 autocast is scored under it too, so eval and
        # predict reproduce the numbers training reported (fp32 and bf16 scores differ by ~0.1 nats)
        self.precision = str(precision or "32-true")

    def _autocast(self):
        device = next(self.causal_lm.parameters()).device
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.precision)
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    @property
    def labels(self) -> list[str]:
        return self.formatter.labels

    @classmethod
    def from_export(cls, export: str | Path, cache_dir: str | Path, device: torch.device, **kwargs) -> Predictor:
        """Load the base model and the trained adapter (or the full model for adapter=none) of an export."""
        export = find_export(export)
        cfg = OmegaConf.load(export / "config.yaml")
        formatting = read_formatting(export)
        labels = json.loads((export / "labels.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(export)
        formatter = ChatFormatter(
            tokenizer,
            labels,
            formatting["max_length"],
            system_prompt=formatting["system_prompt"],
            user_template=formatting["user_template"],
            truncate_column=formatting["truncate_column"],
            eot_token=formatting.get("eot_token"),
            chat_template_kwargs=formatting.get("chat_template_kwargs"),  # absent in early exports
        )
        if formatter.answer_ids != formatting["answer_ids"]:
            raise UserError(
                f"{export}: the exported tokenizer gives other answer tokens than training did "
                f"({formatter.answer_ids} vs {formatting['answer_ids']}); the export was modified or the "
                f"tokenizers library changed how it tokenizes. Re-export with this environment."
            )
        model = load_export_model(export, cfg, formatting, cache_dir, device)
        log.info("loaded %s (%s, labels %s) on %s", export, cfg.adapter.kind, labels, device)
        log.info(formatter.chat_format.describe())
        kwargs.setdefault("precision", cfg.trainer.get("precision"))
        return cls(model, formatter, tokenizer.pad_token_id, source=str(export), **kwargs)

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path, cache_dir: str | Path, device: torch.device, **kwargs) -> Predictor:
        """A Lightning checkpoint of a run (e.g. an earlier step than the export): the run's export supplies
        the base model, tokenizer and prompts; the checkpoint's trainable weights replace the exported ones."""
        ckpt = Path(ckpt)
        run_dir = ckpt.parent.parent  # <run>/checkpoints/<name>.ckpt
        predictor = cls.from_export(find_export(run_dir), cache_dir, device, **kwargs)
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
        pretrained = resolve_pretrained(model_cfg, cache_dir)
        tokenizer = load_tokenizer(pretrained, model_cfg.get("pad_token"), model_cfg.get("chat_template"))
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
        # nothing trains here: `auto` precision and dtype are decided for this device as training would
        precision, _, _ = resolve_precision(kwargs.pop("precision", None) or AUTO, device.type, cache_dir)
        dtype = frozen_dtype(model_cfg.get("dtype") or "float32", precision, "lora")
        model = load_base_model(pretrained, {**dict(model_cfg), "dtype": dtype}, None, device).to(device)
        log.info(formatter.chat_format.describe())
        log.info(
            "zero-shot: base model %s (%s, %s), labels %s, on %s",
            pretrained,
            dtype,
            precision,
            formatter.labels,
            device,
        )
        return cls(
            model, formatter, tokenizer.pad_token_id, source=f"zero-shot {pretrained}", precision=precision, **kwargs
        )

    def scores(self, rows: list[Row]) -> tuple[torch.Tensor, list[bool]]:
        """Rank scores (rows x labels) and whether each row's prompt had to be shortened."""
        fitted = self.formatter.fit_prompts([r.fields for r in rows])
        prompts = [ids for ids, _ in fitted]
        # similar lengths together: less left padding inside each scoring chunk
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        with self._autocast(), Progress(len(rows), f"rank scoring ({self.source})") as progress:
            sorted_scores = rank_scores(
                self.causal_lm,
                [prompts[i] for i in order],
                self.formatter.answer_ids,
                self.pad_id,
                self.max_rows,
                on_chunk=progress.advance,
            )
        scores = torch.empty_like(sorted_scores)
        scores[order] = sorted_scores
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

    def predict(self, rows: list[Row]) -> list[Prediction]:
        if not rows:
            return []
        scores, truncated = self.scores(rows)
        probs = torch.softmax(scores.double(), dim=-1)
        first = self.formatter.columns[0]
        predictions = []
        for row, p, cut in zip(rows, probs.tolist(), truncated, strict=True):
            ranked = sorted(zip(self.labels, p, strict=True), key=lambda kv: -kv[1])
            predictions.append(Prediction(row.id, {first: row.fields[first]}, ranked[0][0], dict(ranked), cut))
        return predictions
