"""What differs between model architectures, in one place: where the decoder layers are, which modules are
linear (LoRA targets), which norm feeds each MLP, and what the model does to its logits after the head.

Everything architecture-dependent (LoRA targets, selective checkpointing, compile, FSDP wrapping, the loss) asks
here instead of assuming Llama's names, and a model this cannot read is refused in one line at start-up.
"""

from __future__ import annotations

import re

import torch
from transformers.pytorch_utils import Conv1D

from lmtune.core.errors import UserError

# Where transformers keeps the decoder layers: Llama/Qwen/Gemma/Phi/Mistral/GPT-NeoX `layers`, GPT-2 `h`.
LAYER_LISTS = ("layers", "h")
# The norm in front of each layer's MLP, most specific first: Gemma 2/3 normalize the attention output with
# `post_attention_layernorm` *before* the residual add and feed the MLP through `pre_feedforward_layernorm`;
# Llama-style layers (and GPT-NeoX, parallel or not) feed it through `post_attention_layernorm`; GPT-2 `ln_2`.
MLP_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2")


class ArchitectureError(UserError):
    """A setting this model's architecture cannot support; the message names the setting and the way out."""


def _decoder_and_layers(causal_lm) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    decoder = causal_lm.get_decoder()
    for name in LAYER_LISTS:
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return decoder, name, layers
    raise ArchitectureError(
        f"{type(causal_lm).__name__}: its decoder ({type(decoder).__name__}) keeps no layer list under "
        f"{' or '.join(LAYER_LISTS)}; this architecture is not supported (train a Llama/Qwen/Gemma/Phi/Mistral/GPT-2 "
        f"style model)."
    )


def decoder_layers(causal_lm) -> torch.nn.ModuleList:
    """The decoder layers, in order (what compile, FSDP and checkpointing wrap one by one)."""
    return _decoder_and_layers(causal_lm)[2]


def compile_decoder_layers(causal_lm) -> None:
    """`torch.compile` each decoder layer in place: no `_orig_mod.` in parameter names, so checkpoints and exports
    read the same as eager ones."""
    for layer in decoder_layers(causal_lm):
        layer.compile()


def layers_prefix(causal_lm) -> str:
    """The module name of the layer list inside `causal_lm`, e.g. `model.layers` or `transformer.h`."""
    decoder, name, _ = _decoder_and_layers(causal_lm)
    prefix = next(n for n, m in causal_lm.named_modules() if m is decoder)
    return f"{prefix}.{name}" if prefix else name


def is_linear(module: torch.nn.Module) -> bool:
    """A layer LoRA can adapt: `nn.Linear` (bitsandbytes' 4-bit layers are subclasses) or GPT-2's `Conv1D`."""
    return isinstance(module, (torch.nn.Linear, Conv1D))


def layer_linear_names(causal_lm) -> list[str]:
    """The distinct names of the linear layers inside the decoder layers (`q_proj`, `qkv_proj`, `c_attn`, ...)."""
    names = {
        n.rsplit(".", 1)[-1] for layer in decoder_layers(causal_lm) for n, m in layer.named_modules() if is_linear(m)
    }
    return sorted(names)


def all_linear_targets(causal_lm) -> str:
    """peft's `target_modules` for every linear layer inside the decoder layers, as a regular expression.

    Like peft's own `all-linear` it leaves out the output head; unlike it, it also leaves out whatever else the
    model carries beside the decoder (the vision tower of a multimodal checkpoint such as Gemma 3 4B), which the
    text task never runs and whose adapters would never get a gradient."""
    prefix = layers_prefix(causal_lm).replace(".", r"\.")
    return rf"^{prefix}\.\d+\.(?:.*\.)?(?:{'|'.join(layer_linear_names(causal_lm))})$"


def check_targets(causal_lm, targets: str | list[str]) -> None:
    """An explicit `adapter.target_modules` (a list of layer names, or a regular expression over module names as
    peft reads a string) must match at least one linear layer of this model."""
    linear = [n for n, m in causal_lm.named_modules() if is_linear(m)]
    if isinstance(targets, str):
        matches = any(re.fullmatch(targets, n) for n in linear)
    else:
        matches = any(n == t or n.endswith(f".{t}") for n in linear for t in targets)
    if not matches:
        shown = targets if isinstance(targets, str) else list(targets)
        raise ArchitectureError(
            f"adapter.target_modules={shown} matches no linear layer of {type(causal_lm).__name__}; its linear "
            f"layers are {', '.join(layer_linear_names(causal_lm))}: name some of them, or use all-linear."
        )


def mlp_and_norm(layer: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """A decoder layer's MLP and the norm whose output only the MLP reads (None if the layer has none we know)."""
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, torch.nn.Module):
        raise ArchitectureError(
            f"model.gradient_checkpointing=mlp: {type(layer).__name__} has no `mlp` block to checkpoint; use "
            f"model.gradient_checkpointing=true (whole layers)."
        )
    norm = next((getattr(layer, n) for n in MLP_NORMS if isinstance(getattr(layer, n, None), torch.nn.Module)), None)
    return mlp, norm


def head_logits(causal_lm, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from final hidden states, as its own forward computes them: the output head, then
    Gemma 2's final soft-capping (`cap * tanh(logits / cap)`) where the config asks for it."""
    logits = causal_lm.get_output_embeddings()(hidden)
    cap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def sliding_window(config) -> int | None:
    """The attention window of layers that see only the last tokens (Gemma 2/3, Mistral v0.1), else None."""
    config = config.get_text_config()  # a multimodal checkpoint keeps it in its language model's config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return None if getattr(config, "use_sliding_window", True) is False else int(window)
