"""Run wrapper: always close the W&B run (marking failures), and say where the outputs are."""

from __future__ import annotations

import functools
import logging

from lmtune.errors import UserError

log = logging.getLogger(__name__)


def task_wrapper(task):
    """Wrap `train(cfg)` so a crashed job in a multirun cannot leak its W&B run into the next one."""

    @functools.wraps(task)
    def wrapped(cfg):
        exit_code = 0
        try:
            return task(cfg)
        except UserError:
            exit_code = 1  # shown once, as one line, by the entry point
            raise
        except BaseException:
            exit_code = 1
            log.exception("run failed")
            raise
        finally:
            log.info("output dir: %s", cfg.paths.output_dir)
            import sys

            if "wandb" in sys.modules:
                import wandb

                if wandb.run is not None:
                    wandb.finish(exit_code=exit_code)

    return wrapped
