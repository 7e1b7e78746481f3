"""`merge_export(cfg)`: a trained adapter merged into its base, saved as one plain transformers model to ship.

The merged folder loads with `AutoModelForCausalLM.from_pretrained(out)` alone (no peft, no bitsandbytes) and
carries what eval and predict need beside it (tokenizer with chat template, labels.json, formatting.json,
config.yaml), so `eval.py ckpt=<out>` and `predict.py ckpt=<out>` take it like any export. A QLoRA adapter is
merged into the base reloaded unquantized in `dtype` (float32 by default), not into its 4-bit weights: the
merged model is the adapter on the full-precision base, so its scores differ from the 4-bit model's by the
quantization gap; `formatting.json` and `config.yaml` say so (`merged`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from lmtune.errors import UserError
from lmtune.evaluation.predictor import export_and_checkpoint, load_checkpoint_weights, load_export_model
from lmtune.utils.export import read_formatting

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def merge_export(cfg: DictConfig) -> Path:
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt:
        raise UserError("ckpt= is required: a run folder, its export/ folder, or one of its checkpoints/*.ckpt.")
    if OmegaConf.is_missing(cfg, "out") or not cfg.out:
        raise UserError("out= is required: the folder to write the merged model into.")
    if cfg.dtype not in DTYPES:
        raise UserError(f"dtype={cfg.dtype!r}: use one of {', '.join(DTYPES)}.")
    export, ckpt = export_and_checkpoint(cfg.ckpt)
    out = Path(cfg.out)
    if out.resolve() == export.resolve():
        raise UserError(f"out={out} is the export itself; give a new folder.")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"out={out} exists and is not empty; give a new folder (nothing was overwritten).")
    run_cfg = OmegaConf.load(export / "config.yaml")
    formatting = read_formatting(export)
    if run_cfg.adapter.kind == "none":
        what = "a merged export" if formatting.get("merged") else "a fully fine-tuned model (adapter=none)"
        raise UserError(f"ckpt={cfg.ckpt}: {what} has no adapter to merge; it already loads with plain transformers.")

    device = torch.device("cpu")  # merging is a sum per weight: no accelerator needed, no GPU memory taken
    load_cfg = OmegaConf.merge(run_cfg, {"model": {"dtype": cfg.dtype}})
    model = load_export_model(export, load_cfg, formatting, cfg.paths.cache_dir, device, quantized=False)
    if ckpt is not None:
        load_checkpoint_weights(model, ckpt, device)
    merged = model.merge_and_unload()
    if getattr(merged.config, "quantization_config", None) is not None:  # a GGUF-converted base keeps one
        del merged.config.quantization_config

    quant = run_cfg.adapter.get("quantization")
    note = {
        "from": str(ckpt or export),
        "adapter": OmegaConf.to_container(run_cfg.adapter, resolve=True),
        "dtype": cfg.dtype,
        "into": (
            f"the base reloaded unquantized in {cfg.dtype} (not the 4-bit weights it trained on)"
            if quant
            else f"the base in {cfg.dtype}"
        ),
    }
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(export).save_pretrained(out)
    shutil.copy(export / "labels.json", out / "labels.json")
    (out / "formatting.json").write_text(json.dumps({**formatting, "merged": note}, indent=1))
    # eval and predict load a folder whose adapter.kind is `none` as a full model in model.dtype
    merged_cfg = OmegaConf.merge(
        run_cfg, {"adapter": {"kind": "none", "quantization": None}, "model": {"dtype": cfg.dtype}}
    )
    merged_cfg.merged = note
    OmegaConf.save(merged_cfg, out / "config.yaml")
    log.info("merged %s into %s (%s)", note["from"], out, note["into"])
    return out
