"""`termtune run` and the stage commands: outputs are reused only while they match the config.

Real processes on a tiny model: a complete run is made once, then each test works on a copy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aws_fixtures import artifact_template, aws_env, boto, bucket, moto_server, moto_url  # noqa: F401
from conftest import REPO, medquad_rows, tiny_overrides, write_jsonl

OFFLINE = ("data", "train", "evaluate", "export")


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "termtune.cli", *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=900)


def start_cli(*args: str, **env: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "termtune.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def args_for(run_dir: Path, source: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(run_dir, source), "aws.deploy=false", *extra]


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    """(run dir, data source) of one complete offline run, made once for this module."""
    root = tmp_path_factory.mktemp("complete")
    source = write_jsonl(root / "terms.jsonl", medquad_rows(48))
    run_dir = root / "run"
    first = run_cli("run", *args_for(run_dir, source))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return run_dir, source


@pytest.fixture
def run_copy(complete_run, tmp_path):
    """A private copy of the complete run (its records hold no absolute paths that matter)."""
    run_dir, source = complete_run
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run", source


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "history.json").read_text())


# ----------------------------------------------------------------------------- skip / re-run


def test_complete_run_has_every_output_and_reruns_nothing(run_copy):
    run_dir, source = run_copy
    for path in ("data/stats.json", "data/train.jsonl", "train/result.json", "train/adapter/adapter_config.json",
                 "eval/metrics.json", "artifact/manifest.json", "artifact/model.safetensors", "report.html",
                 "report.md", "model-card.md", "config.yaml", *(f"provenance/{s}.json" for s in OFFLINE)):
        assert (run_dir / path).is_file(), path
    record = json.loads((run_dir / "provenance" / "train.json").read_text())
    assert record["inputs"]["keys"]["lora.r"] == 8 and record["inputs"]["upstream"]["data"]
    assert record["git_commit"] is None or len(record["git_commit"]) >= 40

    again = run_cli("run", *args_for(run_dir, source))
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in OFFLINE:
        assert f"{stage}: up to date in {run_dir} (same settings and inputs), skipped" in again.stdout, stage
    assert "== validate\n" in again.stdout and "OK: " in again.stdout
    assert not (run_dir / "history.json").exists()


def test_changed_lora_rank_reruns_train_evaluate_export_and_keeps_the_old_result(run_copy):
    run_dir, source = run_copy
    manifest_before = (run_dir / "artifact" / "manifest.json").read_text()
    done = run_cli("run", *args_for(run_dir, source, "lora.r=4", "train.learning_rate=0.0001"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "data: up to date" in out
    assert "train: re-running: lora.r 8 → 4, train.learning_rate 0.005 → 0.0001" in out
    assert "evaluate: re-running: train changed" in out and "export: re-running: train changed" in out

    assert json.loads((run_dir / "train" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert (run_dir / "artifact" / "manifest.json").read_text() != manifest_before
    attempts = history(run_dir)
    assert [a["stage"] for a in attempts] == ["train", "evaluate", "export"]
    assert attempts[0]["settings"]["lora.r"] == 8 and attempts[0]["result"]["result"]["eval_loss"] is not None
    assert attempts[2]["result"]["artifact_sha256"]
    assert "Attempts: results that re-runs replaced" in (run_dir / "report.html").read_text()


def test_changed_eval_setting_reruns_only_evaluate(run_copy):
    run_dir, source = run_copy
    stamps = {p: (run_dir / p).stat().st_mtime_ns for p in ("train/result.json", "artifact/manifest.json")}
    done = run_cli("run", *args_for(run_dir, source, "eval.max_new_tokens=8"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "evaluate: re-running: eval.max_new_tokens 16 → 8" in done.stdout
    for stage in ("data", "train", "export"):
        assert f"{stage}: up to date" in done.stdout
    assert {p: (run_dir / p).stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((run_dir / "eval" / "metrics.json").read_text())["decoding"]["max_new_tokens"] == 8


def test_edited_source_reruns_data_and_everything_after_it(run_copy, tmp_path):
    run_dir, source = run_copy
    copy = tmp_path / "moved-terms.jsonl"
    shutil.copy(source, copy)
    moved = run_cli("run", *args_for(run_dir, copy))  # the same content under another name: nothing to do
    assert moved.returncode == 0 and moved.stdout.count("up to date") == 4, moved.stdout

    rows = [json.loads(line) for line in copy.read_text().splitlines()]
    rows[0]["definition"] = "An edited definition that did not exist before. " + rows[0]["definition"]
    write_jsonl(copy, rows)
    done = run_cli("run", *args_for(run_dir, copy))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data: re-running: data.source content changed" in done.stdout
    for stage in ("train", "evaluate", "export"):
        assert f"{stage}: re-running: data changed" in done.stdout or f"{stage}: re-running: train changed" \
            in done.stdout, stage
    assert "An edited definition" in (run_dir / "data" / "train.jsonl").read_text() + \
        (run_dir / "data" / "test.jsonl").read_text()


def test_data_shaped_by_an_older_rule_is_shaped_again(run_copy, monkeypatch):
    from termtune import api, data, pipeline
    from termtune.layout import RunLayout

    run_dir, source = run_copy
    cfg = api.load_config(None, args_for(run_dir, source))
    assert pipeline.state(cfg, pipeline.BY_NAME["data"]).complete
    monkeypatch.setattr(data, "TARGET_SHAPING", data.TARGET_SHAPING + 1)
    stale = pipeline.state(cfg, pipeline.BY_NAME["data"])
    assert not stale.complete
    assert stale.reasons == [f"target shaping {data.TARGET_SHAPING - 1} → {data.TARGET_SHAPING}"]
    # A run prepared before the rule had a version says so, rather than "null".
    record_file = RunLayout.of(cfg).record("data")
    record = json.loads(record_file.read_text())
    del record["inputs"]["sources"]["target shaping"]
    record_file.write_text(json.dumps(record))
    unversioned = pipeline.state(cfg, pipeline.BY_NAME["data"])
    assert unversioned.reasons == [f"target shaping (unset) → {data.TARGET_SHAPING}"]


def test_stage_command_refuses_outputs_made_with_other_settings(run_copy):
    run_dir, source = run_copy
    shutil.rmtree(run_dir / "artifact")
    done = run_cli("export", *args_for(run_dir, source, "train.learning_rate=0.0001"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "termtune: error: export: refusing to use train outputs made with other settings "
        "(train.learning_rate 0.005 → 0.0001); run `termtune run` with this config to redo train and what "
        "depends on it"]
    assert not (run_dir / "artifact").exists()

    # the same stage with the recorded settings is simply up to date... once its output is back
    redo = run_cli("export", *args_for(run_dir, source))
    assert redo.returncode == 0 and "export: re-running: " in redo.stdout and "is missing" in redo.stdout
    assert (run_dir / "artifact" / "manifest.json").is_file()


def test_a_deleted_or_swapped_adapter_is_trained_again_never_exported(run_copy):
    import torch
    from safetensors.torch import load_file, save_file

    run_dir, source = run_copy
    args = args_for(run_dir, source)
    weights = run_dir / "train" / "adapter" / "adapter_model.safetensors"

    # Deleted: the stage is not complete, so `termtune train` trains it again (it used to say "up to date").
    shutil.rmtree(weights.parent)
    again = run_cli("train", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"train: re-running: {weights} is missing" in again.stdout
    assert weights.is_file()

    # Swapped for another adapter: export refuses it in one line, and `train --force` trains the run's own again.
    save_file({name: t + 0.01 * torch.ones_like(t) for name, t in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    refused = run_cli("export", "--force", *args)
    assert refused.returncode == 2
    error = refused.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"termtune: error: {weights.parent} does not match the adapter "
                                                   "train recorded (sha256 ")
    assert error[0].endswith("re-run `termtune train --force`")
    forced = run_cli("train", "--force", *args)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "train: re-running: --force" in forced.stdout
    record = json.loads((run_dir / "provenance" / "train.json").read_text())
    from termtune.train import adapter_digest

    assert record["result"]["result"]["adapter_sha256"] == adapter_digest(weights.parent)
    exported = run_cli("export", "--force", *args)
    assert exported.returncode == 0, exported.stderr[-3000:]


# ----------------------------------------------------------------------------- one writer


def wait_for_lock(run_dir: Path, proc: subprocess.Popen) -> dict:
    lock = run_dir / ".termtune.lock"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if lock.is_file() and lock.read_text().strip():
            holder = json.loads(lock.read_text())
            if holder["pid"] == proc.pid:
                return holder
        time.sleep(0.05)
    raise AssertionError("the first process never took the lock")


def test_second_writer_fails_at_once_and_a_killed_holder_never_blocks(tmp_path):
    source = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(48))
    run_dir = tmp_path / "run"
    args = args_for(run_dir, source)
    assert run_cli("data", "prepare", *args).returncode == 0

    first = start_cli("train", *args, TERMTUNE_TEST_STEP_DELAY="0.5")
    holder = wait_for_lock(run_dir, first)
    assert holder["command"] == "termtune train"
    t0 = time.time()
    second = run_cli("train", *args)
    assert second.returncode == 2 and time.time() - t0 < 30
    line = second.stderr.strip()
    assert f"{run_dir}: in use by another termtune process (pid {first.pid}, `termtune train`, since " in line
    assert len(line.splitlines()) == 1
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert "trained " in out

    # A holder killed with SIGKILL leaves the lock file behind, but not the lock.
    killed = start_cli("train", *args, "train.learning_rate=0.0001", TERMTUNE_TEST_STEP_DELAY="0.5")
    wait_for_lock(run_dir, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    after = run_cli("train", *args, "train.learning_rate=0.0001")
    assert after.returncode == 0, after.stderr[-3000:]
    assert "trained " in after.stdout


# ----------------------------------------------------------------------------- deploy, re-deploy, cleanup


def test_redeploy_of_a_changed_model_imports_a_new_model_and_cleanup_deletes_both(
        tmp_path, aws_env, bucket, capfd):  # noqa: F811
    """The whole path in one process against moto and termtune serve: the text Bedrock's stand-in
    generates equals the trained PEFT model's own greedy generation; a model deleted elsewhere is
    imported again; a changed training setting imports a second model under a new name; cleanup
    deletes both."""
    import torch
    from peft import PeftModel

    from termtune import modeling, pipeline
    from termtune.config import load_config

    server = aws_env()
    src = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(48))
    overrides = [*tiny_overrides(tmp_path / "run", src), f"aws.bucket={bucket}", "aws.role_name=tt-pipeline-role",
                 "aws.poll_seconds=0.1", "aws.invoke_max_tokens=12", "aws.invoke_prompt=Asthma"]
    cfg = load_config(None, overrides)
    pipeline.run(cfg)
    out = capfd.readouterr().out
    for stage in ("data", "train", "evaluate", "export", "validate", "deploy", "invoke"):
        assert f"== {stage}\n" in out, stage
    served = json.loads((cfg.run_dir / "invoke.json").read_text())
    assert served["prompt"] == "What is Asthma?" and served["text"].strip()

    tokenizer = modeling.load_tokenizer(cfg)
    trained = PeftModel.from_pretrained(modeling.load_base(cfg), cfg.run_dir / "train" / "adapter").eval()
    with torch.inference_mode():
        ids = trained.generate(**tokenizer("What is Asthma?", return_tensors="pt"), max_new_tokens=12,
                               do_sample=False, num_beams=1)
    assert served["text"] == tokenizer.decode(ids[0], skip_special_tokens=True)
    gone = json.loads((cfg.run_dir / "deploy.json").read_text())

    # Deleted elsewhere, the imported model is imported again: run asks Bedrock, not only deploy.json.
    boto("bedrock").delete_imported_model(modelIdentifier=gone["model_arn"])
    pipeline.run(cfg)
    out = capfd.readouterr().out
    assert (f"deploy: re-running: the imported model {gone['model_arn']} no longer exists in Bedrock" in out), out
    first = json.loads((cfg.run_dir / "deploy.json").read_text())
    assert first["model_arn"] != gone["model_arn"] and first["model_arn"] in server.state.models
    assert json.loads((cfg.run_dir / "invoke.json").read_text())["model_arn"] == first["model_arn"]

    # The single-stage command asks Bedrock as well, instead of answering "up to date" from deploy.json.
    boto("bedrock").delete_imported_model(modelIdentifier=first["model_arn"])
    pipeline.run_stage(cfg, "deploy")
    out = capfd.readouterr().out
    assert (f"deploy: re-running: the imported model {first['model_arn']} no longer exists in Bedrock" in out), out
    first = json.loads((cfg.run_dir / "deploy.json").read_text())
    assert first["model_arn"] in server.state.models

    changed = load_config(None, [*overrides, "train.learning_rate=0.02"])
    pipeline.run(changed)
    out = capfd.readouterr().out
    assert "deploy: re-running: export changed" in out
    second = json.loads((cfg.run_dir / "deploy.json").read_text())
    assert second["model_name"] != first["model_name"] and second["model_arn"] != first["model_arn"]
    assert len(server.state.models) == 2
    deployed = [a for a in history(cfg.run_dir) if a["stage"] == "deploy"]
    assert deployed[-1]["deploy"]["model_arn"] == first["model_arn"] and deployed[-1]["live"] is True

    pipeline.cleanup(changed, yes=True)
    assert not server.state.models
    assert not boto("s3").list_objects_v2(Bucket=bucket).get("Contents")
    assert history(cfg.run_dir)[-1]["live"] is False
    assert not (cfg.run_dir / "provenance" / "deploy.json").exists()  # deploy must run again
    for stage in ("data", "train", "evaluate", "export", "cleanup"):
        record = json.loads((cfg.run_dir / "provenance" / f"{stage}.json").read_text())
        assert record["versions"]["torch"], stage


def test_run_checks_model_settings_before_the_data_stage(tmp_path):
    src = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(48))
    run_dir = tmp_path / "run"
    out = run_cli("run", *tiny_overrides(run_dir, src), "aws.deploy=false", "lora.target_modules=[q, nope]")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "termtune: error: lora.target_modules: 'nope' matches no layer of the model "
        "(T5's linear layers: q, k, v, o, wi_0, wi_1, wo, or all-linear)")
    assert "== data" not in out.stdout and not (run_dir / "data").exists()
