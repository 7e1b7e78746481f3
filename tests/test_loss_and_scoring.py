"""The supervised-positions loss equals full-logit masked cross-entropy; shared-prefix rank scoring equals naive."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmtune.data.batching import PaddingCollator
from lmtune.data.formatting import IGNORE_INDEX, ChatFormatter
from lmtune.data.records import Record
from lmtune.evaluation.scoring import naive_rank_scores, rank_scores
from lmtune.model.loss import masked_lm_loss_sum, reference_masked_lm_loss


def test_loss_equals_reference_full_logit_cross_entropy(tiny_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (4, 33))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 25:] = 0
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (start, end) in enumerate([(20, 24), (22, 25), (30, 33), (5, 7)]):  # answers of uneven length
        labels[row, start:end] = input_ids[row, start:end]

    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    loss_sum, n = masked_lm_loss_sum(hidden, labels, model.lm_head)
    ours = loss_sum / n
    reference = reference_masked_lm_loss(model.lm_head(hidden), labels)
    hf = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert n.item() == 4 + 3 + 3 + 2  # every supervised token counts once
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, hf, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # boolean and additive custom 4D masks
def test_shared_prefix_rank_scores_equal_naive_per_label_scores(tiny_dir, tiny_tokenizer, attention):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation=attention).eval()
    labels = ["cs.CL", "cs.CV", "cs.LG", "math.OC", "q-bio.NC"]  # answers of different token lengths
    formatter = ChatFormatter(tiny_tokenizer, labels)
    assert len({len(a) for a in formatter.answer_ids}) > 1
    prompts = [formatter.prompt_ids(f"Title {i}", "word " * (3 + 7 * i)) for i in range(4)]  # uneven lengths
    fast = rank_scores(model, prompts, formatter.answer_ids, tiny_tokenizer.pad_token_id)
    naive = naive_rank_scores(model, prompts, formatter.answer_ids)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-4)
    chunked = rank_scores(model, prompts, formatter.answer_ids, tiny_tokenizer.pad_token_id, max_rows=len(labels))
    torch.testing.assert_close(chunked, naive, rtol=0, atol=1e-4)  # one prompt per chunk
    probs = fast.softmax(-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))


def test_rank_scores_score_the_training_tokens(tiny_dir, tiny_tokenizer):
    """A label's score is minus the summed training loss of that example: scorer and trainer agree."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    formatter = ChatFormatter(tiny_tokenizer, ["cs.CL", "cs.CV"])
    example = formatter.format([Record("x", "T", "Some abstract.", "cs.CV")])[0]
    batch = PaddingCollator(tiny_tokenizer.pad_token_id)([example])
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        loss_sum, _ = masked_lm_loss_sum(hidden, batch["labels"], model.lm_head)
    scores = rank_scores(model, [example.input_ids[: example.prompt_length]], formatter.answer_ids, 0)
    torch.testing.assert_close(scores[0, 1], -loss_sum, rtol=0, atol=1e-4)
