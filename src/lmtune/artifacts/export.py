"""The export format, in one place: what an export folder holds, how it is written (whole, or not at all),
found, read and checked. Training writes the adapter export, `src/merge.py` the merged one (`merge.py` here); eval,
predict and merging read both through `read_export` and `load_export_model`.

export/
  adapter_config.json, adapter_model.safetensors   the peft adapter; `base_model_name_or_path` is the base's hub
                                                   id when it has one (`model.hub_id`), so it loads anywhere
  config.json, model.safetensors                   instead, for adapter=none and merged exports
  tokenizer files with the chat template
  labels.json        the label set in class-index order
  calibration.json   the temperature and the validation rows' conformal scores (model/calibration.py)
  formatting.json    the task (prompt templates, truncate/label/id columns), end-of-turn token, max_length, the
                     answer token ids used in training; `base_model` (hub id, else folder) and `base_model_local`
                     (the folder the base was loaded from when training)
  config.yaml        the resolved Hydra config of the run (secrets redacted)
  README.md          the model card (`model_card.py`), from card.json: the data, training and test results
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from lmtune.artifacts.model_card import chat_model_card, model_card
from lmtune.core.errors import UserError, first_line
from lmtune.core.files import write_folder
from lmtune.core.secrets import redact_secrets
from lmtune.model.calibration import Calibration

log = logging.getLogger(__name__)

EXPORT_FILES = ("formatting.json", "config.yaml")  # and labels.json for a classifier
CARD_INPUTS = "card.json"  # what the model card reports besides the settings: data, training, results
CALIBRATION = "calibration.json"  # a classifier's temperature and conformal scores (model/calibration.py)
KINDS = ("classify", "generate")  # formatting.json's `task`; exports from before task kinds classify
FORMATTING_KEYS = {
    "classify": ("system_prompt", "user_template", "max_length", "answer_ids"),
    "generate": ("max_length",),
}
# What exports written before the task became configurable (arXiv only) leave out of formatting.json.
ARXIV_TASK = {
    "truncate_column": "abstract",
    "label_column": ["primary_category", "categories"],
    "label_is_list": True,
    "id_column": "id",
}
DAMAGED = "the export is incomplete or damaged: copy the folder again from where it was trained, or train again"
# An export comes from someone else's machine: what its files may hold. Its config.yaml builds the data module only,
# and only one of these classes (Hydra's instantiate would call any importable function a `_target_` names).
DATA_MODULES = ("lmtune.data.datamodule.TextClassificationDataModule", "lmtune.data.datamodule.ChatDataModule")
LEGACY_DATA_MODULE = "ArxivDataModule"  # read as TextClassificationDataModule (`task_data_config`)
ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
LIMITS = {"text": 20_000, "name": 200, "labels": 10_000, "answer": 64, "max_length": 1 << 20}


# --- writing -------------------------------------------------------------------------------------------
def base_model_reference(model_cfg, pretrained: str) -> tuple[str, str | None]:
    """(what an export names as its base, the local folder it was loaded from): a hub id when there is one, so the
    export loads on any machine: `model.hub_id` or a `model.name_or_path` that is not a folder; for a GGUF file, the
    hub model it was made from (`model.gguf_origin`). Else the folder (the tiny model is rebuilt from the config)."""
    from lmtune.model.loading import model_source

    local = pretrained if Path(pretrained).is_dir() else None
    source = model_source(model_cfg)
    if source == "gguf":
        hub_id = model_cfg.get("gguf_origin")
    elif source == "hub":
        hub_id = model_cfg.get("hub_id") or (None if local else pretrained)
        if hub_id is None:
            log.warning(
                "the export names its base by a local folder (%s), which other machines lack: set "
                "model.hub_id=<org/name> when the model is on the Hugging Face hub",
                pretrained,
            )
    else:
        hub_id = None
    return hub_id or pretrained, local


def export_model(
    module,
    tokenizer,
    formatter,
    cfg: DictConfig,
    out_dir: str | Path,
    kind: str,
    task: dict,
    files: dict,
    card: dict | None = None,
) -> Path:
    """Write the export of a run of task `kind`: `task`, what formatting.json records of the task (the kind's
    `export_task`), and `files`,
    the kind's other JSON files (classify: labels.json); `card`: what the model card reports besides the export's
    own settings (data, training, results; `write_card`)."""
    base, local = base_model_reference(cfg.model, module.hparams.pretrained)
    formatting = {
        "task": kind,
        **formatter.settings(),
        **task,
        "base_model": base,
        "base_model_local": local,
    }

    def fill(folder: Path) -> None:
        # PeftModel writes only the adapter; a fully fine-tuned model writes all its weights
        module.model.save_pretrained(folder)
        adapter_config = folder / "adapter_config.json"
        if adapter_config.is_file():  # peft records the folder it loaded; the hub id travels
            adapter_config.write_text(
                json.dumps({**read_json(adapter_config), "base_model_name_or_path": base}, indent=2)
            )
        # secrets redacted: an export folder gets shared (the Hub, a W&B artifact); tokens come from the environment
        config = OmegaConf.create(redact_secrets(OmegaConf.to_container(cfg, resolve=True)))
        # with what the card's code needs to build the prompt as the formatter does
        inputs = {**card, "system_in_user": formatter.chat_format.system_in_user} if card is not None else None
        write_task_files(folder, tokenizer, formatting, files, config, inputs)

    return write_folder(out_dir, fill)


def write_task_files(
    folder: Path,
    tokenizer,
    formatting: dict,
    files: dict,
    config: DictConfig,
    card_inputs: dict | None,
    card_config: DictConfig | None = None,
    merged: dict | None = None,
) -> None:
    """Everything of an export besides its weights, for the adapter export and the merged one alike: the tokenizer,
    the kind's files (labels.json), formatting.json, config.yaml, and the model card with what it reports
    (`card_config`: the config the card describes, when not `config`)."""
    tokenizer.save_pretrained(folder)
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=1))
    (folder / "formatting.json").write_text(json.dumps(formatting, indent=1))
    OmegaConf.save(config, folder / "config.yaml")
    if card_inputs is not None:
        (folder / CARD_INPUTS).write_text(json.dumps(card_inputs, indent=1, default=str))
        write_card(folder, formatting, card_config or config, merged)


def write_card(folder: Path, formatting: dict, cfg: DictConfig, merged: dict | None = None) -> None:
    """README.md, the model card, from the export's settings and `card.json` (data, training and results)."""
    card = read_json(folder / CARD_INPUTS)
    if formatting.get("task") == "generate":
        text = chat_model_card(
            base_model=formatting["base_model"],
            base_local=formatting.get("base_model_local"),
            model_cfg=OmegaConf.to_container(cfg.model),
            adapter_cfg=OmegaConf.to_container(cfg.adapter),
            task=formatting,
            max_length=formatting["max_length"],
            merged=merged,
            **card,
        )
        (folder / "README.md").write_text(text)
        return
    text = model_card(
        base_model=formatting["base_model"],
        base_local=formatting.get("base_model_local"),
        model_cfg=OmegaConf.to_container(cfg.model),
        adapter_cfg=OmegaConf.to_container(cfg.adapter),
        labels=read_json(folder / "labels.json"),
        system_prompt=formatting["system_prompt"],
        user_template=formatting["user_template"],
        truncate_column=formatting.get("truncate_column"),
        max_length=formatting["max_length"],
        merged=merged,
        **card,
    )
    (folder / "README.md").write_text(text)


