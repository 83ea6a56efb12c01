"""SageMaker training jobs for `termtune train --on sagemaker`: checks, request, role, logs, cost.

botocore checks only required members and minimum lengths of a CreateTrainingJob request: a 70-character
name, an instance type that does not exist or spot without a wait limit all reach AWS (and a bill, or a
failure minutes later). So every member is checked here against botocore's own sagemaker service model
(patterns, lengths, ranges, enums), and the cross-field rules AWS applies at run time are checked too,
each error naming the config key the user set. Nothing here calls AWS.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from termtune.config import Config
from termtune.errors import UserError

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
LOCAL_CHECKPOINTS = "/opt/ml/checkpoints"
ENTRY = 'bash "${TERMTUNE_OPT_ML:-/opt/ml}/input/data/code/entry.sh"'
CHANNELS = ("code", "config", "data", "model")
"""The input channels a job may get (termtune.remote.bundle.build); `model` only for a local base model."""
MAX_SECONDS = 28 * 86400
TERMTUNE_TAGS = ("project", "run", "fingerprint")
MAX_TAGS = 50

# Hugging Face PyTorch training Deep Learning Containers (GPU) and the plain PyTorch one (CPU), as
# the SageMaker Python SDK's image tables list them (v2 2.257.6, 2026-08-10:
# src/sagemaker/image_uri_config/{huggingface,pytorch}.json); checked 2026-12-04. Python 3.12 images.
GPU_IMAGE = "huggingface-pytorch-training:2.8.0-transformers4.56.2-gpu-py312-cu129-ubuntu22.04"
CPU_IMAGE = "pytorch-training:2.8.0-cpu-py312-ubuntu22.04-sagemaker"
DLC_ACCOUNT = "763104351884"
DLC_ACCOUNTS = {  # the regions whose images live in another account (same SDK tables)
    "af-south-1": "626614931356", "ap-east-1": "871362719292", "ap-south-2": "772153158452",
    "ap-southeast-3": "907027046896", "ap-southeast-4": "457447274322", "eu-central-2": "380420809688",
    "eu-south-1": "692866216735", "eu-south-2": "503227376785", "il-central-1": "780543022126",
    "me-central-1": "914824155844", "me-south-1": "217643126080",
}
DLC_REGIONS = (
    "us-east-1", "us-east-2", "us-west-1", "us-west-2", "ca-central-1", "sa-east-1", "eu-west-1", "eu-west-2",
    "eu-west-3", "eu-central-1", "eu-north-1", "ap-northeast-1", "ap-northeast-2", "ap-northeast-3", "ap-south-1",
    "ap-southeast-1", "ap-southeast-2", *DLC_ACCOUNTS)

# On-demand USD per instance-hour of SageMaker *training* (Linux), from the AWS Price List
# (AmazonSageMaker offer, component Training) as cited in reference/sagemaker.md §2.5; the p4d/p5
# figures reflect the 2025 price cut. Spot jobs are billed for fewer seconds (BillableTimeInSeconds),
# at these rates. Re-read https://aws.amazon.com/sagemaker/pricing/ before relying on them.
PRICE_SOURCE = "AWS Price List (AmazonSageMaker, Training), as recorded 2026-08/2026-09; unverified here 2026-12-04"
USD_PER_HOUR = {
    "us-east-1": {"ml.g5.2xlarge": 1.515, "ml.g5.12xlarge": 7.09, "ml.g6.2xlarge": 1.222, "ml.g6.12xlarge": 5.752,
                  "ml.g6e.2xlarge": 2.80, "ml.g6e.12xlarge": 13.12},
    "us-west-2": {"ml.g5.12xlarge": 7.09, "ml.g5.48xlarge": 20.36, "ml.g6.2xlarge": 1.222,
                  "ml.g6.12xlarge": 5.752, "ml.p4d.24xlarge": 25.25, "ml.p5.48xlarge": 63.29},
}


# ----------------------------------------------------------------------------- the service model


@functools.lru_cache(maxsize=1)
def service_model() -> Any:
    """botocore's sagemaker service model (about 0.2 s to load, once)."""
    from botocore.loaders import Loader
    from botocore.model import ServiceModel

    return ServiceModel(Loader().load_service_model("sagemaker", "service-2"), "sagemaker")


