"""termtune deploy / invoke / cleanup with real boto3 clients against moto's S3/IAM/STS
server and termtune serve, both on 127.0.0.1, reached only through AWS_ENDPOINT_URL_*."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from aws_fixtures import artifact_template, aws_env, boto, bucket, moto_server, moto_url  # noqa: F401
from termtune import ownership
from termtune.config import load_config
from termtune.errors import UserError
from termtune.layout import RunLayout

ROLE = "arn:aws:iam::123456789012:role/existing-import-role"


def make_cfg(tmp_path: Path, artifact: Path, name: str = "run", **extra):
    """A termtune run directory (marked as one) holding a copy of the tiny artifact, and its config."""
    run = tmp_path / name
    shutil.copytree(artifact, run / "artifact")
    ownership.mark(RunLayout(root=run, artifact=run / "artifact"))
    overrides = {"run.dir": run, "aws.bucket": "termtune-test", "aws.poll_seconds": 0.1,
                 "aws.invoke_max_tokens": 8, "aws.role_arn": ROLE, **extra}
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def prefixes(cfg) -> tuple[str, str]:
    """The run's import prefix and termtune-files prefix (the run's id is made here if it has none,
    as the first deploy makes it)."""
    from termtune.aws.stage import names, run_id

    n = names(cfg, run_id(cfg))
    return n["prefix"], n["meta_prefix"]


def policy_of(cfg) -> str:
    from termtune.aws.stage import run_id

    return f"termtune-artifact-read-{run_id(cfg)}"


def versions(bucket_name: str, prefix: str) -> dict[str, int]:
    """How many times each key was PUT (the bucket is versioned)."""
    out: dict[str, int] = {}
    for v in boto("s3").list_object_versions(Bucket=bucket_name, Prefix=prefix).get("Versions", []):
        out[v["Key"][len(prefix):]] = out.get(v["Key"][len(prefix):], 0) + 1
    return out


def test_deploy_invoke_cleanup_end_to_end(tmp_path, aws_env, bucket, artifact_template, capfd):  # noqa: F811
    from termtune import aws
    from termtune.aws import s3 as s3mod

    server = aws_env(throttle_every=4)  # the SDK's standard retries absorb occasional throttling
    cfg = make_cfg(tmp_path, artifact_template, **{"aws.role_arn": "null", "aws.role_name": "tt-e2e-role"})
    result = aws.deploy(cfg)
    record = json.loads((cfg.run_dir / "deploy.json").read_text())
    assert record["status"] == "Completed" and record["model_arn"] == result.model_arn
    assert record["role_created"] is True and record["role_arn"].endswith(":role/tt-e2e-role")
    prefix, meta_prefix = prefixes(cfg)
    assert prefix == f"termtune/run-{(cfg.run_dir / 'deploy-id').read_text().strip()}/"
    assert record["s3_uri"] == f"s3://termtune-test/{prefix}"
    assert meta_prefix == f"termtune/_termtune/{prefix.split('/')[1]}/"
    listed = {f["path"] for f in json.loads(((cfg.run_dir / "artifact") / "manifest.json").read_text())["files"]}
    assert set(result.uploaded) == listed - {"README.md"}  # the import prefix holds the model only
    meta = boto("s3").list_objects_v2(Bucket=bucket, Prefix=meta_prefix)["Contents"]
    assert {o["Key"].rsplit("/", 1)[1] for o in meta} == {f for f in s3mod.TERMTUNE_FILES
                                                           if ((cfg.run_dir / "artifact") / f).is_file()}

    # What the import costs: GetImportedModel's facts, priced from aws.cmu_prices, recorded and printed.
    assert record["imported_model"]["customModelUnits"] == {"customModelUnitsPerModelCopy": 1,
                                                            "customModelUnitsVersion": "v1.0"}
    assert record["imported_model"]["modelArchitecture"] == "t5" and record["imported_model"]["modelKmsKeyArn"] is None
    assert record["cost_estimate"]["usd_per_5_minute_window"] == pytest.approx(0.05718 * 5)
    assert record["cost_estimate"]["usd_per_hour"] == pytest.approx(0.05718 * 60)
    assert record["cost_estimate"]["usd_storage_per_month"] == pytest.approx(1.95)
    assert "per 5-minute window" in result.summary() and "1 CMU per copy (v1.0)" in result.summary()

    # The role is least-privilege: Bedrock only, this account and region, this prefix only.
    iam = boto("iam")
    trust = iam.get_role(RoleName="tt-e2e-role")["Role"]["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    assert trust["Statement"][0]["Condition"]["StringEquals"]["aws:SourceAccount"] == "123456789012"
    policy = iam.get_role_policy(RoleName="tt-e2e-role", PolicyName=policy_of(cfg))["PolicyDocument"]
    assert f"arn:aws:s3:::termtune-test/{prefix}*" in json.dumps(policy)

    out = aws.invoke_cli(cfg, term="Asthma")
    assert out["prompt"] == "What is Asthma?" and out["request"]["max_tokens"] == 8
    streamed = aws.invoke_cli(cfg, term="Asthma", stream=True)
    assert streamed["text"] == out["text"]
    assert "amazon-bedrock-invocationMetrics" in streamed["chunks"][-1]  # a chunk without text, skipped
    cfg.aws.invoke_schema = "max_gen_len"
    gen = aws.invoke_cli(cfg, raw="What is Asthma?", as_json=True)
    assert gen["response"]["generation"] == out["text"] and gen["request"]["max_gen_len"] == 8
    assert json.loads((cfg.run_dir / "invoke.json").read_text())["text"] == out["text"]
    assert server.state.counts.get("ThrottlingException", 0) >= 1

    # The CLI: --json for scripts; cleanup refuses to delete without a terminal or --yes.
    from typer.testing import CliRunner

    from termtune.cli import app

    args = [f"run.dir={cfg.run_dir}", "aws.bucket=termtune-test", "aws.invoke_max_tokens=8"]
    result = CliRunner().invoke(app, ["invoke", *args, "--term", "Asthma", "--json", "--model", out["model_arn"]])
    assert result.exit_code == 0 and json.loads(result.output)["text"] == out["text"]
    result = CliRunner().invoke(app, ["cleanup", *args], input="y\n")
    assert result.exit_code == 2 and "--yes" in result.output
    assert server.state.models  # nothing was deleted

    aws.cleanup(cfg, yes=True)
    assert boto("s3").list_objects_v2(Bucket=bucket, Prefix="termtune/").get("KeyCount") == 0
    assert not server.state.models
    assert "tt-e2e-role" not in [r["RoleName"] for r in iam.list_roles()["Roles"]]
    aws.cleanup(cfg, yes=True)  # safe to run twice
    assert "nothing left to delete" in capfd.readouterr().err

    # No credential value in any run file or in what was printed.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for path in cfg.run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".md", ".html", ".jsonl", ".txt"):
            assert secret not in path.read_text(errors="ignore"), path
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err


def test_rerun_after_interrupted_upload_sends_only_missing_files(tmp_path, aws_env, bucket,  # noqa: F811
                                                                 artifact_template):
    from termtune import aws
    from termtune.aws import s3 as s3mod

    aws_env()
    cfg = make_cfg(tmp_path, artifact_template)
    files = s3mod.artifact_files((cfg.run_dir / "artifact"))
    # What an interrupted run leaves: some files complete, the rest never sent.
    done = [f for f in files if f.path in ("config.json", "tokenizer.json", "spiece.model")]
    prefix = prefixes(cfg)[0]
    s3mod.upload(boto("s3"), (cfg.run_dir / "artifact"), done, bucket, prefix, progress=False)
    before = versions(bucket, prefix)
    assert set(before) == {f.path for f in done}

    result = aws.deploy(cfg)
    after = versions(bucket, prefix)
    assert sorted(result.skipped) == sorted(f.path for f in done)
    model_files = {f.path for f in files} - set(s3mod.TERMTUNE_FILES)
    assert {k for k, n in after.items() if n > before.get(k, 0)} == model_files - {f.path for f in done}
    assert all(n == 1 for n in after.values())  # nothing was sent twice


def open_upload(key: str) -> None:
    """A multipart upload left open, as a deploy killed mid-file leaves it."""
    s3c = boto("s3")
    upload = s3c.create_multipart_upload(Bucket="termtune-test", Key=key)
    s3c.upload_part(Bucket="termtune-test", Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024)


def open_uploads(prefix: str) -> list[str]:
    return [u["Key"] for u in boto("s3").list_multipart_uploads(Bucket="termtune-test", Prefix=prefix).get("Uploads", [])]


def test_deploy_and_cleanup_abort_incomplete_multipart_uploads_under_the_prefix(tmp_path, aws_env, bucket,  # noqa: F811
                                                                               artifact_template, capfd):
    from termtune import aws

    aws_env()
    cfg = make_cfg(tmp_path, artifact_template)
    prefix, meta_prefix = prefixes(cfg)
    open_upload(f"{prefix}model.safetensors")
    open_upload(f"{meta_prefix}manifest.json")
    open_upload("termtune/other-run/model.safetensors")  # not this run's: left alone
    aws.deploy(cfg)
    assert open_uploads("termtune/") == ["termtune/other-run/model.safetensors"]
    assert "aborted the incomplete multipart uploads" in capfd.readouterr().err

    open_upload(f"{prefix}model.safetensors")
    aws.cleanup(cfg, yes=True)
    assert open_uploads("termtune/") == ["termtune/other-run/model.safetensors"]
    assert f"aborted 1 incomplete multipart uploads under s3://termtune-test/{prefix}" in capfd.readouterr().err


def test_changed_file_is_resent_and_stray_files_block_the_import(tmp_path, aws_env, bucket,  # noqa: F811
                                                                 artifact_template):
    from termtune import aws
    from termtune.aws import s3 as s3mod

    aws_env()
    cfg = make_cfg(tmp_path, artifact_template)
    s3c = boto("s3")
    prefix = prefixes(cfg)[0]
    s3c.put_object(Bucket=bucket, Key=f"{prefix}config.json", Body=b"{}", Metadata={"sha256": "0" * 64})
    s3c.put_object(Bucket=bucket, Key=f"{prefix}old-shard.safetensors", Body=b"x")
    with pytest.raises(UserError, match="old-shard.safetensors"):
        aws.deploy(cfg)
    assert versions(bucket, prefix)["config.json"] == 2  # the stale copy was replaced
    record = json.loads((cfg.run_dir / "deploy.json").read_text())
    assert "status" not in record and "job_name" not in record  # refused before any import job
    assert "config.json" in record["uploads"][f"s3://{bucket}/{prefix}"]  # what it sent, for cleanup
    s3c.delete_object(Bucket=bucket, Key=f"{prefix}old-shard.safetensors")
    assert aws.deploy(cfg).model_arn
    assert s3mod.remote_sha256(s3c, bucket, f"{prefix}config.json") == next(
        f.sha256 for f in s3mod.artifact_files((cfg.run_dir / "artifact")) if f.path == "config.json")


def test_refuses_an_artifact_that_fails_validation(tmp_path, aws_env, bucket, artifact_template):  # noqa: F811
    from termtune import aws

    aws_env()
    cfg = make_cfg(tmp_path, artifact_template)
    ((cfg.run_dir / "artifact") / "spiece.model").unlink()
    with pytest.raises(UserError, match="preflight"):
        aws.deploy(cfg)
    assert boto("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0


@pytest.mark.parametrize("key,value,match", [
    ("aws.model_name", "flan.t5", "aws.model_name"), ("aws.job_name", "job_1", "aws.job_name"),
    ("aws.prefix", "models/flan t5", "aws.prefix:"), ("aws.bucket", "Termtune-Test", "aws.bucket:"),
    ("aws.model_kms_key_id", "alias/a b", "aws.model_kms_key_id:"), ("aws.region", "eu-west-1", "eu-central-1"),
    ("aws.role_arn", "arn:aws:iam::12:role/x", "aws.role_arn")])
def test_invalid_names_fail_before_any_call(tmp_path, aws_env, bucket, artifact_template, key, value, match):  # noqa: F811
    from termtune import aws

    server = aws_env()
    cfg = make_cfg(tmp_path, artifact_template, **{key: value})
    with pytest.raises(UserError, match=match):
        aws.deploy(cfg)
    assert server.state.calls == 0
    assert boto("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_quota_and_running_job_are_checked_first(tmp_path, aws_env, bucket, artifact_template):  # noqa: F811
    from termtune import aws

    server = aws_env(model_quota=1)
    aws.deploy(make_cfg(tmp_path, artifact_template, name="first"))
    with pytest.raises(UserError, match="quota is 1"):  # termtune's own check (aws.model_quota)
        aws.deploy(make_cfg(tmp_path, artifact_template, name="second", **{"aws.model_quota": 1}))
    with pytest.raises(UserError, match="ServiceQuotaExceeded|service quota"):  # the service's answer
        aws.deploy(make_cfg(tmp_path, artifact_template, name="third"))
    assert len(server.state.jobs) == 1

    server.state.model_quota = 5
    server.state.import_delay_seconds = 30
    boto("bedrock").create_model_import_job(
        jobName="someone-else", importedModelName="other", roleArn=ROLE,
        modelDataSource={"s3DataSource": {"s3Uri": "s3://termtune-test/termtune/first/"}})
    with pytest.raises(UserError, match="someone-else is still InProgress"):
        aws.deploy(make_cfg(tmp_path, artifact_template, name="fourth"))


def test_failed_job_prints_failure_message_and_exits_nonzero(tmp_path, aws_env, bucket, artifact_template):  # noqa: F811
    from termtune import aws
    from termtune.aws import s3 as s3mod

    aws_env()
    cfg = make_cfg(tmp_path, artifact_template)
    files = [f for f in s3mod.artifact_files((cfg.run_dir / "artifact")) if f.path not in s3mod.TERMTUNE_FILES]
    prefix = prefixes(cfg)[0]
    s3mod.upload(boto("s3"), (cfg.run_dir / "artifact"), files, bucket, prefix, progress=False)
    # Corrupt config.json in S3 but keep its size and recorded hash: only the import can notice.
    entry = next(f for f in files if f.path == "config.json")
    boto("s3").put_object(Bucket=bucket, Key=f"{prefix}config.json", Body=b"#" * entry.size,
                          Metadata={"sha256": entry.sha256})
    with pytest.raises(UserError) as failed:
        aws.deploy(cfg)
    assert "failed: The model artifact is not valid" in str(failed.value) and "config.json" in str(failed.value)
    record = json.loads((cfg.run_dir / "deploy.json").read_text())
    assert record["status"] == "Failed" and "config.json" in record["failure_message"]


def test_role_propagation_is_retried_only_for_a_role_termtune_created(tmp_path, aws_env, bucket,  # noqa: F811
                                                                     artifact_template):
    from termtune import aws

    server = aws_env(role_delay_seconds=2.0)
    new_role = {"aws.role_arn": "null", "aws.role_name": "tt-propagating"}
    cfg = make_cfg(tmp_path, artifact_template, **new_role, **{"aws.role_retry_minutes": 0})
    with pytest.raises(UserError, match="role ARN is invalid"):
        aws.deploy(cfg)
    boto("iam").delete_role_policy(RoleName="tt-propagating", PolicyName=policy_of(cfg))
    boto("iam").delete_role(RoleName="tt-propagating")
    server.state.roles_seen.clear()
    cfg = make_cfg(tmp_path, artifact_template, name="again", **new_role, **{"aws.role_retry_minutes": 0.5})
    assert aws.deploy(cfg).model_arn
    messages = json.loads((cfg.run_dir / "deploy.json").read_text())["role_retry_messages"]
    assert messages and all(m == "ValidationException: The provided role ARN is invalid." for m in messages)

    # A role termtune did not create in this deploy is never retried: its error is final.
    server.state.roles_seen.clear()
    cfg = make_cfg(tmp_path, artifact_template, name="given", **{"aws.role_retry_minutes": 0.5})
    calls = server.state.calls
    with pytest.raises(UserError, match="role ARN is invalid"):
        aws.deploy(cfg)
    assert server.state.counts["ValidationException"] >= 2 and server.state.calls - calls <= 4  # no retry loop


def make_role(name: str, permissions: dict | None, trust: dict | None = None) -> str:
    from termtune.aws import iam as iammod

    client = boto("iam")
    arn = client.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(
        trust or iammod.trust_policy("123456789012", "us-east-1")))["Role"]["Arn"]
    if permissions:
        client.put_role_policy(RoleName=name, PolicyName="p", PolicyDocument=json.dumps(permissions))
    return arn


@pytest.mark.parametrize("case", ["no S3 statement", "prefix outside the grant", "trust without Bedrock"])
def test_the_import_role_is_enforced(tmp_path, aws_env, bucket, artifact_template, case):  # noqa: F811
    """moto evaluates the role's permission policy on every S3 call the import job makes with
    the role's temporary credentials; serve evaluates the trust policy (moto cannot)."""
    from termtune import aws
    from termtune.aws import iam as iammod

    aws_env()
    name = "tt-" + case.replace(" ", "-").lower()
    cfg = make_cfg(tmp_path, artifact_template)
    prefix = prefixes(cfg)[0]
    grant = iammod.permissions_policy(bucket, prefix, "123456789012")
    if case == "no S3 statement":
        arn = make_role(name, {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "kms:DescribeKey", "Resource": "*"}]})
    elif case == "prefix outside the grant":
        arn = make_role(name, iammod.permissions_policy(bucket, "elsewhere/", "123456789012"))
    else:
        other = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                          "Principal": {"Service": "sagemaker.amazonaws.com"}}]}
        arn = make_role(name, grant, trust=other)
    cfg.aws.role_arn = arn
    with pytest.raises(UserError) as e:
        aws.deploy(cfg)
    message = json.loads((cfg.run_dir / "deploy.json").read_text())["failure_message"]
    assert str(e.value).endswith(message)
    if case == "trust without Bedrock":
        assert "can't assume the role" in message
    else:
        assert "AccessDenied" in message and prefix in message


