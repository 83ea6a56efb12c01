"""<run>/sagemaker/jobs.json: every SageMaker training job a run submitted, newest last.

An entry is written before its job is created (status "creating", the request) and updated as the job goes:
its ARN as soon as SageMaker answers, then its status, output, billable seconds, cost or failure reason.
termtune train, termtune jobs and termtune deploy read it; nothing else writes it.
"""

from __future__ import annotations

import time
from typing import Any

from termtune.config import Config
from termtune.errors import UserError
from termtune.layout import RunLayout
from termtune.rundir import read_json, write_json


def read_jobs(cfg: Config) -> list[dict[str, Any]]:
    jobs = read_json(RunLayout.of(cfg).jobs, {}).get("jobs", [])
    return [j for j in jobs if isinstance(j, dict) and isinstance(j.get("job_name"), str)]


def save(cfg: Config, job: dict[str, Any]) -> None:
    """Replace (or add) `job` in jobs.json by name, atomically."""
    job["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    jobs = [j for j in read_jobs(cfg) if j["job_name"] != job["job_name"]] + [job]
    write_json(RunLayout.of(cfg).jobs, {"jobs": jobs})


def current_job(cfg: Config, fingerprint: str) -> dict[str, Any] | None:
    """The newest job made with this train-stage fingerprint (the data, model, lora and train settings, the
    instances and image), or None."""
    return next((j for j in reversed(read_jobs(cfg)) if j.get("fingerprint") == fingerprint), None)


def completed_job(cfg: Config) -> dict[str, Any] | None:
    """The Completed, verified job the train stage's record names (the runner has checked that record against
    the current settings before deploy runs), or None."""
    recorded = read_json(RunLayout.of(cfg).record("train"), {}).get("result", {}).get("sagemaker_job") or {}
    job = next((j for j in read_jobs(cfg) if j["job_name"] == recorded.get("job_name")), None)
    return job if job and job.get("status") == "Completed" and job.get("artifact_uri") else None


def job_named(cfg: Config, name: str | None) -> dict[str, Any]:
    """A recorded job by name (None: the newest); UserError when there is none."""
    jobs = read_jobs(cfg)
    if not jobs:
        raise UserError(f"{RunLayout.of(cfg).jobs}: this run has submitted no SageMaker training job; "
                        "run termtune train --on sagemaker first")
    if name is None:
        return jobs[-1]
    for job in jobs:
        if job["job_name"] == name:
            return job
    raise UserError(f"--job {name}: not a job of this run (its jobs: {', '.join(j['job_name'] for j in jobs)})")
