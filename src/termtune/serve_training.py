"""termtune serve's SageMaker training-job stand-in: CreateTrainingJob and friends, run on this machine.

moto records a training job as Completed the moment it is created and runs nothing. This stand-in
answers SageMaker's awsJson 1.1 protocol (`POST /`, `X-Amz-Target: SageMaker.<Operation>`) on serve's
port, so an unmodified boto3 `sagemaker` client (AWS_ENDPOINT_URL_SAGEMAKER) can create, describe, list,
stop and tag training jobs, and a job really runs:

    Starting     the job's role is assumed through STS (moto's, IAM enforced): every S3 and CloudWatch Logs
                 call of the job is made with the role's credentials, so the role's policy decides
    Downloading  a job root per instance, laid out like /opt/ml: input/data/<channel>/ (the S3Prefix
                 channels), input/config/*.json as SageMaker writes them, checkpoints/ restored from
                 CheckpointConfig.S3Uri, model/, output/
    Training     ContainerEntrypoint + ContainerArguments, one process group per instance (algo-1..N), with
                 TERMTUNE_OPT_ML pointing at the instance's root; every output line goes to CloudWatch Logs
                 (/aws/sagemaker/TrainingJobs, stream <job>/algo-<k>-<epoch>); checkpoints/ is synced to S3
                 every few seconds and at the end
    Uploading    model/ to <S3OutputPath><job>/output/model/ (CompressionType NONE) or model.tar.gz (GZIP)
    Completed, or Failed (FailureReason from output/failure, else the exit code and last line), or Stopped
                 (StopTrainingJob, MaxRuntimeInSeconds, MaxWaitTimeInSeconds: SIGTERM, a grace, SIGKILL)

Requests are checked against botocore's own service model (required members, types, lengths, enums,
patterns) and the rules AWS applies across fields (spot needs MaxWaitTimeInSeconds >= MaxRuntimeInSeconds,
unique names, a role that exists and trusts sagemaker.amazonaws.com, an ECR image in the job's region).

A job runs only when serve was started with --run-training-jobs (`run_jobs=True`): it executes the
request's command line on this machine. Without it a created job fails at once and says so. The image
itself is never pulled: the command runs with serve's own interpreter first on PATH and PIP_NO_INDEX=1
(no network, as a job in a VPC without internet). Faults for rehearsal: a spot interruption after N
seconds of training (Interrupted, then a restart from the S3 checkpoints; the wait is not billed), and
ResourceLimitExceeded on every create (no capacity or quota). `time_scale` shrinks serve's own waits
(the 120 s stop grace, the spot wait, the checkpoint sync period) for tests.
"""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from termtune.events import emit
from termtune.safepath import UnsafeName, inside

TARGET_PREFIX = "SageMaker."  # X-Amz-Target: SageMaker.CreateTrainingJob
CONTENT_TYPE = "application/x-amz-json-1.1"
LOG_GROUP = "/aws/sagemaker/TrainingJobs"
STOP_GRACE_SECONDS = 120.0  # SIGTERM, then this long before SIGKILL (StopTrainingJob's documented window)
SPOT_WAIT_SECONDS = 30.0  # how long an interrupted spot job waits for capacity before it restarts
CHECKPOINT_SYNC_SECONDS = 5.0  # how often checkpoints/ goes to CheckpointConfig.S3Uri while training
LOG_FLUSH_SECONDS = 0.5  # how long output lines wait before they are sent to CloudWatch Logs
FAILURE_REASON_CHARS = 1024
DEFAULT_CHECKPOINT_PATH = "/opt/ml/checkpoints"
OPERATIONS = ("CreateTrainingJob", "DescribeTrainingJob", "StopTrainingJob", "ListTrainingJobs", "AddTags",
              "ListTags")
TERMINAL = ("Completed", "Failed", "Stopped")
ECR_IMAGE_RE = (r"(?P<account>[0-9]{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?"
                r"/(?P<repository>[a-z0-9][a-z0-9._/-]*)(:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})"
                r"|@sha256:[a-f0-9]{64})?")


class ServiceError(Exception):
    """An AWS-shaped error: serve answers {"__type": code, "message": ...}, which boto3 raises as
    client.exceptions.<code> (ResourceInUse, ResourceLimitExceeded, ResourceNotFound) or a ClientError."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class JobFailure(Exception):
    """Why a job failed; becomes its FailureReason."""


# ----------------------------------------------------------------------------- validation


@functools.lru_cache(maxsize=1)
def _model() -> Any:
    """botocore's sagemaker service model (a large file: read once)."""
    import botocore.session

    return botocore.session.get_session().get_service_model("sagemaker")


def _pattern_matches(pattern: str, value: str) -> bool:
    """Full match, as AWS matches a member's pattern. The model's patterns are Java regular expressions
    (\\p{L}, \\p{Alnum}); the `regex` package (a transformers dependency) reads them."""
    try:
        import regex

        return regex.fullmatch(pattern, value) is not None
    except ImportError:  # pragma: no cover - stdlib re reads every pattern but the \p{...} ones
        try:
            return re.fullmatch(pattern, value) is not None
        except re.error:
            return True


def _path(parent: str, member: str) -> str:
    name = member[:1].lower() + member[1:]  # AWS names members lowerCamel in its messages
    return f"{parent}.{name}" if parent else name


