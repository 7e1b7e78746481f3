"""The model card (README.md) of an export: what the model does, on what data, how it was trained, how well it
scores beside the zero-shot model and TF-IDF, how to use it and where it falls short. Its YAML front matter is
the Hugging Face hub's (base_model, library_name, pipeline_tag, tags, metrics), so the folder can be pushed as is.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

EXAMPLE_TEXT = "Some text."  # what the card's examples put in every column
GGUF_NOTE = "dequantized from the {file} GGUF file (its weights carry that quantization's error)"


def front_matter(base_hub_id: str | None, merged: bool, license: str | None, dataset: str | None) -> dict:
    """The hub's fields; `base_model`, `license` and `datasets` only where known (a hub id, a preset's license)."""
    meta = {"base_model": base_hub_id, "license": license, "datasets": [dataset] if dataset else None}
    meta.update(
        library_name="transformers" if merged else "peft",
        pipeline_tag="text-generation",  # how it loads; it answers with a label of its set
        tags=["lmtune", "text-classification", "merged" if merged else "lora"],
        metrics=["accuracy", "f1"],
    )
    return {k: v for k, v in meta.items() if v is not None}


HF_SOURCE = re.compile(
    r"hf:([^:\[]+)(?::[^\[]*)?\[.*\]"
)  # what the data module calls a HF dataset: hf:<name>[:config][split]


def hub_dataset(source: str | None) -> str | None:
    """The hub id of a Hugging Face dataset source, None for files and local dataset folders."""
    match = HF_SOURCE.fullmatch(source or "")
    if not match or match[1].startswith(("/", ".", "~")) or Path(match[1]).exists():
        return None
    return match[1]


def source_name(source: str | None) -> str:
    """How the card names the data: a hub dataset by its id, a file or folder by its name (never a machine path)."""
    if hub := hub_dataset(source):
        return f"the Hugging Face dataset `{hub}`"
    if match := HF_SOURCE.fullmatch(source or ""):
        return f"a local dataset folder `{Path(match[1]).name}`"
    return f"`{Path(source).name}`" if source else "not recorded"


def model_card(
    *,
    base_model: str,
    base_local: str | None,
    model_cfg: dict,
    adapter_cfg: dict,
    labels: list[str],
    system_prompt: str,
    user_template: str,
    truncate_column: str | None,
    max_length: int,
    data: dict,
    training: dict,
    results: dict[str, dict],
    per_class: dict[str, dict] | None,
    merged: dict | None = None,
    system_in_user: bool = False,
    trust: dict | None = None,
) -> str:
    """The card's text. `results`: model name -> {acc, macro_f1 (and their 95% intervals)} on the test split
    (fine-tuned first); `trust`: the calibration, label sets and the comparison with TF-IDF, where the report ran;
    `training`: steps, seconds, tokens/s, precision, hardware; `merged`: the merge note of a merged export.
    No path of the training machine appears: the base is named by its hub id (else its folder's name), the data
    by its file's name or hub id."""
    hub_id = base_model if base_model != base_local else None  # an export names a local folder only without one
    base_name = hub_id or f"a local model (folder `{Path(base_model).name}`)"
    meta = front_matter(hub_id, merged is not None, model_cfg.get("license"), hub_dataset(data.get("source")))
    meta = yaml.safe_dump(meta, sort_keys=False).strip()
    columns = ", ".join(f"`{c}`" for c in _columns(user_template))
    origin = ""
    if model_cfg.get("gguf_file") or model_cfg.get("gguf_path"):
        origin = "; " + GGUF_NOTE.format(file=model_cfg.get("gguf_file") or Path(model_cfg["gguf_path"]).name)
    adapter = (
        f"{adapter_cfg.get('kind')} (r={adapter_cfg.get('r')}, alpha={adapter_cfg.get('alpha')}, "
        f"targets {adapter_cfg.get('target_modules')}{', 4-bit NF4 base' if adapter_cfg.get('quantization') else ''})"
    )
    lines = [
        "---",
        meta,
        "---",
        "",
        f"# A {len(labels)}-label text classifier fine-tuned from {base_name}",
        "",
        f"Reads {columns} and answers with one label of {', '.join(f'`{x}`' for x in labels)}. It is scored by "
        "ranking the label set (the log-probability of each label's answer tokens), so it always gives one of "
        "them, with a probability for each.",
        "",
        "## Task and prompt",
        "",
        f"- system prompt: {system_prompt!r}",
        f"- user turn: {user_template!r}",
        f"- the answer: the label, then the end-of-turn token; prompts longer than {max_length} tokens are shortened",
        "",
        "## Data",
        "",
        f"- source: {source_name(data.get('source'))}, {data.get('records')} records; skipped: {_skipped(data)}",
        f"- {_split_words(data)}: train / val / test = {data.get('train_examples')} / "
        f"{data.get('val_examples')} / {data.get('test_examples')}; truncated prompts {data.get('truncated')}",
        "",
        "## Training",
        "",
        f"- base model: {base_name}{origin}",
        f"- adapter: {adapter}" + (f"; merged into the base: {merged['into']}" if merged else ""),
        f"- {training.get('steps')} steps, precision {training.get('precision')}, "
        f"{_fmt(training.get('train_seconds'), '{:.0f}')} s in training steps, "
        f"{_fmt(training.get('tokens_per_s'), '{:.0f}')} tokens/s, on {training.get('hardware')}",
        "",
        f"## Results (test split, {data.get('test_examples')} examples)",
        "",
        "| model | accuracy [95% interval] | macro-F1 [95% interval] |",
        "|---|---:|---:|",
        *(f"| {name} | {_with_interval(m, 'acc')} | {_with_interval(m, 'macro_f1')} |" for name, m in results.items()),
        "",
        *_trust_lines(trust or {}),
    ]
    if per_class:
        lines += ["| label | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        lines += [
            f"| {label} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m.get('support', '')} |"
            for label, m in per_class.items()
        ]
        lines.append("")
    lines += ["## Use", "", *_use(labels, _columns(user_template), merged is not None, system_in_user), ""]
    lines += [
        "## Limitations",
        "",
        f"- It only knows these {len(labels)} labels; text of another kind still gets one of them.",
        f"- Trained on {data.get('train_examples')} examples from one source: text unlike it (another domain, "
        "language or period) scores lower than the table says.",
        f"- Prompts over {max_length} tokens are cut ("
        + (f"the `{truncate_column}` column" if truncate_column else "each row's longest column")
        + "), which can drop what decides the label.",
        "- The zero-shot row is the base model with the label list in its prompt; the fine-tuned row is what this "
        "folder gives.",
        "",
    ]
    return "\n".join(lines)


def _use(labels: list[str], columns: list[str], merged: bool, system_in_user: bool) -> list[str]:
    """The card's two ways to use the model, each ending in a label: predict.py's command line (any task's
    columns, as `row=`), and plain transformers (+ peft) code that builds the same prompt with the tokenizer's chat
    template and ranks the label set as the project does (the summed log-probability of each answer's tokens)."""
    row = ", ".join(f"{c}: {EXAMPLE_TEXT!r}".replace("'", '"') for c in columns)
    system = 'formatting["system_prompt"].format(labels=label_list)'
    user = 'formatting["user_template"].format(**row, labels=label_list)'
    if system_in_user:  # this model's template has no system turn: the project puts the system prompt first in it
        messages = [f'messages = [{{"role": "user", "content": {system} + "\\n\\n" + {user}}}]']
    else:
        messages = [
            "messages = [",
            f'    {{"role": "system", "content": {system}}},',
            f'    {{"role": "user", "content": {user}}},',
            "]",
        ]
    return [
        *_use_head(
            "the same prompt, the same rank scoring",
            f"python src/predict.py ckpt=<this folder> 'row={{{row}}}'",
            merged,
            ["import torch"],
        ),
        'labels = json.load(open(f"{folder}/labels.json"))',
        *_load_lines(merged),
        "",
        f"row = {{{', '.join(f'{c!r}: {EXAMPLE_TEXT!r}' for c in columns)}}}".replace("'", '"'),
        'label_list = ", ".join(labels)',
        *messages,
        "text = tokenizer.apply_chat_template(",
        '    messages, tokenize=False, add_generation_prompt=True, **formatting["chat_template_kwargs"]',
        ")",
        'prompt = tokenizer(text, add_special_tokens=False)["input_ids"]',
        "scores = []  # each label's answer tokens (the label, then end-of-turn), summed log-probabilities",
        "with torch.no_grad():",
        '    for answer in formatting["answer_ids"]:',
        "        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]",
        "        scores.append(logits.float().log_softmax(-1)[range(len(answer)), answer].sum().item())",
        "print(labels[scores.index(max(scores))])",
        "```",
    ]


def _use_head(how: str, command: str, merged: bool, imports: list[str], served: str = "") -> list[str]:
    """Both cards' use section up to loading: the project's command, then transformers (+ peft) alone."""
    return [
        f"With the project that trained it ({how}; `base=<folder>` where the base model is a local copy{served}):",
        "",
        "```bash",
        command,
        "```",
        "",
        "With transformers" + ("" if merged else " and peft") + " alone:",
        "",
        "```python",
        "import json",
        "",
        *imports,
        *([] if merged else ["from peft import PeftModel"]),
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'folder = "."  # this folder',
        'formatting = json.load(open(f"{folder}/formatting.json"))',
    ]


def _load_lines(merged: bool) -> list[str]:
    tokenizer = "tokenizer = AutoTokenizer.from_pretrained(folder)"
    if merged:
        return [tokenizer, "model = AutoModelForCausalLM.from_pretrained(folder).eval()"]
    return [
        tokenizer,
        'base = AutoModelForCausalLM.from_pretrained(formatting["base_model"])  # or a local copy of it',
        "model = PeftModel.from_pretrained(base, folder).eval()",
    ]


def _with_interval(m: dict, key: str) -> str:
    interval = m.get(f"{key}_interval")
    value = _fmt(m.get(key), "{:.4f}")
    return f"{value} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else value


def _split_words(data: dict) -> str:
    dates = data.get("dates") or {}
    if data.get("split") == "time":
        periods = "; ".join(f"{name} {a} to {b}" for name, (a, b) in dates.items())
        return f"split by time, the oldest rows training and the newest testing ({periods})"
    return "split by a hash of the id"


def _trust_lines(trust: dict) -> list[str]:
    """The comparison with TF-IDF in plain words, then what the probabilities are worth."""
    lines = []
    if "vs_tfidf" in trust:
        lines += [trust["vs_tfidf"]["verdict"], ""]
    if "temperature" in trust:
        lines.append(
            f"- Probabilities calibrated on the validation split (temperature {trust['temperature']:.3f}): expected "
            f"calibration error on the test split {trust.get('ece_uncalibrated', float('nan')):.3f} before, "
            f"{trust.get('ece', float('nan')):.3f} after ({trust.get('ece_floor', float('nan')):.3f} from sampling "
            "alone for a perfectly calibrated model)."
        )
    sets = trust.get("sets")
    if sets:
        lines.append(
            f"- Label sets (`predict.coverage={sets['target']}`) held the true label on "
            f"{100 * sets['coverage']:.1f} % of the test rows, {sets['mean_size']:.2f} labels on average."
        )
    return [*lines, ""] if lines and lines[-1] else lines


def read_front_matter(card: str) -> dict:
    """The YAML between the card's two `---` lines."""
    _, meta, _ = card.split("---\n", 2)
    return yaml.safe_load(meta)


def _columns(user_template: str) -> list[str]:
    from lmtune.data.formatting import template_columns

    return list(template_columns(user_template, "data.prompt.user"))


def _skipped(data: dict) -> str:
    skipped = data.get("skipped") or {}
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none"


def _fmt(value, pattern: str) -> str:
    return pattern.format(value) if isinstance(value, int | float) else "not measured"


EXAMPLE_MESSAGE = "Hello! What can you do?"  # the user turn the chat card's examples send


def chat_model_card(
    *,
    base_model: str,
    base_local: str | None,
    model_cfg: dict,
    adapter_cfg: dict,
    task: dict,
    max_length: int,
    data: dict,
    training: dict,
    results: dict[str, dict],
    merged: dict | None = None,
    system_in_user: bool = False,
    **_,
) -> str:
    """The card of a generate export: what it was taught (its conversations), on what data, how it was trained,
    how its written answers score beside the zero-shot model's, and how to use it (predict, the OpenAI-compatible
    server, transformers alone). Like the classifier's card, it names no path of the training machine."""
    hub_id = base_model if base_model != base_local else None
    base_name = hub_id or f"a local model (folder `{Path(base_model).name}`)"
    meta = front_matter(hub_id, merged is not None, model_cfg.get("license"), hub_dataset(data.get("source")))
    meta.update(tags=["lmtune", "text-generation", "chat", "merged" if merged else "lora"])
    meta["metrics"] = ["exact_match", "chrf", "rouge"]
    meta = yaml.safe_dump(meta, sort_keys=False).strip()
    if task.get("messages_column"):
        taught = (
            f"conversations of the `{task['messages_column']}` column (OpenAI chat format), "
            + ("every assistant turn" if task.get("train_on") != "last" else "the last assistant turn")
            + " carrying loss"
        )
        prompt_lines = [f"- conversations: the `{task['messages_column']}` column, as OpenAI-style messages"]
        example_user = EXAMPLE_MESSAGE
    else:
        columns = ", ".join(f"`{c}`" for c in _columns(task["user_template"]))
        taught = f"to answer {task['answer']!r} from {columns}"
        prompt_lines = [
            f"- system prompt: {task.get('system_prompt')!r}",
            f"- user turn: {task['user_template']!r}",
            f"- the answer: {task['answer']!r}, then the end-of-turn token",
            *(f"- then the user: {t['user']!r}; the answer: {t['answer']!r}" for t in task.get("turns") or []),
        ]
        example_user = task["user_template"].format(**dict.fromkeys(_columns(task["user_template"]), EXAMPLE_TEXT))
    lines = [
        "---",
        meta,
        "---",
        "",
        f"# A chat model fine-tuned from {base_name}",
        "",
        f"Taught {taught}. It writes its answer after the conversation so far, up to its end-of-turn token.",
        "",
        "## Task and prompt",
        "",
        *prompt_lines,
        f"- conversations longer than {max_length} tokens lose whole early exchanges",
        "",
        "## Data",
        "",
        f"- source: {source_name(data.get('source'))}, {data.get('records')} records; skipped: {_skipped(data)}",
        f"- split by a hash of the id: train / val / test = {data.get('train_examples')} / "
        f"{data.get('val_examples')} / {data.get('test_examples')}",
        "",
        "## Training",
        "",
        f"- base model: {base_name}",
        f"- adapter: {adapter_cfg.get('kind')} (r={adapter_cfg.get('r')}, alpha={adapter_cfg.get('alpha')})"
        + (f"; merged into the base: {merged['into']}" if merged else ""),
        f"- {training.get('steps')} steps, precision {training.get('precision')}, "
        f"{_fmt(training.get('train_seconds'), '{:.0f}')} s in training steps, on {training.get('hardware')}",
        "",
        f"## Results (test split, {data.get('test_examples')} conversations: the last answer, written greedily)",
        "",
        "| model | exact match | chrF | ROUGE-L | answer words |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {name} | {_fmt(m.get('exact_match'), '{:.3f}')} | {_fmt(m.get('chrf'), '{:.1f}')} | "
            f"{_fmt(m.get('rougeL'), '{:.3f}')} | {_fmt(m.get('answer_words'), '{:.1f}')} |"
            for name, m in results.items()
        ),
        "",
        "## Use",
        "",
        *_chat_use(example_user, merged is not None, system_in_user, task),
        "",
        "## Limitations",
        "",
        f"- Trained on {data.get('train_examples')} examples from one source: conversations unlike them get answers "
        "of the kind it was taught, or worse.",
        "- chrF and ROUGE-L compare characters and words with one reference; a good answer worded otherwise scores "
        "low.",
        "",
    ]
    return "\n".join(lines)


