"""termtune deploy / role / cleanup: artifact folder -> S3 -> IAM role -> import job -> ARNs.

deploy reads top to bottom: check the inputs (artifact, names, region) -> set up clients ->
upload and verify the prefix -> ensure the role -> create the import job -> wait -> save
<run>/deploy.json -> record provenance. Every step can be re-run: uploads skip files
already there, a job created before an interruption is picked up again through the same
clientRequestToken, and cleanup deletes only what is still there.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from termtune import history
from termtune.aws import bedrock, iam, s3
from termtune.aws.clients import client, credentials_problem, error_code
from termtune.aws.names import safe_name
from termtune.config import Config
from termtune.errors import UserError
from termtune.export import artifact_digest
from termtune.layout import RunLayout
from termtune.rundir import read_json, write_json


@dataclass
class DeployResult:
    s3_uri: str
    model_name: str
    job_name: str
    role_arn: str | None = None
    job_arn: str | None = None
    model_arn: str | None = None
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    dry_run: bool = False
    already_deployed: bool = False

    def summary(self) -> str:
        if self.dry_run:
            return f"dry run: nothing uploaded or created (would import {self.s3_uri} as {self.model_name})"
        if self.already_deployed:
            return f"already imported: {self.model_arn}"
        return (f"uploaded {len(self.uploaded)} files, {len(self.skipped)} already in place -> {self.s3_uri}\n"
                f"import job: {self.job_arn}\nimported model: {self.model_arn}\n"
                f"next: termtune invoke <config> --term \"...\"")


# ----------------------------------------------------------------------------- names


def names(cfg: Config, artifact_sha256: str | None = None) -> dict[str, str]:
    """The S3 URI and Bedrock names this run deploys to (valid by construction unless the
    user set them). Imported-model names are unique and immutable in Bedrock, so the name
    carries the artifact's short digest: each distinct artifact imports under its own name."""
    run_name = cfg.run_dir.resolve().name
    prefix = cfg.aws.prefix.format(run_name=run_name).strip("/")
    model_name = cfg.aws.model_name or safe_name(f"termtune-{run_name}")
    if artifact_sha256:
        model_name = f"{model_name[:54]}-{artifact_sha256[:8]}"
    return {"bucket": cfg.aws.bucket or "", "prefix": f"{prefix}/",
            "s3_uri": f"s3://{cfg.aws.bucket}/{prefix}/", "model_name": model_name}


def read_record(cfg: Config) -> dict[str, Any]:
    path = RunLayout.of(cfg).deploy
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}); delete it if no deployment is in flight") from e


