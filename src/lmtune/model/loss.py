"""Masked causal-LM cross-entropy that applies the LM head only where a label is supervised.

Only the answer tokens (a few per example) carry loss, so projecting every position onto the vocabulary
wastes most of the step's memory and time. We run the decoder body, keep the hidden states whose next
token is supervised, and project only those, computing the cross-entropy in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmtune.data.formatting import IGNORE_INDEX


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask over positions 0..T-2 whose next token is supervised, and those next tokens (the shift)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return mask, targets[mask]


def _summed(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None):
    """(sum of the token losses, their count); with `weights` (B x T, aligned with the labels), each token's loss
    counts its weight and the count is the summed weight, so the mean stays a weighted mean over tokens."""
    if weights is None:
        return F.cross_entropy(logits, targets, reduction="sum"), mask.sum()
    w = weights[:, 1:][mask].float()
    return (F.cross_entropy(logits, targets, reduction="none") * w).sum(), w.sum()


def masked_lm_loss_sum(
    hidden: torch.Tensor, labels: torch.Tensor, lm_head, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy over supervised positions and their count (hidden: B x T x H). `lm_head` maps
    hidden states to logits: the output head, or `architecture.head_logits` where the model transforms its logits.
    `weights`: a weight per position (class weights), else every token counts 1."""
    mask, targets = supervised_positions(labels)
    logits = lm_head(hidden[:, :-1][mask]).float()
    return _summed(logits, targets, mask, weights)


def masked_lm_loss_sum_via_forward(causal_lm, batch: dict, weights=None) -> tuple[torch.Tensor, torch.Tensor]:
    """As `masked_lm_loss_sum`, through the causal LM's own forward (which FSDP needs to gather the head).

    `logits_to_keep` takes one list of positions for all rows: the positions supervised in any row, so
    the logits are B x (those positions) x V, still a small slice of the full B x T x V.
    """
    mask, targets = supervised_positions(batch["labels"])
    keep = mask.any(0).nonzero().squeeze(1)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = causal_lm(**inputs, logits_to_keep=keep).logits
    return _summed(logits[mask[:, keep]].float(), targets, mask, weights)


def reference_masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The textbook version over full logits (B x T x V), mean over supervised tokens: for tests."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
