"""How a run ends: the W&B run always closed (failures marked), the output folder named, SIGTERM a clean stop, and
the run folder saying how it ended: a failed run gets its one-line error in its log file and a `FAILED` file; a
finished one becomes `<runs>/latest` (e.g. `logs/train/runs/latest`), so "the newest run" is never a failed one."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from lmtune.artifacts.checkpoints import resume_command
from lmtune.core.errors import UserError, first_line
from lmtune.core.files import WRITE_ERRNOS, atomic_write

log = logging.getLogger(__name__)

SIGTERM_EXIT = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM


class Terminated(SystemExit):
    """The run was stopped by SIGTERM; the process exits with status 143."""


def _stop_on_sigterm(signum, frame) -> None:
    # While Lightning trains or evaluates, its own handler runs and then calls this one (it chains the handler
    # it found): it stops after the current step, having saved last.ckpt, so there is nothing to do here.
    if signal.getsignal(signal.SIGTERM) is _stop_on_sigterm:
        raise Terminated(SIGTERM_EXIT)


def _sigterm(e: BaseException) -> bool:
    if isinstance(e, Terminated):
        return True
    lightning = sys.modules.get("lightning.pytorch.utilities.exceptions")  # raised where Lightning stopped
    return lightning is not None and isinstance(e, lightning.SIGTERMException)


FAILED = "FAILED"
LATEST = "latest"


def _failed(output_dir, error: BaseException) -> None:
    """The one-line error into the run's log file (the console has it already) and a FAILED file beside it."""
    line = f"error: {error}" if isinstance(error, UserError) else f"error: {type(error).__name__}: {first_line(error)}"
    record = logging.LogRecord(log.name, logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    try:
        atomic_write(Path(output_dir) / FAILED, lambda f: f.write(line + "\n"))
    except OSError:  # a full or read-only folder: the error line on the console is all there can be
        pass


def _finished(output_dir) -> None:
    """`<runs>/latest` -> this run, replaced in one step; only for runs in a `runs/` folder (not multirun jobs)."""
    output_dir = Path(output_dir)
    runs = output_dir.parent
    if runs.name != "runs":
        return
    link = runs / f".{LATEST}-{os.getpid()}"
    try:
        link.unlink(missing_ok=True)
        link.symlink_to(output_dir.name, target_is_directory=True)
        os.replace(link, runs / LATEST)
    except OSError as e:  # a file system without links: nothing else depends on it
        log.debug("no %s link: %s", runs / LATEST, e)


def task_wrapper(task):
    """Wrap `train(cfg)` so a crashed job in a multirun cannot leak its W&B run into the next one.

    SIGTERM (outside Lightning's loops, where its own handler stops at a step boundary) ends the run the
    same way as an error: W&B run finished as failed, process exit status 143, and a hint how to resume.
    """

    @functools.wraps(task)
    def wrapped(cfg):
        exit_code = 0
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if main else None
        try:
            result = task(cfg)
            _finished(cfg.paths.output_dir)
            return result
        except UserError as e:
            exit_code = 1  # shown once, as one line, by the entry point
            _failed(cfg.paths.output_dir, e)
            raise
        except OSError as e:
            exit_code = 1
            if e.errno not in WRITE_ERRNOS:
                log.exception("run failed")
                _failed(cfg.paths.output_dir, e)
                raise
            error = UserError(
                f"cannot write {e.filename or 'into ' + str(cfg.paths.output_dir)} ({e.strerror}); what was saved "
                f"before is intact. Free space there, or write elsewhere (hydra.run.dir=<folder>)."
            )
            _failed(cfg.paths.output_dir, error)
            raise error from None
        except BaseException as e:
            if not _sigterm(e):
                exit_code = 1
                log.exception("run failed")
                _failed(cfg.paths.output_dir, e)
                raise
            exit_code = SIGTERM_EXIT
            command = resume_command(cfg.paths.output_dir)
            log.warning("stopped by SIGTERM%s", f"; resume with: {command}" if command else "")
            raise Terminated(SIGTERM_EXIT) from None
        finally:
            if main and previous is not None:
                signal.signal(signal.SIGTERM, previous)
            log.info("output dir: %s", cfg.paths.output_dir)
            if "wandb" in sys.modules:
                import wandb

                if wandb.run is not None:
                    wandb.finish(exit_code=exit_code)

    return wrapped