def _save(cfg: Config, record: dict[str, Any]) -> None:
    record["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(RunLayout.of(cfg).deploy, record)


@contextmanager
def aws_errors() -> Iterator[None]:
    """Missing credentials and unreachable endpoints are user errors, not tracebacks."""
    try:
        yield
    except Exception as e:
        problem = credentials_problem(e)
        if problem:
            raise problem from e
        raise


# ----------------------------------------------------------------------------- deploy


def deploy(cfg: Config, dry_run: bool = False) -> DeployResult:
    """Upload the validated artifact, ensure the role, import it, wait; see the module doc."""
    from termtune import validate as validate_stage

    # 1. inputs
    if not cfg.aws.bucket:
        raise UserError("aws.bucket: not set; name an S3 bucket you own (it must exist), e.g. aws.bucket=my-bucket")
    artifact = RunLayout.of(cfg).artifact
    if not artifact.is_dir():
        raise UserError(f"{artifact}: no artifact; run termtune export first")
    failed = [c for c in validate_stage.validate(artifact) if c.failed]
    if failed:
        reasons = "; ".join(f"{c.name}: {c.message}" for c in failed)
        raise UserError(f"{artifact} fails the Bedrock preflight, refusing to deploy ({reasons}); "
                        f"see termtune validate {artifact}")
    record = read_record(cfg)
    files = s3.artifact_files(artifact)
    artifact_sha = artifact_digest(read_json(RunLayout.of(cfg).manifest, {}).get("files", []))
    n = names(cfg, artifact_sha)
    if record.get("artifact_sha256") not in (None, artifact_sha) and record.get("status") not in (None, "deleted"):
        raise UserError(f"{artifact} changed since it was deployed as {record.get('model_name')}; "
                        "run `termtune run` with this config (it keeps the earlier import in the run history), "
                        "or termtune cleanup first")
    resume = record.get("status") == "creating" or (record.get("status") == "InProgress" and record.get("job_arn"))
    job_name = cfg.aws.job_name or (record.get("job_name") if resume else None) or \
        f"{n['model_name'][:44]}-{time.strftime('%Y%m%d-%H%M%S')}"
    token = record.get("client_request_token") if resume else None
    token = token or hashlib.sha256(f"{cfg.run_dir.resolve()}|{n['s3_uri']}|{n['model_name']}|{job_name}"
                                    .encode()).hexdigest()[:32]
    probe_role = cfg.aws.role_arn or f"arn:aws:iam::123456789012:role/{cfg.aws.role_name}"
    bedrock.check_request(cfg.aws.region, job_name, n["model_name"], probe_role, n["s3_uri"], token)

    if dry_run:
        print(f"would upload {len(files)} files ({sum(f.size for f in files) / 1e6:.1f} MB) to {n['s3_uri']} "
              f"with SSE {cfg.aws.sse}", file=sys.stderr)
        print(ensure_role(cfg, dry_run=True), file=sys.stderr)
        print(f"would create import job {job_name} -> imported model {n['model_name']} in {cfg.aws.region}",
              file=sys.stderr)
        return DeployResult(n["s3_uri"], n["model_name"], job_name, dry_run=True)

    # 2. set up
    with aws_errors():
        br = client("bedrock", cfg.aws.region, cfg.aws.profile)
        if record.get("status") == "Completed" and record.get("model_arn"):
            if bedrock.find_model(br, record["model_name"]):
                return DeployResult(record["s3_uri"], record["model_name"], record["job_name"],
                                    record.get("role_arn"), record.get("job_arn"), record["model_arn"],
                                    already_deployed=True)
        s3c = client("s3", cfg.aws.region, cfg.aws.profile)

        # 3. upload, then prove the prefix is complete before anything imports it
        try:
            up = s3.upload(s3c, artifact, files, n["bucket"], n["prefix"], cfg.aws.sse, cfg.aws.kms_key_id)
        except Exception as e:
            if error_code(e) in ("NoSuchBucket", "AccessDenied", "403", "404"):
                raise UserError(f"aws.bucket: cannot write to s3://{n['bucket']} ({error_code(e)}); "
                                "create the bucket or check your permissions") from e
            raise
        s3.check_prefix(s3c, files, n["bucket"], n["prefix"])

        # 4. role
        role_arn = ensure_role(cfg)
        bedrock.check_request(cfg.aws.region, job_name, n["model_name"], role_arn, n["s3_uri"], token)
        record = read_record(cfg)  # ensure_role may have written role facts
        record.update({"region": cfg.aws.region, "s3_uri": n["s3_uri"], "artifact_sha256": artifact_sha,
                       "model_name": n["model_name"], "job_name": job_name, "client_request_token": token,
                       "role_arn": role_arn})

        # 5. import (or pick up the job an interrupted run created)
        job_arn = record.get("job_arn") if resume else None
        if not job_arn:
            if not resume:  # a resumed create may already exist; its token makes the retry safe
                if bedrock.find_model(br, n["model_name"]):
                    raise UserError(f"an imported model named {n['model_name']} already exists; delete it "
                                    "(termtune cleanup) or set aws.model_name")
                bedrock.check_capacity(br, cfg.aws.model_quota)
            record.update({"status": "creating", "job_arn": None, "model_arn": None, "failure_message": None})
            _save(cfg, record)  # the token is on disk before the call, so a retry reuses it
            request = {"jobName": job_name, "importedModelName": n["model_name"], "roleArn": role_arn,
                       "modelDataSource": {"s3DataSource": {"s3Uri": n["s3_uri"]}},
                       "clientRequestToken": token}
            if cfg.aws.kms_key_id:
                request["importedModelKmsKeyId"] = cfg.aws.kms_key_id
            job_arn = bedrock.create_job(br, request, cfg.aws.role_retry_minutes * 60)
            record.update({"status": "InProgress", "job_arn": job_arn})
            _save(cfg, record)

        # 6. wait
        job = bedrock.wait_for_job(br, job_arn, cfg.aws.import_timeout_minutes * 60, cfg.aws.poll_seconds)

    # 7. save and report
    if job["status"] == "Failed":
        message = job.get("failureMessage") or "(no failureMessage)"
        record.update({"status": "Failed", "failure_message": message, "client_request_token": None})
        _save(cfg, record)
        raise UserError(f"import job {job_name} failed: {message}")
    record.update({"status": "Completed", "model_arn": job["importedModelArn"]})
    _save(cfg, record)
    return DeployResult(n["s3_uri"], n["model_name"], job_name, role_arn, job_arn, record["model_arn"],
                        up.uploaded, up.skipped)


# ----------------------------------------------------------------------------- role


def ensure_role(cfg: Config, dry_run: bool = False) -> str:
    """The CMI service role ARN: aws.role_arn as given, or `aws.role_name` created or reused.
    With dry_run, the trust and permission policies as text instead (nothing is created)."""
    if cfg.aws.role_arn:
        return f"uses the existing role {cfg.aws.role_arn} (aws.role_arn); no policy changes" \
            if dry_run else cfg.aws.role_arn
    if not cfg.aws.bucket:
        raise UserError("aws.bucket: not set; the role's policy grants read access to that bucket only")
    n = names(cfg)
    kms = cfg.aws.kms_key_id if cfg.aws.sse == "aws:kms" or cfg.aws.kms_key_id else None
    account = _account(cfg, required=not dry_run)
    trust = iam.trust_policy(account, cfg.aws.region)
    permissions = iam.permissions_policy(account, cfg.aws.region, n["bucket"], n["prefix"], kms)
    if dry_run:
        return (f"role {cfg.aws.role_name}\ntrust policy:\n{json.dumps(trust, indent=2)}\n"
                f"permissions policy ({iam.POLICY_NAME}):\n{json.dumps(permissions, indent=2)}")
    with aws_errors():
        arn, created = iam.create_or_update(client("iam", cfg.aws.region, cfg.aws.profile),
                                           cfg.aws.role_name, trust, permissions)
    record = read_record(cfg)
    # "created" sticks: a later deploy that reuses the role must not make cleanup forget it.
    record.update({"role_name": cfg.aws.role_name, "role_arn": arn,
                   "role_created": bool(created or (record.get("role_created") and record.get("role_arn") == arn))})
    _save(cfg, record)
    return arn


def _account(cfg: Config, required: bool) -> str:
    try:
        with aws_errors():
            return client("sts", cfg.aws.region, cfg.aws.profile).get_caller_identity()["Account"]
    except Exception:
        if required:
            raise
        return "<ACCOUNT_ID>"


# ----------------------------------------------------------------------------- cleanup


def cleanup(cfg: Config, yes: bool = False) -> list[str]:
    """Delete every model this run directory imported (the current one and earlier attempts still
    live in the run history), their S3 prefixes, and the role if termtune created it."""
    layout = RunLayout.of(cfg)
    record = read_record(cfg)
    n = names(cfg)
    imports = ([record] if record else []) + history.live_imports(layout)
    models = [r.get("model_arn") or r.get("model_name") for r in imports if r.get("model_arn") or r.get("model_name")]
    if not imports and cfg.aws.model_name:
        models = [cfg.aws.model_name]
    prefixes = list(dict.fromkeys(r["s3_uri"] for r in imports if r.get("s3_uri"))) or \
        ([n["s3_uri"]] if cfg.aws.bucket else [])
    owner = next((r for r in imports if r.get("role_created") and r.get("role_name")), None)
    role = owner["role_name"] if owner else None
    plan = [f"imported model {m}" for m in models] + [f"everything under {uri}" for uri in prefixes] + \
        ([f"IAM role {role} (termtune created it)"] if role else [])
    if not plan:
        print("nothing recorded to delete", file=sys.stderr)
        return []
    print("will delete:\n  " + "\n  ".join(plan), file=sys.stderr)
    if not yes:
        if not sys.stdin.isatty():
            raise UserError("cleanup deletes cloud resources; pass --yes to confirm when not at a terminal")
        if input("proceed? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted", file=sys.stderr)
            return []
    with aws_errors():
        done = []
        region = record.get("region") or cfg.aws.region
        br = client("bedrock", region, cfg.aws.profile)
        for model in models:
            if bedrock.delete_model(br, model):
                done.append(f"deleted imported model {model}")
        for uri in prefixes:
            bucket, prefix = s3.split_uri(uri)
            try:
                count = s3.delete_prefix(client("s3", region, cfg.aws.profile), bucket, prefix)
            except Exception as e:
                if error_code(e) != "NoSuchBucket":
                    raise
                count = 0
            if count:
                done.append(f"deleted {count} objects under {uri}")
        if role and iam.delete(client("iam", region, cfg.aws.profile), role):
            done.append(f"deleted IAM role {role}")
    print("\n".join(done) if done else "nothing left to delete", file=sys.stderr)
    history.mark_deleted(layout, {r.get("model_arn") for r in imports if r.get("model_arn")})
    if record:
        record.update({"status": "deleted", "deleted_model_arn": record.get("model_arn"), "model_arn": None,
                       "role_created": False if role else record.get("role_created")})
        _save(cfg, record)
    return done
