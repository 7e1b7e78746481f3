"""`python src/train.py experiment=smoke` end to end in a subprocess, logging to a real offline W&B run."""

import json
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, run_script
from helpers.wandb_files import read_run


def test_smoke_run_writes_checkpoints_export_metrics_and_wandb_files(tmp_path, cache_dir):
    run_dir = tmp_path / "runs" / "first"
    proc = run_script("train.py", "experiment=smoke", f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["test/acc"] <= 1.0 and "val/macro_f1" in metrics["val"]
    assert metrics["train"]["steps"] == 12 and metrics["train"]["tokens_per_s"] > 0
    # answers are a few tokens of each ~100-token example: supervised throughput is a small, positive share
    assert 0 < metrics["train"]["supervised_tokens_per_s"] < 0.2 * metrics["train"]["tokens_per_s"]

    export = run_dir / "export"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "labels.json", "config.yaml"):
        assert (export / name).is_file(), name
    assert yaml.safe_load((export / "config.yaml").read_text())["model"]["source"] == "tiny_random"

    # checkpoints hold trainable weights only: far smaller than the base model
    base = Path(json.loads((export / "formatting.json").read_text())["base_model"]) / "model.safetensors"
    ckpts = list((run_dir / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in ckpts} >= {"last.ckpt"} and len(ckpts) == 2
    assert max(p.stat().st_size for p in ckpts) < 0.2 * base.stat().st_size  # with optimizer state
    weights = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert weights and all("lora_" in k for k in weights)
    assert sum(v.numel() * v.element_size() for v in weights.values()) < 0.05 * base.stat().st_size

    # the offline W&B run (read from its .wandb file) holds the resolved config and the metrics
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    run = read_run(wandb_run)
    assert run["summary"]["final/test/acc"] == metrics["test"]["test/acc"]
    assert run["summary"]["val/acc"] == metrics["val"]["val/acc"]
    assert [h["train/loss"] for h in run["history"] if "train/loss" in h], "no training loss in the run history"
    assert run["summary"]["throughput/steps"] == 12
    # throughput and memory are also logged during training (every log_every_n_steps=2 steps)
    during = [h for h in run["history"] if "throughput/tokens_per_s" in h and "throughput/steps" not in h]
    assert len(during) == 6 and all(h["throughput/peak_memory_mb"] > 0 for h in during)
    assert all(
        0 <= h["throughput/padding_fraction"] < 1 and h["throughput/supervised_tokens_per_s"] > 0 for h in during
    )
    # MFU from Lightning's ThroughputMonitor, against this machine's measured matrix-product peak
    mfus = [h["throughput/mfu"] for h in during if "throughput/mfu" in h]
    assert len(mfus) >= 4 and all(0 < m < 1 for m in mfus)
    assert 0 < metrics["train"]["mfu"] < 1 and metrics["train"]["peak_flops"] > 1e9
    # the precision that `auto` resolved to, and the hardware it was decided on, are in the run's config
    assert run["config"]["trainer"]["precision"] == metrics["precision"] in ("bf16-mixed", "32-true")
    assert run["config"]["hardware"]["name"] == metrics["hardware"]["name"] and metrics["hardware"]["capability"]
    assert run["config"]["adapter"]["r"] == 2 and run["config"]["data"]["path"].endswith("arxiv_sample.jsonl")
    assert 0 < run["config"]["params/trainable_fraction"] < 0.1
    assert "W&B runs offline" in proc.stdout + proc.stderr
    # the export and the data manifest travel with the run as artifacts (uploaded by `wandb sync`)
    model, data = [a for a in run["artifacts"] if a["type"] in ("model", "dataset")]
    assert model["type"] == "model" and model["name"] == f"model-{run['run']['id']}" and "latest" in model["aliases"]
    assert set(model["files"]) == {p.name for p in export.iterdir() if p.is_file()}
    assert data["type"] == "dataset" and data["name"] == "data-arxiv_sample" and data["files"] == ["data_manifest.json"]
    manifest = json.loads((run_dir / "data_manifest.json").read_text())
    assert manifest["records"] == metrics["data"]["records"] and manifest["source_identity"]["size"] > 0
    # stderr is not a terminal here: training progress comes as log lines, at most every ~10% of the steps and 5 s
    # apart (the last line whenever it comes), so a few seconds of training write only the last
    progress = [line for line in proc.stderr.splitlines() if "training: " in line and " steps (" in line]
    assert "training: 12/12 steps (100%)" in progress[-1] and "steps/s" in progress[-1]
    times = [datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f") for line in progress[:-1]]
    assert all((b - a).total_seconds() >= 5 for a, b in zip(times, times[1:], strict=False)), progress
    # the run folder shows training whatever the logger: the loss every 2 steps and both validations in
    # metrics.jsonl and train.log (the step lines in the file only), and the curves
    points = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_points = [p for p in points if "train/loss" in p]
    assert [p["step"] for p in train_points] == [2, 4, 6, 8, 10, 12]
    assert all(p["train/loss"] > 0 and p["tokens_per_s"] > 0 and p["lr"] >= 0 for p in train_points)
    assert train_points[-1]["lr"] == 0 < train_points[0]["lr"]  # the cosine schedule, ending at 0
    validations = [p for p in points if "val/acc" in p]
    assert [p["step"] for p in validations] == [6, 12]
    assert metrics["val"] in [{k: p[k] for k in metrics["val"]} for p in validations]  # the best one's, as reported
    train_log = (run_dir / "train.log").read_text()
    assert "step 12/12 (epoch 2): loss " in train_log and "validation at step 6: acc " in train_log
    assert "step 12/12 (epoch 2)" not in proc.stderr and "validation at step 6: acc " in proc.stderr
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a quiet console: the project's lines and the result, none of the libraries' notices about themselves
    console = proc.stdout + proc.stderr
    for noise in (
        "pip install kernels",
        "GPU available",
        "Seed set",
        "💡 Tip",
        "wandb: ",
        "Loading weights",
        "Epoch 1/-",
    ):
        assert noise not in console, noise
    assert "FutureWarning" not in console and "deprecated" not in console
    assert len(console.splitlines()) <= 25, console  # 68 before the quiet console (issue 30)

    # a finished run is `runs/latest`, and says nothing failed
    assert (tmp_path / "runs" / "latest").resolve() == run_dir.resolve() and not (run_dir / "FAILED").exists()

    # a run that stops at start-up says so in its folder, and `latest` stays on the finished one
    failed = tmp_path / "runs" / "second"
    proc = run_script(
        "train.py",
        "experiment=smoke",
        "logger=none",
        f"hydra.run.dir={failed}",
        f"paths.cache_dir={cache_dir}",
        f"data.path={tmp_path}/missing.jsonl",
    )
    assert proc.returncode == 1
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert f"data file not found: {tmp_path}/missing.jsonl" in line
    assert (failed / "FAILED").read_text() == line + "\n"
    assert line in (failed / "train.log").read_text()
    assert (tmp_path / "runs" / "latest").resolve() == run_dir.resolve()


def test_a_config_typo_is_reported_before_torch_is_imported():
    """Hydra composes the config before the heavy imports (seconds), so a mistyped name is answered at once."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['src/train.py', 'experiment=lora_arxv']\n"
        "try:\n    runpy.run_path('src/train.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "Could not find 'experiment/lora_arxv'" in proc.stderr and "lora_arxiv" in proc.stderr
    assert proc.stdout.strip() == "torch imported: False"


def test_an_unreachable_hub_model_fails_at_once_in_one_line(tmp_path, cache_dir):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # a port nothing listens on: the hub "cannot be reached" at once
    endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    common = ["experiment=smoke", "logger=none", f"paths.cache_dir={cache_dir}", "model=qwen2_5_0_5b"]
    for n, (env, message) in enumerate(
        [
            ({"HF_ENDPOINT": endpoint}, "the Hugging Face hub (127.0.0.1) cannot be reached"),
            ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set and the model is not in the Hugging Face cache"),
        ]
    ):
        proc = run_script(
            "train.py", *common, f"hydra.run.dir={tmp_path / str(n)}", env={"HF_HOME": str(tmp_path), **env}
        )
        assert proc.returncode == 1, proc.stderr[-2000:]
        (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert message in line and "hf download Qwen/Qwen2.5-0.5B-Instruct" in line and "Traceback" not in proc.stderr


def test_a_missing_local_model_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    from lmtune.model.loading import ModelConfigError, reachable_model

    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelConfigError, match="model.name_or_path=models/my-base: no such folder in "):
        reachable_model("models/my-base")
    (tmp_path / "models" / "my-base").mkdir()
    assert reachable_model("models/my-base") == "models/my-base"
