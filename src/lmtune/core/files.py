"""Files that are never half-written (readers see the old file or the new one, nothing in between), and
write failures (a full disk, a read-only or unwritable folder) as one line that names the folder."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from lmtune.core.errors import UserError

# errors that say the folder cannot take the file: no space, over quota, read-only, too large, not allowed
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}
# the process's umask, read once at import (reading it means setting it): files are written as `open` would
UMASK = os.umask(0o022)
os.umask(UMASK)


def atomic_write(path: Path, write: Callable[[object], None], mode: str = "w") -> None:
    """Write via a temp file in the same directory + fsync + os.replace (atomic on POSIX and Windows). The file gets
    the permissions `open` would give it (0644 under the usual umask), not the temp file's 0600: checkpoints,
    weights and metrics are read by other users and containers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~UMASK)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_folder(out_dir: str | Path, fill: Callable[[Path], None], what: str = "export") -> Path:
    """Write a folder whole or not at all: `fill` writes into a temporary sibling, which then replaces `out_dir`.
    If anything fails (a full disk, an unwritable folder), the previous `out_dir` is left as it was."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        fill(tmp)
        for written in tmp.rglob("*"):  # as `open` would: some writers (safetensors) leave 0600
            written.chmod((0o777 if written.is_dir() else 0o666) & ~UMASK)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except OSError as e:
        raise UserError(
            f"cannot write the {what} {out_dir} ({e.strerror or e}); "
            + ("the previous one is unchanged. " if out_dir.exists() else "")
            + "Free space there or write elsewhere (hydra.run.dir=<folder>)."
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def check_writable(folder: Path, setting: str) -> str | None:
    """None if a file can be written in `folder` (created if needed), else the one-line problem and its fix."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return f"{setting}={folder}: cannot write there ({e.strerror or e}); point {setting}= at a writable folder."
    return None