def instance_types() -> tuple[str, ...]:
    return tuple(service_model().shape_for("TrainingInstanceType").enum)


def _full_match(pattern: str, text: str) -> bool:
    if "\\p{" in pattern:  # Java's Unicode classes (tags): the regex package reads them, re does not
        import regex

        return regex.fullmatch(pattern, text) is not None
    return re.fullmatch(pattern, text) is not None


def shape_problems(shape: Any, value: Any, path: str) -> list[tuple[str, str]]:
    """(member path, problem) for every constraint of `shape` that `value` breaks: the type, required
    members, enums, patterns (anchored, as AWS applies them), lengths and ranges. Stricter than
    botocore's own validation, which checks only the type, required members and minimums."""
    problems: list[tuple[str, str]] = []
    meta = shape.metadata
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            return [(path, "must be a structure")]
        for name in shape.required_members:
            if name not in value:
                problems.append((f"{path}.{name}".lstrip("."), "is required"))
        for name, member in value.items():
            if name not in shape.members:
                problems.append((f"{path}.{name}".lstrip("."), "is not a member of " + shape.name))
                continue
            problems += shape_problems(shape.members[name], member, f"{path}.{name}".lstrip("."))
        return problems
    if kind == "list":
        if not isinstance(value, list):
            return [(path, "must be a list")]
        problems += _bounds(len(value), meta, path, "items")
        for i, item in enumerate(value):
            problems += shape_problems(shape.member, item, f"{path}[{i}]")
        return problems
    if kind == "map":
        if not isinstance(value, dict):
            return [(path, "must be a mapping")]
        problems += _bounds(len(value), meta, path, "entries")
        for key, item in value.items():
            problems += [(p, f"key {key!r} {m}") for p, m in shape_problems(shape.key, key, path)]
            problems += shape_problems(shape.value, item, f"{path}.{key}")
        return problems
    if kind == "string":
        if not isinstance(value, str):
            return [(path, "must be a string")]
        problems += _bounds(len(value), meta, path, "characters")
        if shape.enum and value not in shape.enum:
            problems.append((path, f"{value!r} is not one of SageMaker's {len(shape.enum)} values"))
        if meta.get("pattern") and not _full_match(meta["pattern"], value):
            problems.append((path, f"{value!r} does not match {meta['pattern']}"))
        return problems
    if kind in ("integer", "long"):
        if not isinstance(value, int) or isinstance(value, bool):
            return [(path, "must be a whole number")]
        if "min" in meta and value < meta["min"] or "max" in meta and value > meta["max"]:
            problems.append((path, f"{value} is outside {meta.get('min', '-inf')}..{meta.get('max', 'inf')}"))
        return problems
    if kind == "boolean" and not isinstance(value, bool):
        return [(path, "must be true or false")]
    return problems


def _bounds(n: int, meta: dict, path: str, unit: str) -> list[tuple[str, str]]:
    low, high = meta.get("min", 0), meta.get("max")
    if n < low or (high is not None and n > high):
        return [(path, f"has {n} {unit}; SageMaker allows {low} to {high if high is not None else 'any'}")]
    return []


# ----------------------------------------------------------------------------- checks before anything is spent


