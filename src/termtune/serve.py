"""termtune serve: a local endpoint that speaks Amazon Bedrock's REST protocol.

One HTTP server plays both services boto3 knows as `bedrock` (the Custom Model Import
control plane) and `bedrock-runtime` (InvokeModel), so unmodified boto3 clients work
against it once the SDK's standard endpoint settings point at it:

    termtune serve --port 8787 &
    export AWS_ENDPOINT_URL_BEDROCK=http://127.0.0.1:8787
    export AWS_ENDPOINT_URL_BEDROCK_RUNTIME=http://127.0.0.1:8787

On the same port it stands in for SageMaker's training jobs (`POST /` with `X-Amz-Target:
SageMaker.<Operation>`, AWS_ENDPOINT_URL_SAGEMAKER): termtune.serve_training, which runs a job's
command on this machine only when serve is started with --run-training-jobs.

What it does like AWS: the rest-json routes and status codes, the field patterns and
lengths (termtune.aws.names), one running import job per region, the imported-model
quota, clientRequestToken idempotency, the exact status strings InProgress / Completed /
Failed, ARNs of the real form, error codes botocore raises as the same ClientError, the three
invoke formats (Bedrock completion, OpenAI completion, OpenAI chat completion with the chat template
applied here), Converse and ConverseStream for the families AWS offers them to (a ValidationException
for the others), and the event-stream framing of InvokeModelWithResponseStream.

The import job does what Bedrock does: it refuses a role of another account (iam:PassRole
cannot pass one), evaluates the role's trust policy for the service principal
bedrock.amazonaws.com with aws:SourceAccount / aws:SourceArn (termtune.aws.trust, never more
loosely than IAM), finds the role by its whole ARN, path included, assumes it through STS, and
reads `s3://bucket/prefix/` with the temporary credentials it got back; AWS_ENDPOINT_URL_STS / _S3
decide which STS and S3 (moto's server with IAM access control on, in the tests and the demo, so
the role's permission policy is evaluated on every S3 call). With `local_root` set,
s3://bucket/prefix/ is read from <local_root>/bucket/prefix/ instead (no S3, no STS, no IAM).
It accepts the files by AWS's documented import rules (termtune.serve_rules, its own table, not
termtune validate), and InvokeModel answers with real generation by that model, run as Bedrock
runs it: under transformers 4.51.3 in a worker process per model (termtune.serve_runtime), or,
without that interpreter, in serve's own process, which its startup line and every answer's
x-termtune-runtime header say. Every answer carries x-termtune-stand-in, so termtune deploy and
invoke can say that a local stand-in, not AWS, stands behind an ARN or a cost.
importedModelKmsKeyId, tags and vpcConfig are checked against botocore's patterns and bounds;
the key (as an ARN) and vpcConfig are echoed by the Get* calls.

Choices where AWS does not document the behaviour (docs/aws.md lists them): a reused job or
model name answers ConflictException; a request with neither max_tokens nor max_gen_len gets
the OpenAI completion schema with 16 tokens; max_tokens must be 1..the model's n_positions and
the prompt at most 512 tokens for an encoder-decoder, the context up to 32,768 for a decoder (and 32 characters
a token, checked before tokenizing); a streamed chat completion is OpenAI's chat.completion.chunk;
Qwen2.5 (which shares Qwen2's architecture) is told by its tokenizer's added tokens; one generation
per model at a time, each within a time budget, and a caller kept waiting too long for the
model is throttled; streaming sends one chunk per generated token, each in the request's
schema, then one chunk with only amazon-bedrock-invocationMetrics; a role Bedrock cannot assume or read
with makes the job Failed (not the create call); GetImportedModel reports 1 CMU of v1.0 for
every model (a stand-in: Bedrock sizes CMUs from the model); a model that fails to load or whose
worker crashed answers ModelErrorException (424, as botocore's service model has it), and one
that overruns its time budget ModelTimeoutException (408).

What it does not do: authenticate its own callers (SigV4 signatures are ignored, any
credentials work), persistence (state lives in memory), or Bedrock's own model hosting. It
binds 127.0.0.1 unless told otherwise, and holds up under bad local clients (a web page, a
stalled socket): requests must name the bound address in Host, control-plane writes must be
JSON, malformed shapes are 400s, a request must arrive whole within a deadline, and the
workers and listen backlog are bounded (docs/aws.md, "serve under bad clients"). Faults for
rehearsal: a cold start (ModelNotReadyException for N seconds after each import), throttling of
every Nth call, and IAM propagation (a role ARN is "invalid" for N seconds after it is first seen).
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from termtune import serve_rules, serve_runtime, serve_training
from termtune.aws.clients import RUNTIME_HEADER, STAND_IN_HEADER
from termtune.aws.names import (KMS_KEY_ARN_RE, MAX_SECURITY_GROUPS, MAX_SUBNETS, MAX_TAGS, MODEL_ARN_RE, ROLE_ARN_RE,
                                SORT_BY, SORT_ORDER, field_problem)
from termtune.errors import UserError
from termtune.events import emit
from termtune.safepath import UnsafeName, inside

MAX_BODY_BYTES = 25_000_000  # InvokeModel's documented body limit
MAX_INPUT_TOKENS = 512  # the default base model's training input length
MAX_PROMPT_CHARS = 32 * MAX_INPUT_TOKENS  # checked before tokenizing: no 512-token prompt is longer in practice
MAX_DECODER_INPUT_TOKENS = 32768  # a decoder's prompt: its context, up to this (serve runs models on the CPU)
MAX_NEW_TOKENS = 4096  # the most max_tokens may ask of a model that states no limit (n_positions)
MIN_TEMPERATURE = 1e-5  # below it, logits / temperature overflow float32 (vLLM treats the same bound as greedy)
GENERATION_SECONDS = 60.0  # one generation's time budget (transformers' max_time): it stops there, "length"
ANSWER_SLACK_SECONDS = 30.0  # past the generation budget, how long serve waits for a worker's answer
QUEUE_SECONDS = 10.0  # how long an invoke waits for its model, busy with another, before ThrottlingException
WORKERS = 32  # connections served at once (one thread each); more wait in the listen backlog
BACKLOG = 128  # the listen backlog (socketserver's default is 5)
REQUEST_SECONDS = 20.0  # a request must arrive whole (headers and body) within this, or its connection closes
DEFAULT_ACCOUNT = "123456789012"  # moto's default account, and serve's without STS
STAND_IN = "local stand-in, not AWS: termtune serve"  # every answer's STAND_IN_HEADER
STATUSES = ("InProgress", "Completed", "Failed")
NOT_READY = ("Model is not ready for inference. Wait and try your request again. Refer to "
             "https://docs.aws.amazon.com/bedrock/latest/userguide/invoke-imported-model.html")


# An AWS-shaped error: rest-json clients (Bedrock) read its code from x-amzn-ErrorType, awsJson clients
# (SageMaker) from the body's __type; every error answer carries both.
ApiError = serve_training.ServiceError


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _new_id() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(12))


# ----------------------------------------------------------------------------- state


class Bedrock:
    """Everything the fake service knows: jobs, imported models, loaded weights, faults."""

    def __init__(self, region: str = "us-east-1", cold_start_seconds: float = 0.0, throttle_every: int = 0,
                 import_delay_seconds: float = 1.0, model_quota: int = 3, role_delay_seconds: float = 0.0,
                 max_body_bytes: int = MAX_BODY_BYTES, local_root: str | Path | None = None,
                 generation_seconds: float = GENERATION_SECONDS, queue_seconds: float = QUEUE_SECONDS,
                 account: str | None = None, runtime: str = "auto", run_training_jobs: bool = False,
                 training_time_scale: float = 1.0, spot_interrupt_after_seconds: float = 0.0,
                 training_capacity_error: bool = False, quiet: bool = True):
        self.region = region
        self.runtime = serve_runtime.choose(runtime)
        self.account = account
        self.cold_start_seconds = cold_start_seconds
        self.throttle_every = throttle_every
        self.import_delay_seconds = import_delay_seconds
        self.model_quota = model_quota
        self.role_delay_seconds = role_delay_seconds
        self.max_body_bytes = max_body_bytes
        self.local_root = Path(local_root) if local_root else None
        self.generation_seconds = generation_seconds
        self.queue_seconds = queue_seconds
        self.lock = threading.Lock()
        self.jobs: dict[str, dict] = {}  # job ARN -> GetModelImportJob response
        self.models: dict[str, dict] = {}  # model ARN -> GetImportedModel response
        self.tokens: dict[str, str] = {}  # clientRequestToken -> job ARN
        self.models_run: dict[str, Served] = {}  # model ARN -> how it runs
        self.ready_at: dict[str, float] = {}  # model ARN -> end of its cold start
        self.roles_seen: dict[str, float] = {}
        self.tags: dict[str, list] = {}  # job ARN -> jobTags (kept, as AWS does; no Get* echoes tags)
        self.model_tags: dict[str, list] = {}  # job ARN -> importedModelTags
        self.calls = 0
        self.counts: dict[str, int] = {}  # error code or "ok" -> how many answers (for tests and logs)
        self.workdir = Path(tempfile.mkdtemp(prefix="termtune-serve-"))
        # SageMaker training jobs (termtune.serve_training); they run only with run_training_jobs
        self.training = serve_training.Training(region, self.own_account, self.workdir, run_jobs=run_training_jobs,
                                                time_scale=training_time_scale,
                                                interrupt_after_seconds=spot_interrupt_after_seconds,
                                                capacity_error=training_capacity_error, quiet=quiet)

    def close(self) -> None:
        self.training.close()
        with self.lock:
            served, self.models_run = list(self.models_run.values()), {}
        for model in served:
            model.runner.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1

    def throttle(self) -> None:
        with self.lock:
            self.calls += 1
            hit = self.throttle_every > 0 and self.calls % self.throttle_every == 0
        if hit:
            raise ApiError("ThrottlingException", "Too many requests, please wait before trying again.", 429)

    # --------------------------------------------------------------- control plane

    def create_job(self, body: dict) -> tuple[int, dict]:
        s3_uri = _member(body, "modelDataSource", "s3DataSource", "s3Uri")
        for field, value in (("jobName", body.get("jobName")), ("importedModelName", body.get("importedModelName")),
                             ("roleArn", body.get("roleArn")), ("s3Uri", s3_uri)):
            if value is None:
                raise ApiError("ValidationException", f"1 validation error detected: Value null at '{field}' "
                                                      "failed to satisfy constraint: Member must not be null")
            _check(field, value)
        token = body.get("clientRequestToken")
        if token is not None:
            _check("clientRequestToken", token)
        for tags in ("jobTags", "importedModelTags"):
            _check_tags(tags, body.get(tags))
        vpc = _check_vpc(body.get("vpcConfig"))
        account = self.own_account()
        if _account(body["roleArn"], account) != account:  # iam:PassRole never passes another account's role
            raise ApiError("AccessDeniedException", f"You are not authorized to perform iam:PassRole on "
                                                    f"{body['roleArn']}: it is a role in account "
                                                    f"{_account(body['roleArn'], account)}, and Amazon Bedrock in "
                                                    f"account {account} can only be passed a role of its own.", 403)
        key_arn = self._kms_key_arn(body.get("importedModelKmsKeyId"), account)
        with self.lock:
            if token in self.tokens:  # "ignores the request, but does not return an error"
                return 201, {"jobArn": self.tokens[token]}
            self._role_ready(body["roleArn"])
            if any(j["jobName"] == body["jobName"] for j in self.jobs.values()):
                raise ApiError("ConflictException", f"A job with the name {body['jobName']} already exists.")
            name = body["importedModelName"]
            if any(m["modelName"] == name for m in self.models.values()) or any(
                    j["importedModelName"] == name and j["status"] == "InProgress" for j in self.jobs.values()):
                raise ApiError("ConflictException", f"A model with the name {name} already exists.")
            if any(j["status"] == "InProgress" for j in self.jobs.values()):
                raise ApiError("ServiceQuotaExceededException",
                               "The number of concurrent model import jobs exceeds the service quota (1).")
            if len(self.models) >= self.model_quota:
                raise ApiError("ServiceQuotaExceededException",
                               f"The number of imported models exceeds the service quota ({self.model_quota}).")
            arn = f"arn:aws:bedrock:{self.region}:{account}:model-import-job/{_new_id()}"
            now = _now()
            job = {"jobArn": arn, "jobName": body["jobName"], "importedModelName": name,
                   "roleArn": body["roleArn"], "modelDataSource": {"s3DataSource": {"s3Uri": s3_uri}},
                   "status": "InProgress", "creationTime": now, "lastModifiedTime": now}
            if vpc:
                job["vpcConfig"] = vpc
            if key_arn:
                job["importedModelKmsKeyArn"] = key_arn
            self.tags[arn] = body.get("jobTags") or []
            self.model_tags[arn] = body.get("importedModelTags") or []
            self.jobs[arn] = job
            if token:
                self.tokens[token] = arn
        threading.Thread(target=self._run_import, args=(arn,), daemon=True).start()
        return 201, {"jobArn": arn}

    def own_account(self) -> str:
        """The account this Bedrock belongs to: that of the credentials serve runs with (through STS),
        or moto's default account when it has none to ask (local_root, or STS unreachable)."""
        if self.account is None:
            account = DEFAULT_ACCOUNT
            if not self.local_root:
                from termtune.aws.clients import client

                try:
                    account = client("sts", self.region).get_caller_identity()["Account"]
                except Exception:  # no STS here: the stand-in still has an account of its own
                    pass
            self.account = account
        return self.account

    def _kms_key_arn(self, key_id: Any, account: str) -> str | None:
        """importedModelKmsKeyId (key id, alias or ARN) as the key ARN Get* calls report."""
        import re

        if key_id is None:
            return None
        _check("importedModelKmsKeyId", key_id)
        if re.fullmatch(KMS_KEY_ARN_RE, key_id):
            return key_id
        if re.fullmatch(r"[a-zA-Z0-9-]{36}", key_id):
            return f"arn:aws:kms:{self.region}:{account}:key/{key_id}"
        if self.local_root:  # serve's own choice: no KMS to ask when S3 is a local folder
            raise ApiError("ValidationException", f"termtune serve cannot resolve the alias {key_id} without KMS "
                                                  "(local_root is set); pass the key ARN or key id")
        from termtune.aws.clients import client, error_code

        try:
            return client("kms", self.region).describe_key(KeyId=key_id)["KeyMetadata"]["Arn"]
        except Exception as e:
            if error_code(e) is None:
                raise
            raise ApiError("ValidationException", f"The KMS key {key_id} cannot be used: {error_code(e)}.") from e

    def _role_ready(self, role_arn: str) -> None:
        """IAM propagation: a role first seen less than role_delay_seconds ago is 'invalid'."""
        first = self.roles_seen.setdefault(role_arn, time.monotonic())
        if time.monotonic() - first < self.role_delay_seconds:
            raise ApiError("ValidationException", "The provided role ARN is invalid.")

    def _run_import(self, job_arn: str) -> None:
        """InProgress -> read the files -> check them by Bedrock's rules -> Completed, or Failed with a
        reason. The model itself loads on its first invoke (serve_runtime)."""
        started = time.monotonic()
        job = self.jobs[job_arn]
        folder = self.workdir / job_arn.rsplit("/", 1)[1]
        try:
            self._fetch(job, folder)
            config = _accept(folder, self.region)
            chat, converse = serve_rules.chat_problem(folder), serve_rules.converse_problem(folder)
            failure = None
        except ImportFailure as e:
            failure = str(e)[:2048]
        except Exception as e:  # anything else is still the job's failure, not the server's
            failure = f"{type(e).__name__}: {e}"[:2048]
        time.sleep(max(0.0, self.import_delay_seconds - (time.monotonic() - started)))
        with self.lock:
            now = _now()
            job.update(lastModifiedTime=now, endTime=now)
            if failure:
                job.update(status="Failed", failureMessage=failure)
                shutil.rmtree(folder, ignore_errors=True)
                return
            model_arn = f"{job_arn.split(':model-import-job/')[0]}:imported-model/{_new_id()}"
            self.models[model_arn] = {
                "modelArn": model_arn, "modelName": job["importedModelName"], "jobName": job["jobName"],
                "jobArn": job_arn, "modelDataSource": job["modelDataSource"], "creationTime": now,
                "modelArchitecture": config["model_type"], "instructSupported": converse is None,
                # A stand-in: Bedrock sizes CMUs from the model; serve always reports 1 of v1.0.
                "customModelUnits": {"customModelUnitsPerModelCopy": 1, "customModelUnitsVersion": "v1.0"}}
            if job.get("importedModelKmsKeyArn"):
                self.models[model_arn]["modelKmsKeyArn"] = job["importedModelKmsKeyArn"]
            decoder = not config.get("is_encoder_decoder", False)
            context = config.get("n_positions") or config.get("max_position_embeddings")
            self.models_run[model_arn] = Served(
                self.runtime.runner(folder, folder.with_suffix(".worker.log")), threading.Lock(), context,
                min(context or MAX_DECODER_INPUT_TOKENS, MAX_DECODER_INPUT_TOKENS) if decoder else MAX_INPUT_TOKENS,
                chat, converse)
            self.ready_at[model_arn] = time.monotonic() + self.cold_start_seconds
            job.update(status="Completed", importedModelArn=model_arn)

    def _fetch(self, job: dict, folder: Path) -> None:
        """Read the prefix as Bedrock does: as the job's role, through STS, so the role's
        trust and permission policies decide what the import may read."""
        from termtune.aws import s3
        from termtune.aws.clients import client, error_code, error_message

        s3_uri = job["modelDataSource"]["s3DataSource"]["s3Uri"]
        bucket, prefix = s3.split_uri(s3_uri)
        if self.local_root:  # no S3 and no IAM: the rehearsal of the files alone
            try:  # s3://bucket/../../ must not read from outside local_root
                source = inside(self.local_root, f"{bucket}/{prefix}".rstrip("/"), what="the S3 URI's path")
            except UnsafeName as e:
                raise ImportFailure(f"Amazon Bedrock can't read {s3_uri}: {e}.") from e
            if not source.is_dir():
                raise ImportFailure(f"No model files were found at {s3_uri} ({source} does not exist).")
            shutil.copytree(source, folder)
            return
        credentials = self._assume(job)
        try:
            names = s3.download(client("s3", self.region, credentials=credentials), bucket, prefix, folder)
        except UnsafeName as e:
            raise ImportFailure(f"Amazon Bedrock refuses the files at {s3_uri}: {e}.") from e
        except Exception as e:
            code = error_code(e)
            if code is None:
                raise
            code = "AccessDenied" if code == "403" else code  # a HEAD answer has no error body
            raise ImportFailure(f"Amazon Bedrock can't access the S3 location {s3_uri} with the role "
                                f"{job['roleArn']}: {code} ({error_message(e)}).") from e
        if not names:
            raise ImportFailure(f"No model files were found at {s3_uri}.")

    def _assume(self, job: dict) -> dict[str, str]:
        """Temporary credentials of the job's role. The trust policy is checked here for the
        service principal bedrock.amazonaws.com with the request context Bedrock sends
        (aws:SourceAccount, aws:SourceArn): moto cannot evaluate service principals."""
        from termtune.aws.clients import client, error_code, error_message, role_credentials
        from termtune.aws.trust import allows_service

        role_arn, account = job["roleArn"], self.own_account()
        path, name = _role_path_and_name(role_arn)
        try:
            role = client("iam", self.region).get_role(RoleName=name)["Role"]
            if role.get("Path", "/") != path:  # a role's name is unique in its account; its path is part of the ARN
                raise ImportFailure(f"Amazon Bedrock can't assume the role {role_arn}: no such role (the role "
                                    f"named {name} in account {account} is {role.get('Arn')}, path {role.get('Path')}).")
            trust = role["AssumeRolePolicyDocument"]
            trust = json.loads(unquote(trust)) if isinstance(trust, str) else trust
            context = {"aws:SourceAccount": account, "aws:SourceArn": job["jobArn"]}
            if not allows_service(trust, "bedrock.amazonaws.com", "sts:AssumeRole", context):
                raise ImportFailure(f"Amazon Bedrock can't assume the role {role_arn}: its trust policy does not "
                                    f"allow bedrock.amazonaws.com for {job['jobArn']} (aws:SourceAccount "
                                    f"{account}, aws:SourceArn {job['jobArn']}).")
            out = client("sts", self.region).assume_role(RoleArn=role_arn, RoleSessionName="bedrock-model-import",
                                                         DurationSeconds=900)["Credentials"]
        except ImportFailure:
            raise
        except Exception as e:
            if error_code(e) is None:
                raise
            raise ImportFailure(f"Amazon Bedrock can't assume the role {role_arn}: {error_code(e)} "
                                f"({error_message(e)}).") from e
        return role_credentials(out)

    def job(self, identifier: str) -> dict:
        _check("jobIdentifier", identifier)
        with self.lock:
            for job in self.jobs.values():
                if identifier in (job["jobArn"], job["jobName"]):
                    return dict(job)
        raise ApiError("ResourceNotFoundException", f"The specified model import job {identifier} was not found.",
                       404)

    def model(self, identifier: str) -> dict:
        _check("modelIdentifier", identifier)
        with self.lock:
            for model in self.models.values():
                if identifier in (model["modelArn"], model["modelName"]):
                    return dict(model)
        raise ApiError("ResourceNotFoundException", f"The specified imported model {identifier} was not found.",
                       404)

    def delete_model(self, identifier: str) -> dict:
        arn = self.model(identifier)["modelArn"]
        with self.lock:
            self.models.pop(arn, None)
            served = self.models_run.pop(arn, None)
            self.ready_at.pop(arn, None)
        if served:
            served.runner.stop()
        shutil.rmtree(self.workdir / self.jobs_for(arn), ignore_errors=True)
        return {}

    def jobs_for(self, model_arn: str) -> str:
        for job in self.jobs.values():
            if job.get("importedModelArn") == model_arn:
                return job["jobArn"].rsplit("/", 1)[1]
        return "-"

    def list_jobs(self, query: dict[str, str]) -> dict:
        status = query.get("statusEquals")
        if status is not None and status not in STATUSES:
            raise ApiError("ValidationException", f"Value '{status}' at 'statusEquals' failed to satisfy constraint: "
                                                  f"Member must satisfy enum value set: [{', '.join(STATUSES)}]")
        with self.lock:
            rows = [j for j in self.jobs.values() if status in (None, j["status"])
                    and query.get("nameContains", "") in j["jobName"]]
        keys = ("jobArn", "jobName", "status", "creationTime", "lastModifiedTime", "endTime",
                "importedModelArn", "importedModelName")
        return _page([{k: j[k] for k in keys if k in j} for j in rows], query, "modelImportJobSummaries")

    def list_models(self, query: dict[str, str]) -> dict:
        with self.lock:
            rows = [{k: m[k] for k in ("modelArn", "modelName", "creationTime", "instructSupported",
                                       "modelArchitecture")}
                    for m in self.models.values() if query.get("nameContains", "") in m["modelName"]]
        return _page(rows, query, "modelSummaries")

    # --------------------------------------------------------------- runtime

    def served(self, model_id: str) -> Served:
        """The imported model a runtime call names, once it is ready (past its cold start)."""
        import re

        if not re.fullmatch(MODEL_ARN_RE, model_id):
            raise ApiError("ValidationException", "The provided model identifier is invalid.")
        with self.lock:
            loaded = self.models_run.get(model_id)
            ready_at = self.ready_at.get(model_id, 0.0)
        if loaded is None:
            raise ApiError("ResourceNotFoundException", "The requested model was not found.", 404)
        if time.monotonic() < ready_at:
            raise ApiError("ModelNotReadyException", NOT_READY, 429)
        return loaded

    def prepare_invoke(self, model_id: str, content_type: str | None, raw: bytes) -> tuple[Served, dict, dict]:
        """Check the model and the body; returns (the served model, request, generation options). A body
        with `messages` (OpenAI chat completion) comes back with them in the worker's form."""
        loaded = self.served(model_id)
        if (content_type or "application/json").split(";")[0].strip() != "application/json":
            raise ApiError("ValidationException", f"The provided contentType {content_type} is not supported; "
                                                  "use application/json")
        try:
            request = json.loads(raw)
        except (ValueError, RecursionError) as e:  # ValueError: also a number over Python's 4300-digit limit
            raise ApiError("ValidationException", f"Malformed input request: {type(e).__name__}: {e}, please "
                                                  "reformat your input and try again.") from None
        if isinstance(request, dict) and "messages" in request:  # OpenAI chat completion
            if "prompt" in request:
                raise ApiError("ValidationException", "Malformed input request: give prompt (completion) or "
                                                      "messages (chat completion), not both.")
            if loaded.chat:
                raise ApiError("ValidationException", f"This model does not support the chat completion format "
                                                      f"(messages): {loaded.chat}. Send a prompt instead.")
            request["messages"] = _chat_messages(request["messages"])
            _check_text(loaded, "".join(m["content"] for m in request["messages"]))
        elif not isinstance(request, dict) or not isinstance(request.get("prompt"), str) or not request["prompt"]:
            raise ApiError("ValidationException", "Malformed input request: #: required key [prompt] not found "
                                                  "or not a non-empty string, please reformat your input and try again.")
        else:
            _check_text(loaded, request["prompt"])
        if "max_tokens" in request and "max_gen_len" in request:
            raise ApiError("ValidationException", "Malformed input request: give max_tokens (OpenAI completion) "
                                                  "or max_gen_len (Bedrock completion), not both.")
        return loaded, request, _options(loaded, request.get("max_tokens", request.get("max_gen_len", 16)),
                                         request.get("temperature", 0.0), request.get("top_p", 1.0))

    def prepare_converse(self, model_id: str, raw: bytes) -> tuple[Served, list[dict], dict]:
        """Check a Converse request; returns (the served model, the conversation in the worker's form,
        generation options). A model Converse does not serve is a ValidationException, as Bedrock's."""
        loaded = self.served(model_id)
        if loaded.converse:
            raise ApiError("ValidationException", "This action doesn't support the model that you provided. Try "
                                                  f"again with a supported text or chat model. ({loaded.converse})")
        body = Handler._json(raw)
        unknown = sorted(set(body) - {"messages", "system", "inferenceConfig"})
        if unknown:
            raise ApiError("ValidationException", f"termtune serve (a local stand-in) does not support "
                                                  f"{', '.join(unknown)} in Converse requests.")
        system = body.get("system") or []
        if not isinstance(system, list) or not all(isinstance(b, dict) and set(b) == {"text"}
                                                   and isinstance(b["text"], str) for b in system):
            raise ApiError("ValidationException", "system must be a list of text blocks ({\"text\": ...}).")
        turns = body.get("messages")
        if not isinstance(turns, list) or not turns:
            raise ApiError("ValidationException", "messages must be a non-empty list of {role, content} turns.")
        messages = [{"role": "system", "content": "".join(b["text"] for b in system)}] if system else []
        for i, turn in enumerate(turns):
            blocks = turn.get("content") if isinstance(turn, dict) else None
            if not isinstance(blocks, list) or not blocks or turn.get("role") not in ("user", "assistant"):
                raise ApiError("ValidationException", f"messages.{i}: a turn needs role user or assistant and a "
                                                      "non-empty content list.")
            if not all(isinstance(b, dict) and set(b) == {"text"} and isinstance(b["text"], str) for b in blocks):
                raise ApiError("ValidationException", f"messages.{i}.content: termtune serve (a local stand-in) "
                                                      "reads text content blocks only.")
            messages.append({"role": turn["role"], "content": "".join(b["text"] for b in blocks)})
        config = body.get("inferenceConfig") or {}
        if not isinstance(config, dict) or config.get("stopSequences"):
            raise ApiError("ValidationException", "inferenceConfig must be an object; termtune serve (a local "
                                                  "stand-in) does not support stopSequences.")
        _check_text(loaded, "".join(m["content"] for m in messages))
        return loaded, messages, _options(loaded, config.get("maxTokens", 16), config.get("temperature", 0.0),
                                          config.get("topP", 1.0))

    def generate(self, served: Served, source: dict, opts: dict, stream: bool = False) -> dict:
        """The model's answer (serve_runtime) to `source`, {"prompt": text} or {"messages": conversation}: ids,
        text, n_prompt, stopped, and with `stream` the text each token adds. Greedy unless temperature > 0;
        the generation stops at its time budget."""
        request = {**source, **opts, "max_time": self.generation_seconds,
                   "max_input_tokens": served.max_input_tokens, "stream": stream}
        # One generation per model at a time; a caller that cannot have the model within queue_seconds is
        # throttled (the SDK retries that), so one long generation never holds every other caller for minutes.
        if not served.lock.acquire(timeout=self.queue_seconds):
            raise ApiError("ThrottlingException", f"The model is busy with other requests (waited "
                                                  f"{self.queue_seconds:g} s); try again later.", 429)
        try:
            answer = served.runner.generate(request, self.generation_seconds + ANSWER_SLACK_SECONDS)
        except serve_runtime.ModelFailure as e:
            raise ApiError("ModelErrorException", f"The model failed to process the request: {e}", 424) from e
        except serve_runtime.ModelTimeout as e:
            raise ApiError("ModelTimeoutException", f"The request took too long to process: {e}", 408) from e
        finally:
            served.lock.release()
        if "too_long" in answer:
            raise ApiError("ValidationException", f"Input is too long: {answer['too_long']} tokens; this model "
                                                  f"accepts at most {served.max_input_tokens}.")
        return answer


