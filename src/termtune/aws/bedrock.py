"""The Bedrock control plane: preflight checks, the import job, waiting, deleting.

botocore has no waiter for import jobs and checks neither name patterns nor quotas, so
each is done here, before the call that would otherwise fail minutes later.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from termtune.aws.clients import error_code, error_message
from termtune.aws.names import CMI_REGIONS, field_problem
from termtune.errors import UserError

ROLE_NOT_READY = "role ARN is invalid"
"""IAM is eventually consistent: right after CreateRole, Bedrock answers ValidationException
"The provided role ARN is invalid" for up to a couple of minutes (bedrock-cmi §3.6)."""


def check_request(region: str, job_name: str, model_name: str, role_arn: str, s3_uri: str, token: str) -> None:
    """Every field against the service's own patterns; one UserError naming the fix."""
    if region not in CMI_REGIONS:
        raise UserError(f"aws.region: Custom Model Import is not available in {region}; "
                        f"use one of {', '.join(CMI_REGIONS)}")
    for field, value, key in (("jobName", job_name, "aws.job_name"),
                              ("importedModelName", model_name, "aws.model_name"),
                              ("roleArn", role_arn, "aws.role_arn"),
                              ("s3Uri", s3_uri, "aws.bucket / aws.prefix"),
                              ("clientRequestToken", token, "clientRequestToken")):
        problem = field_problem(field, value)
        if problem:
            raise UserError(f"{key}: {value!r} is not a valid Bedrock {field} ({problem.split(': ', 1)[-1]}); "
                            "use lowercase letters, digits and single hyphens")


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


def create_job(bedrock: Any, request: dict, role_retry_seconds: float,
               sleep: Callable[[float], None] = time.sleep) -> str:
    """CreateModelImportJob, retrying the role-propagation ValidationException.

    The same clientRequestToken goes with every attempt, so a retry after a lost response
    returns the first job instead of creating a second one.
    """
    deadline = time.monotonic() + role_retry_seconds
    delay = 2.0
    while True:
        try:
            return bedrock.create_model_import_job(**request)["jobArn"]
        except Exception as e:
            code, message = error_code(e), error_message(e)
            if code == "ValidationException" and ROLE_NOT_READY in message and time.monotonic() < deadline:
                print(f"the new IAM role is not visible to Bedrock yet (IAM propagation); retrying in {delay:.0f}s",
                      file=sys.stderr)
                sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 15.0)
                continue
            if code == "ServiceQuotaExceededException":
                raise UserError(f"Bedrock refused the import: {message} (one import job at a time per "
                                "region; a limited number of imported models)") from e
            if code in ("ValidationException", "ConflictException", "AccessDeniedException",
                        "ResourceNotFoundException"):
                raise UserError(f"CreateModelImportJob failed: {code}: {message}") from e
            raise


def wait_for_job(bedrock: Any, job_arn: str, timeout_s: float, poll_s: float,
                 sleep: Callable[[float], None] = time.sleep) -> dict:
    """Poll until Completed or Failed, showing the elapsed time; returns the job description."""
    start = time.monotonic()
    interactive = sys.stderr.isatty()
    delay = min(2.0, poll_s)  # small jobs finish in seconds; back off to poll_s for long ones
    while True:
        job = bedrock.get_model_import_job(jobIdentifier=job_arn)
        status = job.get("status")
        elapsed = time.monotonic() - start
        line = f"import job {job.get('jobName')}: {status} ({_clock(elapsed)})"
        print(("\r" + line) if interactive else line, file=sys.stderr, end="" if interactive else "\n", flush=True)
        if status in ("Completed", "Failed"):
            if interactive:
                print(file=sys.stderr)
            return job
        if elapsed > timeout_s:
            raise UserError(f"import job {job_arn} still {status} after {_clock(elapsed)} "
                            "(aws.import_timeout_minutes); re-run termtune deploy later to keep waiting")
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


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
