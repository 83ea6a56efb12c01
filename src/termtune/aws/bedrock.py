"""The Bedrock control plane: preflight checks, the import job, waiting, deleting.

botocore has no waiter for import jobs and checks neither name patterns nor quotas, so
each is done here, before the call that would otherwise fail minutes later.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from termtune.aws.clients import error_code, error_message, retry_while_role_propagates
from termtune.aws.names import CMI_REGIONS, field_problem
from termtune.errors import UserError
from termtune.events import emit, interactive

NAME_HINT = "use lowercase letters, digits and single hyphens"


def check_request(region: str, fields: list[tuple[str, str, str]]) -> None:
    """Each (Bedrock field, value, the config key that set it) against the service's own
    patterns; one UserError that blames the key the user actually set."""
    if region not in CMI_REGIONS:
        raise UserError(f"aws.region: Custom Model Import is not available in {region}; "
                        f"use one of {', '.join(CMI_REGIONS)}")
    for field, value, key in fields:
        problem = field_problem(field, value)
        if problem:
            hint = f"; {NAME_HINT}" if field in ("jobName", "importedModelName") else ""
            raise UserError(f"{key}: {value!r} is not a valid Bedrock {field} "
                            f"({problem.split(': ', 1)[-1]}){hint}")


def find_model(bedrock: Any, name: str) -> dict | None:
    """The imported model with exactly this name, or None."""
    for page in bedrock.get_paginator("list_imported_models").paginate(nameContains=name):
        for summary in page.get("modelSummaries", []):
            if summary["modelName"] == name:
                return summary
    return None


def check_capacity(bedrock: Any, model_quota: int) -> None:
    """One import job may run at a time per region, and imported models are limited
    (3 per region by default); say so before CreateModelImportJob fails."""
    running = bedrock.list_model_import_jobs(statusEquals="InProgress").get("modelImportJobSummaries", [])
    if running:
        names = ", ".join(j["jobName"] for j in running)
        raise UserError(f"import job {names} is still InProgress and Bedrock runs one import at a time "
                        "per region; wait for it to finish, then re-run termtune deploy")
    models = [m for page in bedrock.get_paginator("list_imported_models").paginate()
              for m in page.get("modelSummaries", [])]
    if len(models) >= model_quota:
        names = ", ".join(m["modelName"] for m in models)
        raise UserError(f"{len(models)} imported models exist ({names}), the quota is {model_quota} "
                        "(aws.model_quota); delete one (termtune cleanup, or aws bedrock delete-imported-model) "
                        "or request a quota increase (Service Quotas code L-45B04988)")


def create_job(bedrock: Any, request: dict, role_retry_seconds: float, on_role_retry: Callable[[str], None],
               sleep: Callable[[float], None] = time.sleep) -> str:
    """CreateModelImportJob. With role_retry_seconds > 0 (only for a role termtune has just
    created), a ValidationException or AccessDeniedException whose message mentions the role
    is retried until then: IAM is eventually consistent, and AWS documents no exact wording
    for a role Bedrock cannot see yet. Each such message goes to `on_role_retry` verbatim.

    The same clientRequestToken goes with every attempt, so a retry after a lost response
    returns the first job instead of creating a second one.
    """
    try:
        return retry_while_role_propagates(lambda: bedrock.create_model_import_job(**request)["jobArn"], "Bedrock",
                                           ("ValidationException", "AccessDeniedException"), role_retry_seconds,
                                           sleep, on_role_retry)
    except Exception as e:
        code, message = error_code(e), error_message(e)
        if code == "ServiceQuotaExceededException":
            raise UserError(f"Bedrock refused the import: {message} (one import job at a time per "
                            "region; a limited number of imported models)") from e
        if code in ("ValidationException", "ConflictException", "AccessDeniedException",
                    "ResourceNotFoundException"):
            raise UserError(f"CreateModelImportJob failed: {code}: {message}") from e
        raise


def wait_for_job(bedrock: Any, job_arn: str, timeout_s: float, poll_s: float,
                 sleep: Callable[[float], None] = time.sleep,
                 then: str = "re-run termtune deploy later to keep waiting") -> dict:
    """Poll until Completed or Failed, showing the elapsed time; returns the job description.
    After timeout_s, one UserError that ends with `then` (what the user does next)."""
    start = last_line = time.monotonic()
    tty = interactive()
    delay = min(2.0, poll_s)  # small jobs finish in seconds; back off to poll_s for long ones
    last_status = None
    while True:
        job = bedrock.get_model_import_job(jobIdentifier=job_arn)
        status = job.get("status")
        elapsed = time.monotonic() - start
        line = (f"waiting for Bedrock to import {job.get('importedModelName') or job.get('jobName')}: {status}, "
                f"{_clock(elapsed)} so far (gives up after {_clock(timeout_s)}; an import takes minutes, up to an hour)")
        done = status in ("Completed", "Failed")
        if tty or done or status != last_status or time.monotonic() - last_line >= 30:  # a log: a line per ~30 s
            emit("progress_done" if done else "progress", line)
            last_line = time.monotonic()
        last_status = status
        if done:
            return job
        if elapsed > timeout_s:
            raise UserError(f"import job {job_arn} still {status} after {_clock(elapsed)} "
                            f"(aws.import_timeout_minutes); {then}")
        sleep(min(delay, max(0.5, timeout_s - elapsed)))
        delay = min(delay * 1.5, poll_s)


def delete_model(bedrock: Any, identifier: str) -> bool:
    """DeleteImportedModel; False when it was already gone (so cleanup can run twice)."""
    try:
        bedrock.delete_imported_model(modelIdentifier=identifier)
    except Exception as e:
        if error_code(e) in ("ResourceNotFoundException",):
            return False
        raise
    return True


def release_import(bedrock: Any, record: dict, timeout_s: float, poll_s: float,
                   sleep: Callable[[float], None] = time.sleep) -> str | None:
    """End one recorded import: wait for its job while it is InProgress (a running job would
    create its model after cleanup), then delete the model that job produced, by ARN.
    `record` holds job_arn / job_name / model_arn / model_name as deploy.json records them.
    Returns what was deleted, or None. Raises UserError, deleting nothing, when the job is
    still running after timeout_s."""
    job_id = record.get("job_arn") or record.get("job_name")
    job = None
    if job_id:
        try:
            job = bedrock.get_model_import_job(jobIdentifier=job_id)
        except Exception as e:
            if error_code(e) not in ("ResourceNotFoundException", "ValidationException"):
                raise  # not found: the create call never reached Bedrock
    if job and job.get("status") == "InProgress":
        emit("note", f"import job {job.get('jobName', job_id)} is still InProgress; waiting for it to end before "
                     "deleting anything")
        job = wait_for_job(bedrock, job.get("jobArn") or job_id, timeout_s, poll_s, sleep,
                           then="nothing was deleted; run termtune cleanup again once the job has ended")
    if job is not None:
        target = record.get("model_arn") or job.get("importedModelArn")  # a Failed job made no model
    else:
        target = record.get("model_arn") or record.get("model_name")  # no job on record: the name
    if target and delete_model(bedrock, target):
        return target
    return None


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
