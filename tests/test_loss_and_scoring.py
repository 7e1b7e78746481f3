"""The supervised-positions loss equals full-logit masked cross-entropy (also compiled and through the forward FSDP
uses); shared-prefix rank scoring equals naive."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import arxiv_formatter, assert_compile_matches_eager, paper
from lmtune.data.batching import PaddingCollator
from lmtune.data.formatting import IGNORE_INDEX
from lmtune.model.loss import masked_lm_loss_sum, masked_lm_loss_sum_via_forward, reference_masked_lm_loss
from lmtune.model.scoring import MIN_SHARED_PREFIX, PrefixTree, SharedPrefix, naive_rank_scores, rank_scores


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
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    via_forward_sum, via_forward_n = masked_lm_loss_sum_via_forward(model, batch)  # the FSDP path
    assert n.item() == 4 + 3 + 3 + 2  # every supervised token counts once
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, hf, rtol=0, atol=1e-5)
    assert via_forward_n.item() == n.item()
    torch.testing.assert_close(via_forward_sum, loss_sum, rtol=0, atol=1e-5)


def test_class_weights_give_the_weighted_mean_over_tokens_on_both_paths(tiny_dir):
    """`loss.class_weights`: each example's tokens weigh its label's weight; the loss is sum(w x token loss) /
    sum(w) (the same formula on the plain and the FSDP path), and weights of 1 give the unweighted loss."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    input_ids = torch.randint(0, model.config.vocab_size, (3, 20))
    attention_mask = torch.ones_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (start, end) in enumerate([(10, 14), (15, 17), (5, 8)]):
        labels[row, start:end] = input_ids[row, start:end]
    row_weight = torch.tensor([0.5, 3.0, 1.0])
    weights = row_weight[:, None].expand_as(labels)
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    loss_sum, total = masked_lm_loss_sum(hidden, labels, model.lm_head, weights)
    per_row = [reference_masked_lm_loss(model.lm_head(hidden[r : r + 1]), labels[r : r + 1]) for r in range(3)]
    tokens = torch.tensor([4.0, 2.0, 3.0])
    expected = sum(w * n * loss for w, n, loss in zip(row_weight, tokens, per_row, strict=True)) / (row_weight @ tokens)
    torch.testing.assert_close(loss_sum / total, expected, rtol=0, atol=1e-5)
    assert total.item() == pytest.approx(float(row_weight @ tokens))
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    via_forward_sum, via_forward_total = masked_lm_loss_sum_via_forward(model, batch, weights)
    torch.testing.assert_close(via_forward_sum, loss_sum, rtol=0, atol=1e-5)
    assert via_forward_total.item() == pytest.approx(total.item())
    ones_sum, ones_total = masked_lm_loss_sum(
        hidden, labels, model.lm_head, torch.ones_like(weights, dtype=torch.float)
    )
    plain_sum, plain_n = masked_lm_loss_sum(hidden, labels, model.lm_head)
    torch.testing.assert_close(ones_sum, plain_sum, rtol=0, atol=1e-5)
    assert ones_total.item() == plain_n.item()


