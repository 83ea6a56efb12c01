"""Fixtures for the AWS tests: a tiny CMI-valid artifact, moto's S3/IAM/STS server, termtune serve.

Everything runs on 127.0.0.1 with real boto3 clients; the endpoints reach boto3 only
through the SDK's standard settings (AWS_ENDPOINT_URL_*), as they would in production. The
servers run in the test process (so tests can inspect termtune serve's state); the variables
that point boto3 at them are termtune.local's, the same the demo and notebooks use.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from conftest import SMALL_CONFIG, TINY_ARCH, TOKENIZER_DIR

BUCKET = "termtune-test"
ACCOUNT = "123456789012"  # moto's default account
EXISTING_ROLE = "existing-import-role"  # made as an administrator would, with termtune's policies
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")


def build_artifact(folder: Path, seed: int = 0) -> Path:
    """A tiny random Flan-T5-shaped model in the layout termtune export writes (and that
    transformers 4.51.3 reads): untied lm_head, torch_dtype, the real tokenizer files, a manifest."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from termtune.families.t5 import untie_lm_head

    values = json.loads(SMALL_CONFIG.read_text())
    values.update(TINY_ARCH, tie_word_embeddings=False)
    values.pop("model_type", None)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**values))
    untie_lm_head(model)  # Flan-T5 is untied; transformers 5.x would tie it
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(torch_dtype="float32", tie_word_embeddings=False)
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / name, folder / name)
    shutil.copy(TOKENIZER_DIR / "spiece.model", folder / "tokenizer.model")  # as termtune export ships it
    write_manifest(folder)
    return folder


def write_manifest(folder: Path) -> None:
    files = [{"path": p.name, "size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"]
    (folder / "manifest.json").write_text(json.dumps({"files": files}, indent=2))


@pytest.fixture(scope="session")
def artifact_template(tmp_path_factory) -> Path:
    return build_artifact(tmp_path_factory.mktemp("artifact") / "artifact")


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3/IAM/STS/KMS server with IAM access control on: every request must be signed
    with an access key moto issued and is authorised by that identity's IAM policies.
    Yields (URL, the administrator's keys)."""
    import boto3

    from termtune.aws import iam
    from termtune.rehearsal import start_moto

    server, url, keys = start_moto()
    admin = {"aws_access_key_id": keys["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": keys["AWS_SECRET_ACCESS_KEY"]}
    iam.create_or_update(boto3.client("iam", endpoint_url=url, region_name="us-east-1", **admin), EXISTING_ROLE,
                         iam.trust_policy(ACCOUNT, "us-east-1"), iam.permissions_policy(BUCKET, "termtune/", ACCOUNT),
                         "termtune-artifact-read")
    yield url, keys
    server.stop()


@pytest.fixture(scope="session")
def moto_url(moto_server):
    return moto_server[0]


@pytest.fixture
def aws_env(monkeypatch, moto_server):
    """The administrator's credentials and the standard endpoint variables pointing
    S3/IAM/STS/KMS at moto. Returns a function that starts termtune serve with given
    options and points Bedrock at it."""
    from termtune.local import aws_variables
    from termtune.serve import start_server

    def point_sdk(values):  # through monkeypatch: one undo stack with the test's own setenv calls
        for key, value in values.items():
            monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value)

    url, keys = moto_server
    point_sdk(aws_variables(moto_url=url, credentials=keys))
    with ExitStack() as servers:

        def start(**options):
            options.setdefault("import_delay_seconds", 0.2)
            server, bedrock_url = start_server(**options)
            servers.callback(server.stop)
            point_sdk(aws_variables(bedrock_url=bedrock_url))
            return server

        yield start


def wait(br, arn: str) -> dict:
    """Poll an import job until it ends; the job description."""
    for _ in range(600):
        job = br.get_model_import_job(jobIdentifier=arn)
        if job["status"] != "InProgress":
            return job
        time.sleep(0.1)
    raise AssertionError("the import job never ended")


def boto(service: str):
    import boto3

    return boto3.client(service, region_name="us-east-1")


@pytest.fixture
def bucket(aws_env):
    """A fresh, versioned bucket (versions count every PUT), with no multipart upload left open."""
    s3 = boto("s3")
    for upload in s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) if _exists(s3) else []:
        s3.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=BUCKET) if _exists(s3) else []:
        for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
            s3.delete_object(Bucket=BUCKET, Key=v["Key"], VersionId=v["VersionId"])
    if not _exists(s3):
        s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    return BUCKET


