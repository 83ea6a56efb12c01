"""`termtune run` end to end on a tiny model: every offline stage, then a rerun that skips them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, medquad_rows, tiny_overrides, write_jsonl


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "termtune.cli", *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=900)


def test_run_offline_stages_then_skip_them(tmp_path):
    src = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(48))
    run_dir = tmp_path / "run"
    args = ["run", *tiny_overrides(run_dir, src), "aws.deploy=false"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("data", "train", "evaluate", "export", "validate"):
        assert f"== {stage}\n" in first.stdout, stage
    for path in ("stats.json", "data/train.jsonl", "train/result.json", "train/adapter/adapter_config.json",
                 "eval/metrics.json", "artifact/manifest.json", "artifact/model.safetensors", "report.html",
                 "report.md", "config.yaml", "provenance/train.json"):
        assert (run_dir / path).is_file(), path
    assert not (run_dir / "deploy.json").exists()

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert {"base", "tuned"} <= set(metrics)
    report = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in report and "ROUGE" in report.upper()

    second = run_cli(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in ("data", "train", "evaluate", "export"):
        assert f"== {stage}: complete in {run_dir}, skipped" in second.stdout, stage
    assert "== validate\n" in second.stdout
