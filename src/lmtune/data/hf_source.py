"""Rows from a Hugging Face `datasets` source: a Hub dataset id, a local folder of data files, or a
folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.

This module only loads and yields raw rows; validation, column renaming and de-duplication are shared with
the file readers in `lmtune.data.records` (`records_from_rows`), so every source behaves the same way.
Every way loading can fail (unknown dataset, no network, bad config or split, `datasets` missing) becomes a
one-line `DataError` that names the setting and the fix, never a traceback. `datasets` is imported only
when this source is used, because importing it is slow and most runs read a local file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from lmtune.core.errors import DataError
from lmtune.data.records import RecordSpec, check_columns

log = logging.getLogger(__name__)

_OFFLINE_HINT = (
    "Without network access, point `data.path=` at a local JSONL, CSV or Parquet file instead, "
    "or set HF_HUB_OFFLINE=1 to use a copy of the dataset already in the Hugging Face cache."
)


def _reason(error: BaseException) -> str:
    """The cause of a `datasets` failure in one line: the libraries raise multi-line, nested messages."""
    parts = []
    while error is not None and len(parts) < 3:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        if text not in parts:
            parts.append(text)
        error = error.__cause__
    reason = "; caused by ".join(parts)
    return reason if len(reason) <= 300 else reason[:297] + "..."


def _is_saved_to_disk(path: Path) -> bool:
    """True for a folder written by `save_to_disk`, which `load_dataset` refuses and `load_from_disk` reads."""
    from datasets import config

    if not path.is_dir():
        return False
    if (path / config.DATASETDICT_JSON_FILENAME).is_file():
        return True
    return (path / config.DATASET_STATE_JSON_FILENAME).is_file() and (path / config.DATASET_INFO_FILENAME).is_file()


def _load_from_disk(datasets, path: Path, split: str, config: str | None, revision: str | None):
    """A saved `Dataset` as is, or the `split` of a saved `DatasetDict`; returns (dataset, where)."""
    if config or revision:
        log.warning("data.hf_name=%s is a folder saved with save_to_disk: ignoring data.hf_config/hf_revision", path)
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # a damaged or partly written folder; the library raises several types
        raise DataError(
            f"data.hf_name={path}: could not read this save_to_disk folder ({_reason(e)}). "
            f"Save it again with `save_to_disk`, or point `data.path=` at a JSONL, CSV or Parquet file."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"data.hf_split={split}: no such split in {path}; available splits: {sorted(loaded)}. "
                f"Set `data.hf_split=` to one of them."
            )
        return loaded[split], f"hf:{path}[{split}]"
    return loaded, f"hf:{path}"  # a single saved Dataset has no splits to choose from


def _load_dataset(datasets, name: str, config: str | None, split: str, revision: str | None):
    """`load_dataset` for Hub ids and local folders of data files; every failure becomes a `DataError`."""
    where = f"hf:{name}{':' + config if config else ''}[{split}]"
    try:
        loaded = datasets.load_dataset(name, config, split=split, revision=revision)
    except Exception as e:  # unknown id, network, bad config/split, unreadable files: all fixed by the user
        settings = f"data.hf_name={name} data.hf_split={split}"
        if config:
            settings += f" data.hf_config={config}"
        if revision:
            settings += f" data.hf_revision={revision}"
        if Path(name).expanduser().exists():  # a local folder: the Hub and the network play no part
            fix = "Check that the folder holds JSONL, CSV or Parquet data files and that the config and split exist."
        else:
            fix = (
                f"Check the name, config and split on https://huggingface.co/datasets/{name} "
                f"(gated datasets need `hf auth login`). {_OFFLINE_HINT}"
            )
        raise DataError(f"{settings}: could not load the dataset ({_reason(e)}). {fix}") from None
    if isinstance(loaded, datasets.DatasetDict):  # split=None was passed through; there is no single table
        raise DataError(f"data.hf_name={name}: set `data.hf_split=` to one split; available splits: {sorted(loaded)}.")
    return loaded, where


def iter_hf_rows(
    name: str,
    config: str | None = None,
    split: str = "train",
    revision: str | None = None,
    spec: RecordSpec | None = None,
) -> tuple[Iterator[dict], str, str]:
    """Rows of a Hugging Face dataset as plain dicts (not yet renamed), `where`, naming it in errors, and the
    dataset's fingerprint (`datasets`' own hash of its content and processing).

    `name` is a folder saved with `save_to_disk` (read with `load_from_disk`), else anything `load_dataset`
    takes: a Hub id or a local folder of data files. The dataset is loaded and its columns are checked here,
    so a bad setting fails at once rather than at the first row (`spec` names the columns the task reads).
    """
    if not name or not str(name).strip():
        raise DataError("data.hf_name is empty: set it to a Hub dataset id or a local dataset folder.")
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"data.hf_name={name} needs the `datasets` package ({_reason(e)}). Install it with "
            f"`pip install datasets` (or `pip install -e .`), or point `data.path=` at a JSONL, CSV or Parquet file."
        ) from None

    path = Path(name).expanduser()
    if _is_saved_to_disk(path):
        dataset, where = _load_from_disk(datasets, path, split, config, revision)
    else:
        dataset, where = _load_dataset(datasets, name, config, split, revision)

    if spec is not None:
        check_columns(where, dataset.column_names, spec)
    # a format saved with the dataset (numpy, torch, ...) would yield arrays; records want plain Python values
    dataset = dataset.with_format(None)
    log.info("%s: %d rows", where, len(dataset))
    return iter(dataset), where, dataset._fingerprint  # what the prepared data's cache is keyed by
