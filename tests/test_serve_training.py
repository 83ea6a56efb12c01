"""termtune serve's SageMaker training-job stand-in through real boto3, against moto (IAM enforced):
request validation like SageMaker's, and small bash jobs walked through the real status machine."""

from __future__ import annotations

import json
import os
import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import WaiterError

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
HOST=$(python -c 'import json, os; print(json.load(open(os.environ["TERMTUNE_OPT_ML"]
    + "/input/config/resourceconfig.json"))["current_host"])')
echo "job $TRAINING_JOB_NAME on $HOST"
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


def test_the_job_root_is_laid_out_like_opt_ml(sagemaker_env):
    stand_in = sagemaker_env()
    boto("s3").put_object(Bucket=BUCKET, Key=f"{PREFIX}/data/train.jsonl", Body=b'{"a": 1}\n')
    data = {"ChannelName": "data", "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix",
                                                                   "S3Uri": f"s3://{BUCKET}/{PREFIX}/data/"}}}
    script = 'cp -r "$TERMTUNE_OPT_ML/input" "$TERMTUNE_OPT_ML/model/"\n'
    sm = sagemaker()
    body = request("tt-layout", stand_in.role_arn, script, HyperParameters={"epochs": "2"},
                   Environment={"TERMTUNE_SEED": "7"})
    body["InputDataConfig"].append(data)
    sm.create_training_job(**body)
    job = wait_for(sm, "tt-layout")
    assert job["TrainingJobStatus"] == "Completed", job.get("FailureReason")
    assert job["Environment"] == {"TERMTUNE_SEED": "7"} and job["HyperParameters"] == {"epochs": "2"}
    s3 = boto("s3")
    prefix = f"{PREFIX}/output/tt-layout/output/model/input/"

    def read(key: str) -> bytes:
        return s3.get_object(Bucket=BUCKET, Key=prefix + key)["Body"].read()

    assert read("data/data/train.jsonl") == b'{"a": 1}\n'
    assert read("data/code/entry.sh") == script.encode()
    assert json.loads(read("config/hyperparameters.json")) == {"epochs": "2"}
    resource = json.loads(read("config/resourceconfig.json"))
    assert resource["current_host"] == "algo-1" and resource["hosts"] == ["algo-1"]
    assert resource["current_instance_type"] == "ml.g5.2xlarge" and resource["network_interface_name"] == "eth0"
    channels = json.loads(read("config/inputdataconfig.json"))
    assert set(channels) == {"code", "data"}
    assert channels["data"]["TrainingInputMode"] == "File"
    assert channels["data"]["S3DistributionType"] == "FullyReplicated"


@pytest.mark.parametrize("change,needle", [
    (lambda r: r.update(TrainingJobName="bad_name"), "trainingJobName"),
    (lambda r: r.update(TrainingJobName="x" * 64), "length less than or equal to 63"),
    (lambda r: r["ResourceConfig"].update(InstanceType="ml.g5.2xlarge-bogus"), "enum value set"),
    (lambda r: r["ResourceConfig"].update(InstanceCount=0), "InstanceCount must be at least 1"),
    (lambda r: r["StoppingCondition"].update(MaxRuntimeInSeconds=0), "stoppingCondition.maxRuntimeInSeconds"),
    (lambda r: r.update(Environment={"BAD-KEY": "x"}), "environment"),
    (lambda r: r["OutputDataConfig"].update(CompressionType="ZIP"), "compressionType"),
    (lambda r: r.pop("RoleArn"), "Value null at 'roleArn'"),
    (lambda r: r.update(VpcConfig={"SecurityGroupIds": ["sg-1"]}), "Value null at 'vpcConfig.subnets'"),
    (lambda r: r.update(VpcConfig={"SecurityGroupIds": ["sg-1"], "Subnets": []}), "vpcConfig.subnets"),
    (lambda r: r.update(EnableManagedSpotTraining=True), "MaxWaitTimeInSeconds"),
    (lambda r: (r.update(EnableManagedSpotTraining=True), r["StoppingCondition"].update(MaxWaitTimeInSeconds=60)),
     "greater than or equal to MaxRuntimeInSeconds"),
    (lambda r: r["StoppingCondition"].update(MaxWaitTimeInSeconds=900), "only supported for managed spot"),
    (lambda r: r["AlgorithmSpecification"].update(
        TrainingImage=TRAINING_IMAGE.replace("us-east-1", "eu-west-1")), "in region eu-west-1"),
    (lambda r: r["AlgorithmSpecification"].update(TrainingImage="docker.io/library/python:3.12"), "ECR image URI"),
    (lambda r: r["InputDataConfig"].append(dict(r["InputDataConfig"][0])), "code is given more than once"),
    (lambda r: r["InputDataConfig"][0].update(ChannelName=".."), "channel name"),
    (lambda r: r["AlgorithmSpecification"].update(ContainerArguments=["-c", "echo a\necho b"]),
     "regular expression pattern: .*"),  # Java's `.` matches no newline either
    (lambda r: r.update(RoleArn=f"arn:aws:iam::{ACCOUNT}:role/{EXISTING_ROLE}"), "sagemaker.amazonaws.com"),
    (lambda r: r.update(RoleArn=f"arn:aws:iam::{ACCOUNT}:role/no-such-role"), "Could not assume role"),
])
def test_create_rejects_what_sagemaker_rejects(sagemaker_env, change, needle):
    stand_in = sagemaker_env()
    body = request("tt-invalid", stand_in.role_arn, "true", upload=False)
    change(body)
    sm = sagemaker(validate=False)  # botocore's own checks are thinner; serve's are what is tested here
    with pytest.raises(sm.exceptions.ClientError) as raised:
        sm.create_training_job(**body)
    assert raised.value.response["Error"]["Code"] == "ValidationException"
    assert needle in raised.value.response["Error"]["Message"]
    assert stand_in.training.jobs == {}


