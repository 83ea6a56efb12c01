"""Qwen2 (Qwen2.5-0.5B-Instruct), Qwen3 (Qwen3-0.6B) and Mistral (Mistral-7B-Instruct-v0.3) through termtune's own
stages, each as a tiny random-init model of its family with its real tokenizer and chat template:

- the rows the data stage prepares train on the answer and its end-of-turn token only, behind exactly the prompt
  Bedrock's server renders for a `messages` request (Qwen3's empty thinking block, Qwen's newline after
  <|im_end|>, Mistral's [INST] turns);
- data -> TRL's SFTTrainer -> export -> validate and the transformers 4.51.3 check -> deploy -> invoke through
  real boto3 on termtune serve (moto for S3/IAM), in each format AWS offers the family: `messages`,
  `prompt` + `max_tokens`, and Converse for Mistral, which AWS refuses for Qwen3.

The export alone (token ids, greedy tokens and logits under 4.51.3 for each family, and the plain 5.x save that
both that comparison and `termtune validate` catch) is proven in test_decoder_export.py; the Llama run in
test_family_decoder.py.
"""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError

from aws_fixtures import aws_env, boto, bucket, moto_server  # noqa: F401  (fixtures)
from conftest import medquad_rows, write_jsonl
from test_decoder_export import FAMILIES, MODELS
from test_family_decoder import TINY_LLAMA, llama_overrides
from test_serve import code
from test_serve_decoder import N, greedy, invoke
from termtune.config import load_config

# What the chat template renders between the generation prompt and the answer, and after the end-of-turn token:
# Qwen3's template closes an empty thinking block in the last assistant turn (the prompt Bedrock renders for
# `messages` stops at "<|im_start|>assistant\n", so the model is trained to write that block itself); Qwen ends
# every turn with a newline after <|im_end|>, which carries no loss; Mistral's answer follows "[/INST]" after a
# space (its first token starts with "▁", which decoding drops).
BEFORE_ANSWER = {"qwen2": "", "qwen3": "<think>\n\n</think>\n\n", "mistral": ""}
AFTER_TURN = {"qwen2": "\n", "qwen3": "\n", "mistral": ""}
ARCHITECTURE = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}


@pytest.fixture
def family_cfg(tmp_path):
    def make(family: str, *extra: str, n_rows: int = 16):
        source = tmp_path / "terms.jsonl"
        if not source.exists():
            write_jsonl(source, medquad_rows(n_rows))
        # Qwen2 has no head_dim setting: hidden 64 over 4 heads gives it 16
        shape = {k: v for k, v in TINY_LLAMA.items() if not (family == "qwen2" and k == "head_dim")}
        return load_config(None, llama_overrides(tmp_path / "run", source, *extra, base=MODELS / FAMILIES[family][0],
                                                 shape=shape))

    return make


