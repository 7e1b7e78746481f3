"""A tiny random-weight Llama and a locally trained tokenizer with a chat template: a hub-free model for tests.

The tokenizer is a byte-level BPE trained in memory on a short built-in text, with Llama-3-style special
tokens and chat template and a dedicated pad token (`pad_equals_eos=True` reproduces SmolLM2's pad == eos).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOT, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|pad|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOT, PAD, HEADER_START, HEADER_END]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Enough English and arXiv vocabulary for the BPE to learn useful merges; the exact words do not matter.
_CORPUS = """
You classify arXiv papers by their primary category. Answer with exactly one of these categories and nothing else.
Title: Abstract: We propose a novel method for learning representations of language, images and graphs.
Our approach uses deep neural networks, transformers and attention, trained with reinforcement learning.
Experiments on benchmark datasets show that the proposed model outperforms state-of-the-art baselines.
We study the computational complexity of algorithms for optimization, cryptography and distributed systems.
This paper presents a robot control framework, a software engineering study and an information theory bound.
Large language models, retrieval, vision, speech, human-computer interaction, security and privacy.
system user assistant
"""
_CS_CLASSES = "AI AR CC CE CG CL CR CV CY DB DC DL DM DS ET FL GL GR GT HC IR IT LG LO MA MM MS NE NI OS PF PL RO SC"
_CS_CLASSES += " SD SE SI SY"
_CORPUS += " ".join(f"cs.{c}" for c in _CS_CLASSES.split())


def train_tiny_tokenizer(
    special_tokens: list[str],
    *,
    eos: str,
    bos: str | None = None,
    pad: str | None = None,
    unk: str | None = None,
    chat_template: str | None = None,
    vocab_size: int = 512,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in memory on the built-in text, with the given special tokens (the first ones get
    the first ids, as in real vocabularies) and chat template: any family's tokens and format, no download."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()] * 4, trainer=trainer)
    named = {bos, eos, pad, unk}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        additional_special_tokens=[t for t in special_tokens if t not in named],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_tokenizer(vocab_size: int = 512, pad_equals_eos: bool = False) -> PreTrainedTokenizerFast:
    """The tiny Llama's tokenizer: Llama 3's turn markers and template, a dedicated pad token unless
    `pad_equals_eos` (SmolLM2's trap)."""
    return train_tiny_tokenizer(
        SPECIAL_TOKENS,
        bos=BOS,
        eos=EOT,
        pad=EOT if pad_equals_eos else PAD,
        chat_template=CHAT_TEMPLATE,
        vocab_size=vocab_size,
    )


def build_tiny_model(
    tokenizer,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
) -> LlamaForCausalLM:
    """A random Llama; `vocab_size` larger than the tokenizer's gives a real model's embedding and head cost."""
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), vocab_size or 0),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=rope_theta,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