def test_generated_policies_pass_the_iam_linter_and_scope_the_trust():
    """moto does not evaluate condition keys or trust policies the way IAM does, so the
    policies termtune generates are linted with parliament (zero findings) and their
    confused-deputy conditions are asserted here."""
    import parliament

    from termtune.aws import iam as iammod, trust

    key = "arn:aws:kms:us-east-1:123456789012:key/0b8c4a3e-1f2d-4e5a-9b6c-7d8e9f0a1b2c"
    permissions = iammod.permissions_policy("termtune-test", "termtune/run/", "123456789012", key)
    trust_doc = iammod.trust_policy("123456789012", "us-east-1")
    # parliament lints identity policies, which need a Resource; a trust policy's resource is the
    # role itself, so it is linted with that role as its Resource (action, principal, condition keys).
    role = "arn:aws:iam::123456789012:role/termtune-bedrock-import"
    as_linted = {**trust_doc, "Statement": [{**st, "Resource": role} for st in trust_doc["Statement"]]}
    for doc in (permissions, as_linted):
        policy = parliament.analyze_policy_string(json.dumps(doc), ignore_private_auditors=True)
        assert policy.findings == [], [str(f) for f in policy.findings]
    [statement] = trust_doc["Statement"]
    assert statement["Principal"] == {"Service": "bedrock.amazonaws.com"} and statement["Action"] == "sts:AssumeRole"
    assert statement["Condition"]["StringEquals"] == {"aws:SourceAccount": "123456789012"}
    assert statement["Condition"]["ArnEquals"] == {
        "aws:SourceArn": "arn:aws:bedrock:us-east-1:123456789012:model-import-job/*"}
    job = "arn:aws:bedrock:us-east-1:123456789012:model-import-job/abcdefghijkl"
    ok = {"aws:SourceAccount": "123456789012", "aws:SourceArn": job}
    assert trust.allows_service(trust_doc, "bedrock.amazonaws.com", "sts:AssumeRole", ok)
    assert not trust.allows_service(trust_doc, "bedrock.amazonaws.com", "sts:AssumeRole",
                                    {**ok, "aws:SourceAccount": "210987654321"})
    assert not trust.allows_service(trust_doc, "bedrock.amazonaws.com", "sts:AssumeRole",
                                    {**ok, "aws:SourceArn": job.replace("model-import-job", "evaluation-job")})
    assert not trust.allows_service(trust_doc, "sagemaker.amazonaws.com", "sts:AssumeRole", ok)
    assert [s["Resource"] for s in permissions["Statement"] if s["Sid"] == "DecryptArtifact"] == [[key]]


