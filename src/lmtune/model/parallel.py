"""FSDP2 for adapters: shard each decoder layer with `fully_shard`, checkpoint only the trainable weights.

Lightning's `ModelParallelStrategy` is FSDP2's front door, but two of its defaults are wrong for LoRA:
its device mesh is (nodes x GPUs per node) data x tensor parallel, and its checkpoints gather every weight
(the frozen base included) or write a sharded folder. `FSDP2Strategy` shards over all processes
(pure data parallel) and writes one ordinary `.ckpt` on rank 0 holding only the gathered adapter weights
and optimizer state, so DDP, FSDP and single-device checkpoints are the same small file and resume alike.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

from lmtune.model.architecture import decoder_layers


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter; a collective when sharded: call on every rank."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def is_sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def shard_decoder(causal_lm: torch.nn.Module, mesh) -> None:
    """`fully_shard` every decoder layer, then the causal LM (embeddings, final norm, head) as the root unit.

    Per-layer units keep peak memory at one unsharded layer; one unit for the whole model would use
    more memory than DDP. FSDP2 shards parameter by parameter, so frozen base weights and trainable
    LoRA weights can share a unit and the base never needs `requires_grad`. The root unit gathers its
    weights in the causal LM's `forward`, so under FSDP every pass must go through that forward.
    """
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(causal_lm):
        fully_shard(layer, mesh=mesh)
    fully_shard(causal_lm, mesh=mesh)


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` as plain FSDP2: every process is a data-parallel shard, adapter-only checkpoints."""

    def __init__(self, **kwargs):
        kwargs.setdefault("save_distributed_checkpoint", False)
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        # all processes shard the model (data parallel); no tensor parallelism
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict:
        """The trainable weights, gathered (every rank takes part; the frozen base is never gathered)."""
        return self.lightning_module.trainable_state_dict()