@dataclass
class Served:
    """An imported model as serve runs it: its runner, the lock that lets one generation at a time
    through, its context from config.json (n_positions, or a decoder's max_position_embeddings: the most
    tokens max_tokens may ask for), the most prompt tokens it takes, and why it cannot answer the messages
    format or Converse (None: it can)."""

    runner: Any
    lock: threading.Lock
    n_positions: int | None
    max_input_tokens: int
    chat: str | None
    converse: str | None


def _check_text(served: Served, text: str) -> None:
    """Text a tokenizer can read, and not far beyond what the model takes (checked before tokenizing)."""
    try:  # JSON may carry a lone surrogate (\ud800), which is no text a tokenizer can read
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError("ValidationException", f"Malformed input request: the prompt is not valid Unicode (a lone "
                                              f"surrogate at character {e.start}), please reformat your input "
                                              "and try again.") from None
    most = 32 * served.max_input_tokens  # no prompt of that many tokens is longer in practice
    if len(text) > most:
        raise ApiError("ValidationException", f"Input is too long: {len(text)} characters; this model accepts at "
                                              f"most {served.max_input_tokens} tokens ({most} characters).")


def _options(served: Served, limit: Any, temperature: Any, top_p: Any) -> dict:
    """The generation options, once max tokens, temperature and top_p are in range."""
    most = min(MAX_NEW_TOKENS, served.n_positions or MAX_NEW_TOKENS)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= most:
        raise ApiError("ValidationException", "Malformed input request: max_tokens/max_gen_len must be an "
                                              f"integer between 1 and {most} (this model's limit).")
    if not isinstance(temperature, (int, float)) or not (temperature == 0 or MIN_TEMPERATURE <= temperature <= 2) \
            or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ApiError("ValidationException", f"Malformed input request: temperature must be 0 (greedy) or in "
                                              f"[{MIN_TEMPERATURE:g}, 2], and top_p in (0, 1].")
    return {"max_new_tokens": limit, "temperature": float(temperature), "top_p": float(top_p)}


