"""termtune serve against real boto3 clients: the control plane's rules and error codes,
import jobs that really load the artifact, and InvokeModel answered by real generation."""

from __future__ import annotations

import json
import re
import shutil
import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from aws_fixtures import artifact_template, wait  # noqa: F401  (fixture)
from termtune.aws.names import JOB_ARN_RE, MODEL_ARN_RE
from termtune.serve import chunk_frame, start_server

ROLE = "arn:aws:iam::123456789012:role/termtune-bedrock-import"


def clients(url: str, attempts: int = 1):
    kw = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y",
              config=Config(retries={"mode": "standard", "total_max_attempts": attempts}))
    return boto3.client("bedrock", **kw), boto3.client("bedrock-runtime", **kw)


def code(exc_info) -> str:
    return exc_info.value.response["Error"]["Code"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, artifact_template):  # noqa: F811
    """A server reading s3:// URIs from a local folder, with the tiny artifact imported once."""
    root = tmp_path_factory.mktemp("s3root")
    shutil.copytree(artifact_template, root / "bucket-a" / "models" / "tiny")
    server, url = start_server(local_root=root, import_delay_seconds=0.0, model_quota=2, max_body_bytes=100_000)
    br, rt = clients(url)
    arn = br.create_model_import_job(jobName="tiny-1", importedModelName="tiny", roleArn=ROLE,
                                     modelDataSource={"s3DataSource": {"s3Uri": "s3://bucket-a/models/tiny/"}})["jobArn"]
    job = wait(br, arn)
    assert job["status"] == "Completed", job.get("failureMessage")
    yield server, url, root, job
    server.stop()


def local_greedy(folder, prompt: str, n: int) -> str:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    out = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=n, do_sample=False)
    return tok.decode(out[0], skip_special_tokens=True)


def test_import_job_completes_with_real_arns_and_is_listed(imported):
    server, url, _, job = imported
    br, _ = clients(url)
    assert re.fullmatch(JOB_ARN_RE, job["jobArn"]) and re.fullmatch(MODEL_ARN_RE, job["importedModelArn"])
    model = br.get_imported_model(modelIdentifier="tiny")
    assert model["modelArn"] == job["importedModelArn"] and model["modelArchitecture"] == "t5"
    assert br.get_model_import_job(jobIdentifier="tiny-1")["jobArn"] == job["jobArn"]  # by name
    summaries = br.list_model_import_jobs(statusEquals="Completed")["modelImportJobSummaries"]
    assert [s["jobName"] for s in summaries] == ["tiny-1"]
    assert [m["modelName"] for m in br.list_imported_models()["modelSummaries"]] == ["tiny"]


@pytest.mark.parametrize("field,value", [
    ("jobName", "bad_name"), ("jobName", "x" * 64), ("importedModelName", "flan.t5"),
    ("importedModelName", "flan--t5"), ("s3Uri", "s3://My-Bucket/x/"), ("s3Uri", "s3://b-1/a b/"),
    ("s3Uri", "http://bucket/x/"), ("roleArn", "arn:aws:iam::123:role/x"), ("clientRequestToken", "-bad-")])
def test_create_rejects_what_aws_rejects(imported, field, value):
    _, url, _, _ = imported
    br, _ = clients(url)
    request = {"jobName": "ok-job", "importedModelName": "ok-model", "roleArn": ROLE,
               "modelDataSource": {"s3DataSource": {"s3Uri": "s3://bucket-a/models/tiny/"}}}
    if field == "s3Uri":
        request["modelDataSource"]["s3DataSource"]["s3Uri"] = value
    else:
        request[field] = value
    with pytest.raises(ClientError) as e:
        br.create_model_import_job(**request)
    assert code(e) == "ValidationException" and field in e.value.response["Error"]["Message"]


def test_one_running_job_quota_and_idempotent_token(tmp_path, artifact_template):  # noqa: F811
    shutil.copytree(artifact_template, tmp_path / "b-1" / "m")
    server, url = start_server(local_root=tmp_path, import_delay_seconds=1.0, model_quota=1)
    try:
        br, _ = clients(url)
        req = {"roleArn": ROLE, "modelDataSource": {"s3DataSource": {"s3Uri": "s3://b-1/m/"}}}
        first = br.create_model_import_job(jobName="j1", importedModelName="m1", clientRequestToken="tok-1", **req)
        again = br.create_model_import_job(jobName="j1", importedModelName="m1", clientRequestToken="tok-1", **req)
        assert again["jobArn"] == first["jobArn"]  # same token: the same job, no error
        with pytest.raises(ClientError) as e:
            br.create_model_import_job(jobName="j2", importedModelName="m2", **req)
        assert code(e) == "ServiceQuotaExceededException"  # one import at a time
        assert wait(br, first["jobArn"])["status"] == "Completed"
        with pytest.raises(ClientError) as e:
            br.create_model_import_job(jobName="j3", importedModelName="m3", **req)
        assert code(e) == "ServiceQuotaExceededException"  # model quota 1
        br.delete_imported_model(modelIdentifier="m1")
        with pytest.raises(ClientError) as e:
            br.delete_imported_model(modelIdentifier="m1")
        assert code(e) == "ResourceNotFoundException"
        with pytest.raises(ClientError) as e:
            br.get_model_import_job(jobIdentifier="no-such-job")
        assert code(e) == "ResourceNotFoundException"
    finally:
        server.stop()


