"""Nothing a user made is lost: termtune writes only into its own run directories, replaces only its
own files, checks before it replaces, and puts the old result back when a replacement fails.

Real runs on the tiny model: one complete offline run is made for the module, each test works on a copy.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, medquad_rows, tiny_overrides, write_jsonl
from typer.testing import CliRunner

from termtune.cli import app


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "termtune.cli", *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=900)


def args_for(run_dir: Path, source: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(run_dir, source), "aws.deploy=false", *extra]


def error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr
    return out.stderr.strip().splitlines()[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its content; not the lock and the log every command writes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (".termtune.lock", "library.log")}


def attempts(run_dir: Path) -> list[dict]:
    """The run history: the results re-runs replaced."""
    path = run_dir / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("owned")
    source = write_jsonl(root / "terms.jsonl", medquad_rows(48))
    run_dir = root / "run"
    done = run_cli("run", *args_for(run_dir, source))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir, source


@pytest.fixture
def run_copy(complete_run, tmp_path):
    run_dir, source = complete_run
    shutil.copytree(run_dir, tmp_path / "run", symlinks=True)
    return tmp_path / "run", source


# ----------------------------------------------------------------------------- whose folder


def test_a_folder_that_is_not_a_termtune_run_is_refused_and_left_as_it_was(tmp_path):
    proj = tmp_path / "proj"
    for name, text in {"data/NOTES.txt": "mine", "eval/my_eval.py": "print(1)", "train/train.py": "print(2)"}.items():
        (proj / name).parent.mkdir(parents=True, exist_ok=True)
        (proj / name).write_text(text)
    source = write_jsonl(proj / "data" / "my_terms.jsonl", medquad_rows(48))
    before = snapshot(proj)

    out = run_cli("run", *args_for(proj, source))
    assert error_line(out) == (
        f"termtune: error: {proj}: not a termtune run directory (it holds data/, eval/, train/, and no "
        "termtune-run.json); termtune writes only into a new or empty folder or one of its own runs: "
        "choose another run.dir, or move those files out")
    assert snapshot(proj) == before
    assert sorted(p.name for p in proj.iterdir()) == ["data", "eval", "train"]  # not even a lock file


def test_a_new_run_is_marked_and_an_older_run_without_the_marker_is_adopted(run_copy):
    run_dir, source = run_copy
    marker = json.loads((run_dir / "termtune-run.json").read_text())
    assert marker["format"] == "termtune-run/1" and len(marker["id"]) == 12

    (run_dir / "termtune-run.json").unlink()  # as an older termtune left it: provenance records, no marker
    again = run_cli("run", *args_for(run_dir, source))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("up to date") == 4
    assert json.loads((run_dir / "termtune-run.json").read_text())["format"] == "termtune-run/1"


# ----------------------------------------------------------------------------- whose files


def test_a_user_file_in_a_stage_folder_stops_the_rerun_naming_it(run_copy):
    run_dir, source = run_copy
    (run_dir / "train" / "train.py").write_text("my script")
    (run_dir / "data" / "NOTES.txt").write_text("my notes")
    before = snapshot(run_dir)

    out = run_cli("run", *args_for(run_dir, source, "data.max_rows=40"))
    assert error_line(out) == (
        f"termtune: error: {run_dir / 'data'}: holds NOTES.txt, which termtune did not write; data replaces "
        "data/ when it runs again: move it out of the run directory first")
    assert snapshot(run_dir) == before

    (run_dir / "data" / "NOTES.txt").unlink()
    out = run_cli("train", *args_for(run_dir, source, "lora.r=4"))
    assert error_line(out) == (
        f"termtune: error: {run_dir / 'train'}: holds train.py, which termtune did not write; train replaces "
        "train/ when it runs again: move it out of the run directory first")
    assert (run_dir / "train" / "train.py").read_text() == "my script"


def test_a_data_source_kept_in_the_data_folder_is_never_deleted(run_copy):
    run_dir, _ = run_copy
    source = write_jsonl(run_dir / "data" / "my_terms.jsonl", medquad_rows(48, seed=3))
    out = run_cli("run", *args_for(run_dir, source))  # new content: data must run again
    assert "my_terms.jsonl, which termtune did not write" in error_line(out)
    assert source.is_file() and len(source.read_text().splitlines()) == 48


# ----------------------------------------------------------------------------- check first, then replace


def test_a_refused_setting_leaves_every_output_in_place(run_copy):
    run_dir, source = run_copy
    before = snapshot(run_dir)
    out = run_cli("train", *args_for(run_dir, source, "lora.r=100000"))
    assert error_line(out).startswith("termtune: error: lora.r=100000 is larger than the targeted layers allow")
    after = snapshot(run_dir)
    assert {k for k in before if k.startswith(("train/", "base-model/", "provenance/"))} <= set(after)
    assert after["provenance/train.json"] == before["provenance/train.json"]
    assert after["train/adapter/adapter_model.safetensors"] == before["train/adapter/adapter_model.safetensors"]
    assert attempts(run_dir) == []


def test_a_refused_export_force_keeps_the_validation_and_its_record(run_copy, tmp_path):
    run_dir, source = run_copy
    foreign = tmp_path / "elsewhere"
    foreign.mkdir()
    (foreign / "thesis.pdf").write_text("mine")
    before = snapshot(run_dir)
    out = run_cli("export", "--force", *args_for(run_dir, source, f"export.dir={foreign}"))
    assert "is not a termtune artifact" in error_line(out)
    after = snapshot(run_dir)
    for kept in ("validation.json", "provenance/export.json", "artifact/manifest.json"):
        assert after[kept] == before[kept], kept
    assert attempts(run_dir) == []  # nothing was replaced
    assert (foreign / "thesis.pdf").read_text() == "mine"


def test_a_stage_that_fails_part_way_puts_the_old_result_back(run_copy, monkeypatch):
    from termtune import pipeline
    from termtune.config import load_config

    run_dir, source = run_copy
    before = snapshot(run_dir)

    def fails_after_writing(cfg):
        (run_dir / "eval").mkdir()
        (run_dir / "eval" / "metrics.json").write_text("{partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(importlib.import_module("termtune.evaluate"), "evaluate", fails_after_writing)
    cfg = load_config(None, args_for(run_dir, source, "eval.max_new_tokens=8"))
    with pytest.raises(OSError):
        pipeline.run_stage(cfg, "evaluate")
    after = snapshot(run_dir)
    for path in ("eval/metrics.json", "eval/predictions.jsonl", "provenance/evaluate.json"):
        assert after[path] == before[path], path
    assert not [name for name in after if ".replaced" in name]
    assert attempts(run_dir) == []


def test_a_history_that_is_not_json_stops_the_rerun_instead_of_being_replaced(run_copy):
    """history.json lists imports earlier attempts left live (cleanup deletes them from it): a hand edit that
    broke it is an error naming it, not an empty history that the re-run would write over."""
    from termtune import pipeline
    from termtune.config import load_config
    from termtune.errors import UserError

    run_dir, source = run_copy
    edited = json.dumps([{"stage": "deploy", "live": True, "deploy": {"model_arn": "arn:earlier"}}])[:-1] + ",]"
    (run_dir / "history.json").write_text(edited)
    before = snapshot(run_dir)
    cfg = load_config(None, args_for(run_dir, source, "eval.max_new_tokens=8"))
    with pytest.raises(UserError, match=r"history\.json: not valid JSON \(Expecting value at line 1 column \d+\)$"):
        pipeline.run_stage(cfg, "evaluate")
    assert snapshot(run_dir) == before


def test_a_failed_redeploy_keeps_what_it_recorded_of_the_new_import(run_copy, monkeypatch):
    """deploy.json tracks what a deploy created in AWS: never put an old one back over it (cleanup needs it)."""
    from termtune import aws, pipeline
    from termtune.config import load_config

    run_dir, source = run_copy
    (run_dir / "deploy.json").write_text(json.dumps({"model_arn": "arn:old"}))
    (run_dir / "provenance" / "deploy.json").write_text(json.dumps(
        {"stage": "deploy", "fingerprint": "made-with-other-settings", "finished_at": "2026-01-01T00:00:00"}))

    def fails_after_importing(cfg):
        (run_dir / "deploy.json").write_text(json.dumps({"job_arn": "arn:new-job"}))
        raise RuntimeError("killed mid-import")

    monkeypatch.setattr(aws, "deploy", fails_after_importing)
    with pytest.raises(RuntimeError):
        pipeline.run_stage(load_config(None, args_for(run_dir, source)), "deploy")
    assert json.loads((run_dir / "deploy.json").read_text()) == {"job_arn": "arn:new-job"}
    assert [(a["stage"], a["deploy"], a["live"]) for a in attempts(run_dir)] == \
           [("deploy", {"model_arn": "arn:old"}, True)]  # the old import stays listed, for cleanup
    assert not (run_dir / "provenance" / "deploy.json").exists()


def test_a_rerun_killed_part_way_leaves_the_old_result_for_the_next_command(run_copy):
    run_dir, source = run_copy
    adapter = (run_dir / "train" / "adapter" / "adapter_model.safetensors").read_bytes()
    record = (run_dir / "provenance" / "train.json").read_bytes()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TERMTUNE_TEST_STEP_DELAY": "1"}
    killed = subprocess.Popen([sys.executable, "-m", "termtune.cli", "train", *args_for(run_dir, source, "lora.r=4")],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not ((run_dir / ".train.replaced").is_dir() and (run_dir / "train" / "metrics.jsonl").is_file()):
        # the old result is set aside and the new training is under way
        assert time.time() < deadline and killed.poll() is None, killed.communicate()
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)

    again = run_cli("train", *args_for(run_dir, source))  # the old settings: the old result is complete again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train: up to date" in again.stdout
    assert (run_dir / "train" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert (run_dir / "provenance" / "train.json").read_bytes() == record
    assert not [p for p in run_dir.rglob("*.replaced")]


# ----------------------------------------------------------------------------- the lock and the log


def test_a_link_named_like_the_lock_is_refused_and_its_target_untouched(tmp_path):
    source = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(24))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    (run_dir / ".termtune.lock").symlink_to(victim)
    out = run_cli("data", "prepare", *args_for(run_dir, source))
    assert error_line(out) == (f"termtune: error: {run_dir / '.termtune.lock'}: is a symbolic link; termtune writes "
                               "this file itself and never through a link: remove the link")
    assert victim.read_text() == "keep me"
    assert not (run_dir / "data").exists()


# ----------------------------------------------------------------------------- report


def test_report_on_a_run_dir_that_does_not_exist_creates_nothing(tmp_path):
    missing = tmp_path / "mistyped"
    result = CliRunner().invoke(app, ["report", f"run.dir={missing}"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == f"termtune: error: {missing}: no such run directory; check run.dir"
    assert not missing.exists()

    (tmp_path / "notes").mkdir()
    result = CliRunner().invoke(app, ["report", f"run.dir={tmp_path / 'notes'}"])
    assert result.exit_code == 2 and "not a termtune run directory (it is empty" in result.output
    assert list((tmp_path / "notes").iterdir()) == []


def test_report_takes_the_lock(run_copy):
    from termtune.rundir import exclusive

    run_dir, source = run_copy
    report = (run_dir / "report.html").read_bytes()
    with exclusive(run_dir / ".termtune.lock", command="termtune train"):
        result = CliRunner().invoke(app, ["report", *args_for(run_dir, source)])
    assert result.exit_code == 2, result.output
    assert f"{run_dir}: in use by another termtune process (pid {os.getpid()}, `termtune train`" in result.output
    assert (run_dir / "report.html").read_bytes() == report

    result = CliRunner().invoke(app, ["report", *args_for(run_dir, source)])
    assert result.exit_code == 0, result.output
