"""The generate kind's data: OpenAI-style conversations (or a prompt and an answer column) as supervised examples.

What must hold: exactly the assistant turns (with their closers) carry loss, `train_on=last` only the last; bad rows
are counted skips by reason, never errors that stop the run; a conversation longer than `max_length` loses whole
early exchanges or is skipped, never has an answer cut; a run trains on such a file with only `data=chat
data.path=<file>`, validates by answer loss and perplexity, and exports the task it trained.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose_train
from helpers.chats import BAD_ROWS, chat, write_chats
from helpers.wandb_files import read_run
from lmtune.data.conversations import ConversationFormatter, ConversationTask, read_messages
from lmtune.data.datamodule import ChatDataModule
from lmtune.data.formatting import IGNORE_INDEX
from lmtune.tasks.generate.evaluation import text_metrics


@pytest.mark.parametrize("reason", list(BAD_ROWS))
def test_a_bad_conversation_gives_its_reason(reason):
    assert read_messages(BAD_ROWS[reason]) == (None, reason)


def test_a_conversation_is_read_from_a_json_string_and_keeps_role_and_content_only():
    text = json.dumps(
        [{"role": "user", "content": "Hi\r\nthere ", "name": "x"}, {"role": "assistant", "content": "Yo"}]
    )
    assert read_messages(text) == (
        [{"role": "user", "content": "Hi\nthere"}, {"role": "assistant", "content": "Yo"}],
        None,
    )


def supervised_texts(tokenizer, ids, labels) -> list[str]:
    """The decoded runs of supervised tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(r) for r in runs + ([current] if current else [])]


def test_too_long_a_conversation_loses_whole_early_exchanges_or_is_skipped(tiny_tokenizer):
    task = ConversationTask(messages_column="messages")
    full, _, _ = ConversationFormatter(tiny_tokenizer, task, 4096).fit(chat(1, 3))
    length = len(full[0][0])
    short = ConversationFormatter(tiny_tokenizer, task, length - 1)
    (kept,), dropped, problem = short.fit(chat(1, 3))
    assert (dropped, problem) == (1, None) and len(kept[0]) < length
    eot = tiny_tokenizer.convert_ids_to_tokens(short.eot_id)
    answers = supervised_texts(tiny_tokenizer, kept[0], _labels(*kept))
    assert answers == [f"It is 2, row 1 turn 1.{eot}", f"It is 3, row 1 turn 2.{eot}"]  # whole turns, system kept
    assert "Answer in a few words." in tiny_tokenizer.decode(kept[0])
    tiny = ConversationFormatter(tiny_tokenizer, task, 20)
    assert tiny.fit(chat(1, 3)) == ([], 2, "longer than data.max_length=20 with its last exchange alone")


def _labels(ids, spans):
    labels = [IGNORE_INDEX] * len(ids)
    for s, e in spans:
        labels[s:e] = ids[s:e]
    return labels


def test_the_data_module_supervises_the_assistant_turns_and_counts_every_skip(tmp_path, tiny_tokenizer):
    path = tmp_path / "chats.jsonl"
    write_chats(path)
    dm = ChatDataModule(tiny_tokenizer, path=str(path), cache_dir=str(tmp_path / "cache"), max_length=256)
    dm.setup("fit")
    assert dm.stats["task"] == "generate"
    assert {k: v for k, v in dm.stats["skipped"].items()} == dict.fromkeys(BAD_ROWS, 1)
    eot = tiny_tokenizer.convert_ids_to_tokens(dm.formatter.eot_id)
    batch = dm.collator(list(dm.examples["train"])[:4])
    for ids, labels, row_id in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["ids"], strict=True):
        i = int(row_id.removeprefix("c"))
        expected = [f"It is {i + t}, row {i} turn {t}.{eot}" for t in range(1 + i % 3)]
        assert supervised_texts(tiny_tokenizer, ids, labels) == expected
    assert sum(len(dm.examples[s]) for s in ("train", "val", "test")) == 40


