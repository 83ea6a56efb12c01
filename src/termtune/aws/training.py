"""termtune train --on sagemaker, and termtune jobs: the training job from submission to its recorded result.

train reads top to bottom: check the settings offline -> pick up a job this fingerprint already has ->
build the bundle -> upload its channels -> ensure the execution role -> record the request, create the
job, record its ARN -> follow its status and logs -> on Completed, download the job's records, verify the
artifact in S3 against their manifest, record the output, billable seconds and cost.

<run>/sagemaker/jobs.json lists every job the run submitted, newest last. A job is recorded before it is
created and its ARN as soon as AWS answers, so a command killed or interrupted anywhere finds its job
again: re-running `termtune train` (or `termtune jobs attach`) follows the job that the current settings
(the train stage's fingerprint) already have instead of starting a second one; a Completed one is reused.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from termtune.aws import iam, jobrecord, s3
from termtune.aws import sagemaker as sm
from termtune.aws.clients import client, error_code, error_message, retry_while_role_propagates
from termtune.config import Config
from termtune.errors import Detached, UserError
from termtune.events import emit
from termtune.layout import RunLayout
from termtune.results import StageResult
from termtune.rundir import read_json, remove, sha256_file

ENDED = ("Completed", "Failed", "Stopped")
NOT_CREATED = "not created"
"""The status of a recorded job SageMaker never had: the command ended before its create call reached it."""
ROLE_PREFIX = "termtune-sagemaker-"
LAST_LINES = 20


@dataclass(repr=False)
class JobResult(StageResult):
    """A SageMaker training job of this run, as jobs.json records it."""

    job: dict[str, Any]
    reused: bool = False

    def summary(self) -> str:
        j = self.job
        head = f"training job {j['job_name']}: {j.get('status')}" + (" (reused: same settings)" if self.reused else "")
        lines = [head]
        if j.get("artifact_uri"):
            lines.append(f"artifact    {j['artifact_uri']} (sha256 verified against the job's manifest)")
        if j.get("billable_seconds") is not None:
            c = j.get("cost")
            lines.append(f"billable    {j['billable_seconds']} s x {j.get('instance_count', 1)} instance(s)"
                         + (f" = ${c['usd']:.2f} at ${c['usd_per_instance_hour']}/h ({c['price_source']})" if c
                            else " (no price known for this instance and region: set aws.sagemaker.usd_per_hour)"))
        if j.get("status") == "Completed":
            lines.append("next: termtune deploy <config> (imports straight from the job's output)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- train


def train(cfg: Config, fingerprint: str) -> JobResult:
    """Run the train stage (whose inputs have this fingerprint) as a SageMaker training job; see the module doc."""
    from termtune.aws.stage import aws_errors

    sm.check_settings(cfg)
    job = jobrecord.current_job(cfg, fingerprint)
    with aws_errors():
        smc = client("sagemaker", cfg.aws.region, cfg.aws.profile)
        if job and job.get("status") == "Completed" and job.get("artifact_uri"):
            emit("skipped", f"train: job {job['job_name']} already completed with these settings; reusing its output")
            return JobResult(job, reused=True)
        if job and job.get("status") == "creating":
            job = _adopt(cfg, smc, job)  # the create call may or may not have reached SageMaker
        if job is None or job.get("status") in ("Failed", "Stopped", NOT_CREATED):
            job = _submit(cfg, smc, fingerprint)
        elif job.get("status") != "Completed":
            emit("note", f"following job {job['job_name']}, submitted {job.get('submitted_at')} with these settings")
        if cfg.aws.sagemaker.detach:
            raise Detached(_detached_message(cfg, job))
        return follow(cfg, job, smc, RunLayout.of(cfg).job_records)


def _adopt(cfg: Config, smc: Any, job: dict[str, Any]) -> dict[str, Any] | None:
    """A job recorded as being created: the job if SageMaker has it, else None (create it anew)."""
    try:
        described = smc.describe_training_job(TrainingJobName=job["job_name"])
    except Exception as e:
        if error_code(e) in ("ValidationException", "ResourceNotFound"):  # SageMaker: "Requested resource not found"
            job["status"] = NOT_CREATED  # nothing runs, nothing bills
            jobrecord.save(cfg, job)
            return None
        raise
    job.update(job_arn=described["TrainingJobArn"], status=described["TrainingJobStatus"])
    jobrecord.save(cfg, job)
    return job


def _submit(cfg: Config, smc: Any, fp: str) -> dict[str, Any]:
    from termtune.aws import stage

    settings = cfg.aws.sagemaker
    layout = RunLayout.of(cfg)
    run_name = cfg.run_dir.resolve().name
    rid = stage.run_id(cfg)
    uris = sm.Uris.of(stage.sagemaker_root(cfg, rid))
    name = sm.job_name(cfg, time.strftime("%Y%m%d%H%M%S"))
    kms = {key: stage.usable_key(cfg, getattr(settings, key), f"aws.sagemaker.{key}")["Arn"]
           for key in ("output_kms_key_id", "volume_kms_key_id") if getattr(settings, key)}

    # 1. the bundle; the request is checked (with a stand-in role) before anything goes up
    channels = _build_bundle(cfg, layout.bundle)
    probe = "arn:aws:iam::123456789012:role/probe"
    sm.check_request(sm.build_request(cfg, name, settings.role_arn or probe, uris, fp, run_name, kms, channels))

    # 2. upload each channel; unchanged files are skipped, files the channel no longer has are removed
    s3c = client("s3", cfg.aws.region, cfg.aws.profile)
    uploaded = {}
    for channel, folder in channels.items():
        uploaded[channel] = _upload_channel(cfg, s3c, folder, uris.channel(channel))

    # 3. the execution role
    input_key = stage.kms_key_arn(cfg) if cfg.aws.kms_key_id else None
    keys = sorted({*kms.values(), *([input_key] if input_key else [])})
    role_arn, created_now, role = _ensure_role(cfg, rid, uris, keys)

    # 4. recorded before the call: a command killed during it finds the job by name
    request = sm.build_request(cfg, name, role_arn, uris, fp, run_name, kms, channels)
    sm.check_request(request)
    job = {"job_name": name, "job_arn": None, "status": "creating", "fingerprint": fp, "region": cfg.aws.region,
           "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "instance_type": settings.instance_type,
           "instance_count": settings.instance_count, "s3_root": uris.root, "uploads": uploaded, **role,
           "request": request}
    jobrecord.save(cfg, job)
    retry_s = cfg.aws.role_retry_minutes * 60 if created_now else 0.0
    job["job_arn"] = create_job(smc, request, retry_s)
    job["status"] = "InProgress"
    jobrecord.save(cfg, job)
    emit("note", f"submitted training job {name} ({settings.instance_count} x {settings.instance_type}"
                 f"{', spot' if settings.spot else ''}) in {cfg.aws.region}")
    return job


def _build_bundle(cfg: Config, dest: Path) -> dict[str, Path]:
    """termtune.remote.bundle.build into `dest` (which it replaces whole): channel -> the folder holding
    exactly its files."""
    from termtune.remote import bundle

    dest.parent.mkdir(parents=True, exist_ok=True)
    channels = bundle.build(cfg, dest)
    unknown = [c for c in channels if c not in sm.CHANNELS]
    if unknown:
        raise ValueError(f"the bundle names a channel SageMaker is not told about: {unknown}")
    return dict(channels)


def _upload_channel(cfg: Config, s3c: Any, folder: Path, uri: str) -> dict[str, Any]:
    bucket, prefix = s3.split_uri(uri)
    files = [s3.ArtifactFile(p.relative_to(folder).as_posix(), p.stat().st_size, sha256_file(p))
             for p in sorted(Path(folder).rglob("*")) if p.is_file()]
    try:
        up = s3.upload(s3c, folder, files, bucket, prefix, cfg.aws.sse, cfg.aws.kms_key_id)
    except Exception as e:
        if error_code(e) in ("NoSuchBucket", "AccessDenied", "403", "404"):
            raise UserError(f"aws.bucket: cannot write to s3://{bucket} ({error_code(e)}); create the bucket or "
                            "check your permissions") from e
        raise
    # a file an earlier bundle had and this one has not would otherwise land in the job's channel
    stale = set(s3.remote_objects(s3c, bucket, prefix)) - {f.path for f in files}
    s3.delete_objects(s3c, bucket, prefix, stale)
    return {"uri": uri, "files": [f.path for f in files], "uploaded": len(up.uploaded), "skipped": len(up.skipped),
            "removed": sorted(stale)}


def _ensure_role(cfg: Config, rid: str, uris: sm.Uris, kms_arns: list[str]) -> tuple[str, bool, dict[str, Any]]:
    """(execution role ARN, created by this call, what to record): aws.sagemaker.role_arn as given, or
    termtune-sagemaker-<run id> created or updated with this run's least-privilege policy."""
    from termtune.aws.stage import caller_account

    if cfg.aws.sagemaker.role_arn:
        return cfg.aws.sagemaker.role_arn, False, {"role_arn": cfg.aws.sagemaker.role_arn, "role_created": False}
    account = caller_account(cfg, required=True)
    trust = sm.trust_policy(account)
    vpc = cfg.aws.sagemaker.vpc
    permissions = sm.permissions_policy(uris, account, cfg.aws.region, sm.image(cfg), kms_arns,
                                        vpc.subnets, vpc.security_group_ids)
    name = ROLE_PREFIX + rid
    arn, created = iam.create_or_update(client("iam", cfg.aws.region, cfg.aws.profile), name, trust, permissions,
                                        name, description="SageMaker training jobs of one termtune run")
    return arn, created, {"role_arn": arn, "role_name": name, "role_policy": name, "role_created": created}