def test_kms_keys_resolve_to_arns_and_the_model_key_is_separate(tmp_path, aws_env, bucket,  # noqa: F811
                                                                 artifact_template):
    from termtune import aws

    aws_env()
    kms = boto("kms")
    s3_key = kms.create_key(Description="termtune test S3 key")["KeyMetadata"]
    kms.create_alias(AliasName="alias/tt-s3", TargetKeyId=s3_key["KeyId"])
    model_key = kms.create_key(Description="termtune test model key")["KeyMetadata"]
    cfg = make_cfg(tmp_path, artifact_template, **{
        "aws.role_arn": "null", "aws.role_name": "tt-kms", "aws.sse": "aws:kms", "aws.kms_key_id": "alias/tt-s3",
        "aws.model_kms_key_id": model_key["KeyId"]})
    result = aws.deploy(cfg)
    policy = boto("iam").get_role_policy(RoleName="tt-kms", PolicyName=policy_of(cfg))["PolicyDocument"]
    [decrypt] = [s for s in policy["Statement"] if s["Sid"] == "DecryptArtifact"]
    assert decrypt["Resource"] == [s3_key["Arn"]]  # the key ARN, never the alias
    assert result.facts["modelKmsKeyArn"] == model_key["Arn"]  # importedModelKmsKeyId, echoed back as an ARN
    job = boto("bedrock").get_model_import_job(jobIdentifier=result.job_arn)
    assert job["importedModelKmsKeyArn"] == model_key["Arn"]
    head = boto("s3").head_object(Bucket=bucket, Key=f"{prefixes(cfg)[0]}config.json")
    assert head["ServerSideEncryption"] == "aws:kms"

    cfg = make_cfg(tmp_path, artifact_template, name="nokey", **{
        "aws.role_arn": "null", "aws.role_name": "tt-kms-2", "aws.sse": "aws:kms", "aws.kms_key_id": "alias/none"})
    with pytest.raises(UserError, match="aws.kms_key_id: cannot resolve 'alias/none' to a key ARN"):
        aws.deploy(cfg)
    assert "tt-kms-2" not in [r["RoleName"] for r in boto("iam").list_roles()["Roles"]]