def test_a_csv_of_columns_gives_a_prompt_and_its_answer(tmp_path, tiny_tokenizer):
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["abstract", "title"])
        writer.writerows([[f"We study problem {i} in depth.", f"On problem {i}"] for i in range(30)])
        writer.writerow(["", "No abstract"])
    dm = ChatDataModule(
        tiny_tokenizer,
        path=str(path),
        messages_column=None,
        prompt={"system": "Write the title.", "user": "Abstract: {abstract}"},
        answer="{title}",
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    assert dm.stats["skipped"] == {"missing or empty 'abstract'": 1}
    eot = tiny_tokenizer.convert_ids_to_tokens(dm.formatter.eot_id)
    for example in dm.examples["train"]:
        (answer,) = supervised_texts(tiny_tokenizer, example.input_ids, example.labels)
        assert answer.startswith("On problem ") and answer.endswith(eot)


def test_a_messages_column_and_a_prompt_are_one_setting_too_many():
    from lmtune.core.errors import DataError

    with pytest.raises(DataError, match="data.messages_column is set together with data.prompt.user"):
        ConversationTask(user_template="{text}", answer="summary", messages_column="messages")


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, cache_dir):
    """`experiment=smoke data=chat data.path=<file>`, trained once for the tests below."""
    from lmtune.training.train import train

    root = tmp_path_factory.mktemp("chat-run")
    path = root / "chats.jsonl"
    write_chats(path)
    cfg = compose_train(["experiment=smoke", "data=chat", f"data.path={path}"], root / "run", cache_dir)  # W&B offline
    metrics, objects = train(cfg)
    return root, metrics, objects


