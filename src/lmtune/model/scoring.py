"""Rank scoring: the predicted label is the one whose answer tokens are most likely after the prompt.

Every prompt is scored on its own, in one forward pass: its own tokens, then every label's answer tokens as a
prefix tree with tree attention (`_prompt_scores`), so the cost is one prompt pass plus a few tokens per label
instead of one full pass per label. The task's opening (the chat template's system turn, the user turn up to the
first column: the formatter's `opening_ids`) is encoded once, by the caller or per call, and each prompt continues
a copy of its cache. A prediction is always a valid label, and the scores give a probability over the label set
(softmax of the summed log-probabilities).

Why one prompt at a time: a prompt's scores must not depend on what it is scored with (a split in eval, one
row in predict, whatever a server's batch holds). In bf16 they would: a matrix product rounds differently
with the number of rows it multiplies (and padding shifts attention's blocks), enough to move probabilities
by several hundredths and flip near decisions. Alone, a prompt's passes have its own shapes only, so its
scores are the same bits wherever it is scored. With prompts of a few hundred tokens each pass is already
a large matrix product; what batching would add is little (measured in docs/precision.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from lmtune.model.architecture import sliding_window

# Below this many shared tokens, encoding the opening once saves less than the cache copies cost.
MIN_SHARED_PREFIX = 8


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask with every sequence ending in the last column (where generation continues)."""
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
    opening: list[int] | SharedPrefix | None = None,
    on_prompt: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Summed log-probability of each answer after each prompt: a (num_prompts, num_labels) tensor.

    `opening`: the tokens the task's prompts open with (or their `SharedPrefix`, encoded once by a caller whose
    weights do not change); a prompt that does not start with them (or a model whose sliding window is shorter
    than the prompt) is encoded whole, which is decided by the prompt alone.
    Always eager: a compiled model (training's `compile`) would recompile for every prompt length.
    `on_prompt` hears each prompt scored (progress).
    """
    tree = PrefixTree(answers)
    window = sliding_window(causal_lm.config)
    longest_answer = max(map(len, answers))
    scores = []
    with torch.compiler.set_stance("force_eager"):
        shared = opening if isinstance(opening, SharedPrefix) else SharedPrefix.of(causal_lm, opening)
        for prompt in prompts:
            windowed = window is not None and window < len(prompt) + longest_answer
            opens = shared is not None and not windowed and shared.opens(prompt)
            scores.append(_prompt_scores(causal_lm, prompt, answers, tree, shared if opens else None, windowed))
            if on_prompt is not None:
                on_prompt()
    return torch.stack(scores) if scores else torch.zeros(0, len(answers))


def _prompt_scores(
    causal_lm, prompt: list[int], answers: list[list[int]], tree: PrefixTree, shared: SharedPrefix | None, windowed
) -> torch.Tensor:
    """One prompt's label scores (num_labels,), in one forward pass: the prompt's own tokens, then the rest of
    every label's answer as a prefix tree. A prefix that several labels share (`cs`, `.` of `cs.CL`, `cs.CV`,
    ...) is fed once, and a label's last token is never fed (nothing is predicted after it). Each tree token
    attends to the whole prompt and to its own ancestors in the tree only (tree attention), at the position it
    would have right after the prompt. One pass reads the weights once; a second pass for a dozen tree tokens
    would cost a third of the prompt's."""
    if windowed:
        return _windowed_scores(causal_lm, prompt, answers)
    device = next(causal_lm.parameters()).device
    start = shared.length if shared else 0
    own, fed = len(prompt) - start, len(tree.tokens)
    allowed = torch.zeros(own + fed, start + own + fed, dtype=torch.bool)
    allowed[:, :start] = True  # the opening
    allowed[:own, start : start + own] = torch.ones(own, own, dtype=torch.bool).tril()  # the prompt: causal
    allowed[own:, start : start + own] = True
    allowed[own:, start + own :] = tree.ancestor_or_self
    positions = list(range(start, len(prompt))) + [len(prompt) + d for d in tree.depths]
    kept = torch.tensor([own - 1] + [own + i for i in range(fed)], device=device)  # the outputs that predict
    logits = (
        causal_lm(
            input_ids=torch.tensor([prompt[start:] + tree.tokens], device=device),
            attention_mask=as_attention_mask(causal_lm, allowed[None, None].to(device)),
            position_ids=torch.tensor([positions], device=device),
            past_key_values=shared.cache_copy() if shared else None,
            use_cache=shared is not None,
            logits_to_keep=kept,
        )
        .logits[0]
        .float()
    )
    logprobs = torch.log_softmax(logits, dim=-1)
    scores = logprobs[0, [a[0] for a in answers]]  # each label's first answer token, after the prompt
    if not fed:
        return scores
    node, target, owner = (t.to(device) for t in (tree.node, tree.target, tree.owner))
    return scores.index_add(0, owner, logprobs[1 + node, target])


