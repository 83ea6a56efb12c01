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

from aws_fixtures import artifact_template, aws_env, boto, bucket, moto_server, wait  # noqa: F401  (fixtures)
from termtune.aws.names import JOB_ARN_RE, MODEL_ARN_RE
from termtune.errors import UserError
from termtune.aws.clients import RUNTIME_HEADER, STAND_IN_HEADER
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
    (broken / "tokenizer.model").unlink()
    server, url = start_server(local_root=tmp_path, import_delay_seconds=0.0)
    try:
        br, _ = clients(url)
        req = {"roleArn": ROLE}
        a = br.create_model_import_job(jobName="j1", importedModelName="m1", **req,
                                       modelDataSource={"s3DataSource": {"s3Uri": "s3://b-1/broken/"}})
        job = wait(br, a["jobArn"])
        assert job["status"] == "Failed" and "tokenizer.model is missing" in job["failureMessage"]
        assert "importedModelArn" not in job
        b = br.create_model_import_job(jobName="j2", importedModelName="m2", **req,
                                       modelDataSource={"s3DataSource": {"s3Uri": "s3://b-1/empty/"}})
        job = wait(br, b["jobArn"])
        assert job["status"] == "Failed" and "s3://b-1/empty/" in job["failureMessage"]
        assert br.list_imported_models()["modelSummaries"] == []
    finally:
        server.stop()


def _bin_only(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def _edit_config(**values):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(values)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _sharded_with_a_shard_missing(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "shared.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}))


@pytest.mark.parametrize("break_it,reason", [
    (None, None),
    (_bin_only, "pytorch_model.bin: weights must be .safetensors files"),
    (_edit_config(architectures=["T5EncoderModel"]), "'T5EncoderModel'] is not a supported architecture"),
    (_edit_config(model_type="mt5"), "model_type 'mt5' does not match T5ForConditionalGeneration"),
    (_edit_config(quantization_config={"load_in_4bit": True}), "quantized weights are not importable"),
    (_edit_config(n_positions=200_000), "n_positions 200000 is over the 128K context limit"),
    (_sharded_with_a_shard_missing, "names model-00002-of-00002.safetensors, which is missing"),
    (_edit_config(architectures=["MllamaForConditionalGeneration"], model_type="mllama"),
     "runs only T5ForConditionalGeneration, LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, "
     "Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, GPTBigCodeForCausalLM models; Amazon Bedrock would "
     "import this MllamaForConditionalGeneration."),
    (_edit_config(architectures=["GptOssForCausalLM"], model_type="gpt_oss"),
     "Amazon Bedrock would import this GptOssForCausalLM (transformers 4.51.3, which the stand-in runs models with, "
     "has no GPT-OSS)"),
    (_edit_config(architectures=["GemmaForCausalLM"], model_type="gemma"),
     "'GemmaForCausalLM'] is not a supported architecture"),
    (_edit_config(architectures=["Phi3ForCausalLM"], model_type="phi3"), "'Phi3ForCausalLM'] is not a supported "
                                                                         "architecture"),
], ids=["accepted", "bin only", "embedding architecture", "model_type", "quantized", "context", "shard missing",
        "mllama: Bedrock's, not the stand-in's", "gpt-oss: not in Bedrock's transformers", "gemma", "phi"])
def test_import_decides_by_bedrocks_documented_rules_not_by_termtune_validate(tmp_path, artifact_template,  # noqa: F811
                                                                              monkeypatch, break_it, reason):
    """The stand-in's import has its own rule table (termtune.serve_rules, from AWS's documentation): with
    termtune's validate unusable, a good folder still imports and each broken one fails for AWS's reason."""
    import importlib

    def no_validate(*args, **kwargs):
        raise AssertionError("termtune serve's import must not run termtune validate")

    monkeypatch.setattr(importlib.import_module("termtune.validate"), "validate", no_validate)
    folder = tmp_path / "b-1" / "m"
    shutil.copytree(artifact_template, folder)
    if break_it:
        break_it(folder)
    server, url = start_server(local_root=tmp_path, import_delay_seconds=0.0)
    try:
        br, _ = clients(url)
        job = wait(br, br.create_model_import_job(jobName="j1", importedModelName="m1", roleArn=ROLE, modelDataSource={
            "s3DataSource": {"s3Uri": "s3://b-1/m/"}})["jobArn"])
    finally:
        server.stop()
    if reason is None:
        assert job["status"] == "Completed", job.get("failureMessage")
    else:
        assert job["status"] == "Failed" and reason in job["failureMessage"], job.get("failureMessage")


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
    (b'{"prompt": "x"}', "text/plain"), (b'{"prompt": "' + b"a" * 200_000 + b'"}', "application/json"),
    (b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b'}', "application/json"),  # over Python's 4300 digits
    (b'{"prompt": "x", "max_tokens": 3, "temperature": 1e-300}', "application/json"),  # logits / t overflow
    (b'{"prompt": "x\\ud800", "max_tokens": 3}', "application/json")])  # a lone surrogate
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