def test_failed_jobs_carry_the_reason(tmp_path, artifact_template):  # noqa: F811
    broken = tmp_path / "b-1" / "broken"
    shutil.copytree(artifact_template, broken)
    (broken / "spiece.model").unlink()
    server, url = start_server(local_root=tmp_path, import_delay_seconds=0.0)
    try:
        br, _ = clients(url)
        req = {"roleArn": ROLE}
        a = br.create_model_import_job(jobName="j1", importedModelName="m1", **req,
                                       modelDataSource={"s3DataSource": {"s3Uri": "s3://b-1/broken/"}})
        job = wait(br, a["jobArn"])
        assert job["status"] == "Failed" and "spiece.model" in job["failureMessage"]
        assert "importedModelArn" not in job
        b = br.create_model_import_job(jobName="j2", importedModelName="m2", **req,
                                       modelDataSource={"s3DataSource": {"s3Uri": "s3://b-1/empty/"}})
        job = wait(br, b["jobArn"])
        assert job["status"] == "Failed" and "s3://b-1/empty/" in job["failureMessage"]
        assert br.list_imported_models()["modelSummaries"] == []
    finally:
        server.stop()


def test_invoke_is_real_greedy_generation_in_both_schemas(imported):
    _, url, root, job = imported
    _, rt = clients(url)
    arn = job["importedModelArn"]
    expected = local_greedy(root / "bucket-a" / "models" / "tiny", "What is Hypertension?", 12)

    def call(body):
        out = rt.invoke_model(modelId=arn, body=json.dumps(body), contentType="application/json",
                              accept="application/json")
        return json.loads(out["body"].read())

    openai = call({"prompt": "What is Hypertension?", "max_tokens": 12, "temperature": 0})
    assert openai["object"] == "text_completion" and openai["choices"][0]["text"] == expected
    assert openai["usage"]["completion_tokens"] <= 12
    bedrock = call({"prompt": "What is Hypertension?", "max_gen_len": 12})
    assert bedrock["generation"] == expected and bedrock["stop_reason"] in ("stop", "length")


def test_stream_is_event_stream_botocore_parses(imported):
    _, url, _, job = imported
    _, rt = clients(url)
    for key, text_of in (("max_tokens", lambda c: c["choices"][0]["text"]), ("max_gen_len", lambda c: c["generation"])):
        body = json.dumps({"prompt": "What is Asthma?", key: 10})
        whole = json.loads(rt.invoke_model(modelId=job["importedModelArn"], body=body)["body"].read())
        resp = rt.invoke_model_with_response_stream(modelId=job["importedModelArn"], body=body)
        chunks = [json.loads(e["chunk"]["bytes"]) for e in resp["body"]]
        assert len(chunks) >= 2
        assert set(chunks[-1]) == {"amazon-bedrock-invocationMetrics"}  # metrics only, no text
        assert "".join(text_of(c) for c in chunks[:-1]) == text_of(whole)


KEY_ID = "0b8c4a3e-1f2d-4e5a-9b6c-7d8e9f0a1b2c"


@pytest.mark.parametrize("extra,field", [
    ({"importedModelKmsKeyId": "my key"}, "importedModelKmsKeyId"),
    ({"importedModelKmsKeyId": "arn:aws:kms:us-east-1:123:key/" + KEY_ID}, "importedModelKmsKeyId"),
    ({"jobTags": [{"key": "a" * 129, "value": "x"}]}, "key"),
    ({"importedModelTags": [{"key": "team", "value": "a;b"}]}, "value"),
    ({"jobTags": [{"key": f"k{i}", "value": "v"} for i in range(201)]}, "jobTags"),
    ({"vpcConfig": {"subnetIds": [f"subnet-{i}" for i in range(17)], "securityGroupIds": ["sg-1"]}},
     "vpcConfig.subnetIds"),
    ({"vpcConfig": {"subnetIds": ["subnet-1"], "securityGroupIds": [f"sg-{i}" for i in range(6)]}},
     "vpcConfig.securityGroupIds"),
    ({"vpcConfig": {"subnetIds": ["subnet_1"], "securityGroupIds": ["sg-1"]}}, "subnetIds")])
def test_create_checks_kms_tags_and_vpc_like_aws(imported, extra, field):
    _, url, _, _ = imported
    br, _ = clients(url)
    with pytest.raises(ClientError) as e:
        br.create_model_import_job(jobName="opt-job", importedModelName="opt-model", roleArn=ROLE,
                                   modelDataSource={"s3DataSource": {"s3Uri": "s3://bucket-a/models/tiny/"}}, **extra)
    assert code(e) == "ValidationException" and field in e.value.response["Error"]["Message"]