CHAT_ROLES = ("system", "user", "assistant")


def _chat_messages(value: Any) -> list[dict]:
    """An OpenAI chat completion's messages as {role, content: text}; a content given as a list of text
    parts is joined. Anything else is a ValidationException naming the message."""
    if not isinstance(value, list) or not value:
        raise ApiError("ValidationException", "Malformed input request: messages must be a non-empty list.")
    out = []
    for i, message in enumerate(value):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str) or message.get("role") not in CHAT_ROLES:
            raise ApiError("ValidationException", f"Malformed input request: messages[{i}] needs a role "
                                                  f"({', '.join(CHAT_ROLES)}) and a text content.")
        out.append({"role": message["role"], "content": content})
    return out


class ImportFailure(Exception):
    """A reason the import job fails; becomes failureMessage verbatim."""


def _check(field: str, value: Any) -> None:
    problem = field_problem(field, value)
    if problem:
        raise ApiError("ValidationException", f"1 validation error detected: {problem}")


def _member(body: dict, *path: str) -> Any:
    """body[path[0]][path[1]]...; None when a member is absent, ValidationException when one is not an object."""
    value: Any = body
    for depth, key in enumerate(path):
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ApiError("ValidationException", f"1 validation error detected: Value at "
                                                  f"'{'.'.join(path[:depth])}' failed to satisfy constraint: "
                                                  "Member must be an object")
        value = value.get(key)
    return value