REQUEST_KEYS = {  # a request member -> the config key that sets it (longest prefix wins)
    "TrainingJobName": "aws.sagemaker.job_name",
    "RoleArn": "aws.sagemaker.role_arn",
    "ResourceConfig.InstanceType": "aws.sagemaker.instance_type",
    "ResourceConfig.InstanceCount": "aws.sagemaker.instance_count",
    "ResourceConfig.VolumeSizeInGB": "aws.sagemaker.volume_gb",
    "ResourceConfig.VolumeKmsKeyId": "aws.sagemaker.volume_kms_key_id",
    "AlgorithmSpecification.TrainingImage": "aws.sagemaker.image",
    "StoppingCondition.MaxRuntimeInSeconds": "aws.sagemaker.max_runtime",
    "StoppingCondition.MaxWaitTimeInSeconds": "aws.sagemaker.max_wait",
    "OutputDataConfig.KmsKeyId": "aws.sagemaker.output_kms_key_id",
    "OutputDataConfig": "aws.prefix",
    "CheckpointConfig": "aws.prefix",
    "InputDataConfig": "aws.prefix",
    "VpcConfig.Subnets": "aws.sagemaker.vpc.subnets",
    "VpcConfig.SecurityGroupIds": "aws.sagemaker.vpc.security_group_ids",
    "Tags": "aws.sagemaker.tags",
}


def check_request(request: dict[str, Any]) -> None:
    """Refuse (one line naming the config key) a CreateTrainingJob request SageMaker would refuse."""
    shape = service_model().operation_model("CreateTrainingJob").input_shape
    problems = shape_problems(shape, request, "")
    if problems:
        path, problem = problems[0]
        key = next((REQUEST_KEYS[p] for p in sorted(REQUEST_KEYS, key=len, reverse=True)
                    if path == p or path.startswith(p + ".") or path.startswith(p + "[")), None)
        raise UserError(f"{key or path}: {problem} (SageMaker's {path}); nothing was uploaded or started")


def check_settings(cfg: Config) -> None:
    """The settings of train.on=sagemaker SageMaker would refuse, or that cannot work, refused offline
    in one line naming the key: before the data is prepared, anything is uploaded, or a job is paid for."""
    sm = cfg.aws.sagemaker
    if not cfg.aws.bucket:
        raise UserError("aws.bucket: not set; train.on=sagemaker needs an S3 bucket you own for the job's inputs "
                        "and output, e.g. aws.bucket=my-bucket")
    if sm.instance_type not in instance_types():
        import difflib

        guess = difflib.get_close_matches(sm.instance_type, instance_types(), n=1)
        raise UserError(f"aws.sagemaker.instance_type: {sm.instance_type!r} is not a SageMaker training instance "
                        "type" + (f" (did you mean {guess[0]}?)" if guess else " (e.g. ml.g5.2xlarge)"))
    if cfg.model.quantization != "none" and not has_cuda(sm.instance_type):
        raise UserError(f"model.quantization: {cfg.model.quantization} (QLoRA) needs an NVIDIA GPU, and "
                        f"{sm.instance_type} has none: set aws.sagemaker.instance_type to a GPU instance such as "
                        "ml.g5.2xlarge, or model.quantization=none")
    if sm.job_name is not None:
        problems = shape_problems(service_model().shape_for("TrainingJobName"), sm.job_name, "TrainingJobName")
        if problems:
            raise UserError(f"aws.sagemaker.job_name: {problems[0][1]}; use 1 to 63 letters, digits and single "
                            "hyphens, starting with a letter or digit")
    if sm.spot and not sm.checkpoints:
        raise UserError("aws.sagemaker.checkpoints: spot training needs checkpoints (an interrupted job resumes "
                        "from them); set aws.sagemaker.checkpoints=true or aws.sagemaker.spot=false")
    if sm.max_wait is not None and not sm.spot:
        raise UserError("aws.sagemaker.max_wait: applies to spot training only; set aws.sagemaker.spot=true or "
                        "remove max_wait")
    if sm.spot and wait_limit(cfg) < sm.max_runtime:
        raise UserError(f"aws.sagemaker.max_wait: {sm.max_wait}s is less than max_runtime ({sm.max_runtime}s); "
                        "spot training waits for capacity and trains within max_wait, so it must be at least "
                        "max_runtime")
    vpc = sm.vpc
    if bool(vpc.subnets) != bool(vpc.security_group_ids):
        given, missing = ("subnets", "security_group_ids") if vpc.subnets else ("security_group_ids", "subnets")
        raise UserError(f"aws.sagemaker.vpc.{missing}: empty while vpc.{given} is set; a job in a VPC needs both "
                        "(or neither)")
    if sm.network_isolation and not _local_model(cfg):
        raise UserError(f"aws.sagemaker.network_isolation: the job has no network, so it cannot download "
                        f"model.source {cfg.model.source!r}; set model.source to a local folder (sent to the job "
                        "as its model channel), or network_isolation=false")
    reserved = [k for k in sm.tags if k in TERMTUNE_TAGS or k.lower().startswith("aws:")]
    if reserved:
        raise UserError(f"aws.sagemaker.tags: {reserved[0]!r} is reserved (termtune sets "
                        f"{', '.join(TERMTUNE_TAGS)}; AWS keeps aws:); choose another key")
    if len(sm.tags) > MAX_TAGS - len(TERMTUNE_TAGS):
        raise UserError(f"aws.sagemaker.tags: {len(sm.tags)} tags; a job takes {MAX_TAGS}, and termtune sets "
                        f"{len(TERMTUNE_TAGS)}, so at most {MAX_TAGS - len(TERMTUNE_TAGS)}")
    image_repository_arn(image(cfg))  # a region with no known image, an image that is not in ECR
    for key in ("output_kms_key_id", "volume_kms_key_id"):
        value = getattr(sm, key)
        if value is not None and not re.fullmatch(r"[a-zA-Z0-9:/_-]{1,2048}", value):
            raise UserError(f"aws.sagemaker.{key}: {value!r} is not a KMS key id, alias or ARN")
    check_request(build_request(cfg, job_name(cfg, "20000101000000"), "arn:aws:iam::123456789012:role/probe",
                                Uris.of("s3://probe-bucket/probe/"), "0" * 64, "probe", {}))


