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
from pathlib import Path

import hydra
import torch
from clock import StepClock, write_result
from common import project_config
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from lmtune.data.formatting import IGNORE_INDEX
from lmtune.model.loading import load_model, load_tokenizer, resolve_pretrained
from lmtune.model.module import parameter_counts, training_flops_per_token
from lmtune.training.config import prepare_config


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


def training_data(overrides: list[str]):
    """(config, data module set up for fit, model folder) of the run these overrides describe: the same papers
    and token sequences as `src/train.py` with them."""
    cfg = project_config("train", overrides)
    prepare_config(cfg)  # checked, and every `auto` decided, exactly as src/train.py does
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    pretrained = resolve_pretrained(cfg.model, cfg.paths.cache_dir)
    datamodule.tokenizer = load_tokenizer(pretrained, cfg.model.get("pad_token"), cfg.model.get("chat_template"))
    datamodule.setup("fit")
    return cfg, datamodule, pretrained


class TokenCountingTrainer(Trainer):
    """`Trainer` that remembers the real and padded token counts of the batch it just trained on."""

    last_batch_tokens = (0, 0)

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs["attention_mask"]
        self.last_batch_tokens = (int(mask.sum()), mask.numel())
        return super().training_step(model, inputs, num_items_in_batch)


class ClockCallback(TrainerCallback):
    def __init__(self, clock: StepClock, trainer: TokenCountingTrainer):
        self.clock, self.trainer = clock, trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.clock.start(args.device)

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.step(*self.trainer.last_batch_tokens)


def main(out: str, overrides: list[str], warmup_steps: int) -> dict:
    cfg, datamodule, pretrained = training_data(overrides)
    train_rows = padded_to(datamodule.examples["train"], cfg.data.max_length, datamodule.collator.pad_token_id)

    on_cpu = cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available()
    # the same base model and peft LoRA (QLoRA: 4-bit, placed at load) as ours; no activation checkpointing,
    # as in the tutorials, whatever model.gradient_checkpointing says
    model = load_model(pretrained, cfg.model, cfg.adapter, torch.device("cpu" if on_cpu else "cuda:0"))

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
        fp16=str(cfg.trainer.precision).startswith("16"),
        use_cpu=on_cpu,
        seed=cfg.seed,
        logging_steps=cfg.trainer.log_every_n_steps,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=cfg.data.num_workers,
        remove_unused_columns=False,
    )
    clock = StepClock(warmup_steps)
    trainer = TokenCountingTrainer(
        model=model, args=args, train_dataset=train_rows, data_collator=default_data_collator
    )
    trainer.add_callback(ClockCallback(clock, trainer))
    trainer.train()
    result = {
        **clock.result(),
        **parameter_counts(model),
        "flops_per_token": training_flops_per_token(model),
        "precision": str(cfg.trainer.precision),
    }
    write_result(out, result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where the JSON result goes")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="the same Hydra overrides as the src/train.py run")
    args = parser.parse_args()
    main(args.out, args.overrides, args.warmup_steps)
