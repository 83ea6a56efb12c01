"""Remote or recorded names (S3 keys, manifest entries, S3 URIs) as paths that stay inside their folder.

Joining a name onto a folder is only safe when the name is a plain relative path: `Path(root) / "/tmp/x"`
is `/tmp/x`, and `..`, a symlink or an empty segment (`evil//tmp/x` under the prefix `evil/` leaves
`/tmp/x`) can leave the folder too. `inside(root, name)` refuses such names outright and then checks
the resolved path, so neither a hostile name nor a symlink already in the folder can lead out of it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

MAX_NAME_BYTES = 1024  # S3's key limit, and far beyond any artifact file's relative path
MAX_SEGMENT_BYTES = 255  # NAME_MAX on Linux and macOS


class UnsafeName(ValueError):
    """A name that must not become a path under the folder; the message says why."""


def name_problem(name: str) -> str | None:
    """Why `name` is not a plain relative path (POSIX separators, no `.`/`..`, no empty segment), or None."""
    if not name:
        return "is empty"
    if "\x00" in name:
        return "contains a NUL byte"
    if "\\" in name:
        return "contains a backslash"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    if name.startswith("/"):
        return "is an absolute path"
    for part in name.split("/"):
        if not part:
            return "has an empty segment (//)"
        if unquote(part) in (".", ".."):  # %2e%2e too: whoever decodes it later would walk up
            return f"has a {part!r} segment"
        if len(part.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
            return f"has a segment longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def inside(root: Path, name: str, what: str = "name") -> Path:
    """The resolved path of `name` under `root`; UnsafeName when the name is not a plain relative path
    or its resolved path (symlinks followed) is not inside the resolved root."""
    shown = repr(name) if len(name) <= 80 else repr(name[:77]) + "..."
    problem = name_problem(name)
    if problem:
        raise UnsafeName(f"{what} {shown} {problem}")
    base = Path(root).resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base):
        raise UnsafeName(f"{what} {shown} leads outside {base} (through a symlink)")
    return path
