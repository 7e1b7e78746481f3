"""Estimated accelerator memory of LoRA and QLoRA training for each model preset, at the flagship's batch.

    python bench/preset_memory.py            # the table the presets and README quote
    python bench/preset_memory.py --batch 16 --max-length 512

The presets cannot be downloaded here, so this is arithmetic on each model's published shape (its config.json),
not a measurement:
- weights: bf16 2 bytes per weight; 4-bit NF4 with double quantization ~0.52 bytes per weight of the decoder
  layers' linear layers, the embedding and the output head kept in bf16 (bitsandbytes does not quantize them);
- LoRA r=16 on every linear layer of the decoder layers: fp32 weight, gradient and two AdamW moments, 16 bytes
  each;
- activations kept for the backward pass, bf16, per token and decoder layer: 32 x hidden + 8 x intermediate
  bytes (the inputs of the seven projections, attention's q/k/v/output, the MLP's gate/up/activation/product,
  the norms' fp32 inputs); the loss projects only the answer positions, so no batch x length x vocabulary logits;
- 1 GB for the runtime (CUDA context, allocator slack, workspace).
Checked against measurements of the whole process's peak memory on CPU in bf16-mixed (GB = 1e9 bytes):
- SmolLM2-135M at batch 8 x 512: 5.3 GB measured (AMD EPYC Zen 4), 5.1 GB estimated;
- the Llama-3.2-1B shape (random weights), LoRA at batch 8 x 256: 8.3 GB measured (Intel Xeon with AMX,
  results/2026-12-05-vm-intel-xeon-amx-preset-memory.json), 7.9 GB estimated;
so the estimate runs about 5% low on a CPU. QLoRA's 4-bit footprint is a GPU figure that a CPU cannot measure (there
the process peak includes bitsandbytes' CPU quantization of the fp32 checkpoint: 8.9 GB). With
`model.gradient_checkpointing=mlp` the activations are about half, with `true` about one hidden vector per token
and layer.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Shape:
    """A model's published shape (config.json)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int | None = None
    extra_params: float = 0  # weights outside the decoder and embeddings, e.g. Gemma 3 4B's vision tower

    def attention_widths(self) -> tuple[int, int]:
        d = self.head_dim or self.hidden // self.heads
        return self.heads * d, self.kv_heads * d

    def layer_linears(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer (fused or not, the same weights)."""
        q, kv = self.attention_widths()
        h, i = self.hidden, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def params(self) -> dict[str, float]:
        linear = self.layers * sum(a * b for a, b in self.layer_linears())
        embedding = self.vocab * self.hidden * (1 if self.tied else 2)
        return {"linear": linear, "embedding": embedding, "extra": self.extra_params}

    def lora_params(self, r: int = 16) -> int:
        return self.layers * sum(r * (a + b) for a, b in self.layer_linears())


# conf/model/<preset>.yaml -> the published shape of its hub checkpoint
SHAPES = {
    "smollm2_135m": Shape(576, 30, 9, 3, 1536, 49152, True),
    "smollm2_360m": Shape(960, 32, 15, 5, 2560, 49152, True),
    "smollm2_1_7b": Shape(2048, 24, 32, 32, 8192, 49152, True),
    "llama3_2_1b": Shape(2048, 16, 32, 8, 8192, 128256, True),
    "llama3_2_3b": Shape(3072, 28, 24, 8, 8192, 128256, True),
    "llama3_1_8b": Shape(4096, 32, 32, 8, 14336, 128256, False),
    "qwen2_5_0_5b": Shape(896, 24, 14, 2, 4864, 151936, True),
    "qwen2_5_1_5b": Shape(1536, 28, 12, 2, 8960, 151936, True),
    "qwen2_5_7b": Shape(3584, 28, 28, 4, 18944, 152064, False),
    "qwen3_0_6b": Shape(1024, 28, 16, 8, 3072, 151936, True, head_dim=128),
    "qwen3_4b": Shape(2560, 36, 32, 8, 9728, 151936, True, head_dim=128),
    "qwen3_8b": Shape(4096, 36, 32, 8, 12288, 151936, False, head_dim=128),
    "gemma3_1b": Shape(1152, 26, 4, 1, 6912, 262144, True, head_dim=256),
    "gemma3_4b": Shape(2560, 34, 8, 4, 10240, 262208, True, head_dim=256, extra_params=0.42e9),
    "gemma2_2b": Shape(2304, 26, 8, 4, 9216, 256000, True, head_dim=256),
    "phi3_5_mini": Shape(3072, 32, 32, 32, 8192, 32064, False),
    "phi4_mini": Shape(3072, 32, 24, 8, 8192, 200064, True),
    "mistral_7b_v0_3": Shape(4096, 32, 32, 8, 14336, 32768, False),
}


def estimate(shape: Shape, batch: int = 8, max_length: int = 256, r: int = 16) -> dict[str, float]:
    """Parameters (billions) and estimated peak memory (GB) of LoRA in bf16 and of QLoRA (4-bit base)."""
    p = shape.params()
    adapters = 16 * shape.lora_params(r)
    activations = batch * max_length * shape.layers * (32 * shape.hidden + 8 * shape.intermediate)
    runtime = 1 * GB
    bf16 = 2 * (p["linear"] + p["embedding"] + p["extra"])
    nf4 = 0.52 * p["linear"] + 2 * (p["embedding"] + p["extra"])
    return {
        "params_b": sum(p.values()) / 1e9,
        "lora_bf16_gb": (bf16 + adapters + activations + runtime) / GB,
        "qlora_4bit_gb": (nf4 + adapters + activations + runtime) / GB,
    }


def table(batch: int = 8, max_length: int = 256) -> dict[str, dict[str, float]]:
    return {name: estimate(shape, batch, max_length) for name, shape in SHAPES.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="data.batch_size (the flagship's: 8)")
    parser.add_argument("--max-length", type=int, default=256, help="data.max_length (the flagship's: 256)")
    args = parser.parse_args()
    print(f"| preset | params | LoRA bf16 | QLoRA 4-bit |  (batch {args.batch} x {args.max_length} tokens, r=16)")
    print("|---|---|---|---|")
    for name, row in table(args.batch, args.max_length).items():
        print(f"| {name} | {row['params_b']:.2f} B | {row['lora_bf16_gb']:.1f} GB | {row['qlora_4bit_gb']:.1f} GB |")


if __name__ == "__main__":
    main()