def test_a_model_name_with_underscores_gets_a_valid_job_name(tmp_path, aws_env, bucket, artifact_template):  # noqa: F811
    from termtune import aws

    aws_env()
    result = aws.deploy(make_cfg(tmp_path, artifact_template, **{"aws.model_name": "flan_t5_med"}))
    assert result.job_name.startswith("flan-t5-med-") and result.model_name == "flan_t5_med"


def test_cleanup_waits_for_a_running_job_or_refuses(tmp_path, aws_env, bucket, artifact_template, capfd):  # noqa: F811
    from termtune import aws

    server = aws_env(import_delay_seconds=3.0)
    cfg = make_cfg(tmp_path, artifact_template, **{"aws.role_arn": "null", "aws.role_name": "tt-cleanup",
                                                   "aws.import_timeout_minutes": 0.005})
    with pytest.raises(UserError, match="still InProgress"):
        aws.deploy(cfg)  # gives up waiting; the job runs on
    assert json.loads((cfg.run_dir / "deploy.json").read_text())["status"] == "InProgress"
    with pytest.raises(UserError, match="nothing was deleted"):
        aws.cleanup(cfg, yes=True)
    assert boto("s3").list_objects_v2(Bucket=bucket, Prefix=prefixes(cfg)[0])["KeyCount"] > 0
    assert "tt-cleanup" in [r["RoleName"] for r in boto("iam").list_roles()["Roles"]]

    cfg.aws.import_timeout_minutes = 1
    aws.cleanup(cfg, yes=True)  # waits for the job, then deletes the model it made, the prefix, the role
    assert [j["status"] for j in server.state.jobs.values()] == ["Completed"] and not server.state.models
    assert boto("s3").list_objects_v2(Bucket=bucket, Prefix="termtune/")["KeyCount"] == 0
    assert "tt-cleanup" not in [r["RoleName"] for r in boto("iam").list_roles()["Roles"]]
    assert "waiting for it to end" in capfd.readouterr().err


