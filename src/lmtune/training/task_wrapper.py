"""How a run ends: the W&B run always closed (failures marked), the output folder named, SIGTERM a clean stop."""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading

from lmtune.artifacts.checkpoints import resume_command
from lmtune.core.errors import UserError
from lmtune.core.files import WRITE_ERRNOS

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
            return task(cfg)
        except UserError:
            exit_code = 1  # shown once, as one line, by the entry point
            raise
        except OSError as e:
            exit_code = 1
            if e.errno not in WRITE_ERRNOS:
                log.exception("run failed")
                raise
            raise UserError(
                f"cannot write {e.filename or 'into ' + str(cfg.paths.output_dir)} ({e.strerror}); what was saved "
                f"before is intact. Free space there, or write elsewhere (hydra.run.dir=<folder>)."
            ) from None
        except BaseException as e:
            if not _sigterm(e):
                exit_code = 1
                log.exception("run failed")
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
