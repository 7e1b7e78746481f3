"""Answers written during validation (`val_answers.count`), so that a sweep or the best checkpoint can be chosen by
what the model writes (`val/chrf`, `val/rougeL`, `val/exact_match`) and not only by its loss on the references.

The first `count` validation conversations that training's formatting kept are answered greedily at the end of
each validation (not the sanity check), one at a time as in the report. Under DDP each process answers every
world-size-th conversation and torchmetrics' states are summed across processes before the metrics are computed,
so every process logs the same corpus-level numbers. FSDP is refused where the config is checked: its shards
gather at every forward pass, and processes writing answers of different lengths would wait on each other.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from lmtune.core.errors import DataError
from lmtune.tasks.generate.predictor import ChatPredictor, prompt_and_reference

log = logging.getLogger(__name__)

METRICS = ("chrf", "rougeL", "exact_match")  # logged as val/<name>


class ValidationAnswers(Callback):
    def __init__(self, count: int, max_new_tokens: int = 64):
        self.count, self.max_new_tokens = int(count), int(max_new_tokens)

    def _conversations(self, trainer) -> list[tuple[list[dict], str]]:
        datamodule = trainer.datamodule
        kept = {e.id for e in datamodule.examples["val"]}
        records = [r for r in datamodule.splits["val"] if r.id in kept][: self.count]
        mine = records[trainer.global_rank :: trainer.world_size]
        return [prompt_and_reference(datamodule.formatter.task.messages(r.fields)) for r in mine]

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.count <= 0:
            return
        from torchmetrics.text import CHRFScore, ROUGEScore

        device = pl_module.device
        chrf, rouge = CHRFScore().to(device), ROUGEScore(rouge_keys="rougeL").to(device)
        predictor = ChatPredictor(pl_module.causal_lm, trainer.datamodule.formatter, precision=trainer.precision)
        same, answered = 0, 0
        for messages, reference in self._conversations(trainer):
            try:
                answer = predictor.answer(messages, max_new_tokens=self.max_new_tokens).text
            except DataError:  # its last user turn cannot fit max_length: not counted, as in the report
                continue
            chrf.update([answer], [[reference]])
            rouge.update([answer], [reference])
            same += " ".join(answer.split()) == " ".join(reference.split())
            answered += 1
        totals = trainer.strategy.reduce(
            torch.tensor([same, answered], dtype=torch.float64, device=device), reduce_op="sum"
        )
        values = {
            "val/chrf": float(chrf.compute()) * 100,  # compute() sums the states across processes
            "val/rougeL": float(rouge.compute()["rougeL_fmeasure"]),
            "val/exact_match": float(totals[0] / max(float(totals[1]), 1.0)),
        }
        pl_module.log_dict(values, sync_dist=False)
        if trainer.state.fn == TrainerFn.FITTING:  # beside the module's own: the best checkpoint's metrics after fit
            pl_module.validations.setdefault(trainer.global_step, {}).update(values)
        if trainer.is_global_zero:
            log.info(
                "validation answers (%d conversations): chrF %.1f, ROUGE-L %.3f, exact match %.3f",
                int(totals[1]),
                values["val/chrf"],
                values["val/rougeL"],
                values["val/exact_match"],
            )
