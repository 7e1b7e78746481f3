"""DDP and FSDP2 with 2 processes on CPU (gloo), through `src/train.py` as users run it.

Lightning starts the second process by re-running the command line, so these are subprocess tests.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import SAMPLE, run_script

CPU_2 = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
QUIET = ["logger=none", "report.enabled=false"]


def train_cli(out, *overrides: str, timeout: int = 300):
    result = run_script(
        "train.py",
        "experiment=smoke",
        f"hydra.run.dir={out}",
        *overrides,
        timeout=timeout,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def trainable_weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def uneven_answers(tmp_path) -> str:
    """The sample with categories whose answers are 4, 7 and 9 tokens long for the tiny tokenizer.

    With equal answer lengths a mean of per-batch means equals the token mean; uneven ones tell them apart.
    """
    rename = {"cs.CL": "cs.CL", "cs.CV": "math.OC", "cs.RO": "q-bio.NC"}
    path = tmp_path / "uneven.jsonl"
    with path.open("w") as out:
        for line in SAMPLE.read_text().splitlines():
            record = json.loads(line)
            record["primary_category"] = rename[record["primary_category"]]
            record["categories"] = [rename.get(c, c) for c in record["categories"]]
            out.write(json.dumps(record) + "\n")
    return str(path)


def first_step_gradients(tmp_path, name: str, *overrides: str) -> dict[str, torch.Tensor]:
    """Gradients of optimizer step 1 on the same 8 training papers (`data.limit_train=8`), however batched."""
    grads = tmp_path / f"{name}.pt"
    train_cli(
        tmp_path / name,
        *QUIET,
        f"data.path={uneven_answers(tmp_path)}",
        "data.limit_train=8",
        "trainer.max_steps=1",
        "trainer.gradient_clip_val=null",
        "adapter.dropout=0.0",  # dropout masks would depend on how the papers are batched
        "trainer.precision=32-true",  # equal up to fp32 rounding, on every machine (auto may pick bf16)
        "trainer.val_check_interval=1",
        "+callbacks.grad_probe._target_=conftest.GradProbe",
        f"+callbacks.grad_probe.path={grads}",
        *overrides,
    )
    return torch.load(grads)


@pytest.mark.slow  # five training processes, a minute; the families' FSDP gradients are checked in make test-slow too
def test_lora_gradients_are_equal_across_accumulation_ranks_and_fsdp(tmp_path):
    one_batch = first_step_gradients(tmp_path, "one_batch_of_8", "data.batch_size=8")
    accumulated = first_step_gradients(
        tmp_path, "accumulate_2x4", "data.batch_size=4", "trainer.accumulate_grad_batches=2"
    )
    ddp = first_step_gradients(tmp_path, "ddp_2x4", "trainer=ddp", *CPU_2, "data.batch_size=4")
    fsdp = first_step_gradients(tmp_path, "fsdp_2x4", "trainer=fsdp", *CPU_2, "data.batch_size=4")

    assert one_batch and all("lora_" in name for name in one_batch)
    # LoRA B starts at zero, so step 1 moves only B: its gradients are the ones to compare
    assert all(g.abs().sum() > 0 for name, g in one_batch.items() if "lora_B" in name)
    for other in (accumulated, ddp, fsdp):
        assert set(other) == set(one_batch)
        for name, grad in one_batch.items():
            torch.testing.assert_close(other[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """DDP trained 12 steps straight (`make test`)."""
    tmp = tmp_path_factory.mktemp("distributed")
    train_cli(tmp / "ddp", "trainer=ddp", *CPU_2, "logger=none")
    return tmp


@pytest.fixture(scope="module")
def fsdp_runs(ddp_run):
    """FSDP trained 6 steps (of a 12-step schedule), then resumed to 12, beside the DDP run."""
    train_cli(
        ddp_run / "fsdp_first",
        "trainer=fsdp",
        *CPU_2,
        *QUIET,
        "+callbacks.stop._target_=conftest.StopAtStep",
        "+callbacks.stop.step=6",
    )
    resumed = train_cli(
        ddp_run / "fsdp_resumed",
        "trainer=fsdp",
        *CPU_2,
        "logger=none",
        f"ckpt_path={ddp_run / 'fsdp_first' / 'checkpoints' / 'last.ckpt'}",
    )
    return ddp_run, resumed


def test_ddp_trains_checkpoints_only_the_adapter_and_exports_it_for_peft(ddp_run):
    run = ddp_run / "ddp"
    weights = trainable_weights(run)
    assert weights and all("lora_" in name for name in weights)  # no frozen base weights in the checkpoint
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["train"]["steps"] == 12
    # each val/test paper counted once: the ranks' shares are evened out with repeats the metrics skip
    report = json.loads((run / "eval_metrics.json").read_text())
    assert report["metrics"]["n"] == summary["data"]["test_examples"] == 17
    # the report scores the test split in one process: the 2-process test/acc must equal it
    assert report["metrics"]["acc"] == pytest.approx(summary["test"]["test/acc"], abs=1e-6)

    # the export is the best checkpoint's adapter, and peft loads it
    best = torch.load(summary["best_checkpoint"], weights_only=False)["state_dict"]
    formatting = json.loads((run / "export" / "formatting.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(formatting["base_model"], dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, run / "export")
    exported = load_file(run / "export" / "adapter_model.safetensors")
    assert len(exported) == len(best) == len(weights)
    for name, value in reloaded.state_dict().items():
        if "lora_" in name:
            torch.testing.assert_close(value, best[f"model.{name}"], rtol=0, atol=0, msg=name)


@pytest.mark.slow  # two more 2-process runs, a minute
def test_fsdp_resumes_mid_run_and_ends_where_ddp_ends(fsdp_runs):
    tmp, resumed = fsdp_runs
    first = torch.load(tmp / "fsdp_first" / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 6
    assert first["state_dict"] and all("lora_" in name for name in first["state_dict"])
    assert "Restoring states from the checkpoint" in resumed.stderr + resumed.stdout

    ddp, fsdp = trainable_weights(tmp / "ddp"), trainable_weights(tmp / "fsdp_resumed")
    assert set(ddp) == set(fsdp)
    for name, value in ddp.items():
        torch.testing.assert_close(fsdp[name], value, rtol=1e-4, atol=1e-6, msg=name)
    ddp_metrics = json.loads((tmp / "ddp" / "metrics.json").read_text())
    fsdp_metrics = json.loads((tmp / "fsdp_resumed" / "metrics.json").read_text())
    assert fsdp_metrics["train"]["steps"] == 12
    for key, value in ddp_metrics["val"].items():
        assert fsdp_metrics["val"][key] == pytest.approx(value, abs=1e-5), key
    # the FSDP run's export (gathered from the shards) holds the same adapter
    exported = load_file(tmp / "fsdp_resumed" / "export" / "adapter_model.safetensors")
    assert len(exported) == len(fsdp)
