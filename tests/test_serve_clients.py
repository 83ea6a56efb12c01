"""termtune serve under bad clients, over real sockets: cross-site shaped requests, malformed shapes and
framing, stalled and dripping connections, a bounded number of workers, oversized prompts and
generations, and one slow generation among other callers."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from urllib.parse import quote

import pytest
from botocore.exceptions import ClientError

from aws_fixtures import artifact_template, wait  # noqa: F401  (fixture)
from test_serve import ROLE, clients, code
from termtune.serve import MAX_PROMPT_CHARS, start_server

CREATE = json.dumps({"jobName": "web", "importedModelName": "web", "roleArn": ROLE,
                     "modelDataSource": {"s3DataSource": {"s3Uri": "s3://bucket-a/nothing-here/"}}}).encode()


@pytest.fixture(scope="module")
def served(tmp_path_factory, artifact_template):  # noqa: F811
    """(server, port, imported model ARN): requests must arrive whole within 1 s."""
    root = tmp_path_factory.mktemp("s3root")
    shutil.copytree(artifact_template, root / "bucket-a" / "m")
    server, url = start_server(local_root=root, import_delay_seconds=0.0, request_seconds=1.0)
    br, _ = clients(url)
    arn = br.create_model_import_job(jobName="m", importedModelName="m", roleArn=ROLE,
                                     modelDataSource={"s3DataSource": {"s3Uri": "s3://bucket-a/m/"}})["jobArn"]
    job = wait(br, arn)
    assert job["status"] == "Completed", job.get("failureMessage")
    yield server, server.server_address[1], job["importedModelArn"]
    server.stop()


def request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None,
            host: str | None = None) -> bytes:
    head = {"Host": host if host is not None else f"127.0.0.1:{port}", "Content-Type": "application/json",
            "Content-Length": str(len(body)), **(headers or {})}
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def exchange(port: int, data: bytes) -> tuple[int | None, dict[str, str], bytes]:
    """Send `data`, read until the server closes: (status, headers, body); status None when it closed
    without answering. A server that never closes fails the test through the socket timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(data)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    if not raw:
        return None, {}, b""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def ending(s: socket.socket) -> int | None:
    """How the server ended a connection: the status it answered, or None when it closed without one. A
    connection it keeps open fails the test through the socket's timeout."""
    raw = b""
    while chunk := s.recv(65536):
        raw += chunk
    return int(raw.split(b" ", 2)[1]) if raw else None


def jobs(server) -> set[str]:
    return {j["jobName"] for j in server.state.jobs.values()}


# ----------------------------------------------------------------------------- cross-site shapes


@pytest.mark.parametrize("content_type,host,status,error", [
    ("text/plain", None, 400, "ValidationException"),  # what a web page may POST without asking first
    ("application/x-www-form-urlencoded", None, 400, "ValidationException"),
    (None, None, 400, "ValidationException"),
    ("application/json", "evil.example:{port}", 403, "AccessDeniedException"),  # DNS rebinding keeps its name
    ("application/json", "127.0.0.1:1", 403, "AccessDeniedException"),
    ("application/json", "", 403, "AccessDeniedException"),
])
def test_control_plane_needs_a_json_content_type_and_the_bound_host(served, content_type, host, status, error):
    server, port, _ = served
    before = jobs(server)
    got, headers, _ = exchange(port, request(port, "POST", "/model-import-jobs", CREATE,
                                             {"Content-Type": content_type}, host and host.format(port=port)))
    assert (got, headers.get("x-amzn-errortype")) == (status, error)
    assert jobs(server) == before


def test_the_bound_host_by_either_name_with_json_is_answered(served):
    server, port, _ = served
    got, _, body = exchange(port, request(port, "POST", "/model-import-jobs", CREATE,
                                          {"Content-Type": "application/json; charset=utf-8"}, f"localhost:{port}"))
    assert got == 201 and json.loads(body)["jobArn"] and "web" in jobs(server)


