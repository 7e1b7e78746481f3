"""Dynamic padding (or packing), length-grouped sampling, and the split of both across DDP/FSDP processes.

Padding is to the longest example in the batch (optionally rounded up to a multiple of 8), so a batch of
short texts does not pay for the longest one in the data set. Padded positions get attention 0 and
label -100 by position, never by token id: SmolLM2 pads with its end-of-turn token, which must stay
supervised in the answer.

Under DDP/FSDP the samplers here shard the data themselves (`use_distributed_sampler: false` in the
trainer config): Lightning's wrapper would reshuffle the length-grouped order, and its evaluation sampler
counts repeated rows in the metrics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from lmtune.data.formatting import IGNORE_INDEX, Example


class PaddingCollator:
    """Right-pads a list of `Example`s into tensors.

    >>> from lmtune.data.formatting import Example
    >>> batch = PaddingCollator(pad_token_id=0)([
    ...     Example("a", [5, 6, 7], [-100, 6, 7], 1, 0), Example("b", [5, 8], [-100, 8], 1, 1)])
    >>> batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist()
    ([[5, 6, 7], [5, 8, 0]], [[-100, 6, 7], [-100, 8, -100]], [[1, 1, 1], [1, 1, 0]])
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Example]) -> dict:
        length = max(len(e.input_ids) for e in examples)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            input_ids[row, :n] = torch.tensor(e.input_ids)
            labels[row, :n] = torch.tensor(e.labels)
            attention_mask[row, :n] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "prompt_length": torch.tensor([e.prompt_length for e in examples]),
            "label_index": torch.tensor([e.label_index for e in examples]),
            "real": torch.tensor([not e.padding for e in examples]),
            "ids": [e.id for e in examples],
        }


class PackingCollator(PaddingCollator):
    """Packs a batch's examples into rows of at most `pack_length` tokens (balanced: `_balanced_rows`; the row length
    chosen that pads least, never more than unpacked), then pads the rows: several examples per row,
    attention kept inside each (`segments`: which example each position holds, -1 for padding; `position_ids`
    restart at 0 for each). The batch holds the same examples as unpacked, so a step's loss and gradients are the
    same; only the padding between them is gone.

    >>> batch = PackingCollator(pad_token_id=0, pack_length=6)([
    ...     Example("a", [5, 6, 7], [-100, 6, 7], 1, 0), Example("b", [5, 8], [-100, 8], 1, 1)])
    >>> batch["input_ids"].tolist(), batch["segments"].tolist(), batch["position_ids"].tolist()
    ([[5, 6, 7, 5, 8]], [[0, 0, 0, 1, 1]], [[0, 1, 2, 0, 1]])
    """

    def __init__(self, pad_token_id: int, pack_length: int, pad_to_multiple_of: int | None = None):
        super().__init__(pad_token_id, pad_to_multiple_of)
        self.pack_length = pack_length

    def __call__(self, examples: Sequence[Example]) -> dict:
        lengths = [len(e.input_ids) for e in examples]
        longest = max(lengths)
        # the row length that pads least (rows x longest row): one example per row (no packing) is a candidate, so
        # packing never pads more than the unpacked batch
        capacities = {longest * k for k in range(1, max(self.pack_length // longest, 1) + 1)} | {
            max(self.pack_length, longest)
        }
        packings = [_balanced_rows(lengths, c) for c in sorted(capacities)]
        rows = min(packings, key=lambda rows: (len(rows) * max(sum(lengths[i] for i in r) for r in rows), len(rows)))
        length = max(sum(lengths[i] for i in r) for r in rows)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        segments = torch.full((len(rows), length), -1, dtype=torch.long)
        position_ids = torch.zeros((len(rows), length), dtype=torch.long)
        for r, members in enumerate(rows):
            start = 0
            for k, i in enumerate(members):
                e, n = examples[i], len(examples[i].input_ids)
                input_ids[r, start : start + n] = torch.tensor(e.input_ids)
                labels[r, start : start + n] = torch.tensor(e.labels)
                attention_mask[r, start : start + n] = 1
                segments[r, start : start + n] = k
                position_ids[r, start : start + n] = torch.arange(n)
                start += n
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "segments": segments,
            "position_ids": position_ids,
            "real": torch.tensor([not e.padding for e in examples]),
            "ids": [e.id for e in examples],
        }


def _balanced_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Positions of `lengths` in rows of at most `capacity`: as many rows as first fit needs, then each (longest
    first) into the emptiest row it fits in, so the rows come out about equally long."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = [[] for _ in _first_fit([lengths[i] for i in order], capacity)]
    used = [0] * len(rows)
    for i in order:
        row = min(
            (r for r in range(len(rows)) if used[r] + lengths[i] <= capacity), key=lambda r: used[r], default=None
        )
        if row is None:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append(i)
        used[row] += lengths[i]
    return rows


def _first_fit(lengths: list[int], capacity: int) -> list[int]:
    """The rows' loads when `lengths` (longest first) go each into the first row with room."""
    loads: list[int] = []
    for n in lengths:
        row = next((r for r, load in enumerate(loads) if load + n <= capacity), None)
        if row is None:
            loads.append(n)
        else:
            loads[row] += n
    return loads


def packed_attention(segments: torch.Tensor) -> torch.Tensor:
    """The boolean 4D mask (rows x 1 x T x T, True = attend) of packed rows: causal inside each example, nothing
    across them; a padding position attends to itself only (a query with no key would give NaN in attention)."""
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool, device=segments.device).tril()
    allowed = same & causal & (segments[:, None, :] >= 0)
    allowed |= torch.eye(segments.shape[1], dtype=torch.bool, device=segments.device) & (segments[:, :, None] < 0)
    return allowed[:, None]