# --- finding and reading -------------------------------------------------------------------------------
def find_export(path: str | Path) -> Path:
    """The export folder from itself or from its run folder; a clear error for anything else."""
    path = Path(path)
    for candidate in (path, path / "export"):
        if all((candidate / name).is_file() for name in EXPORT_FILES):
            return candidate
    if path.suffix == ".ckpt":
        hint = f"use the export folder of that run instead: {path.parent.parent / 'export'}"
    elif path.is_dir() and any((path / name).exists() for name in EXPORT_FILES):
        missing = [name for name in EXPORT_FILES if not (path / name).is_file()]
        hint = f"it lacks {', '.join(missing)}: {DAMAGED}"
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


@dataclass(frozen=True)
class Export:
    """A checked export: its folder, run config, formatting and label set (empty for a generator)."""

    path: Path
    cfg: DictConfig
    formatting: dict
    labels: list[str]
    calibration: Calibration | None = None  # calibration.json: a classifier's temperature and conformal scores

    @property
    def has_adapter(self) -> bool:
        return self.cfg.adapter.kind != "none"

    @property
    def kind(self) -> str:
        """The task kind it was trained for: classify or generate."""
        return self.formatting.get("task", "classify")


def read_export(path: str | Path) -> Export:
    """Find the export and check every file it needs before anything is loaded: readable JSON and YAML with the
    fields they must have, a label set that fits the trained answers, weights that are whole."""
    export = find_export(path)
    formatting = read_formatting(export)
    kind = formatting.get("task", "classify")
    if kind not in KINDS:
        raise UserError(f"{export / 'formatting.json'}: task {kind!r} is not one of {', '.join(KINDS)}; {DAMAGED}.")
    missing = [key for key in FORMATTING_KEYS[kind] if key not in formatting]
    if missing:
        raise UserError(f"{export / 'formatting.json'}: no {', '.join(missing)}; {DAMAGED}.")
    labels = _read_labels(export, formatting) if kind == "classify" else []
    _check_formatting(export / "formatting.json", formatting, labels, kind)
    try:
        cfg = OmegaConf.load(export / "config.yaml")
        cfg.adapter.kind  # noqa: B018 (the field every reader needs)
    except Exception as e:  # a YAML parse error or a config without an adapter
        raise UserError(f"{export / 'config.yaml'}: not a run config ({first_line(e)}); {DAMAGED}.") from None
    _check_run_config(export / "config.yaml", cfg)
    result = Export(export, cfg, formatting, labels, _read_calibration(export) if kind == "classify" else None)
    _check_weights(result)
    return result