def create_job(smc: Any, request: dict[str, Any], role_retry_s: float,
               sleep: Callable[[float], None] = time.sleep) -> str:
    """CreateTrainingJob. A role SageMaker cannot assume yet is retried for role_retry_s (only for a role
    termtune has just created: IAM is eventually consistent); quota and name errors are one line."""
    try:
        return retry_while_role_propagates(lambda: smc.create_training_job(**request)["TrainingJobArn"], "SageMaker",
                                           ("ValidationException",), role_retry_s, sleep)
    except Exception as e:
        code, message = error_code(e), error_message(e)
        if code == "ResourceLimitExceeded":
            raise UserError(f"SageMaker refused the job: {message}; request a quota increase for "
                            f"{request['ResourceConfig']['InstanceType']} training job usage in Service Quotas "
                            "(SageMaker), or choose another aws.sagemaker.instance_type") from e
        if code == "ResourceInUse":
            raise UserError(f"aws.sagemaker.job_name: a training job named {request['TrainingJobName']} "
                            "already exists in this account and region; names are unique: choose another, "
                            "or leave job_name unset") from e
        if code in ("ValidationException", "AccessDeniedException", "ResourceNotFound"):
            raise UserError(f"CreateTrainingJob failed: {code}: {message}") from e
        raise


