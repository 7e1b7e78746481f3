"""`merge_export(cfg)`: a trained adapter merged into its base, saved as one plain transformers model to ship.

The merged folder loads with `AutoModelForCausalLM.from_pretrained(out)` alone (no peft, no bitsandbytes) and
carries what eval and predict need beside it (tokenizer with chat template, labels.json, formatting.json,
config.yaml), so `eval.py ckpt=<out>` and `predict.py ckpt=<out>` take it like any export. A QLoRA adapter is
merged into the base reloaded unquantized in `dtype` (float32 by default), not into its 4-bit weights: the
merged model is the adapter on the full-precision base, so its scores differ from the 4-bit model's by the
quantization gap; `formatting.json` and `config.yaml` say so (`merged`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from lmtune.artifacts.checkpoints import load_checkpoint_weights
from lmtune.artifacts.export import (
    CARD_INPUTS,
    export_and_checkpoint,
    load_export_model,
    read_export,
    read_json,
    write_task_files,
)
from lmtune.core.errors import UserError
from lmtune.core.files import write_folder

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def merge_export(cfg: DictConfig) -> Path:
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt:
        raise UserError("ckpt= is required: a run folder, its export/ folder, or one of its checkpoints/*.ckpt.")
    if OmegaConf.is_missing(cfg, "out") or not cfg.out:
        raise UserError("out= is required: the folder to write the merged model into.")
    if cfg.dtype not in DTYPES:
        raise UserError(f"dtype={cfg.dtype!r}: use one of {', '.join(DTYPES)}.")
    path, ckpt = export_and_checkpoint(cfg.ckpt)
    out = Path(cfg.out)
    if out.resolve() == path.resolve():
        raise UserError(f"out={out} is the export itself; give a new folder.")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"out={out} exists and is not empty; give a new folder (nothing was overwritten).")
    export = read_export(path)
    run_cfg, formatting = export.cfg, export.formatting
    if not export.has_adapter:
        what = "a merged export" if formatting.get("merged") else "a fully fine-tuned model (adapter=none)"
        raise UserError(f"ckpt={cfg.ckpt}: {what} has no adapter to merge; it already loads with plain transformers.")

    device = torch.device("cpu")  # merging is a sum per weight: no accelerator needed, no GPU memory taken
    model = load_export_model(
        export, cfg.paths.cache_dir, device, quantized=False, base=cfg.get("base"), dtype=cfg.dtype
    )
    if ckpt is not None:
        load_checkpoint_weights(model, ckpt, device)
    merged = model.merge_and_unload()
    if getattr(merged.config, "quantization_config", None) is not None:  # a GGUF-converted base keeps one
        del merged.config.quantization_config

    quant = run_cfg.adapter.get("quantization")
    note = {
        "from": str(ckpt or export.path),
        "adapter": OmegaConf.to_container(run_cfg.adapter, resolve=True),
        "dtype": cfg.dtype,
        "into": (
            f"the base reloaded unquantized in {cfg.dtype} (not the 4-bit weights it trained on)"
            if quant
            else f"the base in {cfg.dtype}"
        ),
    }
    # eval and predict load a folder whose adapter.kind is `none` as a full model in model.dtype
    merged_cfg = OmegaConf.merge(
        run_cfg, {"adapter": {"kind": "none", "quantization": None}, "model": {"dtype": cfg.dtype}}
    )
    merged_cfg.merged = note

    card_inputs = read_json(export.path / CARD_INPUTS) if (export.path / CARD_INPUTS).is_file() else None
    files = {"labels.json": export.labels} if export.kind == "classify" else {}
    if export.calibration is not None:  # fitted on the adapter's scores; the merged weights give the same ones
        files["calibration.json"] = export.calibration.to_dict()

    def fill(folder: Path) -> None:
        merged.save_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(export.path)
        # the card describes the run's adapter (merged_cfg says adapter none: it loads as a full model)
        formatting_merged = {**formatting, "merged": note}
        write_task_files(folder, tokenizer, formatting_merged, files, merged_cfg, card_inputs, run_cfg, note)

    write_folder(out, fill, "merged export")
    log.info("merged %s into %s (%s)", note["from"], out, note["into"])
    return out
