"""The TF-IDF + logistic regression baseline: the LM's exact splits, the shared eval files, a real offline W&B run."""

import json
from pathlib import Path

import hydra
import matplotlib.image
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from conftest import ROOT, compose_train, run_script
from helpers.wandb_files import read_run
from lmtune.commands.baseline import run_baseline
from lmtune.core.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OUTPUT_FILES = ("eval_metrics.json", "predictions.jsonl", "confusion_matrix.png", "per_class.md")


def compose_baseline(overrides: list[str], output_dir: Path):
    """conf/baseline.yaml as `src/baseline.py` would see it, writing into `output_dir`."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("baseline.yaml", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def test_baseline_config_extends_train_config(tmp_path, cache_dir):
    overrides = ["experiment=lora_arxiv", "data.split_salt=x"]
    cfg = compose_baseline(overrides, tmp_path)
    assert cfg.task_name == "baseline" and cfg.baseline.train_on == "same" and cfg.baseline.split == "test"
    assert cfg.data.limit_train == 600 and cfg.data.limit_test == 400  # the experiment's data settings
    train_cfg = compose_train(overrides, tmp_path, cache_dir)
    assert OmegaConf.to_container(cfg.data) == OmegaConf.to_container(train_cfg.data)  # unresolved: ${...} kept
    assert cfg.data.split_salt == "x"


def test_evaluates_the_lm_test_split_and_writes_the_eval_files(tmp_path):
    cfg = compose_baseline(["experiment=smoke", "logger=none"], tmp_path)
    metrics = run_baseline(cfg)

    lm_data = hydra.utils.instantiate(cfg.data)  # what the LM trains and tests on
    lm_data.prepare_data()
    lm_splits = lm_data.load_splits()
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r.id for r in lm_splits["test"]]
    assert [r["true"] for r in rows] == [r.label for r in lm_splits["test"]]
    assert metrics["acc"] >= 0.9 and metrics["n"] == len(lm_splits["test"])
    # 3 labels, top-3 written: all the probability mass
    assert all(len(r["probs"]) == 3 and sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-4) for r in rows)

    for name in OUTPUT_FILES:
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    png = tmp_path / "confusion_matrix.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and min(image.shape[:2]) > 100
    saved = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert saved["metrics"]["acc"] == metrics["acc"] and saved["labels"] == lm_data.labels
    assert saved["model"] == "tfidf+logreg" and saved["split"] == "test" and saved["train_on"] == "same"
    assert saved["train_examples"] == len(lm_splits["train"]) and saved["data"]["test_examples"] == len(rows)


def test_train_on_all_ignores_the_train_limit_only(tmp_path):
    same = compose_baseline(["experiment=smoke", "logger=none", "data.limit_train=10"], tmp_path / "same")
    every = compose_baseline(
        ["experiment=smoke", "logger=none", "data.limit_train=10", "baseline.train_on=all"], tmp_path / "all"
    )
    run_baseline(same)
    run_baseline(every)
    meta = {name: json.loads((tmp_path / name / "eval_metrics.json").read_text()) for name in ("same", "all")}

    full = hydra.utils.instantiate(same.data, limit_train=None)
    full_train = len(full.load_splits()["train"])
    assert meta["same"]["train_examples"] == 10 < meta["all"]["train_examples"] == full_train
    ids = {name: [json.loads(line)["id"] for line in (tmp_path / name / "predictions.jsonl").open()] for name in meta}
    assert ids["same"] == ids["all"]  # the evaluated split is the same either way


def test_bad_settings_are_user_errors(tmp_path):
    cfg = compose_baseline(
        ["experiment=smoke", "logger=none", "baseline.split=train", "baseline.train_on=most"], tmp_path
    )
    with pytest.raises(UserError, match=r"baseline\.train_on='most'[\s\S]*baseline\.split='train'"):
        run_baseline(cfg)
    cfg = compose_baseline(["experiment=smoke", "logger=none", "data.val_fraction=0", "baseline.split=val"], tmp_path)
    with pytest.raises(UserError, match="the val split is empty"):
        run_baseline(cfg)


def test_cli_logs_to_an_offline_wandb_run(tmp_path):
    proc = run_script("baseline.py", "experiment=smoke", "logger=wandb", f"hydra.run.dir={tmp_path}", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads((tmp_path / "eval_metrics.json").read_text())
    acc = saved["metrics"]["acc"]
    assert f"tfidf+logreg test: accuracy {acc:.4f}" in proc.stdout

    (wandb_run,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_run(wandb_run)
    assert run["summary"]["baseline/test/acc"] == acc
    assert run["summary"]["baseline/test/macro_f1"] == saved["metrics"]["macro_f1"]
    assert run["config"]["task_name"] == "baseline" and run["config"]["baseline"]["train_on"] == "same"