@pytest.mark.slow  # torch.compile's first compilation, 20 s on 2 cores
def test_compile_gives_the_same_loss_and_gradients(tiny_dir, tiny_tokenizer):
    formatter = arxiv_formatter(tiny_tokenizer, ["cs.CL", "math.OC", "q-bio.NC"])  # answers of uneven length
    records = [paper(f"p{i}", f"Title {i}", "word " * (5 + 9 * i), formatter.labels[i % 3]) for i in range(4)]
    batch = PaddingCollator(tiny_tokenizer.pad_token_id)(formatter.format(records))
    adapter = {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    model = {"source": "tiny_random", "dtype": "float32"}
    assert_compile_matches_eager(tiny_dir, model, adapter, formatter, tiny_tokenizer.pad_token_id, batch)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # boolean and additive custom 4D masks
def test_rank_scores_with_the_opening_encoded_once_equal_naive_per_label_scores(tiny_dir, tiny_tokenizer, attention):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation=attention).eval()
    labels = ["cs.CL", "cs.CV", "cs.LG", "math.OC", "q-bio.NC"]  # answers of different token lengths
    formatter = arxiv_formatter(tiny_tokenizer, labels)
    assert len({len(a) for a in formatter.answer_ids}) > 1
    # the cs.* answers share their first tokens: fed once, and no label's last token is fed
    assert len(PrefixTree(formatter.answer_ids).tokens) < sum(len(a) - 1 for a in formatter.answer_ids)
    rows = [{"title": f"Title {i}", "abstract": "word " * (3 + 7 * i)} for i in range(4)]  # uneven lengths
    prompts = [formatter.prompt_ids(row) for row in rows]
    # the system turn with its labels opens every prompt: encoded once, then continued per prompt
    opening = formatter.opening_ids
    assert len(opening) >= MIN_SHARED_PREFIX and all(SharedPrefix(model, opening).opens(p) for p in prompts)
    assert "cs.CL, cs.CV" in tiny_tokenizer.decode(opening)
    naive = naive_rank_scores(model, prompts, formatter.answer_ids)
    torch.testing.assert_close(rank_scores(model, prompts, formatter.answer_ids, opening), naive, rtol=0, atol=1e-4)
    torch.testing.assert_close(rank_scores(model, prompts, formatter.answer_ids), naive, rtol=0, atol=1e-4)
    probs = naive.softmax(-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))


def test_a_prompt_that_does_not_open_with_the_opening_is_encoded_whole(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    opening = list(range(3, 3 + 12))
    shared = SharedPrefix(model, opening)
    assert shared.opens(opening + [40]) and not shared.opens(opening)  # a prompt keeps a token of its own
    assert not shared.opens([4] + opening[1:] + [40])
    prompts = [opening + [40, 41], [4] + opening[1:] + [42], opening, opening[:5]]
    answers = [[50, 51], [50, 52, 53], [60]]
    scores = rank_scores(model, prompts, answers, opening)
    torch.testing.assert_close(scores, naive_rank_scores(model, prompts, answers), rtol=0, atol=1e-4)


def test_a_prompts_scores_do_not_depend_on_what_it_is_scored_with_in_bf16(tiny_dir, tiny_tokenizer):
    """The same bits alone, among others, in any order: in bf16 a batched matrix product rounds with its row count
    (and padding moves attention's blocks), which flipped near decisions between eval, predict and the server."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).eval()
    formatter = arxiv_formatter(tiny_tokenizer, ["cs.CL", "cs.CV", "cs.LG", "math.OC", "q-bio.NC"])
    rows = [{"title": f"Title {i}", "abstract": "word " * (3 + 11 * i) + "end."} for i in range(8)]
    prompts = [formatter.prompt_ids(row) for row in rows]

    def scores(group):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return rank_scores(model, group, formatter.answer_ids, formatter.opening_ids)

    together = scores(prompts)
    alone = torch.cat([scores([p]) for p in prompts])
    reversed_ = scores(prompts[::-1]).flip(0)
    assert torch.equal(together, alone) and torch.equal(together, reversed_)


def test_rank_scores_score_the_training_tokens(tiny_dir, tiny_tokenizer):
    """A label's score is minus the summed training loss of that example: scorer and trainer agree."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    formatter = arxiv_formatter(tiny_tokenizer, ["cs.CL", "cs.CV"])
    example = formatter.format([paper("x", "T", "Some abstract.", "cs.CV")])[0]
    batch = PaddingCollator(tiny_tokenizer.pad_token_id)([example])
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        loss_sum, _ = masked_lm_loss_sum(hidden, batch["labels"], model.lm_head)
    scores = rank_scores(model, [example.input_ids[: example.prompt_length]], formatter.answer_ids)
    torch.testing.assert_close(scores[0, 1], -loss_sum, rtol=0, atol=1e-4)