def has_cuda(instance_type: str) -> bool:
    """NVIDIA GPU instances: the P and G families (Trainium, Inferentia and CPU instances have none)."""
    family = instance_type.removeprefix("ml.").split(".")[0]
    return family[:1] in ("p", "g") and family != "g4ad"  # g4ad: AMD GPUs


def _local_model(cfg: Config) -> bool:
    from pathlib import Path

    return Path(cfg.model.source).expanduser().exists() or cfg.model.init == "random"


def wait_limit(cfg: Config) -> int:
    sm = cfg.aws.sagemaker
    return sm.max_wait if sm.max_wait is not None else min(2 * sm.max_runtime, MAX_SECONDS)


def image(cfg: Config) -> str:
    """aws.sagemaker.image, or the Deep Learning Container for aws.region and the instance's kind."""
    if cfg.aws.sagemaker.image:
        return cfg.aws.sagemaker.image
    region = cfg.aws.region
    if region not in DLC_REGIONS:
        raise UserError(f"aws.sagemaker.image: termtune knows no Deep Learning Container image in {region}; set "
                        "aws.sagemaker.image to a training image URI there (docs/sagemaker.md)")
    account = DLC_ACCOUNTS.get(region, DLC_ACCOUNT)
    tag = GPU_IMAGE if has_cuda(cfg.aws.sagemaker.instance_type) else CPU_IMAGE
    return f"{account}.dkr.ecr.{region}.amazonaws.com/{tag}"


def job_name(cfg: Config, stamp: str) -> str:
    """aws.sagemaker.job_name, or tt-<run>-<yyyymmddHHMMSS>: valid by construction, unique per second."""
    from termtune.aws.names import safe_name

    run = safe_name(cfg.run_dir.resolve().name, limit=63 - len("tt--") - len(stamp))
    return cfg.aws.sagemaker.job_name or f"tt-{run}-{stamp}"