def prompt_and_answer(row: dict) -> tuple[list[int], list[int]]:
    """(the prompt's ids, the ids the loss is on) of a prepared row: a prompt and its answer's labels, or a whole
    conversation's ids with a completion_mask (termtune.conversations' form)."""
    if "completion_mask" in row:
        mask = row["completion_mask"]
        return row["input_ids"][:mask.index(1)], [i for i, m in zip(row["input_ids"], mask) if m]
    return row["input_ids"], row["labels"]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_prepared_rows_train_on_the_answer_behind_the_prompt_bedrock_renders(family_cfg, family):
    from termtune import pipeline
    from termtune.modeling import load_tokenizer

    cfg = family_cfg(family, "data.max_target_length=128")  # no answer cut short
    pipeline.run_stage(cfg, "data")
    tokenizer = load_tokenizer(cfg)
    end_of_turn = tokenizer.convert_tokens_to_ids(FAMILIES[family][3])
    rows = [json.loads(line) for line in (cfg.run_dir / "data" / "train.jsonl").read_text().splitlines()][:4]
    for row in rows:
        prompt, trained = prompt_and_answer(row)
        question = [{"role": "user", "content": row["prompt"]}]
        # what Bedrock's server tokenizes for a `messages` request asking this question
        assert prompt == tokenizer.apply_chat_template(question, add_generation_prompt=True, return_dict=False)
        assert tokenizer.decode(trained) == BEFORE_ANSWER[family] + row["target"] + FAMILIES[family][3]
        assert trained[-1] == end_of_turn
        # the answer's tokens are the template's own for the whole exchange, less what follows the end of turn
        exchange = tokenizer.apply_chat_template([*question, {"role": "assistant", "content": row["target"]}],
                                                 return_dict=False)
        assert exchange[:len(prompt) + len(trained)] == prompt + trained
        assert tokenizer.decode(exchange[len(prompt) + len(trained):]) == AFTER_TURN[family]


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_tiny_model_runs_through_trl_export_deploy_and_the_formats_bedrock_offers_it(
        family_cfg, family, aws_env, bucket):  # noqa: F811
    """Qwen3 and Mistral as the Llama run in test_family_decoder.py: every answer Bedrock's stand-in gives (under
    transformers 4.51.3) is the one the exported model gives in this process (transformers 5.x)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from termtune import pipeline

    aws_env()
    # untied: a tiny model whose output layer is its embeddings only repeats the prompt's last token
    cfg = family_cfg(family, "model.architecture_overrides.tie_word_embeddings=false", "data.test_size=4", "train.batch_size=4", "eval.batch_size=4", "eval.max_new_tokens=4",
                     "aws.deploy=true", f"aws.bucket={bucket}", f"aws.role_name=tt-{family}-role",
                     "aws.poll_seconds=0.1", f"aws.invoke_max_tokens={N}", "aws.invoke_prompt=Asthma")
    pipeline.run(cfg)
    result = json.loads((cfg.run_dir / "train" / "result.json").read_text())
    assert result["global_step"] == 3  # 12 training rows in batches of 4, on TRL's SFTTrainer

    artifact, base = cfg.run_dir / "artifact", MODELS / FAMILIES[family][0]
    config = json.loads((artifact / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE[family]] and config["torch_dtype"] == "float32"
    assert config["rope_theta"] == 1e6 and "rope_parameters" not in config
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    end_of_turn = tokenizer.convert_tokens_to_ids(FAMILIES[family][3])
    assert end_of_turn in json.loads((artifact / "generation_config.json").read_text())["eos_token_id"]
    if family == "mistral":  # SentencePiece: the base's tokenizer.model ships with the model
        assert (artifact / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    check = json.loads((artifact / "manifest.json").read_text())["bedrock_check"]
    assert check["status"] == "passed" and check["max_abs_logit_diff"] <= 1e-4 and check["tokens_differ"] == 0, check
    assert json.loads((cfg.run_dir / "validation.json").read_text())["ok"]

    model = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32).eval()
    question = "What is Asthma?"
    chat, chat_ids, _ = greedy(model, tokenizer, messages=[{"role": "user", "content": question}])
    plain, _, _ = greedy(model, tokenizer, prompt=question)
    assert chat.strip() and plain.strip(), "the model answers nothing: the comparisons below would prove little"

    # termtune invoke, the run's last stage, sent `messages`: the artifact carries a chat template
    invoked = json.loads((cfg.run_dir / "invoke.json").read_text())
    assert invoked["request"]["messages"] == [{"role": "user", "content": question}]
    assert invoked["text"] == chat and "transformers 4.51.3 in a worker" in invoked["local_stand_in"]

    rt, arn = boto("bedrock-runtime"), invoked["model_arn"]
    answer = invoke(rt, arn, {"messages": [{"role": "user", "content": question}], "max_tokens": N})
    assert answer["choices"][0]["message"]["content"] == chat
    assert answer["usage"]["prompt_tokens"] == len(chat_ids)  # the template applied once, by the server
    completion = invoke(rt, arn, {"prompt": question, "max_tokens": N})
    assert completion["choices"][0]["text"] == plain
    turn = [{"role": "user", "content": [{"text": question}]}]
    if family == "mistral":
        out = rt.converse(modelId=arn, messages=turn, inferenceConfig={"maxTokens": N})
        assert out["output"]["message"]["content"][0]["text"] == chat
    else:
        with pytest.raises(ClientError) as e:
            rt.converse(modelId=arn, messages=turn, inferenceConfig={"maxTokens": N})
        assert code(e) == "ValidationException" and "not supported for Qwen3 models" in str(e.value)
    assert boto("bedrock").get_imported_model(modelIdentifier=arn)["instructSupported"] is (family == "mistral")


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama", "mistral"])
def test_the_answer_a_model_is_trained_to_write_reads_back_as_the_target(family):
    """Decoded as evaluation decodes a generated answer, the answer tokens a row trains on read back as the row's
    target: for Qwen3, whose template opens every answer with an empty reasoning block, without that block."""
    from transformers import AutoTokenizer

    from termtune.chat_template import ChatTemplate
    from termtune.families import FAMILIES as ALL

    tokenizer = AutoTokenizer.from_pretrained(str(MODELS / FAMILIES[family][0]))
    target = "A chronic disease of the airways."
    rendered = ChatTemplate.of(tokenizer).render([{"role": "user", "content": "What is asthma?"},
                                                 {"role": "assistant", "content": target}])
    text = tokenizer.decode(rendered.ids[rendered.start:rendered.end], skip_special_tokens=True)
    assert ("<think>" in text) == (family == "qwen3")
    assert next(f for f in ALL if f.name == family).answer_text(text) == target
