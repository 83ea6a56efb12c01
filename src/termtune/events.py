"""What termtune says while it works: library code reports it here, and one sink shows it.

The runner, the stages and the AWS code never print. They call `emit(kind, message)`, and the installed sink
decides how that shows. The default, `terminal`, is what the `termtune` command prints: each event a line on
standard output or standard error, in colour on a terminal. A notebook or another program shows the same events
its own way:

    from termtune import events

    seen = []
    with events.showing(lambda kind, message: seen.append((kind, message))):
        tt.run(cfg)

The kinds, and how the terminal shows them:

    stage          a stage begins ("== data")                                   stdout, bold
    skipped        a stage is up to date and is not run again                   stdout, green
    rerun          work is done again, and why                                  stdout, yellow
    result         what a stage found or made: a summary, the plan, an answer   stdout
    finished       the run is over                                              stdout, bold green
    text           a piece of an answer as it streams in (no line end added)    stdout
    note           what to know while it works: a wait, a retry, what would be done   stderr
    progress       how far long work has come; on a terminal each one replaces the last   stderr
    progress_done  the last of those                                            stderr
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import typer

Sink = Callable[[str, str], None]
"""Called with (kind, message) for every event."""

KINDS = ("stage", "skipped", "rerun", "result", "finished", "text", "note", "progress", "progress_done")

_STYLES = {"stage": {"bold": True}, "skipped": {"fg": "green"}, "rerun": {"fg": "yellow"},
           "finished": {"fg": "green", "bold": True}}
_TO_STDERR = ("note", "progress", "progress_done")


def emit(kind: str, message: str = "") -> None:
    """Report one event to the installed sink. `kind` is one of KINDS."""
    if kind not in KINDS:
        raise ValueError(f"event kind {kind!r}: expected one of {', '.join(KINDS)}")
    _installed[0](kind, message)


def terminal(kind: str, message: str) -> None:
    """The command line's sink: lines on stdout and stderr as the module docstring's table says. On a terminal
    a progress line is redrawn in place (and ended before anything else is shown); in a log each is a line."""
    with _lock:
        redraw = kind in ("progress", "progress_done") and interactive()
        if _progress_open[0] and not redraw:
            typer.echo("", err=True)  # end the progress line before anything else
        _progress_open[0] = redraw and kind == "progress"
        if redraw:
            typer.echo("\r" + message, err=True, nl=kind == "progress_done")
        elif kind in _STYLES:
            typer.secho(message, **_STYLES[kind])  # colour only on a terminal (click strips it elsewhere)
        else:
            typer.echo(message, err=kind in _TO_STDERR, nl=kind != "text")


def interactive() -> bool:
    """True when standard error is a terminal: progress redraws in place there (bars, the import's wait)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def install(sink: Sink) -> Sink:
    """Show every event with `sink` from now on; returns the sink it replaces."""
    before, _installed[0] = _installed[0], sink
    return before


@contextmanager
def showing(sink: Sink) -> Iterator[None]:
    """Show the events of the block with `sink`, then go back to the sink before."""
    before = install(sink)
    try:
        yield
    finally:
        install(before)


_installed: list[Sink] = [terminal]
_progress_open = [False]
_lock = threading.Lock()  # the upload's progress comes from the transfer manager's threads
