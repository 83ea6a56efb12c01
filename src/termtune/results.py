"""What the stage functions of the Python API (termtune.api) return have in common.

Each stage's result is its own dataclass (TrainResult, EvalReport, ...) with a `summary()`:
the lines `termtune <stage>` prints. This mixin makes that text the object's repr, so a
notebook cell or `print` shows the same figures as the CLI, and marks a result that the
runner read back from the run directory because the stage was already up to date.
"""

from __future__ import annotations

import html
import math
from typing import Any, Iterable


class StageResult:
    """Mixin for stage results: repr() is summary(). Subclasses are `@dataclass(repr=False)`."""

    up_to_date: bool = False
    """True when the stage was up to date (same settings and inputs) and this was read back from the run."""

    def summary(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        note = "\n(up to date: read back from the run directory, not run again)" if self.up_to_date else ""
        return self.summary() + note


def is_number(value: Any) -> bool:
    """A figure worth showing, comparing or plotting: an int or a finite float. Not a bool (JSON's true is no
    score), not NaN or infinity (what json reads from a NaN or Infinity a library wrote for a failed metric)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def html_table(header: Iterable[str], rows: Iterable[Iterable[Any]], caption: str = "") -> str:
    """A small HTML table for a notebook's rich display (`_repr_html_`); every cell is escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(str(c))}</td>" for c in row)
                   + "</tr>" for row in rows)
    cap = f"<caption style='text-align:left'>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