def shape_problems(shape: Any, value: Any, path: str = "") -> list[str]:
    """What AWS's request validation says of `value` against a botocore shape: required members, types,
    lengths and values, enums and patterns, in AWS's wording."""
    kind = shape.type_name
    meta = shape.metadata
    shown = f"'{value}'" if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
    where = f"Value {shown} at '{path}'" if shown else f"Value at '{path}'"
    types = {"structure": dict, "list": list, "map": dict, "string": str, "boolean": bool,
             "integer": int, "long": int, "float": (int, float), "double": (int, float), "timestamp": (int, float, str)}
    expected = types.get(kind)
    if expected and (not isinstance(value, expected) or (isinstance(value, bool) and kind != "boolean")):
        return [f"{where} failed to satisfy constraint: Member must be a {kind}"]
    problems = []
    if kind == "structure":
        for name in shape.required_members:
            if value.get(name) is None:
                problems.append(f"Value null at '{_path(path, name)}' failed to satisfy constraint: "
                                "Member must not be null")
        for name, member in shape.members.items():
            if value.get(name) is not None:
                problems += shape_problems(member, value[name], _path(path, name))
        return problems
    if kind in ("list", "map", "string"):
        if "min" in meta and len(value) < meta["min"]:
            problems.append(f"{where} failed to satisfy constraint: Member must have length greater than or "
                            f"equal to {meta['min']}")
        if "max" in meta and len(value) > meta["max"]:
            problems.append(f"{where} failed to satisfy constraint: Member must have length less than or "
                            f"equal to {meta['max']}")
    if kind == "list":
        for i, item in enumerate(value, start=1):
            problems += shape_problems(shape.member, item, f"{path}.{i}.member")
    elif kind == "map":
        for key, item in value.items():
            problems += shape_problems(shape.key, key, f"{path}.{key}.key")
            problems += shape_problems(shape.value, item, f"{path}.{key}.value")
    elif kind == "string":
        if shape.enum and value not in shape.enum:
            problems.append(f"{where} failed to satisfy constraint: Member must satisfy enum value set: "
                            f"[{', '.join(shape.enum)}]")
        elif "pattern" in meta and not _pattern_matches(meta["pattern"], value):
            problems.append(f"{where} failed to satisfy constraint: Member must satisfy regular expression "
                            f"pattern: {meta['pattern']}")
    elif kind in ("integer", "long", "float", "double"):
        if "min" in meta and value < meta["min"]:
            problems.append(f"{where} failed to satisfy constraint: Member must have value greater than or "
                            f"equal to {meta['min']}")
        if "max" in meta and value > meta["max"]:
            problems.append(f"{where} failed to satisfy constraint: Member must have value less than or "
                            f"equal to {meta['max']}")
    return problems


def validate(operation: str, body: dict) -> None:
    """ValidationException listing what botocore's shape for `operation` does not allow in `body`."""
    problems = shape_problems(_model().operation_model(operation).input_shape, body)
    if problems:
        count = len(problems)
        raise ServiceError("ValidationException", f"{count} validation error{'s' if count > 1 else ''} detected: "
                                                  + "; ".join(problems))


def _invalid(message: str) -> ServiceError:
    return ServiceError("ValidationException", message)


