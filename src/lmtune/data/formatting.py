"""Chat formatting and label masking, in one place.

An example is `prompt_ids + answer_ids[label]`: the prompt is the conversation rendered by the tokenizer's
own chat template with the generation prompt (a system turn, which may list the labels, and a user turn made
from the record's columns by `data.prompt.user`), the answer is the label followed by the end-of-turn token.
How the template is used (which token ends a turn, where the system prompt goes, template switches) is detected
once per formatter in `chat_format.py`.
Only the answer carries loss (`labels` is -100 on the prompt). Because the ids are built by concatenation,
the rank scorer and the trainer see exactly the same tokens. Every example is also checked against the
tokenization of the full rendered conversation, so template or BPE drift at the boundary is an error,
never a silently shifted mask. Text inside the messages is tokenized as text: a special token's spelling in a
record or a request never becomes that token (`chat_format.TextOnly`).
"""

from __future__ import annotations

import functools
import logging
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lmtune.core.digest import json_digest
from lmtune.core.errors import DataError
from lmtune.data.chat_format import ChatEncoder, special_ids
from lmtune.data.records import Record

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
LABELS_FIELD = "labels"  # filled with the label set, in either prompt; every other field is a column


def template_columns(template: str, name: str) -> tuple[str, ...]:
    """The columns a prompt template reads (`{subject}`, `{body}`), checked: a broken template is a DataError
    naming the setting, not a KeyError at the first record."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DataError(f"{name}={template!r}: {e}; write a literal brace as {{{{ or }}}}.") from None
    for field in fields:
        if field == "" or field.isdigit() or any(c in field for c in ".[]"):
            raise DataError(
                f"{name}={template!r}: '{{{field}}}' is not a column name; name a column, e.g. {{text}} "
                f"(and write a literal brace as {{{{ or }}}})."
            )
    return tuple(dict.fromkeys(f for f in fields if f != LABELS_FIELD))


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids (not shifted); IGNORE_INDEX on the prompt
    prompt_length: int
    label_index: int
    truncated: bool = False
    padding: bool = False  # a repeat that only evens out the ranks' eval batches; never counted


class ChatFormatter(ChatEncoder):
    """Turns records into token ids with the tokenizer's chat template; answers are `<label><eot>`.

    `system_prompt` may use `{labels}` only; `user_template` names the record's columns (`{title}`,
    `{subject}`...). Too long a prompt has `truncate_column` shortened (default: each row's longest column).
    """

    def __init__(
        self,
        tokenizer,
        labels: list[str],
        max_length: int = 512,
        *,
        system_prompt: str,
        user_template: str,
        truncate_column: str | None = None,
        eot_token: str | None = None,
        chat_template_kwargs: dict | None = None,
    ):
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.label_to_index = {label: i for i, label in enumerate(self.labels)}
        self.max_length = max_length
        if stray := template_columns(system_prompt, "data.prompt.system"):
            raise DataError(
                f"data.prompt.system uses {', '.join('{' + c + '}' for c in stray)}: only {{labels}} is filled in "
                f"there; put the record's columns in data.prompt.user."
            )
        self.columns = template_columns(user_template, "data.prompt.user")
        if not self.columns:
            raise DataError(f"data.prompt.user={user_template!r} reads no column; name one, e.g. {{text}}.")
        if truncate_column is not None and truncate_column not in self.columns:
            raise DataError(
                f"data.truncate_column={truncate_column!r} is not a column the prompt reads "
                f"({', '.join(self.columns)}); pick one of them, or null for each row's longest."
            )
        self.truncate_column = truncate_column
        self.system_prompt_template = system_prompt  # exported, so predict rebuilds the exact prompt
        self.label_list = ", ".join(self.labels)
        self.system_prompt = system_prompt.format(labels=self.label_list)
        self.user_template = user_template
        super().__init__(tokenizer, eot_token, chat_template_kwargs)
        # Reference answers: the label set's token sequences, shared by training and rank scoring.
        references = [self._reference_answer(label) for label in self.labels]
        self.answer_ids: list[list[int]] = [ids for ids, _ in references]
        self.answer_texts: list[str | None] = [text for _, text in references]  # what follows the prompt's text
        self.prompt_tail = self._isolated_prompt_tail()
        self.longest_answer = max(len(a) for a in self.answer_ids)
        same = [
            (a, b)
            for i, a in enumerate(self.labels)
            for b in self.labels[i + 1 :]
            if self.answer_ids[self.label_to_index[a]] == self.answer_ids[self.label_to_index[b]]
        ]
        if same:
            raise DataError(f"labels {same[0][0]!r} and {same[0][1]!r} give the same answer tokens; rename one.")

    def settings(self) -> dict:
        """What rebuilds this formatter (`from_settings`), as an export's formatting.json keeps it."""
        return {
            "system_prompt": self.system_prompt_template,
            "user_template": self.user_template,
            "truncate_column": self.truncate_column,
            "eot_token": self.eot_token,
            "chat_template_kwargs": self.chat_template_kwargs,
            "max_length": self.max_length,
            "answer_ids": self.answer_ids,
        }

    @classmethod
    def from_settings(cls, tokenizer, labels: list[str], settings: dict, where: str = "") -> ChatFormatter:
        """The formatter `settings()` describes, checked to give the answer tokens it recorded (a changed tokenizer
        or tokenizers library would shift every score silently)."""
        formatter = cls(
            tokenizer,
            labels,
            settings["max_length"],
            system_prompt=settings["system_prompt"],
            user_template=settings["user_template"],
            truncate_column=settings.get("truncate_column"),
            eot_token=settings.get("eot_token"),
            chat_template_kwargs=settings.get("chat_template_kwargs"),  # absent in early exports
        )
        if formatter.answer_ids != settings["answer_ids"]:
            raise DataError(
                f"{where}: the exported tokenizer gives other answer tokens than training did "
                f"({formatter.answer_ids} vs {settings['answer_ids']}); the export was modified or the "
                f"tokenizers library changed how it tokenizes. Re-export with this environment."
            )
        return formatter

    def fingerprint(self) -> str:
        """A hash of everything `format` depends on besides the records: the tokenizer (its vocabulary, merges,
        normalizer and special tokens), the chat template and how it is used, the prompts, the label set and
        max_length. Prepared examples are cached under it (`prepared.py`)."""
        parts = [
            *self.encoder_state(),
            self.system_prompt,
            self.user_template,
            self.labels,
            self.max_length,
            self.truncate_column,
            self.answer_ids,
            "special-token spellings in messages are text",  # examples prepared before this rule differ
        ]
        return json_digest(parts)

    # --- rendering -------------------------------------------------------------------------------------
    def messages(self, fields: Mapping[str, str], label: str | None = None) -> list[dict]:
        user = self.user_template.format(**fields, **{LABELS_FIELD: self.label_list})
        if self.chat_format.system_in_user:  # the template refuses a system turn or moves it
            msgs = [{"role": "user", "content": f"{self.system_prompt}\n\n{user}"}]
        else:
            msgs = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]
        if label is not None:
            msgs.append({"role": "assistant", "content": label})
        return msgs

    def _encode_prompts(self, items: list[Mapping[str, str]]) -> list[list[int]]:
        conversations = [self.messages(fields) for fields in items]
        return self._encode_rendered([self._render(m, True) for m in conversations], conversations)

    def _answer_from_full(self, prompt: list[int], full: list[int], where: str) -> list[int]:
        """The answer tokens of a full conversation: after the prompt, up to and including end-of-turn."""
        if full[: len(prompt)] != prompt:
            n = next(
                (i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), min(len(prompt), len(full))
            )
            raise DataError(
                f"{where}: the chat-template prompt is not a token prefix of the full conversation "
                f"(first difference at token {n}: {self.tokenizer.decode(prompt[n : n + 5])!r} vs "
                f"{self.tokenizer.decode(full[n : n + 5])!r}). The template renders the prompt differently "
                f"with and without the answer; fix the tokenizer's chat template."
            )
        rest = full[len(prompt) :]
        if self.eot_id not in rest:
            raise DataError(
                f"{where}: end-of-turn token {self.eot_token!r} does not follow the answer in the chat "
                f"template; set model.eot_token to the token that closes an assistant turn."
            )
        return rest[: rest.index(self.eot_id) + 1]

    REFERENCE_FIELD = "Text."  # every column's value in the conversations the reference answers come from

    def _reference_answer(self, label: str) -> tuple[list[int], str | None]:
        """The label's answer tokens, and the text the template appends to the prompt for it (None if the
        prompt's text is not a prefix of the conversation's)."""
        msgs = self.messages(dict.fromkeys(self.columns, self.REFERENCE_FIELD), label)
        prompt_text, full_text = self._render(msgs[:-1], True), self._render(msgs, False)
        prompt, full = self._encode([prompt_text, full_text])
        answer = self._answer_from_full(prompt, full, f"label {label!r}")
        if self.tokenizer.decode(answer[:-1]).strip() != label:
            raise DataError(f"label {label!r}: the answer tokens decode to {self.tokenizer.decode(answer)!r}.")
        return answer, full_text[len(prompt_text) :] if full_text.startswith(prompt_text) else None

    def _isolated_prompt_tail(self) -> str | None:
        """The end of the prompt from its last special token on, when it tokenizes the same alone as in context,
        with or without an answer after it (checked here on the reference prompt). Special tokens split the text
        before the tokenizer's pre-tokenizer runs, so a prompt ending in this tail has the same tokens whether its
        answer follows or not: its conversation is its prompt's ids + the label's reference answer, and only
        its prompt needs tokenizing (`format` checks the texts; other templates tokenize both, as before)."""
        text = self._render(self.messages(dict.fromkeys(self.columns, self.REFERENCE_FIELD)), True)
        ids = self._encode([text])[0]
        special = [self.tokenizer.convert_ids_to_tokens(i) for i in special_ids(self.tokenizer)]
        start = max((text.rfind(token) for token in special if token), default=-1)
        if start < 0 or None in self.answer_texts:
            return None
        tail = text[start:]
        alone = self._encode([tail] + [tail + answer for answer in self.answer_texts])
        if ids[len(ids) - len(alone[0]) :] != alone[0] or any(
            a[: len(alone[0])] != alone[0] or a[len(alone[0]) : len(alone[0]) + len(ref)] != ref
            for a, ref in zip(alone[1:], self.answer_ids, strict=True)
        ):
            return None
        return tail

    # --- examples --------------------------------------------------------------------------------------
    @functools.cached_property
    def opening_ids(self) -> list[int]:
        """The tokens every prompt opens with: the template up to the user turn's first column, found as the common
        start of two prompts whose columns share nothing. The rank scorer encodes them once (per predictor, per
        validation pass); a prompt that starts otherwise (a tokenizer that merges across the boundary) is simply
        encoded whole."""
        first, second = self._encode_prompts([dict.fromkeys(self.columns, text) for text in ("Text.", "0")])
        length = next((i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b), 0)
        return first[:length]

    def prompt_ids(self, fields: Mapping[str, str]) -> list[int]:
        return self._encode_prompts([fields])[0]

    def format(self, records: Sequence[Record]) -> list[Example]:
        """Tokenize records in one batch; shorten the truncate column (never the answer) to fit max_length."""
        prompt_messages = [self.messages(r.fields) for r in records]
        full_messages = [self.messages(r.fields, r.label) for r in records]
        prompts = [self._render(m, True) for m in prompt_messages]
        fulls = [self._render(m, False) for m in full_messages]
        label_indices = [self.label_to_index[r.label] for r in records]
        # a conversation that is its prompt + the label's answer text after an isolated tail needs no tokenizing
        tokenize_full = [
            not (self.prompt_tail and prompt.endswith(self.prompt_tail) and full == prompt + self.answer_texts[label])
            for prompt, full, label in zip(prompts, fulls, label_indices, strict=True)
        ]
        needed = [i for i, full in enumerate(tokenize_full) if full]
        encoded = self._encode_rendered(
            prompts + [fulls[i] for i in needed], prompt_messages + [full_messages[i] for i in needed]
        )
        prompt_ids, full_ids = encoded[: len(records)], iter(encoded[len(records) :])
        for i, r in enumerate(records):
            label_index = label_indices[i]
            if not tokenize_full[i]:
                continue
            answer = self._answer_from_full(prompt_ids[i], next(full_ids), f"record {r.id}")
            if answer != self.answer_ids[label_index]:
                raise DataError(
                    f"record {r.id}: answer tokens {answer} differ from the label's reference "
                    f"{self.answer_ids[label_index]}; the template merges tokens across the answer boundary."
                )
        # room for the longest answer, not this label's: the prompt must not depend on the label (a
        # label-dependent cut would leak the answer's length into evaluation), and predict builds it the same way
        fitted = self._fit(
            [r.fields for r in records], prompt_ids, self.longest_answer, [f"record {r.id}" for r in records]
        )
        examples = []
        for r, (prompt, truncated), label_index in zip(records, fitted, label_indices, strict=True):
            answer = self.answer_ids[label_index]
            examples.append(
                Example(
                    id=r.id,
                    input_ids=prompt + answer,
                    labels=[IGNORE_INDEX] * len(prompt) + answer,
                    prompt_length=len(prompt),
                    label_index=label_index,
                    truncated=truncated,
                )
            )
        return examples

    def fit_prompts(
        self, items: list[Mapping[str, str]], answer_length: int | None = None
    ) -> list[tuple[list[int], bool]]:
        """Prompt ids for rows whose label is unknown (prediction), shortened exactly as in training.
        Returns (ids, truncated) per row."""
        room = answer_length if answer_length is not None else self.longest_answer
        encoded = self._encode_prompts(items)
        return self._fit(items, encoded, room, [f"row {next(iter(f.values()))[:40]!r}" for f in items])

    def _fit(
        self, items: list[Mapping[str, str]], prompts: list[list[int]], answer_length: int, wheres: list[str]
    ) -> list[tuple[list[int], bool]]:
        """(ids, truncated) per row: the prompt as it is when prompt + answer fit max_length, else the prompt with
        its truncate column (default: the row's longest) shortened until they fit. All rows that need it are
        shortened together, a batch per round: a first guess drops the excess tokens, later rounds one more."""
        budget = self.max_length - answer_length
        fitted = [(ids, False) for ids in prompts]
        over = [i for i, ids in enumerate(prompts) if len(ids) > budget]
        if not over:
            return fitted
        columns = {i: self.truncate_column or max(self.columns, key=lambda c: len(items[i][c])) for i in over}
        column_texts = [items[i][columns[i]] for i in over]
        column_ids = self.tokenizer(column_texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        cut_ids = dict(zip(over, column_ids, strict=True))
        keep = {i: max(0, len(cut_ids[i]) - (len(prompts[i]) - budget) - 1) for i in over}
        while over:
            texts = self.tokenizer.batch_decode([cut_ids[i][: keep[i]] for i in over])
            shortened = [{**items[i], columns[i]: text.strip()} for i, text in zip(over, texts, strict=True)]
            encoded = self._encode_prompts(shortened)
            still_over = []
            for i, ids in zip(over, encoded, strict=True):
                if len(ids) <= budget:
                    fitted[i] = (ids, True)
                elif keep[i] == 0:
                    raise DataError(
                        f"{wheres[i]}: the prompt without any of its '{columns[i]}' is {len(ids)} tokens, more "
                        f"than data.max_length={self.max_length} minus the answer ({answer_length}); raise "
                        f"data.max_length."
                    )
                else:
                    keep[i] = max(0, keep[i] - (len(ids) - budget) - 1)
                    still_over.append(i)
            over = still_over
        return fitted
