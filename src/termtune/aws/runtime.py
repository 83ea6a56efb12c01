"""termtune invoke: ask the imported model for a definition through bedrock-runtime.

Imported models scale to zero when idle; the first call after that answers
ModelNotReadyException while Bedrock restores the model, which can take minutes. The SDK
gives up after seconds, so invoke keeps retrying within aws.cold_start_budget_minutes.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from termtune import data
from termtune import serve_rules
from termtune.aws.clients import RUNTIME_HEADER, client, error_code, error_message, stand_in
from termtune.aws.stage import aws_errors, read_record
from termtune.config import Config
from termtune.errors import UserError
from termtune.events import emit
from termtune.layout import RunLayout
from termtune.rundir import write_json

RETRY_CODES = ("ModelNotReadyException", "ThrottlingException")


def body_schema(cfg: Config) -> str:
    """aws.invoke_schema with `auto` decided: `messages` (OpenAI chat completion, the chat template applied
    by Bedrock) when the run's artifact carries a chat template where Bedrock reads it, else `max_tokens`."""
    if cfg.aws.invoke_schema != "auto":
        return cfg.aws.invoke_schema
    return "max_tokens" if serve_rules.chat_problem(RunLayout.of(cfg).artifact) else "messages"


def request_body(cfg: Config, prompt: str) -> dict[str, Any]:
    """`messages` sends the prompt as the user's turn (OpenAI chat completion); otherwise max_tokens selects
    the OpenAI completion schema, max_gen_len the Bedrock completion one."""
    schema = body_schema(cfg)
    if schema == "messages":
        return {"messages": [{"role": "user", "content": prompt}], "max_tokens": cfg.aws.invoke_max_tokens,
                "temperature": cfg.aws.invoke_temperature}
    return {"prompt": prompt, schema: cfg.aws.invoke_max_tokens, "temperature": cfg.aws.invoke_temperature}


def chunk_text(body: dict[str, Any]) -> str | None:
    """The generated text in a response or stream chunk of any shape imported models answer in, read in
    this order: `generation` (Bedrock completion), `choices[0].message.content` (chat completion; a stream's
    `choices[0].delta.content`), `choices[0].text` (OpenAI completion), then the shapes of models imported
    before November 2025: `outputs[0].text`, `text`. None when it carries none (a usage or metrics chunk)."""
    def at(value: Any, *path: str | int) -> Any:  # value[path[0]][path[1]]..., or None where it is not there
        for step in path:
            if isinstance(step, str):
                value = value.get(step) if isinstance(value, dict) else None
            else:
                value = value[step] if isinstance(value, list) and len(value) > step else None
        return value

    candidates = (at(body, "generation"), at(body, "choices", 0, "message", "content"),
                  at(body, "choices", 0, "delta", "content"), at(body, "choices", 0, "text"),
                  at(body, "outputs", 0, "text"), at(body, "text"))
    return next((text for text in candidates if isinstance(text, str)), None)


def response_text(body: dict[str, Any]) -> str:
    text = chunk_text(body)
    if text is not None:
        return text
    raise UserError(f"unrecognised response from the model (no generation, choices, outputs or text): "
                    f"{json.dumps(body)[:300]}")


