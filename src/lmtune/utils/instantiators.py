"""Callbacks and loggers from config groups: `callbacks=none` or `logger=csv` change behaviour without code edits."""

from __future__ import annotations

import logging
import os

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

log = logging.getLogger(__name__)


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


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """As callbacks; a W&B logger with `offline: null` goes offline when there is no API key."""
    for conf in (cfg or {}).values():
        if isinstance(conf, DictConfig) and str(conf.get("_target_", "")).endswith("WandbLogger"):
            conf.offline = wandb_offline(conf.get("offline"))
            if conf.offline:
                conf.log_model = False  # W&B refuses to upload models offline
                log.info("W&B runs offline; after the run: `wandb sync %s/wandb/offline-run-*`", conf.save_dir)
    return _build_all(cfg, Logger, "logger")
