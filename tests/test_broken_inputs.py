"""Broken input of every kind, through the CLIs as a user runs them: each ends in one clear line (`error: ...`,
exit status 1, no traceback) or, for rows that can be dropped, in a counted skip in the log. The table below is
the list in docs/data.md "Broken input". Each case runs its script as `python src/<script> <args>` would, inside
tests/helpers/cli_driver.py (one interpreter for many cases: a fresh one costs ~7 s of imports each)."""

from __future__ import annotations

import errno
import gzip
import json
import re
import resource
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch

from conftest import ROOT, SAMPLE, compose_train, run_script
from helpers.cli_driver import run_commands
from helpers.fake_arxiv import read_jsonl
from helpers.families import BY_NAME, build_family
from lmtune.core.errors import UserError
from lmtune.core.files import write_folder
from lmtune.evaluation.predictor import Predictor, Row
from lmtune.training.train import train


@dataclass
class Case:
    name: str
    script: str
    args: tuple[str, ...]
    expect: tuple[str, ...]  # substrings of the error line (or of the log, for a counted skip)
    skip: bool = False  # a counted skip: the run succeeds and the log names what was dropped
    hydra: bool = False  # Hydra's own error for an unknown config option (no `error:` prefix, no traceback)


def write_files(folder):
    """The broken files, from the synthetic sample."""
    rows = read_jsonl(SAMPLE)
    lines = [json.dumps(r) for r in rows]
    files = {
        "malformed.jsonl": "\n".join(lines[:10] + ['{"id": "x", "title": ']) + "\n",
        "list.jsonl": "\n".join(lines[:3] + ["[1, 2, 3]"]) + "\n",
        "empty.jsonl": "",
        "one_class.jsonl": "".join(json.dumps({**r, "primary_category": "cs.CL"}) + "\n" for r in rows),
        "no_abstract.csv": "id,title,primary_category\n" + "".join(f"{r['id']},T,cs.CL\n" for r in rows[:5]),
        "no_label.csv": "id,title,abstract\n" + "".join(f"{r['id']},T,A\n" for r in rows[:5]),
        "papers.txt": "a title, an abstract\n",
        "no_text.csv": "year,note\n2024,mine\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    latin1 = json.dumps({**rows[1], "note": "caf\xe9"}, ensure_ascii=False).encode("latin-1")  # not UTF-8
    (folder / "latin1.jsonl").write_bytes(lines[0].encode() + b"\n" + latin1 + b"\n")
    packed = gzip.compress("\n".join(lines).encode())
    (folder / "truncated.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    (folder / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    skips = rows + [
        {**rows[0], "id": "new-1", "abstract": "   "},  # empty abstract
        {**rows[1]},  # duplicate id
        {**rows[2], "id": ""},  # empty id
        {**rows[3], "id": "new-2", "primary_category": "math.OC", "categories": ["math.OC"]},  # outside the label set
    ]
    (folder / "skips.jsonl").write_text("".join(json.dumps(r) + "\n" for r in skips))
    (folder / "not_empty").mkdir()
    (folder / "not_empty" / "keep.txt").write_text("mine")
    (folder / "no_export").mkdir()
    (folder / "empty_model").mkdir()
    (folder / "raises.jinja").write_text("{{ raise_exception('Only user turns please') }}")
    # a final assistant turn with a block the generation prompt lacks, and no switch to turn it off
    (folder / "thinks.jinja").write_text(
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
        "{% if m['role'] == 'assistant' %}<think></think>{% endif %}{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}"
    )
    build_family(BY_NAME["gpt2_base"], folder / "base_model")  # a base model: no chat template


@pytest.fixture(scope="module")
def broken(tmp_path_factory, cache_dir):
    folder = tmp_path_factory.mktemp("broken")
    write_files(folder)
    run = folder / "run"
    overrides = ["experiment=smoke", "logger=none", "trainer.max_steps=2", "report.enabled=false"]
    train(compose_train(overrides, run, cache_dir))
    tampered = folder / "tampered"
    shutil.copytree(run / "export", tampered)
    formatting = json.loads((tampered / "formatting.json").read_text())
    formatting["answer_ids"][0] = formatting["answer_ids"][0][::-1]
    (tampered / "formatting.json").write_text(json.dumps(formatting))
    damage_saved_files(folder, run, cache_dir)
    return folder, run


def damage_saved_files(folder, run, cache_dir):
    """Checkpoints and exports as a cut-off copy, a mix-up or a full disk leaves them."""
    from lmtune.model.loading import resolve_pretrained

    ckpt = (run / "checkpoints" / "last.ckpt").read_bytes()
    (folder / "truncated.ckpt").write_bytes(ckpt[: len(ckpt) // 2])
    (folder / "notes.ckpt").write_text("not a checkpoint\n")
    for name in ("no_weights", "cut_weights", "bad_labels"):
        shutil.copytree(run / "export", folder / name)
    (folder / "no_weights" / "adapter_model.safetensors").unlink()
    weights = folder / "cut_weights" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (folder / "bad_labels" / "labels.json").write_text('["cs.CL", "cs.CV",')
    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    smaller = {"source": "tiny_random", "tiny": {**tiny, "intermediate_size": 64, "seed": 0}}
    shutil.copytree(resolve_pretrained(smaller, cache_dir), folder / "other_base")


def cases(f, run) -> list[Case]:
    """Every kind of broken input: files, columns, labels, prompts, configs, exports and ids."""
    train_on = ("experiment=smoke", "logger=none")
    export = f"ckpt={run}"
    return [
        # files
        Case("missing file", "train.py", (*train_on, f"data.path={f}/missing.jsonl"), ("data file not found",)),
        Case("unknown type", "train.py", (*train_on, f"data.path={f}/papers.txt"), ("unknown file type '.txt'",)),
        Case("malformed JSON", "train.py", (*train_on, f"data.path={f}/malformed.jsonl"), ("malformed.jsonl:11: malformed JSON",)),
        Case("not an object", "train.py", (*train_on, f"data.path={f}/list.jsonl"), ("list.jsonl:4: expected a JSON object",)),
        Case("not UTF-8", "train.py", (*train_on, f"data.path={f}/latin1.jsonl"), ("latin1.jsonl:2: bytes that are not UTF-8",)),
        Case("truncated .gz", "train.py", (*train_on, f"data.path={f}/truncated.jsonl.gz"), ("truncated or corrupt archive",)),
        Case("broken Parquet", "train.py", (*train_on, f"data.path={f}/broken.parquet"), ("not a readable Parquet file",)),
        Case("empty file", "train.py", (*train_on, f"data.path={f}/empty.jsonl"), ("the data has no rows",)),
        # columns
        Case("prompt column missing", "train.py", (*train_on, f"data.path={f}/no_abstract.csv"), ("reads column(s) 'abstract'", "no_abstract.csv")),
        Case("label column missing", "train.py", (*train_on, f"data.path={f}/no_label.csv"), ("no label column 'primary_category' or 'categories'",)),
        Case("prompt names an absent column", "train.py", (*train_on, "data.prompt.user='{body}'"), ("reads column(s) 'body'",)),
        Case("label column misnamed", "train.py", (*train_on, "data.label_column=stars"), ("no label column 'stars'",)),
        # labels
        Case("one class in the file", "train.py", (*train_on, f"data.path={f}/one_class.jsonl"), ("1 label after filtering: cs.CL; need at least 2",)),
        Case("one label asked for", "train.py", (*train_on, "data.labels=[cs.CL]"), ("1 label after filtering: cs.CL",)),
        Case("top_k of one", "train.py", (*train_on, "data.top_k=1"), ("1 label after filtering",)),
        # prompts
        Case("column in system prompt", "train.py", (*train_on, "data.prompt.system='About {title}: {labels}'"), ("data.prompt.system uses {title}",)),
        Case("unclosed brace", "train.py", (*train_on, "data.prompt.user='Title: {title'"), ("write a literal brace as",)),
        Case("prompt reads nothing", "train.py", (*train_on, "data.prompt.user='Classify this'"), ("reads no column",)),
        Case("truncate column not in prompt", "train.py", (*train_on, "data.truncate_column=body"), ("data.truncate_column='body' is not a column the prompt reads",)),
        Case("max_length below the prompt", "train.py", (*train_on, "data.max_length=16"), ("raise data.max_length",)),
        # configs
        Case("fractions over 1", "train.py", (*train_on, "data.val_fraction=0.6", "data.test_fraction=0.5"), ("sum to less than 1",)),
        Case("unknown source", "train.py", (*train_on, "data.source=web"), ("data.source='web'",)),
        Case("no data at all", "train.py", (*train_on, "data=text_classification", "data.path=null"), ("no data: set `data.path=`",)),
        Case("experiment needs data.path", "train.py", ("experiment=title_topics", "logger=none"), ("no data: set `data.path=`",)),
        Case("negative step budget", "train.py", (*train_on, "trainer.max_steps=-5"), ("trainer.max_steps=-5: the optimizer steps to train", "use an integer of 0 or more, or -1")),
        Case("batch of zero", "train.py", (*train_on, "data.batch_size=0"), ("data.batch_size=0: training examples per batch; use an integer of 1 or more",)),
        Case("no batches per step", "train.py", (*train_on, "trainer.accumulate_grad_batches=0"), ("trainer.accumulate_grad_batches=0",)),
        Case("QLoRA in bf16-true", "train.py", (*train_on, "adapter=qlora", "trainer.precision=bf16-true"), ("recasts 4-bit weights",)),
        Case("unknown config option", "train.py", (*train_on, "adapter=lorax"), ("Could not find 'adapter/lorax'",), hydra=True),
        # model settings
        Case("targets match nothing", "train.py", (*train_on, "adapter.target_modules=[qkv, c_attn]"), ("adapter.target_modules=['qkv', 'c_attn'] matches no linear layer", "down_proj, gate_proj, k_proj")),
        Case("rank zero", "train.py", (*train_on, "adapter.r=0"), ("adapter.r=0: must be a positive integer",)),
        Case("compile not a switch", "train.py", (*train_on, "compile=fast"), ("compile='fast': use auto, true or false.",)),
        Case("model folder missing", "train.py", (*train_on, f"model.name_or_path={f}/no_model"), (f"model.name_or_path={f}/no_model: no such folder",)),
        Case("model folder empty", "train.py", (*train_on, f"model.name_or_path={f}/empty_model"), ("the folder has no config.json (it is empty)",)),
        Case("eot token not in the vocabulary", "train.py", (*train_on, "model.eot_token=eot"), ("end-of-turn token 'eot' is not in the vocabulary",)),
        Case("template that raises", "train.py", (*train_on, f"model.chat_template={f}/raises.jinja"), ("raised TemplateError: Only user turns please",)),
        Case("template with a think block and no switch", "train.py", (*train_on, f"model.chat_template={f}/thinks.jinja"), ("renders the final assistant turn with '<think></think>' before the answer",)),
        Case("special token unquoted for Hydra", "train.py", (*train_on, "model.pad_token=<|pad|>"), ("Hydra reads < and > only inside quotes", "\"model.pad_token='<|pad|>'\"")),
        Case("unknown built-in template", "train.py", (*train_on, "model.chat_template=chatml"), ("model.chat_template=chatml: neither a built-in template (plain)",)),
        Case("base model without a template", "train.py", (*train_on, f"model.name_or_path={f}/base_model"), ("has no chat template (a base model?); set model.chat_template=plain",)),
        # rows that can be dropped: counted, by reason
        Case("rows to drop", "baseline.py", (*train_on, f"data.path={f}/skips.jsonl"), ("skipped 4 records", "1 duplicate id", "1 label outside the label set", "1 missing or empty 'abstract'", "1 missing or empty 'id'"), skip=True),
        # exports
        Case("not an export", "eval.py", (f"ckpt={f}/no_export", "logger=none"), ("not a trained export",)),
        Case("unknown split", "eval.py", (export, "split=holdout", "logger=none"), ("split='holdout'",)),
        Case("missing checkpoint", "eval.py", (f"ckpt={run}/checkpoints/nope.ckpt", "logger=none"), ("checkpoint not found",)),
        Case("tampered export", "predict.py", (f"ckpt={f}/tampered", "title=x", "abstract=y"), ("gives other answer tokens than training did",)),
        Case("merge into a used folder", "merge.py", (export, f"out={f}/not_empty"), ("exists and is not empty",)),
        Case("merge without out=", "merge.py", (export,), ("out= is required",)),
        # saved checkpoints and exports: cut off, mixed up, damaged
        Case("truncated checkpoint", "train.py", (*train_on, f"ckpt_path={f}/truncated.ckpt"), ("truncated.ckpt: not a readable checkpoint",)),
        Case("text file named .ckpt", "train.py", (*train_on, f"ckpt_path={f}/notes.ckpt"), ("notes.ckpt: not a readable checkpoint",)),
        Case("checkpoint of another rank", "train.py", (*train_on, "adapter.r=4", f"ckpt_path={run}"), ("last.ckpt: written for another model or adapter", "other shapes")),
        Case("checkpoint of another model size", "train.py", (*train_on, "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", f"ckpt_path={run}"), ("written for another model or adapter",)),
        Case("checkpoint of another label set", "train.py", (*train_on, "data.labels=[cs.CL,cs.CV]", f"ckpt_path={run}"), ("last.ckpt: trained on the labels ['cs.CL', 'cs.CV', 'cs.RO']",)),
        Case("export without its weights", "predict.py", (f"ckpt={f}/no_weights", "title=x", "abstract=y"), ("no weights (adapter_model.safetensors or adapter_model.bin)", "copy the folder again")),
        Case("export with cut-off weights", "predict.py", (f"ckpt={f}/cut_weights", "title=x", "abstract=y"), ("adapter_model.safetensors: unreadable weights",)),
        Case("export with corrupt labels.json", "predict.py", (f"ckpt={f}/bad_labels", "title=x", "abstract=y"), ("labels.json: not valid JSON",)),
        Case("export on another base", "predict.py", (export, f"base={f}/other_base", "title=x", "abstract=y"), ("its adapter does not fit the base model", "base=<that model's folder>")),
        Case("eval on a cut-off export", "eval.py", (f"ckpt={f}/cut_weights", "logger=none"), ("unreadable weights",)),
        Case("merge a cut-off export", "merge.py", (f"ckpt={f}/cut_weights", f"out={f}/merged_cut"), ("unreadable weights",)),
        # predict inputs and ids
        Case("input lacks the prompt's columns", "predict.py", (export, f"input={f}/no_text.csv"), ("no_text.csv: row 1: needs `title`, `abstract`",)),
        Case("input of unknown type", "predict.py", (export, f"input={f}/papers.txt"), ("unknown file type '.txt'",)),
        Case("row without a column", "predict.py", (export, "row={title: 'A title'}"), ("missing or empty: abstract",)),
        Case("not an arXiv id", "predict.py", (export, "arxiv_id=2403.1"), ("arxiv_id=2403.1: not an arXiv id",)),
        Case("unknown output format", "predict.py", (export, "title=x", "abstract=y", "format=xml"), ("format='xml'",)),
    ]  # fmt: skip


def out_name(case: Case) -> str:
    return re.sub(r"\W+", "_", case.name)


def run_cases(table: list[Case], folder, cache_dir, tag: str) -> list[dict]:
    """The cases' CLI runs, in one interpreter (tests/helpers/cli_driver.py: each as `python src/<script> <args>`)."""
    commands = [
        {
            "script": str(ROOT / "src" / case.script),
            "args": [
                *case.args,
                f"paths.cache_dir={cache_dir}",
                f"hydra.run.dir={folder / 'out' / out_name(case)}",
            ],
        }
        for case in table
    ]
    return run_commands(commands, folder, tag)


def check(case: Case, result: dict) -> str | None:
    """None if the case behaved; otherwise what went wrong."""
    output = result["stdout"] + result["stderr"]
    if "Traceback" in output:
        return f"{case.name}: a traceback\n{output[-1500:]}"
    if case.skip:
        if result["returncode"] != 0 or not all(e in output for e in case.expect):
            return f"{case.name}: exit {result['returncode']}, expected {case.expect} in the log\n{output[-1500:]}"
        return None
    prefix = "" if case.hydra else "error: "
    lines = [line for line in result["stderr"].splitlines() if line.startswith(prefix) and case.expect[0] in line]
    if result["returncode"] != 1 or len(lines) != 1 or not all(e in lines[0] for e in case.expect):
        return (
            f"{case.name}: exit {result['returncode']}, error lines {lines}, expected {case.expect}\n{output[-1500:]}"
        )
    return None


def test_every_kind_of_broken_input_ends_in_one_clear_line_or_a_counted_skip(broken, cache_dir):
    folder, run = broken
    table = cases(folder, run)
    assert len(table) >= 25
    halves = {"a": table[0::2], "b": table[1::2]}  # two interpreters side by side
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(
            zip(halves, pool.map(lambda tag: run_cases(halves[tag], folder, cache_dir, tag), halves), strict=True)
        )
    problems = [
        problem
        for tag, part in halves.items()
        for case, result in zip(part, results[tag], strict=True)
        if (problem := check(case, result))
    ]
    assert not problems, "\n\n".join(problems)


def one_error_line(proc, *expect: str) -> str:
    output = proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and "Traceback" not in output and len(lines) == 1, output[-3000:]
    assert all(e in lines[0] for e in expect), lines[0]
    return lines[0]


def capped_file_size(limit: int):
    """For a child process: writing a file past `limit` bytes fails (EFBIG), as writing to a full disk does."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_or_an_unwritable_output_folder_is_one_line_and_keeps_what_was_saved(broken, cache_dir, tmp_path):
    folder, run = broken
    smoke = ("experiment=smoke", "logger=none", f"paths.cache_dir={cache_dir}")
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way of the output folder")
    proc = run_script("train.py", *smoke, f"hydra.run.dir={blocker}/run")
    one_error_line(proc, f"hydra.run.dir={blocker}/run: cannot write there")

    resumed = tmp_path / "resumed"  # the run resumed into its own folder, on a disk that fills up
    shutil.copytree(run, resumed)
    saved = {p.name: p.read_bytes() for p in (resumed / "checkpoints").iterdir()}
    assert len(saved["last.ckpt"]) > 40_000
    args = (*smoke, "trainer.max_steps=4", "report.enabled=false", f"ckpt_path={resumed}", f"hydra.run.dir={resumed}")
    proc = run_script("train.py", *args, preexec_fn=capped_file_size(40_000))
    one_error_line(
        proc, "cannot write the checkpoint", f"{resumed}/checkpoints", "the checkpoints saved before it are intact"
    )
    assert {p.name: p.read_bytes() for p in (resumed / "checkpoints").iterdir()} == saved  # no temp file either
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    predictor = Predictor.from_export(resumed / "export", cache_dir, torch.device("cpu"))
    assert predictor.predict([Row({"title": "A title", "abstract": "An abstract."})])[0].category in predictor.labels


def test_what_a_run_writes_is_readable_by_others_as_the_umask_allows(broken):
    """metrics.json, checkpoints and the export's files get `open`'s permissions (0644 under umask 022), not a temp
    file's 0600."""
    from lmtune.core.files import UMASK

    _, run = broken
    files = [run / "metrics.json", run / "checkpoints" / "last.ckpt", *sorted((run / "export").iterdir())]
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in files if f.is_file()}
    assert len(modes) >= 6 and set(modes.values()) == {oct(0o666 & ~UMASK)}, modes


def test_an_export_that_fails_half_way_leaves_the_previous_one_whole(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "labels.json").write_text('["a", "b"]')

    def fill(folder):
        (folder / "labels.json").write_text('["c", "d"]')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match=r"cannot write the export .*export \(No space left on device\); the previous"):
        write_folder(export, fill)
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and (export / "labels.json").read_text() == '["a", "b"]'
