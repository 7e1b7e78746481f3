"""A run's config made ready in one call, `prepare_config`, before any work starts: every problem found at once
(each naming the field and the fix), then every machine-dependent `auto` decided in the config itself, then the
settings a distributed strategy requires."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from lmtune.core.errors import UserError
from lmtune.data.chat_format import chat_template_source
from lmtune.data.sources import SOURCES as SOURCES_OF_DATA
from lmtune.model.loading import CHECKPOINTING, SOURCES, model_source
from lmtune.model.precision import (
    AUTO,
    Hardware,
    choose_compile,
    compute_dtype_name,
    frozen_dtype,
    measure_probe,
    resolve_precision,
)

log = logging.getLogger(__name__)


class ConfigError(UserError):
    pass


def config_problems(cfg: DictConfig) -> list[str]:
    problems = []
    model, adapter, trainer = cfg.model, cfg.adapter, cfg.trainer
    if model.source not in SOURCES:
        problems.append(f"model.source={model.source!r}: use one of {', '.join(SOURCES)}.")
    elif model.source == "hub" and not model.get("name_or_path"):
        problems.append("model.name_or_path is empty: give a hub id or a local folder.")
    else:
        problems += model_problems(model)
    if model.get("gradient_checkpointing", False) not in CHECKPOINTING:
        problems.append(
            f"model.gradient_checkpointing={model.gradient_checkpointing!r}: use false, true (whole decoder layers) "
            f"or mlp (only the MLP blocks: most of the memory for less recomputation)."
        )
    general = OmegaConf.select(cfg, "report.forgetting.path", default=None)
    if general and not Path(str(general)).is_file():
        problems.append(
            f"report.forgetting.path={general}: not found; give a .txt (a document per line) or .jsonl (a `text` "
            "field), or null for the run's own test rows as plain text."
        )
    if cfg.get("compile", False) not in (AUTO, True, False):
        problems.append(f"compile={cfg.compile!r}: use auto, true or false.")
    if adapter.kind == "lora":
        for key in ("r", "alpha"):
            value = adapter.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"adapter.{key}={value!r}: must be a positive integer (e.g. adapter.{key}=16).")
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
    problems += strategy_problems(cfg)
    if cfg.optim.lr <= 0:
        problems.append(f"optim.lr={cfg.optim.lr}: must be positive.")
    problems += count_problems(cfg)
    problems += val_answers_problems(cfg)
    weights = OmegaConf.select(cfg, "loss.class_weights", default=None)
    if weights not in (None, "balanced"):
        problems.append(f"loss.class_weights={weights!r}: use balanced, or null for every example weighing 1.")
    elif weights and str(cfg.data.get("_target_", "")).endswith(".ChatDataModule"):
        problems.append(
            "loss.class_weights=balanced: written answers have no label set to weigh; use null with data=chat."
        )
    source = cfg.data.get("source", "auto")
    if source not in SOURCES_OF_DATA:
        problems.append(f"data.source={source!r}: use one of {', '.join(SOURCES_OF_DATA)}.")
    if source == "file" and not cfg.data.get("path"):
        problems.append("data.source=file but data.path is not set: point it at a JSONL, CSV or Parquet file.")
    if source == "hf" and not cfg.data.get("hf_name"):
        problems.append("data.source=hf but data.hf_name is not set: give a hub dataset id or a local folder.")
    return problems


def model_problems(model: DictConfig) -> list[str]:
    """A model folder that is not there or holds no model, and a chat template that cannot be found."""
    problems = []
    try:
        source = model_source(model)
    except UserError as e:
        return [str(e)]
    name = str(model.get("name_or_path") or "")
    # a hub id is `org/name`; anything that exists, or starts like a path, is a local folder
    if source == "hub" and name and (Path(name).expanduser().exists() or name.startswith(("/", ".", "~"))):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            problems.append(f"model.name_or_path={name}: no such folder; give a model folder or a hub id.")
        elif not (folder / "config.json").is_file():
            problems.append(
                f"model.name_or_path={name}: the folder has no config.json"
                f"{' (it is empty)' if not any(folder.iterdir()) else ''}; give a folder that save_pretrained wrote."
            )
    if model.get("chat_template"):
        try:
            chat_template_source(str(model.chat_template))
        except UserError as e:
            problems.append(str(e))
    return problems


def strategy_name(trainer_cfg) -> str:
    """'fsdp2', 'fsdp1', 'ddp' or 'single' (anything else) for a trainer config."""
    strategy = trainer_cfg.get("strategy")
    if isinstance(strategy, DictConfig):
        target = str(strategy.get("_target_", ""))
        return "fsdp2" if target.endswith(("FSDP2Strategy", "ModelParallelStrategy")) else "single"
    strategy = str(strategy or "")
    return "fsdp1" if strategy.startswith("fsdp") else "ddp" if strategy.startswith("ddp") else "single"


def _on_cpu(trainer_cfg) -> bool:
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


# settings that count something: (where, the smallest value that works, what the special values mean)
COUNTS = [
    ("trainer.max_steps", 0, -1, "the optimizer steps to train (0: evaluate only; -1: set by max_epochs)"),
    ("trainer.max_epochs", 0, -1, "the passes over the training split (-1: no limit, with max_steps)"),
    ("trainer.accumulate_grad_batches", 1, None, "batches per optimizer step"),
    ("data.batch_size", 1, None, "training examples per batch"),
    ("data.eval_batch_size", 1, None, "examples per evaluation batch"),
    ("val_answers.count", 0, None, "validation conversations answered at each validation (0: none)"),
    ("val_answers.max_new_tokens", 1, None, "the longest answer written on validation"),
    ("data.max_length", 1, None, "tokens per example"),
    ("data.calibration_rows", 2, None, "validation rows to calibrate the probabilities on"),
]


def count_problems(cfg: DictConfig) -> list[str]:
    """A count that cannot be (a negative step budget, a batch of zero): one line each, before Lightning or the data
    module meets it (Lightning answers `trainer.max_steps=-5` with a 55-line traceback)."""
    problems = []
    for setting, least, special, what in COUNTS:
        value = OmegaConf.select(cfg, setting, default=None)
        if value is None or (type(value) is int and (value >= least or value == special)):
            continue
        allowed = f"an integer of {least} or more" + (f", or {special}" if special is not None else "")
        problems.append(f"{setting}={value}: {what}; use {allowed}.")
    return problems


ANSWER_METRICS = ("val/chrf", "val/rougeL", "val/exact_match")  # written by tasks/generate/validation.py


def val_answers_problems(cfg: DictConfig) -> list[str]:
    """A monitored or optimized generation metric needs answers written during validation (and not under FSDP)."""
    count = OmegaConf.select(cfg, "val_answers.count", default=0) or 0
    problems = []
    for setting in ("monitor.metric", "optimized_metric"):
        metric = OmegaConf.select(cfg, setting, default=None)
        if metric in ANSWER_METRICS and count <= 0:
            problems.append(
                f"{setting}={metric}: written answers are scored on validation only with data=chat and "
                f"val_answers.count > 0 (e.g. val_answers.count=32)."
            )
    if count > 0 and strategy_name(cfg.trainer).startswith("fsdp"):
        problems.append(
            f"val_answers.count={count} with trainer=fsdp: sharded weights cannot write answers one process at a "
            "time; use trainer=ddp, or val_answers.count=0 (the report still writes the test split's answers)."
        )
    return problems


def strategy_problems(cfg: DictConfig) -> list[str]:
    """Distributed combinations that cannot work, each with the one that does."""
    trainer, quant = cfg.trainer, cfg.adapter.get("quantization")
    name, problems = strategy_name(trainer), []
    if name == "fsdp1":
        problems.append(
            f"trainer.strategy={trainer.strategy}: FSDP1 needs uniform requires_grad per unit and pays gradient "
            f"memory for the frozen base under LoRA; use trainer=fsdp (FSDP2, sharded per decoder layer)."
        )
    if name == "fsdp2" and quant and _on_cpu(trainer):
        problems.append(
            "trainer=fsdp with adapter=qlora on CPU: bitsandbytes' 4-bit CPU kernels cannot run on FSDP-sharded "
            "weights; on CPU use adapter=lora with trainer=fsdp, or adapter=qlora with trainer=ddp; QLoRA + FSDP "
            "needs CUDA (trainer.accelerator=gpu)."
        )
    return problems


def resolve_auto(cfg: DictConfig, hardware: Hardware | None = None, measure=measure_probe) -> Hardware:
    """Decide every `auto` that depends on the machine, once, in the config itself (so the W&B config, the
    export's config.yaml and eval/predict see the resolved values): `trainer.precision`, the frozen base's
    `model.dtype`, QLoRA's `compute_dtype` and `compile`. The hardware it was decided on goes in `cfg.hardware`."""
    trainer = cfg.trainer
    precision, hw, why = resolve_precision(
        trainer.precision, trainer.get("accelerator"), cfg.paths.cache_dir, hardware, measure
    )
    cfg.trainer.precision = precision
    cfg.model.source = model_source(cfg.model)
    cfg.model.dtype = frozen_dtype(cfg.model.get("dtype", "float32"), precision, cfg.adapter.kind)
    quant = cfg.adapter.get("quantization")
    if quant and str(quant.get("compute_dtype")) == AUTO:
        quant.compute_dtype = compute_dtype_name(precision)
    compile_, compile_why = choose_compile(
        cfg.get("compile", False),
        hw,
        max_steps=int(trainer.get("max_steps", -1)),
        quantized=bool(quant),
        strategy=strategy_name(trainer),
        checkpointing=cfg.model.get("gradient_checkpointing"),
    )
    with open_dict(cfg):
        cfg.compile = compile_
        cfg.hardware = {k.removeprefix("hardware/"): v for k, v in hw.as_dict().items()} | {
            "precision_reason": why,
            "compile_reason": compile_why,
        }
    log.info("precision %s (%s; %s); frozen base stored as %s", precision, why, hw.describe(), cfg.model.dtype)
    log.info("compile %s (%s)", str(compile_).lower(), compile_why)
    return hw


def fit_to_strategy(cfg: DictConfig) -> None:
    """Settings a strategy requires, set rather than refused: FSDP shards only floating-point storage."""
    quant = cfg.adapter.get("quantization")
    if strategy_name(cfg.trainer) == "fsdp2" and quant:
        compute = quant.get("compute_dtype") or "bfloat16"
        if quant.get("storage_dtype") != compute:
            log.info("FSDP: storing 4-bit weights as %s (adapter.quantization.storage_dtype) so they shard", compute)
            quant.storage_dtype = compute


def validate_config(cfg: DictConfig) -> None:
    problems = config_problems(cfg)
    if problems:
        # one problem: one line (as every other error); several: one line each
        raise ConfigError(
            f"invalid config: {problems[0]}"
            if len(problems) == 1
            else "invalid config:\n  - " + "\n  - ".join(problems)
        )


def prepare_config(cfg: DictConfig, hardware: Hardware | None = None, measure=measure_probe) -> Hardware:
    """The config ready to run, in place, in the order that matters: refused with every problem before anything is
    decided, then each `auto` resolved for this machine (`resolve_auto`), then fitted to the strategy."""
    validate_config(cfg)
    hw = resolve_auto(cfg, hardware, measure)
    fit_to_strategy(cfg)
    return hw
