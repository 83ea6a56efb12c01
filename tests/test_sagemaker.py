"""termtune train --on sagemaker: the offline checks, the request, the role, the log merger, the cost, and the
client's flow (submit, record, follow, finish, reuse, detach, Ctrl-C, deploy from the job's output).

The request builder and each rule are checked against botocore's own sagemaker model, through a Stubber'd
real client where a call is made. The flow tests run against moto (S3, IAM, STS, CloudWatch Logs, IAM
enforced) and termtune serve (Bedrock) with a Stubber'd SageMaker client that answers as SageMaker would,
and a stand-in for the bundle builder (termtune.remote.bundle, written elsewhere). The end-to-end tests
with the real job stand-in are in test_sagemaker_e2e.py.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import types
from pathlib import Path

import pytest

from aws_fixtures import ACCOUNT, BUCKET, artifact_template, aws_env, boto, bucket, moto_server, moto_url  # noqa: F401
from termtune.config import load_config
from termtune.errors import Detached, UserError

KEY = "arn:aws:kms:us-east-1:123456789012:key/0b8c4a3e-1f2d-4e5a-9b6c-7d8e9f0a1b2c"
ROOT = "s3://termtune-test/termtune/sagemaker/run-0123456789ab/"


def sm_cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [f"run.dir={tmp_path / 'run'}", "aws.bucket=termtune-test", "train.on=sagemaker",
                              *overrides])


def request_for(cfg, kms: dict | None = None, channels=("code", "config", "data")) -> dict:
    from termtune.aws import sagemaker as sm

    return sm.build_request(cfg, sm.job_name(cfg, "20261204211500"), f"arn:aws:iam::{ACCOUNT}:role/exec",
                            sm.Uris.of(ROOT), "ab" * 32, "run", kms or {}, channels)


# ----------------------------------------------------------------------------- the request


def test_the_request_follows_the_contract_and_passes_botocore_and_the_strict_shape_check(tmp_path):
    import boto3
    from botocore.stub import Stubber

    from termtune.aws import sagemaker as sm

    cfg = sm_cfg(tmp_path, "aws.sagemaker.spot=true", "aws.sagemaker.max_runtime=2h",
                 "aws.sagemaker.instance_count=2", "aws.sagemaker.vpc.subnets=[subnet-0a1b]",
                 "aws.sagemaker.vpc.security_group_ids=[sg-0c2d]", "aws.sagemaker.tags={team: terms}")
    request = request_for(cfg, {"output_kms_key_id": KEY, "volume_kms_key_id": KEY}, ("code", "config", "data", "model"))
    assert request["TrainingJobName"] == "tt-run-20261204211500"
    algo = request["AlgorithmSpecification"]
    assert algo["TrainingImage"] == ("763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-training:"
                                     "2.8.0-transformers4.56.2-gpu-py312-cu129-ubuntu22.04")
    assert algo["ContainerEntrypoint"] == ["/bin/bash"]
    assert algo["ContainerArguments"] == ["-c", 'bash "${TERMTUNE_OPT_ML:-/opt/ml}/input/data/code/entry.sh"']
    assert {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in request["InputDataConfig"]} == {
        c: f"{ROOT}{c}/" for c in ("code", "config", "data", "model")}
    assert {c["DataSource"]["S3DataSource"]["S3DataDistributionType"] for c in request["InputDataConfig"]} == {
        "FullyReplicated"}
    assert request["OutputDataConfig"] == {"S3OutputPath": f"{ROOT}output/", "CompressionType": "NONE", "KmsKeyId": KEY}
    assert request["CheckpointConfig"] == {"S3Uri": f"{ROOT}checkpoints/{'ab' * 8}/", "LocalPath": "/opt/ml/checkpoints"}
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200, "MaxWaitTimeInSeconds": 14400}
    assert request["EnableManagedSpotTraining"] is True and request["EnableInterContainerTrafficEncryption"] is True
    assert request["ResourceConfig"] == {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 2, "VolumeSizeInGB": 100,
                                         "VolumeKmsKeyId": KEY}
    assert request["VpcConfig"] == {"Subnets": ["subnet-0a1b"], "SecurityGroupIds": ["sg-0c2d"]}
    assert {t["Key"]: t["Value"] for t in request["Tags"]} == {"project": "termtune", "run": "run",
                                                              "fingerprint": "ab" * 8, "team": "terms"}
    assert not any("token" in k.lower() or "secret" in k.lower() for k in request["Environment"])

    shape = sm.service_model().operation_model("CreateTrainingJob").input_shape
    assert sm.shape_problems(shape, request, "") == []
    client = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stub:  # botocore's own validation of the request, and exactly these parameters
        stub.add_response("create_training_job", {"TrainingJobArn": "arn:aws:sagemaker:us-east-1:123456789012:"
                                                                     "training-job/tt-run-20261204211500"}, request)
        assert client.create_training_job(**request)["TrainingJobArn"].endswith("/tt-run-20261204211500")
        stub.assert_no_pending_responses()


def botocore_accepts(request: dict) -> bool:
    """What botocore itself checks (types, required members, minimums): it lets all of the cases below through."""
    from botocore.validate import validate_parameters

    from termtune.aws import sagemaker as sm

    validate_parameters(request, sm.service_model().operation_model("CreateTrainingJob").input_shape)
    return True


@pytest.mark.parametrize("overrides,key,match", [
    (["aws.sagemaker.job_name=tt_run_1"], "aws.sagemaker.job_name", "does not match"),
    ([f"aws.sagemaker.job_name={'a' * 64}"], "aws.sagemaker.job_name", "has 64 characters"),
    (["aws.sagemaker.instance_type=ml.g5.2xlarge-bogus"], "aws.sagemaker.instance_type", "did you mean ml.g5.2xlarge"),
    (["aws.sagemaker.spot=true", "aws.sagemaker.max_runtime=4h", "aws.sagemaker.max_wait=1h"],
     "aws.sagemaker.max_wait", "at least max_runtime"),
    (["aws.sagemaker.spot=true", "aws.sagemaker.checkpoints=false"], "aws.sagemaker.checkpoints", "spot"),
    (["aws.sagemaker.max_wait=8h"], "aws.sagemaker.max_wait", "spot training only"),
    (["aws.sagemaker.vpc.subnets=[subnet-1]"], "aws.sagemaker.vpc.security_group_ids", "needs both"),
    (["aws.sagemaker.vpc.security_group_ids=[sg-1]"], "aws.sagemaker.vpc.subnets", "needs both"),
    (["aws.sagemaker.vpc.subnets=[subnet_1!]", "aws.sagemaker.vpc.security_group_ids=[sg-1]"],
     "aws.sagemaker.vpc.subnets", "does not match"),
    ([f"aws.sagemaker.vpc.subnets=[{', '.join(f's-{i}' for i in range(17))}]",
      "aws.sagemaker.vpc.security_group_ids=[sg-1]"], "aws.sagemaker.vpc.subnets", "has 17 items"),
    (["aws.sagemaker.tags={'cost*centre': x}"], "aws.sagemaker.tags", "does not match"),
    ([f"aws.sagemaker.tags={{team: {'v' * 257}}}"], "aws.sagemaker.tags", "has 257 characters"),
    (["aws.sagemaker.tags={project: mine}"], "aws.sagemaker.tags", "reserved"),
    (["aws.sagemaker.tags={'aws:owner': me}"], "aws.sagemaker.tags", "reserved"),
    (["model.quantization=4bit", "aws.sagemaker.instance_type=ml.m5.xlarge"], "model.quantization",
     "set aws.sagemaker.instance_type to a GPU instance such as ml.g5.2xlarge"),
    (["model.quantization=8bit", "aws.sagemaker.instance_type=ml.trn1.2xlarge"], "model.quantization", "NVIDIA"),
    (["aws.sagemaker.network_isolation=true"], "aws.sagemaker.network_isolation", "cannot download"),
    (["aws.region=mars-north-1"], "aws.sagemaker.image", "no Deep Learning Container"),
    (["aws.sagemaker.output_kms_key_id=my key!"], "aws.sagemaker.output_kms_key_id", "not a KMS key"),
    (["aws.bucket=null"], "aws.bucket", "not set"),
    (["aws.sagemaker.image=docker.io/library/python:3.12"], "aws.sagemaker.image", "not an ECR image URI"),
])
def test_each_rule_refuses_offline_in_one_line_naming_the_key(tmp_path, monkeypatch, overrides, key, match):
    """None of these reaches AWS: every endpoint points at a closed port, and each refusal comes first."""
    from termtune.aws import sagemaker as sm

    for service in ("S3", "IAM", "STS", "KMS", "SAGEMAKER", "CLOUDWATCH_LOGS"):
        monkeypatch.setenv(f"AWS_ENDPOINT_URL_{service}", "http://127.0.0.1:9")
    cfg = sm_cfg(tmp_path, *overrides)
    with pytest.raises(UserError) as e:
        sm.check_settings(cfg)
    message = str(e.value)
    assert message.startswith(key + ":") and match in message and "\n" not in message, message


def test_botocore_alone_would_send_what_termtune_refuses(tmp_path):
    """The reason the checks above exist: botocore's validation passes each of these requests on to AWS."""
    cfg = sm_cfg(tmp_path)
    for change in (lambda r: r.update(TrainingJobName="x" * 70),
                   lambda r: r.update(TrainingJobName="tt_run"),
                   lambda r: r["ResourceConfig"].update(InstanceType="ml.g5.2xlarge-bogus"),
                   lambda r: r.update(EnableManagedSpotTraining=True),  # spot without MaxWaitTimeInSeconds
                   lambda r: r["Tags"].append({"Key": "a*b", "Value": "c"})):
        request = request_for(cfg)
        change(request)
        assert botocore_accepts(request)
        from termtune.aws import sagemaker as sm

        shape = sm.service_model().operation_model("CreateTrainingJob").input_shape
        if not request.get("EnableManagedSpotTraining"):
            assert sm.shape_problems(shape, request, "")


