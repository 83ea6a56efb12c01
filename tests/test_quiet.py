"""Quiet output: the libraries' known notices go to <run>/library.log, everything else still shows;
off a terminal, progress is a few plain lines."""

from __future__ import annotations

import io
import logging
import re
import warnings

import pytest
from test_cli import termtune

from conftest import medquad_rows, tiny_overrides, write_jsonl


@pytest.fixture
def verbose_off():
    from termtune import quiet

    yield quiet
    quiet.set_verbose(False)


def _warn(message: str, category: type[Warning], filename: str) -> None:
    warnings.warn_explicit(message, category, filename, 1, registry={})


def test_known_warnings_go_to_the_log_file_and_others_still_show(tmp_path, verbose_off):
    log = tmp_path / "library.log"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with verbose_off.quiet(log):
            _warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                  "/venv/lib/site-packages/transformers/modeling_utils.py")
            # same module, another message; same message, another category: not ours to hide
            _warn("something else is deprecated", FutureWarning, "/venv/lib/site-packages/transformers/modeling_utils.py")
            _warn("`is_gradient_checkpointing` is deprecated", UserWarning, "/venv/lib/site-packages/transformers/modeling_utils.py")
            _warn("a user's own warning", UserWarning, "/home/me/train.py")
    assert [str(w.message) for w in shown] == ["something else is deprecated", "`is_gradient_checkpointing` is deprecated",
                                               "a user's own warning"]
    text = log.read_text(encoding="utf-8")
    assert "FutureWarning (/venv/lib/site-packages/transformers/modeling_utils.py:1): `is_gradient_checkpointing`" in text
    assert "something else" not in text


def test_verbose_shows_the_known_warnings_too(tmp_path, verbose_off):
    verbose_off.set_verbose(True)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with verbose_off.quiet(tmp_path / "library.log"):
            _warn("Input and output embeddings are no longer tied after merging.", UserWarning,
                  "/venv/lib/site-packages/peft/tuners/tuners_utils.py")
    assert len(shown) == 1
    assert "no longer tied" in (tmp_path / "library.log").read_text(encoding="utf-8")


def test_known_log_records_go_to_the_file_only_while_quiet(tmp_path, verbose_off):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    logger.addHandler(handler)
    try:
        with verbose_off.quiet(tmp_path / "library.log"):
            logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
            logger.warning("a real problem")
        logger.warning("Failed to load CPU gemm_4bit_forward (after the block)")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["a real problem", "Failed to load CPU gemm_4bit_forward (after the block)"]
    assert "No module named 'kernels'" in (tmp_path / "library.log").read_text(encoding="utf-8")


def test_a_run_prints_no_warnings_and_plain_progress_lines(tmp_path):
    """The real command, as in a log file (not a terminal): train with a trained lm_head (the demo's recipe,
    which makes peft and transformers talk most), evaluate, export, validate."""
    data = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(48))
    args = [*tiny_overrides(tmp_path / "run", data), "lora.modules_to_save=[lm_head]", "aws.deploy=false",
            "train.epochs=2", "train.logging_steps=1"]
    done = termtune("run", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert [line for line in output.splitlines() if "Warning" in line or "warnings.warn" in line] == []
    assert "\r" not in output, "a redrawn progress bar in a log"
    assert re.search(r"^train: step (\d+)/\1 \(100%\)", done.stderr, re.M), done.stderr[-2000:]
    assert "ROUGE-L     base" in done.stdout  # the closing block, then the report's path last
    assert done.stdout.rstrip().splitlines()[-1] == f"report      {tmp_path / 'run' / 'report.html'}"
    log = (tmp_path / "run" / "library.log").read_text(encoding="utf-8")
    assert "FutureWarning" in log and "tie_word_embeddings" in log

    again = termtune("--verbose", "export", *args, "--force")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "UserWarning" in again.stderr  # peft's merge notice, shown when asked for


def test_the_log_is_never_appended_through_a_link(tmp_path, verbose_off):
    from termtune.errors import UserError

    elsewhere = tmp_path / "elsewhere.txt"  # does not exist: opening through the link would create it
    log = tmp_path / "library.log"
    log.symlink_to(elsewhere)
    with pytest.raises(UserError) as refused:
        with verbose_off.quiet(log):
            _warn("`is_gradient_checkpointing` is deprecated", FutureWarning, "/x/transformers/modeling_utils.py")
    assert str(refused.value) == (f"{log}: is a symbolic link; termtune writes this file itself and never through a "
                                  "link: remove the link")
    assert not elsewhere.exists()