DEEP = b"[" * 100_000 + b"]" * 100_000
NESTED_CREATE = [
    b"[]", b'"a string"', DEEP,
    CREATE.replace(b'{"s3DataSource": {"s3Uri": "s3://bucket-a/nothing-here/"}}', b'{"s3DataSource": []}'),
    CREATE.replace(b'{"s3DataSource": {"s3Uri": "s3://bucket-a/nothing-here/"}}', b'[]'),
    b'{"jobName": ["j"], "importedModelName": "m", "roleArn": "r", "modelDataSource": {}}',
    CREATE[:-1] + b', "jobTags": [{"key": {"k": 1}, "value": "v"}]}',
    CREATE[:-1] + b', "jobTags": {"key": "k"}}',
    CREATE[:-1] + b', "vpcConfig": {"subnetIds": [1], "securityGroupIds": ["sg-1"]}}',
    CREATE[:-1] + b', "clientRequestToken": {"a": 1}}',
]


@pytest.mark.parametrize("body", NESTED_CREATE, ids=range(len(NESTED_CREATE)))
def test_malformed_control_plane_bodies_are_validation_errors(served, body):
    server, port, _ = served
    got, headers, _ = exchange(port, request(port, "POST", "/model-import-jobs", body))
    assert (got, headers.get("x-amzn-errortype")) == (400, "ValidationException")
    assert server.state.counts.get("InternalServerException", 0) == 0


@pytest.mark.parametrize("framing", [
    {"Content-Length": "abc"}, {"Content-Length": "-5"}, {"Content-Length": "1e3"},
    {"Content-Length": None, "Transfer-Encoding": "chunked"},
])
def test_bad_framing_is_a_validation_error(served, framing):
    _, port, arn = served
    data = request(port, "POST", f"/model/{quote(arn, safe='')}/invoke", b'{"prompt": "x"}', framing)
    got, headers, _ = exchange(port, data)
    assert (got, headers.get("x-amzn-errortype")) == (400, "ValidationException")


def test_two_content_lengths_are_a_validation_error(served):
    _, port, _ = served
    data = request(port, "POST", "/model-import-jobs", CREATE).replace(
        b"\r\n\r\n", f"\r\nContent-Length: {len(CREATE) - 1}\r\n\r\n".encode(), 1)
    got, headers, _ = exchange(port, data)
    assert (got, headers.get("x-amzn-errortype")) == (400, "ValidationException")


@pytest.mark.parametrize("body", [DEEP, b'{"prompt": {"nested": "x"}}', b'{"prompt": "x", "max_tokens": [8]}'])
def test_malformed_invoke_bodies_are_validation_errors(served, body):
    _, port, arn = served
    got, headers, _ = exchange(port, request(port, "POST", f"/model/{quote(arn, safe='')}/invoke", body))
    assert (got, headers.get("x-amzn-errortype")) == (400, "ValidationException")


# ----------------------------------------------------------------------------- slow and stalled clients


def test_stalled_and_half_sent_requests_time_out_while_others_are_served(served):
    server, port, arn = served
    half_headers = request(port, "GET", "/imported-models")[:30]
    assert exchange(port, half_headers)[0] in (None, 400, 408)  # closed, not held open

    half_body = request(port, "POST", f"/model/{quote(arn, safe='')}/invoke", b'{"prompt": "What is asthma?"}')[:-10]
    got, headers, _ = exchange(port, half_body)
    assert (got, headers.get("x-amzn-errortype")) == (408, "RequestTimeoutException")

    # A client dripping its headers a byte at a time is cut off at the request deadline, not served forever.
    sent, stop = [], threading.Event()

    def drip() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            try:
                for byte in request(port, "GET", "/imported-models", headers={"X-Pad": "a" * 400}):
                    s.sendall(bytes([byte]))
                    sent.append(byte)
                    if stop.wait(0.05):
                        return
            except OSError:
                return

    dripper = threading.Thread(target=drip)
    dripper.start()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as stalled:  # sends nothing at all
        stalled.sendall(b"GET /imported-models HTTP/1.1\r\n")
        br, _ = clients(f"http://127.0.0.1:{port}")
        assert br.get_imported_model(modelIdentifier=arn)["modelArn"] == arn  # others are served meanwhile
        assert ending(stalled) in (None, 400, 408)  # and the stalled one ends: closed, or a 400/408 answer
    dripper.join(timeout=60)
    stop.set()
    assert not dripper.is_alive() and len(sent) < len(request(port, "GET", "/imported-models",
                                                              headers={"X-Pad": "a" * 400}))


