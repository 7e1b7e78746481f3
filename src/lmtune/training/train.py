"""`train(cfg)`: the whole fine-tuning run, returned as metrics so sweeps and tests can use it directly.

What `src/train.py` runs; the config is made ready in one call (`config.prepare_config`)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lmtune.artifacts.checkpoints import WEIGHTS_ONLY, read_checkpoint, resolve_ckpt_path
from lmtune.artifacts.export import export_model
from lmtune.core.console import single_lightning_handler
from lmtune.core.errors import UserError
from lmtune.core.files import atomic_write
from lmtune.evaluation.forgetting import forgetting, forgetting_markdown, read_texts, record_texts
from lmtune.model.loading import load_tokenizer, resolve_pretrained
from lmtune.model.module import parameter_counts
from lmtune.model.parallel import is_sharded
from lmtune.training.config import prepare_config
from lmtune.training.instantiate import instantiate_callbacks, instantiate_data
from lmtune.training.kinds import task_kind
from lmtune.training.loggers import instantiate_loggers, log_artifacts, loggable_config
from lmtune.training.run_log import RunLog
from lmtune.training.task_wrapper import task_wrapper
from lmtune.training.throughput import TrainingStats

log = logging.getLogger(__name__)
single_lightning_handler()

# The data module resumes mid-epoch itself (it skips the batches already seen), which Lightning cannot detect.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
# val/test metrics are torchmetrics objects, synced across processes when computed; sync_dist would sync twice
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|test)/")


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def _metrics_of(results: list[dict]) -> dict:
    return {k: float(v) for r in results for k, v in r.items()}


def best_validation(trainer: L.Trainer, module, datamodule, best: str | None) -> dict:
    """The validation metrics of the weights that are evaluated and exported (the best checkpoint, else the final
    weights): those measured when they were validated during training, else (a resumed run's best, no validation
    at the last step) a validation pass. Logged again either way, so the loggers end on the same numbers."""
    step = read_checkpoint(best)["global_step"] if best else None
    known = module.validations.get(trainer.global_step if step is None else step)
    if known is None:
        return _metrics_of(trainer.validate(module, datamodule=datamodule, ckpt_path=best, weights_only=WEIGHTS_ONLY))
    log.info("validation metrics of step %d, measured during training: %s", step or trainer.global_step, known)
    for logger in trainer.loggers:
        logger.log_metrics(known, step=trainer.global_step)
        logger.save()  # after fit: the CSV logger writes only on save
    return dict(known)


def load_trainable_weights(module, ckpt: str) -> None:
    """The trainable weights of a checkpoint into `module` (what `trainer.test(ckpt_path=...)` would load)."""
    module.load_state_dict(read_checkpoint(ckpt)["state_dict"], strict=False)


def card_inputs(kind, summary: dict, report_rows: dict | None, test: dict) -> dict:
    """What the model card reports besides the export's settings: the data, the training, and the kind's results."""
    train_stats, hardware = summary["train"], summary["hardware"]
    training = {
        "steps": train_stats.get("steps"),
        "train_seconds": train_stats.get("train_seconds"),
        "tokens_per_s": train_stats.get("tokens_per_s"),
        "precision": summary["precision"],
        "hardware": f"{hardware.get('device')}: {hardware.get('name')} ({hardware.get('capability')})",
    }
    return {"data": summary["data"], "training": training, **kind.card_inputs(summary, report_rows, test)}


# --- the steps of a run ----------------------------------------------------------------------------------
def prepare_data(cfg: DictConfig):
    """The data module, ready (records split, examples tokenized), and the tokenizer and base model path. Data
    first: a fetch that cannot work (offline) fails before minutes of model loading."""
    datamodule = instantiate_data(cfg.data)
    if rank_zero_only.rank == 0:  # one download; under torchrun/SLURM every rank starts here at once
        datamodule.prepare_data()
    else:
        datamodule.wait_for_data()
    pretrained = resolve_pretrained(cfg.model, cfg.paths.cache_dir)
    tokenizer = load_tokenizer(pretrained, cfg.model.get("pad_token"), cfg.model.get("chat_template"))
    datamodule.tokenizer = tokenizer
    datamodule.setup("fit")
    return datamodule, tokenizer, pretrained


def build_module(cfg: DictConfig, kind, datamodule, pretrained: str):
    """The kind's LightningModule over the settings every kind shares."""
    common = {
        "pretrained": pretrained,
        "model_cfg": _plain(cfg.model),
        "adapter_cfg": _plain(cfg.adapter),
        "optim_cfg": _plain(cfg.optim),
        "pad_token_id": datamodule.collator.pad_token_id,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "compile": cfg.compile,
    }
    return kind.module(common, datamodule, cfg)