def _account(role_arn: str, default: str) -> str:
    """The role ARN's account; `default` for an ARN that leaves it out (arn:aws:iam:::role/x)."""
    import re

    match = re.fullmatch(ROLE_ARN_RE, role_arn)
    return (match.group(2) if match and match.group(2) else None) or default


def _role_path_and_name(role_arn: str) -> tuple[str, str]:
    """arn:aws:iam::ACCOUNT:role/a/b/name -> ("/a/b/", "name"), as IAM splits a role ARN."""
    *path, name = role_arn.split(":role/", 1)[1].split("/")
    return "/" + "".join(f"{part}/" for part in path), name


def _check_tags(field: str, tags: Any) -> None:
    if tags is None:
        return
    if not isinstance(tags, list) or len(tags) > MAX_TAGS:
        raise ApiError("ValidationException", f"1 validation error detected: Value at '{field}' failed to satisfy "
                                              f"constraint: Member must have length less than or equal to {MAX_TAGS}")
    for tag in tags:
        if not isinstance(tag, dict) or "key" not in tag or "value" not in tag:
            raise ApiError("ValidationException", f"1 validation error detected: Value at '{field}' failed to "
                                                  "satisfy constraint: each tag needs a key and a value")
        _check("key", tag["key"])
        _check("value", tag["value"])


