"""Rank scoring: the predicted label is the one whose answer tokens are most likely after the prompt.

Each prompt is encoded once; every label's answer tokens are then scored in one short pass on top of that
prompt's KV cache (tree attention), so the cost is one prompt pass plus a few tokens per label instead of one
full pass per label, and the cache is never copied. The opening that every prompt shares (the chat template's
system turn, with its list of labels) is encoded once per call, not once per prompt. A prediction is always a
valid label, and the scores give a probability over the label set (softmax of the summed log-probabilities).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from lmtune.model.architecture import sliding_window

# Below this many shared tokens, encoding the opening once saves less than the cache copies cost.
MIN_SHARED_PREFIX = 8


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask with every sequence ending in the last column (where scoring/generation continues)."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, length - len(s) :] = torch.tensor(s)
        mask[row, length - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def rank_scores(
    causal_lm,
    prompts: list[list[int]],
    answers: list[list[int]],
    pad_id: int,
    max_rows: int = 64,
    on_chunk: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Summed log-probability of each answer after each prompt: a (num_prompts, num_labels) tensor.

    Prompts go in chunks of at most `max_rows // num_labels` to bound the memory of the logits; `on_chunk`
    hears how many prompts each finished chunk scored (progress).
    """
    chunk = max(1, max_rows // len(answers))
    tree = PrefixTree(answers)  # the same for every chunk
    # A sliding window shorter than the sequences (Gemma 2/3) counts cache slots, padding included, and its cache
    # keeps only the window: no padding between a shared opening and a prompt, no tree over the whole prompt.
    window = sliding_window(causal_lm.config)
    windowed = window is not None and window < max(map(len, prompts)) + max(map(len, answers))
    shared = None if windowed else SharedPrefix.of(causal_lm, prompts)
    scores = []
    for i in range(0, len(prompts), chunk):
        scores.append(_rank_scores(causal_lm, prompts[i : i + chunk], answers, tree, shared, pad_id, windowed))
        if on_chunk is not None:
            on_chunk(len(scores[-1]))
    return torch.cat(scores)


def _rank_scores(
    causal_lm,
    prompts: list[list[int]],
    answers: list[list[int]],
    tree: PrefixTree,
    shared: SharedPrefix | None,
    pad_id: int,
    windowed: bool = False,
) -> torch.Tensor:
    device = next(causal_lm.parameters()).device
    num_prompts = len(prompts)
    out, prompt_mask = encode_prompts(causal_lm, prompts, pad_id, shared)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (P, V): the first answer token
    scores = first[:, [a[0] for a in answers]]  # (P, L): each label's first answer token
    # The rest of every label's answer goes in one row per prompt, on top of the prompt's cache, as a prefix
    # tree: a prefix that several labels share (`cs`, `.` of `cs.CL`, `cs.CV`, ...) is fed once, and a label's
    # last token is never fed (nothing is predicted after it). Each fed token attends to the prompt and to its
    # own ancestors in the tree only (tree attention), so one small pass scores every label and the prompt
    # cache is used as is instead of being copied once per label.
    if not tree.tokens:
        return scores
    if windowed:  # each label continues its own copy of the (window-sized) cache
        return scores + _continuation_scores(causal_lm, out.past_key_values, prompt_mask, answers, pad_id)
    feed_len = len(tree.tokens)
    feed = torch.tensor(tree.tokens, device=device).expand(num_prompts, feed_len)
    prompt_len = prompt_mask.sum(-1, keepdim=True)  # (P, 1)
    positions = prompt_len + torch.tensor(tree.depths, device=device)  # each node continues the prompt
    within = tree.ancestor_or_self.to(device)  # (T, T)
    allowed = torch.cat(
        [prompt_mask.bool()[:, None, :].expand(num_prompts, feed_len, -1), within.expand(num_prompts, -1, -1)], dim=-1
    )[:, None]  # (P, 1, T, prompt + T)
    logits = causal_lm(
        input_ids=feed,
        attention_mask=_as_attention_mask(causal_lm, allowed),
        position_ids=positions,
        past_key_values=out.past_key_values,
        use_cache=True,
    ).logits.float()
    node, target, owner = (t.to(device) for t in (tree.node, tree.target, tree.owner))
    logprobs = torch.log_softmax(logits, dim=-1)[:, node, target]  # (P, answer tokens after the first)
    return scores.index_add(1, owner, logprobs)


def _continuation_scores(causal_lm, cache, prompt_mask: torch.Tensor, answers: list[list[int]], pad_id: int):
    """Log-probabilities of every answer token after the first, one row per (prompt, label) on a copy of the
    prompt's cache, with a plain key mask so the model builds its own (sliding) attention masks."""
    device = prompt_mask.device
    num_prompts, num_labels = prompt_mask.size(0), len(answers)
    width = max(len(a) for a in answers) - 1
    rest = torch.full((num_labels, width), pad_id, dtype=torch.long, device=device)
    rest_mask = torch.zeros((num_labels, width), dtype=prompt_mask.dtype, device=device)
    for j, a in enumerate(answers):
        rest[j, : len(a) - 1] = torch.tensor(a[:-1], device=device)
        rest_mask[j, : len(a) - 1] = 1
    cache.batch_repeat_interleave(num_labels)  # row p * num_labels + j: prompt p, label j
    mask = torch.cat([prompt_mask.repeat_interleave(num_labels, 0), rest_mask.repeat(num_prompts, 1)], dim=-1)
    start = prompt_mask.sum(-1, keepdim=True).repeat_interleave(num_labels, 0)
    logits = causal_lm(
        input_ids=rest.repeat(num_prompts, 1),
        attention_mask=mask,
        position_ids=start + torch.arange(width, device=device),
        past_key_values=cache,
        use_cache=True,
    ).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1).view(num_prompts, num_labels, width, -1)
    scores = torch.zeros(num_prompts, num_labels, device=device)
    for j, a in enumerate(answers):
        targets = torch.tensor(a[1:], device=device)
        scores[:, j] = logprobs[:, j, torch.arange(len(a) - 1, device=device), targets].sum(-1)
    return scores


