"""GPU: QLoRA with bf16-mixed on CUDA (run with `make test-gpu` on a CUDA machine)."""

import pytest
import torch

from conftest import compose_train
from lmtune.pipeline import train

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
