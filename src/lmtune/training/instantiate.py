"""The data module and callbacks from config groups: `callbacks=none` changes behaviour without code edits."""

from __future__ import annotations

import logging

import hydra
from hydra.errors import InstantiationException
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig

from lmtune.core.errors import UserError

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


def build_all(group: DictConfig | None, kind: type, name: str) -> list:
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
    callbacks = build_all(cfg, Callback, "callbacks")
    if not has_logger:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return callbacks
