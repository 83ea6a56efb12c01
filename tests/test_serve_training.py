"""termtune serve's SageMaker training-job stand-in through real boto3, against moto (IAM enforced):
request validation like SageMaker's, and small bash jobs walked through the real status machine."""

from __future__ import annotations

import json
import os
import time

import boto3
import pytest
from botocore.config import Config

from aws_fixtures import (ACCOUNT, BUCKET, EXISTING_ROLE, TRAINING_IMAGE, aws_env, boto, bucket,  # noqa: F401
                          moto_server, sagemaker_env, sagemaker_permissions)

PREFIX = "runs/r1/sagemaker"


ENTRY = 'bash "${TERMTUNE_OPT_ML:-/opt/ml}/input/data/code/entry.sh"'  # one line: a newline breaks the pattern


def request(name: str, role_arn: str, script: str, upload: bool = True, **extra) -> dict:
    """A CreateTrainingJob request whose `code` channel holds `script` as entry.sh, which the job runs
    with bash (as termtune's own jobs run their bootstrap)."""
    if upload:
        boto("s3").put_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}/code/entry.sh", Body=script.encode())
    body = {
        "TrainingJobName": name, "RoleArn": role_arn,
        "AlgorithmSpecification": {"TrainingImage": TRAINING_IMAGE, "TrainingInputMode": "File",
                                   "ContainerEntrypoint": ["/bin/bash"], "ContainerArguments": ["-c", ENTRY]},
        "InputDataConfig": [{"ChannelName": "code", "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/{PREFIX}/{name}/code/",
            "S3DataDistributionType": "FullyReplicated"}}}],
        "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/{PREFIX}/output/", "CompressionType": "NONE"},
        "ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        "StoppingCondition": {"MaxRuntimeInSeconds": 600},
    }
    body.update(extra)
    return body


def sagemaker(validate: bool = True):
    return boto3.client("sagemaker", region_name="us-east-1",
                        config=Config(parameter_validation=validate, retries={"total_max_attempts": 1}))


def wait_for(sm, name: str, statuses=("Completed", "Failed", "Stopped")) -> dict:
    for _ in range(1200):
        job = sm.describe_training_job(TrainingJobName=name)
        if job["TrainingJobStatus"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"training job {name} never reached {statuses}")


def log_lines(name: str) -> dict[str, list[str]]:
    logs = boto("logs")
    streams = logs.describe_log_streams(logGroupName="/aws/sagemaker/TrainingJobs", logStreamNamePrefix=name + "/",
                                        orderBy="LogStreamName")["logStreams"]
    return {s["logStreamName"]: [e["message"] for e in logs.get_log_events(
        logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=s["logStreamName"], startFromHead=True)["events"]]
        for s in streams}


def transitions(job: dict) -> list[str]:
    return [t["Status"] for t in job["SecondaryStatusTransitions"]]


def test_a_job_runs_as_its_role_and_uploads_its_model(sagemaker_env):
    stand_in = sagemaker_env()
    script = r'''
set -e
OPT=$TERMTUNE_OPT_ML
echo "job $TRAINING_JOB_NAME on $(python -c 'import json,os; print(json.load(open(os.environ["TERMTUNE_OPT_ML"]+"/input/config/resourceconfig.json"))["current_host"])')"
ls "$OPT/input/data/code"
echo "pip index off: $PIP_NO_INDEX; key $AWS_ACCESS_KEY_ID"
mkdir -p "$OPT/model/artifact"
echo weights > "$OPT/model/artifact/model.safetensors"
echo last line
'''
    sm = sagemaker()
    arn = sm.create_training_job(**request("tt-job-1", stand_in.role_arn, script))["TrainingJobArn"]
    assert arn == f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:training-job/tt-job-1"
    job = wait_for(sm, "tt-job-1")
    assert job["TrainingJobStatus"] == "Completed", job.get("FailureReason")
    assert transitions(job) == ["Starting", "Downloading", "Training", "Uploading", "Completed"]
    assert job["ModelArtifacts"]["S3ModelArtifacts"] == f"s3://{BUCKET}/{PREFIX}/output/tt-job-1/output/model/"
    body = boto("s3").get_object(Bucket=BUCKET, Key=f"{PREFIX}/output/tt-job-1/output/model/artifact/model.safetensors")
    assert body["Body"].read() == b"weights\n"
    assert job["TrainingTimeInSeconds"] >= 1 and job["BillableTimeInSeconds"] >= 1
    (stream, lines), = log_lines("tt-job-1").items()
    assert stream.startswith("tt-job-1/algo-1-")
    assert lines[:2] == ["job tt-job-1 on algo-1", "entry.sh"]
    assert lines[-1] == "last line"
    pip, key = lines[2].split("; key ")
    assert pip == "pip index off: 1"
    assert key.startswith("ASIA") and key != os.environ["AWS_ACCESS_KEY_ID"]  # the role's, not serve's own