def test_workers_are_bounded_and_waiting_connections_queue(tmp_path):
    server, url = start_server(local_root=tmp_path, workers=1, backlog=8, request_seconds=1.0)
    try:
        assert server.request_queue_size == 8
        port = server.server_address[1]
        stalled = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(3)]
        busiest = 0
        for _ in range(20):
            workers = [t for t in threading.enumerate() if "process_request_thread" in t.name]
            busiest = max(busiest, len(workers))
            time.sleep(0.05)
        br, _ = clients(url)
        assert br.list_imported_models()["modelSummaries"] == []  # served once the stalled ones time out
        for s in stalled:
            assert ending(s) in (None, 400, 408)  # each stalled one was ended: closed, or a 400/408 answer
            s.close()
        assert busiest == 1
    finally:
        server.stop()


# ----------------------------------------------------------------------------- prompts and generations


def test_prompt_size_is_checked_before_tokenizing(served, monkeypatch):
    """An oversized prompt never reaches the model (whose tokenizer would spend time on it)."""
    server, port, arn = served
    runner, calls = server.state.models_run[arn].runner, []
    monkeypatch.setattr(runner, "generate", lambda *args: calls.append(args))
    _, rt = clients(f"http://127.0.0.1:{port}")
    with pytest.raises(ClientError) as e:
        rt.invoke_model(modelId=arn, body=json.dumps({"prompt": "a" * (MAX_PROMPT_CHARS + 1)}))
    assert code(e) == "ValidationException" and "too long" in str(e.value)
    assert calls == []


def test_max_tokens_is_bounded_by_the_model(served, artifact_template):  # noqa: F811
    server, port, arn = served
    _, rt = clients(f"http://127.0.0.1:{port}")
    n_positions = json.loads((artifact_template / "config.json").read_text())["n_positions"]
    with pytest.raises(ClientError) as e:
        rt.invoke_model(modelId=arn, body=json.dumps({"prompt": "What is asthma?", "max_tokens": n_positions + 1}))
    assert code(e) == "ValidationException" and f"between 1 and {n_positions}" in str(e.value)


def test_a_generation_stops_at_its_time_budget(served):
    server, port, arn = served
    _, rt = clients(f"http://127.0.0.1:{port}")
    body = json.dumps({"prompt": "What is asthma?", "max_gen_len": 40})
    full = json.loads(rt.invoke_model(modelId=arn, body=body)["body"].read())
    assert full["generation_token_count"] > 1  # the tiny random model does not stop by itself this early
    budget = server.state.generation_seconds
    server.state.generation_seconds = 1e-9  # spent after the first token
    try:
        cut = json.loads(rt.invoke_model(modelId=arn, body=body)["body"].read())
    finally:
        server.state.generation_seconds = budget
    assert cut["stop_reason"] == "length" and cut["generation_token_count"] < full["generation_token_count"]


def test_a_long_generation_does_not_hold_other_invokes(served):
    """While one generation runs, another caller of the same model is throttled after queue_seconds
    (the SDK retries ThrottlingException) instead of waiting for it."""
    server, port, arn = served
    runner = server.state.models_run[arn].runner
    entered, release = threading.Event(), threading.Event()
    generate = runner.generate

    def slow_generate(*args, **kwargs):
        entered.set()
        release.wait(60)
        return generate(*args, **kwargs)

    runner.generate = slow_generate
    queue = server.state.queue_seconds
    server.state.queue_seconds = 0.5
    results: list = []
    try:
        _, rt = clients(f"http://127.0.0.1:{port}")
        body = json.dumps({"prompt": "What is asthma?", "max_tokens": 4})
        first = threading.Thread(target=lambda: results.append(rt.invoke_model(modelId=arn, body=body)))
        first.start()
        assert entered.wait(30)
        _, other = clients(f"http://127.0.0.1:{port}")
        with pytest.raises(ClientError) as e:
            other.invoke_model(modelId=arn, body=body)
        assert code(e) == "ThrottlingException" and e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
        assert not results  # the first one was still running
    finally:
        release.set()
        first.join(60)
        del runner.generate
        server.state.queue_seconds = queue
    assert json.loads(results[0]["body"].read())["choices"][0]["finish_reason"] in ("stop", "length")