def test_a_chat_file_trains_with_only_data_chat_and_its_path(chat_run):
    """Train, validate by answer loss and perplexity, write the test split's answers beside the zero-shot model's,
    export the task."""
    root, metrics, objects = chat_run
    assert set(metrics) >= {"val/loss", "val/perplexity", "test/loss", "test/perplexity", "test/chrf", "test/rougeL"}
    assert metrics["val/perplexity"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    run = root / "run"
    answers = [json.loads(line) for line in (run / "generations" / "predictions.jsonl").read_text().splitlines()]
    test = objects["datamodule"].splits["test"]
    assert [a["id"] for a in answers] == [r.id for r in test] and answers
    references = [json.loads(r.fields["messages"])[-1]["content"] for r in test]
    assert [a["reference"] for a in answers] == references
    report = (run / "report.md").read_text()
    assert "| zero-shot |" in report and "| fine-tuned |" in report and "## Examples" in report
    assert answers[0]["reference"] in report  # the examples table
    assert metrics["test/chrf"] == pytest.approx(text_metrics([a["answer"] for a in answers], references)["chrf"])
    formatting = json.loads((run / "export" / "formatting.json").read_text())
    assert formatting["task"] == "generate" and formatting["messages_column"] == "messages"
    assert not (run / "export" / "labels.json").exists()
    manifest = json.loads((run / "data_manifest.json").read_text())
    assert manifest["skipped"]["no assistant turn"] == 1
    assert len(list((run / "checkpoints").glob("step*-loss*.ckpt"))) == 1
    general = json.loads((run / "metrics.json").read_text())["forgetting"]
    assert general["base"]["tokens"] > 0 and "test rows as plain text" in general["source"]
    assert "## What the adapter cost: general text" in report
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    logged = read_run(wandb_run)
    assert logged["summary"]["report/fine_tuned/chrf"] == pytest.approx(metrics["test/chrf"])
    assert logged["summary"]["final/val/perplexity"] == pytest.approx(metrics["val/perplexity"])
    (table,) = [h for h in logged["history"] if "report/examples/_type" in h]  # the examples table, logged once
    assert table["report/examples/_type"] == "table-file" and table["report/examples/nrows"] == min(8, len(test))
    assert {a["type"] for a in logged["artifacts"]} >= {"model"}


def test_answers_written_on_validation_pick_the_checkpoint_and_match_the_export(tmp_path, cache_dir):
    """`val_answers.count`: validation writes answers and scores them (val/chrf, ...), the checkpoint is chosen by
    them, train() returns them to a sweep, and the export writes the same answers to the same score."""
    from lmtune.tasks.generate.predictor import ChatPredictor, prompt_and_reference
    from lmtune.training.train import train

    write_chats(tmp_path / "chats.jsonl")
    answers = ["val_answers.count=4", "val_answers.max_new_tokens=12"]
    chrf = ["optimized_metric=val/chrf", "monitor.metric=val/chrf", "monitor.mode=max", "monitor.short=chrf"]
    overrides = ["experiment=smoke", "data=chat", f"data.path={tmp_path / 'chats.jsonl'}", "logger=none"]
    cfg = compose_train([*overrides, *answers, *chrf, "report.enabled=false"], tmp_path / "run", cache_dir)
    metrics, objects = train(cfg)
    assert {"val/chrf", "val/rougeL", "val/exact_match", "val/loss"} <= set(metrics)
    (best,) = (tmp_path / "run" / "checkpoints").glob("step*-chrf*.ckpt")
    assert f"chrf{metrics['val/chrf']:.4f}" in best.name
    datamodule = objects["datamodule"]
    kept = {e.id for e in datamodule.examples["val"]}
    records = [r for r in datamodule.splits["val"] if r.id in kept][:4]
    predictor = ChatPredictor.from_export(tmp_path / "run" / "export", cache_dir, torch.device("cpu"))
    conversations = [prompt_and_reference(predictor.formatter.task.messages(r.fields)) for r in records]
    written = [predictor.answer(m, max_new_tokens=12).text for m, _ in conversations]
    expected = text_metrics(written, [reference for _, reference in conversations])
    assert metrics["val/chrf"] == pytest.approx(expected["chrf"], abs=1e-4)
    assert metrics["val/rougeL"] == pytest.approx(expected["rougeL"], abs=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["monitor.metric=val/chrf"], "monitor.metric=val/chrf: written answers are scored on validation only"),
        (["val_answers.count=4", "trainer=fsdp"], "val_answers.count=4 with trainer=fsdp"),
        (["val_answers.count=-1"], "val_answers.count=-1: validation conversations answered"),
    ],
)
def test_a_generation_metric_without_answers_on_validation_is_one_line(tmp_path, cache_dir, overrides, message):
    from lmtune.training.config import ConfigError, validate_config

    cfg = compose_train(["experiment=smoke", "data=chat", *overrides], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match=message.replace("/", ".")):
        validate_config(cfg)


