"""The real `termtune` command, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, medquad_rows, tiny_overrides, write_jsonl

TERMTUNE = [sys.executable, "-m", "termtune.cli"]


def termtune(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([*TERMTUNE, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_help_lists_every_stage_and_is_fast():
    start = time.perf_counter()
    out = termtune("--help")
    elapsed = time.perf_counter() - start
    assert out.returncode == 0
    for command in ("data", "train", "evaluate", "report", "export", "validate", "deploy", "invoke", "cleanup",
                    "serve", "run", "plan"):
        assert command in out.stdout
    # Heavy libraries stay out of the import path of --help.
    probe = subprocess.run([sys.executable, "-c", "import sys, termtune.cli; "
                            "print(sorted(m for m in ('torch','transformers','boto3','datasets') if m in sys.modules))"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "[]"
    print(f"--help took {elapsed:.2f}s")


def test_data_prepare_and_inspect_end_to_end(tmp_path):
    src = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(40))
    run = tmp_path / "run"
    out = termtune("data", "prepare", "configs/demo-t5.yaml", *tiny_overrides(run, src)[:1], f"data.source={src}",
                   "data.test_size=4")
    assert out.returncode == 0, out.stderr
    assert "split: 36 train / 4 test" in out.stdout
    stats = json.loads((run / "data" / "stats.json").read_text())
    assert (stats["train_rows"], stats["test_rows"]) == (36, 4)
    provenance = json.loads((run / "provenance" / "data.json").read_text())
    assert provenance["seed"] == 42 and provenance["versions"]["transformers"]
    assert "git_commit" in provenance and provenance["config"]["data"]["source"] == str(src)

    again = termtune("data", "prepare", "configs/demo-t5.yaml", f"run.dir={run}", f"data.source={src}", "data.test_size=4")
    assert again.returncode == 0 and "data: up to date" in again.stdout
    changed = termtune("data", "prepare", "configs/demo-t5.yaml", f"run.dir={run}", f"data.source={src}", "data.test_size=5")
    assert changed.returncode == 0 and "data: re-running: data.test_size 4 → 5" in changed.stdout
    assert "split: 35 train / 5 test" in changed.stdout

    shown = termtune("data", "inspect", "configs/demo-t5.yaml", f"run.dir={run}", "--rows", "2")
    assert shown.returncode == 0 and shown.stdout.count("prompt: What is ") == 2


def test_user_errors_are_one_line_without_traceback(tmp_path):
    cases = [
        ("train", "configs/demo-t5.yaml", "train.lr=1"),
        ("data", "prepare", "configs/nope.yaml"),
        ("data", "prepare", "configs/demo-t5.yaml", f"data.source={tmp_path}/missing.jsonl", f"run.dir={tmp_path}/r"),
        ("data", "prepare", "configs/demo-t5.yaml", "stray-argument"),
    ]
    for args in cases:
        out = termtune(*args)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("termtune: error: "), (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_debug_shows_the_traceback():
    out = termtune("--debug", "train", "configs/demo-t5.yaml", "train.lr=1")
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "UserError" in out.stderr


def test_strict_flag(tmp_path):
    src = tmp_path / "t.jsonl"
    rows = medquad_rows(10)
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"term": "", "definition": "x"}\n')
    out = termtune("data", "prepare", "configs/demo-t5.yaml", f"run.dir={tmp_path}/r", f"data.source={src}", "--strict")
    assert out.returncode == 2
    assert f"{src}:11: term is empty or whitespace only" in out.stderr
    assert not (tmp_path / "r" / "data").exists()