def _chat_use(user: str, merged: bool, system_in_user: bool, task: dict) -> list[str]:
    """The chat card's ways to use the model: predict.py, the OpenAI-compatible server, transformers alone (the
    same prompt through the tokenizer's chat template, greedy, stopped at the turn closer)."""
    system = task.get("system_prompt") if not task.get("messages_column") else None
    if system and system_in_user:
        messages = f"messages = [{{'role': 'user', 'content': {system + chr(10) * 2 + user!r}}}]"
    elif system:
        messages = f"messages = [{{'role': 'system', 'content': {system!r}}}, {{'role': 'user', 'content': {user!r}}}]"
    else:
        messages = f"messages = [{{'role': 'user', 'content': {user!r}}}]"
    setting = f"message={user!r}" if task.get("messages_column") else None
    if setting is None:
        row = ", ".join(f'{c}: "{EXAMPLE_TEXT}"' for c in _columns(task["user_template"]))
        setting = f"row={{{row}}}"
    return [
        *_use_head(
            "the answer is streamed",
            f"python src/predict.py ckpt=<this folder> {shlex.quote(setting)}",
            merged,
            [],
            "; or served as an OpenAI-compatible `POST /v1/chat/completions`: `python src/serve.py ckpt=<this "
            "folder>`, then any OpenAI client with `base_url=http://127.0.0.1:8000/v1`",
        ),
        *_load_lines(merged),
        "",
        messages,
        "text = tokenizer.apply_chat_template(",
        '    messages, tokenize=False, add_generation_prompt=True, **formatting["chat_template_kwargs"]',
        ")",
        'prompt = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]',
        'closer = tokenizer.convert_tokens_to_ids(formatting["eot_token"])',
        "output = model.generate(prompt, max_new_tokens=64, do_sample=False, eos_token_id=closer)",
        "answer = output[0, prompt.shape[1] :]",
        "print(tokenizer.decode(answer, skip_special_tokens=True).strip())",
        "```",
    ]
