"""This machine's matrix-product limits, the yardsticks for the training step's FLOP/s.

- peak: large square products (2048³, 4096³) in fp32 and bf16, the best of them; on CUDA beside the datasheet
  figure. MFU is reported against this.
- model-shaped: the products one training step of the model makes per decoder layer, at the batch's token
  count T, in the step's compute dtype: the forward `x·Wᵀ` and the input gradient `dy·W` of every adapted
  projection (q, k, v, o, gate, up, down; the frozen weights take no weight gradient). Their FLOP-weighted
  rate is the most a training step could reach if it did nothing but its own matrix products.

    python bench/roofline.py --tokens 3400                 (SmolLM2-135M shapes, fp32 and bf16)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import project_config
from transformers import AutoConfig

from lmtune.model.loading import resolve_pretrained
from lmtune.model.precision import cpu_hardware
from lmtune.training.throughput import peak_flops


def _seconds_per_call(fn, device: torch.device, seconds: float) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= 3:
            return elapsed / n


def layer_shapes(model_cfg) -> list[tuple[str, int, int]]:
    """(name, in, out) of each linear projection in one decoder layer."""
    hidden, inter = model_cfg.hidden_size, model_cfg.intermediate_size
    head_dim = getattr(model_cfg, "head_dim", None) or hidden // model_cfg.num_attention_heads
    q, kv = model_cfg.num_attention_heads * head_dim, model_cfg.num_key_value_heads * head_dim
    return [
        ("q_proj", hidden, q),
        ("k_proj", hidden, kv),
        ("v_proj", hidden, kv),
        ("o_proj", q, hidden),
        ("gate_proj", hidden, inter),
        ("up_proj", hidden, inter),
        ("down_proj", inter, hidden),
    ]


@torch.no_grad()
def model_shaped(shapes, tokens: int, dtype: torch.dtype, device: torch.device, seconds: float = 0.15) -> dict:
    """FLOP-weighted rate of a layer's forward and input-gradient products at `tokens` rows."""
    total_flops = total_seconds = 0.0
    per_op = {}
    for name, d_in, d_out in shapes:
        w = torch.randn(d_out, d_in, dtype=dtype, device=device)
        x = torch.randn(tokens, d_in, dtype=dtype, device=device)
        dy = torch.randn(tokens, d_out, dtype=dtype, device=device)
        flops = 2 * tokens * d_in * d_out
        fwd = _seconds_per_call(lambda x=x, w=w: torch.nn.functional.linear(x, w), device, seconds)
        bwd = _seconds_per_call(lambda dy=dy, w=w: dy @ w, device, seconds)
        per_op[name] = {"forward_gflops": flops / fwd / 1e9, "input_grad_gflops": flops / bwd / 1e9}
        total_flops += 2 * flops
        total_seconds += fwd + bwd
    return {"gflops": total_flops / total_seconds / 1e9, "per_op": per_op}


@torch.no_grad()
def square(size: int, dtype: torch.dtype, device: torch.device, seconds: float = 0.5) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    # x·Wᵀ as a linear layer computes it: a plain bf16 `a @ b` runs in a generic kernel on CPUs without native bf16
    return 2 * size**3 / _seconds_per_call(lambda: torch.nn.functional.linear(a, b), device, seconds) / 1e9


def bench(model_overrides: list[str], tokens: int, device: str = "cpu", quick: bool = False, dtypes=None) -> dict:
    """`quick`: small squares and short timings, for the smoke form (checks the code, not the machine).

    `dtypes` default: fp32 and bf16, except on a CPU without bf16 support, where bf16 is left out: torch runs
    its input-gradient products (`dy·W`) in a generic kernel there (measured on an AVX2 EPYC: about 1 GFLOP/s,
    minutes per product), and `auto` never picks it."""
    sizes, seconds = ((256,), 0.01) if quick else ((2048, 4096), 0.15)
    cfg = project_config("train", model_overrides)
    shapes = layer_shapes(AutoConfig.from_pretrained(resolve_pretrained(cfg.model, cfg.paths.cache_dir)))
    dev = torch.device(device)
    out = {"device": device, "tokens": tokens, "shapes": shapes, "dtypes": {}, "skipped": {}}
    if dev.type == "cpu":
        hw = cpu_hardware()
        out["cpu"] = {"name": hw.name, "capability": hw.capability, "native_bf16": hw.native_bf16}
        if dtypes is None and not (hw.native_bf16 or hw.bf16_supported):
            dtypes = ("float32",)
            out["skipped"]["bfloat16"] = "no bf16 support on this CPU (products run in a generic kernel)"
    for name in dtypes or ("float32", "bfloat16"):
        dtype = getattr(torch, name)
        squares = {str(n): round(square(n, dtype, dev, 3 * seconds), 1) for n in sizes}
        shaped = model_shaped(shapes, tokens, dtype, dev, seconds)
        out["dtypes"][name] = {
            "square_gflops": squares,
            "peak_gflops": max(squares.values()),
            "model_shaped_gflops": round(shaped["gflops"], 1),
            "per_op": shaped["per_op"],
        }
    if dev.type == "cuda":
        out["datasheet_bf16_gflops"] = (peak_flops(dev, "bf16-mixed") or 0) / 1e9 or None
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=3400, help="rows of each product: a batch's token count")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides naming the model (default SmolLM2-135M)")
    a = parser.parse_args()
    print(json.dumps(bench(a.overrides, a.tokens, a.device), indent=2))