def check_rules(body: dict, region: str) -> None:
    """The rules SageMaker applies across fields, which no single shape states."""
    stopping = body.get("StoppingCondition") or {}
    runtime, wait = stopping.get("MaxRuntimeInSeconds", 86400), stopping.get("MaxWaitTimeInSeconds")
    if body.get("EnableManagedSpotTraining"):
        if wait is None or wait < runtime:
            raise _invalid("Invalid MaxWaitTimeInSeconds. It must be present and be greater than or equal to "
                           f"MaxRuntimeInSeconds ({runtime}) when EnableManagedSpotTraining is true.")
    elif wait is not None:
        raise _invalid("MaxWaitTimeInSeconds is only supported for managed spot training "
                       "(EnableManagedSpotTraining).")
    algorithm = body.get("AlgorithmSpecification") or {}
    image = algorithm.get("TrainingImage")
    if image is None and algorithm.get("AlgorithmName") is None:
        raise _invalid("Either TrainingImage or AlgorithmName must be specified in AlgorithmSpecification.")
    if image is not None:
        match = re.fullmatch(ECR_IMAGE_RE, image)
        if not match:
            raise _invalid(f"TrainingImage {image!r} is not an Amazon ECR image URI "
                           "(<account>.dkr.ecr.<region>.amazonaws.com/<repository>[:<tag>|@sha256:<digest>]).")
        if match["region"] != region:
            raise _invalid(f"TrainingImage {image} is in region {match['region']}; a training job in {region} "
                           f"needs an image from {region}.")
    resource = body.get("ResourceConfig") or {}
    if resource.get("InstanceGroups"):
        raise _invalid("termtune serve runs homogeneous clusters only (InstanceType and InstanceCount), not "
                       "InstanceGroups.")
    if resource.get("InstanceCount", 1) < 1:  # the shape allows 0 for instance groups
        raise _invalid("ResourceConfig.InstanceCount must be at least 1.")
    names = [c["ChannelName"] for c in body.get("InputDataConfig") or []]
    for name in names:
        if name in (".", ".."):  # the pattern allows them; as a folder under input/data/ they lead out of it
            raise _invalid(f"The channel name {name!r} is not a valid folder name under /opt/ml/input/data/.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise _invalid(f"Channel names must be unique; {', '.join(duplicates)} is given more than once.")


# ----------------------------------------------------------------------------- jobs


@dataclass
class Host:
    """One instance of a job: its name (algo-k), its /opt/ml-shaped root, its process and log stream."""

    name: str
    root: Path
    process: subprocess.Popen | None = None
    stream: str = ""
    last_line: str = ""
    returncode: int | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class Job:
    description: dict  # the DescribeTrainingJob answer, as it is now (guarded by Training.lock)
    tags: list
    root: Path
    stop_reason: str | None = None  # "Stopped", "MaxRuntimeExceeded", "MaxWaitTimeExceeded", "Interrupted"
    interrupted: bool = False  # the simulated spot interruption happened (once per job)
    waited_seconds: float = 0.0  # time spent Interrupted, waiting for spot capacity: not billed
    hosts: list[Host] = field(default_factory=list)
    synced: dict[str, tuple[int, int]] = field(default_factory=dict)  # checkpoint -> (size, mtime) in S3


class Training:
    """SageMaker's training jobs in one account and region, run as processes on this machine."""

    def __init__(self, region: str, account: Callable[[], str], workdir: Path, run_jobs: bool = False,
                 time_scale: float = 1.0, interrupt_after_seconds: float = 0.0, capacity_error: bool = False,
                 quiet: bool = True):
        self.region = region
        self.account = account
        self.workdir = workdir / "training"
        self.run_jobs = run_jobs
        self.time_scale = time_scale
        self.interrupt_after_seconds = interrupt_after_seconds
        self.capacity_error = capacity_error
        self.quiet = quiet
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}  # name -> job
        self.closing = threading.Event()

    # --------------------------------------------------------------- the API

    def call(self, operation: str, body: dict) -> dict:
        if operation not in OPERATIONS:
            raise ServiceError("UnknownOperationException", f"termtune serve's SageMaker stand-in implements "
                                                            f"{', '.join(OPERATIONS)}, not {operation}.")
        validate(operation, body)
        return getattr(self, re.sub(r"(?<!^)([A-Z])", r"_\1", operation).lower())(body)

    def create_training_job(self, body: dict) -> dict:
        check_rules(body, self.region)
        account = self.account()
        name, role_arn = body["TrainingJobName"], body["RoleArn"]
        arn = f"arn:aws:sagemaker:{self.region}:{account}:training-job/{name.lower()}"
        if self.capacity_error:
            resource = body.get("ResourceConfig") or {}
            kind, count = resource.get("InstanceType", "ml.m5.xlarge"), resource.get("InstanceCount", 1)
            raise ServiceError("ResourceLimitExceeded", f"The account-level service limit '{kind} for training job "
                                                        f"usage' is 0 Instances, with current utilization of 0 "
                                                        f"Instances and a request delta of {count} Instances. Please "
                                                        "use AWS Service Quotas to request an increase for this "
                                                        "quota.")
        self._check_role(role_arn, account, arn)
        now = time.time()
        kept = ("AlgorithmSpecification", "RoleArn", "InputDataConfig", "OutputDataConfig", "ResourceConfig",
                "VpcConfig", "StoppingCondition", "HyperParameters", "EnableNetworkIsolation",
                "EnableInterContainerTrafficEncryption", "EnableManagedSpotTraining", "CheckpointConfig",
                "Environment", "RetryStrategy")
        description = {k: body[k] for k in kept if k in body}
        description.update(TrainingJobName=name, TrainingJobArn=arn, TrainingJobStatus="InProgress",
                           SecondaryStatus="Starting", CreationTime=now, LastModifiedTime=now,
                           SecondaryStatusTransitions=[{"Status": "Starting", "StartTime": now, "StatusMessage":
                                                        "Preparing the instances for training"}])
        description.setdefault("StoppingCondition", {"MaxRuntimeInSeconds": 86400})
        description["StoppingCondition"].setdefault("MaxRuntimeInSeconds", 86400)
        with self.lock:
            if name in self.jobs:
                raise ServiceError("ResourceInUse", f"Training job names must be unique within an AWS account and "
                                                    f"region, and a training job with this name already exists "
                                                    f"({arn})")
            job = self.jobs[name] = Job(description, list(body.get("Tags") or []),
                                        inside(self.workdir, name, what="the training job name"))
        threading.Thread(target=self._run, args=(job,), name=f"training-{name}", daemon=True).start()
        return {"TrainingJobArn": arn}

    def describe_training_job(self, body: dict) -> dict:
        with self.lock:
            job = self.jobs.get(body["TrainingJobName"])
            if job is None:  # what SageMaker answers (a ValidationException, not ResourceNotFound)
                raise ServiceError("ValidationException", "Requested resource not found.")
            return json.loads(json.dumps(job.description))

    def stop_training_job(self, body: dict) -> dict:
        with self.lock:
            job = self.jobs.get(body["TrainingJobName"])
            if job is None:
                raise ServiceError("ResourceNotFound", "Requested resource not found.")
            status = job.description["TrainingJobStatus"]
            if status != "InProgress":
                raise ServiceError("ValidationException", f"The request was rejected because the training job is "
                                                          f"in status {status}.")
            job.stop_reason = "Stopped"
            self._transition_locked(job, "Stopping", "Stopping the training job", status="Stopping")
        return {}

    def list_training_jobs(self, body: dict) -> dict:
        with self.lock:
            rows = [j.description for j in self.jobs.values()]
        tests = {"StatusEquals": lambda d, v: d["TrainingJobStatus"] == v,
                 "NameContains": lambda d, v: v in d["TrainingJobName"],
                 "CreationTimeAfter": lambda d, v: d["CreationTime"] > _epoch(v),
                 "CreationTimeBefore": lambda d, v: d["CreationTime"] < _epoch(v),
                 "LastModifiedTimeAfter": lambda d, v: d["LastModifiedTime"] > _epoch(v),
                 "LastModifiedTimeBefore": lambda d, v: d["LastModifiedTime"] < _epoch(v)}
        rows = [d for d in rows if all(test(d, body[k]) for k, test in tests.items() if k in body)]
        key = {"Name": "TrainingJobName", "Status": "TrainingJobStatus"}.get(body.get("SortBy"), "CreationTime")
        rows.sort(key=lambda d: d[key], reverse=body.get("SortOrder", "Ascending") == "Descending")
        start = _token(body.get("NextToken"))
        size = body.get("MaxResults", 10)
        summaries = [{k: d[k] for k in ("TrainingJobName", "TrainingJobArn", "CreationTime", "TrainingEndTime",
                                        "LastModifiedTime", "TrainingJobStatus", "SecondaryStatus") if k in d}
                     for d in rows[start:start + size]]
        out: dict[str, Any] = {"TrainingJobSummaries": summaries}
        if start + size < len(rows):
            out["NextToken"] = str(start + size)
        return out

    def add_tags(self, body: dict) -> dict:
        job = self._by_arn(body["ResourceArn"])
        with self.lock:
            merged = {t["Key"]: t for t in job.tags}
            merged.update({t["Key"]: t for t in body["Tags"]})
            if len(merged) > 50:
                raise _invalid("A resource can have at most 50 tags.")
            job.tags = list(merged.values())
            return {"Tags": body["Tags"]}

    def list_tags(self, body: dict) -> dict:
        job = self._by_arn(body["ResourceArn"])
        start, size = _token(body.get("NextToken")), body.get("MaxResults", 50)
        with self.lock:
            out: dict[str, Any] = {"Tags": job.tags[start:start + size]}
            if start + size < len(job.tags):
                out["NextToken"] = str(start + size)
            return out

    def _by_arn(self, arn: str) -> Job:
        with self.lock:
            for job in self.jobs.values():
                if job.description["TrainingJobArn"] == arn:
                    return job
        raise ServiceError("ResourceNotFound", f"Resource {arn} not found.")

    def _check_role(self, role_arn: str, account: str, job_arn: str) -> None:
        """The role is one of this account's, exists, and trusts sagemaker.amazonaws.com (SageMaker checks
        this on create; moto cannot evaluate a service principal, so it is evaluated here)."""
        from termtune.aws.clients import client, error_code
        from termtune.aws.trust import allows_service

        cannot = (f"Could not assume role {role_arn}. Please ensure that the role exists and allows principal "
                  "'sagemaker.amazonaws.com' to assume the role.")
        if role_arn.split(":")[4] != account:  # iam:PassRole never passes another account's role
            raise ServiceError("AccessDeniedException", f"You are not authorized to perform iam:PassRole on "
                                                        f"{role_arn}: it is a role of another account than {account}.")
        name = role_arn.rsplit("/", 1)[1]
        try:
            role = client("iam", self.region).get_role(RoleName=name)["Role"]
        except Exception as e:
            if error_code(e) is None:
                raise
            raise _invalid(cannot) from e
        trust = role["AssumeRolePolicyDocument"]
        if isinstance(trust, str):
            from urllib.parse import unquote

            trust = json.loads(unquote(trust))
        if role["Arn"] != role_arn or not allows_service(trust, "sagemaker.amazonaws.com", "sts:AssumeRole",
                                                         {"aws:SourceAccount": account, "aws:SourceArn": job_arn}):
            raise _invalid(cannot)

    def close(self) -> None:
        """serve is stopping: every job's processes are killed (their process groups), nothing is left."""
        self.closing.set()
        with self.lock:
            hosts = [h for j in self.jobs.values() for h in j.hosts]
        for host in hosts:
            _kill_group(host, signal.SIGKILL)

    # --------------------------------------------------------------- the status machine

    def _transition_locked(self, job: Job, secondary: str, message: str, status: str | None = None) -> None:
        now = time.time()
        d = job.description
        transitions = d["SecondaryStatusTransitions"]
        if transitions and "EndTime" not in transitions[-1]:
            transitions[-1]["EndTime"] = now
        entry = {"Status": secondary, "StartTime": now, "StatusMessage": message}
        if secondary in ("Completed", "Failed", "Stopped", "MaxRuntimeExceeded", "MaxWaitTimeExceeded"):
            entry["EndTime"] = now
        transitions.append(entry)
        d.update(SecondaryStatus=secondary, LastModifiedTime=now)
        if status:
            d["TrainingJobStatus"] = status

    def _transition(self, job: Job, secondary: str, message: str, status: str | None = None) -> None:
        with self.lock:
            self._transition_locked(job, secondary, message, status)
        if not self.quiet:
            emit("note", f"serve: training job {job.description['TrainingJobName']}: {secondary}")

    def _run(self, job: Job) -> None:
        """The job, from Starting to its end. Any failure becomes the job's FailureReason."""
        d = job.description
        try:
            if not self.run_jobs:
                raise JobFailure("termtune serve was started without --run-training-jobs, so it does not run "
                                 "training jobs (they execute the request's command on this machine).")
            credentials = self._assume(job)
            while True:
                self._lay_out(job, credentials)
                with self.lock:
                    d.setdefault("TrainingStartTime", time.time())
                    outcome = job.stop_reason  # stopped before it started: nothing to run
                if outcome is None:
                    self._transition(job, "Training", "Training image download completed. Training in progress.")
                    outcome = self._train(job, credentials)
                if outcome != "Interrupted":
                    break
                self._transition(job, "Interrupted", "The job was interrupted by a spot interruption; it restarts "
                                                     "from its checkpoints when capacity is available.")
                waited = time.monotonic()
                self.closing.wait(SPOT_WAIT_SECONDS * self.time_scale)
                job.waited_seconds += time.monotonic() - waited
                with self.lock:
                    job.stop_reason = None if job.stop_reason == "Interrupted" else job.stop_reason
                    outcome = job.stop_reason or ("Stopped" if self.closing.is_set() else outcome)
                if outcome != "Interrupted":  # stopped while it waited
                    break
                self._transition(job, "Starting", "Preparing the instances for training (after the interruption)")
            if outcome not in ("Completed", *_STOP_MESSAGES):
                raise JobFailure(outcome)
            self._transition(job, "Uploading", "Uploading generated training model")
            self._upload(job, credentials)
            if outcome == "Completed":
                self._finish(job, "Completed", "Completed", "Training job completed")
            else:
                self._finish(job, "Stopped", outcome, _STOP_MESSAGES[outcome])
        except (JobFailure, UnsafeName) as e:  # UnsafeName: a path the request names leads out of the job root
            self._finish(job, "Failed", "Failed", "Training job failed", reason=str(e)[:FAILURE_REASON_CHARS])
        except Exception as e:  # a bug here is still the job's failure, not serve's
            reason = f"InternalServerError: termtune serve: {type(e).__name__}: {e}"[:FAILURE_REASON_CHARS]
            self._finish(job, "Failed", "Failed", "Training job failed", reason=reason)
        finally:
            for host in job.hosts:
                _kill_group(host, signal.SIGKILL)

    def _finish(self, job: Job, status: str, secondary: str, message: str, reason: str | None = None) -> None:
        with self.lock:
            d = job.description
            self._transition_locked(job, secondary, reason or message, status=status)
            now = time.time()
            d["TrainingEndTime"] = now
            if reason:
                d["FailureReason"] = reason
            if "TrainingStartTime" in d:
                seconds = max(1, math.ceil(now - d["TrainingStartTime"]))
                d["TrainingTimeInSeconds"] = seconds
                d["BillableTimeInSeconds"] = max(1, math.ceil(now - d["TrainingStartTime"] - job.waited_seconds))
        if not self.quiet:
            emit("note", f"serve: training job {d['TrainingJobName']}: {status}{f' ({reason})' if reason else ''}")

    def _assume(self, job: Job) -> dict[str, str]:
        """The job role's temporary credentials, from STS: the job reads and writes as the role."""
        from termtune.aws.clients import client, error_code, error_message, role_credentials

        role = job.description["RoleArn"]
        try:
            out = client("sts", self.region).assume_role(RoleArn=role, RoleSessionName="SageMaker",
                                                         DurationSeconds=3600)["Credentials"]
        except Exception as e:
            if error_code(e) is None:
                raise
            raise JobFailure(f"ClientError: SageMaker could not assume the role {role}: {error_code(e)} "
                             f"({error_message(e)})") from e
        return role_credentials(out)

    # --------------------------------------------------------------- Downloading

    def _lay_out(self, job: Job, credentials: dict[str, str]) -> None:
        """A fresh root per instance, shaped like /opt/ml (a restart after an interruption gets new instances):
        the channels, input/config/*.json, and the checkpoints restored from S3."""
        from termtune.aws.clients import client

        self._transition(job, "Downloading", "Downloading input data")
        d = job.description
        resource = d.get("ResourceConfig") or {}
        count, kind = resource.get("InstanceCount", 1), resource.get("InstanceType", "ml.m5.xlarge")
        names = [f"algo-{k}" for k in range(1, count + 1)]
        s3 = client("s3", self.region, credentials=credentials)
        shutil.rmtree(job.root, ignore_errors=True)
        job.hosts = []
        for index, name in enumerate(names):
            root = inside(job.root, name)
            for folder in ("input/data", "input/config", "model", "output/data", "code"):
                (root / folder).mkdir(parents=True, exist_ok=True)
            channels = {}
            for channel in d.get("InputDataConfig") or []:
                channels[channel["ChannelName"]] = _input_config(channel, d)
                _download_channel(s3, channel, inside(root / "input/data", channel["ChannelName"],
                                                      what="the channel name"), index, count)
            config = {"hyperparameters.json": d.get("HyperParameters") or {},
                      "inputdataconfig.json": channels,
                      "resourceconfig.json": {"current_host": name, "current_instance_type": kind,
                                              "current_group_name": "homogeneousCluster", "hosts": names,
                                              "instance_groups": [{"instance_group_name": "homogeneousCluster",
                                                                   "instance_type": kind, "hosts": names}],
                                              "network_interface_name": "eth0"}}
            if d.get("CheckpointConfig"):
                config["checkpointconfig.json"] = {"LocalPath": _checkpoint_path(d),
                                                   "S3Uri": d["CheckpointConfig"]["S3Uri"]}
            for file, value in config.items():
                (root / "input/config" / file).write_text(json.dumps(value, indent=2), encoding="utf-8")
            host = Host(name, root)
            if d.get("CheckpointConfig"):
                _restore(s3, d["CheckpointConfig"]["S3Uri"], self._checkpoints(host, d))
            job.hosts.append(host)
        job.synced = {}

    @staticmethod
    def _checkpoints(host: Host, d: dict) -> Path:
        """CheckpointConfig.LocalPath re-rooted under the instance's root (/opt/ml/checkpoints -> checkpoints)."""
        local = _checkpoint_path(d).removeprefix("/opt/ml/").strip("/")
        folder = inside(host.root, local, what="CheckpointConfig.LocalPath")
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # --------------------------------------------------------------- Training

    def _train(self, job: Job, credentials: dict[str, str]) -> str:
        """Run the instances' processes to their end; the outcome: Completed, Interrupted, Stopped,
        MaxRuntimeExceeded, MaxWaitTimeExceeded, or a failure reason."""
        from termtune.aws.clients import client

        d = job.description
        algorithm = d["AlgorithmSpecification"]
        command = list(algorithm.get("ContainerEntrypoint") or []) + list(algorithm.get("ContainerArguments") or [])
        if not algorithm.get("ContainerEntrypoint"):
            raise JobFailure("termtune serve runs the job's ContainerEntrypoint (and ContainerArguments); this job "
                             "names none, and the image's own entrypoint is not available here.")
        logs = LogWriter(client("logs", self.region, credentials=credentials), self.quiet)
        s3 = client("s3", self.region, credentials=credentials)
        from termtune.local import free_port

        addresses = json.dumps({h.name: "127.0.0.1" for h in job.hosts})
        master_port = str(free_port())
        epoch = int(time.time())
        started = time.monotonic()
        for k, host in enumerate(job.hosts, start=1):
            host.stream = f"{d['TrainingJobName']}/{host.name}-{epoch}"
            env = self._environment(job, host, credentials, addresses, master_port)
            host.process = subprocess.Popen(command, cwd=host.root, env=env, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            threading.Thread(target=_pump, args=(host, logs), daemon=True).start()
        sync_every = CHECKPOINT_SYNC_SECONDS * self.time_scale
        next_sync = [time.monotonic() + sync_every]

        def sync_now_and_then() -> None:
            if time.monotonic() >= next_sync[0]:
                self._sync(job, s3)
                next_sync[0] = time.monotonic() + sync_every

        outcome = self._watch(job, started, sync_now_and_then)
        if outcome:
            self._terminate(job)
        for host in job.hosts:
            host.done.wait()
        logs.close()
        if d.get("CheckpointConfig"):
            self._sync(job, s3)
        if outcome:
            return outcome
        # the instance that failed by itself, not one stopped because of it (killed by a signal: < 0)
        failed = sorted((h for h in job.hosts if h.returncode != 0), key=lambda h: (h.returncode or 0) < 0)
        if not failed:
            return "Completed"
        host = failed[0]
        written = host.root / "output" / "failure"
        if written.is_file() and not written.is_symlink() and written.read_text(errors="replace").strip():
            return "AlgorithmError: " + written.read_text(encoding="utf-8", errors="replace").strip()
        return (f"AlgorithmError: the training process on {host.name} exited with code {host.returncode}; its last "
                f"line: {host.last_line or '(no output)'}")

    def _watch(self, job: Job, started: float, tick: Callable[[], Any]) -> str | None:
        """Wait for the processes; the reason to stop them early, or None when they all ended by themselves
        (a failing instance stops the others, as the job fails)."""
        d = job.description
        stopping = d["StoppingCondition"]
        spot = d.get("EnableManagedSpotTraining")
        while True:
            if all(h.done.is_set() for h in job.hosts):
                return None
            if any(h.done.is_set() and h.returncode != 0 for h in job.hosts):
                self._terminate(job)
                return None
            with self.lock:
                reason = job.stop_reason
                ran = time.monotonic() - started
                if reason is None and spot and not job.interrupted and self.interrupt_after_seconds and \
                        ran >= self.interrupt_after_seconds:
                    job.interrupted, reason = True, "Interrupted"
                if reason is None and self._runtime(job, ran) > stopping["MaxRuntimeInSeconds"]:
                    reason = "MaxRuntimeExceeded"
                if reason is None and spot and time.time() - d["CreationTime"] > stopping["MaxWaitTimeInSeconds"]:
                    reason = "MaxWaitTimeExceeded"
                if reason and reason != "Stopped":
                    job.stop_reason = reason
                if reason in ("MaxRuntimeExceeded", "MaxWaitTimeExceeded"):
                    self._transition_locked(job, "Stopping", _STOP_MESSAGES[reason], status="Stopping")
            if reason or self.closing.is_set():
                return reason or "Stopped"
            tick()
            time.sleep(0.05)

    @staticmethod
    def _runtime(job: Job, ran: float) -> float:
        """Training time so far: the attempts before an interruption and this one, never the wait."""
        start = job.description.get("TrainingStartTime", time.time())
        return max(ran, time.time() - start - job.waited_seconds)

    def _terminate(self, job: Job) -> None:
        """SIGTERM to every instance's process group, the grace, then SIGKILL to what is left."""
        for host in job.hosts:
            _kill_group(host, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS * self.time_scale
        for host in job.hosts:
            host.done.wait(max(0.0, deadline - time.monotonic()))
        for host in job.hosts:
            _kill_group(host, signal.SIGKILL)

    def _environment(self, job: Job, host: Host, credentials: dict[str, str], addresses: str,
                     master_port: str) -> dict[str, str]:
        """serve's own environment without its AWS credentials (the job acts as its role), then the job's
        Environment, then what SageMaker and the rehearsal set."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k.startswith("AWS_ENDPOINT_URL")}
        env.update(job.description.get("Environment") or {})
        env.update(TRAINING_JOB_NAME=job.description["TrainingJobName"],
                   TRAINING_JOB_ARN=job.description["TrainingJobArn"], TERMTUNE_OPT_ML=str(host.root),
                   PIP_NO_INDEX="1",
                   PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
                   TERMTUNE_HOST_ADDRESSES=addresses, TERMTUNE_MASTER_PORT=master_port,
                   AWS_ACCESS_KEY_ID=credentials["aws_access_key_id"],
                   AWS_SECRET_ACCESS_KEY=credentials["aws_secret_access_key"],
                   AWS_SESSION_TOKEN=credentials["aws_session_token"], AWS_DEFAULT_REGION=self.region,
                   AWS_REGION=self.region, AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        return env

    def _sync(self, job: Job, s3: Any) -> None:
        """Send each instance's new or changed checkpoint files to CheckpointConfig.S3Uri."""
        from termtune.aws import s3 as s3_files
        from termtune.aws.clients import error_code, error_message

        d = job.description
        if not d.get("CheckpointConfig"):
            return
        bucket, prefix = s3_files.split_uri(d["CheckpointConfig"]["S3Uri"])
        for host in job.hosts:
            folder = self._checkpoints(host, d)
            for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
                name = path.relative_to(folder).as_posix()
                try:
                    stat = path.stat()
                    if job.synced.get(name) == (stat.st_size, stat.st_mtime_ns):
                        continue
                    s3.upload_file(str(path), bucket, prefix + name)
                except FileNotFoundError:
                    continue  # deleted since the listing (a probe, a rotated-out checkpoint): nothing to sync
                except Exception as e:
                    if error_code(e) is None:
                        raise
                    raise JobFailure(f"ClientError: Checkpoint upload to s3://{bucket}/{prefix}{name} failed with "
                                     f"the role {d['RoleArn']}: {error_code(e)} ({error_message(e)})") from e
                job.synced[name] = (stat.st_size, stat.st_mtime_ns)

    # --------------------------------------------------------------- Uploading

    def _upload(self, job: Job, credentials: dict[str, str]) -> None:
        """model/ (every instance's; algo-1's file wins a clash) to <S3OutputPath><job>/output/, as the role."""
        from termtune.aws import s3 as s3_files
        from termtune.aws.clients import client, error_code, error_message

        d = job.description
        out = d["OutputDataConfig"]
        bucket, prefix = s3_files.split_uri(out["S3OutputPath"])
        prefix = f"{prefix}{d['TrainingJobName']}/output/"
        files: dict[str, Path] = {}
        for host in reversed(job.hosts):
            files.update(_files_under(host.root / "model"))
        extra = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": out["KmsKeyId"]} if out.get("KmsKeyId") else {}
        uploads = {f"model/{name}": path for name, path in files.items()}
        if out.get("CompressionType") == "GZIP":
            archive = job.root / "model.tar.gz"
            with tarfile.open(archive, "w:gz") as tar:
                for name, path in sorted(files.items()):
                    tar.add(path, arcname=name)
            uploads = {"model.tar.gz": archive}
        s3 = client("s3", self.region, credentials=credentials)
        for key, path in sorted(uploads.items()):
            try:
                s3.upload_file(str(path), bucket, prefix + key, ExtraArgs=extra)
            except Exception as e:
                if error_code(e) is None:
                    raise
                raise JobFailure(f"ClientError: Data upload to s3://{bucket}/{prefix}{key} failed with the role "
                                 f"{d['RoleArn']}: {error_code(e)} ({error_message(e)})") from e
        with self.lock:
            d["ModelArtifacts"] = {"S3ModelArtifacts": f"s3://{bucket}/{prefix}" + (
                "model.tar.gz" if out.get("CompressionType") == "GZIP" else "model/")}


_STOP_MESSAGES = {"Stopped": "Training job stopped",
                  "MaxRuntimeExceeded": "Training job stopped: it reached MaxRuntimeInSeconds",
                  "MaxWaitTimeExceeded": "Training job stopped: it reached MaxWaitTimeInSeconds"}


def _epoch(value: Any) -> float:
    """A timestamp member as epoch seconds (awsJson sends numbers; ISO 8601 text is read too)."""
    if isinstance(value, (int, float)):
        return float(value)
    from datetime import datetime

    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def _token(value: Any) -> int:
    if value is None:
        return 0
    if not str(value).isdigit():
        raise _invalid(f"Invalid pagination token {value!r}.")
    return int(value)


def _checkpoint_path(d: dict) -> str:
    return (d.get("CheckpointConfig") or {}).get("LocalPath") or DEFAULT_CHECKPOINT_PATH


def _input_config(channel: dict, d: dict) -> dict:
    """A channel's entry in inputdataconfig.json, as SageMaker writes it."""
    source = channel["DataSource"].get("S3DataSource") or {}
    entry = {"TrainingInputMode": channel.get("InputMode") or d["AlgorithmSpecification"]["TrainingInputMode"],
             "S3DistributionType": source.get("S3DataDistributionType", "FullyReplicated"),
             "RecordWrapperType": channel.get("RecordWrapperType", "None")}
    if channel.get("ContentType"):
        entry["ContentType"] = channel["ContentType"]
    return entry


def _download_channel(s3: Any, channel: dict, target: Path, index: int, count: int) -> None:
    """An S3Prefix channel's objects into `target` (ShardedByS3Key: every count-th key for this instance).
    Every key is checked to land inside `target` before anything is written."""
    from termtune.aws import s3 as s3_files
    from termtune.aws.clients import error_code, error_message

    source = channel["DataSource"].get("S3DataSource")
    name = channel["ChannelName"]
    if not source or source["S3DataType"] != "S3Prefix":
        raise JobFailure(f"ClientError: termtune serve supports S3Prefix channels; channel {name} is "
                         f"{source['S3DataType'] if source else 'not an S3 data source'}.")
    uri = source["S3Uri"]
    bucket, prefix = s3_files.split_uri(uri)
    try:
        keys = sorted(k for k in s3_files.remote_objects(s3, bucket, prefix) if k and not k.endswith("/"))
        if not keys:
            raise JobFailure(f"ClientError: No S3 objects found under S3 URL \"{uri}\" given in input data source. "
                             "Please ensure that the bucket exists in the selected region (us-east-1), that objects "
                             "exist under that S3 prefix, and that the role has s3:ListBucket on the bucket.")
        if source.get("S3DataDistributionType") == "ShardedByS3Key":
            keys = keys[index::count]
        paths = {key: inside(target, key, what=f"the object key under {uri}") for key in keys}
        target.mkdir(parents=True, exist_ok=True)
        for key, path in paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, prefix + key, str(path))
    except UnsafeName as e:
        raise JobFailure(f"ClientError: channel {name}: {e}") from e
    except JobFailure:
        raise
    except Exception as e:
        if error_code(e) is None:
            raise
        raise JobFailure(f"ClientError: Data download failed for channel {name} from {uri}: {error_code(e)} "
                         f"({error_message(e)})") from e


def _restore(s3: Any, uri: str, folder: Path) -> None:
    """The checkpoints under CheckpointConfig.S3Uri into the instance's checkpoint folder."""
    from termtune.aws import s3 as s3_files
    from termtune.aws.clients import error_code, error_message

    bucket, prefix = s3_files.split_uri(uri)
    try:
        s3_files.download(s3, bucket, prefix, folder)
    except UnsafeName as e:
        raise JobFailure(f"ClientError: the checkpoints at {uri}: {e}") from e
    except Exception as e:
        if error_code(e) is None:
            raise
        raise JobFailure(f"ClientError: Checkpoint download from {uri} failed: {error_code(e)} "
                         f"({error_message(e)})") from e


def _files_under(folder: Path) -> dict[str, Path]:
    """name -> path of every file under `folder` that resolves inside it (a symlink out of the job root is
    never uploaded)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        try:
            resolved = inside(folder, name)
        except UnsafeName:
            continue
        if resolved.is_file():
            out[name] = resolved
    return out


def _kill_group(host: Host, sig: int) -> None:
    if host.process is not None:
        try:
            os.killpg(host.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _pump(host: Host, logs: "LogWriter") -> None:
    """An instance's output lines to its log stream until its process has ended. When the process
    itself exits, the rest of its group goes too (a container ends with its entrypoint); the group id
    stays reserved until the process is reaped, so the kill reaches no other process."""
    process = host.process
    assert process is not None and process.stdout is not None

    def reap() -> None:
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        _kill_group(host, signal.SIGKILL)
        host.returncode = process.wait()

    reaper = threading.Thread(target=reap, daemon=True)
    reaper.start()
    for raw in process.stdout:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if line.strip():
            host.last_line = line
            logs.put(host.stream, line)
    process.stdout.close()
    reaper.join()
    host.done.set()


class LogWriter:
    """Output lines to CloudWatch Logs (group /aws/sagemaker/TrainingJobs), as the job's role: the group
    and each stream are created when its first line comes, lines are sent in order in small batches."""

    def __init__(self, logs: Any, quiet: bool):
        self.logs = logs
        self.quiet = quiet
        self.lines: queue.Queue = queue.Queue()
        self.streams: set[str] = set()
        self.refused = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(self, stream: str, line: str) -> None:
        self.lines.put((stream, int(time.time() * 1000), line))

    def close(self) -> None:
        self.lines.put(None)
        self.thread.join()

    def _run(self) -> None:
        batch: list[tuple[str, int, str]] = []
        while True:
            try:
                item = self.lines.get(timeout=LOG_FLUSH_SECONDS)
            except queue.Empty:
                item = ()
            if item:
                batch.append(item)
                if len(batch) < 1000:
                    continue
            self._send(batch)
            batch = []
            if item is None:
                return

    def _send(self, batch: list) -> None:
        from termtune.aws.clients import error_code, error_message

        by_stream: dict[str, list[dict]] = {}
        for stream, timestamp, line in batch:
            by_stream.setdefault(stream, []).append({"timestamp": timestamp, "message": line[:200_000]})
        for stream, events in by_stream.items():
            try:
                if stream not in self.streams:
                    try:
                        self.logs.create_log_group(logGroupName=LOG_GROUP)
                    except self.logs.exceptions.ResourceAlreadyExistsException:
                        pass
                    self.logs.create_log_stream(logGroupName=LOG_GROUP, logStreamName=stream)
                    self.streams.add(stream)
                self.logs.put_log_events(logGroupName=LOG_GROUP, logStreamName=stream, logEvents=events)
            except Exception as e:  # a role without the logs permissions: the job runs on, its lines are lost
                if error_code(e) is None:
                    raise
                if not self.refused:
                    emit("note", f"serve: training job logs to {LOG_GROUP} refused: {error_code(e)} "
                                 f"({error_message(e)})")
                self.refused = True
