"""termtune deploy / role / cleanup: artifact folder -> S3 -> IAM role -> import job -> ARNs.

deploy reads top to bottom: check the inputs (artifact, names, region) -> set up clients ->
upload and verify the prefix -> ensure the role -> create the import job -> wait -> save
<run>/deploy.json -> record provenance. Every step can be re-run: uploads skip files
already there, a job created before an interruption is picked up again through the same
clientRequestToken, and cleanup deletes only what is still there.

Run directories never share S3 objects or IAM policies: the first deploy gives the run a random
id (<run>/deploy-id) that ends both of its S3 prefixes and names its inline policy on the role.
deploy.json lists every object before the first byte of it is sent, and cleanup deletes only
listed objects, under prefixes that carry this run's id.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from termtune import history
from termtune.aws import bedrock, costs, iam, jobrecord, s3
from termtune.aws.clients import client, credentials_problem, error_code, error_message
from termtune.aws.names import bucket_problem, job_name_for, role_name_problem, safe_name
from termtune.config import Config
from termtune.errors import UserError
from termtune.events import emit
from termtune.export import artifact_digest
from termtune.layout import RunLayout
from termtune.results import StageResult
from termtune.rundir import read_json, sha256_file, write_json
from termtune.safepath import name_problem


@dataclass(repr=False)
class DeployResult(StageResult):
    """Where `termtune deploy` uploaded the artifact and what it imported (or would, with dry_run)."""

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
    facts: dict[str, Any] = field(default_factory=dict)  # GetImportedModel's architecture, CMUs, key
    cost: dict[str, Any] | None = None

    def summary(self) -> str:
        if self.dry_run:
            return f"dry run: nothing uploaded or created (would import {self.s3_uri} as {self.model_name})"
        local = f" ({self.facts['localStandIn']})" if self.facts.get("localStandIn") else ""
        if self.already_deployed:
            return f"already imported: {self.model_arn}{local}"
        return (f"uploaded {len(self.uploaded)} files, {len(self.skipped)} already in place -> {self.s3_uri}\n"
                f"import job: {self.job_arn}{local}\nimported model: {self.model_arn}{local}\n"
                + (costs.describe(self.facts, self.cost) + "\n" if self.facts else "")
                + "next: termtune invoke <config> --term \"...\"")


# ----------------------------------------------------------------------------- names


RUN_ID_RE = r"[0-9a-f]{12}"


def run_id(cfg: Config, create: bool = True) -> str | None:
    """This run's id, from <run>/deploy-id: 12 random hex digits (48 bits, so two runs sharing a
    bucket practically never draw the same), made once when `create` and never changed, so every
    re-deploy of the run uses the same prefixes and policy. None when there is none yet."""
    path = RunLayout.of(cfg).deploy_id
    if create and not os.path.lexists(path):
        # Written aside, then linked into place: a second process making one at the same time
        # (a dry run needs no lock) fails to link and reads the first one's id instead.
        aside = path.with_name(f".deploy-id.{os.getpid()}.tmp")
        aside.unlink(missing_ok=True)  # left by a process with this pid that was killed right here
        with os.fdopen(os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "w") as out:
            out.write(secrets.token_hex(6) + "\n")
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        finally:
            aside.unlink()
    if path.is_symlink():
        raise UserError(f"{path}: a symbolic link; termtune keeps this run's id there and follows no link, "
                        "replace it with the file it points to")
    if not path.is_file():
        return None
    rid = path.read_text(encoding="utf-8", errors="replace").strip()
    if not re.fullmatch(RUN_ID_RE, rid):
        raise UserError(f"{path}: not a termtune run id (12 hex digits); it names this run's S3 prefixes and "
                        "IAM policy: restore it (deploy.json's run_id holds a copy)")
    return rid


def names(cfg: Config, rid: str, artifact_sha256: str | None = None, taken: set[str] = frozenset()) -> dict[str, str]:
    """The S3 URI and Bedrock names this run deploys to (valid by construction unless the
    user set them). The prefix is aws.prefix with `-<run id>` appended, so two runs whose
    directories share a name (p1/demo, p2/demo) never share objects. Imported-model names are
    unique and immutable in Bedrock, so a derived name carries the run's id and the artifact's
    short digest (each run, and each distinct artifact, imports under its own name); a name the
    user set is used as it is, unless an earlier attempt of this run already took it."""
    run_name = cfg.run_dir.resolve().name
    prefix = cfg.aws.prefix.format(run_name=run_name).strip("/")
    problem = name_problem(prefix)
    if problem:  # Bedrock's reader (and termtune serve's) refuses such keys; say so before uploading them
        raise UserError(f"aws.prefix: {cfg.aws.prefix!r} gives the S3 prefix {prefix!r}, which {problem}; "
                        "use folder names separated by single slashes")
    prefix = f"{prefix}-{rid}"
    model_name = cfg.aws.model_name or f"{safe_name(f'termtune-{run_name}', limit=35)}-{rid}"
    if artifact_sha256 and (not cfg.aws.model_name or model_name in taken):
        model_name = f"{model_name[:54]}-{artifact_sha256[:8]}"
    parent, _, last = prefix.rpartition("/")
    # termtune's own files (manifest, model card) sit beside the import prefix, not in it:
    # Bedrock validates everything under s3Uri, and the role may read only that.
    meta = f"{parent}/{s3.META_FOLDER}/{last}/" if parent else f"{s3.META_FOLDER}/{last}/"
    return {"bucket": cfg.aws.bucket or "", "prefix": f"{prefix}/", "meta_prefix": meta,
            "s3_uri": f"s3://{cfg.aws.bucket}/{prefix}/", "model_name": model_name}


def sagemaker_root(cfg: Config, rid: str) -> str:
    """s3://bucket/<parent>/sagemaker/<run>-<id>/, where this run's SageMaker jobs read and write: beside the
    import prefix, never inside it (Bedrock imports everything under that one)."""
    prefix = names(cfg, rid)["prefix"].rstrip("/")
    parent, _, last = prefix.rpartition("/")
    return f"s3://{cfg.aws.bucket}/{parent + '/' if parent else ''}sagemaker/{last}/"


def trained_job(cfg: Config) -> dict[str, Any] | None:
    """With train.on=sagemaker, the Completed training job whose artifact deploy imports (UserError when there
    is none for the current settings); None when the run trains locally."""
    if cfg.train.on != "sagemaker":
        return None
    job = jobrecord.completed_job(cfg)
    if job is None:
        raise UserError("deploy: train.on=sagemaker, and no training job of this run completed with the current "
                        "settings; run termtune train --on sagemaker (or termtune jobs attach) first")
    return job


def import_source(cfg: Config, n: dict[str, str]) -> dict[str, str]:
    """`names` with the import prefix moved to the SageMaker job's artifact when the run trains there."""
    job = trained_job(cfg)
    if job is None:
        return n
    bucket, prefix = s3.split_uri(job["artifact_uri"])
    return {**n, "bucket": bucket, "prefix": prefix, "s3_uri": job["artifact_uri"]}


