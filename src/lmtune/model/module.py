"""The LightningModule: a causal LM with LoRA/QLoRA adapters trained to answer with a label.

Feature flags and their trade-offs:
- adapter.kind=lora: only LoRA matrices train (a fraction of a percent of the weights); checkpoints hold
  only them, so they are megabytes. adapter.kind=none trains every weight (full fine-tuning).
- adapter.quantization (QLoRA): the frozen base is stored as 4-bit NF4 via bitsandbytes and dequantized
  on the fly; saves memory, costs some speed. The model is created in `configure_model`, already placed,
  because bitsandbytes weights must not be moved or recast afterwards.
- gradient_checkpointing: recomputes activations in the backward pass (less memory, about a third
  slower); non-reentrant, so LoRA weights still get gradients. "mlp" recomputes only the MLP blocks, whose
  activations are the largest (selective checkpointing).
- The loss projects onto the vocabulary only where a label is supervised (see `loss.py`); validation
  and test score every label's full answer (`scoring.py`) for accuracy and macro-F1.
- The loss is a mean over every supervised token of an optimizer step: all micro-batches of a gradient
  accumulation window on all ranks (`on_before_optimizer_step`), not a mean of per-batch means.
- Under FSDP (`trainer=fsdp`) each decoder layer is sharded in `configure_model` (`parallel.py`);
  `compile=true` compiles each decoder layer in place (parameter names, checkpoints and exports unchanged).
"""

from __future__ import annotations

import functools
import logging
import math

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import get_cosine_schedule_with_warmup

from lmtune.core.errors import UserError
from lmtune.data.batching import packed_attention
from lmtune.model.architecture import compile_decoder_layers, head_logits
from lmtune.model.loading import load_model
from lmtune.model.loss import masked_lm_loss_sum, masked_lm_loss_sum_via_forward
from lmtune.model.parallel import full_tensor, shard_decoder
from lmtune.model.scoring import SharedPrefix, as_attention_mask, rank_scores
from lmtune.model.weights import check_weights_fit

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """The loss became NaN or inf; the message names the step and the ids of the rows in the batch."""


def _is_4bit(p: torch.Tensor) -> bool:
    return getattr(p, "quant_state", None) is not None


def _size(p: torch.Tensor) -> int:
    """Weights a parameter stands for: a 4-bit weight counts as its full shape, not its packed storage."""
    return math.prod(p.quant_state.shape) if _is_4bit(p) else p.numel()


def parameter_counts(module: torch.nn.Module) -> dict:
    """Total and trainable parameters: the LoRA trainable fraction belongs in every run's config.

    A 4-bit weight counts as the weight it stands for (`quant_state.shape`), not its packed storage.
    """
    sizes = [(_size(p), p.requires_grad) for p in module.parameters()]
    total = sum(n for n, _ in sizes)
    trainable = sum(n for n, grad in sizes if grad)
    return {
        "params/total": total,
        "params/trainable": trainable,
        "params/trainable_fraction": trainable / max(total, 1),
    }


def training_flops_per_token(causal_lm) -> int:
    """Matrix-product FLOPs of one trained token: 6 per trained weight (forward 2, input gradient 2, weight
    gradient 2), 4 per frozen weight (no weight gradient): 6·N for full fine-tuning, 4·N_frozen + 6·N_adapter
    with LoRA/QLoRA. The embedding and the LM head are left out (a lookup, and a projection that our loss
    applies at the answer positions only), as is attention's sequence-length term."""
    tables = {id(m.weight) for m in (causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()) if m}
    flops = 0
    for p in causal_lm.parameters():
        if id(p) not in tables:
            flops += (6 if p.requires_grad else 4) * _size(p)
    return flops