def _read_calibration(export: Path) -> Calibration | None:
    """calibration.json, checked; None for an export written before calibration existed (probabilities then come
    from the plain softmax, and label sets cannot be given)."""
    path = export / CALIBRATION
    if not path.is_file():
        return None
    data = read_json(path)
    try:
        return Calibration.from_dict(data if isinstance(data, dict) else {}, str(path))
    except ValueError as e:
        raise UserError(f"{e}; {DAMAGED}.") from None


def _read_labels(export: Path, formatting: dict) -> list[str]:
    labels = read_json(export / "labels.json")
    if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) for x in labels)):
        raise UserError(f"{export / 'labels.json'}: expected a list of two or more label names; {DAMAGED}.")
    if len(labels) != len(formatting["answer_ids"]):
        raise UserError(
            f"{export / 'labels.json'}: {len(labels)} labels, but the model was trained on "
            f"{len(formatting['answer_ids'])} answers (formatting.json); {DAMAGED}."
        )
    return labels


def _check_formatting(path: Path, formatting: dict, labels: list, kind: str) -> None:
    """The task an export describes, within limits: texts, names and lengths a real run writes, nothing that would
    make a reader tokenize megabytes or allocate for a billion positions."""
    problems = []

    def text(key, limit, optional=False):
        value = formatting.get(key)
        if not (value is None and optional) and not (isinstance(value, str) and len(value) <= limit):
            problems.append(f"{key} must be {'null or ' if optional else ''}a string of at most {limit:,} characters")

    for key in ("system_prompt", "user_template") + (("answer",) if kind == "generate" else ()):
        text(key, LIMITS["text"], optional=kind == "generate")
    for key in ("truncate_column", "id_column", "eot_token", "messages_column", "train_on"):
        text(key, LIMITS["name"], optional=True)
    max_length = formatting["max_length"]
    if not (type(max_length) is int and 8 <= max_length <= LIMITS["max_length"]):
        problems.append(f"max_length must be an integer from 8 to {LIMITS['max_length']:,}")
    if kind == "classify":
        if len(labels) > LIMITS["labels"] or any(not 0 < len(x) <= LIMITS["name"] for x in labels):
            problems.append(f"labels.json: at most {LIMITS['labels']:,} labels of 1 to {LIMITS['name']} characters")
        elif len(set(labels)) != len(labels):
            problems.append("labels.json: a label is listed twice")
        answers = formatting["answer_ids"]
        if not isinstance(answers, list) or not all(
            isinstance(a, list) and 0 < len(a) <= LIMITS["answer"] and all(type(i) is int and i >= 0 for i in a)
            for a in answers
        ):
            problems.append(f"answer_ids must be lists of 1 to {LIMITS['answer']} token ids")
    if not isinstance(formatting.get("chat_template_kwargs") or {}, dict):
        problems.append("chat_template_kwargs must be an object")
    if problems:
        raise UserError(f"{path}: {'; '.join(problems)}; {DAMAGED}.")


