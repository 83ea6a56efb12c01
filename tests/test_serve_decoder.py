"""termtune serve with decoder-only imports (Llama 3.2, Qwen2.5, Mistral v0.3 and Qwen3 shaped), through
real boto3: the three invoke formats Bedrock documents, their streams, Converse where AWS offers it for the
family, and termtune invoke's body and answer parsing.

Each model is random-initialised at tiny dimensions with the real tokenizer, chat template and generation
config of its published base, written by termtune.families.decoder_export in fp32, imported through the stand-in and
run by it under Bedrock's transformers 4.51.3; every answer is compared with the greedy answer the same
model gives in this process (transformers 5.x).
"""

from __future__ import annotations

import json
import shutil

import pytest
from botocore.exceptions import ClientError

from aws_fixtures import wait
from test_decoder_export import FAMILIES, MODELS, TINY, bedrock_python
from test_serve import ROLE, clients, code
from termtune.serve import start_server

PROMPT = "What is asthma?"
CHAT = [{"role": "user", "content": PROMPT}]
N = 12


def tiny_untied(family: str, seed: int = 0):
    """(model, tokenizer): the base's config at tiny dimensions with an untied, spread-out lm_head, so that
    greedy answers vary token to token (a tiny tied model only repeats the prompt's last token)."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base, model_type, extra, _ = FAMILIES[family]
    config = json.loads((MODELS / base / "config.json").read_text())
    config.pop("layer_types", None)
    config.update(TINY, model_type=model_type, architectures=None, tie_word_embeddings=False, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](**config), dtype=torch.float32).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    model.generation_config = GenerationConfig.from_pretrained(MODELS / base)
    return model, AutoTokenizer.from_pretrained(MODELS / base)


def greedy(model, tokenizer, messages=None, prompt=None) -> tuple[str, list[int], bool]:
    """transformers 5.x in this process: (answer text, prompt ids, whether it ended at an eos id) for a
    prompt (tokenized as is) or a conversation (through the chat template)."""
    import torch

    if messages is not None:
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                            return_tensors="pt")
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    n = enc["input_ids"].shape[1]
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else eos
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=N, do_sample=False, num_beams=1)[0, n:].tolist()
    stopped = bool(out) and out[-1] in eos
    answer = tokenizer.decode(out[:-1] if stopped else out, skip_special_tokens=True)
    return answer, enc["input_ids"][0].tolist(), stopped


def end_turn_early(model, tokenizer, end_of_turn: str, after: int) -> None:
    """Make the chat answer end with the end-of-turn token after `after` tokens: its lm_head row becomes a
    slightly longer copy of the row of the answer's first token not seen before it, from that one on."""
    import torch

    enc = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=N, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    target = next(t for i, t in enumerate(out) if i >= after and t not in out[:i])
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        weight[tokenizer.convert_tokens_to_ids(end_of_turn)] = weight[target] * 1.05


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """{family: {"arn", "folder", "plain", "chat", ...}} for Llama (whose chat answer ends its turn after two
    tokens), Qwen2.5, Mistral (a SentencePiece tokenizer, shipped with its tokenizer.model; its chat answer
    ends at once) and Qwen3, and a Llama copy without
    a chat template; one server, models run under 4.51.3."""
    from termtune.families.decoder_export import write_decoder

    python = bedrock_python()
    root = tmp_path_factory.mktemp("s3root")
    cases = {}
    for family in ("llama", "qwen2", "mistral", "qwen3"):
        model, tokenizer = tiny_untied(family)
        if family in ("llama", "mistral"):  # Llama's chat answer ends its turn after two tokens, Mistral's at once
            end_turn_early(model, tokenizer, FAMILIES[family][3], after=2 if family == "llama" else 0)
        folder = root / "b-1" / family
        folder.mkdir(parents=True)
        write_decoder(model, tokenizer, folder, dtype="fp32")
        cases[family] = {"folder": folder, "plain": greedy(model, tokenizer, prompt=PROMPT),
                         "chat": greedy(model, tokenizer, messages=CHAT),
                         "system": greedy(model, tokenizer, messages=[{"role": "system", "content": "Be brief."},
                                                                      *CHAT])}
    plain = root / "b-1" / "llama-no-template"
    shutil.copytree(root / "b-1" / "llama", plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    cases["llama-no-template"] = {"folder": plain}

    with pytest.MonkeyPatch.context() as env:
        env.setenv("TERMTUNE_BEDROCK_PYTHON", python)
        server, url = start_server(local_root=root, import_delay_seconds=0.0, runtime="worker", model_quota=5)
    br, rt = clients(url)
    for name, case in cases.items():
        job = wait(br, br.create_model_import_job(jobName=name, importedModelName=name, roleArn=ROLE,
                                                  modelDataSource={"s3DataSource": {"s3Uri": f"s3://b-1/{name}/"}})[
            "jobArn"])
        assert job["status"] == "Completed", job.get("failureMessage")
        case["arn"] = job["importedModelArn"]
    yield {"url": url, "br": br, "rt": rt, **cases}
    server.stop()


def invoke(rt, arn: str, body: dict) -> dict:
    return json.loads(rt.invoke_model(modelId=arn, body=json.dumps(body))["body"].read())


def stream(rt, arn: str, body: dict) -> list[dict]:
    resp = rt.invoke_model_with_response_stream(modelId=arn, body=json.dumps(body))
    return [json.loads(e["chunk"]["bytes"]) for e in resp["body"]]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_each_invoke_format_answers_as_the_model_does_in_memory(served, family):
    """prompt + max_gen_len -> generation; prompt + max_tokens -> choices[0].text; messages ->
    choices[0].message (the chat template applied once, by the server): each the new tokens only, as the
    model in memory answers, ended at the generation config's eos ids (Llama's chat answer ends its turn)."""
    case, rt = served[family], served["rt"]
    (plain, plain_ids, plain_stopped), (chat, chat_ids, chat_stopped) = case["plain"], case["chat"]
    assert len(set(plain)) >= 5, "the model answers too little for the comparison to prove much"

    bedrock = invoke(rt, case["arn"], {"prompt": PROMPT, "max_gen_len": N})
    assert bedrock["generation"] == plain and bedrock["prompt_token_count"] == len(plain_ids)
    assert bedrock["stop_reason"] == ("stop" if plain_stopped else "length")
    completion = invoke(rt, case["arn"], {"prompt": PROMPT, "max_tokens": N, "temperature": 0})
    assert completion["object"] == "text_completion" and completion["choices"][0]["text"] == plain

    answer = invoke(rt, case["arn"], {"messages": CHAT, "max_tokens": N})
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": chat}
    assert answer["usage"]["prompt_tokens"] == len(chat_ids)  # the template once: no second BOS or header
    assert answer["choices"][0]["finish_reason"] == ("stop" if chat_stopped else "length")
    if family == "llama":  # <|eot_id|> ended the turn after two tokens
        assert chat_stopped and answer["choices"][0]["finish_reason"] == "stop"
        assert answer["usage"]["completion_tokens"] == 2 and chat
    parts = invoke(rt, case["arn"], {"messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
                                     "max_tokens": N})
    assert parts["choices"][0]["message"]["content"] == chat


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streams_come_in_each_formats_shape(served, family):
    case, rt = served[family], served["rt"]
    for body, text_of in (({"prompt": PROMPT, "max_gen_len": N}, lambda c: c["generation"]),
                          ({"prompt": PROMPT, "max_tokens": N}, lambda c: c["choices"][0]["text"]),
                          ({"messages": CHAT, "max_tokens": N}, lambda c: c["choices"][0]["delta"]["content"])):
        whole = invoke(served["rt"], case["arn"], body)
        chunks = stream(rt, case["arn"], body)
        assert set(chunks[-1]) == {"amazon-bedrock-invocationMetrics"}
        texts = chunks[:-1]
        assert len(texts) >= 2
        if "messages" in body:
            assert {c["object"] for c in texts} == {"chat.completion.chunk"} and len({c["id"] for c in texts}) == 1
            assert texts[0]["choices"][0]["delta"]["role"] == "assistant"
            assert texts[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
            assert "".join(text_of(c) for c in texts) == whole["choices"][0]["message"]["content"]
        else:
            assert "".join(text_of(c) for c in texts) == (whole.get("generation") or whole["choices"][0]["text"])


def test_converse_answers_llama_and_mistral_and_is_refused_for_qwen(served):
    """Converse (and ConverseStream) for Llama and Mistral: the chat template's answer in Converse's shapes, a
    system block as the system turn; for Qwen2.5 and Qwen3 a ValidationException, as AWS documents.
    GetImportedModel's instructSupported says which."""
    rt, br, llama = served["rt"], served["br"], served["llama"]
    chat, chat_ids, _ = llama["chat"]
    turn = [{"role": "user", "content": [{"text": PROMPT}]}]
    out = rt.converse(modelId=llama["arn"], messages=turn, inferenceConfig={"maxTokens": N, "temperature": 0})
    assert out["output"]["message"] == {"role": "assistant", "content": [{"text": chat}]}
    assert out["stopReason"] == "end_turn" and out["usage"]["inputTokens"] == len(chat_ids)
    assert out["usage"]["outputTokens"] == 2

    system = rt.converse(modelId=llama["arn"], messages=turn, system=[{"text": "Be brief."}],
                         inferenceConfig={"maxTokens": N})
    assert system["output"]["message"]["content"][0]["text"] == llama["system"][0]
    assert system["usage"]["inputTokens"] == len(llama["system"][1])

    events = list(rt.converse_stream(modelId=llama["arn"], messages=turn, inferenceConfig={"maxTokens": N})["stream"])
    assert events[0] == {"messageStart": {"role": "assistant"}}
    assert "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e) == chat
    assert {"messageStop": {"stopReason": "end_turn"}} in events
    assert events[-1]["metadata"]["usage"] == out["usage"]

    mistral = rt.converse(modelId=served["mistral"]["arn"], messages=turn, inferenceConfig={"maxTokens": N})
    assert mistral["output"]["message"]["content"][0]["text"] == served["mistral"]["chat"][0]

    for family, name in (("qwen2", "Qwen2.5"), ("qwen3", "Qwen3")):
        for call in (rt.converse, rt.converse_stream):
            with pytest.raises(ClientError) as e:
                call(modelId=served[family]["arn"], messages=turn)
            assert code(e) == "ValidationException" and f"not supported for {name} models" in str(e.value)
    supported = {family: br.get_imported_model(modelIdentifier=served[family]["arn"])["instructSupported"]
                 for family in ("llama", "mistral", "qwen2", "qwen3")}
    assert supported == {"llama": True, "mistral": True, "qwen2": False, "qwen3": False}


def test_a_chat_stream_of_no_tokens_still_says_why_it_ended(served):
    """Mistral's chat answer ends its turn at once: the stream still sends one (empty) delta with its
    finish_reason before the metrics."""
    chat, _, stopped = served["mistral"]["chat"]
    assert chat == "" and stopped
    chunks = stream(served["rt"], served["mistral"]["arn"], {"messages": CHAT, "max_tokens": N})
    assert [c["choices"][0] for c in chunks[:-1]] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]
    assert set(chunks[-1]) == {"amazon-bedrock-invocationMetrics"}


def test_messages_and_converse_need_a_chat_template_in_tokenizer_config(served):
    rt, br, case = served["rt"], served["br"], served["llama-no-template"]
    with pytest.raises(ClientError) as e:
        invoke(rt, case["arn"], {"messages": CHAT, "max_tokens": N})
    assert code(e) == "ValidationException" and "no chat_template" in str(e.value)
    with pytest.raises(ClientError) as e:
        rt.converse(modelId=case["arn"], messages=[{"role": "user", "content": [{"text": PROMPT}]}])
    assert code(e) == "ValidationException" and "doesn't support the model" in str(e.value)
    assert br.get_imported_model(modelIdentifier=case["arn"])["instructSupported"] is False


@pytest.mark.parametrize("body,why", [
    ({"messages": [], "max_tokens": 4}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0] needs a role"),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages[0] needs a role"),
    ({"messages": CHAT, "prompt": PROMPT}, "not both"),
])
def test_malformed_messages_are_validation_errors(served, body, why):
    with pytest.raises(ClientError) as e:
        invoke(served["rt"], served["llama"]["arn"], body)
    assert code(e) == "ValidationException" and why in str(e.value)


