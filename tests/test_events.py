"""What termtune says while it works goes through termtune.events: the terminal shows it as lines (the same
bytes the command always printed), and a notebook or script can show it its own way instead."""

from __future__ import annotations

import io

import pytest

from termtune import events


def test_a_sink_of_ones_own_gets_the_runners_events_and_nothing_is_printed(tiny_cfg, capfd):
    from termtune import pipeline

    cfg = tiny_cfg(n_rows=40)
    seen: list[tuple[str, str]] = []
    with events.showing(lambda kind, message: seen.append((kind, message))):
        pipeline.run_stage(cfg, "data")
        pipeline.run_stage(cfg, "data")
        cfg.data.max_rows = 30
        pipeline.run_stage(cfg, "data")
    assert seen == [("skipped", f"data: up to date in {cfg.run_dir} (same settings and inputs), skipped"),
                    ("rerun", "data: re-running: data.max_rows null → 30")]
    assert capfd.readouterr() == ("", "")
    pipeline.run_stage(cfg, "data")  # the block is over: the terminal shows it again
    assert capfd.readouterr().out == f"data: up to date in {cfg.run_dir} (same settings and inputs), skipped\n"


def test_the_terminal_puts_each_kind_on_its_stream_without_colour_in_a_log(capsys):
    for kind in events.KINDS:
        events.emit(kind, kind)
    out, err = capsys.readouterr()
    assert out == "stage\nskipped\nrerun\nresult\nfinished\ntext"  # a streamed piece gets no line end
    assert err == "note\nprogress\nprogress_done\n"  # in a log every progress report is a line
    with pytest.raises(ValueError, match="event kind 'shout'"):
        events.emit("shout", "x")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_progress_redraws_one_line_and_ends_it_before_anything_else(monkeypatch):
    err = Terminal()
    monkeypatch.setattr("sys.stderr", err)
    events.emit("progress", "waiting: InProgress, 2s")
    events.emit("progress", "waiting: InProgress, 4s")
    events.emit("progress_done", "waiting: Completed, 6s")
    events.emit("progress", "upload 1/2")
    events.emit("note", "a retry")
    events.emit("skipped", "data: up to date")
    assert err.getvalue() == ("\rwaiting: InProgress, 2s\rwaiting: InProgress, 4s\rwaiting: Completed, 6s\n"
                              "\rupload 1/2\na retry\n")  # what print() wrote, without colour codes


def test_progress_lines_in_a_log_are_events():
    from termtune.progress import Lines

    seen: list[tuple[str, str]] = []
    with events.showing(lambda kind, message: seen.append((kind, message))):
        lines = Lines("upload (MiB)", 4)
        lines.update(4)
    assert seen == [("progress_done", "upload (MiB) 4/4 (100%) 0:00")]