def test_durations_and_the_default_spot_wait(tmp_path):
    from termtune.aws import sagemaker as sm

    cfg = sm_cfg(tmp_path, "aws.sagemaker.max_runtime=90m", "aws.sagemaker.spot=true")
    assert cfg.aws.sagemaker.max_runtime == 5400 and sm.wait_limit(cfg) == 10800
    assert sm_cfg(tmp_path, "aws.sagemaker.max_runtime=20d", "aws.sagemaker.spot=true").aws.sagemaker.max_runtime \
        == 20 * 86400 and sm.wait_limit(sm_cfg(tmp_path, "aws.sagemaker.max_runtime=20d",
                                               "aws.sagemaker.spot=true")) == 28 * 86400
    with pytest.raises(UserError, match="aws.sagemaker.max_runtime"):
        sm_cfg(tmp_path, "aws.sagemaker.max_runtime=29d")
    with pytest.raises(UserError, match="not a duration"):
        sm_cfg(tmp_path, "aws.sagemaker.max_runtime=soon")


def test_the_image_follows_the_region_and_the_instance_kind(tmp_path):
    from termtune.aws import sagemaker as sm

    assert sm.image(sm_cfg(tmp_path, "aws.region=af-south-1")).startswith("626614931356.dkr.ecr.af-south-1.")
    assert sm.image(sm_cfg(tmp_path, "aws.region=eu-west-1")).startswith("763104351884.dkr.ecr.eu-west-1.")
    assert "-cpu-" in sm.image(sm_cfg(tmp_path, "aws.sagemaker.instance_type=ml.m5.xlarge"))
    assert "-gpu-" in sm.image(sm_cfg(tmp_path, "aws.sagemaker.instance_type=ml.p4d.24xlarge"))
    own = "111122223333.dkr.ecr.us-east-1.amazonaws.com/mine:1"
    assert sm.image(sm_cfg(tmp_path, f"aws.sagemaker.image={own}", "aws.region=mars-north-1")) == own
    assert sm.image_repository_arn(own) == "arn:aws:ecr:us-east-1:111122223333:repository/mine"


