"""Resuming: what `ckpt_path=` names, and checkpoint files that a kill can never leave half-written."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from lmtune.errors import UserError
from lmtune.utils.files import WRITE_ERRNOS, atomic_write

log = logging.getLogger(__name__)

LAST = "last.ckpt"


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
        found = sorted(Path(runs_dir).glob(pattern), key=lambda p: p.stat().st_mtime)
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
    """A checkpoint of this project, read lazily (memory-mapped); a truncated or foreign file is one line."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # torch raises several types for a cut-off zip, a text file, another pickle
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(
            f"{path}: not a readable checkpoint ({reason}): a file cut off while it was written or copied, or not a "
            f"checkpoint at all. Use another one ({path.parent}), or start afresh without ckpt_path."
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UserError(
            f"{path}: not a checkpoint written by src/train.py (no state_dict); use a .ckpt from a run's checkpoints/."
        )
    return checkpoint


def check_weights_fit(weights: dict, params: dict, trainable: set[str], where: str, fix: str) -> None:
    """`weights` (a checkpoint's) load into a model with these `params` (name -> tensor): every trainable weight
    present, none unknown, every shape equal; else one line saying which weight differs and `fix`."""
    missing = sorted(trainable - set(weights))
    unknown = sorted(set(weights) - set(params))
    wrong = [(n, tuple(w.shape), tuple(params[n].shape)) for n, w in weights.items() if n in params]
    wrong = [(n, a, b) for n, a, b in wrong if a != b]
    if wrong:
        name, theirs, ours = wrong[0]
        problem = f"{len(wrong)} weights have other shapes (first: {name} is {list(theirs)} there, {list(ours)} here)"
    elif missing or unknown:
        first = (missing or unknown)[0]
        problem = f"{len(missing)} trainable weights missing and {len(unknown)} unknown (first: {first})"
    else:
        return
    raise UserError(f"{where}: written for another model or adapter: {problem}. {fix}")


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a local checkpoint to a temp file beside it, fsyncs it, then renames it over the target.

    Lightning's own save (`_atomic_save`) writes through an fsspec transaction whose temp file lives in the
    system temp folder; when that is another file system (tmpfs /tmp, cluster scratch), the final move is a
    copy into the target, and a kill during it leaves a truncated checkpoint. A rename within one folder is
    atomic: readers see the old checkpoint or the new one. Remote URLs keep Lightning's way.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            atomic_write(Path(path), lambda f: torch.save(checkpoint, f), mode="wb")
        except (OSError, RuntimeError) as e:
            if not _write_failed(e):
                raise
            reason = e.strerror if isinstance(e, OSError) else "the file system refused the write: full?"
            raise UserError(
                f"cannot write the checkpoint {path} ({reason}); the checkpoints saved before it are intact. Free "
                f"space in {Path(path).parent} (or write elsewhere: hydra.run.dir=<folder>) and resume from them."
            ) from None


def _write_failed(error: Exception) -> bool:
    """A full disk, a quota, a read-only folder; torch's zip writer reports these as a RuntimeError."""
    if isinstance(error, OSError):
        return error.errno in WRITE_ERRNOS
    return "write failed" in str(error)
