"""Runs that survive being killed: SIGTERM or SIGKILL mid-epoch, rerun with `ckpt_path=last` (or the run
folder), and the run ends with the same adapter weights and metrics as one that was never interrupted.
Checkpoint writes are atomic: a SIGKILL during a save leaves the previous checkpoint, never a broken one.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from safetensors.torch import load_file

from conftest import ROOT, compose_train
from helpers.wandb_files import read_run
from lmtune.artifacts.checkpoint_saving import AtomicCheckpointIO, LatestCheckpoint
from lmtune.artifacts.checkpoints import resolve_ckpt_path
from lmtune.core.errors import UserError
from lmtune.training.task_wrapper import Terminated, task_wrapper
from lmtune.training.train import train

# 16 steps over two epochs of 8 batches, validation every 4 steps, a periodic last.ckpt every 5
COMMON = [
    "experiment=smoke",
    "report.enabled=false",
    "trainer.max_steps=16",
    "trainer.val_check_interval=4",
    "callbacks.model_checkpoint.every_n_train_steps=5",
]
THROTTLE = ["+callbacks.throttle._target_=test_resume.Throttle", "+callbacks.throttle.seconds=0.25"]
KILL_AFTER_STEP = 5  # the first periodic checkpoint: mid-epoch, past a validation


class Throttle(L.Callback):
    """Slows each training step, so a test can kill the run mid-epoch (the tiny model trains in milliseconds)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_start(self, *args):
        time.sleep(self.seconds)


