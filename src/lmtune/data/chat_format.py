"""How a model's chat template is used, decided from the tokenizer and its template at start-up.

Chat-model families render a conversation in different ways, and a template-driven pipeline meets all of them:
- the turn closer is not always eos (Gemma `<end_of_turn>` with eos `<eos>`, Phi-3 `<|end|>` with eos
  `<|endoftext|>`, Llama 3 `<|eot_id|>` where older configs set eos `<|end_of_text|>`): the end-of-turn token
  supervised after the label is the first special token after the answer in the rendered conversation;
- some templates refuse a system turn (Gemma 2 raises 'System role not supported'): the system prompt then
  opens the first user turn;
- some render the final assistant turn with a block the generation prompt lacks (Qwen3's empty
  `<think>\\n\\n</think>\\n\\n`): the template's own switch (`enable_thinking=False`) is turned off so the prompt
  plus the answer is exactly the conversation; a template without such a switch is refused in one line;
- Llama 3's template writes today's date into every system turn: the date is pinned, so training and a later
  prediction see the same tokens;
- base models have no template: `model.chat_template=plain` (below) closes turns with eos and adds no tokens.
The user's `model.eot_token` and `model.chat_template_kwargs` always win over what is detected.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from jinja2.exceptions import TemplateError

from lmtune.core.errors import DataError

log = logging.getLogger(__name__)

# A template for base models: the turns as plain paragraphs, the answer after "Answer:" and closed by the
# tokenizer's eos, so no token is added that the model never saw (a ChatML template would add several).
PLAIN_TEMPLATE = (
    "{% if bos_token and bos_token != eos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ 'Answer: ' + message['content'] + eos_token + '\\n\\n' }}"
    "{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}"
)
BUILT_IN_TEMPLATES = {"plain": PLAIN_TEMPLATE}
PINNED_DATE = "26 Jul 2024"  # Llama 3's own fallback when no date is given
# Probe texts: distinct, plain words that no template rewrites.
_SYSTEM, _USER, _ANSWER = "Probe system text.", "Probe user text.", "ProbeAnswer"


def chat_template_source(spec: str) -> str:
    """`model.chat_template`: a built-in name (`plain`) or a path to a Jinja file; config validation calls it too,
    so the run stops at start-up on a template it cannot read."""
    if spec in BUILT_IN_TEMPLATES:
        return BUILT_IN_TEMPLATES[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(
            f"model.chat_template={spec}: neither a built-in template ({', '.join(BUILT_IN_TEMPLATES)}) nor a "
            f"file; use plain for a base model, or the path to a .jinja chat template."
        )
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"model.chat_template={spec}: cannot read it ({e.__class__.__name__}: {e}).") from None


@dataclass(frozen=True)
class ChatFormat:
    """What the formatter does with this template: which token closes a turn, where the system prompt goes,
    which template variables are set; `reasons` says why, for the start-up log line."""

    eot_token: str
    system_in_user: bool = False
    template_kwargs: dict = field(default_factory=dict)
    reasons: tuple[str, ...] = ()

    def describe(self) -> str:
        return "chat format: " + "; ".join(self.reasons)


def token_id(tokenizer, token: str) -> int | None:
    """The id of `token`, or None when the vocabulary lacks it (it maps to unk without being unk: GPT-2's unk is
    its eos)."""
    i = tokenizer.convert_tokens_to_ids(token)
    return None if i is None or (i == tokenizer.unk_token_id and token != tokenizer.unk_token) else i


def special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False))
    return ids


def render(tokenizer, messages: list[dict], add_generation_prompt: bool, kwargs: dict) -> str:
    """The template's text for `messages`; a template that raises is a one-line DataError naming it."""
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except TemplateError as e:
        raise DataError(
            f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'} raised "
            f"{e.__class__.__name__}: {e}; give a working one with model.chat_template=<file.jinja>."
        ) from None


