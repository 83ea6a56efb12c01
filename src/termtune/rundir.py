"""Files in a run directory: atomic writes, one JSON reader, one sha256, provenance facts, the lock.

Each stage writes into a temporary sibling and renames it into place only when complete, so
a crash never leaves output that looks finished. This module knows nothing about stages or
the report: the runner (termtune.pipeline) decides what is complete and what to refresh.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from termtune.errors import UserError

_PACKAGES = ("termtune", "torch", "transformers", "peft", "datasets", "accelerate", "safetensors",
             "tokenizers", "bitsandbytes", "boto3", "botocore", "pydantic")


# ----------------------------------------------------------------------------- atomic files


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically: a temp file in the same folder, fsync, rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path, default: Any = None) -> Any:
    """The parsed file, or `default` when there is no such file. Every JSON file termtune reads comes through here.

    A file that is there but is not JSON is an error naming it and the place: never read as missing, which would
    let the next write replace what it held (a run history, the record of a deployment). termtune writes every
    file whole (write_json), so such a file was changed by someone or something else."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return default
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid JSON (not UTF-8 text at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e


def sha256_file(path: Path, chunk: int = 16 * 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_dir(final: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces `final` only if the block succeeds.

    An existing `final` is an error unless `force`; with `force` it is swapped out only
    after the new one is complete, so a failure keeps the old output intact. A symlink is
    followed: its target is replaced and the link keeps pointing at the new folder.
    """
    final = Path(final)
    if final.is_symlink():
        final = final.resolve()  # renaming the link itself would hide the old folder behind a stray link
    if final.exists() and not force:
        raise UserError(f"{final} already exists; pass --force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for stale in final.parent.iterdir():  # old folders of swaps that were killed half-way
        if not stale.name.startswith(f".{final.name}.old-"):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def open_plain(path: Path, flags: int) -> int:
    """`os.open` of a regular file that never follows a symbolic link. For the files termtune keeps open
    and writes in place (the lock, the library log): through a link planted under that name it would
    truncate or append to whatever the link points at.

    Raises:
        UserError: one line naming `path` when it is a link or not a regular file (a FIFO, a device).
    """
    not_plain = UserError(f"{path}: is not a regular file; termtune writes this file itself: remove it")
    try:  # O_NONBLOCK: opening a FIFO must not wait for a reader
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{path}: is a symbolic link; termtune writes this file itself and never through a "
                            "link: remove the link") from None
        if e.errno == errno.ENXIO:  # a FIFO with no reader
            raise not_plain from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise not_plain
    return fd


def remove(path: Path) -> None:
    """Delete a file or folder if it is there. A folder is first renamed aside, so a process killed
    mid-delete never leaves a half-deleted folder under the real name (the next call sweeps it)."""
    path = Path(path)
    for leftover in path.parent.glob(f".{path.name}.removed-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if path.is_dir() and not path.is_symlink():
        trash = path.with_name(f".{path.name}.removed-{os.getpid()}")
        os.replace(path, trash)
        shutil.rmtree(trash)
    else:
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- provenance facts


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """The commit of the termtune checkout in use (None when not run from a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def provenance() -> dict[str, Any]:
    """What every stage record carries besides its inputs: when, which code, which packages, which command."""
    return {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": git_commit(),
            "versions": package_versions(), "argv": sys.argv}


# ----------------------------------------------------------------------------- one writer


@contextmanager
def exclusive(lock_path: Path, command: str) -> Iterator[None]:
    """Hold an exclusive lock on the run directory for the block, or fail at once naming the holder.

    fcntl locks belong to the open file: the kernel drops them when the holder exits, however
    it exits (SIGKILL included), so a stale lock file never blocks the next command.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_plain(lock_path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = _lock_holder(fd)
            raise UserError(f"{lock_path.parent}: in use by another termtune process "
                            f"(pid {holder.get('pid', '?')}, `{holder.get('command', '?')}`, "
                            f"since {holder.get('since', '?')}); wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": command,
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
