"""LoRA's update accumulated straight into the frozen layer's output: `y = x·Wᵀ (+ b)`, then `y += (s·x·Aᵀ)·Bᵀ`
in place, as one matrix product with beta=1.

peft computes `y + lora_B(lora_A(x)) * s`: the `T x out` product of B, a scaled copy of it and a sum, three
passes over the layer's largest activation in the forward and one more (the scaling's gradient) in the
backward. Here the scale goes on the `T x r` hidden state and the product of B is added into `y` by the GEMM
itself. Measured on a 2-core AVX2 EPYC in fp32 (bench/README.md), those passes were about a tenth of a
SmolLM2 training step. Under autocast the input is not cast to the adapter's fp32 first (peft does, and
autocast casts it straight back to bf16).

Same parameters (names, shapes, dtypes), so checkpoints, exports and `merge_and_unload` are unchanged. Only
the plain case is taken over (an `nn.Linear` base, one active unmerged adapter, no dropout, no DoRA or other
variant, no extra arguments); anything else runs peft's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear


class FusedLoraLinear(LoraLinear):
    """peft's LoRA `Linear` with the adapter's product accumulated in place into the frozen layer's output."""

    def _fusable_adapter(self, x: torch.Tensor, args, kwargs) -> str | None:
        """The active adapter's name if this call is the plain case, else None (peft's forward runs)."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
            return None
        if not isinstance(self.lora_dropout[name], torch.nn.Identity):
            return None
        weights = (self.base_layer.weight, self.lora_A[name].weight, self.lora_B[name].weight)
        # without autocast, mixed dtypes follow peft's rules (adapter in its own dtype, result cast back)
        if not torch.is_autocast_enabled(x.device.type) and any(w.dtype != x.dtype for w in weights):
            return None
        return name

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fusable_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        rows = x.reshape(-1, x.shape[-1])
        out = F.linear(rows, self.base_layer.weight, self.base_layer.bias)  # 2-D, not a view: updated in place
        hidden = F.linear(rows, self.lora_A[name].weight) * self.scaling[name]  # T x r: the cheap place to scale
        out.addmm_(hidden.to(out.dtype), self.lora_B[name].weight.t().to(out.dtype))
        return out.view(*x.shape[:-1], out.shape[-1])


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Switch every plain peft LoRA `Linear` (an `nn.Linear` base) in `model` to `FusedLoraLinear`; returns how
    many. QLoRA's 4-bit layers and other layer types keep peft's forward."""
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear:
            module.__class__ = FusedLoraLinear
            count += 1
    return count
