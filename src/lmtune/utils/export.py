"""The export folder: everything eval and predict need, loadable with plain transformers + peft.

export/
  adapter_config.json, adapter_model.safetensors   PEFT adapter (or the full model for adapter=none)
  tokenizer files with the chat template
  labels.json        the label set in class-index order
  formatting.json    the task (prompt templates, truncate/label/id columns), end-of-turn token, max_length and
                     the answer token ids used in training
  config.yaml        the resolved Hydra config of the run (secrets redacted)
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lmtune.utils.config import redact_secrets

# What exports written before the task became configurable (arXiv only) leave out of formatting.json.
ARXIV_TASK = {
    "truncate_column": "abstract",
    "label_column": ["primary_category", "categories"],
    "label_is_list": True,
    "id_column": "id",
}


def export_model(module, tokenizer, formatter, cfg: DictConfig, out_dir: str | Path, spec=None) -> Path:
    """Write the export; `spec` (the data module's `RecordSpec`) names the task's label and id columns, so
    predict can read a labelled file the way training did."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # PeftModel writes only the adapter; a fully fine-tuned model writes all its weights
    module.model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "labels.json").write_text(json.dumps(formatter.labels, indent=1))
    formatting = {
        "system_prompt": formatter.system_prompt_template,
        "user_template": formatter.user_template,
        "truncate_column": formatter.truncate_column,
        "label_column": list(spec.label) if spec else ["label"],
        "label_is_list": spec.label_is_list if spec else False,
        "id_column": spec.id if spec else "id",
        "eot_token": formatter.eot_token,
        "chat_template_kwargs": formatter.chat_template_kwargs,
        "max_length": formatter.max_length,
        "answer_ids": formatter.answer_ids,
        "base_model": module.hparams.pretrained,
    }
    (out_dir / "formatting.json").write_text(json.dumps(formatting, indent=1))
    # secrets redacted: an export folder gets shared (the Hub, a W&B artifact); tokens come from the environment
    OmegaConf.save(OmegaConf.create(redact_secrets(OmegaConf.to_container(cfg, resolve=True))), out_dir / "config.yaml")
    return out_dir


def read_formatting(export: Path) -> dict:
    """formatting.json of an export; one from before configurable tasks gets the arXiv task it was trained on."""
    formatting = json.loads((Path(export) / "formatting.json").read_text())
    if "label_column" not in formatting:
        formatting = {**ARXIV_TASK, **formatting}
    return formatting


def task_data_config(data_cfg: DictConfig, formatting: dict) -> DictConfig:
    """The run's `data` config in today's form: an export from before configurable tasks names
    `ArxivDataModule` and keeps its prompts in formatting.json only."""
    if not str(data_cfg.get("_target_", "")).endswith("ArxivDataModule"):
        return data_cfg
    data = OmegaConf.to_container(data_cfg)
    data.update(
        _target_="lmtune.data.datamodule.TextClassificationDataModule",
        prompt={"system": formatting["system_prompt"], "user": formatting["user_template"]},
        label_column=formatting["label_column"],
        label_is_list=formatting["label_is_list"],
        truncate_column=formatting["truncate_column"],
    )
    return OmegaConf.create(data)