class CausalLMModule(L.LightningModule):
    """A causal LM trained on its supervised tokens; validation and test measure the answers' loss (a mean over
    every supervised token of the split) and perplexity. Task kinds extend the evaluation (`CausalLMClassifier`)."""

    def __init__(
        self,
        pretrained: str,
        model_cfg: dict,
        adapter_cfg: dict,
        optim_cfg: dict,
        pad_token_id: int,
        gradient_checkpointing: bool | str = False,
        compile: bool = False,
        **task,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the run's full config is logged by train()
        self.model = None  # built in configure_model
        # checkpoints hold only trainable weights; the frozen base comes from `pretrained`
        self.strict_loading = False
        self.eval_loss = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})
        self._window_tokens = 0  # supervised tokens in this optimizer step's micro-batches, this rank
        self.validations: dict[int, dict[str, float]] = {}  # global step -> val metrics (see _log_eval)
        # matrix-product FLOPs of the last training batch, read by Lightning's ThroughputMonitor (TrainingStats)
        self.flops_per_token = 0
        self.flops_per_batch = 0

    # --- model -----------------------------------------------------------------------------------------
    def configure_model(self, device: torch.device | None = None) -> None:
        """Build the model on this process's device; under FSDP, shard it layer by layer."""
        if self.model is not None:
            return
        hp = self.hparams
        if device is None:
            device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        self.model = load_model(hp.pretrained, hp.model_cfg, hp.adapter_cfg, device, hp.gradient_checkpointing)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps module modes as found
        if hp.get("compile"):
            compile_decoder_layers(self.causal_lm)
        if self._device_mesh is not None:  # set by ModelParallelStrategy (trainer=fsdp)
            shard_decoder(self.causal_lm, self._device_mesh["data_parallel"])

    def on_fit_start(self) -> None:
        counts = parameter_counts(self)
        self.flops_per_token = training_flops_per_token(self.causal_lm)
        log.info(
            "parameters: %s trainable of %s (%.2f %%); %.2f GFLOP per trained token",
            f"{counts['params/trainable']:,}",
            f"{counts['params/total']:,}",
            100 * counts["params/trainable_fraction"],
            self.flops_per_token / 1e9,
        )
        for logger in self.loggers:
            logger.log_hyperparams(counts)

    @property
    def causal_lm(self):
        """The transformers model (inside the PeftModel wrapper when adapters are attached)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def supervised_loss(self, batch: dict, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over the answer tokens and their count (`weights`: per position, see `loss.py`)."""
        lm = self.causal_lm
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "segments" in batch:  # packed rows (data.packing): attention inside each example, positions from 0
            mask = as_attention_mask(lm, packed_attention(batch["segments"]))
            inputs.update(attention_mask=mask, position_ids=batch["position_ids"])
        if self._device_mesh is not None:  # FSDP: the head's weights are gathered only in lm.forward
            return masked_lm_loss_sum_via_forward(lm, {**batch, **inputs}, weights)
        hidden = lm.get_decoder()(**inputs).last_hidden_state
        return masked_lm_loss_sum(hidden, batch["labels"], functools.partial(head_logits, lm), weights)

    def token_weights(self, batch: dict) -> torch.Tensor | None:
        """A training weight per position (None: every supervised token counts 1); the classifier's class weights."""
        return None

    # --- steps -----------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss_sum, n_tokens = self.supervised_loss(batch, self.token_weights(batch))
        self.flops_per_batch = self.flops_per_token * int(batch["attention_mask"].sum())
        loss = loss_sum / n_tokens.float().clamp(min=1e-6)
        self._window_tokens += float(n_tokens)  # with class weights: the summed weight of the tokens
        if not torch.isfinite(loss):
            ids = batch.get("ids", [])
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}, batch "
                f"{batch_idx}; row ids {', '.join(map(str, ids[:8]))}{' ...' if len(ids) > 8 else ''}). Stopped "
                f"instead of training on garbage: lower optim.lr, keep gradient clipping on, try "
                f"trainer.precision=32-true, or check those rows; resume from the last good checkpoint."
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        # the gradient of the summed loss; on_before_optimizer_step divides by the step's token count
        return loss_sum

    def on_before_optimizer_step(self, optimizer) -> None:
        """Make the step's gradient that of the mean loss over all its supervised tokens (before clipping).

        Lightning divides each micro-batch's loss by `accumulate_grad_batches` and DDP/FSDP average the
        gradients over ranks, so the gradients here are sum(token losses) / (accumulation x ranks).
        Multiplying by accumulation x ranks / (supervised tokens of the step, summed over ranks) gives the
        token-level mean, however unevenly the answer tokens fall across micro-batches and ranks.
        """
        tokens = torch.tensor(float(self._window_tokens), device=self.device)
        self._window_tokens = 0
        tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum")
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / max(float(tokens), 1.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)  # a float: FSDP's gradients are DTensors

    def _eval_step(self, batch: dict, stage: str) -> None:
        # under DDP/FSDP, examples repeated only to give every rank as many batches don't count
        batch = {**batch, "labels": batch["labels"].masked_fill(~batch["real"].to(self.device)[:, None], -100)}
        loss_sum, n_tokens = self.supervised_loss(batch)
        self.eval_loss[stage].update(loss_sum.float() / n_tokens.clamp(min=1), weight=n_tokens.clamp(min=1))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_metrics(self, stage: str) -> dict:
        loss = self.eval_loss[stage].compute()
        self.eval_loss[stage].reset()
        return {f"{stage}/loss": loss, f"{stage}/perplexity": torch.exp(loss)}

    def _log_eval(self, stage: str) -> None:
        computed = self._eval_metrics(stage)
        self.log_dict(computed, prog_bar=True)
        if stage == "val" and self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking:
            # what each validation during training measured, by step: the best checkpoint's metrics after fit
            # need no second pass over the validation split (a kind's callbacks may have added theirs)
            self.validations.setdefault(self.global_step, {}).update({k: float(v) for k, v in computed.items()})

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # --- optimisation ----------------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.hparams.optim_cfg
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=tuple(cfg["betas"]))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = cfg["warmup_steps"] if cfg["warmup_steps"] >= 1 else int(cfg["warmup_steps"] * total)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints: trainable weights only -----------------------------------------------------------
    def trainable_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights, whole (gathered when FSDP-sharded: call on every rank)."""
        return {n: full_tensor(p.detach()) for n, p in self.named_parameters() if p.requires_grad}

    def standalone_copy(self, trainable: dict[str, torch.Tensor], device: torch.device) -> CausalLMModule:
        """An unsharded module on `device` with the given trainable weights (from `trainable_state_dict`)."""
        copy = type(self)(**self.hparams)
        copy.configure_model(device)
        copy.load_state_dict(trainable, strict=False)
        return copy.to(device) if not self.hparams.adapter_cfg.get("quantization") else copy

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        names = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
        # every rank's RNG (their dropout masks differ), so a resumed run draws what an uninterrupted one would
        states = [torch.get_rng_state()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, torch.get_rng_state())
        checkpoint["torch_rng_states"] = states

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.model is not None and "state_dict" in checkpoint:  # FSDP2Strategy has loaded it already
            where = str(self.trainer.ckpt_path) if self._trainer is not None else "the checkpoint"
            labels, ours = checkpoint.get("hyper_parameters", {}).get("labels"), self.hparams.get("labels")
            if labels is not None and list(labels) != list(ours or []):
                raise UserError(
                    f"{where}: trained on the labels {list(labels)}, this run has {list(ours or [])}; "
                    f"resume with the data and label settings it was trained with, or start afresh."
                )
            fix = "Resume with the model and adapter settings it was trained with, or start afresh."
            params = dict(self.named_parameters())
            check_weights_fit(checkpoint["state_dict"], params, self.trainable_names(), where, fix)
        states = checkpoint.get("torch_rng_states") or [checkpoint.get("torch_rng_state")]
        if states[0] is not None:
            torch.set_rng_state(states[self.global_rank] if self.global_rank < len(states) else states[0])


class CausalLMClassifier(CausalLMModule):
    """The classify kind's module: validation and test rank-score every label's full answer (`scoring.py`) for
    accuracy and macro-F1; the loss is the true label's answer loss from the same scores."""

    def __init__(
        self,
        pretrained: str,
        model_cfg: dict,
        adapter_cfg: dict,
        optim_cfg: dict,
        labels: list[str],
        answer_ids: list[list[int]],
        pad_token_id: int,
        gradient_checkpointing: bool | str = False,
        compile: bool = False,
        prompt_opening: list[int] | None = None,
        class_weights: list[float] | None = None,
    ):
        super().__init__(
            pretrained,
            model_cfg,
            adapter_cfg,
            optim_cfg,
            pad_token_id,
            gradient_checkpointing,
            compile,
            labels=labels,
            answer_ids=answer_ids,
            prompt_opening=prompt_opening,
            class_weights=class_weights,
        )
        num_classes = len(labels)
        # `loss.class_weights`: each training example's tokens weigh its label's weight (validation stays unweighted)
        weights = torch.tensor(class_weights if class_weights else [], dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)
        self.metrics = torch.nn.ModuleDict(
            {
                stage: MetricCollection(
                    {
                        "acc": MulticlassAccuracy(num_classes, average="micro"),
                        "macro_f1": MulticlassF1Score(num_classes, average="macro"),
                    },
                    prefix=f"{stage}/",
                )
                for stage in ("val", "test")
            }
        )
        self._opening: SharedPrefix | None = None  # the task's opening encoded, for one validation or test pass

    def token_weights(self, batch: dict) -> torch.Tensor | None:
        if not len(self.class_weights):
            return None
        per_example = self.class_weights[batch["label_index"]]
        if "segments" in batch:  # packed rows: each position takes the weight of the example it holds
            segments = batch["segments"]
            return torch.where(segments >= 0, per_example[segments.clamp(min=0)], 0.0)
        return per_example[:, None].expand_as(batch["labels"])

    def score_labels(self, batch: dict) -> torch.Tensor:
        prompts = [ids[:n].tolist() for ids, n in zip(batch["input_ids"], batch["prompt_length"], strict=True)]
        # scored as eval, predict and the server score them (one at a time, eager), so a validation's numbers are
        # the ones `eval.py split=val` gives for these weights; the opening encoded once per pass (the weights do
        # not change inside one)
        if self._opening is None:
            self._opening = SharedPrefix.of(self.causal_lm, self.hparams.get("prompt_opening"))
        return rank_scores(self.causal_lm, prompts, self.hparams.answer_ids, self._opening)

    def _eval_step(self, batch: dict, stage: str) -> None:
        # One scoring pass gives both numbers: the true label's score is minus its summed answer loss,
        # so the eval loss needs no second forward pass.
        scores = self.score_labels(batch).to(self.device)
        labels = batch["label_index"]
        # under DDP/FSDP, examples repeated only to give every rank as many batches don't count
        scores, labels = scores[batch["real"]], labels[batch["real"]]
        n_tokens = sum(len(self.hparams.answer_ids[i]) for i in labels.tolist())
        loss_sum = -scores.gather(1, labels.unsqueeze(1)).sum()
        self.eval_loss[stage].update(loss_sum / n_tokens, weight=n_tokens)
        self.metrics[stage].update(scores.argmax(-1), labels)

    def _eval_metrics(self, stage: str) -> dict:
        computed = {f"{stage}/loss": self.eval_loss[stage].compute(), **self.metrics[stage].compute()}
        self.eval_loss[stage].reset()
        self.metrics[stage].reset()
        return computed

    def on_validation_epoch_start(self) -> None:
        self._opening = None  # the weights changed since the last pass

    def on_test_epoch_start(self) -> None:
        self._opening = None
