"""The export folder: everything eval and predict need, loadable with plain transformers + peft.

export/
  adapter_config.json, adapter_model.safetensors   PEFT adapter (or the full model for adapter=none)
  tokenizer files with the chat template
  labels.json        the label set in class-index order
  formatting.json    prompt templates, end-of-turn token, max_length and answer token ids used in training
  config.yaml        the resolved Hydra config of the run (secrets redacted)
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lmtune.utils.config import redact_secrets


def export_model(module, tokenizer, formatter, cfg: DictConfig, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # PeftModel writes only the adapter; a fully fine-tuned model writes all its weights
    module.model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "labels.json").write_text(json.dumps(formatter.labels, indent=1))
    formatting = {
        "system_prompt": formatter.system_prompt_template,
        "user_template": formatter.user_template,
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