def test_a_duplicate_name_and_no_capacity_are_sagemakers_errors(sagemaker_env):
    stand_in = sagemaker_env(run_training_jobs=False)
    sm = sagemaker()
    sm.create_training_job(**request("tt-twice", stand_in.role_arn, "true"))
    with pytest.raises(sm.exceptions.ResourceInUse):
        sm.create_training_job(**request("tt-twice", stand_in.role_arn, "true"))
    # without --run-training-jobs nothing runs: the job fails and says why
    job = wait_for(sm, "tt-twice")
    assert job["TrainingJobStatus"] == "Failed" and "--run-training-jobs" in job["FailureReason"]
    stand_in.training.capacity_error = True
    with pytest.raises(sm.exceptions.ResourceLimitExceeded) as raised:
        sm.create_training_job(**request("tt-no-capacity", stand_in.role_arn, "true"))
    assert "ml.g5.2xlarge for training job usage" in raised.value.response["Error"]["Message"]
    with pytest.raises(sm.exceptions.ClientError) as raised:
        sm.describe_training_job(TrainingJobName="tt-never-made")
    assert raised.value.response["Error"]["Code"] == "ValidationException"
    with pytest.raises(sm.exceptions.ResourceNotFound):
        sm.stop_training_job(TrainingJobName="tt-never-made")


def test_list_and_tags(sagemaker_env):
    stand_in = sagemaker_env(run_training_jobs=False)
    sm = sagemaker()
    arns = [sm.create_training_job(**request(name, stand_in.role_arn, "true", Tags=[{"Key": "run", "Value": name}]))
            ["TrainingJobArn"] for name in ("tt-list-a", "tt-list-b", "other-c")]
    for name in ("tt-list-a", "tt-list-b", "other-c"):
        wait_for(sm, name)
    names = [s["TrainingJobName"] for s in sm.list_training_jobs(NameContains="tt-list", SortBy="Name",
                                                                 SortOrder="Descending")["TrainingJobSummaries"]]
    assert names == ["tt-list-b", "tt-list-a"]
    first = sm.list_training_jobs(MaxResults=2, SortBy="Name")
    assert [s["TrainingJobName"] for s in first["TrainingJobSummaries"]] == ["other-c", "tt-list-a"]
    rest = sm.list_training_jobs(MaxResults=2, SortBy="Name", NextToken=first["NextToken"])
    assert [s["TrainingJobName"] for s in rest["TrainingJobSummaries"]] == ["tt-list-b"]
    assert sm.list_training_jobs(StatusEquals="Completed")["TrainingJobSummaries"] == []
    sm.add_tags(ResourceArn=arns[0], Tags=[{"Key": "owner", "Value": "ana"}])
    assert sm.list_tags(ResourceArn=arns[0])["Tags"] == [{"Key": "run", "Value": "tt-list-a"},
                                                        {"Key": "owner", "Value": "ana"}]