# ----------------------------------------------------------------------------- follow


def follow(cfg: Config, job: dict[str, Any], smc: Any, records: Path,
           sleep: Callable[[float], None] = time.sleep) -> JobResult:
    """Show status changes and the job's log lines until it ends, then record the outcome (a Completed job's
    records go into `records`). Ctrl-C asks whether to detach (the job goes on) or stop it; without a
    terminal to ask, it detaches."""
    logs = client("logs", cfg.aws.region, cfg.aws.profile)
    tail = sm.LogTail(job["job_name"])
    shown, progress = 0, None
    recent: list[str] = []
    try:
        while True:
            described = smc.describe_training_job(TrainingJobName=job["job_name"])
            transitions = described.get("SecondaryStatusTransitions") or []
            for t in transitions[shown:]:
                emit("note", f"job {job['job_name']}: {t.get('Status')}"
                             + (f": {t['StatusMessage']}" if t.get("StatusMessage") else ""))
            shown = max(shown, len(transitions))
            if described.get("ProgressInfo") and described["ProgressInfo"] != progress:
                progress = described["ProgressInfo"]
                emit("progress", f"job {job['job_name']}: step {progress.get('CurrentStep', '?')}/"
                                 f"{progress.get('TotalStepCountPerEpoch', '?')} of epoch "
                                 f"{progress.get('CurrentEpoch', '?')}/{progress.get('MaxEpoch', '?')}")
            ended = described["TrainingJobStatus"] in ENDED
            # once it has ended, a second read gets what the job wrote just before
            for line in host_lines(tail.read(logs) + (tail.read(logs) if ended else [])):
                recent = (recent + [line])[-LAST_LINES:]
                emit("result", line)
            if ended:
                return finish(cfg, job, described, recent, records)
            sleep(cfg.aws.sagemaker.poll_seconds)
    except KeyboardInterrupt:
        if _ask_stop(job):
            smc.stop_training_job(TrainingJobName=job["job_name"])
            raise Detached(f"asked SageMaker to stop {job['job_name']} (it saves a checkpoint first); "
                           "termtune jobs status shows when it has stopped") from None
        raise Detached(_detached_message(cfg, job)) from None