def _exists(s3) -> bool:
    return any(b["Name"] == BUCKET for b in s3.list_buckets().get("Buckets", []))


# ----------------------------------------------------------------------------- SageMaker training jobs

SAGEMAKER_ROLE = "termtune-sagemaker-job"
TRAINING_IMAGE = ("763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-training:"
                  "2.5.1-transformers4.49.0-gpu-py311-cu124-ubuntu22.04")


def sagemaker_trust(account: str = ACCOUNT) -> dict:
    return {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole",
        "Condition": {"StringEquals": {"aws:SourceAccount": account}}}]}


def sagemaker_permissions(bucket: str = BUCKET, write: bool = True) -> dict:
    """A training job role's policy: read (and, with `write`, write) the bucket; CloudWatch Logs."""
    actions = ["s3:GetObject", "s3:ListBucket"] + (["s3:PutObject"] if write else [])
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": actions, "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]},
        {"Effect": "Allow", "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents",
                                       "logs:DescribeLogStreams"],
         "Resource": "*"}]}  # moto authorises Logs calls against the resource "*" only


@pytest.fixture
def sagemaker_env(aws_env, bucket):
    """termtune serve with its SageMaker training-job stand-in running jobs, behind real boto3.

    Usage: `stand_in = sagemaker_env(role_name=..., permissions=..., **serve_options)`; returns a
    SimpleNamespace(server, training, role_arn, bucket):

    - boto3 clients made afterwards reach serve for `sagemaker` (AWS_ENDPOINT_URL_SAGEMAKER) and moto
      (IAM enforced) for s3/iam/sts/kms/logs (AWS_ENDPOINT_URL_CLOUDWATCH_LOGS), as the administrator;
    - `role_arn`: an execution role (default name SAGEMAKER_ROLE) that trusts sagemaker.amazonaws.com,
      with `permissions` as its inline policy (default sagemaker_permissions(): read and write the
      test bucket, CloudWatch Logs; sagemaker_permissions(write=False) has no s3:PutObject);
    - `bucket`: the fresh versioned test bucket (BUCKET);
    - `server.state.training` (also `training`): the stand-in's state, e.g. `training.jobs[name].hosts[k]
      .process` for a job's process (its process group id is its pid).
    - serve_options are Bedrock()'s: run_training_jobs (default True here), training_time_scale (default
      0.02: the 120 s stop grace is 2.4 s, the spot wait 0.6 s, checkpoints sync every 0.1 s),
      spot_interrupt_after_seconds (interrupt each spot job once, this long into training),
      training_capacity_error (ResourceLimitExceeded on every create), and serve's other knobs.
    Jobs need TRAINING_IMAGE (or another us-east-1 ECR URI) and a ContainerEntrypoint; the job's
    processes are killed when the test ends (serve stops).
    """
    from types import SimpleNamespace

    import boto3

    from termtune.aws import iam

    def start(role_name: str = SAGEMAKER_ROLE, permissions: dict | None = None, **options):
        options.setdefault("run_training_jobs", True)
        options.setdefault("training_time_scale", 0.02)
        server = aws_env(**options)
        role_arn, _ = iam.create_or_update(boto3.client("iam", region_name="us-east-1"), role_name,
                                           sagemaker_trust(), permissions or sagemaker_permissions(bucket),
                                           "termtune-training-job")
        return SimpleNamespace(server=server, training=server.state.training, role_arn=role_arn, bucket=bucket)

    return start