class TextOnly:
    """Message text tokenized as text: a special token's spelling typed in a title (`<|im_end|>`, `<|eot_id|>`) never
    becomes that token, so data and requests cannot forge a turn; control tokens come from the template alone.

    A tokenizer matches its added tokens anywhere in the string it is given, template and message text alike. For a
    conversation whose messages spell an added token (rare: the check is one regular expression), the template's
    own occurrences are found by rendering it again with each such spelling replaced by placeholders of the same
    length; every added-token id of the real rendering outside them is replaced by the tokens of its text
    (`split_special_tokens`). Other conversations tokenize exactly as before."""

    PLACEHOLDER = "\ue000"  # a private-use character: no template or vocabulary gives it a meaning

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.content}
        self.ids = set(added)
        spellings = sorted(set(added.values()), key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, spellings))) if spellings else None

    def spelled_in(self, messages: list[dict]) -> bool:
        """Whether any message's text spells an added token."""
        return self.pattern is not None and any(
            isinstance(m.get("content"), str) and self.pattern.search(m["content"]) for m in messages
        )

    def placeholders(self, messages: list[dict]) -> list[dict]:
        hide = lambda m: self.PLACEHOLDER * len(m.group())  # noqa: E731
        return [{**m, "content": self.pattern.sub(hide, m["content"])} for m in messages]

    def encode(self, text: str, template_only: str) -> list[int]:
        """The ids of `text` (a rendering of messages that spell added tokens), given `template_only`, the rendering
        of the same messages with those spellings replaced by placeholders."""
        if len(template_only) != len(text):
            raise DataError(
                "the chat template changes the text of a message that spells a special token, so it cannot be kept "
                "as text; remove the special token's spelling from the row, or use a template that renders message "
                "text as it is."
            )
        ours = {m.start() for m in self.pattern.finditer(template_only)}
        typed = [(m.start(), m.end()) for m in self.pattern.finditer(text) if m.start() not in ours]
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = []
        for i, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
            if i in self.ids and any(start < e and s < end for s, e in typed):
                piece = self.tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True)
                ids.extend(piece["input_ids"])
            else:
                ids.append(i)
        return ids


def _probe(system_in_user: bool, answer: bool = True) -> list[dict]:
    msgs = (
        [{"role": "user", "content": f"{_SYSTEM}\n\n{_USER}"}]
        if system_in_user
        else [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER}]
    )
    return msgs + ([{"role": "assistant", "content": _ANSWER}] if answer else [])


def _before_answer(tokenizer, system_in_user: bool, kwargs: dict) -> tuple[str, str, str | None]:
    """(generation prompt, full conversation, what the conversation has after the prompt and before the answer;
    None when the prompt is not where the conversation starts)."""
    prompt = render(tokenizer, _probe(system_in_user, answer=False), True, kwargs)
    full = render(tokenizer, _probe(system_in_user), False, kwargs)
    if _ANSWER not in full:
        raise DataError("the chat template drops the assistant's answer from the conversation; fix the template.")
    if not full.startswith(prompt):
        return prompt, full, None
    return prompt, full, full[len(prompt) : full.index(_ANSWER, len(prompt))]


