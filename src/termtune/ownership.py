"""What in a run directory is termtune's, and replacing a stage's outputs without losing the old ones.

    claim(layout, create=True)              # before the lock: refuse a folder termtune did not make
    mark(layout)                            # under the lock: write <run>/termtune-run.json if missing
    check_replaceable(layout, outputs)      # refuse, naming it, a file termtune did not write there
    with replacing(layout, stage, outputs, record, why): ...   # old outputs come back if the block fails

The rules, simplest first:

- termtune writes only into a new or empty folder, or into a termtune run directory: one holding
  the marker termtune-run.json, or (made by a termtune from before the marker) provenance records;
  such a run is adopted and marked. Any other non-empty folder is refused, naming what is there.
- In a run directory, the names docs/run-directory.md lists are termtune's. A stage folder that
  termtune replaces whole (data/, train/, eval/) must hold only those names: anything else stops the
  command, naming the file, before anything is touched. (base-model/, train/adapter/,
  train/checkpoints/ are filled whole by the libraries' save functions; the artifact is checked
  against its own manifest by export.)
- A stage that runs again first sets its old outputs and record aside (.<name>.replaced); they are
  deleted only after the new record is written, and put back if the stage fails. A command killed
  part-way leaves them aside; the next command that takes the lock puts them back (`recover`).
"""

from __future__ import annotations

import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from termtune import history
from termtune.errors import UserError
from termtune.layout import RunLayout
from termtune.rundir import read_json, remove, write_json

RUN_FORMAT = "termtune-run/1"


# ----------------------------------------------------------------------------- whose folder


def claim(layout: RunLayout, create: bool = True) -> None:
    """Refuse a run.dir termtune may not write into. Reads only; `create=False` (report) also refuses
    a folder that does not exist or holds no run, instead of making one."""
    root = layout.root
    if not root.exists() and not root.is_symlink():
        if create:
            return
        raise UserError(f"{root}: no such run directory; check run.dir")
    if not root.is_dir() or _is_marked(layout) or _has_records(layout):
        return  # not a folder: the writability probe names the problem
    entries = [p.name + "/" * p.is_dir() for p in sorted(root.iterdir())
               if p.name not in (layout.lock.name, layout.library_log.name)]
    if not entries and create:
        return
    held = f"it holds {_names(entries)}" if entries else "it is empty"
    raise UserError(f"{root}: not a termtune run directory ({held}, and no {layout.marker.name}); "
                    + ("termtune writes only into a new or empty folder or one of its own runs: choose another "
                       "run.dir, or move those files out" if create else "check run.dir"))


def mark(layout: RunLayout) -> None:
    """Write the marker (under the lock) into a run directory that lacks one: new, or made by an older termtune.
    Its `id` names this run and no other, wherever the folder is moved."""
    if not _is_marked(layout):
        write_json(layout.marker, {"format": RUN_FORMAT, "id": secrets.token_hex(6),
                                   "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _is_marked(layout: RunLayout) -> bool:
    if layout.marker.is_symlink():
        return False
    marker = read_json(layout.marker)
    return isinstance(marker, dict) and marker.get("format") == RUN_FORMAT


def _has_records(layout: RunLayout) -> bool:
    folder = layout.provenance
    records = (read_json(p) for p in folder.glob("*.json"))
    return folder.is_dir() and not folder.is_symlink() and any(isinstance(r, dict) and "stage" in r for r in records)


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


# ----------------------------------------------------------------------------- whose files


def check_replaceable(layout: RunLayout, outputs: list[Path], stage: str) -> None:
    """Refuse, naming them, files in the stage's output folders that termtune does not write there
    (a data file kept in data/, a script in train/): replacing the folder would delete them."""
    for folder in outputs:
        names = layout.names_in(folder)
        if not names or not folder.is_dir():
            continue
        foreign = [p.name for p in sorted(folder.iterdir()) if not _ours(p.name, names)]
        if foreign:
            raise UserError(f"{folder}: holds {_names(foreign)}, which termtune did not write; {stage} replaces "
                            f"{folder.name}/ when it runs again: move {'it' if len(foreign) == 1 else 'them'} "
                            "out of the run directory first")


def _ours(name: str, names: set[str]) -> bool:
    """A name termtune writes, or one of its temporary siblings (.<name>.tmp, .partial-, .old-, .replaced)."""
    return name in names or name.startswith(".termtune-probe-") or any(name.startswith(f".{n}.") for n in names)


# ----------------------------------------------------------------------------- replacing


def aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.replaced")


@contextmanager
def replacing(layout: RunLayout, stage: str, outputs: list[Path], record: dict[str, Any] | None,
              why: list[str], put_back: bool = True) -> Iterator[None]:
    """Around a stage that replaces a recorded result: the old record goes to the history, then it and
    the old outputs are renamed aside; the block makes the new ones and writes the new record last.
    Success: the old files are deleted. Failure (a refusal, a full disk, Ctrl-C): the new partial
    outputs are deleted and the old ones put back, as if the command had not run. Without `put_back`
    the old files are deleted before the block runs (deploy: the history keeps the old import)."""
    if record is None:  # nothing recorded: nothing of termtune's to keep
        yield
        return
    history.append(layout, stage, record, why)  # first: deploy reads earlier attempts' imports from it
    moved = [layout.record(stage), *(p for p in outputs if p.exists() or p.is_symlink())]
    try:
        for path in moved:  # the record first: `recover` reads a record aside as "not finished"
            os.replace(path, aside(path))
        if not put_back:
            _discard(layout, stage, outputs)
        yield
    except BaseException:
        _put_back(layout, stage, outputs)
        raise
    _discard(layout, stage, outputs)


def recover(layout: RunLayout, outputs: dict[str, list[Path]]) -> None:
    """Finish what a killed command left aside (`replacing`): a new record was written, so the old
    files go; no new record, so the old result comes back. Call under the lock."""
    for stage, paths in outputs.items():
        if not aside(layout.record(stage)).exists():
            continue
        if layout.record(stage).exists():
            _discard(layout, stage, paths)
        else:
            _put_back(layout, stage, paths)


def _put_back(layout: RunLayout, stage: str, outputs: list[Path]) -> None:
    for path in outputs:
        if aside(path).exists() or aside(path).is_symlink():
            remove(path)  # what the failed run made: partial, and made just now by termtune
            os.replace(aside(path), path)
    old = read_json(aside(layout.record(stage)))
    if aside(layout.record(stage)).exists():
        os.replace(aside(layout.record(stage)), layout.record(stage))
    if isinstance(old, dict):
        history.forget(layout, stage, old)  # it was not replaced after all


def _discard(layout: RunLayout, stage: str, outputs: list[Path]) -> None:
    for path in outputs:
        remove(aside(path))
    remove(aside(layout.record(stage)))  # last: while it is there, recover() can finish this