# ----------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class Uris:
    """Where one run's job reads and writes in S3: every channel, the output and the checkpoints."""

    root: str
    """s3://bucket/<prefix>/ of this run's SageMaker files."""

    @classmethod
    def of(cls, root: str) -> "Uris":
        return cls(root if root.endswith("/") else root + "/")

    def channel(self, name: str) -> str:
        return f"{self.root}{name}/"

    @property
    def output(self) -> str:
        return f"{self.root}output/"

    def checkpoints(self, fingerprint: str) -> str:
        """Per fingerprint: a job with other settings never resumes from another's checkpoints."""
        return f"{self.root}checkpoints/{fingerprint[:16]}/"


def build_request(cfg: Config, name: str, role_arn: str, uris: Uris, fingerprint: str, run_name: str,
                  kms_arns: dict[str, str], channels: Iterable[str] = ("code", "config", "data")) -> dict[str, Any]:
    """The CreateTrainingJob request (the contract in docs/sagemaker.md). `kms_arns`: the resolved key ARNs of
    aws.sagemaker.output_kms_key_id / volume_kms_key_id, by those names."""
    sm = cfg.aws.sagemaker
    request: dict[str, Any] = {
        "TrainingJobName": name,
        "RoleArn": role_arn,
        "AlgorithmSpecification": {
            "TrainingImage": image(cfg), "TrainingInputMode": "File",
            "ContainerEntrypoint": ["/bin/bash"], "ContainerArguments": ["-c", ENTRY],
            "MetricDefinitions": [{"Name": "train:loss", "Regex": "'loss': ([0-9.e+-]+)"}]},
        "InputDataConfig": [
            {"ChannelName": channel, "InputMode": "File", "CompressionType": "None",
             "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uris.channel(channel),
                                             "S3DataDistributionType": "FullyReplicated"}}}
            for channel in channels],
        "OutputDataConfig": {"S3OutputPath": uris.output, "CompressionType": "NONE"},
        "ResourceConfig": {"InstanceType": sm.instance_type, "InstanceCount": sm.instance_count,
                           "VolumeSizeInGB": sm.volume_gb},
        "StoppingCondition": {"MaxRuntimeInSeconds": sm.max_runtime},
        "Environment": {"TERMTUNE_RUN": run_name},
        "EnableNetworkIsolation": sm.network_isolation,
        "EnableInterContainerTrafficEncryption": sm.instance_count > 1,
        # the run's folder name may hold characters a tag may not (brackets, commas): those become hyphens
        "Tags": [{"Key": "project", "Value": "termtune"},
                 {"Key": "run", "Value": re.sub(r"[^\w.:/=+@ -]", "-", run_name)[:256]},
                 {"Key": "fingerprint", "Value": fingerprint[:16]}]
                + [{"Key": k, "Value": v} for k, v in sm.tags.items()],
    }
    if sm.checkpoints:
        request["CheckpointConfig"] = {"S3Uri": uris.checkpoints(fingerprint), "LocalPath": LOCAL_CHECKPOINTS}
    if sm.spot:
        request["EnableManagedSpotTraining"] = True
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = wait_limit(cfg)
    if "output_kms_key_id" in kms_arns:
        request["OutputDataConfig"]["KmsKeyId"] = kms_arns["output_kms_key_id"]
    if "volume_kms_key_id" in kms_arns:
        request["ResourceConfig"]["VolumeKmsKeyId"] = kms_arns["volume_kms_key_id"]
    if sm.vpc.subnets:
        request["VpcConfig"] = {"Subnets": list(sm.vpc.subnets), "SecurityGroupIds": list(sm.vpc.security_group_ids)}
    return request


# ----------------------------------------------------------------------------- the execution role


def trust_policy(account: str) -> dict[str, Any]:
    """SageMaker may assume the role for this account's jobs only (confused deputy: aws:SourceAccount)."""
    return {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole",
        "Condition": {"StringEquals": {"aws:SourceAccount": account}}}]}