def detect_chat_format(tokenizer, eot_token: str | None = None, template_kwargs: dict | None = None) -> ChatFormat:
    """Decide the end-of-turn token, the system turn's place and the template variables for this tokenizer."""
    template = getattr(tokenizer, "chat_template", None)
    if not template or not isinstance(template, str):
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template (a base model?); set "
            f"model.chat_template=plain (turns closed by its eos, no new tokens) or a path to a .jinja file."
        )
    kwargs, reasons = dict(template_kwargs or {}), []
    if "date_string" in template and "date_string" not in kwargs:
        kwargs["date_string"] = PINNED_DATE
        reasons.append(f"date_string pinned to {PINNED_DATE} (the template would write today's date)")

    try:
        render(tokenizer, _probe(system_in_user=False), False, kwargs)
        system_in_user = False
    except DataError as refused:
        try:
            render(tokenizer, _probe(system_in_user=True), False, kwargs)
        except DataError:
            raise refused from None
        system_in_user = True
        reasons.append("the template refuses a system turn: the system prompt opens the user turn")

    prompt, full, gap = _before_answer(tokenizer, system_in_user, kwargs)
    if gap is None and not system_in_user:
        # the system turn lands elsewhere once the answer is there (Mistral v0.3 puts it in the *last* user turn)
        moved = _before_answer(tokenizer, True, kwargs)
        if moved[2] is not None:
            prompt, full, gap = moved
            system_in_user = True
            reasons.append(
                "the template moves the system turn once an answer follows: the system prompt opens the user turn"
            )
    if gap is not None and gap.strip() and "enable_thinking" in template and "enable_thinking" not in kwargs:
        kwargs["enable_thinking"] = False
        prompt, full, gap = _before_answer(tokenizer, system_in_user, kwargs)
        reasons.append("enable_thinking=False (the final assistant turn opens a think block the prompt lacks)")
    if gap is None:
        n = next((i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), len(full))
        raise DataError(
            f"the chat-template prompt is not a token prefix of the full conversation (first difference: "
            f"{prompt[n : n + 30]!r} vs {full[n : n + 30]!r}): the template renders the prompt differently with and "
            f"without the answer; fix the tokenizer's chat template or give one with model.chat_template=<file.jinja>."
        )
    if gap.strip():
        raise DataError(
            f"the chat template renders the final assistant turn with {gap!r} before the answer, which its "
            f"generation prompt does not end with, so a prediction would not see the tokens training did; set the "
            f"template's switch in model.chat_template_kwargs or give another with model.chat_template=<file.jinja>."
        )

    if eot_token:
        reasons.insert(0, f"end of turn {eot_token} (model.eot_token)")
    else:
        after = full[full.index(_ANSWER, len(prompt)) + len(_ANSWER) :]
        specials = special_ids(tokenizer)
        closer = next((i for i in tokenizer(after, add_special_tokens=False)["input_ids"] if i in specials), None)
        if closer is not None:
            eot_token = tokenizer.convert_ids_to_tokens(closer)
            eos = f"; eos is {tokenizer.eos_token}" if eot_token != tokenizer.eos_token else ""
            reasons.insert(0, f"end of turn {eot_token} (the first special token after the answer{eos})")
        elif tokenizer.eos_token:
            eot_token = tokenizer.eos_token
            reasons.insert(0, f"end of turn {eot_token} (eos: no special token closes the assistant turn)")
        else:
            raise DataError(
                "no special token closes the assistant turn and the tokenizer has no eos; set model.eot_token."
            )
    return ChatFormat(eot_token, system_in_user, kwargs, tuple(reasons))


class ChatEncoder:
    """Conversations to token ids through the tokenizer's chat template, as every formatter needs them: the template's
    use detected once (`detect_chat_format`; `model.eot_token` / `model.chat_template_kwargs` win), message text
    tokenized as text (`TextOnly`), the turn closer's id known."""

    def __init__(self, tokenizer, eot_token: str | None = None, chat_template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.chat_format = detect_chat_format(tokenizer, eot_token, chat_template_kwargs)  # its owner logs it
        self.chat_template_kwargs = self.chat_format.template_kwargs
        self.eot_token = self.chat_format.eot_token
        self.text_only = TextOnly(tokenizer)
        self.eot_id = token_id(tokenizer, self.eot_token)
        if self.eot_id is None:
            raise DataError(f"end-of-turn token {self.eot_token!r} is not in the vocabulary; set model.eot_token.")

    def encoder_state(self) -> list:
        """What the ids depend on besides the messages: the tokenizer (vocabulary, merges, normalizer, special
        tokens), the chat template and how it is used; part of every prepared-data key."""
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            state = json.loads(backend.to_str())
            state.pop("truncation", None), state.pop("padding", None)  # call settings, not the tokenization
        else:
            state = sorted(tok.get_vocab().items())
        added = {str(k): str(v) for k, v in tok.added_tokens_decoder.items()}
        chat = [self.eot_token, self.chat_template_kwargs, self.chat_format.system_in_user]
        return [type(tok).__name__, state, tok.chat_template, added, *chat]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return render(self.tokenizer, messages, add_generation_prompt, self.chat_template_kwargs)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _encode_rendered(self, texts: list[str], conversations: list[list[dict]]) -> list[list[int]]:
        """The ids of conversations rendered as `texts`, their messages' text kept as text (`TextOnly`); a
        conversation that ends with the user's turn was rendered with the generation prompt."""
        ids = self._encode(texts)
        for i, messages in enumerate(conversations):
            if self.text_only.spelled_in(messages):
                prompt = messages[-1]["role"] != "assistant"
                template_only = self._render(self.text_only.placeholders(messages), prompt)
                ids[i] = self.text_only.encode(texts[i], template_only)
        return ids
