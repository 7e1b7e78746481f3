"""`run_baseline(cfg)`: TF-IDF + logistic regression on exactly the LM's splits, with the LM's output files.

`conf/baseline.yaml` extends `conf/train.yaml`, so the data settings (and `experiment=...`) are the ones a
training run would use: the same records, label set, hash splits and limits, through the same datamodule.
"""

from __future__ import annotations

import logging

from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from lmtune.core.errors import UserError
from lmtune.evaluation.outputs import log_to_wandb
from lmtune.evaluation.tfidf import evaluate_tfidf
from lmtune.training.config import ConfigError
from lmtune.training.instantiate import instantiate_data
from lmtune.training.loggers import instantiate_loggers, loggable_config
from lmtune.training.task_wrapper import task_wrapper

log = logging.getLogger(__name__)

TRAIN_ON = ("same", "all")
EVAL_SPLITS = ("val", "test")
MODEL_PARAMS = ("C", "min_df", "max_features", "class_weight", "max_iter", "solver")


def _settings(cfg: DictConfig) -> dict:
    settings = OmegaConf.to_container(cfg.baseline, resolve=True)
    problems = []
    if settings.get("train_on") not in TRAIN_ON:
        problems.append(f"baseline.train_on={settings.get('train_on')!r}: use one of {', '.join(TRAIN_ON)}.")
    if settings.get("split") not in EVAL_SPLITS:
        problems.append(f"baseline.split={settings.get('split')!r}: use one of {', '.join(EVAL_SPLITS)}.")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return settings


@task_wrapper  # closes the W&B run (marking a failure) however the run ends
def run_baseline(cfg: DictConfig) -> dict:
    """Fit on the train split, evaluate on `baseline.split`, write the eval files (and W&B); returns the metrics."""
    settings = _settings(cfg)
    train_on, split = settings["train_on"], settings["split"]
    params = {k: settings[k] for k in MODEL_PARAMS if k in settings}

    # `all` lifts only the train limit: val/test are limited per split, so they stay exactly the LM's
    overrides = {"limit_train": None} if train_on == "all" else {}
    datamodule = instantiate_data(cfg.data, **overrides)
    datamodule.prepare_data()
    splits = datamodule.load_splits()
    labels = datamodule.labels
    if not splits[split]:
        raise UserError(
            f"the {split} split is empty: raise data.{split}_fraction (and check data.limit_{split}), or use another "
            f"baseline.split."
        )

    meta = {"train_on": train_on, "split": split, "params": params, "data": datamodule.stats}
    predictions, metrics, paths = evaluate_tfidf(
        splits["train"], splits[split], labels, cfg.paths.output_dir, meta, **params
    )

    prefix = f"baseline/{split}"
    for logger in instantiate_loggers(cfg.get("logger")):
        logger.log_hyperparams({**loggable_config(cfg), "data/stats": datamodule.stats})
        if isinstance(logger, WandbLogger):
            log_to_wandb(logger.experiment, predictions, metrics, paths, prefix=prefix)
            logger.experiment.summary.update({"baseline/train_examples": len(splits["train"])})
        else:  # CSV and the like: the scalars
            logger.log_metrics({f"{prefix}/{k}": metrics[k] for k in ("acc", "macro_f1", "ece", "n") if k in metrics})
        logger.finalize("success")

    print(
        f"tfidf+logreg {split}: accuracy {metrics['acc']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
        f"({len(splits['train'])} train examples)"
    )
    log.info("baseline outputs: %s", ", ".join(str(p) for p in paths.values()))
    return metrics