def host_lines(lines: list[tuple[int, str, str]]) -> list[str]:
    """LogTail's (timestamp, stream, message) as `[algo-1] message` lines."""
    return [f"[{stream.split('/', 1)[-1].rsplit('-', 1)[0]}] {message.rstrip()}" for _, stream, message in lines]


def _ask_stop(job: dict[str, Any]) -> bool:
    """Ctrl-C while following: True to stop the job. Without a terminal there is no one to ask, and
    stopping would throw away paid work: the job goes on."""
    if not sys.stdin.isatty():
        return False
    try:
        answer = input(f"\njob {job['job_name']} is still running (and billed). [d]etach and let it finish, "
                       "or [s]top it? [D/s] ")
    except (KeyboardInterrupt, EOFError):
        return False
    return answer.strip().lower() in ("s", "stop")


def _detached_message(cfg: Config, job: dict[str, Any]) -> str:
    return (f"training job {job['job_name']} goes on in SageMaker ({cfg.aws.region}); follow it with "
            "`termtune jobs attach <config>`, stop it with `termtune jobs stop <config>`")


def finish(cfg: Config, job: dict[str, Any], described: dict[str, Any], recent: list[str], records: Path) -> JobResult:
    """Record how the job ended. Completed: download its records, verify the artifact, record output and cost.
    Failed or Stopped: record FailureReason and raise it, after the last log lines."""
    status = described["TrainingJobStatus"]
    job.update(status=status, secondary_status=described.get("SecondaryStatus"),
               billable_seconds=described.get("BillableTimeInSeconds"),
               training_seconds=described.get("TrainingTimeInSeconds"),
               cost=sm.cost(described, cfg.aws.region, cfg.aws.sagemaker.usd_per_hour),
               ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if status != "Completed":
        job["failure_reason"] = (described.get("FailureReason")
                                 or f"(no FailureReason; {described.get('SecondaryStatus')})")
        jobrecord.save(cfg, job)
        if recent:
            emit("note", "last log lines:\n" + "\n".join(recent))
        raise UserError(f"training job {job['job_name']} {status.lower()}: {job['failure_reason']}; its checkpoints "
                        "stay in S3, so termtune train resumes from them")
    output = (described.get("ModelArtifacts") or {}).get("S3ModelArtifacts") or ""
    output = output if output.endswith("/") else output + "/"
    job.update(s3_model_artifacts=output)
    s3c = client("s3", cfg.aws.region, cfg.aws.profile)
    manifest = download_records(s3c, output + "termtune/", records)
    verify_artifact(s3c, manifest, output + "artifact/")
    job["artifact_uri"] = output + "artifact/"
    jobrecord.save(cfg, job)
    return JobResult(job)


def download_records(s3c: Any, uri: str, target: Path) -> list[s3.ArtifactFile]:
    """The job's records (metrics, report, manifest, log) into `target`; the manifest's files."""
    bucket, prefix = s3.split_uri(uri)
    remove(target)
    names = s3.download(s3c, bucket, prefix, target)
    manifest = read_json(target / s3.MANIFEST)
    if manifest is None:
        raise UserError(f"{uri}: the job wrote no {s3.MANIFEST} ({', '.join(sorted(names)) or 'nothing'}); the "
                        "artifact cannot be verified, so termtune does not deploy it")
    try:
        return [s3.ArtifactFile(f["path"], int(f["size"]), f["sha256"]) for f in manifest["files"]]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{target / s3.MANIFEST}: not a termtune manifest ({e})") from e


def verify_artifact(s3c: Any, files: list[s3.ArtifactFile], uri: str) -> None:
    """The artifact prefix holds exactly the manifest's files: no file missing or extra, each of its size
    and sha256. The job's output carries no sha256 of termtune's, so each object is read and hashed."""
    import hashlib

    bucket, prefix = s3.split_uri(uri)
    present = s3.remote_objects(s3c, bucket, prefix)
    problems = [f"{f.path} missing" for f in files if f.path not in present]
    problems += [f"{f.path} has {present[f.path]} bytes, the manifest says {f.size}"
                 for f in files if f.path in present and present[f.path] != f.size]
    problems += [f"{name} is not in the manifest" for name in sorted(set(present) - {f.path for f in files})]
    for f in files:
        if problems:
            break
        digest = hashlib.sha256()
        for chunk in s3c.get_object(Bucket=bucket, Key=prefix + f.path)["Body"].iter_chunks(16 * 2**20):
            digest.update(chunk)
        if digest.hexdigest() != f.sha256:
            problems.append(f"{f.path} has another sha256 than the manifest's")
    if problems:
        raise UserError(f"{uri} does not match the job's manifest ({'; '.join(problems[:5])}); termtune does not "
                        "deploy it")


# ----------------------------------------------------------------------------- termtune jobs


def jobs_list(cfg: Config, fp: str) -> str:
    """The recorded jobs; `fp`, the current train-stage fingerprint, marks the jobs of the current settings."""
    jobs = jobrecord.read_jobs(cfg)
    if not jobs:
        return "no SageMaker training jobs recorded in this run"
    rows = [f"{'job':<44} {'status':<11} {'submitted':<25} {'cost':>9}  settings"]
    for j in jobs:
        cost = f"${j['cost']['usd']:.2f}" if isinstance(j.get("cost"), dict) else "-"
        rows.append(f"{j['job_name']:<44} {str(j.get('status')):<11} {str(j.get('submitted_at')):<25} {cost:>9}  "
                    + ("current" if j.get("fingerprint") == fp else "other"))
    return "\n".join(rows)


def jobs_status(cfg: Config, name: str | None = None) -> str:
    """The job's state as SageMaker reports it now."""
    from termtune.aws.stage import aws_errors

    job = jobrecord.job_named(cfg, name)
    with aws_errors():
        d = client("sagemaker", job.get("region") or cfg.aws.region, cfg.aws.profile).describe_training_job(
            TrainingJobName=job["job_name"])
    lines = [f"{d['TrainingJobName']}: {d['TrainingJobStatus']} ({d.get('SecondaryStatus')})",
             f"arn         {d.get('TrainingJobArn')}"]
    for t in d.get("SecondaryStatusTransitions") or []:
        lines.append(f"  {t.get('Status')}: {t.get('StatusMessage', '')}".rstrip(": "))
    if d.get("FailureReason"):
        lines.append(f"failure     {d['FailureReason']}")
    if d.get("BillableTimeInSeconds") is not None:
        c = sm.cost(d, job.get("region") or cfg.aws.region, cfg.aws.sagemaker.usd_per_hour)
        lines.append(f"billable    {d['BillableTimeInSeconds']} s" + (f", ${c['usd']:.2f}" if c else ""))
    if (d.get("ModelArtifacts") or {}).get("S3ModelArtifacts"):
        lines.append(f"output      {d['ModelArtifacts']['S3ModelArtifacts']}")
    return "\n".join(lines)


def jobs_logs(cfg: Config, name: str | None = None) -> list[str]:
    """Every log line the job has written so far, hosts merged by time."""
    from termtune.aws.stage import aws_errors

    job = jobrecord.job_named(cfg, name)
    with aws_errors():
        logs = client("logs", job.get("region") or cfg.aws.region, cfg.aws.profile)
        return host_lines(sm.LogTail(job["job_name"]).read(logs))


def jobs_stop(cfg: Config, name: str | None = None) -> str:
    from termtune.aws.stage import aws_errors

    job = jobrecord.job_named(cfg, name)
    with aws_errors():
        smc = client("sagemaker", job.get("region") or cfg.aws.region, cfg.aws.profile)
        status = smc.describe_training_job(TrainingJobName=job["job_name"])["TrainingJobStatus"]
        if status in ENDED:
            return f"{job['job_name']} has already ended ({status}); nothing to stop"
        smc.stop_training_job(TrainingJobName=job["job_name"])
    return (f"asked SageMaker to stop {job['job_name']}: it sends SIGTERM, the job saves a checkpoint and ends "
            "Stopped; termtune jobs status shows when")


def follow_recorded(cfg: Config, job: dict[str, Any]) -> JobResult:
    """Follow a job of other settings than the current ones until it ends; its records go beside jobs.json
    (<run>/sagemaker/records/<job>), not into the train stage's outputs."""
    from termtune.aws.stage import aws_errors

    if job.get("status") in ENDED:
        return JobResult(job)
    with aws_errors():
        return follow(cfg, job, client("sagemaker", job.get("region") or cfg.aws.region, cfg.aws.profile),
                      RunLayout.of(cfg).sagemaker / "records" / job["job_name"])