def _check_run_config(path: Path, cfg: DictConfig) -> None:
    """What readers take from an export's config.yaml: the data module eval builds (one of `DATA_MODULES`, nothing
    nested to instantiate; no other part of an export's config is ever instantiated), no interpolation to resolve
    (a written config is resolved), a known attention kernel."""

    def walk(node, where):
        for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
            here = f"{where}.{key}" if where else str(key)
            if OmegaConf.is_interpolation(node, key):
                yield here, "an interpolation (${...}), which a written config never holds"
            elif isinstance(node[key], DictConfig | ListConfig):
                yield from walk(node[key], here)
            elif key == "_target_" and where.startswith("data."):  # instantiate would build it with the data module
                yield here, f"a _target_ ({node[key]}) inside data, which a data module never holds"

    problem = next(walk(cfg, ""), None)
    target = OmegaConf.select(cfg, "data._target_", default=None)
    if problem is None and target is not None and target not in DATA_MODULES:
        if not (isinstance(target, str) and target.rsplit(".", 1)[-1] == LEGACY_DATA_MODULE):
            problem = ("data._target_", f"{target}, which is not a data module of this project")
    attn = OmegaConf.select(cfg, "model.attn_implementation", default=None)
    if problem is None and attn not in ATTN_IMPLEMENTATIONS:
        problem = ("model.attn_implementation", f"{attn!r}, which is not a kernel of transformers")
    if problem:
        where, what = problem
        raise UserError(f"{path}: refused: {where} is {what}; {DAMAGED}.")


def read_formatting(export: Path) -> dict:
    """formatting.json of an export; one from before configurable tasks gets the arXiv task it was trained on."""
    formatting = read_json(Path(export) / "formatting.json")
    if not isinstance(formatting, dict):
        raise UserError(f"{Path(export) / 'formatting.json'}: expected a JSON object; {DAMAGED}.")
    if "label_column" not in formatting:
        formatting = {**ARXIV_TASK, **formatting}
    return formatting