def test_interrupted_create_reuses_its_token(tmp_path, aws_env, bucket, artifact_template, monkeypatch):  # noqa: F811
    from termtune import aws
    from termtune.aws import bedrock

    server = aws_env()
    real = bedrock.create_job

    def lost_response(*args, **kwargs):
        real(*args, **kwargs)
        raise ConnectionError("connection reset after the job was created")

    monkeypatch.setattr(bedrock, "create_job", lost_response)
    cfg = make_cfg(tmp_path, artifact_template)
    with pytest.raises(ConnectionError):
        aws.deploy(cfg)
    assert json.loads((cfg.run_dir / "deploy.json").read_text())["status"] == "creating"
    monkeypatch.setattr(bedrock, "create_job", real)
    result = aws.deploy(cfg)
    assert len(server.state.jobs) == 1 and result.job_arn in server.state.jobs
    assert aws.deploy(cfg).already_deployed


def test_cold_start_and_throttled_invoke_are_retried(tmp_path, aws_env, bucket, artifact_template, capfd,  # noqa: F811
                                                     monkeypatch):
    from termtune import aws

    server = aws_env(cold_start_seconds=2.0)
    cfg = make_cfg(tmp_path, artifact_template)
    aws.deploy(cfg)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # no SDK retries: termtune's own loop must cope
    out = aws.invoke_cli(cfg, term="Asthma")
    assert out["cold_start_retries"] >= 1 and out["text"] is not None
    assert "cold" in capfd.readouterr().err
    server.state.throttle_every = 2
    assert aws.invoke_cli(cfg, term="Asthma")["text"] == out["text"]
    server.state.throttle_every = 0
    server.state.ready_at = {k: 1e18 for k in server.state.ready_at}  # never ready
    cfg.aws.cold_start_budget_minutes = 0.02
    with pytest.raises(UserError, match="ModelNotReadyException"):
        aws.invoke_cli(cfg, term="Asthma")


