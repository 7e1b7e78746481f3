"""Tiny random models of each chat-model family the presets name, saved as local Hugging Face folders.

Each family is the same transformers architecture class as the real checkpoints, with a small byte-level BPE
whose special tokens, eos/pad/bos choices and chat template reproduce what that family publishes (written here
from the published formats, with their quirks: Llama 3's date header and eos that is not its turn closer,
Qwen's default system turn, Qwen3's think blocks, Gemma 2 refusing a system turn and Gemma 3 folding it into
the user turn, Phi's `<|end|>` before eos, Mistral v0.3 moving the system prompt into the last user turn,
SmolLM2's pad == eos). `gpt2_base` and `gpt_neox_base` are base models without any chat template. Nothing is
downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from lmtune.model.tiny import train_tiny_tokenizer

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}{%- if strftime_now is defined %}{%- set date_string = strftime_now("%d %b %Y") %}
{%- else %}{%- set date_string = "26 Jul 2024" %}{%- endif %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}
{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""

QWEN25_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}{%- if message.role != 'system' or not loop.first %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=0) %}
{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query_index = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{%- set content = message.content %}{%- set reasoning_content = '' %}
{%- if '</think>' in content %}
{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_query_index %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""

GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = "" -%}
{%- set loop_messages = messages -%}{%- endif -%}
{%- for message in loop_messages -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}{%- endif -%}
{%- if (message['role'] == 'assistant') -%}{%- set role = "model" -%}{%- else -%}{%- set role = message['role'] -%}
{%- endif -%}
{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
{{- message['content'] | trim }}{{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"""

GEMMA2_TEMPLATE = """{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}
{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}
{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}
{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}
{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}""".replace("\n", "")

PHI35_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

PHI4_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

MISTRAL_TEMPLATE = """{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}
{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
{%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}
{{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/...") }}
{%- endif %}
{%- if message["role"] == "user" %}
{%- if loop.last and system_message is defined %}{{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
{%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}{%- endif %}
{%- elif message["role"] == "assistant" %}{{- " " + message["content"]|trim + eos_token}}
{%- endif %}
{%- endfor %}"""

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# the size of every tiny model: big enough for GQA, rotary, sliding windows shorter than a prompt
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@dataclass(frozen=True)
class Family:
    name: str
    preset: str | None  # conf/model/<preset>.yaml that the CLI test trains with (None: a base model, no preset)
    model_class: str
    config_class: str
    config: dict
    specials: list[str]
    tokens: dict  # bos / eos / pad / unk
    template: str | None
    eot: str  # the token that must close every supervised answer
    answer_prefix: str = ""  # what the template puts between the prompt and the label (Mistral and plain: a space)
    overrides: tuple[str, ...] = ()  # what the user adds besides the folder (a base model: its template)
    extra: dict = field(default_factory=dict)  # config keys that name a token id -> that token


