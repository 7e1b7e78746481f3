"""Masking: exactly `<category><end-of-turn>` carries loss, for SmolLM2's template and the tiny one, pad == eos too."""

import doctest

import pytest
import torch

from conftest import SAMPLE, arxiv_datamodule, arxiv_formatter, arxiv_task, compose_train, paper
from lmtune.core.errors import DataError
from lmtune.data import batching
from lmtune.data.batching import LengthGroupedSampler, PaddingCollator
from lmtune.data.formatting import IGNORE_INDEX, ChatFormatter
from lmtune.data.records import Record
from lmtune.model.tiny import CHAT_TEMPLATE, build_tiny_tokenizer
from lmtune.training.instantiate import instantiate_data

LABELS = ["cs.AI", "cs.CL", "cs.CV", "cs.LG", "cs.RO"]


def records(n=10):
    return [paper(f"r{i}", f"A study {i} of things", "We show that words " * (i + 1), LABELS[i % 5]) for i in range(n)]


def supervised_text(tokenizer, example):
    return tokenizer.decode(
        [t for t, lab in zip(example.input_ids, example.labels, strict=False) if lab != IGNORE_INDEX]
    )


@pytest.fixture(params=["tiny", "tiny_pad_eq_eos", "smollm2"])
def tokenizer(request, tiny_tokenizer, smollm2_tokenizer):
    if request.param == "tiny":
        return tiny_tokenizer
    if request.param == "tiny_pad_eq_eos":
        return build_tiny_tokenizer(pad_equals_eos=True)
    return smollm2_tokenizer


