"""What a run reports to its loggers: the loggers from the `logger` group (W&B offline without an API key,
named and grouped by sweep), the config as they may see it (secrets redacted, git commit), and the export and
data manifest as W&B artifacts."""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
from datetime import datetime
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from lmtune.artifacts.export import read_json
from lmtune.core.secrets import redact_override, redact_secrets
from lmtune.training.instantiate import build_all

log = logging.getLogger(__name__)


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
    """The `logger` group, built as `instantiate_callbacks` builds callbacks; a W&B logger with `offline: null`
    goes offline when there is no API key, and one with no `group` or `name` gets them from `wandb_identity`
    (grouped by sweep in a multirun)."""
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
    loggers = build_all(cfg, Logger, "logger")
    for logger in loggers:
        # Lightning passes `anonymous` to wandb.init even unset, and W&B answers each run with a deprecation line
        getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return loggers


def git_state(root) -> dict:
    """`git/sha` and `git/dirty` (tracked files changed) of the checkout at `root`; empty outside a git checkout."""
    try:
        run = functools.partial(subprocess.run, cwd=root, capture_output=True, text=True, timeout=10, check=True)
        sha = run(["git", "rev-parse", "HEAD"]).stdout.strip()
        dirty = bool(run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git/sha": sha, "git/dirty": dirty}


def loggable_config(cfg: DictConfig) -> dict:
    """What loggers get as hyperparameters: the resolved config, the command-line overrides and the git commit,
    with secrets redacted (see `redact_secrets`)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    if HydraConfig.initialized():
        config["hydra/overrides"] = [redact_override(o) for o in HydraConfig.get().overrides.task]
    config.update(git_state(cfg.paths.root_dir) if "paths" in cfg else {})
    return redact_secrets(config)


def log_artifacts(run, export: Path, data_manifest: Path, data_name: str) -> None:
    """The export as a `model` artifact and the data manifest (source, counts, skips, split sizes, label set)
    as a `dataset` artifact, both linked to `run`; an offline run keeps them for `wandb sync`."""
    import wandb

    model = wandb.Artifact(f"model-{run.id}", type="model", metadata=read_json(export / "formatting.json"))
    model.add_dir(str(export))
    run.log_artifact(model, aliases=["latest"])
    data = wandb.Artifact(_artifact_name(f"data-{data_name}"), type="dataset", metadata=read_json(data_manifest))
    data.add_file(str(data_manifest))
    run.log_artifact(data)


def _artifact_name(name: str) -> str:
    """W&B artifact names allow letters, digits, dashes, underscores and dots."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:128]