def invoke(cfg: Config, prompt: str, model_arn: str, stream: bool = False,
           on_text: Callable[[str], None] | None = None, sleep: Callable[[float], None] = time.sleep) -> dict:
    """One generation; returns {"text", "response"|"chunks", "cold_start_retries", "seconds"}, and
    "local_stand_in" when termtune serve answered (what it says of itself and where the model ran)."""
    rt = client("bedrock-runtime", cfg.aws.region, cfg.aws.profile, read_timeout=300)
    body = json.dumps(request_body(cfg, prompt))
    budget = cfg.aws.cold_start_budget_minutes * 60
    start = time.monotonic()
    retries, delay, told = 0, 1.0, 0.0
    while True:
        try:
            with aws_errors():
                if stream:
                    out, resp = _stream(rt, model_arn, body, on_text)
                else:
                    resp = rt.invoke_model(modelId=model_arn, body=body, contentType="application/json",
                                           accept="application/json")
                    raw = json.loads(resp["body"].read())
                    out = {"text": response_text(raw), "response": raw}
                if stand_in(resp):  # termtune serve answered: say so wherever this answer is shown
                    out["local_stand_in"] = f"{stand_in(resp)}; {stand_in(resp, RUNTIME_HEADER)}"
            break
        except Exception as e:
            code = error_code(e)
            waited = time.monotonic() - start
            if code in RETRY_CODES and waited < budget:
                if code == "ModelNotReadyException" and (retries == 0 or waited - told >= 30):
                    told = waited
                    emit("note", f"waiting for the model to warm up (ModelNotReadyException: Bedrock is loading it, "
                                 f"which can take minutes): {waited:.0f}s so far, retrying for up to {budget / 60:g} "
                                 "min (aws.cold_start_budget_minutes)")
                retries += 1
                sleep(min(delay, budget - waited))
                delay = min(delay * 2, 30.0)
                continue
            if code in RETRY_CODES:
                why = "the model may still be loading" if code == "ModelNotReadyException" else "requests are throttled"
                raise UserError(f"{code} after {waited:.0f}s of retries: {error_message(e)} ({why}); try again "
                                "later or raise aws.cold_start_budget_minutes") from e
            if code in ("ValidationException", "ResourceNotFoundException", "AccessDeniedException",
                        "ModelErrorException", "ModelTimeoutException"):
                raise UserError(f"InvokeModel failed: {code}: {error_message(e)}") from e
            raise
    out.update({"cold_start_retries": retries, "seconds": round(time.monotonic() - start, 3)})
    return out


def _stream(rt: Any, model_arn: str, body: str, on_text: Callable[[str], None] | None) -> tuple[dict, dict]:
    resp = rt.invoke_model_with_response_stream(modelId=model_arn, body=body, contentType="application/json",
                                                accept="application/json")
    pieces, chunks = [], []
    for event in resp["body"]:
        if "chunk" not in event:
            continue
        data = json.loads(event["chunk"]["bytes"])
        chunks.append(data)
        piece = chunk_text(data)
        if piece is None:  # a usage- or metrics-only chunk: nothing to print
            continue
        pieces.append(piece)
        if on_text:
            on_text(piece)
    return {"text": "".join(pieces), "chunks": chunks}, resp


def invoke_cli(cfg: Config, term: str | None = None, raw: str | None = None, model_arn: str | None = None,
               stream: bool = False, as_json: bool = False) -> dict:
    """termtune invoke: build the prompt, call the model, show the answer (termtune.events), and save
    <run>/invoke.json."""
    if term and raw:
        raise UserError("--term and --raw are exclusive: give a term (sent through data.prompt_template) or raw text")
    record = read_record(cfg)
    model_arn = model_arn or record.get("model_arn")
    if not model_arn:
        raise UserError(f"{RunLayout.of(cfg).deploy}: no imported model recorded; run termtune deploy, "
                        "or pass --model <imported model ARN>")
    prompt = raw if raw is not None else data.prompt_for(cfg.data.prompt_template, term or cfg.aws.invoke_prompt)
    show_piece = None if as_json else lambda piece: emit("text", piece)
    result = invoke(cfg, prompt, model_arn, stream=stream, on_text=show_piece)
    saved = {"model_arn": model_arn, "prompt": prompt, "request": request_body(cfg, prompt), "stream": stream,
             **result}
    write_json(RunLayout.of(cfg).invoke, saved)
    if as_json:
        emit("result", json.dumps(saved, indent=2))
    elif stream:
        emit("text", "\n")  # the streamed answer's line ends
    else:
        emit("result", result["text"])
    if result.get("local_stand_in") and not as_json:
        emit("note", f"model arn {model_arn} ({result['local_stand_in']})")
    return saved