def test_supervised_tokens_are_exactly_category_and_end_of_turn(tokenizer):
    formatter = arxiv_formatter(tokenizer, LABELS, max_length=512)
    examples = formatter.format(records())
    for r, e in zip(records(), examples, strict=False):
        assert supervised_text(tokenizer, e) == r.label + tokenizer.eos_token
        assert e.labels[: e.prompt_length] == [IGNORE_INDEX] * e.prompt_length
        assert e.input_ids[: e.prompt_length] == formatter.prompt_ids(r.fields)
        assert e.input_ids[e.prompt_length :] == formatter.answer_ids[LABELS.index(r.label)]
    # the prompt is the template's rendering with the generation prompt, and nothing of the answer
    first = records(1)[0]
    rendered = tokenizer.apply_chat_template(
        formatter.messages(first.fields), tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(examples[0].input_ids[: examples[0].prompt_length]) == rendered


def test_smollm2_end_of_turn_is_its_pad_token_and_stays_supervised(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    examples = arxiv_formatter(tok, LABELS, max_length=512).format(records(4))
    batch = PaddingCollator(tok.pad_token_id, pad_to_multiple_of=8)(examples)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        labels = batch["labels"][row]
        # the answer's end-of-turn (== pad id) is supervised; the padding after it (same id) is not
        assert labels[n - 1].item() == tok.eos_token_id
        assert (labels[n:] == IGNORE_INDEX).all() and (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (labels != IGNORE_INDEX).sum() == len(e.input_ids) - e.prompt_length
    assert batch["input_ids"].shape[1] % 8 == 0


def test_smollm2_no_default_system_prompt_is_injected(smollm2_tokenizer):
    formatter = arxiv_formatter(smollm2_tokenizer, LABELS)
    text = smollm2_tokenizer.decode(formatter.format(records(1))[0].input_ids)
    assert "You are a helpful AI assistant" not in text
    assert text.startswith("<|im_start|>system\nYou classify arXiv papers") and "cs.AI, cs.CL, cs.CV" in text


def test_long_abstract_is_truncated_never_the_answer(tokenizer):
    formatter = arxiv_formatter(tokenizer, LABELS, max_length=160)
    long = paper("long", "T", "many words here " * 300, "cs.CV")
    (e,) = formatter.format([long])
    assert e.truncated and len(e.input_ids) <= 160
    assert supervised_text(tokenizer, e) == "cs.CV" + tokenizer.eos_token
    with pytest.raises(DataError, match=r"record long: the prompt without any of its 'abstract'.*raise data\.max_"):
        arxiv_formatter(tokenizer, LABELS, max_length=20).format([long])


def test_shortened_prompt_does_not_depend_on_the_label_and_matches_prediction(tokenizer):
    labels = ["cs.CV", "physics.comp-ph"]  # answers of different token lengths
    formatter = arxiv_formatter(tokenizer, labels, max_length=160)
    assert len({len(a) for a in formatter.answer_ids}) == 2
    abstract = "many words here " * 300
    a, b = formatter.format([paper("a", "T", abstract, "cs.CV"), paper("b", "T", abstract, "physics.comp-ph")])
    prompt = a.input_ids[: a.prompt_length]
    assert a.truncated and b.truncated and prompt == b.input_ids[: b.prompt_length]  # no hint of the label
    assert formatter.fit_prompts([{"title": "T", "abstract": abstract}]) == [(prompt, True)]
    assert max(len(a.input_ids), len(b.input_ids)) <= 160


def test_template_drift_is_a_clear_error(tiny_tokenizer):
    drifting = build_tiny_tokenizer()
    # renders the last user turn differently when an assistant answer follows: the prompt is no longer a prefix
    drifting.chat_template = (
        "{% for m in messages %}{{ m['role'] }}{% if loop.last and m['role'] == 'user' %}!{% endif %}: "
        "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match="not a token prefix of the full conversation"):
        arxiv_formatter(drifting, LABELS)


def test_a_template_that_changes_one_record_s_answer_is_caught_for_that_record(tiny_tokenizer):
    """Whether a conversation needs its own tokenization is decided per record from the rendered texts: a template
    whose answer turn depends on the record (here: a marker after answers to texts about robots) is checked and
    refused for exactly that record, however the other records are formatted."""
    content_dependent = build_tiny_tokenizer()
    content_dependent.chat_template = CHAT_TEMPLATE.replace(
        "message['content'] + '<|eot_id|>'",
        "message['content'] + (' (robotics)' if message['role'] == 'assistant' and 'robot' in messages[-2]['content']"
        " else '') + '<|eot_id|>'",
    )
    assert content_dependent.chat_template != CHAT_TEMPLATE
    formatter = arxiv_formatter(content_dependent, LABELS)
    assert formatter.prompt_tail is not None  # the texts decide; an isolated tail alone does not
    plain = paper("p1", "Parsing", "We parse sentences.", "cs.CL")
    (example,) = formatter.format([plain])
    assert example.input_ids[example.prompt_length :] == formatter.answer_ids[LABELS.index("cs.CL")]
    with pytest.raises(DataError, match="record r1: answer tokens .* differ from the label's reference"):
        formatter.format([plain, paper("r1", "Grasping", "A robot arm grasps.", "cs.RO")])


def test_missing_chat_template_is_a_clear_error():
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        arxiv_formatter(tok, LABELS)


def test_collator_doctest():
    assert doctest.testmod(batching).failed == 0


def test_length_grouped_sampler_is_a_deterministic_grouped_permutation():
    lengths = [(i * 37) % 101 for i in range(203)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3, mega_batch_factor=4)
    sampler.set_epoch(1)
    order = list(sampler)
    assert sorted(order) == list(range(203)) and order == list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != order
    batches = [order[i : i + 8] for i in range(0, len(order), 8)]

    def spread(batches):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    # within a batch, lengths are close: far less spread than in random batches
    shuffled = torch.randperm(203, generator=torch.Generator().manual_seed(0)).tolist()
    assert spread(batches) < 0.4 * spread([shuffled[i : i + 8] for i in range(0, 203, 8)])
    assert len(batches[-1]) == 203 % 8  # the short batch is last
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch comes first
    # resuming mid-epoch continues with exactly the remaining batches
    sampler.set_epoch(1)
    sampler.skip_batches(epoch=1, batches=5)
    assert list(sampler) == order[40:]
    assert list(sampler) == order  # the skip applies once


def test_chat_template_kwargs_pin_template_variables(tiny_tokenizer):
    tok = build_tiny_tokenizer()
    tok.chat_template = "{% if date_string is defined %}Today Date: {{ date_string }}\n{% endif %}" + CHAT_TEMPLATE
    formatter = arxiv_formatter(tok, LABELS, chat_template_kwargs={"date_string": "26 Jul 2024"})
    (example,) = formatter.format(records(1))
    assert tok.decode(example.input_ids).startswith("Today Date: 26 Jul 2024\n")
    assert supervised_text(tok, example) == "cs.AI" + tok.eos_token


def test_every_example_of_the_sample_data_is_supervised(tiny_tokenizer):
    dm = arxiv_datamodule(tiny_tokenizer, str(SAMPLE), top_k=3, max_length=128)
    dm.setup()
    examples = [e for split in dm.examples.values() for e in split]
    assert len(examples) == 96 and dm.stats["truncated"]["train"] > 0
    for e in examples:
        supervised = [t for t in e.labels if t != IGNORE_INDEX]
        assert supervised == dm.formatter.answer_ids[e.label_index] and len(e.input_ids) <= 128


def test_pad_token_option(tiny_dir):
    from lmtune.model.loading import ModelConfigError, load_tokenizer

    assert load_tokenizer(tiny_dir).pad_token == "<|pad|>"
    tok = load_tokenizer(tiny_dir, pad_token="<|eot_id|>")
    assert tok.pad_token_id == tok.eos_token_id
    with pytest.raises(ModelConfigError, match="model.pad_token='<nope>' is not in the vocabulary"):
        load_tokenizer(tiny_dir, pad_token="<nope>")


TICKET_PROMPTS = {
    "system_prompt": "Route the ticket to one queue: {labels}.",
    "user_template": "Subject: {subject}\n\n{body}",
}


def ticket(i: str, subject: str, body: str, queue: str) -> Record:
    return Record(id=i, fields={"subject": subject, "body": body}, label=queue)


def test_a_task_of_its_own_columns_with_labels_of_any_spelling(tokenizer):
    labels = ["billing", "access", "5 stars"]
    formatter = ChatFormatter(tokenizer, labels, 512, **TICKET_PROMPTS)
    assert formatter.columns == ("subject", "body")
    examples = formatter.format(
        [ticket("t1", "Refund", "Charged twice.", "5 stars"), ticket("t2", "Login", "No.", "access")]
    )
    assert [supervised_text(tokenizer, e) for e in examples] == [
        "5 stars" + tokenizer.eos_token,
        "access" + tokenizer.eos_token,
    ]
    prompt = tokenizer.decode(examples[0].input_ids[: examples[0].prompt_length])
    assert "Route the ticket to one queue: billing, access, 5 stars." in prompt
    assert "Subject: Refund\n\nCharged twice." in prompt


def test_the_longest_column_is_shortened_by_default_or_the_configured_one(tiny_tokenizer):
    labels = ["billing", "access"]
    long_body = ticket("t", "Printer jams", "the printer jams again " * 200, "billing")
    (e,) = ChatFormatter(tiny_tokenizer, labels, 160, **TICKET_PROMPTS).format([long_body])
    text = tiny_tokenizer.decode(e.input_ids[: e.prompt_length])
    assert e.truncated and len(e.input_ids) <= 160 and "Subject: Printer jams\n\nthe printer" in text  # body cut
    subject_cut = ChatFormatter(tiny_tokenizer, labels, 160, truncate_column="subject", **TICKET_PROMPTS)
    with pytest.raises(DataError, match=r"record t: the prompt without any of its 'subject' is \d+ tokens"):
        subject_cut.format([long_body])  # the body alone is too long: cutting the subject cannot help
    (short,) = subject_cut.format([ticket("s", "Printer " * 200, "It jams.", "access")])
    assert short.truncated and len(short.input_ids) <= 160 and "It jams." in tiny_tokenizer.decode(short.input_ids)


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ({"system_prompt": "Queue for {body}: {labels}."}, r"data\.prompt\.system uses \{body\}: only \{labels\}"),
        ({"user_template": "Ticket: {}"}, r"'\{\}' is not a column name"),
        ({"user_template": "Ticket {0}"}, r"'\{0\}' is not a column name"),
        ({"user_template": "Just text"}, r"reads no column; name one"),
        ({"user_template": "Subject: {subject"}, r"data\.prompt\.user=.*write a literal brace as \{\{"),
        (
            {"truncate_column": "title"},
            r"data\.truncate_column='title' is not a column the prompt reads \(subject, body\)",
        ),
    ],
)
def test_a_broken_prompt_setting_is_named(tiny_tokenizer, prompts, message):
    with pytest.raises(DataError, match=message):
        ChatFormatter(tiny_tokenizer, ["billing", "access"], 512, **{**TICKET_PROMPTS, **prompts})


# The arXiv task's token ids on the sample data with the tiny tokenizer, as computed by the code before the task
# became configurable (commit 3e1721c): conf/data/arxiv.yaml must reproduce them exactly, and the same splits.
ARXIV_SAMPLE_DIGEST = "78137571fbe79679026bc2aa3c21319d433db380b4ec95cedad534ac29795d8b"


def test_the_arxiv_task_gives_the_same_examples_and_splits_as_before(tiny_tokenizer):
    import hashlib
    import json

    dm = arxiv_datamodule(tiny_tokenizer, str(SAMPLE), top_k=3, max_length=128, val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    seen = {
        split: [[e.id, e.input_ids, e.labels, e.truncated] for e in examples] for split, examples in dm.examples.items()
    }
    assert hashlib.sha256(json.dumps(seen).encode()).hexdigest() == ARXIV_SAMPLE_DIGEST
    assert dm.formatter.system_prompt == (
        "You classify arXiv papers by their primary category. "
        "Answer with exactly one of these categories and nothing else: cs.CL, cs.CV, cs.RO."
    )


def test_zero_shot_keeps_the_label_list_when_the_fine_tuned_prompt_drops_it(tiny_tokenizer):
    """A recipe may train on a short instruction (a fine-tuned model has learned the labels); the base model
    scored zero-shot next to it still gets the list, on the same papers with the same answer tokens."""
    user = arxiv_task()["prompt"]["user"]
    prompt = {"system": "Give the paper's arXiv category.", "user": user, "zero_shot_system": "One of: {labels}."}
    dm = arxiv_datamodule(tiny_tokenizer, str(SAMPLE), top_k=3, max_length=256, prompt=prompt)
    dm.setup()
    zero_shot = dm.zero_shot_formatter()
    assert dm.formatter.system_prompt == "Give the paper's arXiv category."
    assert zero_shot.system_prompt == "One of: cs.CL, cs.CV, cs.RO." and zero_shot.answer_ids == dm.formatter.answer_ids
    fields = [r.fields for r in dm.splits["test"][:2]]
    longer = zip(zero_shot.fit_prompts(fields), dm.formatter.fit_prompts(fields), strict=True)
    assert all(len(listed) > len(short) for (listed, _), (short, _) in longer)  # the label list is in there
    default = arxiv_datamodule(tiny_tokenizer, str(SAMPLE), top_k=3, max_length=256)
    default.setup()
    assert default.zero_shot_formatter() is default.formatter


def test_lora_arxiv_trains_on_the_short_instruction_and_scores_zero_shot_with_the_label_list(tiny_tokenizer, tmp_path):
    """The shipped recipe (experiment=lora_arxiv, measured on the learning curve): the fine-tuned prompt has no
    label list, the zero-shot base model beside it keeps the one `data=arxiv` uses for both."""
    cfg = compose_train(["experiment=lora_arxiv", f"data.path={SAMPLE}", "data.top_k=3"], tmp_path, tmp_path)
    dm = instantiate_data(cfg.data, tokenizer=tiny_tokenizer)  # as train.py builds it
    dm.setup()
    labels = ("cs.CL", "cs.CV", "cs.RO")
    assert dm.formatter.system_prompt == "Answer with the primary arXiv category of this paper."
    assert all(label in dm.zero_shot_formatter().system_prompt for label in labels)
    plain = arxiv_datamodule(tiny_tokenizer, str(SAMPLE), top_k=3, max_length=cfg.data.max_length)
    plain.setup()
    assert dm.zero_shot_formatter().system_prompt == plain.formatter.system_prompt
    example = dm.examples["train"][0]  # the answer tokens are the same either way: only the prompt is shorter
    (listed,) = [e for e in plain.examples["train"] if e.id == example.id]
    assert len(example.input_ids) < len(listed.input_ids)
    assert [t for t in example.labels if t != IGNORE_INDEX] == [t for t in listed.labels if t != IGNORE_INDEX]