def test_predict_answers_a_file_and_streams_one_message_as_the_report_wrote_them(chat_run, tmp_path):
    """The export's answers from `predict.py input=` equal the report's for the same conversations (one
    conversation at a time: the same text wherever it is written); a row that cannot be answered gets its own
    error line; `message=` streams one answer."""
    from helpers.cli_driver import run_commands

    root, _, objects = chat_run
    test = list(objects["datamodule"].splits["test"])
    report = [
        json.loads(line) for line in (root / "run" / "generations" / "predictions.jsonl").read_text().splitlines()
    ]
    rows = [{"id": r.id, "messages": json.loads(r.fields["messages"])} for r in test]
    rows.append({"id": "broken", "messages": [{"role": "assistant", "content": "Hi."}]})
    chats = tmp_path / "ask.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    export = str(root / "run" / "export")
    budget = str(max(r["tokens"] for r in report))
    results = run_commands(
        [
            {"script": "src/predict.py", "args": [f"ckpt={export}", f"input={chats}", f"max_new_tokens={budget}"]},
            {"script": "src/predict.py", "args": [f"ckpt={export}", "message=What is 2 plus 2?", "format=json"]},
            {"script": "src/predict.py", "args": [f"ckpt={export}", "row={text: hello}"]},
            {"script": "src/eval.py", "args": [f"ckpt={export}", "logger=none", f"hydra.run.dir={tmp_path / 'eval'}"]},
            {"script": "src/merge.py", "args": [f"ckpt={export}", f"out={tmp_path / 'merged'}"]},
            {"script": "src/predict.py", "args": [f"ckpt={tmp_path / 'merged'}", "message=Hello?", "format=json"]},
        ],
        tmp_path,
        "predict-chat",
    )
    file_run, message_run, row_run, eval_run, merge_run, merged_run = results
    assert eval_run["returncode"] == 0, eval_run["stderr"][-2000:]
    evaluated = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())["metrics"]
    reported = json.loads((root / "run" / "generations" / "eval_metrics.json").read_text())["metrics"]
    assert evaluated == reported  # eval.py split=test: the report's answers, so the report's numbers
    assert merge_run["returncode"] == 0, merge_run["stderr"][-2000:]
    assert merged_run["returncode"] == 0, merged_run["stderr"][-2000:]
    assert json.loads(merged_run["stdout"].strip().splitlines()[-1])["tokens"] >= 1
    assert file_run["returncode"] == 1 and "1 of " in file_run["stderr"] and "Traceback" not in file_run["stderr"]
    written = [json.loads(line) for line in (tmp_path / "ask.answers.jsonl").read_text().splitlines()]
    assert [w.get("answer") for w in written[:-1]] == [r["answer"] for r in report]
    assert [w.get("reference") for w in written[:-1]] == [r["reference"] for r in report]
    assert "roles out of order" in written[-1]["error"]
    assert message_run["returncode"] == 0, message_run["stderr"]
    answer = json.loads(message_run["stdout"].strip().splitlines()[-1])
    assert answer["finish_reason"] in ("stop", "length") and answer["tokens"] >= 1
    assert row_run["returncode"] == 1 and "message=" in row_run["stderr"] and "Traceback" not in row_run["stderr"]