class LengthGroupedSampler(Sampler[int]):
    """Shuffles, then sorts within mega-batches so each batch holds examples of similar length.

    With `mega_batch_factor=1` the batches are plain random batches (only the longest goes first).
    The order depends only on (seed, epoch), and `skip_batches` lets a run resumed mid-epoch continue
    with exactly the batches an uninterrupted run would have seen.

    With `num_replicas` processes, process `rank` takes every `num_replicas`-th batch of the same order,
    so each rank's batches stay length-grouped. If the batches do not divide evenly, the first ones are
    repeated (at most `num_replicas - 1` batches an epoch), because every rank must take as many steps.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        mega_batch_factor: int = 32,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_size = batch_size * mega_batch_factor
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, batches) to skip once, after a resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, epoch: int, batches: int) -> None:
        self._skip = (epoch, batches)

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in order."""
        batches = self._all_batches(epoch)
        if self.num_replicas > 1:
            batches += [batches[i % len(batches)] for i in range(-len(batches) % self.num_replicas)]
            batches = batches[self.rank :: self.num_replicas]
        return batches

    def _all_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.lengths), generator=generator).tolist()
        megas = [perm[i : i + self.mega_batch_size] for i in range(0, len(perm), self.mega_batch_size)]
        batches = [
            mega[i : i + self.batch_size]
            for mega in (sorted(m, key=lambda k: -self.lengths[k]) for m in megas)
            for i in range(0, len(mega), self.batch_size)
        ]
        # a short last batch stays last, so the DataLoader's chunks line up with these batches
        tail = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        # the longest batch first surfaces out-of-memory at step 1; the rest in random order
        if batches:
            longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
            batches.insert(0, batches.pop(longest))
            rest = torch.randperm(len(batches) - 1, generator=generator).tolist()
            batches = batches[:1] + [batches[1 + b] for b in rest]
        return batches + tail

    def __iter__(self) -> Iterator[int]:
        batches = self.batches(self.epoch)
        if self._skip is not None and self._skip[0] == self.epoch:
            batches = batches[self._skip[1] :]
            self._skip = None
        return (i for batch in batches for i in batch)

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches(self.epoch))


def shard_for_eval(examples: Sequence[Example], num_replicas: int, rank: int) -> Sequence[Example]:
    """Rank `rank`'s share of an evaluation split: every `num_replicas`-th example.

    Ranks must run as many batches (FSDP gathers weights in every forward), so the shorter shares get
    copies of the first examples marked `padding`, which the metrics skip: each example counts once.
    """
    if num_replicas == 1:
        return examples
    return _EvalShard(examples, num_replicas, rank)


class _EvalShard(Sequence[Example]):
    """A rank's share of a split, read on demand (a split may be a large table on disk)."""

    def __init__(self, examples: Sequence[Example], num_replicas: int, rank: int):
        self.examples = examples
        total = -(-len(examples) // num_replicas) * num_replicas
        self.positions = range(rank, total, num_replicas)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> Example:
        position = self.positions[index]
        example = self.examples[position % len(self.examples)]
        return dataclasses.replace(example, padding=True) if position >= len(self.examples) else example
