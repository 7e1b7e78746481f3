"""A quiet console: the project's own lines, Lightning's progress and the result.

Libraries print notices that are about themselves, not about the user's run: an optional kernel they could not
download, deprecations inside their own code, tips, the devices Lightning found (the project logs the precision
and hardware it picked in one line). They are filtered here, where they come from (their logger or warning),
before the libraries are imported. `LMTUNE_VERBOSE=1` shows everything, as the libraries print it.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

VERBOSE = os.environ.get("LMTUNE_VERBOSE", "").strip().lower() not in ("", "0", "false", "no")

# loggers whose lines below this level are about the library, not the run
QUIET_LOGGERS = {
    # "Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels": an optional kernel
    # downloaded from the hub (code this project never loads); bitsandbytes' own CPU kernels run instead
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
    "lightning.fabric.utilities.seed": logging.WARNING,  # "Seed set to 42": the config has the seed
}
# Lightning's info lines that repeat what the project logs (devices, precision) or advertise
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
LIGHTNING_NOISE = re.compile(
    r"(GPU|TPU|HPU) available|💡 Tip|Using (bfloat16|16bit) Automatic Mixed Precision|"
    r"Trainer already configured with model summary|LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES"
)
# deprecation warnings raised inside libraries by other libraries' calls: nothing in the user's hands
LIBRARY_WARNINGS = (
    r"`is_gradient_checkpointing` is deprecated",  # transformers, called by Lightning/peft
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch's pytree, called by Lightning
    r"Precision .* is not supported by the model summary",
)


def process_rank() -> int:
    """This process's rank in a multi-process run, from what torchrun, SLURM or Lightning's launcher set (0 alone)."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not LIGHTNING_NOISE.search(str(record.msg))


def quiet_console() -> None:
    """Filter the libraries' notices (see the module's docstring); nothing when LMTUNE_VERBOSE=1. Cheap: imports
    no library, so entry points call it first."""
    if VERBOSE:
        return
    if process_rank() != 0:  # each process of a DDP/FSDP run would log the same lines: the first one says them
        logging.getLogger("lmtune").setLevel(logging.WARNING)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).addFilter(_DropNoise())
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{message}")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("WANDB_SILENT", "true")  # the project says in one line where the run is (offline or not)


def quiet_progress_bars() -> None:
    """transformers' per-file "Loading weights" bars (the project logs what it loads); hub downloads keep theirs."""
    if VERBOSE:
        return
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # turns the hub's off too...
    if not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
        enable_progress_bars()  # ...so downloads get theirs back: minutes of download are not a hang


def single_lightning_handler() -> None:
    """`import lightning` gives the `lightning` logger a console handler of its own; where the root logger already
    has handlers (Hydra's console and train.log), every Lightning line would print twice. Call after importing it."""
    if logging.getLogger().hasHandlers():
        lightning = logging.getLogger("lightning")
        for handler in [h for h in lightning.handlers if type(h) is logging.StreamHandler]:
            lightning.removeHandler(handler)