def test_a_failing_job_reports_its_reason(sagemaker_env):
    stand_in = sagemaker_env()
    sm = sagemaker()
    sm.create_training_job(**request("tt-fail-file", stand_in.role_arn, 'echo "the data has no rows" > '
                                     '"$TERMTUNE_OPT_ML/output/failure"; exit 3\n'))
    sm.create_training_job(**request("tt-fail-exit", stand_in.role_arn, "echo step 1; echo boom; exit 4\n"))
    job = wait_for(sm, "tt-fail-file")
    assert job["TrainingJobStatus"] == "Failed" and job["SecondaryStatus"] == "Failed"
    assert job["FailureReason"] == "AlgorithmError: the data has no rows"
    with pytest.raises(WaiterError, match="Failed"):  # boto3's own waiter reads the stand-in's statuses
        sm.get_waiter("training_job_completed_or_stopped").wait(TrainingJobName="tt-fail-exit",
                                                                WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    job = wait_for(sm, "tt-fail-exit")
    assert job["FailureReason"] == ("AlgorithmError: the training process on algo-1 exited with code 4; its last "
                                    "line: boom")
    assert transitions(job) == ["Starting", "Downloading", "Training", "Failed"]


def test_a_role_that_cannot_write_the_output_fails_the_job_with_access_denied(sagemaker_env):
    stand_in = sagemaker_env(permissions=sagemaker_permissions(write=False))
    sm = sagemaker()
    sm.create_training_job(**request("tt-read-only", stand_in.role_arn,
                                     'echo w > "$TERMTUNE_OPT_ML/model/model.safetensors"\n'))
    job = wait_for(sm, "tt-read-only")
    assert job["TrainingJobStatus"] == "Failed", job
    assert "AccessDenied" in job["FailureReason"] and "output/model/model.safetensors" in job["FailureReason"]
    assert "ModelArtifacts" not in job


def gone(pgid: int) -> bool:
    """No live process is left in the process group (a killed one may stay a zombie until its new parent
    reaps it: it runs nothing). Waits up to 5 s for the kernel to finish the kills."""
    from pathlib import Path

    def live() -> list[int]:
        return [pid for pid in (int(p.name) for p in Path("/proc").glob("[0-9]*"))
                if (process_state(pid) or ("Z", 0))[0] not in "ZX" and process_state(pid)[1] == pgid]

    for _ in range(100):
        if not live():
            return True
        time.sleep(0.05)
    return False


def process_state(pid: int) -> tuple[str, int] | None:
    """(state, process group) of a process from /proc; None when there is no such process."""
    from pathlib import Path

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[2])


# A job that ignores SIGTERM and leaves a background process: only SIGKILL to its group ends it.
STUBBORN = ('trap "" TERM; sleep 300 & echo "child $!"; echo "$!" > "$TERMTUNE_OPT_ML/model/child"; '
            'while true; do sleep 0.1; done\n')


def test_stop_ends_the_job_and_its_whole_process_group(sagemaker_env):
    stand_in = sagemaker_env(training_time_scale=0.01)
    sm = sagemaker()
    sm.create_training_job(**request("tt-stop", stand_in.role_arn, STUBBORN))
    wait_for(sm, "tt-stop", statuses=("InProgress",))
    host = None
    for _ in range(400):
        job = stand_in.training.jobs["tt-stop"]
        if job.hosts and job.hosts[0].process and job.hosts[0].last_line.startswith("child"):
            host = job.hosts[0]
            break
        time.sleep(0.05)
    assert host is not None, "the job never started its process"
    child = int(host.last_line.split()[1])
    assert process_state(child)[1] == host.process.pid  # the background process is in the job's group
    sm.stop_training_job(TrainingJobName="tt-stop")
    assert sm.describe_training_job(TrainingJobName="tt-stop")["TrainingJobStatus"] in ("Stopping", "Stopped")
    job = wait_for(sm, "tt-stop")
    assert job["TrainingJobStatus"] == "Stopped" and job["SecondaryStatus"] == "Stopped"
    assert transitions(job)[-3:] == ["Stopping", "Uploading", "Stopped"]
    assert gone(host.process.pid)
    assert boto("s3").get_object(Bucket=BUCKET, Key=f"{PREFIX}/output/tt-stop/output/model/child")["Body"].read()
    with pytest.raises(sm.exceptions.ClientError, match="in status Stopped"):
        sm.stop_training_job(TrainingJobName="tt-stop")


def test_max_runtime_stops_the_job(sagemaker_env):
    stand_in = sagemaker_env(training_time_scale=0.01)
    sm = sagemaker()
    sm.create_training_job(**request("tt-runtime", stand_in.role_arn, STUBBORN,
                                     StoppingCondition={"MaxRuntimeInSeconds": 1}))
    job = wait_for(sm, "tt-runtime")
    assert (job["TrainingJobStatus"], job["SecondaryStatus"]) == ("Stopped", "MaxRuntimeExceeded")
    assert gone(stand_in.training.jobs["tt-runtime"].hosts[0].process.pid)


