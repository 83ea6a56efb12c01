"""OS failures (read-only folder, a file in the way, a name too long, a full disk) as one line
that names the path and the cause, and a probe that finds them before a stage starts its work.

    probe_writable(cfg.run_dir)       # at stage start: raises UserError now, not after an hour
    with writing(folder): ...         # an OSError inside becomes a UserError naming `folder`
    describe_os_error(error, where)   # the one line (the CLI prints it for any other OSError)
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from termtune.errors import UserError

PROBE_BYTES = 64 * 1024
"""Written and synced by the probe: a disk that cannot take this cannot take a stage's output."""

_HINTS = {
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "no permission to write there; choose a folder you can write",
    errno.EPERM: "no permission to write there; choose a folder you can write",
    errno.ENOTDIR: "a file is where a folder is expected; move it or choose another folder",
    errno.EEXIST: "a file is where a folder is expected; move it or choose another folder",
    errno.ENAMETOOLONG: "a name is too long (at most 255 bytes per name); choose a shorter one",
    errno.ENOSPC: "no space left on the device; free space or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is used up; free space or choose a folder on another disk",
    errno.EFBIG: "the file grew past the size this system allows",
}


def describe_os_error(error: OSError, where: str | Path | None = None) -> str:
    """`<path>: <cause> (<hint>)`; the path is the one the OS named, else `where` (a write that fails
    on a full disk names no file)."""
    path = error.filename if error.filename is not None else where
    cause = error.strerror or type(error).__name__
    hint = _HINTS.get(error.errno or 0, "")
    if error.errno in (errno.ENOSPC, errno.EDQUOT) and path is not None:
        free = _free_bytes(Path(path))
        if free is not None:
            hint += f"; {free / 1e6:.1f} MB free there"
    text = f"{path}: {cause}" if path is not None else cause
    if error.filename2 is not None:
        text += f" (-> {error.filename2})"
    return f"{text} ({hint})" if hint else text


def probe_writable(folder: Path) -> None:
    """Create `folder` (and its parents) and write, sync and delete a small file in it.

    Raises:
        UserError: one line naming the folder and the cause, for any OSError.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # names the folder (or the parent) in the way
        raise UserError(describe_os_error(e, folder)) from e
    try:
        fd, probe = tempfile.mkstemp(prefix=".termtune-probe-", dir=folder)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:  # the probe file's own name would only confuse: name the folder
        raise UserError(describe_os_error(OSError(e.errno, e.strerror), folder)) from e


@contextmanager
def writing(folder: Path) -> Iterator[None]:
    """Turn an OSError raised while writing `folder` into a UserError that names it (a write that
    fails on a full disk names no file of its own); also the libraries' own errors for a failed
    write: safetensors' `... (os error 28)` and torch.save's stream writer (`unexpected pos ...`)."""
    try:
        yield
    except OSError as e:
        raise UserError(describe_os_error(e, folder)) from e
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - only a failed write is turned into one line; the rest is re-raised
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code:
            raise UserError(describe_os_error(OSError(int(code[1]), os.strerror(int(code[1]))), folder)) from e
        if type(e) is RuntimeError and re.search(r"PytorchStreamWriter|inline_container|file write failed", str(e)):
            free = _free_bytes(Path(folder))
            raise UserError(f"{folder}: writing failed ({str(e).strip().splitlines()[0]}); a full disk is the usual "
                            f"cause" + (f": {free / 1e6:.1f} MB free there" if free is not None else "")) from e
        raise


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None