@pytest.mark.parametrize("extra,why", [
    ({"messages": [{"role": "user", "content": [{"image": {"format": "png", "source": {"bytes": b"x"}}}]}]},
     "reads text content blocks only"),
    ({"inferenceConfig": {"stopSequences": ["."]}}, "does not support stopSequences"),
    ({"toolConfig": {"tools": [{"toolSpec": {"name": "t", "inputSchema": {"json": {}}}}]}}, "does not support "
                                                                                          "toolConfig"),
    ({"inferenceConfig": {"maxTokens": 5000}}, "between 1 and 4096"),
])
def test_converse_refuses_what_the_stand_in_does_not_implement_by_name(served, extra, why):
    request = {"modelId": served["llama"]["arn"], "messages": [{"role": "user", "content": [{"text": PROMPT}]}],
               **extra}
    with pytest.raises(ClientError) as e:
        served["rt"].converse(**request)
    assert code(e) == "ValidationException" and why in str(e.value)


def test_termtune_invoke_sends_messages_to_a_chat_model_and_prompt_otherwise(served, tmp_path, monkeypatch):
    """aws.invoke_schema auto: messages when the run's artifact has a chat template (the answer is the chat
    template's), max_tokens when it has none; either answer is read back."""
    from termtune.aws.runtime import invoke_cli
    from termtune.config import load_config
    from termtune.local import aws_variables

    for key, value in aws_variables(bedrock_url=served["url"], credentials={
            "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}).items():
        monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value)
    for name, expected, schema in (("llama", served["llama"]["chat"][0], "messages"),
                                   ("llama-no-template", served["llama"]["plain"][0], "max_tokens")):
        cfg = load_config(None, [f"run.dir={tmp_path / name}", f"export.dir={served[name]['folder']}",
                                 f"aws.invoke_max_tokens={N}"])
        saved = invoke_cli(cfg, raw=PROMPT, model_arn=served[name]["arn"], as_json=True)
        assert schema in saved["request"] and saved["text"] == expected
        if schema == "messages":
            assert saved["request"]["messages"] == CHAT and saved["response"]["object"] == "chat.completion"
        streamed = invoke_cli(cfg, raw=PROMPT, model_arn=served[name]["arn"], stream=True, as_json=True)
        assert streamed["text"] == expected


@pytest.mark.parametrize("body,text", [
    ({"generation": "g", "choices": [{"text": "c"}]}, "g"),
    ({"choices": [{"index": 0, "message": {"role": "assistant", "content": "m"}, "text": "t"}]}, "m"),
    ({"choices": [{"index": 0, "delta": {"content": "d"}}]}, "d"),
    ({"choices": [{"index": 0, "text": "t"}]}, "t"),
    ({"outputs": [{"text": "o", "stop_reason": None}]}, "o"),  # Mistral-type imports before November 2025
    ({"text": "x"}, "x"),  # Qwen2-type imports before November 2025
    ({"choices": [{"message": {"content": None}}], "outputs": [{"text": "o"}]}, "o"),
    ({"choices": "not a list", "text": "x"}, "x"),
    ({"amazon-bedrock-invocationMetrics": {"inputTokenCount": 3}}, None),
])
def test_invoke_reads_every_answer_shape_in_order(body, text):
    from termtune.aws.runtime import chunk_text

    assert chunk_text(body) == text


def test_qwen2_is_told_from_qwen2_5_by_its_added_tokens(tmp_path):
    """Both are Qwen2ForCausalLM; Converse serves Qwen2 but not Qwen2.5, whose tokenizer adds
    <|fim_prefix|>, <|vision_start|>, <tool_call> and more to Qwen2's three special tokens."""
    from termtune.serve_rules import converse_problem

    qwen2 = [{"id": 151643 + i, "content": t, "special": True} for i, t in enumerate(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))]
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": qwen2}))
    assert converse_problem(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [
        *qwen2, {"id": 151657, "content": "<tool_call>", "special": False}]}))
    assert converse_problem(tmp_path) == "the Converse API is not supported for Qwen2.5 models"