# ----------------------------------------------------------------------------- no looser than IAM

JOB = "arn:aws:bedrock:us-east-1:123456789012:model-import-job/abcdefghijkl"
CONTEXT = {"aws:SourceAccount": "123456789012", "aws:SourceArn": JOB}


def trust_with_deny(condition: dict) -> dict:
    from termtune.aws import iam

    policy = iam.trust_policy("123456789012", "us-east-1")
    policy["Statement"].append({"Effect": "Deny", "Principal": {"Service": "bedrock.amazonaws.com"},
                                "Action": "sts:AssumeRole", "Condition": condition})
    return policy


@pytest.mark.parametrize("condition", [
    {"StringEqualsFancy": {"aws:SourceAccount": "123456789012"}},  # an operator serve does not know: the Deny holds
    {"StringEquals": {"AWS:SOURCEARN": JOB}},  # condition keys are case-insensitive in IAM
    {"StringNotEquals": {"aws:SourceAccount": "210987654321"}},
    {"Null": {"aws:PrincipalOrgID": "true"}},
    {"ArnLikeIfExists": {"aws:SourceArn": "arn:aws:bedrock:*"}},
], ids=["unknown operator", "key case", "negated operator", "Null", "IfExists"])
def test_an_explicit_deny_in_the_trust_policy_is_never_skipped(condition):
    from termtune.aws.trust import allows_service

    assert allows_service(trust_with_deny({"StringEquals": {"aws:SourceAccount": "210987654321"}}),
                          "bedrock.amazonaws.com", "sts:AssumeRole", CONTEXT)  # a Deny that does not apply
    assert not allows_service(trust_with_deny(condition), "bedrock.amazonaws.com", "sts:AssumeRole", CONTEXT)


