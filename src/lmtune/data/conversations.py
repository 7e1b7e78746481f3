"""Conversations as training examples: free-form answers and whole chats, supervised on the assistant's turns.

A record is a conversation, given either as a `messages` column in the OpenAI chat format (`[{"role": "user",
"content": ...}, {"role": "assistant", "content": ...}, ...]`, multi-turn; a JSON string in CSV cells) or as
columns: `data.prompt.user` over columns for the user turn and `data.answer` (a column, or a format string over
columns) for the reply, after an optional `data.prompt.system`.

Every assistant turn is encoded as a prediction sees it: the conversation before it rendered by the chat template
with the generation prompt, then the turn's tokens up to and including the turn closer, which carry the loss
(`data.train_on`: every assistant turn, or the last only). Turns whose prompts extend each other token for token
share one example; where the template renders history differently from the prompt it generated from (Mistral
moves the system prompt into the last user turn, Qwen3 drops think blocks from earlier turns), each turn gets an
example of its own, so training never sees a context prediction would not. A conversation longer than
`data.max_length` loses whole early exchanges until it fits, or is skipped: an answer is never cut. Bad rows are
counted skips, by reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from lmtune.core.digest import json_digest
from lmtune.core.errors import DataError
from lmtune.data.chat_format import ChatEncoder

ROLES = ("system", "user", "assistant")
TRAIN_ON = ("all_assistant", "last")
MESSAGES_FIELD = "messages"  # where a record keeps its conversation (JSON) when the data has a messages column


# --- reading a conversation -------------------------------------------------------------------------------
def read_messages(value, to_answer: bool = False) -> tuple[list[dict] | None, str | None]:
    """(the conversation, None) or (None, why the row is skipped). A JSON string is parsed (CSV cells); only each
    message's role and content are kept. Order: an optional system turn, then user and assistant turns
    alternating from a user turn, with at least one assistant turn (`to_answer`: a user turn, the conversation a
    prediction answers); a trailing user turn has no answer to learn from and is not trained on."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, "messages is not a JSON list"
    if not isinstance(value, list) or not value:
        return None, "messages is not a non-empty list"
    messages = []
    for m in value:
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            return None, "a message without a role of system, user or assistant"
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            return None, "a message with empty or non-string content"
        messages.append({"role": m["role"], "content": content.replace("\r\n", "\n").strip()})
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(turns)):
        return None, "roles out of order (system first, then user and assistant alternating)"
    if to_answer and not any(m["role"] == "user" for m in turns):
        return None, "no user turn"
    if not to_answer and not any(m["role"] == "assistant" for m in turns):
        return None, "no assistant turn"
    return messages, None


def answer_columns(answer: str | None) -> tuple[str, ...]:
    """The columns `data.answer` reads: a format string's fields, or the column it names."""
    from lmtune.data.formatting import template_columns

    if not answer:
        return ()
    return template_columns(answer, "data.answer") if "{" in answer else (answer,)


