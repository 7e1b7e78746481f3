"""Callbacks and loggers from config groups: `callbacks=none` or `logger=csv` change behaviour without code edits."""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, open_dict

from lmtune.errors import UserError
from lmtune.utils.config import redact_override

log = logging.getLogger(__name__)


def instantiate_data(data_cfg: DictConfig, **overrides):
    """The data module of `data_cfg`. Its constructor checks the task's settings (prompts, columns, fractions) and
    raises a UserError naming the setting; Hydra would wrap that in an InstantiationException with a traceback,
    so the user's error is raised as it is."""
    try:
        return hydra.utils.instantiate(data_cfg, **overrides)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def _build_all(group: DictConfig | None, kind: type, name: str) -> list:
    if not group:
        log.warning("no %s configured", name)
        return []
    if not isinstance(group, DictConfig):
        raise TypeError(f"{name} config must be a mapping of name -> {{_target_: ...}}, got {type(group).__name__}")
    built = []
    for key, conf in group.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            obj = hydra.utils.instantiate(conf)
            if not isinstance(obj, kind):
                raise TypeError(f"{name}.{key} built a {type(obj).__name__}, not a {kind.__name__}")
            built.append(obj)
    return built


def instantiate_callbacks(cfg: DictConfig | None, has_logger: bool = True) -> list[Callback]:
    """Callbacks from config; those that only feed a logger are dropped when there is none (`logger=none`)."""
    callbacks = _build_all(cfg, Callback, "callbacks")
    if not has_logger:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return callbacks


def wandb_offline(requested: bool | None) -> bool:
    """Offline unless asked otherwise or an API key is available (env var or `wandb login`)."""
    if requested is not None:
        return bool(requested)
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = os.path.expanduser("~/.netrc")
    return not (os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read())


def wandb_identity() -> tuple[str | None, str | None]:
    """Default (group, name) of this job's W&B run. In a Hydra multirun (`-m`, an Optuna search, a SLURM array):
    the sweep folder's name, and `<script>-<job num> <the job's overrides>` (secrets redacted); else no group and
    `<script>-<time>`."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None, f"{hydra_cfg.job.name}-{datetime.now():%Y-%m-%d_%H-%M-%S}"
    # the job's overrides, secrets redacted, paths left out; `${x}` written as Hydra escapes it in sweep jobs,
    # `$\{x\}`, because the name goes into the config, and instantiate would resolve even an escaped `\${x}`
    overrides = [redact_override(o) for o in hydra_cfg.overrides.task if not o.startswith("paths.")]
    name = " ".join([f"{hydra_cfg.job.name}-{hydra_cfg.job.num}", *overrides]).replace("${", "$\\{")
    return Path(hydra_cfg.sweep.dir).name, name[:128]


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """As callbacks; a W&B logger with `offline: null` goes offline when there is no API key, and one with no
    `group` or `name` gets them from `wandb_identity` (grouped by sweep in a multirun)."""
    for conf in (cfg or {}).values():
        if isinstance(conf, DictConfig) and str(conf.get("_target_", "")).endswith("WandbLogger"):
            group, name = wandb_identity()
            with open_dict(conf):
                conf.group = conf.get("group") or group
                conf.name = conf.get("name") or name
            conf.offline = wandb_offline(conf.get("offline"))
            if conf.offline:
                conf.log_model = False  # W&B refuses to upload models offline
                log.info("W&B runs offline; after the run: `wandb sync %s/wandb/offline-run-*`", conf.save_dir)
    return _build_all(cfg, Logger, "logger")
