"""GPU: QLoRA with bf16-mixed on CUDA (run with `make test-gpu` on a CUDA machine)."""

import pytest
import torch

from conftest import compose_train
from lmtune.training.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_adapter_trains_with_bf16_mixed_on_cuda(adapter, tmp_path, cache_dir):
    import bitsandbytes as bnb

    cfg = compose_train(
        ["experiment=smoke", f"adapter={adapter}", "trainer=gpu", "logger=none", "model.dtype=bfloat16"],
        tmp_path,
        cache_dir,
    )
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    metrics, objects = train(cfg)
    module = objects["module"]
    assert all(p.device.type == "cuda" for p in module.parameters())
    quantized = [m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert bool(quantized) == (adapter == "qlora")
    lora_b = {k: v for k, v in module.trainable_state_dict().items() if "lora_B" in k}
    assert lora_b and all(v.float().abs().sum() > 0 and torch.isfinite(v).all() for v in lora_b.values())
    assert all(v.dtype == torch.float32 for v in lora_b.values())  # adapters train in fp32 over a bf16 base
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


def _train_cli(out, *overrides):
    from conftest import run_script

    result = run_script("train.py", "experiment=smoke", "logger=none", f"hydra.run.dir={out}", *overrides, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)


def test_fsdp2_with_qlora_on_one_gpu_trains_the_adapter(tmp_path):
    """FSDP2 over 4-bit weights stored as bf16 (set by the config check): finite loss, every LoRA B moves."""
    ckpt = _train_cli(
        tmp_path,
        "adapter=qlora",
        "trainer=fsdp",
        "trainer.devices=1",
        "model.dtype=bfloat16",
        "report.enabled=false",
    )
    assert ckpt["global_step"] == 12
    lora_b = {k: v for k, v in ckpt["state_dict"].items() if "lora_B" in k}
    assert lora_b and all(torch.isfinite(v).all() and v.float().abs().sum() > 0 for v in lora_b.values())
    summary = (tmp_path / "metrics.json").read_text()
    assert '"val/loss": NaN' not in summary


def test_compile_on_cuda_gives_the_same_loss(tmp_path, cache_dir):
    losses = {}
    for compile in (False, True):
        cfg = compose_train(
            ["experiment=smoke", "trainer=gpu", "logger=none", "trainer.max_steps=2", f"compile={compile}"],
            tmp_path / str(compile),
            cache_dir,
        )
        cfg.report.enabled = False
        metrics, _ = train(cfg)
        losses[compile] = metrics["val/loss"]
    assert losses[True] == pytest.approx(losses[False], abs=2e-2)  # bf16 autocast; kernels differ
