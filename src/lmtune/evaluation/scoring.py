"""Rank scoring: the predicted category is the label whose answer tokens are most likely after the prompt.

Each prompt is encoded once; its KV cache is then shared by every label's answer tokens, so the cost is one
prompt pass plus a few tokens per label instead of one full pass per label. A prediction is always a valid
label, and the scores give a probability over the label set (softmax of the summed log-probabilities).
"""

from __future__ import annotations

import torch


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, length - len(s) :] = torch.tensor(s)
        mask[row, length - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def rank_scores(
    causal_lm, prompts: list[list[int]], answers: list[list[int]], pad_id: int, max_rows: int = 64
) -> torch.Tensor:
    """Summed log-probability of each answer after each prompt: a (num_prompts, num_labels) tensor.

    The prompt cache is copied once per label, so prompts go in chunks of at most `max_rows` (prompt, label)
    rows to bound that memory.
    """
    chunk = max(1, max_rows // len(answers))
    return torch.cat(
        [_rank_scores(causal_lm, prompts[i : i + chunk], answers, pad_id) for i in range(0, len(prompts), chunk)]
    )


def _rank_scores(causal_lm, prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> torch.Tensor:
    device = next(causal_lm.parameters()).device
    num_prompts, num_labels = len(prompts), len(answers)
    prompt_ids, prompt_mask = (t.to(device) for t in _left_pad(prompts, pad_id))
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = causal_lm(
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (P, V): the first answer token
    answer_len = max(len(a) for a in answers)
    answer_ids = torch.full((num_labels, answer_len), pad_id, dtype=torch.long, device=device)
    answer_mask = torch.zeros((num_labels, answer_len), dtype=torch.long, device=device)
    for row, a in enumerate(answers):
        answer_ids[row, : len(a)] = torch.tensor(a)
        answer_mask[row, : len(a)] = 1
    scores = first[:, answer_ids[:, 0]]  # (P, L)
    if answer_len == 1:
        return scores
    # Feed answer tokens 0..A-2 for every (prompt, label) pair on top of the shared prompt cache.
    cache = out.past_key_values
    cache.batch_repeat_interleave(num_labels)
    feed = answer_ids[:, :-1].repeat(num_prompts, 1)  # (P*L, A-1)
    feed_mask = answer_mask[:, :-1].repeat(num_prompts, 1)
    attention = torch.cat([prompt_mask.repeat_interleave(num_labels, dim=0), feed_mask], dim=1)
    start = prompt_mask.sum(-1).repeat_interleave(num_labels).unsqueeze(1)
    feed_positions = start + torch.arange(answer_len - 1, device=device)
    logits = causal_lm(
        input_ids=feed, attention_mask=attention, position_ids=feed_positions, past_key_values=cache, use_cache=True
    ).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = answer_ids[:, 1:].repeat(num_prompts, 1)
    token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * answer_mask[:, 1:].repeat(num_prompts, 1)
    return scores + token_lp.sum(-1).view(num_prompts, num_labels)


@torch.no_grad()
def naive_rank_scores(causal_lm, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
    """One full forward per (prompt, label): the slow reference that `rank_scores` must match."""
    device = next(causal_lm.parameters()).device
    scores = torch.zeros(len(prompts), len(answers))
    for i, p in enumerate(prompts):
        for j, a in enumerate(answers):
            ids = torch.tensor([p + a], device=device)
            logprobs = torch.log_softmax(causal_lm(input_ids=ids).logits[0, :-1].float(), dim=-1)
            scores[i, j] = logprobs[len(p) - 1 :].gather(-1, ids[0, len(p) :].unsqueeze(-1)).sum()
    return scores
