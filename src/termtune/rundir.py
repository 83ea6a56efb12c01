"""The run directory: atomic writes and provenance shared by every stage.

Each stage writes into a temporary sibling and renames it into place only when complete,
so a crash never leaves output that looks finished, and `termtune run` can skip any stage
whose outputs exist.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from termtune.config import Config, dump_config
from termtune.errors import UserError

_PACKAGES = ("termtune", "torch", "transformers", "peft", "datasets", "accelerate", "safetensors",
             "tokenizers", "bitsandbytes", "boto3", "botocore", "pydantic")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename in the same folder)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def record_stage(cfg: Config, stage: str, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved config, package versions, git commit and seed for `stage`.

    `config.yaml` always holds the config of the latest stage; `provenance/<stage>.json`
    keeps each stage's own snapshot so a later override never hides what an earlier stage used.
    """
    run_dir = cfg.run_dir
    record = {
        "stage": stage,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": cfg.run.seed,
        "git_commit": git_commit(),
        "versions": package_versions(),
        "argv": sys.argv,
        "config": cfg.model_dump(mode="json"),
    }
    if extra:
        record.update(extra)
    write_json(run_dir / "provenance" / f"{stage}.json", record)
    write_text(run_dir / "config.yaml", dump_config(cfg))
    refresh_report(cfg)


def refresh_report(cfg: Config) -> None:
    """Bring report.html / report.md up to date with every stage that has run so far."""
    try:
        from termtune.report import write_report
    except ImportError:  # the report module is optional for the stages themselves
        return
    write_report(cfg)
