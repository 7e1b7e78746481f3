"""`predict(cfg)`: categories for papers given by arXiv id, by title + abstract, or in a JSONL file.

Inputs are checked and papers fetched from the arXiv API before the model is loaded, so a typo in an id
or an API outage fails in seconds. In a batch file, each line is either a paper (`title` + `abstract`,
optional `id` and `primary_category`) or just an arXiv `id` to fetch; ids arXiv does not know get an
`error` line in the output (and are counted) instead of stopping the other papers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from lmtune.data.arxiv_api import ArxivClient, fetch_by_ids, normalize_id
from lmtune.data.records import DataError, iter_jsonl_lines
from lmtune.errors import UserError
from lmtune.evaluation.predictor import Paper, Prediction, Predictor, pick_device
from lmtune.utils.files import atomic_write

log = logging.getLogger(__name__)


@dataclass
class BatchItem:
    """One line of a batch file: a paper to predict, or the reason it cannot be."""

    line: int
    paper: Paper | None = None
    arxiv_id: str | None = None  # to fetch
    true: str | None = None
    error: str | None = None


def verbatim_ids(overrides: list[str]) -> str | list[str] | None:
    """`arxiv_id` exactly as typed: Hydra reads `arxiv_id=2401.01230` as the float 2401.0123, losing a digit."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key.lstrip("+~") == "arxiv_id":
            value = value.strip()
            if value.startswith("[") and value.endswith("]"):
                return [v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip()]
            return value.strip("'\"")
    return None


def _client(cfg: DictConfig) -> ArxivClient:
    return ArxivClient(**OmegaConf.to_container(cfg.arxiv, resolve=True))


def _normalize(text: str, where: str) -> str:
    try:
        return normalize_id(str(text))
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def _fetch(client: ArxivClient, ids: list[str]) -> dict[str, Paper]:
    records = fetch_by_ids(client, ids)
    return {i: Paper(r.title, r.abstract, r.id) for i, r in records.items()}


def papers_by_id(cfg: DictConfig) -> list[Paper]:
    """`arxiv_id=2401.01234` (or a list): every id must exist on arXiv."""
    raw = cfg.arxiv_id if isinstance(cfg.arxiv_id, ListConfig | list) else [cfg.arxiv_id]
    ids = [_normalize(i, f"arxiv_id={i}") for i in raw]
    found = _fetch(_client(cfg), ids)
    unknown = [i for i in ids if i not in found]
    if unknown:
        raise UserError(
            f"arXiv has no paper with id {', '.join(unknown)} (asked {cfg.arxiv.base_url}); check the id, "
            f"or give the text with title=... abstract=..."
        )
    return [found[i] for i in ids]


def read_batch(cfg: DictConfig, path: Path) -> list[BatchItem]:
    """The papers of a JSONL batch file; ids without text are fetched from the arXiv API in one go."""
    if not path.is_file():
        raise DataError(f"input={path}: file not found; give a JSONL file with one paper per line.")
    items = []
    for line, row in iter_jsonl_lines(path):
        title, abstract = (" ".join(str(row.get(k) or "").split()) for k in ("title", "abstract"))
        raw_id = row.get("id") or row.get("arxiv_id")
        true = row.get("primary_category")
        if title and abstract:
            items.append(BatchItem(line, Paper(title, abstract, str(raw_id) if raw_id else None), true=true))
        elif raw_id:
            items.append(BatchItem(line, arxiv_id=_normalize(raw_id, f"{path}:{line}"), true=true))
        else:
            raise DataError(
                f"{path}:{line}: needs `title` and `abstract`, or an arXiv `id` to fetch them; found {sorted(row)}."
            )
    if not items:
        raise DataError(f"input={path}: the file has no papers.")
    to_fetch = [item.arxiv_id for item in items if item.arxiv_id]
    if to_fetch:
        found = _fetch(_client(cfg), to_fetch)
        for item in items:
            if item.arxiv_id:
                item.paper = found.get(item.arxiv_id)
                if item.paper is None:
                    item.error = f"arXiv has no paper with id {item.arxiv_id}"
    return items


