"""`termtune run`: every stage in order, skipping the ones whose outputs are complete.

    data -> train -> evaluate -> export -> validate -> deploy -> invoke

Each stage writes its outputs atomically and its "complete" marker last, so after a crash
the same command continues at the first stage that did not finish (training itself resumes
from its last checkpoint).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import typer

from termtune.config import Config
from termtune.errors import UserError


def _data(cfg: Config) -> None:
    from termtune import data

    typer.echo(data.summary(data.prepare(cfg).stats))


def _train(cfg: Config) -> None:
    from termtune import train

    typer.echo(train.train(cfg).summary())


def _evaluate(cfg: Config) -> None:
    from termtune import evaluate

    typer.echo(evaluate.evaluate(cfg).summary())


def _export(cfg: Config) -> None:
    from termtune import export

    typer.echo(export.export(cfg).summary())


def _validate(cfg: Config) -> None:
    from termtune import validate

    checks = validate.validate(cfg.artifact_dir)
    typer.echo(validate.format_checks(checks))
    if any(c.failed for c in checks):
        raise UserError(f"{cfg.artifact_dir}: the artifact fails the Bedrock preflight (see the checks above)")


def _deploy(cfg: Config) -> None:
    from termtune import aws

    typer.echo(aws.deploy(cfg).summary())


def _invoke(cfg: Config) -> None:
    from termtune import aws

    aws.invoke_cli(cfg, term=cfg.aws.invoke_prompt, raw=None, model_arn=None, stream=False, as_json=False)


def _deployed(cfg: Config) -> bool:
    import json

    path = cfg.run_dir / "deploy.json"
    if not path.is_file():
        return False
    record = json.loads(path.read_text(encoding="utf-8"))
    return record.get("status") == "Completed" and bool(record.get("model_arn"))


# (name, "already complete?" check, the stage). Checks look at each stage's last-written file.
STAGES: list[tuple[str, Callable[[Config], bool], Callable[[Config], None]]] = [
    ("data", lambda c: (c.run_dir / "data" / "train.jsonl").is_file(), _data),
    ("train", lambda c: (c.run_dir / "train" / "result.json").is_file(), _train),
    ("evaluate", lambda c: (c.run_dir / "eval" / "metrics.json").is_file(), _evaluate),
    ("export", lambda c: (c.artifact_dir / "manifest.json").is_file(), _export),
    ("validate", lambda c: False, _validate),  # cheap, and its ✓/✗ list is worth seeing every time
    ("deploy", _deployed, _deploy),
    ("invoke", lambda c: False, _invoke),
]


def _preflight(cfg: Config) -> None:
    """Settings that would fail a later stage (the model's shape, an unwritable run directory) fail now."""
    from termtune.modeling import check_model_settings
    from termtune.oserrors import probe_writable

    probe_writable(cfg.run_dir)
    check_model_settings(cfg)


def run(cfg: Config) -> None:
    """Run the whole path for `cfg`; deploy and invoke only when aws.deploy is true."""
    stages = STAGES if cfg.aws.deploy else [s for s in STAGES if s[0] not in ("deploy", "invoke")]
    started = time.perf_counter()
    _preflight(cfg)
    for name, is_complete, stage in stages:
        if is_complete(cfg):
            typer.secho(f"== {name}: complete in {cfg.run_dir}, skipped", fg="green")
            continue
        typer.secho(f"== {name}", bold=True)
        t0 = time.perf_counter()
        stage(cfg)
        typer.echo(f"   ({name} took {time.perf_counter() - t0:.1f}s)")
    report = Path(cfg.run_dir) / "report.html"
    typer.secho(f"== done in {time.perf_counter() - started:.0f}s; report: {report}", fg="green", bold=True)
