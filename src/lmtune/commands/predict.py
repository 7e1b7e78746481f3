"""`predict(cfg)`: labels for rows given in a file, in one row on the command line, or (arXiv) by arXiv id
(fetched by `arxiv.lookup`).

The task (the columns the prompt reads, where a file keeps the id and the true label) comes from the export's
formatting.json, or from `data` for zero-shot, so a file is checked line by line before the model is loaded: a
typo in a column name, an id or an API outage fails in seconds. A batch file is JSONL, CSV or Parquet (`.gz`
too) with the prompt's columns; for arXiv (a prompt over title and abstract) a line may instead give just an
arXiv `id` to fetch, and ids arXiv does not know get an `error` line in the output (and are counted) instead of
stopping the other rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from lmtune.artifacts.export import export_and_checkpoint, read_export
from lmtune.arxiv.lookup import canonical_id, fetch_texts, fetchable, texts_by_id
from lmtune.core.errors import DataError, UserError
from lmtune.core.files import atomic_write
from lmtune.data.formatting import template_columns
from lmtune.data.records import RecordSpec, clean_text, iter_jsonl, iter_jsonl_lines, reader_for, rename_columns
from lmtune.evaluation.predictor import Prediction, Predictor, Row, pick_device
from lmtune.model.calibration import ABSTAIN, checked_threshold

log = logging.getLogger(__name__)


@dataclass
class BatchItem:
    """One row of a batch file: a row to predict, or the reason it cannot be."""

    where: str
    row: Row | None = None
    fetch_id: str | None = None  # an id whose text is fetched (arXiv)
    true: str | None = None
    error: str | None = None


def task_spec(cfg: DictConfig) -> RecordSpec:
    """The task of the export (`ckpt=`) or, zero-shot, of `data`: prompt columns, label, id and renamed columns."""
    if cfg.ckpt:
        export = read_export(cfg.ckpt)  # checked before anything is read or loaded
        formatting, data = export.formatting, export.cfg.get("data") or {}
        user, label, is_list, id_column = (
            formatting[k] for k in ("user_template", "label_column", "label_is_list", "id_column")
        )
    else:
        data = cfg.data
        user, label, is_list, id_column = data.prompt.user, data.label_column, data.label_is_list, data.id_column
    columns = template_columns(user, "data.prompt.user")
    label = [label] if isinstance(label, str) else list(label)
    rename = OmegaConf.to_container(data["columns"]) if data.get("columns") else None
    return RecordSpec.of(columns, label, id_column, is_list, rename)


def _fetch_settings(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.arxiv, resolve=True)


def rows_by_id(cfg: DictConfig, spec: RecordSpec) -> list[Row]:
    """`arxiv_id=2401.01234` (or a list): every id must exist on arXiv."""
    raw = list(cfg.arxiv_id) if isinstance(cfg.arxiv_id, ListConfig | list) else [cfg.arxiv_id]
    return [Row(fields, id_) for id_, fields in texts_by_id(_fetch_settings(cfg), raw, list(spec.text))]


def row_from_command_line(cfg: DictConfig, spec: RecordSpec) -> Row:
    """`row={subject: ..., body: ...}`, or the `title=... abstract=...` shortcut (arXiv's columns)."""
    given = dict(OmegaConf.to_container(cfg.row)) if cfg.get("row") else {}
    for shortcut in ("title", "abstract"):
        if cfg.get(shortcut):
            given[shortcut] = cfg[shortcut]
    fields = {column: clean_text(given.get(column)) for column in spec.text}
    missing = [column for column, value in fields.items() if not value]
    if missing:
        example = ", ".join(f"{c}: '...'" for c in spec.text)
        raise UserError(
            f"the row needs {', '.join(spec.text)} (the columns the prompt reads); missing or empty: "
            f"{', '.join(missing)}. Give row='{{{example}}}'"
            + (" or title='...' abstract='...'." if fetchable(spec.text) else ".")
        )
    return Row(fields)


def numbered_rows(path: Path, spec: RecordSpec) -> Iterator[tuple[str, dict]]:
    """(`file:line` or `file: row N`, row) for every row of a JSONL, CSV or Parquet file (`.gz` too)."""
    reader = reader_for(path)
    if reader is iter_jsonl:  # line numbers, as the file shows them
        for line, row in iter_jsonl_lines(path):
            yield f"{path}:{line}", row
        return
    # no column is required of the file as a whole: a row may give an id to fetch instead of the text
    for n, row in enumerate(reader(path, RecordSpec(text=(), label=())), start=1):
        yield f"{path}: row {n}", row


def read_batch(cfg: DictConfig, path: Path, spec: RecordSpec) -> list[BatchItem]:
    """The rows of a batch file; ids without text (arXiv) are fetched in one go."""
    if not path.is_file():
        raise DataError(
            f"input={path}: file not found; give a JSONL, CSV or Parquet file with the columns {', '.join(spec.text)}."
        )
    by_id = fetchable(spec.text)
    items = []
    for where, raw in numbered_rows(path, spec):
        raw = rename_columns(raw, spec.rename)
        fields = {column: clean_text(raw.get(column)) for column in spec.text}
        raw_id = clean_text(raw.get(spec.id)) or (clean_text(raw.get("arxiv_id")) if by_id else "")
        true = spec.label_of(raw) or None
        if all(fields.values()):
            items.append(BatchItem(where, Row(fields, raw_id or None), true=true))
        elif by_id and raw_id:
            items.append(BatchItem(where, fetch_id=canonical_id(raw_id, where), true=true))
        else:
            missing = [c for c, v in fields.items() if not v]
            also = ", or an arXiv `id` to fetch them" if by_id else ""
            raise DataError(
                f"{where}: needs {', '.join(f'`{c}`' for c in spec.text)} (the columns the prompt reads){also}; "
                f"missing or empty: {', '.join(missing)}; the row has {sorted(raw)}."
            )
    if not items:
        raise DataError(f"input={path}: the file has no rows.")
    to_fetch = [item.fetch_id for item in items if item.fetch_id]
    if to_fetch:
        found = fetch_texts(_fetch_settings(cfg), to_fetch)
        for item in items:
            if item.fetch_id:
                if item.fetch_id in found:
                    item.row = Row(found[item.fetch_id], item.fetch_id)
                else:
                    item.error = f"arXiv has no paper with id {item.fetch_id}"
    return items


def load_predictor(cfg: DictConfig) -> Predictor:
    device = pick_device(cfg.device)
    options = {}
    if cfg.precision != "auto":
        options["precision"] = cfg.precision
    if cfg.ckpt:
        return Predictor.from_export(cfg.ckpt, cfg.paths.cache_dir, device, base=cfg.get("base"), **options)
    if not cfg.labels:
        raise UserError("ckpt=null (zero-shot) needs a label set: labels=[cs.CL,cs.CV,...].")
    prompt = OmegaConf.to_container(cfg.data.prompt)
    prompt["system"] = prompt.get("zero_shot_system") or prompt["system"]  # the base model needs the label list
    return Predictor.zero_shot(
        cfg.model,
        list(cfg.labels),
        prompt,
        cfg.paths.cache_dir,
        device,
        cfg.max_length,
        cfg.data.get("truncate_column"),
        **options,
    )


def trust_options(cfg: DictConfig) -> dict:
    """`coverage` (label sets) and `min_confidence` (abstention), checked against the export before a model loads."""
    options = {"coverage": cfg.get("coverage"), "min_confidence": cfg.get("min_confidence")}
    calibration = read_export(cfg.ckpt).calibration if cfg.ckpt else None
    checked_threshold(calibration, *options.values(), str(cfg.ckpt or "the zero-shot base model"))
    return options


def format_text(prediction: Prediction, top_k: int, truncate_column: str | None) -> str:
    name = prediction.id or "row"
    shown = next(iter(prediction.shown.values()), "")
    lines = [f"{name}: {prediction.label}    {shown}"]
    if prediction.label_set is not None:
        lines.append(f"    label set: {', '.join(prediction.label_set)}")
    lines += [f"    {label:<12} {p:.3f}" for label, p in prediction.top(top_k)]
    if prediction.truncated:
        lines.append(f"    ({truncate_column or 'the longest column'} shortened to fit max_length, as in training)")
    return "\n".join(lines)


def predict_batch(cfg: DictConfig, spec: RecordSpec, emit) -> list[Prediction]:
    path = Path(cfg.input)
    items = read_batch(cfg, path, spec)
    options = trust_options(cfg)
    predictor = load_predictor(cfg)
    ready = [n for n, item in enumerate(items) if item.row is not None]
    predictions = dict(zip(ready, predictor.predict([items[n].row for n in ready], **options), strict=True))
    rows = []
    for n, item in enumerate(items):
        if item.error:
            rows.append({"where": item.where, "id": item.fetch_id, "error": item.error})
            continue
        row = predictions[n].to_dict()
        if item.true is not None:
            row["true"] = item.true
        rows.append(row)
    labelled = [r for r in rows if "true" in r and r["true"] in predictor.labels]
    answered = [r for r in labelled if r["label"] != ABSTAIN]
    if answered:
        correct = sum(r["true"] == r["label"] for r in answered)
        abstained = (
            f" ({len(labelled) - len(answered)} abstained, not counted)" if len(answered) < len(labelled) else ""
        )
        emit(f"accuracy on {len(answered)} labelled rows: {correct / len(answered):.3f}{abstained}")
    write_result_rows(path, cfg.output, "predictions", "predicted", rows, predictor.source, emit)
    return list(predictions.values())


def write_result_rows(path: Path, output, what: str, verb: str, rows: list[dict], source: str, emit) -> Path:
    """`<stem>.<what>.jsonl` beside the input (or `output`), one line per input row, written whole; rows that
    failed keep their line with an `error` field and make the command end with status 1 after writing."""
    stem = path.name.removesuffix(".gz").rsplit(".", 1)[0]
    out = Path(output) if output else path.with_name(f"{stem}.{what}.jsonl")
    atomic_write(out, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    errors = [r for r in rows if "error" in r]
    emit(f"wrote {len(rows) - len(errors)} {what} to {out} ({source})")
    if errors:
        raise UserError(
            f"{len(errors)} of {len(rows)} rows in {path} could not be {verb} "
            f"({'; '.join(r['error'] for r in errors[:5])}); their lines in {out} carry an `error` field."
        )
    return out


def writes_answers(ckpt, data_cfg) -> bool:
    """Whether the model writes answers (a generate export or run checkpoint, or zero-shot with data=chat) rather
    than labels."""
    if ckpt:
        return read_export(export_and_checkpoint(ckpt)[0]).kind == "generate"
    return str(data_cfg.get("_target_", "")).endswith(".ChatDataModule")


def predict(cfg: DictConfig, emit=print) -> list[Prediction]:
    """Run one prediction request; `emit` receives what the user should see (stdout in the CLI)."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise UserError(
            "ckpt= is required: a trained export folder (logs/train/runs/<run>/export), a merged export, or ckpt=null."
        )
    given = [name for name in ("arxiv_id", "input", "row", "message") if cfg.get(name)]
    if cfg.get("title") or cfg.get("abstract"):
        given.append("title/abstract")
    if cfg.format not in ("text", "json"):
        raise UserError(f"format={cfg.format!r}: use format=text or format=json.")
    if writes_answers(cfg.ckpt, cfg.data):
        from lmtune.commands.predict_answers import predict_answers

        return predict_answers(cfg, given, emit)
    if "message" in given:
        raise UserError("message= is for a model trained on conversations (data=chat); this one classifies: row={...}.")
    if len(given) != 1:
        raise UserError(
            "give exactly one of: input=rows.jsonl | row='{text: ...}' | title='...' abstract='...' | "
            "arxiv_id=2401.01234" + (f" (got {', '.join(given)})" if given else "")
        )
    spec = task_spec(cfg)
    if given == ["input"]:
        return predict_batch(cfg, spec, emit)
    rows = rows_by_id(cfg, spec) if given == ["arxiv_id"] else [row_from_command_line(cfg, spec)]
    options = trust_options(cfg)
    predictor = load_predictor(cfg)
    predictions = predictor.predict(rows, **options)
    for prediction in predictions:
        emit(
            json.dumps(prediction.to_dict(), ensure_ascii=False)
            if cfg.format == "json"
            else format_text(prediction, cfg.top_k, predictor.formatter.truncate_column)
        )
    return predictions