def _check_vpc(vpc: Any) -> dict | None:
    if vpc is None:
        return None
    if not isinstance(vpc, dict):
        raise ApiError("ValidationException", "1 validation error detected: vpcConfig must be an object")
    for field, most in (("subnetIds", MAX_SUBNETS), ("securityGroupIds", MAX_SECURITY_GROUPS)):
        ids = vpc.get(field)
        if not isinstance(ids, list) or not 1 <= len(ids) <= most:
            raise ApiError("ValidationException", f"1 validation error detected: Value at 'vpcConfig.{field}' "
                                                  f"failed to satisfy constraint: Member must have length between "
                                                  f"1 and {most}")
        for value in ids:
            _check(field, value)
    return {"subnetIds": vpc["subnetIds"], "securityGroupIds": vpc["securityGroupIds"]}


def _page(rows: list[dict], query: dict[str, str], key: str) -> dict:
    for field, allowed in (("sortBy", SORT_BY), ("sortOrder", SORT_ORDER)):
        if field in query and query[field] not in allowed:
            raise ApiError("ValidationException", f"1 validation error detected: Value '{query[field]}' at '{field}' "
                                                  f"failed to satisfy constraint: Member must satisfy enum value set: "
                                                  f"[{', '.join(allowed)}]")
    rows = sorted(rows, key=lambda r: r["creationTime"], reverse=query.get("sortOrder", "Descending") == "Descending")
    try:
        size = int(query.get("maxResults", "1000"))
        start = int(query.get("nextToken", "0"))
    except ValueError:
        raise ApiError("ValidationException", "maxResults and nextToken must be integers here.") from None
    if not 1 <= size <= 1000:
        raise ApiError("ValidationException", "Value at 'maxResults' failed to satisfy constraint: "
                                              "Member must have value between 1 and 1000")
    out: dict[str, Any] = {key: rows[start:start + size]}
    if start + size < len(rows):
        out["nextToken"] = str(start + size)
    return out


