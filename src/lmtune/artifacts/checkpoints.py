"""Reading checkpoints: what `ckpt_path=` names, a checkpoint read or refused in one line, its weights into a
model, and the command that resumes a run. They are written by `checkpoint_saving.py`."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lmtune.core.errors import UserError, first_line
from lmtune.model.weights import check_weights_fit

log = logging.getLogger(__name__)

LAST = "last.ckpt"
WEIGHTS_ONLY = True  # how every checkpoint is read: ours, and Lightning's own (trainer.fit/validate/test)


def resolve_ckpt_path(ckpt_path: str | None, runs_dir: str | Path) -> str | None:
    """The checkpoint file that `ckpt_path=` names, or None to start from scratch.

    - `last`: the most recently written `last.ckpt` under `<runs_dir>/*/checkpoints/`, i.e. the run that
      was killed last (`runs_dir` is `logs/<task_name>/runs`; multirun jobs are named by their folder);
    - a run folder such as `logs/train/runs/2025-01-31_12-00-00`, or its `checkpoints/` folder: its `last.ckpt`;
    - a `.ckpt` file: that file.
    """
    if ckpt_path is None:
        return None
    text = str(ckpt_path)
    if text == "last":
        pattern = f"*/checkpoints/{LAST}"
        runs = (p for p in Path(runs_dir).glob(pattern) if not p.parent.parent.is_symlink())  # not `latest`
        found = sorted(runs, key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(
                f"ckpt_path=last: no run has written {Path(runs_dir) / pattern} yet; "
                f"name the checkpoint instead: ckpt_path=<run folder or .ckpt file>"
            )
        path = found[-1]
    else:
        path = named = Path(text).expanduser()
        if named.is_dir():
            path = next((p for p in (named / "checkpoints" / LAST, named / LAST) if p.is_file()), None)
            if path is None:
                others = sorted(p.name for p in named.glob("**/*.ckpt"))
                raise UserError(
                    f"ckpt_path={text}: no checkpoints/{LAST} in that folder"
                    + (f" (it holds {', '.join(others)}: name one of them)" if others else "")
                )
        elif not path.is_file():
            raise UserError(f"ckpt_path={text}: no such file or folder (expected last, a run folder or a .ckpt file)")
    path = path.absolute()  # not resolve(): last.ckpt may be a link (save_last=link)
    read_checkpoint(path)  # a truncated or foreign file fails here, before minutes of loading
    written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime))
    log.info("resuming from %s (written %s%s)", path, written, _started_with(path))
    return str(path)


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint of this project, read lazily (memory-mapped); a truncated or foreign file is one line.

    Read with `weights_only=True`: tensors, containers and plain values only, which is all this project's
    checkpoints hold (Lightning's loops, callbacks and optimizer states included), so a crafted file that would run
    code when unpickled is refused instead (Lightning reads it again the same way: `WEIGHTS_ONLY`)."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=WEIGHTS_ONLY, mmap=True)
    except Exception as e:  # torch raises several types for a cut-off zip, a text file, another pickle
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if code:
            raise UserError(
                f"{path}: refused: it stores {code.group(1)}, which a checkpoint of this project never holds and "
                f"which would run code when read. Use a checkpoint written by src/train.py, or start afresh without "
                f"ckpt_path."
            ) from None
        reason = first_line(e, 160)
        raise UserError(
            f"{path}: not a readable checkpoint ({reason}): a file cut off while it was written or copied, or not a "
            f"checkpoint at all. Use another one ({path.parent}), or start afresh without ckpt_path."
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UserError(
            f"{path}: not a checkpoint written by src/train.py (no state_dict); use a .ckpt from a run's checkpoints/."
        )
    return checkpoint


def _started_with(ckpt: Path) -> str:
    """`; run started with: <overrides>` from the Hydra files of the run that wrote `ckpt`, if there are any."""
    for run in (ckpt.parent.parent, ckpt.parent):
        overrides = run / ".hydra" / "overrides.yaml"
        if overrides.is_file():
            return f"; that run started with: {' '.join(OmegaConf.load(overrides)) or 'no overrides'}"
    return ""


def resume_command(output_dir: str | Path) -> str | None:
    """The command that resumes the run writing into `output_dir`, once it has a last.ckpt to resume from."""
    if not (Path(output_dir) / "checkpoints" / LAST).is_file():
        return None
    overrides = []
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("ckpt_path=", "+ckpt_path="))]
    except ValueError:  # not started by @hydra.main (tests calling train(cfg) directly)
        pass
    return " ".join(["python src/train.py", *overrides, f"ckpt_path={output_dir}"])


def load_checkpoint_weights(model, ckpt: Path, device: torch.device) -> None:
    """Replace the trainable weights of `model` (its run's export) with those of a Lightning checkpoint."""
    trained = read_checkpoint(ckpt)["state_dict"]
    weights = {k.removeprefix("model."): v.to(device) for k, v in trained.items()}
    params = dict(model.named_parameters())
    trainable = {n for n in params if "lora_" in n} if hasattr(model, "peft_config") else set(params)
    fix = f"Evaluate a checkpoint together with its own run's export ({ckpt.parent.parent / 'export'})."
    check_weights_fit(weights, params, trainable, str(ckpt), fix)
    model.load_state_dict(weights, strict=False)