def load_predictor(cfg: DictConfig) -> Predictor:
    device = pick_device(cfg.device)
    options = {"max_rows": cfg.max_rows}
    if cfg.precision != "auto":
        options["precision"] = cfg.precision
    if cfg.ckpt:
        return Predictor.from_export(cfg.ckpt, cfg.paths.cache_dir, device, **options)
    if not cfg.labels:
        raise UserError("ckpt=null (zero-shot) needs a label set: labels=[cs.CL,cs.CV,...].")
    return Predictor.zero_shot(cfg.model, list(cfg.labels), cfg.paths.cache_dir, device, cfg.max_length, **options)


def format_text(prediction: Prediction, top_k: int) -> str:
    name = prediction.id or "paper"
    lines = [f"{name}: {prediction.category}    {prediction.title}"]
    lines += [f"    {label:<12} {p:.3f}" for label, p in prediction.top(top_k)]
    if prediction.truncated:
        lines.append("    (abstract shortened to fit max_length, as in training)")
    return "\n".join(lines)


def predict_batch(cfg: DictConfig, emit) -> list[Prediction]:
    path = Path(cfg.input)
    items = read_batch(cfg, path)
    predictor = load_predictor(cfg)
    ready = [n for n, item in enumerate(items) if item.paper is not None]
    predictions = dict(zip(ready, predictor.predict([items[n].paper for n in ready]), strict=True))
    rows = []
    for n, item in enumerate(items):
        if item.error:
            rows.append({"line": item.line, "id": item.arxiv_id, "error": item.error})
            continue
        row = predictions[n].to_dict()
        if item.true is not None:
            row["true"] = item.true
        rows.append(row)
    out = Path(cfg.output) if cfg.output else path.with_name(f"{path.stem}.predictions.jsonl")
    atomic_write(out, lambda f: f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    labelled = [r for r in rows if "true" in r and r["true"] in predictor.labels]
    if labelled:
        correct = sum(r["true"] == r["category"] for r in labelled)
        emit(f"accuracy on {len(labelled)} labelled papers: {correct / len(labelled):.3f}")
    errors = [r for r in rows if "error" in r]
    emit(f"wrote {len(rows) - len(errors)} predictions to {out} ({predictor.source})")
    if errors:
        raise UserError(
            f"{len(errors)} of {len(rows)} papers in {path} could not be predicted "
            f"({'; '.join(r['error'] for r in errors[:5])}); their lines in {out} carry an `error` field."
        )
    return list(predictions.values())


def predict(cfg: DictConfig, emit=print) -> list[Prediction]:
    """Run one prediction request; `emit` receives what the user should see (stdout in the CLI)."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise UserError("ckpt= is required: a trained export folder (logs/train/runs/<run>/export), or ckpt=null.")
    given = [name for name in ("arxiv_id", "input") if cfg.get(name)]
    if cfg.get("title") or cfg.get("abstract"):
        given.append("title/abstract")
    if len(given) != 1:
        raise UserError(
            "give exactly one of: arxiv_id=2401.01234 | title='...' abstract='...' | input=papers.jsonl"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if cfg.format not in ("text", "json"):
        raise UserError(f"format={cfg.format!r}: use format=text or format=json.")
    if given == ["input"]:
        return predict_batch(cfg, emit)
    if given == ["arxiv_id"]:
        papers = papers_by_id(cfg)
    else:
        if not (cfg.get("title") and cfg.get("abstract")):
            raise UserError("text input needs both title='...' and abstract='...'.")
        papers = [Paper(" ".join(str(cfg.title).split()), " ".join(str(cfg.abstract).split()))]
    predictions = load_predictor(cfg).predict(papers)
    for prediction in predictions:
        emit(
            json.dumps(prediction.to_dict(), ensure_ascii=False)
            if cfg.format == "json"
            else format_text(prediction, cfg.top_k)
        )
    return predictions
