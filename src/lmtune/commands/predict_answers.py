"""`predict.py` for a generate export (or `ckpt=null data=chat`, the zero-shot base model): answers written to
conversations.

- `input=chats.jsonl`: each row's conversation (its `messages`, or the prompt's columns) is answered at its last
  user turn; a conversation that ends with an assistant turn is answered at the user turn before it, and that
  turn is kept as the row's `reference`. Answers go to `<input stem>.answers.jsonl`; a row that cannot be
  answered gets an `error` line there (and is counted) instead of stopping the others.
- `message="..."` (a messages task: one user turn) or `row={col: ...}` (a task over columns): the answer is
  streamed to the terminal as it is written (`format=json`: one JSON object when it is done).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lmtune.artifacts.export import read_export
from lmtune.commands.predict import numbered_rows, write_result_rows
from lmtune.core.errors import DataError, UserError
from lmtune.data.conversations import MESSAGES_FIELD, ConversationTask, read_messages
from lmtune.data.records import RecordSpec, clean_text, rename_columns
from lmtune.evaluation.predictor import pick_device
from lmtune.tasks.generate.predictor import ChatPredictor


def task_of(cfg: DictConfig) -> tuple[ConversationTask, dict]:
    """(the conversation task, the data settings: id column, renamed columns) of the export, or of `data`."""
    if cfg.ckpt:
        export = read_export(cfg.ckpt)
        data = export.cfg.get("data") or {}
        task, id_column = ConversationTask.from_dict(export.formatting), export.formatting.get("id_column")
    else:
        data = cfg.data
        prompt = data.get("prompt") or {}
        task = ConversationTask(
            prompt.get("system"),
            prompt.get("user"),
            data.get("answer"),
            data.get("messages_column"),
            tuple(OmegaConf.to_container(data.turns) if data.get("turns") else ()),
        )
        id_column = data.get("id_column")
    return task, {"id_column": id_column or "id", "columns": data.get("columns")}


def conversation_of(task: ConversationTask, raw: dict, where: str) -> tuple[list[dict], str | None]:
    """(the conversation to answer, ending with a user turn; the reference answer when the row has one)."""
    if task.messages_column:
        messages, problem = read_messages(raw.get(task.messages_column, raw.get(MESSAGES_FIELD)), to_answer=True)
        if problem:
            raise DataError(f"{where}: {problem}; give `{task.messages_column}` as OpenAI-style messages.")
        if messages[-1]["role"] == "assistant":
            return messages[:-1], messages[-1]["content"]
        return messages, None
    fields = {c: clean_text(raw.get(c)) for c in task.columns}
    missing = [c for c in task.user_columns if not fields[c]]
    if missing:
        raise DataError(
            f"{where}: needs {', '.join(task.user_columns)} (the columns the prompt reads); missing or empty: "
            f"{', '.join(missing)}."
        )
    reference = task.answer_text(fields) if all(fields.values()) else None
    return task.messages(fields, with_answer=False), reference


def load(cfg: DictConfig, task: ConversationTask) -> ChatPredictor:
    device = pick_device(cfg.device)
    options = {"precision": cfg.precision} if cfg.precision != "auto" else {}
    if cfg.ckpt:
        return ChatPredictor.from_export(cfg.ckpt, cfg.paths.cache_dir, device, base=cfg.get("base"), **options)
    return ChatPredictor.zero_shot(cfg.model, task, cfg.paths.cache_dir, device, cfg.data.max_length, **options)


def generation_settings(cfg: DictConfig) -> dict:
    max_new, temperature = cfg.get("max_new_tokens", 256), cfg.get("temperature", 0.0)
    if not (isinstance(max_new, int) and max_new >= 1):
        raise UserError(f"max_new_tokens={max_new!r}: give a positive whole number.")
    if not (isinstance(temperature, int | float) and 0 <= temperature <= 5):
        raise UserError(f"temperature={temperature!r}: give a number from 0 (greedy) to 5.")
    return {"max_new_tokens": max_new, "temperature": float(temperature), "seed": cfg.get("seed")}


def predict_answers(cfg: DictConfig, given: list[str], emit=print, stream=None) -> list[dict]:
    """Answer the rows of `input=`, or the one conversation of `message=` / `row=`; returns the output rows."""
    task, data = task_of(cfg)
    settings = generation_settings(cfg)
    if given == ["input"]:
        return _answer_file(cfg, task, data, settings, emit)
    if given == ["message"]:
        if not task.messages_column:
            raise UserError(
                f"message= is for a task trained on conversations; this one reads {task.columns}: row={{...}}."
            )
        conversation = [{"role": "user", "content": str(cfg.message)}]
    elif given == ["row"]:
        if task.messages_column:
            raise UserError("this task was trained on conversations: give message='...' or input=<messages JSONL>.")
        conversation, _ = conversation_of(task, dict(OmegaConf.to_container(cfg.row)), "row=")
    else:
        raise UserError(f"a generate model answers input=, message= or row=; not {', '.join(given)}.")
    predictor = load(cfg, task)
    stream = stream or sys.stdout
    answer = None
    for piece in predictor.stream(conversation, **settings):
        if isinstance(piece, str):
            if cfg.format == "text":
                stream.write(piece)
                stream.flush()
        else:
            answer = piece
    row = {"answer": answer.text, "finish_reason": answer.finish_reason, "tokens": answer.tokens}
    if cfg.format == "text":
        stream.write("\n")
        if answer.finish_reason == "length":
            emit(f"(stopped at max_new_tokens={settings['max_new_tokens']})")
    else:
        emit(json.dumps(row, ensure_ascii=False))
    return [row]


def _answer_file(cfg, task: ConversationTask, data: dict, settings: dict, emit) -> list[dict]:
    path = Path(cfg.input)
    if not path.is_file():
        raise DataError(f"input={path}: file not found; give a JSONL, CSV or Parquet file of conversations.")
    items = []
    for where, raw in numbered_rows(path, RecordSpec(text=(), label=())):
        raw = rename_columns(raw, data["columns"])
        row_id = clean_text(raw.get(data["id_column"])) or None
        try:
            conversation, reference = conversation_of(task, raw, where)
            items.append((where, row_id, conversation, reference, None))
        except DataError as e:
            items.append((where, row_id, None, None, str(e)))
    if not items:
        raise DataError(f"input={path}: the file has no rows.")
    predictor = load(cfg, task)
    rows = []
    for where, row_id, conversation, reference, error in items:
        if error is None:
            try:
                answer = predictor.answer(conversation, **settings)
            except UserError as e:  # a conversation that cannot fit max_length: this row only
                error = f"{where}: {e}"
        if error is not None:
            rows.append({"where": where, "id": row_id, "error": error})
            continue
        row = {"id": row_id, "answer": answer.text, "finish_reason": answer.finish_reason, "tokens": answer.tokens}
        if reference is not None:
            row["reference"] = reference
        rows.append(row)
    write_result_rows(path, cfg.output, "answers", "answered", rows, predictor.source, emit)
    return rows