def read_json(path: Path):
    """A JSON file of an export; a missing, damaged or unreadable one is one line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {DAMAGED}.") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); {DAMAGED}.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({first_line(e)}); {DAMAGED}.") from None


def _check_weights(export: Export) -> None:
    """The weights the export needs are present and whole (a safetensors header lists every tensor's bytes)."""
    from safetensors import safe_open

    folder = export.path
    if export.has_adapter:
        read_json(folder / "adapter_config.json")
        names = ["adapter_model.safetensors", "adapter_model.bin"]
    else:
        read_json(folder / "config.json")
        names = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
    found = [folder / name for name in names if (folder / name).is_file()]
    if not found:
        raise UserError(f"{folder}: no weights ({' or '.join(names)}); {DAMAGED}.")
    shards = sorted(folder.glob("model-*.safetensors")) if found[0].name.endswith(".index.json") else found[:1]
    for file in (f for f in shards if f.suffix == ".safetensors"):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as e:  # SafetensorError: a truncated or foreign file
            raise UserError(f"{file}: unreadable weights ({first_line(e)}); {DAMAGED}.") from None


# --- loading -------------------------------------------------------------------------------------------
def load_formatter(export: Export):
    """The formatter the export was trained with, rebuilt from its own tokenizer and formatting.json (a classifier's
    checked to give the answer tokens training used)."""
    from transformers import AutoTokenizer

    from lmtune.core.errors import DataError
    from lmtune.data.conversations import ConversationFormatter
    from lmtune.data.formatting import ChatFormatter

    tokenizer = AutoTokenizer.from_pretrained(export.path)
    try:
        if export.kind == "generate":
            return ConversationFormatter.from_settings(tokenizer, export.formatting)
        return ChatFormatter.from_settings(tokenizer, export.labels, export.formatting, str(export.path))
    except DataError as e:
        raise UserError(str(e)) from None


def base_model_path(export: Export, base: str | None, cache_dir) -> str:
    """Where an adapter export's base model is loaded from: `base=` when given (a folder or a hub id); else the
    folder it was trained from, when this machine has it; else the model the run's config names (a hub id, a GGUF
    file converted again, the tiny model)."""
    from lmtune.model.loading import reachable_model, resolve_pretrained

    if base:
        return reachable_model(str(base), "base")
    local = export.formatting.get("base_model_local") or export.formatting.get("base_model")  # older exports
    if local and Path(local).is_dir():
        return str(local)
    return resolve_pretrained(export.cfg.model, cache_dir)


def load_export_model(export: Export, cache_dir, device: torch.device, quantized: bool = True, base=None, dtype=None):
    """The export's model: the full model for adapter=none (and merged exports), else its base with the adapter.
    `quantized=False` loads a QLoRA run's base unquantized (what a merged export needs); `dtype` overrides
    `model.dtype`. An adapter that does not fit its base (another model given with base=) is one clear error."""
    from transformers import AutoModelForCausalLM

    from lmtune.model.loading import load_base_model

    model_cfg = OmegaConf.merge(export.cfg.model, {"dtype": dtype} if dtype else {})
    if not export.has_adapter:  # a fully fine-tuned or merged model is the export itself
        return AutoModelForCausalLM.from_pretrained(export.path, dtype=getattr(torch, model_cfg.dtype)).to(device)
    from peft import PeftModel

    from lmtune.model.fused_lora import fuse_lora_layers

    base_path = base_model_path(export, base, cache_dir)
    quant = export.cfg.adapter.get("quantization") if quantized else None
    base_model = load_base_model(base_path, model_cfg, quant, device)
    try:
        model = PeftModel.from_pretrained(base_model if quant else base_model.to(device), export.path)
    except RuntimeError as e:  # size mismatch: the adapter was trained on another model
        raise UserError(
            f"{export.path}: its adapter does not fit the base model {base_path} ({first_line(e, 200)}); load it "
            f"with the base it was trained on ({export.formatting.get('base_model')}): base=<that model's folder>."
        ) from None
    fuse_lora_layers(model)  # the forward training validated with: the same numbers in bf16, not just close ones
    return model


def task_data_config(data_cfg: DictConfig, formatting: dict) -> DictConfig:
    """The run's `data` config in today's form: an export from before configurable tasks names `ArxivDataModule` and
    keeps its prompts in formatting.json only; one from before source plug-ins (2026-12) has `arxiv_query` and
    `arxiv` where `fetch` is now."""
    data = OmegaConf.to_container(data_cfg)
    if "arxiv_query" in data or "arxiv" in data:
        query, client = data.pop("arxiv_query", None), data.pop("arxiv", None)
        data["fetch"] = {"source": "arxiv_api", "query": query, "client": client} if query else None
    if str(data.get("_target_", "")).endswith("ArxivDataModule"):
        data.update(
            _target_="lmtune.data.datamodule.TextClassificationDataModule",
            prompt={"system": formatting["system_prompt"], "user": formatting["user_template"]},
            label_column=formatting["label_column"],
            label_is_list=formatting["label_is_list"],
            truncate_column=formatting["truncate_column"],
        )
    return OmegaConf.create(data)