def start_train(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """`python src/train.py` in the background, deterministic on CPU (one thread), offline, logs to a file."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.out", "w")  # outside run_dir, which Hydra may find non-empty
    return subprocess.Popen(
        [sys.executable, str(ROOT / "src" / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 120) -> tuple[int, str]:
    rc = proc.wait(timeout=timeout)
    return rc, (run_dir.parent / f"{run_dir.name}.out").read_text()


def wait_for_step(proc: subprocess.Popen, ckpt: Path, step: int, timeout: float = 90) -> int:
    """Polls `ckpt` (safe to read while it is rewritten, since writes are atomic) until it holds `step` or later."""
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        assert proc.poll() is None, "training ended before it could be killed"
        if ckpt.is_file() and ckpt.stat().st_mtime_ns != seen:
            seen = ckpt.stat().st_mtime_ns
            current = torch.load(ckpt, weights_only=False)["global_step"]
            if current >= step:
                return current
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint for step {step} in {ckpt} after {timeout}s")


def assert_same_run(run: Path, reference: Path) -> None:
    """Same adapter (export and last.ckpt), same final val/test metrics, same number of steps."""
    adapter, expected = (load_file(d / "export" / "adapter_model.safetensors") for d in (run, reference))
    assert set(adapter) == set(expected) and expected
    for key, value in expected.items():
        torch.testing.assert_close(adapter[key], value, rtol=0, atol=1e-6, msg=key)
    last, expected_last = (torch.load(d / "checkpoints/last.ckpt", weights_only=False) for d in (run, reference))
    assert last["global_step"] == expected_last["global_step"] == 16
    for key, value in expected_last["state_dict"].items():
        torch.testing.assert_close(last["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    metrics, expected_metrics = (json.loads((d / "metrics.json").read_text()) for d in (run, reference))
    for split in ("val", "test"):
        assert set(metrics[split]) == set(expected_metrics[split])
        torch.testing.assert_close(metrics[split], expected_metrics[split], rtol=0, atol=1e-6)
    assert Path(metrics["best_checkpoint"]).name == Path(expected_metrics["best_checkpoint"]).name
    # the run folder's curve covers the whole run from step 0, the same losses and validations
    points, expected_points = (
        [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (run, reference)
    )
    assert [(p["step"], sorted(p)) for p in points] == [(p["step"], sorted(p)) for p in expected_points]
    for p, q in zip(points, expected_points, strict=True):
        for key in set(p) - {"tokens_per_s"}:
            assert p[key] == pytest.approx(q[key], abs=1e-6), (p, q)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run that both kill tests must end up matching."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    rc, out = finish(start_train(run_dir, *COMMON, "logger=csv"), run_dir)
    assert rc == 0, out[-3000:]
    # top-k is ranked at validations (every 4 steps) with their own metric, not at the periodic saves
    best = Path(json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"])
    assert torch.load(best, weights_only=False)["global_step"] % 4 == 0, best
    return run_dir


def test_sigterm_stops_at_a_step_and_ckpt_path_last_resumes_it(tmp_path, reference):
    runs = tmp_path / "logs" / "train" / "runs"
    killed, resumed = runs / "2030-01-01_00-00-00", runs / "2030-01-01_00-10-00"
    proc = start_train(killed, *COMMON, *THROTTLE, "logger=wandb")
    wait_for_step(proc, killed / "checkpoints/last.ckpt", KILL_AFTER_STEP)
    time.sleep(0.1)  # into the next step, which has no periodic checkpoint
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc, killed)
    assert rc == 143, out[-3000:]  # 128 + SIGTERM, as a shell reports it: not a success
    assert time.monotonic() - sent < 20, "SIGTERM must stop the run after the current step"
    assert f"stopped by SIGTERM; resume with: python src/train.py {' '.join(COMMON)}" in out
    assert "Traceback" not in out
    (wandb_run,) = killed.glob("wandb/offline-run-*")
    assert read_run(wandb_run)["exit_code"] == 143  # the W&B run was finished, as failed
    stopped_at = torch.load(killed / "checkpoints/last.ckpt", weights_only=False)["global_step"]
    assert KILL_AFTER_STEP < stopped_at < 16  # saved at the end of the step it was in, not only periodically
    assert f"SIGTERM: saved {killed / 'checkpoints/last.ckpt'} at step {stopped_at}; stopping" in out

    proc = start_train(resumed, *COMMON, "logger=csv", "ckpt_path=last", f"paths.log_dir={tmp_path / 'logs'}")
    rc, out = finish(proc, resumed)
    assert rc == 0, out[-3000:]
    assert f"resuming from {killed / 'checkpoints/last.ckpt'}" in out
    assert_same_run(resumed, reference)


@pytest.mark.slow  # a second interrupted run; sigterm's resume is in make test
def test_sigkill_mid_epoch_then_resume_from_the_run_folder(tmp_path, reference):
    killed, resumed = tmp_path / "killed", tmp_path / "resumed"
    proc = start_train(killed, *COMMON, *THROTTLE, "logger=csv")
    wait_for_step(proc, killed / "checkpoints/last.ckpt", KILL_AFTER_STEP)
    proc.kill()
    rc, _ = finish(proc, killed)
    assert rc == -signal.SIGKILL
    for ckpt in (killed / "checkpoints").glob("*.ckpt"):
        assert torch.load(ckpt, weights_only=False)["global_step"] >= 4, ckpt

    rc, out = finish(start_train(resumed, *COMMON, "logger=csv", f"ckpt_path={killed}"), resumed)
    assert rc == 0, out[-3000:]
    assert_same_run(resumed, reference)


def test_sigterm_outside_the_training_loop_ends_the_run_with_status_143(tmp_path):
    """Model loading, export: no Lightning handler there, so the task wrapper's stops the run (cleanly)."""

    @task_wrapper
    def loading_a_model(cfg):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as stopped:
        loading_a_model(OmegaConf.create({"paths": {"output_dir": str(tmp_path)}}))
    assert stopped.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is before


def _save_forever(path: Path) -> None:
    payload = torch.arange(8 * 2**20, dtype=torch.float32)  # 32 MiB: each save takes tens of milliseconds
    io = AtomicCheckpointIO()
    for step in range(10**9):
        io.save_checkpoint({"step": step, "weights": payload, "check": payload.sum()}, path)


def test_sigkill_during_checkpoint_writes_never_leaves_a_broken_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    payload = torch.arange(8 * 2**20, dtype=torch.float32)
    # spawn, not fork: a fork of this process (torch thread pools already running) can deadlock in torch.save
    spawn = multiprocessing.get_context("spawn")
    rng = random.Random(0)
    steps = []
    for _ in range(12):
        writer = spawn.Process(target=_save_forever, args=(path,))
        writer.start()
        while not path.exists():
            assert writer.is_alive(), "the checkpoint writer failed"
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        checkpoint = torch.load(path, weights_only=True)  # a truncated file fails here
        assert torch.equal(checkpoint["weights"], payload) and checkpoint["check"] == payload.sum()
        steps.append(checkpoint["step"])
    assert max(steps) > 0, "the writer never rewrote the checkpoint: the kills proved nothing"
    assert [p.name for p in path.parent.glob("*.ckpt")] == ["last.ckpt"]  # leftovers of killed saves: *.tmp only


def test_latest_checkpoint_makes_the_trainer_write_atomically(tmp_path):
    callback = LatestCheckpoint(dirpath=tmp_path)
    trainer = L.Trainer(callbacks=[callback], logger=False, accelerator="cpu", enable_progress_bar=False)
    callback.setup(trainer, L.LightningModule(), "fit")
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def _touch_ckpt(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": 0}, path)  # resolving reads it: a truncated file is refused
    os.utime(path, (mtime, mtime))
    return path


def test_ckpt_path_names_last_a_run_folder_or_a_file(tmp_path):
    runs = tmp_path / "logs" / "train" / "runs"
    older = _touch_ckpt(runs / "b-started-later-killed-earlier" / "checkpoints" / "last.ckpt", 1_000)
    newer = _touch_ckpt(runs / "a-started-first-killed-last" / "checkpoints" / "last.ckpt", 2_000)
    best = _touch_ckpt(runs / "a-started-first-killed-last" / "checkpoints" / "step000004-acc0.5.ckpt", 1_500)
    assert resolve_ckpt_path(None, runs) is None
    assert resolve_ckpt_path("last", runs) == str(newer)  # the one written last, whatever the folder names
    assert resolve_ckpt_path(str(older.parent.parent), runs) == str(older)  # a run folder
    assert resolve_ckpt_path(str(older.parent), runs) == str(older)  # its checkpoints folder
    assert resolve_ckpt_path(str(best), runs) == str(best)  # a file


def test_ckpt_path_that_names_nothing_is_a_one_line_user_error(tmp_path, cache_dir):
    with pytest.raises(UserError, match=r"ckpt_path=last: no run has written .*/runs/\*/checkpoints/last.ckpt"):
        resolve_ckpt_path("last", tmp_path / "runs")
    with pytest.raises(UserError, match="no such file or folder"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path)
    _touch_ckpt(tmp_path / "run" / "checkpoints" / "step000004-acc0.5.ckpt", 1_000)
    with pytest.raises(UserError, match=r"no checkpoints/last.ckpt in that folder \(it holds step000004-acc0.5.ckpt"):
        resolve_ckpt_path(str(tmp_path / "run"), tmp_path)

    cfg = compose_train(["experiment=smoke", "logger=none", "ckpt_path=last"], tmp_path / "out", cache_dir)
    with open_dict(cfg):
        cfg.paths.log_dir = str(tmp_path / "empty-logs")
    with pytest.raises(UserError, match="ckpt_path=last"):
        train(cfg)  # before loading any data or model


def test_a_checkpoint_s_run_log_keeps_only_records_it_can_draw(tmp_path):
    """The run log's history comes from a checkpoint, which may be anyone's: what is not a record of numbers is
    left out, and the curves still draw."""
    from lmtune.training.run_log import RunLog

    run_log = RunLog(tmp_path, stats=None)
    junk = [{"train/loss": 2.0}, "x", {"step": 3, "val/acc": "0.5"}, {"step": "4"}]
    run_log.load_state_dict({"points": [{"step": 2, "train/loss": 1.0}, *junk], "losses": [0.5, "x"]})
    assert run_log.points == [{"step": 2, "train/loss": 1.0}] and run_log._losses == [0.5]
    assert run_log.draw().read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