def test_role_dry_run_prints_policies_and_creates_nothing(tmp_path, aws_env, bucket, artifact_template):  # noqa: F811
    from termtune import aws

    aws_env()
    cfg = make_cfg(tmp_path, artifact_template, **{"aws.role_arn": "null", "aws.role_name": "tt-dry",
                                                   "aws.sse": "aws:kms", "aws.kms_key_id": "alias/tt"})
    text = aws.ensure_role(cfg, dry_run=True)
    for needle in ("bedrock.amazonaws.com", "aws:SourceAccount", "aws:SourceArn", "kms:Decrypt",
                   "arn:aws:s3:::termtune-test/termtune/run-<run id>/*"):
        assert needle in text
    assert aws.deploy(cfg, dry_run=True).dry_run
    # the dry run made the run's id (nothing in AWS): both dry runs now show the prefix deploy will use
    assert f"arn:aws:s3:::termtune-test/{prefixes(cfg)[0]}*" in aws.ensure_role(cfg, dry_run=True)
    assert "tt-dry" not in [r["RoleName"] for r in boto("iam").list_roles()["Roles"]]
    assert not (cfg.run_dir / "deploy.json").exists()


def test_endpoints_come_from_an_aws_profile_too(tmp_path, aws_env, monkeypatch):  # noqa: F811
    from termtune.aws.clients import client

    server = aws_env()
    config = tmp_path / "aws-config"
    config.write_text(f"[profile offline]\nregion = us-east-1\nservices = offline-endpoints\n"
                      f"aws_access_key_id = testing\naws_secret_access_key = testing\n"
                      f"[services offline-endpoints]\nbedrock =\n  endpoint_url = {server.url}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.delenv("AWS_ENDPOINT_URL_BEDROCK")
    assert client("bedrock", "us-east-1", profile="offline").list_imported_models()["modelSummaries"] == []
    assert server.state.counts.get("ok") == 1


def test_upload_encrypts_with_aes256_or_a_kms_key(tmp_path, aws_env, bucket, artifact_template):  # noqa: F811
    from termtune.aws import s3 as s3mod

    aws_env()
    files = [f for f in s3mod.artifact_files(artifact_template) if f.path in ("config.json", "spiece.model")]
    key_id = "0b8c4a3e-1f2d-4e5a-9b6c-7d8e9f0a1b2c"
    s3c = boto("s3")
    s3mod.upload(s3c, artifact_template, files[:1], bucket, "aes/", progress=False)
    s3mod.upload(s3c, artifact_template, files[1:], bucket, "kms/", sse="aws:kms", kms_key_id=key_id, progress=False)
    assert s3c.head_object(Bucket=bucket, Key=f"aes/{files[0].path}")["ServerSideEncryption"] == "AES256"
    head = s3c.head_object(Bucket=bucket, Key=f"kms/{files[1].path}")
    assert head["ServerSideEncryption"] == "aws:kms" and key_id in head["SSEKMSKeyId"]
    assert head["Metadata"]["sha256"] == files[1].sha256


# ----------------------------------------------------------------------------- runs never share S3 objects or roles


def keys_under(prefix: str) -> list[str]:
    pages = boto("s3").get_paginator("list_objects_v2").paginate(Bucket="termtune-test", Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def role_names() -> list[str]:
    return [r["RoleName"] for r in boto("iam").list_roles()["Roles"]]


def test_two_runs_with_one_name_share_no_prefix_and_cleanup_spares_the_other(tmp_path, aws_env, bucket,  # noqa: F811
                                                                            artifact_template, capfd):
    """p1/demo and p2/demo deploy to one bucket through one role termtune creates: each gets its own
    prefixes and its own inline policy; cleaning one up (or a third that never deployed) leaves the
    other's objects, policy, role and model alone; the last cleanup deletes the role."""
    from termtune import aws

    server = aws_env()
    role = {"aws.role_arn": "null", "aws.role_name": "tt-shared"}
    p1, p2, p3 = (make_cfg(tmp_path, artifact_template, name=f"{p}/demo", **role) for p in ("p1", "p2", "p3"))
    first, second = aws.deploy(p1), aws.deploy(p2)
    assert first.s3_uri != second.s3_uri and first.model_name != second.model_name
    assert (p1.run_dir / "deploy-id").read_text() != (p2.run_dir / "deploy-id").read_text()
    theirs = keys_under(prefixes(p2)[0]) + keys_under(prefixes(p2)[1])
    assert keys_under(prefixes(p2)[0]) and keys_under(prefixes(p2)[1])
    policies = boto("iam").list_role_policies(RoleName="tt-shared")["PolicyNames"]
    assert sorted(policies) == sorted([policy_of(p1), policy_of(p2)])
    doc = boto("iam").get_role_policy(RoleName="tt-shared", PolicyName=policy_of(p2))["PolicyDocument"]
    assert f"termtune-test/{prefixes(p2)[0]}*" in json.dumps(doc) and prefixes(p1)[0] not in json.dumps(doc)

    aws.cleanup(p3, yes=True)  # never deployed: nothing of anyone's goes
    assert "nothing recorded to delete" in capfd.readouterr().err
    aws.cleanup(p1, yes=True)
    assert keys_under(prefixes(p1)[0]) == [] and keys_under(prefixes(p1)[1]) == []
    assert keys_under(prefixes(p2)[0]) + keys_under(prefixes(p2)[1]) == theirs
    assert boto("iam").list_role_policies(RoleName="tt-shared")["PolicyNames"] == [policy_of(p2)]
    assert second.model_arn in server.state.models and first.model_arn not in server.state.models
    assert aws.invoke_cli(p2, term="Asthma")["text"] is not None

    aws.cleanup(p2, yes=True)  # the last run using the role termtune created: the role goes too
    assert "tt-shared" not in role_names() and keys_under("termtune/") == []


def test_a_role_someone_added_a_policy_to_is_kept(tmp_path, aws_env, bucket, artifact_template):  # noqa: F811
    from termtune import aws

    aws_env()
    cfg = make_cfg(tmp_path, artifact_template, **{"aws.role_arn": "null", "aws.role_name": "tt-extended"})
    aws.deploy(cfg)
    boto("iam").put_role_policy(RoleName="tt-extended", PolicyName="added-by-an-admin", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "*"}]}))
    aws.cleanup(cfg, yes=True)
    assert boto("iam").list_role_policies(RoleName="tt-extended")["PolicyNames"] == ["added-by-an-admin"]


