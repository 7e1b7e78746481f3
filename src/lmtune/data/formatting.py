"""Chat formatting and label masking, in one place.

An example is `prompt_ids + answer_ids[label]`: the prompt is the conversation rendered by the tokenizer's
own chat template with the generation prompt, the answer is the category followed by the end-of-turn token.
Only the answer carries loss (`labels` is -100 on the prompt). Because the ids are built by concatenation,
the rank scorer and the trainer see exactly the same tokens. Every example is also checked against the
tokenization of the full rendered conversation, so template or BPE drift at the boundary is an error,
never a silently shifted mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lmtune.data.records import DataError, Record

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

DEFAULT_SYSTEM_PROMPT = (
    "You classify arXiv papers by their primary category. "
    "Answer with exactly one of these categories and nothing else: {labels}."
)
DEFAULT_USER_TEMPLATE = "Title: {title}\nAbstract: {abstract}"


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids (not shifted); IGNORE_INDEX on the prompt
    prompt_length: int
    label_index: int
    truncated: bool = False
    padding: bool = False  # a repeat that only evens out the ranks' eval batches; never counted


class ChatFormatter:
    """Turns records into token ids with the tokenizer's chat template; answers are `<category><eot>`."""

    def __init__(
        self,
        tokenizer,
        labels: list[str],
        max_length: int = 512,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        user_template: str = DEFAULT_USER_TEMPLATE,
        eot_token: str | None = None,
        chat_template_kwargs: dict | None = None,
    ):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                f"use an instruct/chat model or set one on the tokenizer."
            )
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.label_to_index = {label: i for i, label in enumerate(self.labels)}
        self.max_length = max_length
        self.system_prompt_template = system_prompt  # exported, so predict rebuilds the exact prompt
        self.system_prompt = system_prompt.format(labels=", ".join(self.labels))
        self.user_template = user_template
        # extra template variables, e.g. Llama 3's `date_string`, which otherwise injects today's date
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.eot_token = eot_token or tokenizer.eos_token
        self.eot_id = tokenizer.convert_tokens_to_ids(self.eot_token)
        if self.eot_id is None or self.eot_id == tokenizer.unk_token_id:
            raise DataError(f"end-of-turn token {self.eot_token!r} is not in the vocabulary; set model.eot_token.")
        # Reference answers: the label set's token sequences, shared by training and rank scoring.
        self.answer_ids: list[list[int]] = [self._reference_answer(label) for label in self.labels]
        self.longest_answer = max(len(a) for a in self.answer_ids)

    # --- rendering -------------------------------------------------------------------------------------
    def messages(self, title: str, abstract: str, label: str | None = None) -> list[dict]:
        msgs = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": self.user_template.format(title=title, abstract=abstract)},
        ]
        if label is not None:
            msgs.append({"role": "assistant", "content": label})
        return msgs

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **self.chat_template_kwargs
        )

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

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

    def _reference_answer(self, label: str) -> list[int]:
        msgs = self.messages("Title", "Abstract.", label)
        prompt, full = self._encode([self._render(msgs[:-1], True), self._render(msgs, False)])
        answer = self._answer_from_full(prompt, full, f"label {label!r}")
        if self.tokenizer.decode(answer[:-1]).strip() != label:
            raise DataError(f"label {label!r}: the answer tokens decode to {self.tokenizer.decode(answer)!r}.")
        return answer

    # --- examples --------------------------------------------------------------------------------------
    def prompt_ids(self, title: str, abstract: str) -> list[int]:
        return self._encode([self._render(self.messages(title, abstract), True)])[0]

    def format(self, records: list[Record]) -> list[Example]:
        """Tokenize records in one batch; truncate abstracts (never answers) to fit max_length."""
        prompts = [self._render(self.messages(r.title, r.abstract), True) for r in records]
        fulls = [self._render(self.messages(r.title, r.abstract, r.label), False) for r in records]
        encoded = self._encode(prompts + fulls)
        examples = []
        for i, r in enumerate(records):
            prompt, full = encoded[i], encoded[len(records) + i]
            label_index = self.label_to_index[r.label]
            answer = self._answer_from_full(prompt, full, f"record {r.id}")
            if answer != self.answer_ids[label_index]:
                raise DataError(
                    f"record {r.id}: answer tokens {answer} differ from the label's reference "
                    f"{self.answer_ids[label_index]}; the template merges tokens across the answer boundary."
                )
            # room for the longest answer, not this label's: the prompt must not depend on the label (a
            # label-dependent cut would leak the answer's length into evaluation), and predict builds it the same way
            truncated = len(prompt) + self.longest_answer > self.max_length
            if truncated:
                prompt = self._fit_prompt(r.title, r.abstract, self.longest_answer, f"record {r.id}")
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
        self, items: list[tuple[str, str]], answer_length: int | None = None
    ) -> list[tuple[list[int], bool]]:
        """Prompt ids for (title, abstract) pairs whose label is unknown (prediction), shortened exactly as in
        training. Returns (ids, truncated) per item."""
        room = answer_length if answer_length is not None else max(len(a) for a in self.answer_ids)
        encoded = self._encode([self._render(self.messages(t, a), True) for t, a in items])
        return [
            (ids, False) if len(ids) + room <= self.max_length else (self._fit_prompt(t, a, room, f"paper {t!r}"), True)
            for ids, (t, a) in zip(encoded, items, strict=True)
        ]

    def _fit_prompt(self, title: str, abstract: str, answer_length: int, where: str) -> list[int]:
        """Shorten the abstract until prompt + answer fit max_length."""
        budget = self.max_length - answer_length
        abstract_ids = self._encode([abstract])[0]
        keep = len(abstract_ids)
        while True:
            prompt = self.prompt_ids(title, self.tokenizer.decode(abstract_ids[:keep]).strip())
            if len(prompt) <= budget:
                return prompt
            if keep == 0:
                raise DataError(
                    f"{where}: the prompt without any abstract is {len(prompt)} tokens, more than "
                    f"data.max_length={self.max_length} minus the answer ({answer_length}); raise data.max_length."
                )
            keep = max(0, keep - (len(prompt) - budget) - 1)