def test_the_openai_client_chats_with_the_server_streamed_or_not(chat_run, tmp_path):
    """`serve.py` on a generate export speaks the OpenAI chat API: the official client gets the report's answer for
    a test conversation (greedy, one conversation at a time), the same text streamed, from concurrent clients too;
    every bad request gets a 4xx with one line, never a 500, and Schemathesis finds no request that does (a
    schema-valid conversation may still not fit max_length in tokens: positive_data_acceptance is left out)."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from helpers.server import KEY, Server

    root, _, objects = chat_run
    report = [
        json.loads(line) for line in (root / "run" / "generations" / "predictions.jsonl").read_text().splitlines()
    ]
    conversations = [json.loads(r.fields["messages"])[:-1] for r in objects["datamodule"].splits["test"]]
    budget = max(r["tokens"] for r in report)
    server = Server(tmp_path, f"ckpt={root / 'run' / 'export'}")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY, max_retries=0)

        def ask(messages):
            answer = client.chat.completions.create(model="lmtune", messages=messages, max_tokens=budget)
            return answer.choices[0].message.content

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, conversations))
        assert answers == [r["answer"] for r in report]
        # a conversation the tiny model answers in words (it often closes its turn at once)
        probes = [[{"role": "user", "content": f"{word} " * 5}] for word in ("zebra", "It is", "row 3", "x", "Paris")]
        spoken = next((m for m in conversations + probes if ask(m)), None)
        assert spoken is not None, "the tiny model answered every probe with its turn closer alone"
        chunks = client.chat.completions.create(model="lmtune", messages=spoken, max_tokens=budget, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert "".join(pieces) == ask(spoken) and len([p for p in pieces if p]) >= 1
        usage = client.chat.completions.create(model="lmtune", messages=conversations[0], max_tokens=2).usage
        assert usage.prompt_tokens > 10 and 0 <= usage.completion_tokens <= 2
        with pytest.raises(openai.UnprocessableEntityError, match="the last message must be the user's"):
            turns = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
            client.chat.completions.create(model="lmtune", messages=turns)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).chat.completions.create(
                model="lmtune", messages=conversations[0]
            )

        user = [{"role": "user", "content": "Hello?"}]
        bad = {
            "not JSON": (b"{", 400),
            "no messages": (json.dumps({"model": "x"}).encode(), 422),
            "a tool turn": (json.dumps({"messages": [{"role": "tool", "content": "x"}, *user]}).encode(), 422),
            "a role that is an object": (json.dumps({"messages": [{"role": {}, "content": "x"}]}).encode(), 422),
            "an image part": (
                json.dumps(
                    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
                ).encode(),
                422,
            ),
            "n=2": (json.dumps({"messages": user, "n": 2}).encode(), 422),
            "max_tokens=0": (json.dumps({"messages": user, "max_tokens": 0}).encode(), 422),
            "max_tokens over the limit": (json.dumps({"messages": user, "max_tokens": 10**6}).encode(), 422),
            "temperature=-1": (json.dumps({"messages": user, "temperature": -1}).encode(), 422),
            "stop strings": (json.dumps({"messages": user, "stop": ["x"]}).encode(), 422),
            "tools": (json.dumps({"messages": user, "tools": [{"type": "function"}]}).encode(), 422),
            "too long a message": (json.dumps({"messages": [{"role": "user", "content": "x" * 30000}]}).encode(), 422),
            "a last turn over max_length": (
                json.dumps({"messages": [{"role": "user", "content": "word " * 3000}]}).encode(),
                422,
            ),
            "nested too deep": (json.dumps({"messages": user, "metadata": [[[[[[[[[1]]]]]]]]]}).encode(), 400),
        }
        for name, (body, status) in bad.items():
            got, answer = server.request("POST", "/v1/chat/completions", body)
            assert got == status and isinstance(answer["error"]["message"], str), (name, got, answer)  # OpenAI's shape
        assert (
            server.request("POST", "/v1/chat/completions", json.dumps({"messages": user}).encode(), key=None)[0] == 401
        )
        assert ask(conversations[0]) == report[0]["answer"]  # still answering after all of that
        # Schemathesis, from the route's /openapi.json, valid and invalid requests: no 5xx, every answer as described
        fuzz = [str(Path(sys.executable).parent / "st"), "run", f"http://127.0.0.1:{server.port}/openapi.json"]
        fuzz += ["--header", f"Authorization: Bearer {KEY}", "--checks", "all"]
        fuzz += ["--exclude-checks", "positive_data_acceptance", "--max-examples", "30", "--seed", "7"]
        proc = subprocess.run(fuzz, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:]
        assert ask(conversations[0]) == report[0]["answer"]
    finally:
        assert server.stop() == 0, server.log.read_text()[-3000:]
    assert "Traceback" not in server.log.read_text()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_unpacked_loss_and_gradients(tmp_path, tiny_dir, tiny_tokenizer, attention):
    """The same batch packed (several conversations per row, attention kept inside each, positions from 0) and
    unpacked (one per row, padded): the same summed loss, the same supervised token count, the same gradients."""
    from lmtune.data.batching import PackingCollator, PaddingCollator
    from lmtune.model.module import CausalLMModule

    path = tmp_path / "chats.jsonl"
    write_chats(path, 16)
    dm = ChatDataModule(tiny_tokenizer, path=str(path), cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    dm.setup("fit")
    examples = list(dm.examples["train"])[:8]
    lengths = sorted(len(e.input_ids) for e in examples)
    pack_length = lengths[-1] + lengths[0]  # the longest row holds two conversations
    pad = tiny_tokenizer.pad_token_id
    unpacked, packed = PaddingCollator(pad, 8)(examples), PackingCollator(pad, pack_length, 8)(examples)
    assert packed["input_ids"].shape[0] < len(examples)
    assert int(packed["attention_mask"].sum()) == int(unpacked["attention_mask"].sum())
    lora = {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    module = CausalLMModule(tiny_dir, {"dtype": "float32", "attn_implementation": attention}, lora, {}, pad)
    module.configure_model(torch.device("cpu"))
    for name, p in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)

    def loss_and_grads(batch):
        module.zero_grad()
        loss_sum, n = module.supervised_loss(batch)
        loss_sum.backward()
        return float(loss_sum), int(n), {k: p.grad.clone() for k, p in module.named_parameters() if p.requires_grad}

    loss, n, grads = loss_and_grads(unpacked)
    packed_loss, packed_n, packed_grads = loss_and_grads(packed)
    assert packed_n == n and packed_loss == pytest.approx(loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packing_trains_with_less_padding(tmp_path, cache_dir):
    """`data.packing=true` through the CLI's train(): it trains, and its rows carry less padding than random
    batches (length-grouped batches are already nearly free of padding: bench/packing.py compares all four)."""
    from lmtune.training.train import train

    path = tmp_path / "chats.jsonl"
    write_chats(path, 60)
    runs = {}
    for packing in (False, True):
        overrides = ["experiment=smoke", "data=chat", f"data.path={path}", "logger=none", "report.enabled=false"]
        overrides.append("data.group_by_length=false")
        cfg = compose_train([*overrides, f"data.packing={packing}"], tmp_path / str(packing), cache_dir)
        runs[packing] = train(cfg)[1]["summary"]["train"]
    assert runs[True]["padding_fraction"] < runs[False]["padding_fraction"]
    assert runs[True]["tokens"] == runs[False]["tokens"]  # the same examples, every step


def test_general_text_loss_shows_what_the_adapter_changed(tmp_path, tiny_dir, tiny_tokenizer):
    """An adapter that changes nothing (LoRA B = 0) costs exactly nothing on general text; a changed one shows its
    change; a user's file is read as one document per line (.txt) or a `text` field (.jsonl)."""
    from lmtune.core.errors import DataError
    from lmtune.evaluation.forgetting import forgetting, read_texts, text_loss
    from lmtune.model.module import CausalLMModule

    (tmp_path / "general.txt").write_text("The cat sat on the mat.\n\nRivers flow to the sea.\n")
    (tmp_path / "general.jsonl").write_text(
        '{"text": "The cat sat on the mat."}\n{"text": "Rivers flow to the sea."}\n'
    )
    texts = read_texts(tmp_path / "general.txt", 100)
    assert (
        texts == read_texts(tmp_path / "general.jsonl", 100) == ["The cat sat on the mat.", "Rivers flow to the sea."]
    )
    with pytest.raises(DataError, match="report.forgetting.path=.*not found"):
        read_texts(tmp_path / "missing.txt", 10)
    lora = {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    module = CausalLMModule(tiny_dir, {"dtype": "float32"}, lora, {}, tiny_tokenizer.pad_token_id)
    module.configure_model(torch.device("cpu"))
    unchanged = forgetting(module, tiny_tokenizer, texts, 64, "32-true", "general.txt")
    assert unchanged["loss_change"] == 0.0 and unchanged["base"]["tokens"] > 10
    for name, p in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    changed = forgetting(module, tiny_tokenizer, texts, 64, "32-true", "general.txt")
    assert changed["base"] == unchanged["base"] and changed["loss_change"] != 0.0
    assert changed["fine-tuned"]["loss"] == pytest.approx(
        text_loss(module.causal_lm, tiny_tokenizer, texts, 64)["loss"]
    )


def test_the_chat_card_reports_the_answers_and_its_command_and_code_write_the_same_text(chat_run):
    """The export's model card: the report's rows; its predict.py line and its transformers code (greedy, fp32)
    write the same answer to its example conversation."""
    from helpers.card import run_card_code, run_card_command

    root, metrics, _ = chat_run
    export = root / "run" / "export"
    card = (export / "README.md").read_text()
    assert "# A chat model fine-tuned from" in card and "| zero-shot |" in card
    assert f"| fine-tuned | {metrics['test/exact_match']:.3f} | {metrics['test/chrf']:.1f} |" in card
    assert str(root) not in card  # no path of the training machine
    command = run_card_command(export, "precision=32-true", "max_new_tokens=64", f"hydra.run.dir={root / 'card'}")
    assert command.returncode == 0, command.stderr[-2000:]
    written = command.stdout.split("\n(stopped at max_new_tokens=")[0]  # the note when the answer was cut
    assert written.strip() == run_card_code(export).strip() != ""
