"""Where a training step's seconds go, ours vs the baseline, with torch.profiler on the same 8 papers.

Ours: dynamic padding to the longest of the 8, the decoder body, the LM head only at supervised positions.
Baseline: padded to `data.max_length`, `model(..., labels=...)` with full-vocabulary logits. Forward and
backward (no optimizer step) under the run's precision; the ops that take the most time and those that
allocate the most memory, for each side. With `compile=true` both sides run compiled decoder layers (Inductor's
fused kernels then appear as `graph_*` / `CompiledFunction` rows).

    python bench/profile_step.py experiment=lora_arxiv data.path=../shared/data/arxiv/arxiv_cs.jsonl data.max_length=512
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from hf_baseline import padded_to, training_data
from torch.profiler import ProfilerActivity, profile

from lmtune.model.architecture import compile_decoder_layers, head_logits
from lmtune.model.loading import load_model
from lmtune.model.loss import masked_lm_loss_sum


def main(overrides: list[str], steps: int, rows: int) -> None:
    cfg, datamodule, pretrained = training_data(overrides)
    examples = datamodule.examples["train"][: cfg.data.batch_size]
    pad_id = datamodule.collator.pad_token_id
    ours_batch = datamodule.collator(examples)
    fixed = padded_to(examples, cfg.data.max_length, pad_id)
    base_batch = {k: torch.tensor([r[k] for r in fixed]) for k in fixed[0]}

    model = load_model(pretrained, cfg.model, cfg.adapter, torch.device("cpu")).train()
    if cfg.compile is True:  # as the training module does
        compile_decoder_layers(model)
    bf16 = str(cfg.trainer.precision).startswith("bf16")
    print(
        f"precision {cfg.trainer.precision}, frozen base {cfg.model.dtype}, LoRA dropout {cfg.adapter.dropout}, "
        f"compile {cfg.compile}"
    )

    def ours():
        hidden = model.get_decoder()(
            input_ids=ours_batch["input_ids"], attention_mask=ours_batch["attention_mask"]
        ).last_hidden_state
        loss_sum, n = masked_lm_loss_sum(hidden, ours_batch["labels"], functools.partial(head_logits, model))
        return loss_sum / n

    def baseline():
        return model(**base_batch).loss

    def step(loss_fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        model.zero_grad(set_to_none=True)

    for name, fn, batch in (("ours", ours, ours_batch), ("baseline", baseline, base_batch)):
        step(fn)  # warm-up (and compilation)
        step(fn)
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(steps):
                step(fn)
        seconds = (time.perf_counter() - started) / steps
        real = int(batch["attention_mask"].sum())
        print(
            f"\n== {name}: batch {tuple(batch['input_ids'].shape)}, {real} real tokens, {seconds:.2f} s/step "
            f"(forward + backward, under the profiler), {real / seconds:.0f} real tokens/s"
        )
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))
        print(f"-- {name}: the ops that allocate the most memory (what the backward pass keeps alive)")
        print(table.table(sort_by="self_cpu_memory_usage", row_limit=rows, max_name_column_width=40))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("overrides", nargs="*")
    a = parser.parse_args()
    main(a.overrides, a.steps, a.rows)