@pytest.mark.parametrize("uri", ["s3://termtune-test/", "s3://termtune-test/precious/", "another run's prefix"])
def test_cleanup_refuses_a_recorded_uri_that_is_not_this_runs_and_deletes_nothing(  # noqa: F811
        tmp_path, aws_env, bucket, artifact_template, uri):
    from termtune import aws

    server = aws_env()
    cfg = make_cfg(tmp_path, artifact_template, **{"aws.role_arn": "null", "aws.role_name": "tt-edited"})
    result = aws.deploy(cfg)
    other = make_cfg(tmp_path, artifact_template, name="other")
    aws.deploy(other)
    boto("s3").put_object(Bucket=bucket, Key="precious/data.csv", Body=b"a user's file")
    if uri == "another run's prefix":
        uri = f"s3://termtune-test/{prefixes(other)[0]}"
    before = keys_under("")
    path = cfg.run_dir / "deploy.json"
    record = json.loads(path.read_text())
    record["s3_uri"] = uri
    record.setdefault("uploads", {})[uri] = ["precious/data.csv", "config.json"]
    path.write_text(json.dumps(record))
    with pytest.raises(UserError, match=f"refusing to clean up '{uri}'.*nothing was deleted"):
        aws.cleanup(cfg, yes=True)
    assert keys_under("") == before
    assert result.model_arn in server.state.models and "tt-edited" in role_names()


