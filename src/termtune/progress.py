"""Progress that suits where it is shown: a live bar on a terminal, sparse lines in a log.

A redirected `termtune run > log` (CI, `make demo > log`) would otherwise collect hundreds of
carriage-return updates; there, `Lines` reports one line every ~10 % of the work or every ~30 s,
whichever comes first (as termtune.events "progress" events). `interactive()` says which of the two.
"""

from __future__ import annotations

import time

from termtune.events import emit, interactive

__all__ = ["Lines", "clock", "interactive"]


def clock(seconds: float) -> str:
    """0:07, 2:05, 1:02:05."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Lines:
    """One line per ~10 % of `total` or per `every_s` seconds, for logs that are not terminals."""

    def __init__(self, what: str, total: int, every_s: float = 30.0, share: float = 0.1) -> None:
        self.what, self.total, self.every_s = what, max(total, 1), every_s
        self.step = max(1, round(self.total * share))
        self.start = self.last_time = time.monotonic()
        self.last_n = 0

    def update(self, n: int, detail: str = "") -> None:
        now = time.monotonic()
        since = now - self.last_time
        # a step of ~10 %, but not several a second (a quick job gets its last line only), or every_s
        if n < self.total and not (n - self.last_n >= self.step and since >= 1.0) and since < self.every_s:
            return
        if n == self.last_n and n != 0:
            return
        elapsed = now - self.start
        left = f", ~{clock(elapsed / n * (self.total - n))} left" if 0 < n < self.total else ""
        emit("progress_done" if n >= self.total else "progress", f"{self.what} {n}/{self.total} ({n / self.total:.0%}) {clock(elapsed)}{left}"
             + (f"  {detail}" if detail else ""))
        self.last_n, self.last_time = n, now
