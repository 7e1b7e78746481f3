"""LightningDataModules: records -> hash splits -> chat examples -> batches, for a label set (classify) or
free-form answers and whole conversations (generate)."""

from __future__ import annotations

import dataclasses
import logging

import lightning as L
import torch
from torch.utils.data import DataLoader

from lmtune.core.errors import DataError
from lmtune.data.batching import LengthGroupedSampler, PackingCollator, PaddingCollator, shard_for_eval
from lmtune.data.conversations import ConversationFormatter, ConversationTask
from lmtune.data.formatting import ChatFormatter, template_columns
from lmtune.data.prepared import (
    ExampleTable,
    RecordTable,
    format_conversations,
    format_examples,
    prepare_records,
)
from lmtune.data.records import SPLITS, RecordSpec, SkipCounts, SplitPlan, choose_labels, date_ranges, split_indices
from lmtune.data.sources import RecordSource

log = logging.getLogger(__name__)


class TextDataModule(L.LightningDataModule):
    """Records from a source (a local file, a HF dataset, or a source plug-in that fetches them, `fetch`; see
    `sources.py`) as
    supervised chat examples: what every task kind shares. Splits are by a hash of the id (`id_column`, else a
    hash of the row's text), so a row never changes split when the file grows; `limit_*` take a reproducible
    sample of a split; `overfit=N` uses the first N training examples as train, val and test (a sanity check);
    `packing` packs each training batch's examples into rows of `max_length` (`batching.PackingCollator`).
    Subclasses say what a record is (`spec`), which records are kept (`_positions`) and how they are formatted
    (`_make_formatter`, `_format`)."""

    task = ""  # the task kind the examples train: classify | generate

    def __init__(
        self,
        tokenizer=None,  # may be set after construction: the data can be fetched before the model is loaded
        path: str | None = None,
        source: str = "auto",
        id_column: str = "id",
        columns: dict | None = None,
        fetch: dict | None = None,
        hf_name: str | None = None,
        hf_config: str | None = None,
        hf_split: str = "train",
        hf_revision: str | None = None,
        cache_dir: str | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_salt: str = "",
        split: str = "random",
        date_column: str | None = None,
        missing_dates: str = "error",
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        overfit: int | None = None,
        max_length: int = 512,
        pad_to_multiple_of: int | None = 8,
        group_by_length: bool = True,
        packing: bool = False,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        num_proc: int | None = None,
        eot_token: str | None = None,
        chat_template_kwargs: dict | None = None,
        seed: int = 0,
        *,
        spec: RecordSpec,
    ):
        super().__init__()
        if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
            raise DataError(
                f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be >= 0 "
                f"and sum to less than 1."
            )
        self.plan = SplitPlan(val_fraction, test_fraction, split_salt, split, date_column, missing_dates)
        if self.plan.problems():
            raise DataError(self.plan.problems()[0])
        self.tokenizer = tokenizer
        self.spec = dataclasses.replace(spec, date=date_column) if date_column else spec
        self.source = RecordSource(self.spec, source, path, fetch, hf_name, hf_config, hf_split, hf_revision, cache_dir)
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.overfit = overfit
        self.max_length = max_length
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.num_proc, self.cache_dir = num_proc, cache_dir
        self.group_by_length, self.packing, self.seed = group_by_length, packing, seed
        self.chat_settings = {"eot_token": eot_token, "chat_template_kwargs": chat_template_kwargs}
        self.pad_to_multiple_of = pad_to_multiple_of
        self.collator: PaddingCollator | None = None
        self.formatter = None
        self.splits: dict[str, RecordTable] = {}
        self.skips = SkipCounts()
        self.examples: dict[str, ExampleTable] = {}
        self.stats: dict = {}
        self._resume_skip: tuple[int, int] | None = None

    def prepare_data(self) -> None:
        """Download once (arXiv API fetch; cached per query), before any process reads the data."""
        self.source.prepare()

    def wait_for_data(self) -> None:
        """On processes other than rank 0: wait until rank 0's `prepare_data` has fetched the data."""
        self.source.wait_until_prepared()

    def load_splits(self) -> dict[str, RecordTable]:
        """Records -> the records kept -> hash splits (limits applied); no tokenizer needed (TF-IDF uses it)."""
        if self.splits:
            return self.splits
        rows, where, identity = self.source.rows()
        records, self.skips, label_counts = prepare_records(rows, where, identity, self.spec, self.cache_dir)
        positions = self._positions(records, label_counts)
        log.info("%s: %d records%s; %s", self.source.where, len(records), self._describe(), self.skips.summary())
        if self.overfit:
            positions = {name: positions["train"][: self.overfit] for name in SPLITS}
        self._records, self._val_positions = records, positions["val"]  # before limit_val: see calibration_split
        if not self.overfit:
            positions = {name: p[: self.limits[name]] if self.limits[name] else p for name, p in positions.items()}
        if not positions["train"]:
            raise DataError(f"{self.source.where}: no training examples after filtering ({self.skips.summary()}).")
        self.splits = {name: records.select(p) for name, p in positions.items()}
        self.stats = {
            "task": self.task,
            "source": self.source.where,
            "source_identity": identity,  # a file's path, inode, size, mtime and ctime; a HF dataset's fingerprint
            "records": len(records),
            "skipped": dict(self.skips.counts),
            **self._stats(),
            **{f"{name}_examples": len(p) for name, p in positions.items()},
            "split": self.plan.kind,
        }
        if self.spec.date:
            self.stats["dates"] = date_ranges(self.splits)  # each split's first and last date
            log.info("split by %s; dates: %s", self.plan.kind, self.stats["dates"])
        return self.splits

    def calibration_split(self, rows: int | None = None) -> RecordTable:
        """The validation rows a classifier's probabilities are calibrated on: the validation split as validated,
        or up to `rows` of it (`data.calibration_rows`) where `limit_val` keeps fewer for validation during training.
        Hash order: the rows validated come first, so a larger calibration set holds them."""
        if not rows:
            return self.splits["val"]
        return self._records.select(self._val_positions[:rows])

    def _positions(self, records: RecordTable, label_counts) -> dict[str, list[int]]:
        """Positions of the records each split takes, in order."""
        return self._split(records, None, None)

    def _split(self, records: RecordTable, labels, label_set) -> dict[str, list[int]]:
        dates = records.column("date") if self.spec.date else None
        where = self.source.where
        return split_indices(records.column("id"), labels, label_set, self.plan, self.skips, dates, where)

    def _describe(self) -> str:
        return ""

    def _stats(self) -> dict:
        return {}

    def setup(self, stage: str | None = None) -> None:
        if self.examples:
            return
        if self.tokenizer is None:
            raise RuntimeError("setup needs a tokenizer: pass one to the data module or set its .tokenizer first")
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.collator = PaddingCollator(pad_id, self.pad_to_multiple_of)
        splits = self.load_splits()
        self.formatter = self._make_formatter()
        log.info(self.formatter.chat_format.describe())
        self.examples = {name: self._format(rs, name) for name, rs in splits.items()}
        self.stats["truncated"] = {name: ex.truncated for name, ex in self.examples.items()}
        log.info(
            "data %s%s; %s; train/val/test = %d/%d/%d examples; %s %s",
            self.source.where,
            self._describe(),
            self.skips.summary(),
            *(len(self.examples[s]) for s in SPLITS),
            self._truncated_what,
            self.stats["truncated"],
        )

    _truncated_what = "truncated prompts"

    def _make_formatter(self):
        raise NotImplementedError

    def _format(self, records: RecordTable, name: str) -> ExampleTable:
        return format_examples(records, self.formatter, self.cache_dir, name, self.num_proc)

    # --- loaders ---------------------------------------------------------------------------------------
    def _shard(self) -> tuple[int, int]:
        """(processes sharing the data, this process's rank): (1, 0) unless under DDP/FSDP."""
        kwargs = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        return kwargs.get("num_replicas", 1), kwargs.get("rank", 0)

    def train_dataloader(self) -> DataLoader:
        examples = self.examples["train"]
        num_replicas, rank = self._shard()
        # without grouping, mega-batches of one batch: plain random batches, still resumable mid-epoch
        sampler = LengthGroupedSampler(
            examples.lengths,
            self.batch_size,
            self.seed,
            mega_batch_factor=32 if self.group_by_length else 1,
            num_replicas=num_replicas,
            rank=rank,
        )
        if self._resume_skip:
            sampler.skip_batches(*self._resume_skip)
            self._resume_skip = None
        collator = self.collator
        if self.packing:  # each batch's examples in as few rows of max_length as fit
            collator = PackingCollator(self.collator.pad_token_id, self.max_length, self.pad_to_multiple_of)
        return self._loader(examples, self.batch_size, sampler=sampler, collate_fn=collator)

    def val_dataloader(self) -> DataLoader:
        return self._loader(shard_for_eval(self.examples["val"], *self._shard()), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(shard_for_eval(self.examples["test"], *self._shard()), self.eval_batch_size)

    def _loader(self, examples, batch_size, **kwargs) -> DataLoader:
        # an own generator: creating an iterator must not draw from the global RNG that dropout uses,
        # or a resumed run would see different dropout masks than an uninterrupted one
        kwargs.setdefault("collate_fn", self.collator)
        return DataLoader(
            examples,
            batch_size=batch_size,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )

    # --- mid-epoch resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where in the epoch a checkpoint was taken, so a resumed run skips the batches already seen."""
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume_skip = (state["epoch"], state["batches_done"])


class TextClassificationDataModule(TextDataModule):
    """Labelled text as a classifier's examples: the answer is one label of a label set.

    `prompt.user` names the columns the model reads (`"Subject: {subject}\n\n{body}"`), `prompt.system` may list
    the labels (`{labels}`), `label_column` holds the class. The label set is `labels` if given, else the labels
    the source itself names (a fetched source's query), else the `top_k` most frequent labels; other records are
    dropped and counted.
    """

    task = "classify"

    def __init__(
        self,
        tokenizer=None,
        path: str | None = None,
        prompt: dict | None = None,
        label_column: str | list[str] = "label",
        label_is_list: bool = False,
        truncate_column: str | None = None,
        top_k: int | None = 10,
        labels: list[str] | None = None,
        labels_column: str | None = None,
        calibration_rows: int | None = None,
        id_column: str = "id",
        columns: dict | None = None,
        **settings,
    ):
        prompt = dict(prompt or {})
        missing = [k for k in ("system", "user") if not prompt.get(k)]
        if missing:
            raise DataError(f"data.prompt.{missing[0]} is not set: the task's prompt (see conf/data/*.yaml).")
        text = template_columns(prompt["user"], "data.prompt.user")
        spec = RecordSpec.of(text, label_column, id_column, label_is_list, columns, all_labels=labels_column)
        super().__init__(tokenizer, path, id_column=id_column, columns=columns, spec=spec, **settings)
        self.top_k, self.requested_labels = top_k, list(labels) if labels else None
        self.calibration_rows = calibration_rows
        self.labels: list[str] = []
        # the base model evaluated zero-shot needs the label list even where a fine-tuned recipe drops it
        self.zero_shot_system = prompt.get("zero_shot_system") or prompt["system"]
        self.prompts = {
            "system_prompt": prompt["system"],
            "user_template": prompt["user"],
            "truncate_column": truncate_column,
            **self.chat_settings,
        }

    def _positions(self, records: RecordTable, label_counts) -> dict[str, list[int]]:
        self.labels = choose_labels(label_counts, self.top_k, self.requested_labels or self.source.natural_labels)
        if len(self.labels) < 2:
            raise DataError(
                f"{self.source.where}: {len(self.labels)} label after filtering: {', '.join(self.labels)}; need at "
                f"least 2 to classify. Give a file with two or more classes, or check data.labels and data.top_k."
            )
        return self._split(records, records.column("label"), self.labels)

    def _describe(self) -> str:
        return f", {len(self.labels)} labels {self.labels}"

    def _stats(self) -> dict:
        return {"labels": self.labels}

    def _make_formatter(self) -> ChatFormatter:
        return ChatFormatter(self.tokenizer, self.labels, self.max_length, **self.prompts)

    def zero_shot_formatter(self) -> ChatFormatter:
        """The formatter the zero-shot base model is scored with: `data.prompt.zero_shot_system` (default: the
        training system prompt) over the same columns, labels and answers, so it sees the same examples."""
        if self.zero_shot_system == self.prompts["system_prompt"]:
            return self.formatter
        return ChatFormatter(
            self.tokenizer, self.labels, self.max_length, **{**self.prompts, "system_prompt": self.zero_shot_system}
        )


CLASSIFY_ONLY = (
    "top_k",
    "labels",
    "label_column",
    "label_is_list",
    "truncate_column",
    "labels_column",
    "calibration_rows",
)


class ChatDataModule(TextDataModule):
    """Free-form answers and whole conversations (`conversations.py`): a `messages_column` of OpenAI-style chats,
    or `prompt.user` over columns with `answer` (a column, or a format string over columns) for the reply, and
    `turns` for further exchanges built from the same columns.
    `train_on`: all_assistant (every assistant turn carries loss) or last (the last one only)."""

    task = "generate"
    _truncated_what = "early exchanges dropped to fit max_length"

    def __init__(
        self,
        tokenizer=None,
        path: str | None = None,
        prompt: dict | None = None,
        answer: str | None = None,
        turns: list[dict] | None = None,
        messages_column: str | None = "messages",
        train_on: str = "all_assistant",
        id_column: str = "id",
        columns: dict | None = None,
        **settings,
    ):
        # a recipe written for classification (experiment=smoke) sets these; a conversation has no label set
        ignored = {k: settings.pop(k) for k in CLASSIFY_ONLY if k in settings}
        if any(v is not None for v in ignored.values()):
            log.info("data=chat: %s not used (classification settings)", ", ".join(f"data.{k}" for k in ignored))
        prompt = dict(prompt or {})
        self.conversation = ConversationTask(
            prompt.get("system"), prompt.get("user"), answer, messages_column, tuple(turns or ())
        )
        rename = dict(columns or {})
        if messages_column and messages_column != "messages":
            rename["messages"] = messages_column
        spec = RecordSpec.of(self.conversation.columns, (), id_column, False, rename, bool(messages_column))
        super().__init__(tokenizer, path, id_column=id_column, columns=columns, spec=spec, **settings)
        self.train_on = train_on

    def _make_formatter(self) -> ConversationFormatter:
        return ConversationFormatter(
            self.tokenizer, self.conversation, self.max_length, train_on=self.train_on, **self.chat_settings
        )

    def _format(self, records: RecordTable, name: str) -> ExampleTable:
        examples, skipped = format_conversations(records, self.formatter, self.cache_dir, name, self.num_proc)
        for reason, n in skipped.items():
            self.skips.add(f"{reason} ({name})", n)
        self.stats["skipped"] = dict(self.skips.counts)
        self.stats[f"{name}_examples"] = len(examples)  # sequences trained on: after skips, a sequence per turn
        if not len(examples) and name == "train":
            raise DataError(f"{self.source.where}: no training examples after formatting ({self.skips.summary()}).")
        return examples