def _windowed_scores(causal_lm, prompt: list[int], answers: list[list[int]]) -> torch.Tensor:
    """A sliding window shorter than the sequence (Gemma 2/3) keeps only the window in its cache: the prompt is
    encoded whole, then every label continues its own copy of the cache."""
    device = next(causal_lm.parameters()).device
    out = causal_lm(
        input_ids=torch.tensor([prompt], device=device),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
        use_cache=True,
        logits_to_keep=1,
    )
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)[[a[0] for a in answers]]
    if max(map(len, answers)) == 1:
        return first
    return first + _continuation_scores(causal_lm, out.past_key_values, len(prompt), answers)


def _continuation_scores(causal_lm, cache, prompt_length: int, answers: list[list[int]]) -> torch.Tensor:
    """Log-probabilities of every answer token after the first, one row per label on a copy of the prompt's
    cache (the labels' rows padded to the longest), with a plain key mask so the model builds its own (sliding)
    attention masks. The rows' shapes depend on the label set only."""
    device = next(causal_lm.parameters()).device
    num_labels, width = len(answers), max(len(a) for a in answers) - 1
    rest = torch.zeros((num_labels, width), dtype=torch.long, device=device)
    rest_mask = torch.zeros((num_labels, width), dtype=torch.long, device=device)
    for j, a in enumerate(answers):
        rest[j, : len(a) - 1] = torch.tensor(a[:-1], device=device)
        rest_mask[j, : len(a) - 1] = 1
    cache.batch_repeat_interleave(num_labels)  # row j: label j
    mask = torch.cat([rest_mask.new_ones(num_labels, prompt_length), rest_mask], dim=-1)
    logits = causal_lm(
        input_ids=rest,
        attention_mask=mask,
        position_ids=prompt_length + torch.arange(width, device=device).expand(num_labels, -1),
        past_key_values=cache,
        use_cache=True,
    ).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    scores = torch.zeros(num_labels, device=device)
    for j, a in enumerate(answers):
        targets = torch.tensor(a[1:], device=device)
        scores[j] = logprobs[j, torch.arange(len(a) - 1, device=device), targets].sum()
    return scores


class SharedPrefix:
    """The tokens every prompt opens with, encoded once; each prompt continues a copy of its cache."""

    def __init__(self, causal_lm, tokens: list[int]):
        device = next(causal_lm.parameters()).device
        self.tokens, self.length = list(tokens), len(tokens)
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            self.cache = causal_lm(
                input_ids=torch.tensor([tokens], device=device), use_cache=True, logits_to_keep=1
            ).past_key_values

    @classmethod
    def of(cls, causal_lm, tokens: list[int] | None) -> SharedPrefix | None:
        """The opening encoded, or None when it is too short to pay off."""
        return cls(causal_lm, tokens) if tokens and len(tokens) >= MIN_SHARED_PREFIX else None

    def opens(self, prompt: list[int]) -> bool:
        """Whether `prompt` starts with the opening and has at least one token of its own (whose output predicts
        the first answer token)."""
        return len(prompt) > self.length and prompt[: self.length] == self.tokens

    def cache_copy(self):
        return copy.deepcopy(self.cache)  # the prompt's passes append to it


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


def as_attention_mask(causal_lm, allowed: torch.Tensor) -> torch.Tensor:
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
