"""The model card (README.md) of an export: what the model does, on what data, how it was trained, how well it
scores beside the zero-shot model and TF-IDF, how to use it and where it falls short. Its YAML front matter is
the Hugging Face hub's (base_model, library_name, pipeline_tag, tags, metrics), so the folder can be pushed as is.
"""

from __future__ import annotations

from pathlib import Path

import yaml

GGUF_NOTE = "dequantized from the {file} GGUF file (its weights carry that quantization's error)"


def front_matter(base_model: str, merged: bool, labels: list[str]) -> dict:
    return {
        "base_model": base_model,
        "library_name": "transformers" if merged else "peft",
        "pipeline_tag": "text-generation",  # how it loads; it answers with a label of its set
        "tags": ["lmtune", "text-classification", "merged" if merged else "lora"],
        "metrics": ["accuracy", "f1"],
    }


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
) -> str:
    """The card's text. `results`: model name -> {acc, macro_f1} on the test split (fine-tuned first);
    `training`: steps, seconds, tokens/s, precision, hardware; `merged`: the merge note of a merged export."""
    meta = yaml.safe_dump(front_matter(base_model, merged is not None, labels), sort_keys=False).strip()
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
        f"# A {len(labels)}-label text classifier fine-tuned from {base_model}",
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
        f"- source: `{data.get('source')}`, {data.get('records')} records; skipped: {_skipped(data)}",
        f"- split by a hash of the id: train / val / test = {data.get('train_examples')} / "
        f"{data.get('val_examples')} / {data.get('test_examples')}; truncated prompts {data.get('truncated')}",
        "",
        "## Training",
        "",
        f"- base model: {base_model}" + (f" (loaded from `{base_local}`{origin})" if base_local else origin),
        f"- adapter: {adapter}" + (f"; merged into the base: {merged['into']}" if merged else ""),
        f"- {training.get('steps')} steps, precision {training.get('precision')}, "
        f"{_fmt(training.get('train_seconds'), '{:.0f}')} s in training steps, "
        f"{_fmt(training.get('tokens_per_s'), '{:.0f}')} tokens/s, on {training.get('hardware')}",
        "",
        f"## Results (test split, {data.get('test_examples')} examples)",
        "",
        "| model | accuracy | macro-F1 |",
        "|---|---:|---:|",
        *(f"| {name} | {_fmt(m['acc'], '{:.4f}')} | {_fmt(m['macro_f1'], '{:.4f}')} |" for name, m in results.items()),
        "",
    ]
    if per_class:
        lines += ["| label | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        lines += [
            f"| {label} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m.get('support', '')} |"
            for label, m in per_class.items()
        ]
        lines.append("")
    example = " ".join(f'{c}="..."' for c in _columns(user_template))
    load = (
        "model = AutoModelForCausalLM.from_pretrained(folder)"
        if merged
        else "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)"
    )
    lines += [
        "## Use",
        "",
        "With the project that trained it (same prompt, same rank scoring; `base=` where the base model is a local "
        "copy):",
        "",
        "```bash",
        f"python src/predict.py ckpt=<this folder> {example}",
        "```",
        "",
        "With transformers" + ("" if merged else " and peft") + ":",
        "",
        "```python",
        "import json",
        "",
        *([] if merged else ["from peft import PeftModel"]),
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'folder = "."  # this folder',
        'base = json.load(open(f"{folder}/formatting.json"))["base_model"]',
        load,
        "tokenizer = AutoTokenizer.from_pretrained(folder)",
        'labels = json.load(open(f"{folder}/labels.json"))',
        "```",
        "",
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
