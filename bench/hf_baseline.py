"""The baseline: fine-tuning the way most tutorials do it, with Hugging Face `Trainer` + peft.

- every example padded to the same fixed `max_length` (`padding="max_length"` in the tutorials);
- examples in random order (the Trainer's default sampler);
- the loss from `model(..., labels=...)`: logits over the full vocabulary at every position, then
  cross-entropy with the prompt and the padding masked (-100).

It trains on exactly the token sequences our `src/train.py` trains on (same data file, same split, same
`data.limit_train` slice, our chat formatting with the prompt masked), with the same model, adapter, batch
size, learning rate, precision, seed and number of steps, taken from the same Hydra overrides. So the
differences measured are the loop, the padding, the order and the logits, not the data.

    python bench/hf_baseline.py --out result.json -- experiment=lora_arxiv data.path=... trainer.max_steps=12
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

import hydra  # noqa: E402
from clock import StepClock, write_result  # noqa: E402

from lmtune.data.formatting import IGNORE_INDEX  # noqa: E402
from lmtune.model.loading import load_tokenizer, quantization_config, resolve_pretrained  # noqa: E402
from lmtune.model.module import parameter_counts  # noqa: E402


def padded_to(examples, max_length: int, pad_id: int) -> list[dict]:
    """Every example right-padded to `max_length`: the fixed-shape batches of the tutorials."""
    rows = []
    for e in examples:
        pad = max_length - len(e.input_ids)
        rows.append(
            {
                "input_ids": e.input_ids + [pad_id] * pad,
                "attention_mask": [1] * len(e.input_ids) + [0] * pad,
                "labels": e.labels + [IGNORE_INDEX] * pad,
            }
        )
    return rows


class ClockCallback(TrainerCallback):
    def __init__(self, clock: StepClock, trainer_ref: list):
        self.clock, self.trainer_ref = clock, trainer_ref

    def on_train_begin(self, args, state, control, **kwargs):
        self.clock.start(args.device)

    def on_step_end(self, args, state, control, **kwargs):
        real, padded = self.trainer_ref[0].last_batch_tokens
        self.clock.step(real, padded)


class TokenCountingTrainer(Trainer):
    """`Trainer` that remembers the real and padded token counts of the batch it just trained on."""

    last_batch_tokens = (0, 0)

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs["attention_mask"]
        self.last_batch_tokens = (int(mask.sum()), mask.numel())
        return super().training_step(model, inputs, num_items_in_batch)


def main(out: str, overrides: list[str], warmup_steps: int) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides)

    # the same papers and token sequences as our run
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    pretrained = resolve_pretrained(cfg.model, cfg.paths.cache_dir)
    tokenizer = load_tokenizer(pretrained, cfg.model.get("pad_token"))
    datamodule.tokenizer = tokenizer
    datamodule.setup("fit")
    train_rows = padded_to(datamodule.examples["train"], cfg.data.max_length, datamodule.collator.pad_token_id)

    on_cpu = cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available()
    quant = cfg.adapter.get("quantization")
    kwargs = {"dtype": getattr(torch, cfg.model.dtype)}
    if quant:
        kwargs.update(quantization_config=quantization_config(quant), device_map={"": "cpu" if on_cpu else 0})
    model = AutoModelForCausalLM.from_pretrained(pretrained, **kwargs)
    model.config.use_cache = False
    lora = LoraConfig(
        r=cfg.adapter.r,
        lora_alpha=cfg.adapter.alpha,
        lora_dropout=cfg.adapter.dropout,
        target_modules=list(cfg.adapter.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)

    args = TrainingArguments(
        output_dir=str(Path(out).parent / "hf_trainer"),
        per_device_train_batch_size=cfg.data.batch_size,
        max_steps=cfg.trainer.max_steps,
        learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=cfg.optim.warmup_steps,
        lr_scheduler_type="cosine",
        max_grad_norm=cfg.trainer.gradient_clip_val,
        bf16=str(cfg.trainer.precision).startswith("bf16"),
        use_cpu=on_cpu,
        seed=cfg.seed,
        logging_steps=cfg.trainer.log_every_n_steps,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=cfg.data.num_workers,
        remove_unused_columns=False,
    )
    clock, trainer_ref = StepClock(warmup_steps), []
    trainer = TokenCountingTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        data_collator=default_data_collator,
        callbacks=[ClockCallback(clock, trainer_ref)],
    )
    trainer_ref.append(trainer)
    trainer.train()
    result = {**clock.result(), **parameter_counts(model)}
    write_result(out, result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where the JSON result goes")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="the same Hydra overrides as the src/train.py run")
    args = parser.parse_args()
    main(args.out, args.overrides, args.warmup_steps)
