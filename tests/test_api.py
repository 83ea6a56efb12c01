"""The Python API (termtune.api, exported by the package): the whole path from Python, through the
same runner as the CLI; the CLI calls these functions; docs/api.md matches the docstrings."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys

import pytest

from conftest import REPO, medquad_rows, tiny_overrides, write_jsonl

import termtune as tt

STAGE_MODULES = ("train", "evaluate", "export", "validate")  # module names that are also API functions


def test_import_termtune_stays_light():
    code = ("import sys, termtune; termtune.load_config; "
            "heavy = [m for m in ('torch', 'transformers', 'boto3', 'termtune.pipeline') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(REPO / "src")})


def test_api_names_stay_functions_after_their_stage_modules_are_imported():
    for name in STAGE_MODULES:
        importlib.import_module(f"termtune.{name}")  # binds the submodule on the package, normally
        assert getattr(tt, name) is getattr(importlib.import_module("termtune.api"), name)
    namespace: dict = {}
    exec("from termtune import train", namespace)  # what a user writes
    assert namespace["train"].__module__ == "termtune.api"
    assert set(tt.API) <= set(dir(tt))


def test_no_code_reaches_a_stage_module_through_the_package():
    """`from termtune import train` is the API function; stage modules are imported by their full name."""
    offenders = []
    for path in [*REPO.glob("src/**/*.py"), *REPO.glob("tests/*.py"), *REPO.glob("benchmarks/*.py"),
                 *REPO.glob("scripts/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "termtune" and node.level == 0:
                offenders += [f"{path}:{node.lineno}" for a in node.names if a.name in STAGE_MODULES]
            elif isinstance(node, ast.Import):
                offenders += [f"{path}:{node.lineno}" for a in node.names
                              if a.name.split(".")[:2] in [["termtune", m] for m in STAGE_MODULES]]
    assert not offenders, "import these as `from termtune.<module> import <name>`: " + ", ".join(offenders)


def test_load_config_takes_dotted_keys_sections_or_command_line_strings(tmp_path):
    dotted = tt.load_config("configs/demo-t5.yaml", {"train.epochs": 1, "run.dir": tmp_path / "run",
                                                  "lora.target_modules": ["q", "v"]})
    sections = tt.load_config("configs/demo-t5.yaml", train={"epochs": 1}, run={"dir": str(tmp_path / "run")},
                              lora={"target_modules": ["q", "v"]})
    strings = tt.load_config("configs/demo-t5.yaml", ["train.epochs=1", f"run.dir={tmp_path / 'run'}",
                                                   "lora.target_modules=[q, v]"])
    assert dotted == sections == strings
    assert dotted.train.epochs == 1 and dotted.run_dir == tmp_path / "run"
    both = tt.load_config(None, {"train.epochs": 3}, lora={"r": 4})
    assert (both.train.epochs, both.lora.r) == (3, 4)
    from termtune.errors import UserError

    with pytest.raises(UserError, match="unknown key train.epoch .*did you mean train.epochs"):
        tt.load_config(None, {"train.epoch": 1})
    with pytest.raises(TypeError):
        tt.load_config(None, "train.epochs=1")


def test_docs_api_md_is_generated_from_the_docstrings():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from api_reference import OUT, render
    finally:
        sys.path.pop(0)
    assert OUT.read_text(encoding="utf-8") == render(), "docs/api.md is stale: run python scripts/api_reference.py"
    for name in tt.API:
        assert f"### `{name}`" in OUT.read_text(encoding="utf-8")


def test_every_stage_command_calls_its_api_function(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from termtune import api
    from termtune.cli import app
    from termtune.results import StageResult

    calls = []

    class Fake(StageResult):
        checks: list = []
        failed = False
        stats: dict = {}

        def summary(self):
            return f"api result of {calls[-1][0]}"

    for name in ("prepare_data", "inspect_data", "train", "evaluate", "export", "validate", "deploy", "invoke",
                 "cleanup", "run"):
        monkeypatch.setattr(api, name, lambda *a, _name=name, **k: calls.append((_name, a, k)) or Fake())
    commands = {"prepare_data": ["data", "prepare"], "inspect_data": ["data", "inspect"], "cleanup": ["cleanup", "-y"]}
    for name in ("prepare_data", "inspect_data", "train", "evaluate", "export", "deploy", "invoke", "cleanup", "run"):
        result = CliRunner().invoke(app, [*commands.get(name, [name]), f"run.dir={tmp_path}"])
        assert result.exit_code == 0, result.output
        assert calls[-1][0] == name and calls[-1][1][0].run_dir == tmp_path
        if name not in ("invoke", "cleanup", "run"):  # those print as they go
            assert f"api result of {name}" in result.output
    assert CliRunner().invoke(app, ["validate", str(tmp_path)]).exit_code == 0
    assert calls[-1][:2] == ("validate", (tmp_path,))


def test_the_whole_path_from_python(tmp_path, capfd):
    from termtune.aws.stage import DeployResult
    from termtune.data import PreparedData
    from termtune.evaluate import EvalReport
    from termtune.export import Artifact
    from termtune.local import local_aws
    from termtune.train import TrainResult
    from termtune.validate import Validation

    data = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(48))
    cfg = tt.load_config("configs/demo-t5.yaml", [*tiny_overrides(tmp_path / "run", data), "aws.bucket=termtune-api",
                                               "aws.poll_seconds=0.2"])
    prepared = tt.prepare_data(cfg)
    assert isinstance(prepared, PreparedData) and not prepared.up_to_date
    assert prepared.stats["train_rows"] + prepared.stats["test_rows"] == 48
    assert "split: 40 train / 8 test" in repr(prepared)  # the lines `termtune data prepare` prints
    preview = tt.inspect_data(cfg, rows=2)
    assert len(preview.examples) == 2 and preview.examples[0]["prompt"].startswith("What is ")
    trained = tt.train(cfg)
    assert isinstance(trained, TrainResult) and trained.global_step == 5 and trained.train_loss > 0
    report = tt.evaluate(cfg)
    assert isinstance(report, EvalReport) and report.metrics["n"] == 8
    html = report._repr_html_()
    assert "<table>" in html and "ROUGE-L" in html and report.answers(1)[0]["term"] in html
    artifact = tt.export(cfg)
    assert isinstance(artifact, Artifact) and (artifact.path / "manifest.json").is_file()
    checks = tt.validate(cfg)
    assert isinstance(checks, Validation) and not checks.failed and "✓" in checks._repr_html_()
    by_folder = tt.validate(artifact.path)  # any folder, the CLI's `validate DIR`: then a load under 4.51.3
    assert [c.as_dict() for c in by_folder.checks[:-1]] == [c.as_dict() for c in checks.checks]
    assert by_folder.checks[-1].name == "loads and generates under transformers 4.51.3" and not by_folder.failed
    assert tt.validate(tmp_path).failed

    # Up to date: skipped by the runner, the same figures read back from the run directory.
    again = tt.train(cfg)
    assert again.up_to_date and again.train_loss == trained.train_loss and "up to date" in repr(again)
    assert tt.export(cfg).digest == artifact.digest

    with local_aws(bucket="termtune-api") as aws:
        deployed = tt.deploy(cfg)
        assert isinstance(deployed, DeployResult) and deployed.model_arn.startswith("arn:aws:bedrock:")
        assert not deployed.up_to_date and "uploaded 8 files" in repr(deployed)
        answer = tt.invoke(cfg, term="Hypertension")
        assert answer.prompt == "What is Hypertension?" and answer.model_arn == deployed.model_arn
        assert json.loads((cfg.run_dir / "invoke.json").read_text())["text"] == answer.text
        removed = tt.cleanup(cfg, yes=True)
        assert any("deleted imported model" in line for line in removed.deleted)

    resent = DeployResult("s3://b/p/", "m", "j", skipped=["config.json"])  # its own `skipped`: files already there
    assert not resent.up_to_date

    everything = tt.run(cfg.model_copy(update={"aws": cfg.aws.model_copy(update={"deploy": False})}))
    assert list(everything.results) == ["data", "train", "evaluate", "export", "validate"]
    assert everything["train"].up_to_date and everything["train"].global_step == trained.global_step
    assert everything["evaluate"].metrics == report.metrics
    assert not everything["validate"].failed
