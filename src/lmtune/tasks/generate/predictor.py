"""Answers to conversations with a trained export (or the zero-shot base model), written as training formatted them.

The prompt is the conversation up to its last user turn, rendered by the export's own tokenizer and chat template
(`ConversationFormatter.prompt_ids`, what training's examples were cut from); a conversation longer than
`max_length` loses whole early exchanges first, as in training. The answer is generated one conversation at a time
(`model/generation.py`), so the same conversation gets the same text in eval, predict and the server.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lmtune.artifacts.export import load_export_model, load_formatter, read_export
from lmtune.core.errors import UserError
from lmtune.data.conversations import ConversationFormatter, ConversationTask
from lmtune.model.generation import generate_tokens
from lmtune.model.loading import load_for_inference
from lmtune.model.precision import autocast_for

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"  # what decoding shows for the first bytes of a character not yet complete


@dataclass
class Answer:
    text: str
    tokens: int  # generated, the turn closer included
    finish_reason: str  # "stop": the turn closer; "length": max_new_tokens reached first
    prompt_tokens: int = 0
    dropped: int = 0  # early exchanges dropped to fit max_length


class ChatPredictor:
    """A causal LM and the conversation formatter it was trained with; `stream` and `answer` write replies."""

    def __init__(self, causal_lm, formatter: ConversationFormatter, source: str = "", precision: str | None = None):
        self.causal_lm = causal_lm.eval()
        self.formatter = formatter
        self.source = source
        self.precision = str(precision or "32-true")  # training's: an answer is written as validation scored it

    def _autocast(self):
        return autocast_for(self.causal_lm, self.precision)

    @classmethod
    def from_export(cls, export, cache_dir, device: torch.device, base: str | None = None, **kwargs) -> ChatPredictor:
        export = read_export(export)
        if export.kind != "generate":
            raise UserError(f"{export.path}: a {export.kind} export; it answers with labels, not free text.")
        formatter = load_formatter(export)
        model = load_export_model(export, cache_dir, device, base=base)
        log.info("loaded %s (%s, generate) on %s", export.path, export.cfg.adapter.kind, device)
        log.info(formatter.chat_format.describe())
        kwargs.setdefault("precision", export.cfg.trainer.get("precision"))
        return cls(model, formatter, source=str(export.path), **kwargs)

    @classmethod
    def zero_shot(
        cls, model_cfg, task: ConversationTask, cache_dir, device: torch.device, max_length: int = 1024, **kwargs
    ) -> ChatPredictor:
        """The base model with the task's conversations: the baseline a fine-tuned export is compared to."""
        pretrained, tokenizer, model, precision = load_for_inference(
            model_cfg, cache_dir, device, kwargs.pop("precision", None)
        )
        formatter = ConversationFormatter(
            tokenizer,
            task,
            max_length,
            eot_token=model_cfg.get("eot_token"),
            chat_template_kwargs=model_cfg.get("chat_template_kwargs"),
        )
        return cls(model, formatter, source=f"zero-shot {pretrained}", precision=precision, **kwargs)

    def stream(
        self,
        messages: list[dict],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> Iterator[str | Answer]:
        """The answer's text as it is written (pieces that join to `Answer.text`; the template's leading space
        dropped), then the `Answer`."""
        prompt, dropped = self.formatter.fit_prompt(messages)  # a DataError if the last user turn cannot fit
        max_new_tokens = max(1, min(max_new_tokens, self.formatter.max_length - len(prompt)))
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        eot = self.formatter.eot_id
        stops = {eot} | ({self.formatter.tokenizer.eos_token_id} - {None})
        ids, shown, finish = [], "", "length"
        with self._autocast():
            for token in generate_tokens(
                self.causal_lm,
                prompt,
                max_new_tokens=max_new_tokens,
                stop_ids=stops,
                temperature=temperature,
                generator=generator,
            ):
                if token in stops:
                    finish = "stop"
                    break
                ids.append(token)
                text = self.formatter.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
                if not text.endswith(REPLACEMENT) and len(text) > len(shown) and text.startswith(shown):
                    yield text[len(shown) :]
                    shown = text
        text = self.formatter.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown) :]
        yield Answer(text, len(ids) + (finish == "stop"), finish, len(prompt), dropped)

    def answer(self, messages: list[dict], **kwargs) -> Answer:
        *_, answer = self.stream(messages, **kwargs)
        return answer


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """A conversation's last assistant turn as the reference, the turns before it as the prompt."""
    last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