def _accept(folder: Path, region: str) -> dict:
    """config.json, once the files pass Bedrock's documented import rules (serve_rules) and name a model
    this stand-in can run."""
    problems = serve_rules.problems(folder, region)
    if problems:
        raise ImportFailure("The model artifact is not valid for Custom Model Import: " + "; ".join(problems))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    architecture = config["architectures"][0]
    if architecture not in serve_rules.SERVED_HERE:
        why = serve_rules.NOT_SERVED_WHY.get(architecture)
        raise ImportFailure(f"termtune serve (a local stand-in) runs only {', '.join(serve_rules.SERVED_HERE)} "
                            f"models; Amazon Bedrock would import this {architecture}"
                            f"{f' ({why})' if why else ''}.")
    return config


# ----------------------------------------------------------------------------- event stream


def event_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (total length, headers length, CRC32), string
    headers (type 7), payload, message CRC32 (the format botocore's EventStream parses)."""
    encoded = b"".join(bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(value.encode()))
                       + value.encode() for name, value in headers.items())
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def chunk_frame(body: dict) -> bytes:
    payload = json.dumps({"bytes": base64.b64encode(json.dumps(body).encode()).decode()}).encode()
    return event_frame({":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"},
                       payload)


# ----------------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    """One request per connection (HTTP/1.0, the default here), so no idle keep-alive holds a worker.
    The request (headers and body) must arrive whole within the server's request_seconds: a deadline
    timer shuts the reading side of a stalled or dripping connection, which then ends with 408 or no
    answer; the same figure bounds every single socket read and write (BaseHTTPRequestHandler.timeout)."""

    server: "BedrockServer"
    server_version = "termtune-serve"

    def setup(self) -> None:
        self.timeout = self.server.request_seconds
        super().setup()
        self.expired = False
        self.deadline = threading.Timer(self.server.request_seconds, self._expire)
        self.deadline.daemon = True
        self.deadline.start()

    def _expire(self) -> None:
        self.expired = True
        try:
            self.connection.shutdown(socket.SHUT_RD)  # a blocked read returns now; the answer can still go out
        except OSError:
            pass

    def finish(self) -> None:
        self.deadline.cancel()
        try:
            super().finish()
        except OSError:
            pass  # the client went away first

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:  # method, path and status only; headers (credentials) never
            path = unquote(urlsplit(getattr(self, "path", "") or "").path)  # unset when the request line never came
            emit("note", f"serve: {getattr(self, 'command', None) or '-'} {path} "
                         f"{args[1] if len(args) > 1 else format % args}")

    def _dispatch(self, method: str) -> None:
        state = self.server.state
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        try:
            raw = self._body()
            self.deadline.cancel()  # the request is in; generation has its own time budget
            self._check_host()
            state.throttle()
            target = self.headers.get("X-Amz-Target") or ""
            if method == "POST" and url.path == "/" and target.startswith(serve_training.TARGET_PREFIX):
                return self._sagemaker(target.removeprefix(serve_training.TARGET_PREFIX), raw)
            route = (method, parts[0], len(parts))
            if route == ("POST", "model-import-jobs", 1):
                self._check_json_content_type()
                status, out = state.create_job(self._json(raw))
                return self._reply(status, out)
            if route == ("GET", "model-import-jobs", 1):
                return self._reply(200, state.list_jobs(query))
            if route == ("GET", "model-import-jobs", 2):
                return self._reply(200, state.job(parts[1]))
            if route == ("GET", "imported-models", 1):
                return self._reply(200, state.list_models(query))
            if route == ("GET", "imported-models", 2):
                return self._reply(200, state.model(parts[1]))
            if route == ("DELETE", "imported-models", 2):
                return self._reply(200, state.delete_model(parts[1]))
            if method == "POST" and parts[0] == "model" and len(parts) == 3 and parts[2] in (
                    "invoke", "invoke-with-response-stream"):
                return self._invoke(parts[1], raw, stream=parts[2] != "invoke")
            if method == "POST" and parts[0] == "model" and len(parts) == 3 and parts[2] in (
                    "converse", "converse-stream"):
                return self._converse(parts[1], raw, stream=parts[2] != "converse")
            raise ApiError("UnknownOperationException", f"{method} {url.path} is not an operation termtune serve "
                                                         "implements", 404)
        except ApiError as e:
            state.count(e.code)
            self._reply(e.status, {"__type": e.code, "message": e.message}, error=e.code)
        except Exception as e:  # a bug here must still answer like a service, not hang the client
            state.count("InternalServerException")
            self._reply(500, {"message": f"{type(e).__name__}: {e}"}, error="InternalServerException")

    def _sagemaker(self, operation: str, raw: bytes) -> None:
        """A SageMaker call (awsJson 1.1): its answer, or its error as {"__type", "message"}."""
        state = self.server.state
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        try:
            if content_type != serve_training.CONTENT_TYPE:  # what a browser cannot send without asking first
                raise ApiError("ValidationException", f"Content-Type {content_type or '(none)'!r} is not supported; "
                                                      f"send {serve_training.CONTENT_TYPE}.")
            answer = state.training.call(operation, self._json(raw))
        except ApiError as e:
            state.count(e.code)
            return self._reply(e.status, {"__type": e.code, "message": e.message}, error=e.code,
                               content_type=serve_training.CONTENT_TYPE)
        self._reply(200, answer, content_type=serve_training.CONTENT_TYPE)

    def _body(self) -> bytes:
        """The body, whole: refused when its framing is not one plain Content-Length, when it is over the
        limit, or when it does not all arrive before the request deadline."""
        import re

        lengths = self.headers.get_all("Content-Length") or []
        chunked = self.headers.get("Transfer-Encoding")
        if chunked or len(lengths) > 1 or not all(re.fullmatch(r"[0-9]{1,15}", v.strip()) for v in lengths):
            self.close_connection = True  # where this body ends is unknown
            framing = ", ".join([*lengths, *(["Transfer-Encoding"] if chunked else [])])
            raise ApiError("ValidationException", "The request needs one Content-Length header with the body's "
                                                  f"size in bytes (got {framing[:100] or 'none'}).")
        length = int(lengths[0]) if lengths else 0
        limit = self.server.state.max_body_bytes
        if length > limit:
            remaining = length
            while remaining > 0:  # drain it so the client reads our answer instead of a reset
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                remaining -= len(chunk)
            raise ApiError("ValidationException", f"The request body is {length} bytes; the limit is {limit}.")
        try:
            raw = self.rfile.read(length) if length else b""
        except OSError:  # a single read timed out
            raw = b""
        if len(raw) < length or self.expired:  # expired: the headers themselves may be cut short
            self.close_connection = True
            raise ApiError("RequestTimeoutException", f"The request body did not arrive whole within "
                                                      f"{self.server.request_seconds:g} s ({len(raw)} of {length} "
                                                      "bytes).", 408)
        return raw

    def _check_host(self) -> None:
        """A Host header naming the address serve is bound to: a web page that rebinds its own DNS name
        to 127.0.0.1 still sends its name, so it is refused."""
        host = (self.headers.get("Host") or "").strip().lower()
        allowed, port = self.server.allowed_hosts, self.server.server_address[1]
        if host not in allowed and not (f"*:{port}" in allowed and host.endswith(f":{port}")):
            raise ApiError("AccessDeniedException", f"termtune serve answers requests addressed to "
                                                    f"{' or '.join(sorted(allowed))}, not Host "
                                                    f"{host[:100] or '(none)'!r}.", 403)

    def _check_json_content_type(self) -> None:
        """Control-plane writes need Content-Type application/json: a cross-site form or text/plain POST
        (what a browser sends without asking first) is refused."""
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ApiError("ValidationException", f"Content-Type {content_type or '(none)'!r} is not supported; "
                                                  "send application/json.")

    @staticmethod
    def _json(raw: bytes) -> dict:
        try:
            value = json.loads(raw or b"{}")
        except (ValueError, RecursionError):  # ValueError: also a number over Python's 4300-digit limit
            raise ApiError("ValidationException", "The request body is not valid JSON.") from None
        if not isinstance(value, dict):
            raise ApiError("ValidationException", "The request body must be a JSON object.")
        return value

    def _reply(self, status: int, body: dict, error: str | None = None,
               content_type: str = "application/json") -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", secrets.token_hex(16))
        self._stand_in_headers()
        if error:
            self.send_header("x-amzn-ErrorType", error)
        else:
            self.server.state.count("ok")
        self.end_headers()
        self.wfile.write(data)

    def _stand_in_headers(self) -> None:
        """Every answer says it comes from a local stand-in, and how it runs models (termtune deploy and
        invoke read these from the response metadata and say so)."""
        self.send_header(STAND_IN_HEADER, STAND_IN)
        self.send_header(RUNTIME_HEADER, self.server.state.runtime.label)

    def _invoke(self, model_id: str, raw: bytes, stream: bool) -> None:
        state = self.server.state
        started = time.monotonic()
        served, request, opts = state.prepare_invoke(model_id, self.headers.get("Content-Type"), raw)
        chat = "messages" in request
        answer = state.generate(served, {"messages": request["messages"]} if chat else {"prompt": request["prompt"]},
                                opts, stream=stream)
        ids, n_prompt, text = answer["ids"], answer["n_prompt"], answer["text"]
        openai = "max_gen_len" not in request
        reason = "stop" if answer["stopped"] else "length"
        chat_id = f"chatcmpl-{secrets.token_hex(12)}"  # a chat stream's chunks share their completion's id
        if not stream:
            body = (_chat(chat_id, model_id, text, reason, n_prompt, len(ids)) if chat else
                    _openai(model_id, text, reason, n_prompt, len(ids)) if openai else
                    {"generation": text, "prompt_token_count": n_prompt, "generation_token_count": len(ids),
                     "stop_reason": reason, "logprobs": None})
            return self._reply(200, body)
        # Stream one chunk per generated token, in each schema's shape (a chat completion's: OpenAI's
        # chat.completion.chunk, whose delta carries the text).
        self._start_stream()
        pieces = answer["pieces"] or ([""] if chat else [])  # a chat stream always ends with its finish_reason
        for i, piece in enumerate(pieces, start=1):
            last = i == len(pieces)
            if chat:
                chunk = {"id": chat_id, "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": model_id, "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece}
                                                         if i == 1 else {"content": piece},
                                                         "finish_reason": reason if last else None}]}
            elif openai:
                chunk = _openai(model_id, piece, reason if last else None, n_prompt, i)
            else:
                chunk = {"generation": piece, "prompt_token_count": n_prompt if i == 1 else None,
                         "generation_token_count": i, "stop_reason": reason if last else None}
            self.wfile.write(chunk_frame(chunk))
            self.wfile.flush()
        # Bedrock reports invocation metrics in the stream; serve sends them as a last chunk
        # with no text, which a client must skip rather than fail on.
        self.wfile.write(chunk_frame({"amazon-bedrock-invocationMetrics": {
            "inputTokenCount": n_prompt, "outputTokenCount": len(ids),
            "invocationLatency": int((time.monotonic() - started) * 1000), "firstByteLatency": 0}}))
        self.wfile.flush()
        self.close_connection = True

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.amazon.eventstream")
        self.send_header("X-Amzn-Bedrock-Content-Type", "application/json")
        self.send_header("x-amzn-RequestId", secrets.token_hex(16))
        self._stand_in_headers()
        self.end_headers()
        self.server.state.count("ok")

    def _converse(self, model_id: str, raw: bytes, stream: bool) -> None:
        """Converse / ConverseStream: the conversation through the model's chat template, answered in
        Converse's shapes (output.message, stopReason, usage, metrics; or the stream's events)."""
        state = self.server.state
        started = time.monotonic()
        served, messages, opts = state.prepare_converse(model_id, raw)
        answer = state.generate(served, {"messages": messages}, opts, stream=stream)
        n_prompt, n_out = answer["n_prompt"], len(answer["ids"])
        reason = "end_turn" if answer["stopped"] else "max_tokens"
        usage = {"inputTokens": n_prompt, "outputTokens": n_out, "totalTokens": n_prompt + n_out}
        if not stream:
            return self._reply(200, {"output": {"message": {"role": "assistant", "content": [{"text": answer["text"]}]}},
                                     "stopReason": reason, "usage": usage,
                                     "metrics": {"latencyMs": int((time.monotonic() - started) * 1000)}})
        self._start_stream()
        events = [("messageStart", {"role": "assistant"})]
        events += [("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": piece}})
                   for piece in answer["pieces"]]
        events += [("contentBlockStop", {"contentBlockIndex": 0}), ("messageStop", {"stopReason": reason}),
                   ("metadata", {"usage": usage, "metrics": {"latencyMs": int((time.monotonic() - started) * 1000)}})]
        for name, event in events:
            self.wfile.write(event_frame({":event-type": name, ":content-type": "application/json",
                                          ":message-type": "event"}, json.dumps(event).encode()))
            self.wfile.flush()
        self.close_connection = True


def _chat(chat_id: str, model_id: str, text: str, reason: str, n_prompt: int, n_out: int) -> dict:
    return {"id": chat_id, "object": "chat.completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}


def _openai(model_id: str, text: str, reason: str | None, n_prompt: int, n_out: int) -> dict:
    return {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": model_id, "choices": [{"index": 0, "text": text, "finish_reason": reason}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}


class BedrockServer(ThreadingHTTPServer):
    """At most `workers` connections are served at once, one thread each; further connections wait in
    the listen backlog (`backlog`) until a worker is free. A connection holds its worker at most
    `request_seconds` while its request arrives, then for the answer (generation has its own budget)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: Bedrock, quiet: bool = False, workers: int = WORKERS,
                 backlog: int = BACKLOG, request_seconds: float = REQUEST_SECONDS):
        if state.training.run_jobs and address[0] not in ("127.0.0.1", "localhost"):
            state.close()  # anyone who reached it could run commands on this machine
            raise UserError(f"run_training_jobs (--run-training-jobs) runs each training job's command on this "
                            f"machine, so serve binds only 127.0.0.1 with it, not {address[0]}")
        self.request_queue_size = backlog  # read by server_activate(), inside super().__init__
        super().__init__(address, Handler)
        self.state = state
        self.quiet = quiet
        self.request_seconds = request_seconds
        self.workers = threading.BoundedSemaphore(workers)
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::", ""):  # every interface: any name may reach it, the port must match
            self.allowed_hosts = {f"*:{port}"}
        else:
            names = {host, "localhost"} if host in ("127.0.0.1", "::1") else {host}
            self.allowed_hosts = {f"[{n}]:{port}" if ":" in n else f"{n}:{port}" for n in names}

    def process_request(self, request: Any, client_address: Any) -> None:
        self.workers.acquire()  # blocks accepting; waiting connections queue in the listen backlog
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.workers.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.workers.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that broke (client gone, timed out): one line, not a traceback."""
        if not self.quiet:
            error = sys.exc_info()[1]
            emit("note", f"serve: connection from {client_address[0]} ended: {type(error).__name__}: {error}")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.state.close()


def start_server(host: str = "127.0.0.1", port: int = 0, quiet: bool = True, workers: int = WORKERS,
                 backlog: int = BACKLOG, request_seconds: float = REQUEST_SECONDS,
                 **options: Any) -> tuple[BedrockServer, str]:
    """Start in a background thread (for tests and scripts); stop with `server.stop()`.
    `options` are Bedrock's parameters (cold_start_seconds, throttle_every, ...)."""
    server = BedrockServer((host, port), Bedrock(**options), quiet=quiet, workers=workers, backlog=backlog,
                           request_seconds=request_seconds)
    threading.Thread(target=server.serve_forever, name="termtune-serve", daemon=True).start()
    return server, server.url


