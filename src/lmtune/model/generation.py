"""Writing an answer: one prompt at a time, token by token with the model's KV cache, stopped at the turn closer.

One prompt at a time (as rank scoring does) means an answer does not depend on what else is generated beside it:
eval, predict and the server write the same text for the same prompt in every precision (a padded batch changes
the rounding of every matrix product in bf16, and so, near a tie, the chosen token). Greedy by default;
`temperature > 0` samples from the softmax at that temperature with the caller's generator (a seed gives the same
text again). Always eager, as scoring is: a compiled run's recompiles for every new length would cost more than
they save here.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


@torch.no_grad()
def generate_tokens(
    causal_lm,
    prompt: list[int],
    *,
    max_new_tokens: int,
    stop_ids: set[int],
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """The answer's token ids as they are chosen; the stop token that ends it is yielded last (its caller drops it
    from the text). At most `max_new_tokens` tokens, the stop token included."""
    device = next(causal_lm.parameters()).device
    ids = torch.tensor([prompt], device=device)
    past = None
    with torch.compiler.set_stance("force_eager"):
        for _ in range(max_new_tokens):
            out = causal_lm(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
            else:
                token = int(logits.argmax())
            yield token
            if token in stop_ids:
                return
            ids = torch.tensor([[token]], device=device)