def test_a_run_folder_name_becomes_a_valid_job_name_and_tag(tmp_path):
    from termtune.aws import sagemaker as sm

    cfg = load_config(None, [f"run.dir={tmp_path / ('My Run (v2), final_' + 'x' * 80)}", "aws.bucket=termtune-test"])
    request = sm.build_request(cfg, sm.job_name(cfg, "20261204211500"), f"arn:aws:iam::{ACCOUNT}:role/exec",
                               sm.Uris.of(ROOT), "ab" * 32, cfg.run_dir.name, {})
    sm.check_request(request)
    assert len(request["TrainingJobName"]) <= 63 and request["TrainingJobName"].endswith("-20261204211500")


# ----------------------------------------------------------------------------- the role


def test_the_execution_role_is_least_privilege_and_passes_the_iam_linter():
    import parliament

    from termtune.aws import sagemaker as sm, trust

    uris = sm.Uris.of(ROOT)
    image = "763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-training:2.8.0"
    plain = sm.permissions_policy(uris, ACCOUNT, "us-east-1", image)
    full = sm.permissions_policy(uris, ACCOUNT, "us-east-1", image, [KEY, KEY], ["subnet-0a1b"], ["sg-0c2d"])
    trust_doc = sm.trust_policy(ACCOUNT)
    as_linted = {**trust_doc, "Statement": [{**st, "Resource": f"arn:aws:iam::{ACCOUNT}:role/termtune-sagemaker-x"}
                                            for st in trust_doc["Statement"]]}
    for doc in (plain, full, as_linted):
        policy = parliament.analyze_policy_string(json.dumps(doc), ignore_private_auditors=True)
        assert policy.findings == [], [str(f) for f in policy.findings]

    by_sid = {s["Sid"]: s for s in full["Statement"]}
    prefix = "arn:aws:s3:::termtune-test/termtune/sagemaker/run-0123456789ab/"
    assert by_sid["ReadInputs"]["Resource"] == [prefix + "*"]
    assert by_sid["WriteOutput"]["Resource"] == [prefix + "output/*", prefix + "checkpoints/*"]
    writes = [s for s in full["Statement"] if any(a in ("s3:PutObject", "s3:DeleteObject") for a in s["Action"])]
    assert writes == [by_sid["WriteOutput"]]  # nothing else in the bucket is writable
    assert by_sid["PullImage"]["Resource"] == [
        "arn:aws:ecr:us-east-1:763104351884:repository/huggingface-pytorch-training"]
    assert by_sid["UseKeys"]["Resource"] == [KEY]
    assert by_sid["JobLogs"]["Resource"][0] == f"arn:aws:logs:us-east-1:{ACCOUNT}:log-group:/aws/sagemaker/TrainingJobs"
    assert by_sid["JobNetworkInterfaces"]["Resource"] == [
        f"arn:aws:ec2:us-east-1:{ACCOUNT}:network-interface/*", f"arn:aws:ec2:us-east-1:{ACCOUNT}:subnet/subnet-0a1b",
        f"arn:aws:ec2:us-east-1:{ACCOUNT}:security-group/sg-0c2d"]
    assert {s["Sid"] for s in plain["Statement"]} == {"ReadInputs", "ListInputs", "WriteOutput", "JobLogs",
                                                      "JobMetrics", "PullImageToken", "PullImage"}
    assert trust.allows_service(trust_doc, "sagemaker.amazonaws.com", "sts:AssumeRole", {"aws:SourceAccount": ACCOUNT})
    assert not trust.allows_service(trust_doc, "sagemaker.amazonaws.com", "sts:AssumeRole",
                                    {"aws:SourceAccount": "210987654321"})
    assert not trust.allows_service(trust_doc, "bedrock.amazonaws.com", "sts:AssumeRole", {"aws:SourceAccount": ACCOUNT})


def test_role_propagation_is_retried_only_for_a_role_termtune_created(tmp_path):
    import boto3
    from botocore.stub import Stubber

    from termtune.aws import jobrecord, training

    request = request_for(sm_cfg(tmp_path))
    client = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    not_yet = "Could not assume role arn:aws:iam::123456789012:role/exec. Please ensure that the role exists"
    with Stubber(client) as stub:
        stub.add_client_error("create_training_job", "ValidationException", not_yet)
        stub.add_response("create_training_job", {"TrainingJobArn": "arn:aws:sagemaker:us-east-1:123456789012:"
                                                                     "training-job/tt-run-20261204211500"})
        slept = []
        assert training.create_job(client, request, 60, sleep=slept.append).endswith("tt-run-20261204211500")
        assert len(slept) == 1
        stub.add_client_error("create_training_job", "ValidationException", not_yet)
        with pytest.raises(UserError, match="Could not assume role"):
            training.create_job(client, request, 0, sleep=slept.append)
        stub.add_client_error("create_training_job", "ResourceLimitExceeded", "account-level service limit")
        with pytest.raises(UserError, match="quota increase for ml.g5.2xlarge"):
            training.create_job(client, request, 60, sleep=slept.append)
        stub.add_client_error("create_training_job", "ResourceInUse", "Training job names must be unique")
        with pytest.raises(UserError, match="aws.sagemaker.job_name: a training job named tt-run-20261204211500"):
            training.create_job(client, request, 60, sleep=slept.append)
    assert len(slept) == 1