def test_a_deploy_killed_mid_upload_to_a_new_prefix_stays_cleanable(tmp_path, aws_env, bucket,  # noqa: F811
                                                                   artifact_template, monkeypatch):
    """After an import, the run is deployed again to another aws.prefix (the runner keeps the earlier
    deploy record in the history and starts afresh, as `termtune run` does) and killed mid-upload:
    the objects it sent are on record before the first byte, so cleanup removes both prefixes."""
    from termtune import aws, history
    from termtune.layout import RunLayout
    from termtune.progress import Lines

    aws_env()
    cfg = make_cfg(tmp_path, artifact_template)
    aws.deploy(cfg)
    layout = RunLayout.of(cfg)
    history.append(layout, "deploy", {"fingerprint": "before", "finished_at": "then"}, ["aws.prefix changed"])
    layout.deploy.unlink()
    cfg.aws.prefix = "models/{run_name}"
    calls, sending = [0], Lines.update

    def killed(self, n, detail=""):  # the transfer callback, after some bytes have gone
        calls[0] += 1
        if calls[0] > 3:
            raise RuntimeError("killed mid-upload")

    monkeypatch.setattr(Lines, "update", killed)
    with pytest.raises(RuntimeError, match="killed mid-upload"):
        aws.deploy(cfg)
    assert keys_under("models/")  # part of the artifact reached the new prefix
    monkeypatch.setattr(Lines, "update", sending)
    aws.cleanup(cfg, yes=True)
    assert keys_under("") == [] and not boto("s3").list_multipart_uploads(Bucket=bucket).get("Uploads")


# ----------------------------------------------------------------------------- names and keys AWS would refuse


@pytest.mark.parametrize("key,value,match", [
    ("aws.bucket", "my..bucket", "two adjacent dots"), ("aws.bucket", "192.168.5.4", "IP address"),
    ("aws.bucket", "xn--bucket", "xn--"), ("aws.bucket", "models-s3alias", "-s3alias"),
    ("aws.bucket", "models--ol-s3", "--ol-s3"), ("aws.bucket", "ab", "3 to 63"),
    ("aws.bucket", "b" * 64, "3 to 63"), ("aws.bucket", "my_bucket", "lowercase letters"),
    ("aws.role_name", "r" * 65, "1 to 64"), ("aws.role_name", "import role", "letters, digits"),
    ("aws.role_name", "rôle", "letters, digits"), ("aws.role_arn", f"arn:aws:iam::123456789012:role/{'r' * 65}", "1 to 64")])
def test_dry_run_refuses_bucket_and_role_names_aws_rejects(tmp_path, aws_env, bucket, artifact_template,  # noqa: F811
                                                           key, value, match):
    from termtune import aws

    aws_env()
    extra = {key: value, **({"aws.role_arn": "null"} if key == "aws.role_name" else {})}
    cfg = make_cfg(tmp_path, artifact_template, **extra)
    with pytest.raises(UserError, match=f"^{key}: .*{match}") as refused:
        aws.deploy(cfg, dry_run=True)
    assert len(str(refused.value).splitlines()) == 1


def test_valid_names_pass_the_name_rules():
    from termtune.aws.names import bucket_problem, role_name_problem

    for name in ("termtune-test", "my.bucket.v2", "abc", "a" * 63, "1-2-3-4"):
        assert bucket_problem(name) is None, name
    for name in ("termtune-bedrock-import", "Role_+=,.@-x", "r" * 64):
        assert role_name_problem(name) is None, name


@pytest.mark.parametrize("case", ["random id", "disabled", "pending deletion", "another region's ARN",
                                  "another region's id", "asymmetric"])
def test_the_model_key_is_resolved_and_refused_unless_bedrock_can_use_it(tmp_path, aws_env, bucket,  # noqa: F811
                                                                         artifact_template, case):
    import uuid

    import boto3

    from termtune import aws

    server = aws_env()
    kms = boto("kms")
    if case == "random id":
        key = str(uuid.uuid4())
    elif case.startswith("another region"):
        west = boto3.client("kms", region_name="us-west-2").create_key()["KeyMetadata"]
        key = west["Arn"] if case.endswith("ARN") else west["KeyId"]
    elif case == "asymmetric":
        key = kms.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    else:
        key = kms.create_key()["KeyMetadata"]["KeyId"]
        if case == "disabled":
            kms.disable_key(KeyId=key)
        else:
            kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    cfg = make_cfg(tmp_path, artifact_template, **{"aws.model_kms_key_id": key})
    with pytest.raises(UserError, match="^aws.model_kms_key_id: ") as refused:
        aws.deploy(cfg)
    assert len(str(refused.value).splitlines()) == 1
    assert keys_under("") == [] and not server.state.jobs  # refused before the upload


def test_a_model_key_in_another_account_is_used_with_a_warning(tmp_path, aws_env, bucket, artifact_template,  # noqa: F811
                                                                monkeypatch, capfd):
    """moto keeps one account's keys per server, so the caller is made to look like another account."""
    from termtune import aws
    from termtune.aws import stage

    aws_env()
    key = boto("kms").create_key()["KeyMetadata"]
    monkeypatch.setattr(stage, "caller_account", lambda cfg, required: "210987654321")
    cfg = make_cfg(tmp_path, artifact_template, **{"aws.model_kms_key_id": key["KeyId"]})
    assert aws.deploy(cfg).facts["modelKmsKeyArn"] == key["Arn"]
    assert f"{key['Arn']} belongs to account 123456789012, not yours (210987654321)" in capfd.readouterr().err