def read_record(cfg: Config) -> dict[str, Any]:
    return read_json(RunLayout.of(cfg).deploy, {})


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
    from termtune.validate import validate

    # 1. inputs
    check_names(cfg)
    artifact = RunLayout.of(cfg).artifact
    job = trained_job(cfg)
    if job is None:
        if not artifact.is_dir():
            raise UserError(f"{artifact}: no artifact; run termtune export first")
        failed = [c for c in validate(artifact) if c.failed]
        if failed:
            reasons = "; ".join(f"{c.name}: {c.message}" for c in failed)
            raise UserError(f"{artifact} fails the Bedrock preflight, refusing to deploy ({reasons}); "
                            f"see termtune validate {artifact}")
        files = s3.artifact_files(artifact)
        manifest = read_json(RunLayout.of(cfg).manifest, {})
    else:  # the SageMaker job's artifact, imported where the job wrote it: nothing is uploaded
        manifest = read_json(RunLayout.of(cfg).job_records / s3.MANIFEST, {})
        files = [s3.ArtifactFile(f["path"], f["size"], f["sha256"]) for f in manifest.get("files", [])]
    record = read_record(cfg)
    model_files = [f for f in files if f.path not in s3.TERMTUNE_FILES]
    own_files = [f for f in files if f.path in s3.TERMTUNE_FILES]
    artifact_sha = artifact_digest(manifest.get("files", []))
    earlier = {e.get("deploy", {}).get("model_name") for e in history.read(RunLayout.of(cfg)) if e.get("stage") == "deploy"}
    rid = run_id(cfg)
    n = import_source(cfg, names(cfg, rid, artifact_sha, taken=earlier))
    if record.get("artifact_sha256") not in (None, artifact_sha) and record.get("status") not in (None, "deleted"):
        raise UserError(f"{artifact} changed since it was deployed as {record.get('model_name')}; "
                        "run `termtune run` with this config (it keeps the earlier import in the run history), "
                        "or termtune cleanup first")
    resume = record.get("status") == "creating" or (record.get("status") == "InProgress" and record.get("job_arn"))
    job_name = cfg.aws.job_name or (record.get("job_name") if resume else None) or \
        job_name_for(n["model_name"], time.strftime("%Y%m%d-%H%M%S"))
    token = record.get("client_request_token") if resume else None
    token = token or hashlib.sha256(f"{cfg.run_dir.resolve()}|{n['s3_uri']}|{n['model_name']}|{job_name}"
                                    .encode()).hexdigest()[:32]
    probe_role = cfg.aws.role_arn or f"arn:aws:iam::123456789012:role/{cfg.aws.role_name}"
    fields = _request_fields(cfg, n, job_name, token)
    bedrock.check_request(cfg.aws.region, fields + [("roleArn", probe_role, "aws.role_arn")])

    if dry_run:
        if job is not None:
            emit("note", f"would import the {len(model_files)} files training job {job['job_name']} wrote to "
                         f"{n['s3_uri']} (no upload)")
        else:
            emit("note", f"would upload {len(model_files)} files ({sum(f.size for f in model_files) / 1e6:.1f} MB) "
                         f"to {n['s3_uri']} with SSE {cfg.aws.sse}, and termtune's "
                         f"{', '.join(f.path for f in own_files)} to s3://{n['bucket']}/{n['meta_prefix']}")
        emit("note", _role_plan(cfg, rid))
        emit("note", f"would create import job {job_name} -> imported model {n['model_name']} in {cfg.aws.region}")
        return DeployResult(n["s3_uri"], n["model_name"], job_name, dry_run=True)

    # 2. set up
    with aws_errors():
        br = client("bedrock", cfg.aws.region, cfg.aws.profile)
        if record.get("status") == "Completed" and record.get("model_arn"):
            if bedrock.find_model(br, record["model_name"]):
                return DeployResult(record["s3_uri"], record["model_name"], record["job_name"],
                                    record.get("role_arn"), record.get("job_arn"), record["model_arn"],
                                    already_deployed=True, facts=record.get("imported_model") or {})
        model_key = model_kms_key_arn(cfg) if cfg.aws.model_kms_key_id else None
        s3c = client("s3", cfg.aws.region, cfg.aws.profile)

        # 3. upload, then prove the import prefix holds exactly the model before anything imports it
        if job is not None:  # the job's output was hashed against its manifest when the job ended
            s3.check_prefix(s3c, model_files, n["bucket"], n["prefix"], hashes=False)
            up = s3.UploadResult([], [f.path for f in model_files], 0)
        else:
            card = RunLayout.of(cfg).model_card
            card_files = [s3.ArtifactFile(card.name, card.stat().st_size, sha256_file(card))] if card.is_file() else []
            _record_uploads(cfg, rid, {n["s3_uri"]: model_files,
                                       f"s3://{n['bucket']}/{n['meta_prefix']}": own_files + card_files})
            try:
                for prefix in (n["prefix"], n["meta_prefix"]):  # what an interrupted upload left open
                    if s3.abort_uploads(s3c, n["bucket"], prefix):
                        emit("note", f"aborted the incomplete multipart uploads an interrupted deploy left under "
                                     f"s3://{n['bucket']}/{prefix}")
                up = s3.upload(s3c, artifact, model_files, n["bucket"], n["prefix"], cfg.aws.sse, cfg.aws.kms_key_id)
                s3.upload(s3c, artifact, own_files, n["bucket"], n["meta_prefix"], cfg.aws.sse, cfg.aws.kms_key_id,
                          progress=False)
                if card_files:  # the model card travels with termtune's own files, outside the import prefix
                    s3.upload(s3c, card.parent, card_files, n["bucket"], n["meta_prefix"], cfg.aws.sse,
                              cfg.aws.kms_key_id, progress=False)
            except Exception as e:
                if error_code(e) in ("NoSuchBucket", "AccessDenied", "403", "404"):
                    raise UserError(f"aws.bucket: cannot write to s3://{n['bucket']} ({error_code(e)}); "
                                    "create the bucket or check your permissions") from e
                raise
            s3.check_prefix(s3c, model_files, n["bucket"], n["prefix"])

        # 4. role
        role_arn, role_created_now = _ensure_role(cfg, rid)
        bedrock.check_request(cfg.aws.region, [("roleArn", role_arn, "aws.role_arn")])
        record = read_record(cfg)  # ensure_role may have written role facts
        record.update({"region": cfg.aws.region, "s3_uri": n["s3_uri"], "artifact_sha256": artifact_sha,
                       "termtune_files_uri": job["s3_model_artifacts"] + "termtune/" if job
                       else f"s3://{n['bucket']}/{n['meta_prefix']}",
                       "sagemaker_job": job and job["job_name"],
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
            record.update({"status": "creating", "job_arn": None, "model_arn": None, "failure_message": None,
                           "role_retry_messages": []})
            _save(cfg, record)  # the token is on disk before the call, so a retry reuses it
            request = {"jobName": job_name, "importedModelName": n["model_name"], "roleArn": role_arn,
                       "modelDataSource": {"s3DataSource": {"s3Uri": n["s3_uri"]}},
                       "clientRequestToken": token}
            if model_key:
                request["importedModelKmsKeyId"] = model_key

            def role_retry(message: str) -> None:  # kept verbatim: AWS documents no wording for it
                record["role_retry_messages"].append(message)
                _save(cfg, record)

            # Only a role termtune has just created can be "not there yet"; any other role error is final.
            retry_s = cfg.aws.role_retry_minutes * 60 if role_created_now else 0.0
            job_arn = bedrock.create_job(br, request, retry_s, role_retry)
            record.update({"status": "InProgress", "job_arn": job_arn})
            _save(cfg, record)

        # 6. wait, then read what the import costs
        job = bedrock.wait_for_job(br, job_arn, cfg.aws.import_timeout_minutes * 60, cfg.aws.poll_seconds)
        if job.get("status") == "Completed":
            model_arn = job.get("importedModelArn") or (bedrock.find_model(br, n["model_name"]) or {}).get("modelArn")
            if not model_arn:
                raise UserError(f"import job {job_name} is Completed but Bedrock names no imported model; "
                                f"check aws bedrock get-model-import-job --job-identifier {job_arn}")
            facts = costs.import_facts(br.get_imported_model(modelIdentifier=model_arn))

    # 7. save and report
    if job.get("status") != "Completed":
        message = job.get("failureMessage") or "(no failureMessage)"
        record.update({"status": "Failed", "failure_message": message, "client_request_token": None})
        _save(cfg, record)
        raise UserError(f"import job {job_name} failed: {message}")
    cost = costs.estimate(facts, cfg.aws.region, cfg.aws.cmu_prices)
    record.update({"status": "Completed", "model_arn": model_arn, "imported_model": facts, "cost_estimate": cost})
    _save(cfg, record)
    return DeployResult(n["s3_uri"], n["model_name"], job_name, role_arn, job_arn, model_arn,
                        up.uploaded, up.skipped, facts=facts, cost=cost)


def imported_model_gone(cfg: Config) -> str | None:
    """Why the model deploy.json records as imported is no longer there (deleted outside termtune:
    GetImportedModel answers ResourceNotFoundException), or None while it exists."""
    record = read_record(cfg)
    arn = record.get("model_arn")
    if not arn:
        return None
    try:
        with aws_errors():
            client("bedrock", record.get("region") or cfg.aws.region, cfg.aws.profile).get_imported_model(
                modelIdentifier=arn)
    except Exception as e:
        code = error_code(e)
        if code == "ResourceNotFoundException":
            return f"the imported model {arn} no longer exists in Bedrock (deleted outside termtune)"
        if code is None:
            raise
        raise UserError(f"deploy: cannot check that the imported model {arn} still exists (GetImportedModel: "
                        f"{code}: {error_message(e)}); the caller needs bedrock:GetImportedModel") from e
    return None


def _request_fields(cfg: Config, n: dict[str, str], job_name: str, token: str) -> list[tuple[str, str, str]]:
    """The request's fields with the config key each one comes from, so an error blames the
    key the user set (a derived job name comes from the model name, a model name from run.dir)."""
    fields = [("jobName", job_name, "aws.job_name" if cfg.aws.job_name else "aws.model_name"),
              ("importedModelName", n["model_name"], "aws.model_name" if cfg.aws.model_name else "run.dir"),
              ("s3Uri", n["s3_uri"], "aws.prefix"),  # check_names vetted the bucket
              ("clientRequestToken", token, "clientRequestToken")]
    if cfg.aws.model_kms_key_id:
        fields.append(("importedModelKmsKeyId", cfg.aws.model_kms_key_id, "aws.model_kms_key_id"))
    return fields


# ----------------------------------------------------------------------------- role


def ensure_role(cfg: Config, dry_run: bool = False) -> str:
    """The CMI service role ARN: aws.role_arn as given, or `aws.role_name` created or reused,
    with this run's inline policy. With dry_run, the trust and permission policies as text
    instead (nothing is created)."""
    check_names(cfg)
    if dry_run:
        return _role_plan(cfg, run_id(cfg, create=False) or "<run id>")
    return _ensure_role(cfg, run_id(cfg))[0]


def _role_plan(cfg: Config, rid: str) -> str:
    if cfg.aws.role_arn:
        return f"uses the existing role {cfg.aws.role_arn} (aws.role_arn); no policy changes"
    trust, permissions = _role_policies(cfg, rid, dry_run=True)
    return (f"role {cfg.aws.role_name}\ntrust policy:\n{json.dumps(trust, indent=2)}\n"
            f"permissions policy ({iam.policy_name(rid)}, this run's; other runs' policies on the role stay):\n"
            f"{json.dumps(permissions, indent=2)}")


def _role_policies(cfg: Config, rid: str, dry_run: bool) -> tuple[dict, dict]:
    n = import_source(cfg, names(cfg, rid))
    account = caller_account(cfg, required=not dry_run)
    key_arn = kms_key_arn(cfg, required=not dry_run) if cfg.aws.kms_key_id else None
    job = trained_job(cfg)
    if job and job["request"]["OutputDataConfig"].get("KmsKeyId"):  # the job's output key (a key ARN)
        key_arn = job["request"]["OutputDataConfig"]["KmsKeyId"]
    trust = iam.trust_policy(account, cfg.aws.region)
    permissions = iam.permissions_policy(n["bucket"], n["prefix"], account, key_arn)
    return trust, permissions


def _ensure_role(cfg: Config, rid: str) -> tuple[str, bool]:
    """(role ARN, whether termtune created it in this call)."""
    if cfg.aws.role_arn:
        return cfg.aws.role_arn, False
    trust, permissions = _role_policies(cfg, rid, dry_run=False)
    policy = iam.policy_name(rid)
    record = read_record(cfg)
    # Recorded before the call: a deploy killed just after it still leaves the policy to cleanup.
    granted = [g for g in record.get("role_policies", []) if isinstance(g, dict)]
    if {"role_name": cfg.aws.role_name, "policy_name": policy} not in granted:
        record["role_policies"] = granted + [{"role_name": cfg.aws.role_name, "policy_name": policy}]
        _save(cfg, record)
    with aws_errors():
        arn, created = iam.create_or_update(client("iam", cfg.aws.region, cfg.aws.profile),
                                           cfg.aws.role_name, trust, permissions, policy)
    # "created" sticks: it says the role is termtune's (cleanup deletes it once no run uses it).
    record.update({"role_name": cfg.aws.role_name, "role_arn": arn,
                   "role_created": bool(created or (record.get("role_created") and record.get("role_arn") == arn))})
    _save(cfg, record)
    return arn, created


def check_names(cfg: Config) -> None:
    """The bucket and role names AWS would refuse, refused first (also by a dry run), in one line
    naming the setting."""
    bucket = cfg.aws.bucket
    if not bucket:
        raise UserError("aws.bucket: not set; name an S3 bucket you own (it must exist), e.g. aws.bucket=my-bucket")
    problem = bucket_problem(bucket)
    if problem:
        raise UserError(f"aws.bucket: {bucket!r} is not a valid S3 bucket name: it {problem}")
    key, role = ("aws.role_arn", cfg.aws.role_arn.rsplit("/", 1)[-1]) if cfg.aws.role_arn \
        else ("aws.role_name", cfg.aws.role_name)
    problem = role_name_problem(role)
    if problem:
        raise UserError(f"{key}: {role!r} is not a valid IAM role name: it {problem}")


# ----------------------------------------------------------------------------- KMS keys


def kms_key_arn(cfg: Config, required: bool = True) -> str:
    """aws.kms_key_id (key id, alias name, alias ARN or key ARN) as the key ARN, from
    kms:DescribeKey: IAM authorises kms:Decrypt only on a key ARN, never through an alias."""
    key = cfg.aws.kms_key_id or ""
    try:
        return usable_key(cfg, key, "aws.kms_key_id")["Arn"]
    except Exception:
        if not required:
            return f"<the key ARN kms:DescribeKey gives for {key}>"
        raise


def model_kms_key_arn(cfg: Config) -> str:
    """aws.model_kms_key_id as the key ARN, refused unless Bedrock can encrypt the model with it: it
    exists, is enabled, in aws.region, and is a symmetric encryption key (Bedrock User Guide,
    import-model-using-cmk.html). A key in another account is allowed with a warning: a central
    key account is a deliberate set-up, and DescribeKey answering at all means that key's policy
    already lets this account in; whether it also grants Bedrock, termtune cannot read from here."""
    key = cfg.aws.model_kms_key_id or ""
    meta = usable_key(cfg, key, "aws.model_kms_key_id")
    spec = meta.get("KeySpec") or meta.get("CustomerMasterKeySpec") or "SYMMETRIC_DEFAULT"
    if spec != "SYMMETRIC_DEFAULT":  # the only spec whose usage is ENCRYPT_DECRYPT with symmetric keys
        raise UserError(f"aws.model_kms_key_id: {meta['Arn']} is a {spec} key; Bedrock encrypts imported models "
                        "only with a symmetric encryption key (SYMMETRIC_DEFAULT)")
    owner, account = meta["Arn"].split(":")[4], caller_account(cfg, required=True)
    if owner != account:
        emit("note", f"aws.model_kms_key_id: {meta['Arn']} belongs to account {owner}, not yours ({account}); the "
                     "import works only if that key's policy also grants Bedrock kms:CreateGrant, kms:DescribeKey, "
                     "kms:GenerateDataKey and kms:Decrypt for your account")
    return meta["Arn"]


def usable_key(cfg: Config, key: str, setting: str) -> dict[str, Any]:
    """kms:DescribeKey's KeyMetadata for `key`, refused (one line naming `setting`) when the key does
    not exist, is not enabled, or lives outside aws.region: KMS keys are regional, and S3 and
    Bedrock use a key only in their own region."""
    region = cfg.aws.region
    try:
        with aws_errors():
            meta = client("kms", region, cfg.aws.profile).describe_key(KeyId=key)["KeyMetadata"]
    except Exception as e:
        if isinstance(e, UserError) or error_code(e) is None:
            raise
        named = key.split(":")[3] if key.startswith("arn:") and key.count(":") >= 5 else region
        where = f"; the key ARN names {named}, but the import runs in {region} (aws.region)" if named != region else ""
        raise UserError(f"{setting}: cannot resolve {key!r} to a key ARN with kms:DescribeKey in {region} "
                        f"({error_code(e)}: {error_message(e)}){where}") from e
    key_region = meta["Arn"].split(":")[3]
    if key_region != region:
        raise UserError(f"{setting}: {meta['Arn']} is a key in {key_region}, but the import runs in {region} "
                        "(aws.region); KMS keys are regional: use a key made in that region")
    if meta.get("KeyState", "Enabled") != "Enabled":
        raise UserError(f"{setting}: {meta['Arn']} is {meta['KeyState']}, not Enabled; enable it "
                        "(aws kms enable-key) or name another key")
    return meta


def caller_account(cfg: Config, required: bool) -> str:
    try:
        with aws_errors():
            return client("sts", cfg.aws.region, cfg.aws.profile).get_caller_identity()["Account"]
    except Exception:
        if required:
            raise
        return "<ACCOUNT_ID>"


# ----------------------------------------------------------------------------- what this run uploaded


def _record_uploads(cfg: Config, rid: str, uploads: dict[str, list[s3.ArtifactFile]]) -> None:
    """Add the objects about to be sent to deploy.json's `uploads` (URI -> names), before the first
    byte goes: a deploy killed mid-upload leaves every object it may have written to cleanup."""
    record = read_record(cfg)
    recorded = record.get("uploads") if isinstance(record.get("uploads"), dict) else {}
    for uri, files in uploads.items():
        recorded[uri] = sorted(set(recorded.get(uri, [])) | {f.path for f in files})
    uris = list(uploads)
    record.update({"run_id": rid, "uploads": recorded, "s3_uri": uris[0], "termtune_files_uri": uris[1]})
    _save(cfg, record)


def _own_uploads(cfg: Config, records: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Every object the records say this run uploaded (URI -> names), after checking that each
    recorded URI is one of this run's prefixes: a real bucket, not its root, its last folder
    ending in this run's id. A record edited by hand or copied from another run is refused
    whole (UserError), before anything is deleted."""
    rid = run_id(cfg, create=False)
    where = RunLayout.of(cfg).deploy
    out: dict[str, set[str]] = {}
    for record in records:
        uploads = record.get("uploads") if isinstance(record.get("uploads"), dict) else {}
        # a SageMaker job's artifact was imported where the job wrote it: deploy uploaded nothing there
        imported = [] if record.get("sagemaker_job") else [record.get("s3_uri"), record.get("termtune_files_uri")]
        for uri in [*uploads, *imported]:
            if uri is None:
                continue
            problem = _foreign_uri(uri, rid)
            if problem:
                raise UserError(f"{where}: refusing to clean up {uri!r}: {problem}; nothing was deleted. Was "
                                "deploy.json edited or copied from another run? Delete what is yours there by hand")
        for uri, keys in uploads.items():
            bad = [k for k in keys if not isinstance(k, str) or name_problem(k)] if isinstance(keys, list) else [keys]
            if bad:
                raise UserError(f"{where}: refusing to clean up {uri!r}: the recorded object name {bad[0]!r} is not "
                                "a plain name under that prefix; nothing was deleted")
            out.setdefault(uri, set()).update(keys)
    return out


def _job_uploads(cfg: Config, jobs: list[dict[str, Any]]) -> dict[str, set[str]]:
    """The channel files the run's training jobs uploaded (URI -> names), each URI checked to be one of this
    run's channels (a jobs.json edited by hand or copied from another run is refused whole)."""
    out: dict[str, set[str]] = {}
    rid = run_id(cfg, create=False)
    for job in jobs:
        for channel, upload in (job.get("uploads") or {}).items():
            uri, files = (upload.get("uri"), upload.get("files", [])) if isinstance(upload, dict) else (None, None)
            bad = [f for f in files if not isinstance(f, str) or name_problem(f)] if isinstance(files, list) else [files]
            if rid is None or uri != f"{sagemaker_root(cfg, rid)}{channel}/" or bad:
                raise UserError(f"{RunLayout.of(cfg).jobs}: refusing to clean up {uri!r}: not one of this run's "
                                "SageMaker channels, or a file name that is not plain; nothing was deleted. Was "
                                "jobs.json edited or copied from another run?")
            out.setdefault(uri, set()).update(files)
    return out


def _foreign_uri(uri: Any, rid: str | None) -> str | None:
    """Why `uri` is not one of this run's prefixes, or None when it is."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        return "not an s3:// URI"
    bucket, prefix = s3.split_uri(uri)
    if bucket_problem(bucket):
        return f"{bucket!r} is not a bucket name"
    if not prefix.strip("/"):
        return "it is the root of the bucket"
    if name_problem(prefix.rstrip("/")):
        return f"its prefix {name_problem(prefix.rstrip('/'))}"
    if rid is None:
        return "this run has no deploy-id (the id that names its prefixes), so none of its uploads can be there"
    if not prefix.rstrip("/").endswith(f"-{rid}"):
        return f"it is outside this run's prefixes (which end in -{rid}/)"
    return None


# ----------------------------------------------------------------------------- cleanup


def cleanup(cfg: Config, yes: bool = False) -> list[str]:
    """Delete every model this run directory imported (the current one and earlier attempts still
    live in the run history; each after its import job has ended), the S3 objects it recorded
    uploading, and its policy on the role (the role too once termtune made it and no run uses it),
    in that order, so nothing a running import still reads goes first. Only what the records
    name is deleted: a run that never deployed deletes nothing."""
    record = read_record(cfg)
    layout = RunLayout.of(cfg)
    imports = ([record] if record else []) + history.live_imports(layout)
    deploys = ([record] if record else []) + [e["deploy"] for e in history.read(layout)
                                              if e.get("stage") == "deploy" and isinstance(e.get("deploy"), dict)]
    uploads = _own_uploads(cfg, deploys)
    grants = list(dict.fromkeys((g["role_name"], g["policy_name"]) for d in deploys
                                for g in d.get("role_policies", []) if isinstance(g, dict)
                                and isinstance(g.get("role_name"), str) and isinstance(g.get("policy_name"), str)))
    plan = [f"imported model {i.get('model_arn') or i.get('model_name')}"
            + (f" (after import job {i['job_name']} ends)" if i.get("job_name") else "")
            for i in imports if i.get("model_arn") or i.get("model_name")]
    jobs = jobrecord.read_jobs(cfg)
    running = [j["job_name"] for j in jobs if j.get("status") in ("creating", "InProgress", "Stopping")]
    if running:
        raise UserError(f"training job {', '.join(running)} may still be running and reads this run's S3 files and "
                        "role; stop it (termtune jobs stop) or let it end, then clean up; nothing was deleted")
    uploads |= _job_uploads(cfg, jobs)
    grants += list(dict.fromkeys((j["role_name"], j["role_policy"]) for j in jobs
                                 if isinstance(j.get("role_name"), str) and isinstance(j.get("role_policy"), str)))
    plan += [f"the {len(keys)} objects this run uploaded under {uri}" for uri, keys in uploads.items()]
    plan += [f"this run's policy {policy} on IAM role {role} (the role too, if termtune created it and no other "
             "run uses it)" for role, policy in grants]
    if not plan:
        emit("note", "nothing recorded to delete")
        return []
    emit("note", "will delete:\n  " + "\n  ".join(plan))
    if jobs:
        emit("note", f"will keep the training jobs' output and checkpoints under {jobs[-1].get('s3_root')} (the "
                     "trained models: delete them yourself once they are no longer wanted)")
    if not yes:
        if not sys.stdin.isatty():
            raise UserError("cleanup deletes cloud resources; pass --yes to confirm when not at a terminal")
        if input("proceed? [y/N] ").strip().lower() not in ("y", "yes"):
            emit("note", "nothing deleted")
            return []
    with aws_errors():
        done = []
        region = record.get("region") or cfg.aws.region
        br = client("bedrock", region, cfg.aws.profile)
        for entry in imports:
            deleted = bedrock.release_import(br, entry, cfg.aws.import_timeout_minutes * 60, cfg.aws.poll_seconds)
            if deleted:
                done.append(f"deleted imported model {deleted}")
        s3c = client("s3", region, cfg.aws.profile)
        for uri, keys in uploads.items():
            what = _delete_uploads(s3c, uri, keys)
            if what:
                done.append(what)
        iamc = client("iam", region, cfg.aws.profile) if grants else None
        for role, policy in grants:
            done += iam.release(iamc, role, policy)
    emit("note", "\n".join(done) if done else "nothing left to delete")
    if record:
        record.update({"status": "deleted", "deleted_model_arn": record.get("model_arn"), "model_arn": None})
        _save(cfg, record)
    history.mark_deleted(layout, {i.get("model_arn") for i in imports if i.get("model_arn")})
    return done


def _delete_uploads(s3c: Any, uri: str, names: set[str]) -> str | None:
    """Abort the incomplete multipart uploads under one of this run's prefixes and delete the
    objects there that the run recorded uploading (and nothing else); what was done."""
    bucket, prefix = s3.split_uri(uri)
    try:
        aborted = s3.abort_uploads(s3c, bucket, prefix)
        deleted = s3.delete_objects(s3c, bucket, prefix, names)
    except Exception as e:
        if error_code(e) != "NoSuchBucket":
            raise
        return None
    done = [f"deleted {deleted} objects"] if deleted else []
    done += [f"aborted {aborted} incomplete multipart uploads"] if aborted else []
    return f"{' and '.join(done)} under {uri}" if done else None