def permissions_policy(uris: Uris, account: str, region: str, image_uri: str, kms_arns: Iterable[str] = (),
                       subnets: Iterable[str] = (), security_groups: Iterable[str] = ()) -> dict[str, Any]:
    """Least privilege for one run's jobs: read this run's SageMaker prefix (the channels, and the checkpoints
    to resume from), write only its output and checkpoints, the training-job logs and metrics, pull the one
    image repository, and use the named KMS keys (by key ARN: IAM does not authorise through an alias)."""
    from termtune.aws.s3 import split_uri

    bucket, prefix = split_uri(uris.root)
    owner = {"StringEquals": {"aws:ResourceAccount": account}}
    logs = f"arn:aws:logs:{region}:{account}:log-group:{LOG_GROUP}"
    statements: list[dict[str, Any]] = [
        {"Sid": "ReadInputs", "Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": [f"arn:aws:s3:::{bucket}/{prefix}*"], "Condition": owner},
        {"Sid": "ListInputs", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [f"arn:aws:s3:::{bucket}"],
         "Condition": {**owner, "StringLike": {"s3:prefix": [prefix, f"{prefix}*"]}}},
        {"Sid": "WriteOutput", "Effect": "Allow", "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
         "Resource": [f"arn:aws:s3:::{bucket}/{split_uri(uris.output)[1]}*",
                      f"arn:aws:s3:::{bucket}/{prefix}checkpoints/*"], "Condition": owner},
        {"Sid": "JobLogs", "Effect": "Allow",
         "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
         "Resource": [logs, f"{logs}:*"]},  # the group, and its streams (log-group:<name>:log-stream:<stream>)
        {"Sid": "JobMetrics", "Effect": "Allow", "Action": ["cloudwatch:PutMetricData"], "Resource": ["*"],
         "Condition": {"StringLike": {"cloudwatch:namespace": ["/aws/sagemaker/*"]}}},
        {"Sid": "PullImageToken", "Effect": "Allow", "Action": ["ecr:GetAuthorizationToken"], "Resource": ["*"]},
        {"Sid": "PullImage", "Effect": "Allow",
         "Action": ["ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage"],
         "Resource": [image_repository_arn(image_uri)]},
    ]
    keys = sorted(set(kms_arns))
    if keys:
        statements.append({"Sid": "UseKeys", "Effect": "Allow",
                           "Action": ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:CreateGrant",
                                      "kms:DescribeKey"], "Resource": keys})
    subnets, security_groups = list(subnets), list(security_groups)
    if subnets:  # the job's network interfaces, in the named subnets and groups only (SageMaker Developer Guide)
        ec2 = f"arn:aws:ec2:{region}:{account}"
        statements += [
            {"Sid": "JobNetworkInterfaces", "Effect": "Allow", "Action": ["ec2:CreateNetworkInterface"],
             "Resource": [f"{ec2}:network-interface/*"] + [f"{ec2}:subnet/{s}" for s in subnets]
             + [f"{ec2}:security-group/{g}" for g in security_groups]},
            {"Sid": "JobNetworkInterfacesUse", "Effect": "Allow",
             "Action": ["ec2:CreateNetworkInterfacePermission", "ec2:DeleteNetworkInterface",
                        "ec2:DeleteNetworkInterfacePermission"], "Resource": [f"{ec2}:network-interface/*"]},
            {"Sid": "JobNetworkDescribe", "Effect": "Allow",  # the Describe calls take no resource
             "Action": ["ec2:DescribeNetworkInterfaces", "ec2:DescribeVpcs", "ec2:DescribeDhcpOptions",
                        "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups"], "Resource": ["*"]}]
    return {"Version": "2012-10-17", "Statement": statements}


def image_repository_arn(image_uri: str) -> str:
    """<acct>.dkr.ecr.<region>.amazonaws.com/<repo>:<tag> -> arn:aws:ecr:<region>:<acct>:repository/<repo>."""
    match = re.fullmatch(r"(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/([^:@]+)(?:[:@].*)?", image_uri)
    if not match:
        raise UserError(f"aws.sagemaker.image: {image_uri!r} is not an ECR image URI "
                        "(<account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>)")
    account, region, repo = match.groups()
    return f"arn:aws:ecr:{region}:{account}:repository/{repo}"