FAMILIES = [
    Family(
        "llama3",
        "llama3_2_1b",
        "LlamaForCausalLM",
        "LlamaConfig",
        {**SHAPE, "tie_word_embeddings": True, "rope_theta": 500000.0},
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ],
        {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>"},  # older configs: eos is not the turn closer
        LLAMA3_TEMPLATE,
        "<|eot_id|>",
    ),
    Family(
        "qwen2.5",
        "qwen2_5_0_5b",
        "Qwen2ForCausalLM",
        "Qwen2Config",
        {**SHAPE, "tie_word_embeddings": True},
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"eos": "<|im_end|>", "pad": "<|endoftext|>"},
        QWEN25_TEMPLATE,
        "<|im_end|>",
    ),
    Family(
        "qwen3",
        "qwen3_0_6b",
        "Qwen3ForCausalLM",
        "Qwen3Config",
        {**SHAPE, "head_dim": 16, "tie_word_embeddings": True},
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        {"eos": "<|im_end|>", "pad": "<|endoftext|>"},
        QWEN3_TEMPLATE,
        "<|im_end|>",
    ),
    Family(
        "gemma3",
        "gemma3_1b",
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        {**SHAPE, "head_dim": 16, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"},
        GEMMA3_TEMPLATE,
        "<end_of_turn>",
    ),
    Family(
        "gemma3_4b",  # the multimodal checkpoint class: a vision tower beside the language model
        "gemma3_4b",
        "Gemma3ForConditionalGeneration",
        "Gemma3Config",
        {
            "text_config": {
                **SHAPE,
                "head_dim": 16,
                "sliding_window": 16,
                "layer_types": ["sliding_attention", "full_attention"],
            },
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            "mm_tokens_per_image": 4,
        },
        [
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        ],
        {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"},
        GEMMA3_TEMPLATE,
        "<end_of_turn>",
        extra={
            "boi_token_index": "<start_of_image>",
            "eoi_token_index": "<end_of_image>",
            "image_token_index": "<image_soft_token>",
        },
    ),
    Family(
        "gemma2",
        "gemma2_2b",
        "Gemma2ForCausalLM",
        "Gemma2Config",
        {
            **SHAPE,
            "head_dim": 16,
            "sliding_window": 16,
            "final_logit_softcapping": 2.0,  # Gemma 2 uses 30; 2 shapes the tiny model's small logits
            "attn_logit_softcapping": 50.0,
        },
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"},
        GEMMA2_TEMPLATE,
        "<end_of_turn>",
    ),
    Family(
        "phi3.5",
        "phi3_5_mini",
        "Phi3ForCausalLM",
        "Phi3Config",
        {**SHAPE},
        ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"],
        {"bos": "<s>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "unk": "<unk>"},
        PHI35_TEMPLATE,
        "<|end|>",
    ),
    Family(
        "phi4-mini",
        "phi4_mini",
        "Phi3ForCausalLM",
        "Phi3Config",
        {**SHAPE, "partial_rotary_factor": 0.75, "tie_word_embeddings": True},
        ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>", "<|tool|>"],
        {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>"},
        PHI4_TEMPLATE,
        "<|end|>",
    ),
    Family(
        "mistral",
        "mistral_7b_v0_3",
        "MistralForCausalLM",
        "MistralConfig",
        {**SHAPE},
        ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        {"bos": "<s>", "eos": "</s>", "unk": "<unk>"},
        MISTRAL_TEMPLATE,
        "</s>",
        answer_prefix=" ",
    ),
    Family(
        "smollm2",
        "smollm2_360m",
        "LlamaForCausalLM",
        "LlamaConfig",
        {**SHAPE, "tie_word_embeddings": True},
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|im_end|>"},  # pad == eos
        SMOLLM2_TEMPLATE,
        "<|im_end|>",
    ),
    Family(
        "gpt2_base",
        None,
        "GPT2LMHeadModel",
        "GPT2Config",
        # GPT-2's own dropout (0.1) off, so runs batched or sharded differently compare exactly
        {
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 1024,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        },
        ["<|endoftext|>"],
        {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>"},
        None,
        "<|endoftext|>",
        answer_prefix=" ",
        overrides=("model.chat_template=plain",),
    ),
    Family(
        "gpt_neox_base",  # Pythia-style: fused query_key_value, attention and MLP in parallel from one residual
        None,
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        {**{k: v for k, v in SHAPE.items() if k != "num_key_value_heads"}, "use_parallel_residual": True},
        ["<|endoftext|>", "<|padding|>"],
        {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|padding|>"},
        None,
        "<|endoftext|>",
        answer_prefix=" ",
        overrides=("model.chat_template=plain",),
    ),
]
BY_NAME = {f.name: f for f in FAMILIES}


def build_tokenizer(family: Family):
    return train_tiny_tokenizer(family.specials, chat_template=family.template, **family.tokens)


def build_family(family: Family, out: Path, seed: int = 0) -> Path:
    """The family's tiny random model and tokenizer, saved to `out` as from_pretrained reads them."""
    tokenizer = build_tokenizer(family)
    tokens = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family.config_class != "GPT2Config":
        tokens["max_position_embeddings"] = 1024
    config_kwargs = dict(family.config)
    if "text_config" in config_kwargs:  # multimodal: the language model's config holds the vocabulary
        config_kwargs["text_config"] = {**config_kwargs["text_config"], **tokens}
        tokens = {}
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in family.extra.items()}
    config = getattr(transformers, family.config_class)(**tokens, **config_kwargs, **ids)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, family.model_class)(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