def encode_prompts(causal_lm, prompts: list[list[int]], pad_id: int, shared: SharedPrefix | None = None):
    """One forward over the prompts (left-padded, logits of the last position only), continuing the shared
    prefix's cache when there is one. Returns the model output and the key mask over the whole cache (the
    shared prefix, the padding, each prompt's own tokens)."""
    device = next(causal_lm.parameters()).device
    start = shared.length if shared else 0
    ids, mask = (t.to(device) for t in left_pad([p[start:] for p in prompts], pad_id))
    positions = start + (mask.cumsum(-1) - 1).clamp(min=0)
    if shared:
        mask = torch.cat([mask.new_ones(len(prompts), start), mask], dim=-1)
    out = causal_lm(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=shared.cache_for(len(prompts)) if shared else None,
        use_cache=True,
        logits_to_keep=1,
    )
    return out, mask


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """How many opening tokens all prompts share, leaving every prompt at least one token of its own (whose
    output predicts the first answer token); 0 for a single prompt."""
    if len(prompts) < 2:
        return 0
    low, high = min(prompts), max(prompts)  # the common prefix of all is the common prefix of these two
    length = 0
    while length < min(len(low), len(high)) and low[length] == high[length]:
        length += 1
    return min(length, min(map(len, prompts)) - 1)


class SharedPrefix:
    """The tokens every prompt opens with, encoded once; each chunk of prompts continues a copy of its cache."""

    def __init__(self, causal_lm, tokens: list[int]):
        device = next(causal_lm.parameters()).device
        self.length = len(tokens)
        self.cache = causal_lm(
            input_ids=torch.tensor([tokens], device=device), use_cache=True, logits_to_keep=1
        ).past_key_values

    @classmethod
    def of(cls, causal_lm, prompts: list[list[int]]) -> SharedPrefix | None:
        """The prompts' common opening encoded, or None when it is too short to pay off."""
        length = shared_prefix_length(prompts)
        return cls(causal_lm, prompts[0][:length]) if length >= MIN_SHARED_PREFIX else None

    def cache_for(self, rows: int):
        cache = copy.deepcopy(self.cache)  # the chunk's passes append to it
        cache.batch_repeat_interleave(rows)
        return cache


class PrefixTree:
    """The answers' proper prefixes (each fed once), and for every answer token after the first: the node whose
    output predicts it (`node`), the token (`target`) and its label (`owner`)."""

    def __init__(self, answers: list[list[int]]):
        index: dict[tuple[int, ...], int] = {}
        node, target, owner = [], [], []
        for label, answer in enumerate(answers):
            for k in range(1, len(answer)):
                prefix = tuple(answer[:k])
                node.append(index.setdefault(prefix, len(index)))
                target.append(answer[k])
                owner.append(label)
        prefixes = list(index)
        self.tokens = [p[-1] for p in prefixes]
        self.depths = [len(p) - 1 for p in prefixes]
        self.ancestor_or_self = torch.tensor([[q == p[: len(q)] for q in prefixes] for p in prefixes], dtype=torch.bool)
        self.node, self.target, self.owner = torch.tensor(node), torch.tensor(target), torch.tensor(owner)


def _as_attention_mask(causal_lm, allowed: torch.Tensor) -> torch.Tensor:
    """A custom 4D mask as the attention implementation wants it: boolean (True = attend) for sdpa/flex,
    additive floats for eager attention."""
    if getattr(causal_lm.config, "_attn_implementation", "sdpa") != "eager":
        return allowed
    dtype = next(causal_lm.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


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