@dataclass(frozen=True)
class ConversationTask:
    """How a record's fields become a conversation: its `messages` column (JSON), or the prompt's columns and
    the answer's. Saved in the export, so prediction builds conversations as training did."""

    system_prompt: str | None = None
    user_template: str | None = None
    answer: str | None = None  # a column name or a format string over columns
    messages_column: str | None = None
    turns: tuple[tuple[str, str], ...] = ()  # further exchanges (user, answer), each a format string over columns

    def __post_init__(self):
        turns = tuple(_exchange(t, k) for k, t in enumerate(self.turns or ()))
        object.__setattr__(self, "turns", turns)
        if self.messages_column and (self.user_template or self.answer or turns):
            raise DataError(
                "data.messages_column is set together with data.prompt.user / data.answer: a conversation comes "
                "from one or the other; set data.messages_column=null to build it from columns."
            )
        if not self.messages_column and not (self.user_template and self.answer):
            raise DataError(
                "a generate task needs data.messages_column=<column of OpenAI-style messages>, or data.prompt.user "
                "and data.answer=<the answer's column, or a format string over columns>."
            )

    @property
    def user_columns(self) -> tuple[str, ...]:
        """The columns the user turn reads (none for a messages task)."""
        from lmtune.data.formatting import template_columns

        return () if self.messages_column else template_columns(self.user_template, "data.prompt.user")

    @property
    def columns(self) -> tuple[str, ...]:
        """The record fields this task reads."""
        from lmtune.data.formatting import template_columns

        if self.messages_column:
            return (MESSAGES_FIELD,)
        later = [
            c
            for k, (user, answer) in enumerate(self.turns)
            for c in template_columns(user, f"data.turns[{k}].user") + answer_columns(answer)
        ]
        return tuple(dict.fromkeys(self.user_columns + answer_columns(self.answer) + tuple(later)))

    def answer_text(self, fields: Mapping[str, str], answer: str | None = None) -> str:
        answer = answer or self.answer
        return answer.format(**fields) if "{" in answer else fields[answer]

    def messages(self, fields: Mapping[str, str], with_answer: bool = True) -> list[dict]:
        """The conversation of a record (its assistant turns too unless `with_answer` is False, the
        columns' answer only)."""
        if self.messages_column:
            return json.loads(fields[MESSAGES_FIELD])
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        user = [{"role": "user", "content": self.user_template.format(**fields)}]
        if not with_answer:
            return system + user
        messages = system + user + [{"role": "assistant", "content": self.answer_text(fields)}]
        for user, answer in self.turns:
            messages.append({"role": "user", "content": user.format(**fields)})
            messages.append({"role": "assistant", "content": self.answer_text(fields, answer)})
        return messages

    @classmethod
    def from_dict(cls, settings: Mapping) -> ConversationTask:
        """The task `to_dict` wrote (an export's formatting.json holds it among the formatter's settings)."""
        return cls(**{k: settings.get(k) for k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return {
            "system_prompt": self.system_prompt,
            "user_template": self.user_template,
            "answer": self.answer,
            "messages_column": self.messages_column,
            "turns": [{"user": user, "answer": answer} for user, answer in self.turns],
        }


def _exchange(turn, k: int) -> tuple[str, str]:
    """A further exchange from `data.turns`: `{user: ..., answer: ...}` (or a pair), both non-empty strings."""
    user, answer = (turn.get("user"), turn.get("answer")) if isinstance(turn, Mapping) else tuple(turn) + (None,) * 2
    if not (isinstance(user, str) and user and isinstance(answer, str) and answer):
        raise DataError(f"data.turns[{k}]: give {{user: <format string>, answer: <column or format string>}}.")
    return user, answer


# --- encoding ---------------------------------------------------------------------------------------------
class ConversationFormatter(ChatEncoder):
    """Conversations to supervised examples with the tokenizer's chat template (see the module docstring)."""

    def __init__(
        self,
        tokenizer,
        task: ConversationTask,
        max_length: int = 512,
        *,
        train_on: str = "all_assistant",
        eot_token: str | None = None,
        chat_template_kwargs: dict | None = None,
    ):
        if train_on not in TRAIN_ON:
            raise DataError(f"data.train_on={train_on!r}: use one of {', '.join(TRAIN_ON)}.")
        super().__init__(tokenizer, eot_token, chat_template_kwargs)
        self.task, self.max_length, self.train_on = task, max_length, train_on

    def settings(self) -> dict:
        """What rebuilds this formatter (`from_settings`), as an export's formatting.json keeps it."""
        return {
            **self.task.to_dict(),
            "train_on": self.train_on,
            "eot_token": self.eot_token,
            "chat_template_kwargs": self.chat_template_kwargs,
            "max_length": self.max_length,
        }

    @classmethod
    def from_settings(cls, tokenizer, settings: dict) -> ConversationFormatter:
        return cls(
            tokenizer,
            ConversationTask.from_dict(settings),
            settings["max_length"],
            train_on=settings.get("train_on") or "all_assistant",
            eot_token=settings.get("eot_token"),
            chat_template_kwargs=settings.get("chat_template_kwargs"),
        )

    def fingerprint(self) -> str:
        """A hash of everything `format` depends on besides the records (the prepared-examples key)."""
        return json_digest([*self.encoder_state(), self.task.to_dict(), self.max_length, self.train_on, 1])

    def _fold_system(self, messages: list[dict]) -> list[dict]:
        """A system turn opens the first user turn where the template refuses or moves system turns."""
        if not (self.chat_format.system_in_user and messages and messages[0]["role"] == "system"):
            return messages
        first = messages[1]
        return [{**first, "content": f"{messages[0]['content']}\n\n{first['content']}"}, *messages[2:]]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The generation prompt of a conversation that ends with a user turn (what a prediction continues)."""
        messages = self._fold_system(messages)
        return self._encode_rendered([self._render(messages, True)], [messages])[0]

    def fit_prompt(self, messages: list[dict], room: int = 1) -> tuple[list[int], int]:
        """(prompt ids, early exchanges dropped) of a conversation that ends with a user turn: whole early exchanges
        are dropped, as in training, until the prompt leaves `room` tokens of `max_length` for the answer."""
        dropped = 0
        while True:
            ids = self.prompt_ids(messages)
            if len(ids) <= self.max_length - room:
                return ids, dropped
            start = 1 if messages[0]["role"] == "system" else 0
            if len(messages) - start <= 1:
                raise DataError(
                    f"the conversation's last user turn alone is {len(ids)} tokens, more than this model's "
                    f"max_length={self.max_length} leaves for an answer; shorten it."
                )
            messages = messages[:start] + messages[start + 2 :]
            dropped += 1

    def encode(self, messages: list[dict]) -> tuple[list[tuple[list[int], list[tuple[int, int]]]], str | None]:
        """([(ids, supervised spans)], None), or ([], why the conversation cannot be used)."""
        messages = self._fold_system(messages)
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        if self.train_on == "last":
            turns = turns[-1:]
        conversations = [messages[:k] for k in turns] + [messages[: k + 1] for k in turns]
        texts = [self._render(m, True) for m in conversations[: len(turns)]]
        texts += [self._render(m, False) for m in conversations[len(turns) :]]
        ids = self._encode_rendered(texts, conversations)
        prompts, fulls = ids[: len(turns)], ids[len(turns) :]
        sequences: list[tuple[list[int], list[tuple[int, int]]]] = []
        seq: list[int] = []
        spans: list[tuple[int, int]] = []
        for prompt, full in zip(prompts, fulls, strict=True):
            if full[: len(prompt)] != prompt:
                return [], "the chat template renders the prompt differently once the answer follows"
            rest = full[len(prompt) :]
            if self.eot_id not in rest:
                return [], "no end-of-turn token after the answer"
            answer = rest[: rest.index(self.eot_id) + 1]
            if seq and prompt[: len(seq)] != seq:  # the template rewrites history: a sequence of its own
                sequences.append((seq, spans))
                seq, spans = [], []
            seq = prompt + answer if not seq else seq + prompt[len(seq) :] + answer
            spans.append((len(seq) - len(answer), len(seq)))
        sequences.append((seq, spans))
        return sequences, None

    def fit(self, messages: list[dict]) -> tuple[list[tuple[list[int], list[tuple[int, int]]]], int, str | None]:
        """`encode`, dropping whole early exchanges (user + assistant, the system turn kept) until every sequence
        fits `max_length`: (sequences, exchanges dropped, why skipped or None)."""
        dropped = 0
        while True:
            sequences, problem = self.encode(messages)
            if problem or all(len(ids) <= self.max_length for ids, _ in sequences):
                return sequences, dropped, problem
            start = 1 if messages[0]["role"] == "system" else 0
            if sum(m["role"] == "assistant" for m in messages[start:]) <= 1:
                return [], dropped, f"longer than data.max_length={self.max_length} with its last exchange alone"
            messages = messages[:start] + messages[start + 2 :]
            dropped += 1