def serve(host: str = "127.0.0.1", port: int = 8787, cold_start_seconds: float = 0.0, throttle_every: int = 0,
          import_delay_seconds: float = 1.0, model_quota: int = 3, region: str = "us-east-1",
          role_delay_seconds: float = 0.0, local_root: str | None = None, runtime: str = "auto",
          run_training_jobs: bool = False, training_time_scale: float = 1.0, spot_interrupt_after_seconds: float = 0.0,
          training_capacity_error: bool = False) -> None:
    """Serve until interrupted (termtune serve)."""
    state = Bedrock(region=region, cold_start_seconds=cold_start_seconds, throttle_every=throttle_every,
                    import_delay_seconds=import_delay_seconds, model_quota=model_quota,
                    role_delay_seconds=role_delay_seconds, local_root=local_root, runtime=runtime,
                    run_training_jobs=run_training_jobs, training_time_scale=training_time_scale,
                    spot_interrupt_after_seconds=spot_interrupt_after_seconds,
                    training_capacity_error=training_capacity_error, quiet=False)
    server = BedrockServer((host, port), state)
    if host not in ("127.0.0.1", "localhost", "::1"):
        emit("note", f"serve: warning: listening on {host} with no authentication; anyone who can reach it can "
                     "import and invoke models")
    training = ("runs training jobs' commands on this machine" if run_training_jobs else
                "fails every training job: start it with --run-training-jobs to run them")
    emit("note", f"termtune serve: a local stand-in for Amazon Bedrock (control plane + runtime) and SageMaker "
                 f"training jobs (region {region}, not AWS) on {server.url}\n  models run under "
                 f"{state.runtime.label}; SageMaker {training}\n"
                 f"  export AWS_ENDPOINT_URL_BEDROCK={server.url} AWS_ENDPOINT_URL_BEDROCK_RUNTIME={server.url} "
                 f"AWS_ENDPOINT_URL_SAGEMAKER={server.url}")
    # `kill` (SIGTERM, what scripts send) ends it as cleanly as Ctrl-C: the work folder goes too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        state.close()