def build_trainer(cfg: DictConfig, kind, datamodule, stats: TrainingStats, output_dir: Path) -> L.Trainer:
    """The Trainer with the configured callbacks, the kind's own (before the checkpoint callback reads what they
    log) and loggers, and the run's own record of training (`RunLog`)."""
    loggers = instantiate_loggers(cfg.get("logger"))
    configured = instantiate_callbacks(cfg.get("callbacks"), has_logger=bool(loggers))
    callbacks = (
        kind.callbacks(cfg)
        + configured
        + [
            stats,
            RunLog(output_dir, stats),
        ]
    )
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(output_dir)
    )
    for logger in trainer.loggers:
        logger.log_hyperparams({**loggable_config(cfg), "data/stats": datamodule.stats})
        if isinstance(logger, WandbLogger) and not logger._offline:  # W&B's own lines are silenced (core/console.py)
            log.info("W&B run: %s", logger.experiment.url)
    return trainer


def test_best(cfg: DictConfig, kind, trainer: L.Trainer, module, datamodule, best: str | None):
    """(test metrics, the module to export, whether the report is to give the test metrics). On one process the
    report scores the test split anyway (every output, zero-shot and the baseline beside it): its evaluation of the
    best weights gives the test metrics, so the split is not scored twice."""
    report_is_test = bool(cfg.report.enabled) and kind.report_is_test
    report_is_test = report_is_test and trainer.world_size == 1 and not is_sharded(module)
    if report_is_test:
        if best:
            load_trainable_weights(module, best)
        test = {}
    else:
        test = _metrics_of(
            trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=WEIGHTS_ONLY, verbose=False)
        )
    if is_sharded(module):
        # FSDP shards cannot run a forward pass on rank 0 alone: export and report from an unsharded copy
        trained = module.trainable_state_dict()  # gathers the adapter on every rank
        module = module.standalone_copy(trained, trainer.strategy.root_device) if trainer.is_global_zero else module
    return test, module, report_is_test


def calibrate(cfg: DictConfig, kind, trainer: L.Trainer, module, datamodule, summary: dict):
    """The kind's calibration of the exported weights on the validation split (rank 0), or None."""
    if not trainer.is_global_zero:
        return None
    calibration = kind.calibrate(module, datamodule, trainer.precision)
    if calibration is not None:
        summary["calibration"] = {"temperature": calibration.temperature, "fitted_on": calibration.fitted_on}
        log.info("calibration: temperature %.3f (%s)", calibration.temperature, calibration.fitted_on)
    return calibration


