"""`run_eval(cfg)`: a fine-tuned export, a checkpoint or the zero-shot base model on a split, with every output.

A fine-tuned model is evaluated on its own run's data settings (`config.yaml` of the export: same file or
arXiv query, same split fractions and salt, same limits) and its own label set, so `split=test` is exactly
the test split training reported; `data.path=` may point at the same data in a new place. Zero-shot
(`ckpt=null`) uses the composed `data` config, e.g. `experiment=qlora_arxiv data.path=...`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from lmtune.artifacts.export import export_and_checkpoint, read_export, task_data_config
from lmtune.commands.predict import writes_answers
from lmtune.core.errors import UserError
from lmtune.data.records import SPLITS
from lmtune.evaluation.modes import MODES, evaluate
from lmtune.evaluation.predictor import Predictor, pick_device
from lmtune.training.instantiate import instantiate_data
from lmtune.training.loggers import instantiate_loggers
from lmtune.training.task_wrapper import task_wrapper

log = logging.getLogger(__name__)


def load_for_eval(cfg: DictConfig):
    """The predictor and the data module (prepared, splits loaded) whose split it is evaluated on."""
    device = pick_device(cfg.eval.device)
    options = {}
    if cfg.eval.precision != "auto":
        options["precision"] = cfg.eval.precision
    if cfg.ckpt is None:
        options.setdefault("precision", cfg.trainer.precision)
        dm = _loaded_datamodule(cfg.data)  # the label set comes from the data
        prompt = {"system": dm.zero_shot_system, "user": dm.prompts["user_template"]}
        predictor = Predictor.zero_shot(
            cfg.model,
            dm.labels,
            prompt,
            cfg.paths.cache_dir,
            device,
            cfg.data.max_length,
            dm.prompts["truncate_column"],
            **options,
        )
        return predictor, dm
    export, ckpt = export_and_checkpoint(cfg.ckpt)
    export = read_export(export)  # checked before the model loads
    options["base"] = cfg.get("base")
    if ckpt is not None:
        predictor = Predictor.from_checkpoint(ckpt, cfg.paths.cache_dir, device, **options)
    else:
        predictor = Predictor.from_export(export.path, cfg.paths.cache_dir, device, **options)
    data_cfg = task_data_config(export.cfg.data, export.formatting)
    with open_dict(data_cfg):
        data_cfg.labels = list(predictor.labels)  # the model's label set decides which rows count
        if cfg.data.get("path"):
            data_cfg.path = cfg.data.path
            data_cfg.source = "file"
    return predictor, _loaded_datamodule(data_cfg)


def _loaded_datamodule(data_cfg):
    dm = instantiate_data(data_cfg)
    dm.prepare_data()
    dm.load_splits()
    return dm


def eval_answers(cfg: DictConfig) -> dict:
    """A generate model on a split: each conversation's last assistant turn written and scored (exact match, chrF,
    ROUGE-L), with the run's own `report.max_new_tokens` rule, so `split=test` gives the report's numbers."""
    from lmtune.artifacts.checkpoints import load_checkpoint_weights
    from lmtune.tasks.generate.evaluation import evaluate_generation
    from lmtune.tasks.generate.predictor import ChatPredictor

    device = pick_device(cfg.eval.device)
    options = {"precision": cfg.eval.precision} if cfg.eval.precision != "auto" else {}
    if cfg.ckpt is None:
        options.setdefault("precision", cfg.trainer.precision)
        dm = _loaded_datamodule(cfg.data)
        predictor = ChatPredictor.zero_shot(
            cfg.model, dm.conversation, cfg.paths.cache_dir, device, cfg.data.max_length, **options
        )
        max_new = cfg.report.get("max_new_tokens")
    else:
        path, ckpt = export_and_checkpoint(cfg.ckpt)
        export = read_export(path)
        predictor = ChatPredictor.from_export(export.path, cfg.paths.cache_dir, device, base=cfg.get("base"), **options)
        if ckpt is not None:
            load_checkpoint_weights(predictor.causal_lm, ckpt, device)
            predictor.source = str(ckpt)
        data_cfg = task_data_config(export.cfg.data, export.formatting)
        if cfg.data.get("path"):
            with open_dict(data_cfg):
                data_cfg.path, data_cfg.source = cfg.data.path, "file"
        dm = _loaded_datamodule(data_cfg)
        max_new = OmegaConf.select(export.cfg, "report.max_new_tokens", default=None)
    # the conversations training kept (one whose last exchange alone cannot fit max_length is skipped), as the report
    dm.tokenizer = predictor.formatter.tokenizer
    dm.setup()
    kept = {e.id for e in dm.examples[cfg.split]}
    records = [r for r in dm.splits[cfg.split] if r.id in kept][: cfg.eval.limit or None]
    if not records:
        raise UserError(f"the {cfg.split} split of {dm.source.where} is empty; check data.*_fraction and limits.")
    metrics, _ = evaluate_generation(predictor, records, Path(cfg.paths.output_dir), max_new)
    print(
        f"{cfg.split}: exact match {metrics['exact_match']:.4f}, chrF {metrics['chrf']:.2f}, ROUGE-L "
        f"{metrics['rougeL']:.4f} ({metrics['examples']} conversations)"
    )
    return {"generate": metrics}


@task_wrapper
def run_eval(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise UserError("ckpt= is required: an export folder, a run folder, a .ckpt file, or ckpt=null (zero-shot).")
    if cfg.split not in SPLITS:
        raise UserError(f"split={cfg.split!r}: use one of {', '.join(SPLITS)}.")
    if cfg.eval.mode not in MODES:
        raise UserError(f"eval.mode={cfg.eval.mode!r}: use one of {', '.join(MODES)}.")
    if writes_answers(cfg.ckpt, cfg.data):
        return eval_answers(cfg)
    predictor, dm = load_for_eval(cfg)
    records = dm.splits[cfg.split][: cfg.eval.limit or None]  # hash order: a reproducible sample
    if not records:
        raise UserError(f"the {cfg.split} split of {dm.source.where} is empty; check data.*_fraction and limits.")
    run = None
    for logger in instantiate_loggers(cfg.get("logger")):
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            run.config.update({"ckpt": str(cfg.ckpt), "split": cfg.split, "eval": OmegaConf.to_container(cfg.eval)})
    meta = {"ckpt": str(cfg.ckpt), "split": cfg.split, "data": dm.stats}
    results = evaluate(
        predictor,
        records,
        cfg.eval.mode,
        cfg.paths.output_dir,
        wandb_run=run,
        prefix=cfg.split,
        top_k=cfg.eval.top_k,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        meta=meta,
        coverage=float(OmegaConf.select(cfg, "report.coverage", default=0.9) or 0.9),
    )
    for mode in ("rank", "generate"):
        if mode in results:
            m = results[mode]
            low, high = m["acc_interval"]
            print(
                f"{cfg.split} {mode}: accuracy {m['acc']:.4f} [{low:.3f}, {high:.3f}], macro-F1 {m['macro_f1']:.4f} "
                f"({m['n']} examples)"
            )
    sets = results.get("rank", {}).get("sets")
    if sets:
        print(
            f"label sets at coverage {sets['target']}: {100 * sets['coverage']:.1f} % hold the true label, "
            f"{sets['mean_size']:.2f} labels on average"
        )
    if "agreement" in results:
        print(f"rank and generate agree on {results['agreement']:.4f} of the examples")
    return results
