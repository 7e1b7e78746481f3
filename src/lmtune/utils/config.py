"""Config validation: every problem found at once, each naming the field and the fix, before any work starts."""

from __future__ import annotations

from omegaconf import DictConfig

from lmtune.data.sources import SOURCES as SOURCES_OF_DATA
from lmtune.errors import UserError
from lmtune.model.loading import SOURCES


class ConfigError(UserError):
    pass


def config_problems(cfg: DictConfig) -> list[str]:
    problems = []
    model, adapter, trainer = cfg.model, cfg.adapter, cfg.trainer
    if model.source not in SOURCES:
        problems.append(f"model.source={model.source!r}: use one of {', '.join(SOURCES)}.")
    if model.source == "hub" and not model.get("name_or_path"):
        problems.append("model.name_or_path is empty: give a hub id or a local folder.")
    if adapter.kind not in ("lora", "none"):
        problems.append(f"adapter.kind={adapter.kind!r}: use adapter=lora, adapter=qlora or adapter=none.")
    quant = adapter.get("quantization")
    if quant:
        if adapter.kind == "none":
            problems.append(
                "adapter.kind=none with adapter.quantization: 4-bit weights cannot train; use adapter=qlora."
            )
        if str(trainer.get("precision")) in ("bf16-true", "16-true", "bf16", "16", "half"):
            problems.append(
                f"trainer.precision={trainer.precision} recasts 4-bit weights; use trainer.precision=bf16-mixed "
                f"(or 32-true) with QLoRA."
            )
        if quant.get("quant_type") not in ("nf4", "fp4"):
            problems.append(f"adapter.quantization.quant_type={quant.get('quant_type')!r}: use nf4 or fp4.")
    if cfg.optim.lr <= 0:
        problems.append(f"optim.lr={cfg.optim.lr}: must be positive.")
    source = cfg.data.get("source", "auto")
    if source not in SOURCES_OF_DATA:
        problems.append(f"data.source={source!r}: use one of {', '.join(SOURCES_OF_DATA)}.")
    if source == "file" and not cfg.data.get("path"):
        problems.append("data.source=file but data.path is not set: point it at a JSONL, CSV or Parquet file.")
    if source == "hf" and not cfg.data.get("hf_name"):
        problems.append("data.source=hf but data.hf_name is not set: give a hub dataset id or a local folder.")
    return problems


def validate_config(cfg: DictConfig) -> None:
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