def test_allow_conditions_fail_closed_and_match_keys_case_insensitively():
    from termtune.aws.trust import allows_service

    def allow(condition):
        return {"Statement": [{"Effect": "Allow", "Principal": {"Service": "bedrock.amazonaws.com"},
                               "Action": "sts:AssumeRole", "Condition": condition}]}

    assert allows_service(allow({"StringEquals": {"aws:sourceaccount": "123456789012"}}), "bedrock.amazonaws.com",
                          "sts:AssumeRole", CONTEXT)
    for condition in ({"StringEqualsFancy": {"aws:SourceAccount": "123456789012"}},
                      {"StringEquals": {"aws:SourceAccount": "210987654321"}},
                      {"StringEquals": {"aws:SourceOrgID": "o-1"}}):  # a key the request does not carry
        assert not allows_service(allow(condition), "bedrock.amazonaws.com", "sts:AssumeRole", CONTEXT)
    deny_all_but = {"Statement": [*allow({})["Statement"], {"Effect": "Deny", "NotPrincipal": {
        "Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
    assert not allows_service(deny_all_but, "bedrock.amazonaws.com", "sts:AssumeRole", CONTEXT)


def upload(folder, bucket_name: str, prefix: str) -> None:
    s3 = boto("s3")
    for path in folder.iterdir():
        s3.upload_file(str(path), bucket_name, prefix + path.name)


def test_a_role_arn_names_its_path(aws_env, bucket, artifact_template):  # noqa: F811
    """role/a/b/xacct is not the role xacct at path /: Bedrock cannot assume a role that does not exist."""
    from termtune.aws import iam

    aws_env()
    upload(artifact_template, bucket, "termtune/run/")
    boto("iam").create_role(RoleName="xacct", AssumeRolePolicyDocument=json.dumps(
        iam.trust_policy("123456789012", "us-east-1")))
    boto("iam").put_role_policy(RoleName="xacct", PolicyName="p", PolicyDocument=json.dumps(
        iam.permissions_policy(bucket, "termtune/run/", "123456789012")))
    br = boto("bedrock")
    source = {"s3DataSource": {"s3Uri": f"s3://{bucket}/termtune/run/"}}
    job = wait(br, br.create_model_import_job(jobName="pathed", importedModelName="pathed", modelDataSource=source,
                                              roleArn="arn:aws:iam::123456789012:role/a/b/xacct")["jobArn"])
    assert job["status"] == "Failed" and "no such role" in job["failureMessage"], job
    assert "arn:aws:iam::123456789012:role/xacct" in job["failureMessage"]
    job = wait(br, br.create_model_import_job(jobName="plain", importedModelName="plain", modelDataSource=source,
                                              roleArn="arn:aws:iam::123456789012:role/xacct")["jobArn"])
    assert job["status"] == "Completed", job.get("failureMessage")


def test_a_role_in_another_account_is_refused_like_passrole(imported):
    _, url, _, _ = imported
    br, _ = clients(url)
    with pytest.raises(ClientError) as e:
        br.create_model_import_job(jobName="xacct", importedModelName="xacct",
                                   roleArn="arn:aws:iam::210987654321:role/termtune-bedrock-import",
                                   modelDataSource={"s3DataSource": {"s3Uri": "s3://bucket-a/models/tiny/"}})
    assert code(e) == "AccessDeniedException" and e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "iam:PassRole" in e.value.response["Error"]["Message"]
    assert "xacct" not in {j["jobName"] for j in br.list_model_import_jobs()["modelImportJobSummaries"]}


def test_a_huge_number_in_a_control_plane_body_is_a_validation_error(imported):
    _, url, _, _ = imported
    import urllib.error
    import urllib.request

    body = b'{"jobName": "n", "maxResults": 1' + b"0" * 5000 + b"}"
    request = urllib.request.Request(f"{url}/model-import-jobs", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 400 and e.value.headers["x-amzn-ErrorType"] == "ValidationException"


# ----------------------------------------------------------------------------- an honest stand-in


def invoke_text(rt, arn: str, prompt: str, n: int) -> tuple[str, dict]:
    out = rt.invoke_model(modelId=arn, body=json.dumps({"prompt": prompt, "max_tokens": n, "temperature": 0}))
    return json.loads(out["body"].read())["choices"][0]["text"], out["ResponseMetadata"]["HTTPHeaders"]


def test_served_answer_is_the_trained_models_answer_under_bedrocks_transformers(tmp_path, monkeypatch):
    """A trained run, exported: what serve answers (transformers 4.51.3, in a worker process of its own)
    is the trained model's greedy answer computed here; a crashed worker answers ModelErrorException and is
    started again on the next call; deleting the model stops its worker."""
    import os
    import signal

    from test_export import MAX_NEW_TOKENS, PROMPTS, bedrock_python, make_trained_run, reference_model
    from termtune.export import export
    from termtune.modeling import load_tokenizer

    monkeypatch.setenv("TERMTUNE_BEDROCK_PYTHON", bedrock_python())
    cfg = make_trained_run(tmp_path / "run", "none", "lora.modules_to_save=[lm_head]")
    export(cfg)
    model, tokenizer = reference_model(cfg), load_tokenizer(cfg)
    trained = [tokenizer.decode(model.generate(**tokenizer(p, return_tensors="pt"), max_new_tokens=MAX_NEW_TOKENS,
                                               do_sample=False, num_beams=1)[0], skip_special_tokens=True)
               for p in PROMPTS]
    assert any(trained), "the trained model answers nothing: the comparison would prove little"
    shutil.copytree(cfg.run_dir / "artifact", tmp_path / "s3" / "b-1" / "m")
    server, url = start_server(local_root=tmp_path / "s3", import_delay_seconds=0.0, runtime="worker")
    try:
        br, rt = clients(url)
        arn = wait(br, br.create_model_import_job(jobName="m", importedModelName="m", roleArn=ROLE, modelDataSource={
            "s3DataSource": {"s3Uri": "s3://b-1/m/"}})["jobArn"])["importedModelArn"]
        runner = server.state.models_run[arn].runner
        assert runner.process is None  # started on the first invoke, not at import
        served = [invoke_text(rt, arn, p, MAX_NEW_TOKENS) for p in PROMPTS]
        assert [text for text, _ in served] == trained
        headers = served[0][1]
        assert headers[RUNTIME_HEADER].startswith("transformers 4.51.3 in a worker process per model, ")
        assert headers[STAND_IN_HEADER] == "local stand-in, not AWS: termtune serve"
        worker = runner.process
        assert worker.poll() is None and worker.pid != os.getpid()

        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(ClientError) as e:
            invoke_text(rt, arn, PROMPTS[0], MAX_NEW_TOKENS)
        assert code(e) == "ModelErrorException" and "exited" in e.value.response["Error"]["Message"]
        assert invoke_text(rt, arn, PROMPTS[0], MAX_NEW_TOKENS)[0] == trained[0]  # a new worker
        restarted = runner.process
        assert restarted.pid != worker.pid and restarted.poll() is None

        br.delete_imported_model(modelIdentifier=arn)
        assert restarted.poll() is not None and runner.process is None
    finally:
        server.stop()


def test_without_bedrocks_interpreter_serve_runs_models_in_process_and_says_so(tmp_path, monkeypatch,
                                                                               artifact_template):  # noqa: F811
    from termtune import serve_runtime

    monkeypatch.chdir(tmp_path)  # no ./.venv-bedrock here, nor beside the virtual environment
    monkeypatch.setattr(serve_runtime, "BESIDE_OUR_VENV", tmp_path / "venv" / ".venv-bedrock" / "bin" / "python")
    monkeypatch.delenv("TERMTUNE_BEDROCK_PYTHON", raising=False)
    with pytest.raises(UserError, match="no Bedrock interpreter at .venv-bedrock/bin/python"):
        serve_runtime.choose("worker")
    monkeypatch.setenv("TERMTUNE_BEDROCK_PYTHON", str(tmp_path / "no-such-python"))
    with pytest.raises(UserError, match="no-such-python"):  # named, but not there: an error, not a fallback
        serve_runtime.choose("auto")
    monkeypatch.delenv("TERMTUNE_BEDROCK_PYTHON")
    shutil.copytree(artifact_template, tmp_path / "s3" / "b-1" / "m")
    server, url = start_server(local_root=tmp_path / "s3", import_delay_seconds=0.0)
    try:
        br, rt = clients(url)
        arn = wait(br, br.create_model_import_job(jobName="m", importedModelName="m", roleArn=ROLE, modelDataSource={
            "s3DataSource": {"s3Uri": "s3://b-1/m/"}})["jobArn"])["importedModelArn"]
        text, headers = invoke_text(rt, arn, "What is Hypertension?", 12)
        assert text == local_greedy(tmp_path / "s3" / "b-1" / "m", "What is Hypertension?", 12)
        assert "in serve's own process, no Bedrock interpreter" in headers[RUNTIME_HEADER]
        assert not hasattr(server.state.models_run[arn].runner, "process")
    finally:
        server.stop()


def test_deploy_and_invoke_say_the_local_stand_in_answered(tmp_path, aws_env, bucket, artifact_template,  # noqa: F811
                                                           capfd):
    """The lines that print an ARN or a cost say when termtune serve, not AWS, stands behind them; the
    stand-in's CMU figure is labelled a placeholder. From AWS (no such header) nothing is added."""
    from test_aws import make_cfg
    from termtune import aws
    from termtune.aws import costs

    aws_env()
    cfg = make_cfg(tmp_path, artifact_template)
    result = aws.deploy(cfg)
    summary = result.summary()
    assert f"imported model: {result.model_arn} (local stand-in, not AWS: termtune serve)" in summary
    assert f"import job: {result.job_arn} (local stand-in, not AWS: termtune serve)" in summary
    assert "1 CMU per copy (v1.0) [the stand-in's placeholder figure" in summary
    assert "priced from local stand-in, not AWS: termtune serve's placeholder CMU figure" in summary
    record = json.loads((cfg.run_dir / "deploy.json").read_text())
    assert record["imported_model"]["localStandIn"] == "local stand-in, not AWS: termtune serve"
    capfd.readouterr()
    saved = aws.invoke_cli(cfg, term="Asthma")
    assert f"model arn {result.model_arn} (local stand-in, not AWS: termtune serve; transformers " in \
        capfd.readouterr().err
    assert saved["local_stand_in"].startswith("local stand-in, not AWS: termtune serve; transformers ")

    from_aws = costs.import_facts({"modelArchitecture": "t5", "customModelUnits": {
        "customModelUnitsPerModelCopy": 2, "customModelUnitsVersion": "v1.0"}, "ResponseMetadata": {"HTTPHeaders": {}}})
    assert "localStandIn" not in from_aws and "placeholder" not in costs.describe(from_aws, None)


def test_the_startup_line_says_where_models_run(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "TERMTUNE_BEDROCK_PYTHON": str(tmp_path / "no-such-python")}
    done = subprocess.run([sys.executable, "-m", "termtune.cli", "serve", "--port", "0"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 2 and "no-such-python: no such file" in done.stderr and "Traceback" not in done.stderr
    env.pop("TERMTUNE_BEDROCK_PYTHON")
    serve = subprocess.Popen([sys.executable, "-m", "termtune.cli", "serve", "--port", "0", "--runtime", "in-process"],
                             stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        first, second = serve.stderr.readline(), serve.stderr.readline()
    finally:
        serve.terminate()
        serve.wait(30)
    assert "a local stand-in for Amazon Bedrock" in first and "not AWS" in first
    assert second.strip().startswith("models run under transformers ") and "in serve's own process, as asked" in second