def report(
    cfg: DictConfig, kind, trainer: L.Trainer, module, datamodule, summary: dict, report_is_test: bool, calibration
):
    """The kind's end-of-training report (rank 0), into `summary`; its rows by model, or None. Its test metrics
    (the whole test evaluation, or what it adds to the test pass's) are logged as the test split's."""
    if not (trainer.is_global_zero and cfg.report.enabled):
        return None
    run = next((lg.experiment for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
    output_dir = Path(cfg.paths.output_dir)
    summary["report"], rows, test = kind.report(
        module, datamodule, output_dir, cfg, summary["train"], trainer.precision, run, calibration
    )
    general_text(cfg, module, datamodule, summary, run, trainer.precision)
    if kind.report_is_test and not report_is_test:
        return rows  # the test pass measured the same (under DDP/FSDP, or with the report's scoring elsewhere)
    summary["test"] = test if report_is_test else {**summary["test"], **test}
    if test:
        for logger in trainer.loggers:
            logger.log_metrics(test, step=trainer.global_step)
            logger.save()  # after fit: the CSV logger writes only on save
    return rows


def general_text(cfg: DictConfig, module, datamodule, summary: dict, run, precision) -> None:
    """What the adapter cost (`evaluation/forgetting.py`): the base and the fine-tuned model's loss on plain text
    outside the task, into `summary`, report.md and W&B."""
    settings = cfg.report.get("forgetting") or {}
    if not settings.get("enabled", True):
        return
    limit = int(settings.get("max_texts") or 100)
    if settings.get("path"):
        texts, source = read_texts(settings.path, limit), Path(settings.path).name
    else:
        texts = record_texts(datamodule.splits["test"], limit)
        source = f"{len(texts)} test rows as plain text, which the run never trained on"
    result = forgetting(module, datamodule.tokenizer, texts, datamodule.max_length, precision, source)
    summary["forgetting"] = result
    report_md = Path(cfg.paths.output_dir) / "report.md"
    if report_md.is_file():
        report_md.write_text(report_md.read_text() + forgetting_markdown(result))
    if run is not None and "base" in result:
        run.summary.update(
            {
                "report/general_text/base_loss": result["base"]["loss"],
                "report/general_text/fine_tuned_loss": result["fine-tuned"]["loss"],
            }
        )


def save_outputs(
    cfg: DictConfig, kind, trainer: L.Trainer, module, datamodule, tokenizer, summary, rows, calibration
) -> None:
    """On rank 0: the export (with its model card), the data manifest, metrics.json, the W&B summary and
    artifacts."""
    if not trainer.is_global_zero:
        return
    output_dir = Path(cfg.paths.output_dir)
    metrics = {**summary["val"], **summary["test"]}
    task, files = kind.export_task(datamodule.formatter, datamodule.spec, calibration)
    card = card_inputs(kind, summary, rows, summary["test"])
    export = export_model(
        module, tokenizer, datamodule.formatter, cfg, output_dir / "export", kind.name, task, files, card
    )
    manifest = output_dir / "data_manifest.json"
    atomic_write(manifest, lambda f: json.dump(datamodule.stats, f, indent=1))
    atomic_write(output_dir / "metrics.json", lambda f: json.dump(summary, f, indent=2))
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update({f"final/{k}": v for k, v in metrics.items()})
            log_artifacts(logger.experiment, export, manifest, Path(datamodule.source.where).stem)
    log.info("metrics: %s; export: %s", metrics, output_dir / "export")


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Fine-tune, validate and test the best checkpoint, export the adapter; returns (metrics, objects)."""
    prepare_config(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), Path(cfg.paths.log_dir) / cfg.task_name / "runs")
    L.seed_everything(cfg.seed, workers=True)
    datamodule, tokenizer, pretrained = prepare_data(cfg)
    kind = task_kind(datamodule.task)
    module = build_module(cfg, kind, datamodule, pretrained)
    stats = TrainingStats(cfg.paths.cache_dir)
    trainer = build_trainer(cfg, kind, datamodule, stats, Path(cfg.paths.output_dir))

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=WEIGHTS_ONLY)
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    log.info("evaluating %s", best or "the final weights")
    val = best_validation(trainer, module, datamodule, best)
    test, module, report_is_test = test_best(cfg, kind, trainer, module, datamodule, best)
    summary = {
        "val": val,
        "test": test,
        "best_checkpoint": best,
        "train": stats.summary(trainer),
        "data": datamodule.stats,
        "params": parameter_counts(module),
        "precision": str(trainer.precision),
        "hardware": _plain(cfg.hardware),
    }
    calibration = calibrate(cfg, kind, trainer, module, datamodule, summary)
    rows = report(cfg, kind, trainer, module, datamodule, summary, report_is_test, calibration)
    save_outputs(cfg, kind, trainer, module, datamodule, tokenizer, summary, rows, calibration)
    metrics = {**val, **summary["test"]}
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule, "summary": summary}


def optimized_metric(metrics: dict, name: str | None) -> float | None:
    """The value a sweep optimises; fails loudly, naming what was logged, when it is missing."""
    if not name:
        return None
    if name not in metrics:
        raise UserError(
            f"optimized_metric={name!r} was not logged (available: {', '.join(sorted(metrics)) or 'none'}); name one "
            "of those, or optimized_metric=null when the run has no validation."
        )
    return float(metrics[name])