def test_serve_stopping_kills_running_jobs(sagemaker_env):
    stand_in = sagemaker_env()
    sm = sagemaker()
    sm.create_training_job(**request("tt-orphan", stand_in.role_arn, STUBBORN))
    for _ in range(400):
        hosts = stand_in.training.jobs["tt-orphan"].hosts
        if hosts and hosts[0].last_line.startswith("child"):
            break
        time.sleep(0.05)
    host = stand_in.training.jobs["tt-orphan"].hosts[0]
    child = int(host.last_line.split()[1])
    stand_in.server.stop()
    host.done.wait(10)
    assert gone(host.process.pid)


# Counts to 8, one step per 0.2 s, resuming from the step in checkpoints/ (a spot restart restores it).
COUNTER = ('OPT=$TERMTUNE_OPT_ML; n=$(cat "$OPT/checkpoints/step" 2>/dev/null || echo 0); echo "start at $n"; '
           'while [ "$n" -lt 8 ]; do n=$((n+1)); echo "$n" > "$OPT/checkpoints/step"; echo "step $n"; sleep 0.2; '
           'done; cp "$OPT/checkpoints/step" "$OPT/model/step"\n')


def test_a_spot_interruption_restarts_from_the_s3_checkpoints(sagemaker_env):
    # time scale 0.05: the spot wait is 1.5 s, so the billable time is at least a second shorter
    stand_in = sagemaker_env(training_time_scale=0.05, spot_interrupt_after_seconds=0.8)
    sm = sagemaker()
    checkpoints = f"s3://{BUCKET}/{PREFIX}/checkpoints/"
    sm.create_training_job(**request("tt-spot", stand_in.role_arn, COUNTER, EnableManagedSpotTraining=True,
                                     StoppingCondition={"MaxRuntimeInSeconds": 600, "MaxWaitTimeInSeconds": 1200},
                                     CheckpointConfig={"S3Uri": checkpoints, "LocalPath": "/opt/ml/checkpoints"}))
    job = wait_for(sm, "tt-spot")
    assert job["TrainingJobStatus"] == "Completed", job.get("FailureReason")
    assert transitions(job) == ["Starting", "Downloading", "Training", "Interrupted", "Starting", "Downloading",
                                "Training", "Uploading", "Completed"]
    streams = log_lines("tt-spot")
    assert len(streams) == 2  # new instances after the interruption: new streams
    first, second = (lines for _, lines in sorted(streams.items()))
    assert first[0] == "start at 0" and second[0] != "start at 0"
    resumed = int(second[0].split()[-1])
    # from the last checkpoint the first attempt wrote (it may have been killed before printing its step)
    assert int(first[-1].split()[-1]) in (resumed, resumed - 1)
    assert second[-1] == "step 8"
    s3 = boto("s3")
    assert s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/output/tt-spot/output/model/step")["Body"].read() == b"8\n"
    assert s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/checkpoints/step")["Body"].read() == b"8\n"
    assert job["BillableTimeInSeconds"] < job["TrainingTimeInSeconds"]


def test_two_instances_run_as_two_hosts(sagemaker_env):
    stand_in = sagemaker_env()
    script = ('HOST=$(python -c \'import json,os; print(json.load(open(os.environ["TERMTUNE_OPT_ML"]'
              '+"/input/config/resourceconfig.json"))["current_host"])\'); '
              'echo "$HOST of $TERMTUNE_HOST_ADDRESSES port $TERMTUNE_MASTER_PORT"; '
              'echo "$HOST" > "$TERMTUNE_OPT_ML/model/$HOST.txt"\n')
    sm = sagemaker()
    body = request("tt-two", stand_in.role_arn, script)
    body["ResourceConfig"]["InstanceCount"] = 2
    sm.create_training_job(**body)
    job = wait_for(sm, "tt-two")
    assert job["TrainingJobStatus"] == "Completed", job.get("FailureReason")
    streams = log_lines("tt-two")
    assert sorted(s.split("/")[1].rsplit("-", 1)[0] for s in streams) == ["algo-1", "algo-2"]
    lines = sorted(line for lines in streams.values() for line in lines)
    addresses = json.dumps({"algo-1": "127.0.0.1", "algo-2": "127.0.0.1"})
    port = lines[0].rsplit(" ", 1)[1]
    assert lines == [f"algo-1 of {addresses} port {port}", f"algo-2 of {addresses} port {port}"]
    s3 = boto("s3")
    for host in ("algo-1", "algo-2"):
        key = f"{PREFIX}/output/tt-two/output/model/{host}.txt"
        assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == f"{host}\n".encode()