# ----------------------------------------------------------------------------- the logs


@dataclass
class LogTail:
    """The job's log lines from CloudWatch Logs, every host's stream merged by timestamp, each line once.

    The SageMaker SDK's algorithm: per stream, remember the last timestamp read and how many events at that
    timestamp were already shown; the next read starts at that timestamp (GetLogEvents' startTime is
    inclusive) and skips them, so events that share a timestamp are neither lost nor shown twice."""

    job_name: str
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)
    """stream -> (last timestamp read, events at that timestamp already shown)."""

    def read(self, logs: Any) -> list[tuple[int, str, str]]:
        """The new lines since the last call, as (timestamp ms, host stream, message), in time order."""
        streams = self.streams(logs)
        lines: list[tuple[int, int, int, str, str]] = []
        for rank, stream in enumerate(streams):
            start, skip = self.positions.get(stream, (0, 0))
            for order, event in enumerate(_events(logs, stream, start, skip)):
                ts = event["timestamp"]
                start, skip = (start, skip + 1) if ts == start else (ts, 1)
                lines.append((ts, rank, order, stream, event["message"]))
            self.positions[stream] = (start, skip)
        lines.sort(key=lambda line: line[:3])  # by time; ties keep host order, then each stream's order
        return [(ts, stream, message) for ts, _, _, stream, message in lines]

    def streams(self, logs: Any) -> list[str]:
        """This job's streams, one per host (<job>/algo-<k>-<epoch>); none until the job writes."""
        names: list[str] = []
        token = None
        while True:
            try:
                page = logs.describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix=self.job_name + "/",
                                                 orderBy="LogStreamName", **({"nextToken": token} if token else {}))
            except logs.exceptions.ResourceNotFoundException:
                return names  # the group appears with the first job that logs
            names += [s["logStreamName"] for s in page.get("logStreams", [])]
            token = page.get("nextToken")
            if not token:
                return names


def _events(logs: Any, stream: str, start: int, skip: int) -> Iterable[dict[str, Any]]:
    """A stream's events from `start` on, less the first `skip` (already shown), paging forward until empty."""
    token = None
    while True:
        page = logs.get_log_events(logGroupName=LOG_GROUP, logStreamName=stream, startTime=start,
                                   startFromHead=True, **({"nextToken": token} if token else {}))
        events = page.get("events", [])
        if not events:
            return
        if skip >= len(events):
            skip -= len(events)
        else:
            yield from events[skip:]
            skip = 0
        if page.get("nextForwardToken") in (None, token):
            return
        token = page["nextForwardToken"]


# ----------------------------------------------------------------------------- the cost


def cost(job: dict[str, Any], region: str, usd_per_hour: float | None = None) -> dict[str, Any] | None:
    """What a finished job cost: BillableTimeInSeconds x InstanceCount x the on-demand rate per
    instance-hour (AWS: "multiply BillableTimeInSeconds by the number of instances"; for a spot job
    SageMaker bills fewer seconds). None when the job reports no billable time or the price is unknown."""
    billable = job.get("BillableTimeInSeconds")
    resources = job.get("ResourceConfig") or {}
    instance, count = resources.get("InstanceType"), resources.get("InstanceCount") or 1
    rate = usd_per_hour or USD_PER_HOUR.get(region, {}).get(instance or "")
    if billable is None or rate is None:
        return None
    return {"billable_seconds": billable, "instance_type": instance, "instance_count": count, "region": region,
            "usd_per_instance_hour": rate, "usd": round(billable * count * rate / 3600, 4),
            "price_source": "aws.sagemaker.usd_per_hour" if usd_per_hour else PRICE_SOURCE,
            "spot_savings": _savings(job)}


def _savings(job: dict[str, Any]) -> float | None:
    billable, trained = job.get("BillableTimeInSeconds"), job.get("TrainingTimeInSeconds")
    if not job.get("EnableManagedSpotTraining") or not billable or not trained:
        return None
    return round(1 - billable / trained, 4)