def test_kms_key_and_vpc_are_echoed_and_lists_check_their_sort_enums(tmp_path, artifact_template):  # noqa: F811
    shutil.copytree(artifact_template, tmp_path / "b-1" / "m")
    server, url = start_server(local_root=tmp_path, import_delay_seconds=0.0)
    try:
        br, _ = clients(url)
        vpc = {"subnetIds": ["subnet-0abc"], "securityGroupIds": ["sg-0abc"]}
        arn = br.create_model_import_job(
            jobName="j1", importedModelName="m1", roleArn=ROLE, importedModelKmsKeyId=KEY_ID, vpcConfig=vpc,
            jobTags=[{"key": "team", "value": "med"}], importedModelTags=[{"key": "project", "value": "termtune"}],
            modelDataSource={"s3DataSource": {"s3Uri": "s3://b-1/m/"}})["jobArn"]
        job = wait(br, arn)
        key_arn = f"arn:aws:kms:us-east-1:123456789012:key/{KEY_ID}"
        assert job["importedModelKmsKeyArn"] == key_arn and job["vpcConfig"] == vpc
        model = br.get_imported_model(modelIdentifier="m1")
        assert model["modelKmsKeyArn"] == key_arn
        assert model["customModelUnits"] == {"customModelUnitsPerModelCopy": 1, "customModelUnitsVersion": "v1.0"}
        assert br.list_imported_models(sortBy="CreationTime", sortOrder="Ascending")["modelSummaries"]
        for call, kwargs in ((br.list_imported_models, {"sortBy": "creationTime"}),
                             (br.list_model_import_jobs, {"sortOrder": "Newest"})):
            with pytest.raises(ClientError) as e:
                call(**kwargs)
            assert code(e) == "ValidationException" and "enum value set" in e.value.response["Error"]["Message"]
    finally:
        server.stop()


def test_event_frame_round_trips_through_botocore():
    from botocore.eventstream import EventStreamBuffer

    buf = EventStreamBuffer()
    buf.add_data(chunk_frame({"generation": "héllo"}) + chunk_frame({"generation": "!"}))
    messages = list(buf)
    assert [m.headers[":event-type"] for m in messages] == ["chunk", "chunk"]
    payload = json.loads(messages[0].payload)
    import base64

    assert json.loads(base64.b64decode(payload["bytes"])) == {"generation": "héllo"}


@pytest.mark.parametrize("body,content_type", [
    (b"{not json", "application/json"), (b'{"max_tokens": 5}', "application/json"),
    (b'{"prompt": "x", "max_tokens": 0}', "application/json"), (b'{"prompt": "x", "max_tokens": 5, "max_gen_len": 5}',
                                                                "application/json"),
    (b'{"prompt": "x"}', "text/plain"), (b'{"prompt": "' + b"a" * 200_000 + b'"}', "application/json")])
def test_malformed_or_oversized_bodies_are_validation_errors(imported, body, content_type):
    _, url, _, job = imported
    _, rt = clients(url)
    with pytest.raises(ClientError) as e:
        rt.invoke_model(modelId=job["importedModelArn"], body=body, contentType=content_type)
    assert code(e) == "ValidationException"


def test_unknown_models(imported):
    _, url, _, _ = imported
    _, rt = clients(url)
    with pytest.raises(ClientError) as e:
        rt.invoke_model(modelId="arn:aws:bedrock:us-east-1:123456789012:imported-model/aaaaaaaaaaaa",
                        body=b'{"prompt": "x"}')
    assert code(e) == "ResourceNotFoundException"
    with pytest.raises(ClientError) as e:
        rt.invoke_model(modelId="not-an-arn", body=b'{"prompt": "x"}')
    assert code(e) == "ValidationException"


def test_cold_start_and_throttling_faults(tmp_path, artifact_template):  # noqa: F811
    shutil.copytree(artifact_template, tmp_path / "b-1" / "m")
    server, url = start_server(local_root=tmp_path, import_delay_seconds=0.0, cold_start_seconds=30,
                               throttle_every=3)
    try:
        br, rt = clients(url)
        calls = []  # every request counts toward throttle_every, so retry past the throttled ones

        def retry(fn):
            for _ in range(3):
                try:
                    return fn()
                except ClientError as e:
                    calls.append(e.response["Error"]["Code"])
                    if calls[-1] != "ThrottlingException":
                        raise
            raise AssertionError(calls)

        arn = retry(lambda: br.create_model_import_job(
            jobName="j1", importedModelName="m1", roleArn=ROLE,
            modelDataSource={"s3DataSource": {"s3Uri": "s3://b-1/m/"}}))["jobArn"]
        while retry(lambda: br.get_model_import_job(jobIdentifier=arn))["status"] == "InProgress":
            time.sleep(0.1)
        model = retry(lambda: br.get_model_import_job(jobIdentifier=arn))["importedModelArn"]
        with pytest.raises(ClientError) as e:
            retry(lambda: rt.invoke_model(modelId=model, body=b'{"prompt": "x", "max_tokens": 2}'))
        assert code(e) == "ModelNotReadyException" and e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
        assert "ThrottlingException" in calls and server.state.counts["ThrottlingException"] >= 1
    finally:
        server.stop()