def test_an_object_key_that_leads_out_of_the_channel_fails_the_job(sagemaker_env, tmp_path):
    stand_in = sagemaker_env()
    sm = sagemaker()
    body = request("tt-escape", stand_in.role_arn, "true")
    boto("s3").put_object(Bucket=BUCKET, Key=f"{PREFIX}/tt-escape/code/../../../../escaped.sh", Body=b"x")
    sm.create_training_job(**body)
    job = wait_for(sm, "tt-escape")
    assert job["TrainingJobStatus"] == "Failed" and "'..' segment" in job["FailureReason"]
    root = stand_in.training.jobs["tt-escape"].root
    assert not any(p.name == "escaped.sh" for p in root.parent.parent.rglob("escaped.sh"))


def test_gzip_output_is_one_model_tar_gz(sagemaker_env):
    import io
    import tarfile

    stand_in = sagemaker_env()
    sm = sagemaker()
    body = request("tt-gzip", stand_in.role_arn, 'echo w > "$TERMTUNE_OPT_ML/model/weights.bin"\n')
    body["OutputDataConfig"]["CompressionType"] = "GZIP"
    sm.create_training_job(**body)
    job = wait_for(sm, "tt-gzip")
    assert job["ModelArtifacts"]["S3ModelArtifacts"] == f"s3://{BUCKET}/{PREFIX}/output/tt-gzip/output/model.tar.gz"
    data = boto("s3").get_object(Bucket=BUCKET, Key=f"{PREFIX}/output/tt-gzip/output/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["weights.bin"] and tar.extractfile("weights.bin").read() == b"w\n"


def test_running_jobs_binds_only_the_loopback_address():
    from termtune.errors import UserError
    from termtune.serve import start_server

    with pytest.raises(UserError, match="binds only 127.0.0.1"):
        start_server(host="0.0.0.0", run_training_jobs=True, local_root="/nonexistent")
    server, _ = start_server(host="0.0.0.0", local_root="/nonexistent")  # without jobs, as before
    server.stop()


def test_max_wait_counts_the_spot_wait(sagemaker_env):
    # interrupted at once, then 6 s waiting for capacity (time scale 0.2): past MaxWaitTimeInSeconds 5
    stand_in = sagemaker_env(training_time_scale=0.2, spot_interrupt_after_seconds=0.2)
    sm = sagemaker()
    sm.create_training_job(**request("tt-max-wait", stand_in.role_arn, "while true; do sleep 0.1; done\n",
                                     EnableManagedSpotTraining=True,
                                     StoppingCondition={"MaxRuntimeInSeconds": 5, "MaxWaitTimeInSeconds": 5}))
    job = wait_for(sm, "tt-max-wait")
    assert (job["TrainingJobStatus"], job["SecondaryStatus"]) == ("Stopped", "MaxWaitTimeExceeded")
    assert "Interrupted" in transitions(job)


def test_a_checkpoint_file_deleted_before_its_upload_is_skipped(tmp_path, bucket):  # noqa: F811
    """A job deletes files in its checkpoint folder while serve syncs it (termtune's write probe, a checkpoint the
    trainer rotates out): a file gone between the listing and its upload is not there to sync; the job goes on."""
    from termtune.serve_training import Host, Job, Training

    training = Training("us-east-1", lambda: ACCOUNT, tmp_path)
    host = Host("algo-1", tmp_path / "algo-1")
    job = Job({"CheckpointConfig": {"S3Uri": f"s3://{BUCKET}/ckpt/", "LocalPath": "/opt/ml/checkpoints"},
               "RoleArn": f"arn:aws:iam::{ACCOUNT}:role/r"}, [], tmp_path, hosts=[host])
    folder = training._checkpoints(host, job.description)
    (folder / "a.bin").write_bytes(b"weights")
    (folder / "b.probe").write_bytes(b"")
    s3 = boto("s3")
    upload = s3.upload_file

    def upload_then_the_job_deletes_its_probe(path, *args, **kwargs):
        upload(path, *args, **kwargs)
        (folder / "b.probe").unlink(missing_ok=True)

    s3.upload_file = upload_then_the_job_deletes_its_probe
    training._sync(job, s3)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="ckpt/").get("Contents", [])]
    assert keys == ["ckpt/a.bin"] and list(job.synced) == ["a.bin"]
