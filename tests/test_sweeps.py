"""Hydra sweeps as a user runs them (`python src/train.py -m ...` in a subprocess, tiny model, offline W&B):
one folder and one W&B run per job, grouped by the sweep, with its own config and metrics and no secrets; a failed
job that does not take its run or the rest of the sweep with it; an Optuna search that saves its best params."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from conftest import ROOT, compose_train, run_script
from helpers.wandb_files import read_run
from lmtune.core.errors import UserError
from lmtune.core.secrets import REDACTED, redact_override, redact_secrets
from lmtune.model.precision import frozen_dtype
from lmtune.training.config import config_problems
from lmtune.training.train import optimized_metric

SECRET = "hf_test-secret-that-must-never-be-logged"
HPARAMS_SEARCHES = sorted(p.stem for p in (ROOT / "conf" / "hparams_search").glob("*.yaml"))
FAST = ("experiment=smoke", "report.enabled=false")  # the report's zero-shot and TF-IDF runs are tested elsewhere


def _sweep(sweep_dir: Path, cache_dir: Path, *overrides: str, multirun: bool = True):
    flags = ["-m"] if multirun else []  # hparams_search sets hydra.mode=MULTIRUN itself
    return run_script(
        "train.py",
        *flags,
        *FAST,
        *overrides,
        f"hydra.sweep.dir={sweep_dir}",
        f"paths.cache_dir={cache_dir}",
        timeout=240,
    )


def _wandb_run(job_dir: Path) -> dict:
    (run_dir,) = (job_dir / "wandb").glob("offline-run-*")  # exactly one run per job folder
    return read_run(run_dir)


def _losses(run: dict) -> list[float]:
    return [h["train/loss"] for h in run["history"] if "train/loss" in h]


def test_grid_sweep_gives_each_job_its_folder_and_wandb_run_grouped_by_sweep(tmp_path, cache_dir, monkeypatch):
    # a secret the way it should reach a config: from the environment, so the command line never holds it
    monkeypatch.setenv("LMTUNE_TEST_TOKEN", SECRET)
    sweep = tmp_path / "grid"
    proc = _sweep(sweep, cache_dir, "adapter.r=4,8", "+secrets.hf_token=${oc.env:LMTUNE_TEST_TOKEN}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]

    runs = [_wandb_run(sweep / str(job)) for job in (0, 1)]
    for job, (rank, run) in enumerate(zip((4, 8), runs, strict=True)):
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())
        assert run["config"]["adapter"]["r"] == rank and f"adapter.r={rank}" in run["config"]["hydra/overrides"]
        assert run["summary"]["val/acc"] == metrics["val"]["val/acc"]
        assert run["summary"]["final/test/acc"] == metrics["test"]["test/acc"]
        assert run["run"]["group"] == "grid" and run["exit_code"] == 0
        assert run["run"]["name"].startswith(f"train-{job} ") and f"adapter.r={rank}" in run["run"]["name"]
        # the resolved config, with the secret redacted, in the config, the overrides and the run name
        assert run["config"]["secrets"] == REDACTED and "+secrets.hf_token=***REDACTED***" in run["run"]["name"]
        assert "+secrets.hf_token=***REDACTED***" in run["config"]["hydra/overrides"]
        # as composed, with `auto` resolved for this machine (the dtype) and for the settings (the source)
        composed = yaml.safe_load((sweep / str(job) / ".hydra" / "config.yaml").read_text())["model"]
        resolved = frozen_dtype(composed["dtype"], run["config"]["trainer"]["precision"], "lora")
        assert composed["dtype"] == composed["source"] == "auto"
        assert run["config"]["model"] == {**composed, "dtype": resolved, "source": "tiny_random"}
        if (ROOT / ".git").exists():
            assert re.fullmatch(r"[0-9a-f]{40}", run["config"]["git/sha"])
    assert runs[0]["run"]["id"] != runs[1]["run"]["id"]
    assert _losses(runs[0]) and _losses(runs[1]) and _losses(runs[0]) != _losses(runs[1])  # each its own training
    # nowhere in the sweep (W&B files, exported config.yaml, Hydra's .hydra/) does the secret's value appear
    leaks = [p for p in sweep.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks, leaks


def test_failed_job_is_marked_failed_and_the_next_job_gets_its_own_run(tmp_path, cache_dir):
    # job 0: AdamW refuses the weight decay when fit starts, after its W&B run has begun; job 1 is fine
    sweep = tmp_path / "failing"
    proc = _sweep(sweep, cache_dir, "optim.weight_decay=-1.0,0.0", "+note=${seed}")
    assert proc.returncode != 0 and "Invalid weight_decay value: -1.0" in proc.stderr
    failed, ok = _wandb_run(sweep / "0"), _wandb_run(sweep / "1")
    assert failed["exit_code"] == 1 and not _losses(failed)  # closed as failed, and job 1 logged nothing into it
    assert ok["exit_code"] == 0 and ok["run"]["id"] != failed["run"]["id"] and ok["run"]["group"] == "failing"
    assert ok["config"]["optim"]["weight_decay"] == 0.0 and _losses(ok) and "val/acc" in ok["summary"]
    assert ok["run"]["name"].endswith(r"optim.weight_decay=0.0 +note=$\{seed\}")  # the override, unresolved
    assert (sweep / "1" / "metrics.json").is_file()


@pytest.mark.slow  # a third sweep; the failed-job case above runs in make test
def test_config_error_in_one_job_does_not_end_the_sweep(tmp_path, cache_dir):
    sweep = tmp_path / "invalid"
    proc = _sweep(sweep, cache_dir, "logger=none", "optim.lr=0,5e-3")
    assert proc.returncode != 0 and "optim.lr=0: must be positive" in proc.stderr
    assert not (sweep / "0" / "metrics.json").exists() and (sweep / "1" / "metrics.json").is_file()


@pytest.mark.slow  # a search of several trials; the grid sweep above runs in make test
def test_optuna_search_returns_val_acc_and_saves_the_best_params(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the sweep extra: pip install -e .[sweep]")
    sweep = tmp_path / "optuna"
    proc = _sweep(sweep, cache_dir, "hparams_search=arxiv_optuna", "hydra.sweeper.n_trials=2", multirun=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"optim.lr", "adapter.r", "adapter.alpha", "adapter.dropout"}
    val_acc = {job: json.loads((sweep / job / "metrics.json").read_text())["val"]["val/acc"] for job in ("0", "1")}
    assert isinstance(results["best_value"], float) and results["best_value"] == max(val_acc.values())
    best_job = next(job for job, acc in val_acc.items() if acc == results["best_value"])
    config = yaml.safe_load((sweep / best_job / ".hydra" / "config.yaml").read_text())
    assert config["adapter"]["r"] == results["best_params"]["adapter.r"] in (4, 8, 16, 32)
    assert config["optim"]["lr"] == pytest.approx(results["best_params"]["optim.lr"])
    assert 1e-5 <= config["optim"]["lr"] <= 1e-3
    assert "Best parameters: {'optim.lr'" in proc.stdout and "Best value: " in proc.stdout
    assert {_wandb_run(sweep / job)["run"]["group"] for job in ("0", "1")} == {"optuna"}


@pytest.mark.parametrize("search", HPARAMS_SEARCHES)
def test_hparams_search_composes_after_the_experiment(search, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the sweep extra: pip install -e .[sweep]")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train.yaml", [f"hparams_search={search}", "experiment=smoke"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
    assert cfg.hydra.sweeper.params and cfg.optimized_metric == "val/acc"
    assert config_problems(compose_train(["experiment=smoke", f"hparams_search={search}"], tmp_path, tmp_path)) == []


@pytest.mark.parametrize("launcher", ["submitit_slurm", "slurm_gpu"])
def test_slurm_launcher_composes(launcher):
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher", reason="needs the sweep extra: pip install -e .[sweep]"
    )
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train.yaml", [f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == (1 if launcher == "slurm_gpu" else None)


def test_redact_secrets_hides_secret_values_and_keeps_token_names():
    config = {
        "model": {"eot_token": "<|eot_id|>", "pad_token": None, "hf_token": "hf_abc"},
        "logger": {"wandb": {"settings": {"api_key": "k" * 40}}},
        "db": {"password": "p", "url": "postgresql://me:pw@host/db", "urls": ["https://host/a@b"]},
        "client_secret": 1,
        "max_new_tokens": 8,
    }
    redacted = redact_secrets(config)
    assert redacted["model"] == {"eot_token": "<|eot_id|>", "pad_token": None, "hf_token": REDACTED}
    assert redacted["logger"]["wandb"]["settings"]["api_key"] == REDACTED and redacted["client_secret"] == REDACTED
    assert redacted["db"] == {
        "password": REDACTED,
        "url": f"postgresql://me:{REDACTED}@host/db",
        "urls": ["https://host/a@b"],
    }
    assert redacted["max_new_tokens"] == 8 and config["model"]["hf_token"] == "hf_abc"  # the input is left alone
    assert redact_override("+logger.wandb.api_key=abc") == f"+logger.wandb.api_key={REDACTED}"
    assert redact_override("adapter.r=4,8") == "adapter.r=4,8"


def test_redaction_covers_cloud_credentials_and_tokens_in_urls():
    cloud = {
        "aws": {"access_key": "AKIA", "aws_secret_access_key": "s", "session_token": "t", "region": "eu"},
        "azure": {"sas_token": "sv=2024", "connection_string": "AccountKey=k", "container": "runs"},
        "gcp": {"credentials": "{...}", "oauth_token": "ya29", "id_token": "ey"},
        "db": {"dsn": "postgres://u:p@h/db"},
        "data": {"path": "https://blob.example/data.jsonl?sv=2024&sig=SIGNATURE&se=2025", "max_length": 256},
        "links": [
            "https://hub.example/file?token=abc123#frag",
            "https://s3.example/x?X-Amz-Credential=AKIA&X-Amz-Signature=deadbeef&X-Amz-Expires=60",
            "https://api.example/v1?api_key=k1&page=2",
        ],
        "model": {"pad_token": "<pad>", "eos_token": "</s>", "name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    }
    redacted = redact_secrets(cloud)
    for group in ("aws", "azure", "gcp", "db"):
        kept = {k for k, v in redacted[group].items() if v != REDACTED}
        assert kept == ({"region"} if group == "aws" else {"container"} if group == "azure" else set()), group
    assert redacted["data"] == {
        "path": f"https://blob.example/data.jsonl?sv=2024&sig={REDACTED}&se=2025",
        "max_length": 256,
    }
    assert redacted["links"] == [
        f"https://hub.example/file?token={REDACTED}#frag",
        f"https://s3.example/x?X-Amz-Credential={REDACTED}&X-Amz-Signature={REDACTED}&X-Amz-Expires=60",
        f"https://api.example/v1?api_key={REDACTED}&page=2",
    ]
    assert redacted["model"] == cloud["model"]  # vocabulary items and model ids are not secrets


def test_missing_optimized_metric_names_the_logged_ones():
    with pytest.raises(UserError, match=r"optimized_metric='val/f1' was not logged \(available: test/acc, val/acc\)"):
        optimized_metric({"val/acc": 0.5, "test/acc": 0.4}, "val/f1")
    assert optimized_metric({"val/acc": 0.5}, "val/acc") == 0.5
