"""`termtune run` end to end on a tiny model: every offline stage, then a rerun that skips them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from aws_fixtures import artifact_template, aws_env, boto, bucket, moto_url  # noqa: F401
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


def test_run_deploys_and_the_served_model_is_the_trained_model(tmp_path, aws_env, bucket, capfd):  # noqa: F811
    """The whole path in one process against moto and termtune serve; then the text Bedrock's
    stand-in generates must equal the trained PEFT model's own greedy generation."""
    import torch
    from peft import PeftModel

    from termtune import aws, modeling, pipeline
    from termtune.config import load_config

    aws_env()
    src = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(48))
    cfg = load_config(None, [*tiny_overrides(tmp_path / "run", src), f"aws.bucket={bucket}",
                             "aws.role_name=tt-pipeline-role", "aws.poll_seconds=0.1", "aws.invoke_max_tokens=12",
                             "aws.invoke_prompt=Asthma"])
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

    aws.cleanup(cfg, yes=True)
    assert not boto("s3").list_objects_v2(Bucket=bucket).get("Contents")
    for stage in ("data", "train", "evaluate", "export", "deploy", "invoke", "cleanup"):
        record = json.loads((cfg.run_dir / "provenance" / f"{stage}.json").read_text())
        assert record["seed"] == cfg.run.seed and record["versions"]["torch"], stage


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