# ----------------------------------------------------------------------------- the logs


def stream(name):
    return {"logStreamName": name}


def events(*pairs):
    return [{"timestamp": ts, "message": message, "ingestionTime": ts} for ts, message in pairs]


def test_the_log_merger_orders_hosts_by_time_and_shows_each_line_once_across_ties_and_pages():
    """Recorded GetLogEvents pages of two hosts: lines that share a timestamp, a read that starts again at
    that (inclusive) timestamp, and already-shown lines spread over two pages."""
    import boto3
    from botocore.stub import Stubber

    from termtune.aws.sagemaker import LOG_GROUP, LogTail

    logs = boto3.client("logs", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    job = "tt-run-1"
    a, b = f"{job}/algo-1-1733300000", f"{job}/algo-2-1733300000"
    listing = {"logGroupName": LOG_GROUP, "logStreamNamePrefix": job + "/", "orderBy": "LogStreamName"}

    def page(stream_name, start, token, evs, forward):
        expected = {"logGroupName": LOG_GROUP, "logStreamName": stream_name, "startTime": start,
                    "startFromHead": True, **({"nextToken": token} if token else {})}
        stub.add_response("get_log_events", {"events": events(*evs), "nextForwardToken": forward,
                                             "nextBackwardToken": "b"}, expected)

    tail = LogTail(job)
    with Stubber(logs) as stub:
        stub.add_client_error("describe_log_streams", "ResourceNotFoundException", "The specified log group does not exist.")
        assert tail.read(logs) == []  # the job has written nothing yet

        stub.add_response("describe_log_streams", {"logStreams": [stream(a), stream(b)]}, listing)
        page(a, 0, None, [(1000, "a1"), (1000, "a2")], "fa1")
        page(a, 0, "fa1", [], "fa1")
        page(b, 0, None, [(999, "b1"), (1000, "b2")], "fb1")
        page(b, 0, "fb1", [], "fb1")
        assert tail.read(logs) == [(999, b, "b1"), (1000, a, "a1"), (1000, a, "a2"), (1000, b, "b2")]

        # the next read starts at the last timestamp of each stream and skips what was shown at it
        stub.add_response("describe_log_streams", {"logStreams": [stream(a), stream(b)]}, listing)
        page(a, 1000, None, [(1000, "a1"), (1000, "a2"), (1000, "a3"), (1005, "a4")], "fa2")
        page(a, 1000, "fa2", [], "fa2")
        page(b, 1000, None, [(1000, "b2")], "fb2")  # the shown line alone on a page ...
        page(b, 1000, "fb2", [(1000, "b3"), (1003, "b4")], "fb3")  # ... and the new ones on the next
        page(b, 1000, "fb3", [], "fb3")
        assert [m for _, _, m in tail.read(logs)] == ["a3", "b3", "b4", "a4"]

        stub.add_response("describe_log_streams", {"logStreams": [stream(a), stream(b)]}, listing)
        page(a, 1005, None, [(1005, "a4")], "fa3")
        page(a, 1005, "fa3", [], "fa3")
        page(b, 1003, None, [(1003, "b4")], "fb4")
        page(b, 1003, "fb4", [], "fb4")
        assert tail.read(logs) == []  # nothing new: nothing shown twice
        stub.assert_no_pending_responses()


# ----------------------------------------------------------------------------- the cost


def test_the_cost_is_billable_seconds_times_instances_times_the_dated_rate():
    from termtune.aws import sagemaker as sm

    job = {"BillableTimeInSeconds": 1800, "TrainingTimeInSeconds": 1800,
           "ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 2}}
    cost = sm.cost(job, "us-east-1")
    assert cost["usd"] == pytest.approx(1800 * 2 * 1.515 / 3600) and cost["price_source"] == sm.PRICE_SOURCE
    assert "2026" in sm.PRICE_SOURCE and cost["spot_savings"] is None
    spot = sm.cost({**job, "BillableTimeInSeconds": 600, "EnableManagedSpotTraining": True}, "us-east-1")
    assert spot["usd"] == pytest.approx(600 * 2 * 1.515 / 3600) and spot["spot_savings"] == pytest.approx(2 / 3, abs=1e-4)
    assert sm.cost(job, "eu-west-3") is None  # no price known there
    own = sm.cost(job, "eu-west-3", usd_per_hour=2.0)
    assert own["usd"] == pytest.approx(2.0) and own["price_source"] == "aws.sagemaker.usd_per_hour"
    assert sm.cost({**job, "BillableTimeInSeconds": None}, "us-east-1") is None


# ----------------------------------------------------------------------------- the flow


def stand_in_bundle(monkeypatch):
    """termtune.remote.bundle.build as the contract describes it (channel -> a folder of exactly its files)."""
    from termtune.config import dump_config
    from termtune.layout import RunLayout

    def build(cfg, dest):
        shutil.rmtree(dest, ignore_errors=True)
        folders = {name: dest / name for name in ("code", "config", "data")}
        for folder in folders.values():
            folder.mkdir(parents=True)
        (folders["code"] / "entry.sh").write_text("exec python -m termtune.remote.entry\n")
        (folders["config"] / "termtune.yaml").write_text(dump_config(cfg))
        for path in RunLayout.of(cfg).data.iterdir():
            shutil.copy(path, folders["data"] / path.name)
        return folders

    module = types.ModuleType("termtune.remote.bundle")
    module.build = build
    monkeypatch.setitem(sys.modules, "termtune.remote.bundle", module)
    try:
        import termtune.remote

        monkeypatch.setattr(termtune.remote, "bundle", module, raising=False)
    except ImportError:
        monkeypatch.setitem(sys.modules, "termtune.remote", types.SimpleNamespace(bundle=module))


class FakeSageMaker:
    """A real botocore SageMaker client whose answers are stubbed (Stubber) in the order SageMaker gives them;
    every request still goes through botocore's validation. Each job's output is written to moto's S3 and its
    log lines to moto's CloudWatch Logs, as the job would."""

    def __init__(self, monkeypatch):
        import boto3
        from botocore.stub import Stubber

        self.client = boto3.client("sagemaker", region_name="us-east-1")
        self.stub = Stubber(self.client)
        self.stub.activate()
        from termtune.aws import clients, training

        real = clients.client
        monkeypatch.setattr(training, "client", lambda service, *a, **k:
                            self.client if service == "sagemaker" else real(service, *a, **k))

    def submitted(self, job):
        self.stub.add_response("create_training_job", {"TrainingJobArn": arn(job)})

    def status(self, job, status, secondary, **extra):
        self.stub.add_response("describe_training_job", {
            "TrainingJobName": job, "TrainingJobArn": arn(job), "TrainingJobStatus": status,
            "SecondaryStatus": secondary, "CreationTime": 1, "AlgorithmSpecification": {"TrainingInputMode": "File"},
            "ModelArtifacts": {"S3ModelArtifacts": extra.pop("output", "")},
            "SecondaryStatusTransitions": [{"Status": s, "StartTime": 1, "StatusMessage": f"{s} ..."}
                                           for s in extra.pop("transitions", [secondary])],
            "ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 100},
            "StoppingCondition": {"MaxRuntimeInSeconds": 14400}, **extra})


def arn(job):
    return f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:training-job/{job}"


def job_output(cfg, job, artifact: Path, lines=("step 1 loss 2.0", "step 2 loss 1.5")) -> str:
    """What the job leaves: the artifact and termtune's records under <S3ModelArtifacts>, and its log lines."""
    from termtune.aws import stage

    s3 = boto("s3")
    output = f"{stage.sagemaker_root(cfg, stage.run_id(cfg))}output/{job}/output/model/"
    _, prefix = output.removeprefix("s3://").split("/", 1)
    for path in artifact.iterdir():
        where = "termtune" if path.name == "manifest.json" else "artifact"
        s3.upload_file(str(path), BUCKET, f"{prefix}{where}/{path.name}")
    logs = boto("logs")
    now = int(time.time() * 1000)  # CloudWatch Logs refuses events older than 14 days
    if not logs.describe_log_groups(logGroupNamePrefix="/aws/sagemaker/TrainingJobs")["logGroups"]:
        logs.create_log_group(logGroupName="/aws/sagemaker/TrainingJobs")
    logs.create_log_stream(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=f"{job}/algo-1-1733300000")
    logs.put_log_events(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=f"{job}/algo-1-1733300000",
                        logEvents=[{"timestamp": now + i, "message": m} for i, m in enumerate(lines)])
    return output


@pytest.fixture
def flow(tmp_path, aws_env, bucket, monkeypatch, prepared_cfg):  # noqa: F811
    """A prepared tiny run set to train on SageMaker, with moto's Logs, the bundle stand-in and the stubbed
    SageMaker client; `aws_env` starts termtune serve for deploy."""
    import os

    monkeypatch.setenv("AWS_ENDPOINT_URL_CLOUDWATCH_LOGS", os.environ["AWS_ENDPOINT_URL_S3"])  # moto
    stand_in_bundle(monkeypatch)
    logs = boto("logs")  # moto's state outlives a test: no job's log lines from an earlier one
    for group in logs.describe_log_groups(logGroupNamePrefix="/aws/sagemaker/TrainingJobs")["logGroups"]:
        logs.delete_log_group(logGroupName=group["logGroupName"])
    cfg = prepared_cfg
    for key, value in {"train.on": "sagemaker", "aws.bucket": BUCKET, "aws.sagemaker.poll_seconds": 0.01,
                       "aws.sagemaker.job_name": "tt-run-one", "aws.poll_seconds": 0.1}.items():
        section, _, name = key.rpartition(".")
        target = cfg
        for part in section.split("."):
            target = getattr(target, part)
        setattr(target, name, value)
    return cfg, FakeSageMaker(monkeypatch), aws_env


def test_a_job_is_recorded_before_it_is_created_then_followed_finished_and_reused(flow, artifact_template, capfd,  # noqa: F811
                                                                                   monkeypatch):
    from termtune import api, pipeline
    from termtune.aws import jobrecord, training
    from termtune.layout import RunLayout

    cfg, fake, _ = flow
    output = job_output(cfg, "tt-run-one", artifact_template)
    seen_before_create = []
    fake.submitted("tt-run-one")
    create = training.create_job
    monkeypatch.setattr(training, "create_job", lambda *a, **k: seen_before_create.append(jobrecord.read_jobs(cfg))
                        or create(*a, **k))
    fake.status("tt-run-one", "InProgress", "Training", transitions=["Starting", "Downloading", "Training"],
                ProgressInfo={"CurrentStep": 3, "TotalStepCountPerEpoch": 7, "CurrentEpoch": 1, "MaxEpoch": 2})
    fake.status("tt-run-one", "Completed", "Completed", output=output, BillableTimeInSeconds=600,
                TrainingTimeInSeconds=600, transitions=["Starting", "Downloading", "Training", "Uploading", "Completed"])
    result = api.train(cfg)
    fake.stub.assert_no_pending_responses()

    [recorded] = seen_before_create[0]  # the request is on disk before SageMaker is asked
    assert recorded["status"] == "creating" and recorded["request"]["TrainingJobName"] == "tt-run-one"
    [job] = jobrecord.read_jobs(cfg)
    assert job["job_arn"] == arn("tt-run-one") and job["status"] == "Completed"
    assert job["s3_model_artifacts"] == output and job["artifact_uri"] == output + "artifact/"
    assert job["billable_seconds"] == 600 and job["cost"]["usd"] == pytest.approx(600 * 1.515 / 3600)
    assert job["fingerprint"] == pipeline.train_fingerprint(cfg) and job["role_created"] is True
    assert (RunLayout.of(cfg).job_records / "manifest.json").is_file()
    assert "Completed" in result.summary() and "$0.25" in result.summary()
    out, err = capfd.readouterr()
    assert out.count("[algo-1] step 1 loss 2.0") == 1 and out.count("[algo-1] step 2 loss 1.5") == 1
    assert out.index("step 1 loss") < out.index("step 2 loss")
    assert err.count("job tt-run-one: Downloading") == 1 and "job tt-run-one: Uploading" in err
    assert "job tt-run-one: step 3/7 of epoch 1/2" in err

    role = boto("iam").get_role(RoleName=job["role_name"])["Role"]
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {"Service": "sagemaker.amazonaws.com"}
    # every channel went up; a second submission would skip unchanged files
    uploads = job["uploads"]
    assert set(uploads) == {"code", "config", "data"} and all(u["uploaded"] > 0 for u in uploads.values())

    # unchanged settings: nothing is submitted (the Stubber would refuse any call)
    again = api.train(cfg)
    assert again.up_to_date and len(jobrecord.read_jobs(cfg)) == 1
    # the stage record lost, the Completed job of the same fingerprint is still reused
    RunLayout.of(cfg).record("train").unlink()
    assert api.train(cfg).reused and len(jobrecord.read_jobs(cfg)) == 1
    fake.stub.assert_no_pending_responses()

    # a changed learning rate is a new job, with unchanged channel files skipped
    cfg.train.learning_rate = 0.004
    cfg.aws.sagemaker.job_name = "tt-run-two"
    output2 = job_output(cfg, "tt-run-two", artifact_template)
    fake.submitted("tt-run-two")
    fake.status("tt-run-two", "Completed", "Completed", output=output2, BillableTimeInSeconds=60)
    api.train(cfg)
    first, second = jobrecord.read_jobs(cfg)
    assert second["job_name"] == "tt-run-two" and second["fingerprint"] != first["fingerprint"]
    assert second["uploads"]["code"]["skipped"] == 1 and second["uploads"]["config"]["uploaded"] == 1
    assert second["request"]["CheckpointConfig"]["S3Uri"] != first["request"]["CheckpointConfig"]["S3Uri"]
    listing = training.jobs_list(cfg, pipeline.train_fingerprint(cfg)).splitlines()
    assert "tt-run-one" in listing[1] and "other" in listing[1] and "tt-run-two" in listing[2] and "current" in listing[2]


def test_deploy_imports_from_the_jobs_output_without_uploading_and_cleanup_keeps_it(flow,  # noqa: F811
                                                                                      artifact_template):
    from termtune import api
    from termtune.aws import jobrecord, stage

    cfg, fake, start_serve = flow
    output = job_output(cfg, "tt-run-one", artifact_template)
    fake.submitted("tt-run-one")
    fake.status("tt-run-one", "Completed", "Completed", output=output, BillableTimeInSeconds=60)
    api.train(cfg)
    s3 = boto("s3")
    before = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    start_serve(runtime="in-process")
    result = api.deploy(cfg)
    after = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    assert after == before  # no re-upload: Bedrock read the job's artifact where it lies
    assert result.s3_uri == output + "artifact/" and result.model_arn
    record = stage.read_record(cfg)
    assert record["sagemaker_job"] == "tt-run-one" and record["s3_uri"] == output + "artifact/"

    # cleanup: the import, the channels the job read, the execution role; the job's output stays
    [job] = jobrecord.read_jobs(cfg)
    api.cleanup(cfg, yes=True)
    left = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    assert left == {k for k in before if "/output/" in k} and any(k.endswith("model.safetensors") for k in left)
    with pytest.raises(boto("iam").exceptions.NoSuchEntityException):
        boto("iam").get_role(RoleName=job["role_name"])


def test_detach_returns_at_once_and_attach_finishes_the_stage(flow, artifact_template):  # noqa: F811
    from termtune import api, pipeline
    from termtune.aws import jobrecord, training
    from termtune.layout import RunLayout

    cfg, fake, _ = flow
    cfg.aws.sagemaker.detach = True
    fake.submitted("tt-run-one")
    with pytest.raises(Detached, match="termtune jobs attach"):
        api.train(cfg)
    [job] = jobrecord.read_jobs(cfg)
    assert job["status"] == "InProgress" and job["job_arn"] == arn("tt-run-one") and job["request"]
    assert not RunLayout.of(cfg).record("train").exists()

    output = job_output(cfg, "tt-run-one", artifact_template)
    fake.status("tt-run-one", "Completed", "Completed", output=output, BillableTimeInSeconds=60)
    result = pipeline.attach_job(cfg)
    assert result.job["status"] == "Completed" and RunLayout.of(cfg).record("train").exists()
    assert len(jobrecord.read_jobs(cfg)) == 1  # followed, not submitted again


def test_ctrl_c_without_a_terminal_detaches_and_leaves_the_job_running(flow, monkeypatch):  # noqa: F811
    from termtune import api
    from termtune.aws import jobrecord, training

    cfg, fake, _ = flow
    fake.submitted("tt-run-one")
    fake.status("tt-run-one", "InProgress", "Training")

    def interrupted(self, logs):  # Ctrl-C while the job's log lines are being read
        raise KeyboardInterrupt

    monkeypatch.setattr(training.sm.LogTail, "read", interrupted)
    monkeypatch.setattr(sys, "stdin", open("/dev/null"))
    with pytest.raises(Detached, match="goes on in SageMaker"):
        api.train(cfg)
    fake.stub.assert_no_pending_responses()  # and no StopTrainingJob: the Stubber would have refused it
    assert jobrecord.read_jobs(cfg)[0]["status"] == "InProgress"


def test_a_failed_job_says_why_with_its_last_log_lines(flow, artifact_template, capfd):  # noqa: F811
    from termtune import api
    from termtune.aws import jobrecord, training

    cfg, fake, _ = flow
    job_output(cfg, "tt-run-one", artifact_template, lines=("loading data", "Traceback: out of memory"))
    fake.submitted("tt-run-one")
    fake.status("tt-run-one", "Failed", "Failed", FailureReason="AlgorithmError: CUDA out of memory at step 3")
    with pytest.raises(UserError, match="tt-run-one failed: AlgorithmError: CUDA out of memory at step 3"):
        api.train(cfg)
    [job] = jobrecord.read_jobs(cfg)
    assert job["status"] == "Failed" and "out of memory" in job["failure_reason"]
    assert "last log lines:\n[algo-1] loading data\n[algo-1] Traceback: out of memory" in capfd.readouterr().err


def test_a_manifest_that_does_not_match_the_artifact_in_s3_is_refused(flow, artifact_template, tmp_path):  # noqa: F811
    from termtune import api

    cfg, fake, _ = flow
    changed = tmp_path / "changed"
    shutil.copytree(artifact_template, changed)
    with open(changed / "config.json", "a") as f:
        f.write(" ")  # one byte more than the manifest says
    output = job_output(cfg, "tt-run-one", changed)
    fake.submitted("tt-run-one")
    fake.status("tt-run-one", "Completed", "Completed", output=output, BillableTimeInSeconds=60)
    with pytest.raises(UserError, match="does not match the job's manifest .config.json has"):
        api.train(cfg)


def test_train_on_sagemaker_checks_before_anything_is_uploaded(flow):  # noqa: F811
    from termtune import api

    cfg, fake, _ = flow
    cfg.aws.sagemaker.instance_type = "ml.g5.2xlarge-bogus"
    with pytest.raises(UserError, match="aws.sagemaker.instance_type"):
        api.train(cfg)
    assert not boto("s3").list_objects_v2(Bucket=BUCKET).get("Contents")


def test_local_stages_refuse_a_run_that_trains_on_sagemaker(flow):  # noqa: F811
    from termtune import api

    cfg, _, _ = flow
    with pytest.raises(UserError, match="evaluate: train.on=sagemaker"):
        api.evaluate(cfg)


def test_run_goes_from_data_to_the_job_and_the_cli_detaches_with_exit_0(flow, artifact_template, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from termtune import api
    from termtune.aws import jobrecord
    from termtune.cli import app
    from termtune.config import dump_config

    cfg, fake, _ = flow
    cfg.aws.deploy = False
    output = job_output(cfg, "tt-run-one", artifact_template)
    fake.submitted("tt-run-one")
    fake.status("tt-run-one", "Completed", "Completed", output=output, BillableTimeInSeconds=60)
    outcomes = api.run(cfg)
    assert list(outcomes.results) == ["data", "train"] and outcomes["train"].job["status"] == "Completed"

    config = tmp_path / "sagemaker.yaml"
    config.write_text(dump_config(cfg))
    fake.submitted("tt-run-two")
    result = CliRunner().invoke(app, ["train", str(config), "train.learning_rate=0.002",
                                      "aws.sagemaker.job_name=tt-run-two", "--on", "sagemaker", "--detach"])
    assert result.exit_code == 0, result.output
    assert "tt-run-two goes on in SageMaker" in result.output and "termtune jobs attach" in result.output
    assert [j["status"] for j in jobrecord.read_jobs(cfg)] == ["Completed", "InProgress"]
    listing = CliRunner().invoke(app, ["jobs", "list", str(config)])
    assert listing.exit_code == 0 and "tt-run-one" in listing.output and "tt-run-two" in listing.output


def test_plan_estimates_against_the_jobs_instances_and_their_sagemaker_price(prepared_cfg):
    from termtune import plan as P

    cfg = prepared_cfg
    cfg.train.on = "sagemaker"
    cfg.aws.sagemaker.instance_type = "ml.g5.12xlarge"
    cfg.aws.sagemaker.instance_count = 2
    on_job = P.plan(cfg, cpu_peak=100e9, cpu_bandwidth=10e9)
    same_gpu = P.plan(cfg, gpu="a10g", cpu_peak=100e9, cpu_bandwidth=10e9)  # --gpu still plans for that GPU
    assert on_job.device["name"] == "NVIDIA A10G" and on_job.device["memory_bytes"] == 24 * 2**30
    assert on_job.memory == same_gpu.memory and on_job.fits == same_gpu.fits
    assert on_job.device["usd_per_hour"] == pytest.approx(2 * 7.09)
    assert on_job.money["train_usd"] == pytest.approx(2 * 7.09 * on_job.train_seconds / 3600)
    assert "2 x ml.g5.12xlarge (SageMaker)" in on_job.summary()
    cfg.aws.region = "eu-west-3"  # no dated price there
    assert P.plan(cfg, cpu_peak=100e9, cpu_bandwidth=10e9).money["train_usd"] is None
    cfg.aws.sagemaker.instance_type = "ml.m5.xlarge"
    with pytest.raises(UserError, match="aws.sagemaker.instance_type: plan has no GPU figures for ml.m5.xlarge"):
        P.plan(cfg, cpu_peak=100e9, cpu_bandwidth=10e9)


def test_a_job_recorded_as_being_created_is_adopted_or_created_anew(flow, artifact_template):  # noqa: F811
    """A command killed between recording the request and SageMaker's answer: the next run asks SageMaker for
    the job by name and follows it if it exists; otherwise the entry says so and a job is created."""
    from termtune import api, pipeline
    from termtune.aws import jobrecord

    cfg, fake, _ = flow
    fp = pipeline.train_fingerprint(cfg)
    jobrecord.save(cfg, {"job_name": "tt-run-one", "status": "creating", "fingerprint": fp, "job_arn": None})
    output = job_output(cfg, "tt-run-one", artifact_template)
    fake.status("tt-run-one", "InProgress", "Training")  # the adoption's DescribeTrainingJob: it exists
    fake.status("tt-run-one", "Completed", "Completed", output=output, BillableTimeInSeconds=60)
    api.train(cfg)
    [job] = jobrecord.read_jobs(cfg)  # followed, not created a second time (the Stubber refuses a create)
    assert job["status"] == "Completed" and job["job_arn"] == arn("tt-run-one")

    cfg.train.learning_rate = 0.003
    cfg.aws.sagemaker.job_name = "tt-run-two"
    fp = pipeline.train_fingerprint(cfg)
    jobrecord.save(cfg, {"job_name": "tt-lost", "status": "creating", "fingerprint": fp, "job_arn": None})
    fake.stub.add_client_error("describe_training_job", "ValidationException", "Requested resource not found.")
    output = job_output(cfg, "tt-run-two", artifact_template)
    fake.submitted("tt-run-two")
    fake.status("tt-run-two", "Completed", "Completed", output=output, BillableTimeInSeconds=60)
    api.train(cfg)
    assert {j["job_name"]: j["status"] for j in jobrecord.read_jobs(cfg)} == {
        "tt-run-one": "Completed", "tt-lost": "not created", "tt-run-two": "Completed"}
    fake.stub.assert_no_pending_responses()


def test_where_it_trains_changes_only_the_fingerprints_it_should(tmp_path):
    """Local runs made before train.on existed stay up to date; a SageMaker job's instances and image make a
    new train fingerprint, its waiting and polling settings none; deploy is never re-run by aws.sagemaker."""
    from termtune import pipeline

    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", "aws.bucket=termtune-test"])
    train, deploy = pipeline.BY_NAME["train"], pipeline.BY_NAME["deploy"]
    local = pipeline.inputs(cfg, train)
    assert "train.on" not in local["keys"] and local["sources"] == {}
    local_fp, deploy_fp = pipeline.fingerprint(cfg, train), pipeline.fingerprint(cfg, deploy)
    cfg.aws.sagemaker.instance_type = "ml.g6.2xlarge"
    cfg.aws.sagemaker.poll_seconds = 1
    assert pipeline.fingerprint(cfg, train) == local_fp  # not used while training locally
    cfg.train.on = "sagemaker"
    on_job = pipeline.fingerprint(cfg, train)
    assert on_job != local_fp
    cfg.aws.sagemaker.max_runtime = 3600
    cfg.aws.sagemaker.detach = True
    cfg.aws.sagemaker.tags = {"team": "terms"}
    assert pipeline.fingerprint(cfg, train) == on_job
    cfg.aws.sagemaker.instance_count = 2
    assert pipeline.fingerprint(cfg, train) != on_job
    cfg.train.on = "local"
    assert pipeline.fingerprint(cfg, deploy) == deploy_fp


def test_cleanup_refuses_while_a_job_may_run_and_a_channel_that_is_not_this_runs(flow):  # noqa: F811
    from termtune import api
    from termtune.aws import jobrecord, stage

    cfg, _, _ = flow
    rid = stage.run_id(cfg)
    jobrecord.save(cfg, {"job_name": "tt-running", "status": "InProgress"})
    with pytest.raises(UserError, match="tt-running may still be running"):
        api.cleanup(cfg, yes=True)
    theirs = {"uri": "s3://termtune-test/precious/", "files": ["keep.txt"]}
    jobrecord.save(cfg, {"job_name": "tt-running", "status": "Stopped", "uploads": {"code": theirs}})
    with pytest.raises(UserError, match="refusing to clean up 's3://termtune-test/precious/'"):
        api.cleanup(cfg, yes=True)
    ours = {"uri": f"{stage.sagemaker_root(cfg, rid)}code/", "files": ["../../precious/keep.txt"]}
    jobrecord.save(cfg, {"job_name": "tt-running", "status": "Stopped", "uploads": {"code": ours}})
    with pytest.raises(UserError, match="not plain"):
        api.cleanup(cfg, yes=True)


def test_ctrl_c_at_a_terminal_can_stop_the_job(flow, monkeypatch):  # noqa: F811
    import builtins

    from termtune import api
    from termtune.aws import training

    cfg, fake, _ = flow
    fake.submitted("tt-run-one")
    fake.status("tt-run-one", "InProgress", "Training")
    fake.stub.add_response("stop_training_job", {}, {"TrainingJobName": "tt-run-one"})

    def interrupted(self, logs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.sm.LogTail, "read", interrupted)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt: asked.append(prompt) or "s")
    with pytest.raises(Detached, match="asked SageMaker to stop tt-run-one"):
        api.train(cfg)
    assert "[d]etach and let it finish, or [s]top it?" in asked[0]
    fake.stub.assert_no_pending_responses()  # StopTrainingJob was called
