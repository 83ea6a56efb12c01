"""The decoder-only families (termtune.families.llama) through the real stages: a tiny random-init Llama with the
real Llama 3.2 tokenizer (and chat template), and the real SmolLM2-135M-Instruct from its GGUF where `make models`
fetched it. Data -> TRL's SFTTrainer -> evaluate -> export (write_decoder) -> validate and the transformers 4.51.3
load check -> deploy and invoke against moto and termtune serve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aws_fixtures import aws_env, bucket, moto_server  # noqa: F401  (fixtures)
from conftest import REPO, SHARED, medquad_rows, write_jsonl
from termtune.config import load_config
from termtune.errors import UserError

LLAMA_DIR = SHARED / "models" / "llama-3.2-1b-instruct"
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
# 2 layers of hidden 64 (grouped-query attention, 4 heads over 2 key/value heads) on the real 128,256-token vocabulary
TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16}


def llama_overrides(run_dir: Path, source: Path, *extra: str, base: Path = LLAMA_DIR,
                    shape: dict = TINY_LLAMA) -> list[str]:
    """A random-init model of `base`'s family (the Llama 3.2 folder by default) at `shape`, with `base`'s real
    tokenizer."""
    return [f"run.dir={run_dir}", f"model.source={base}", "model.init=random",
            f"model.architecture={base / 'config.json'}", f"model.architecture_overrides={json.dumps(shape)}",
            f"data.source={source}", "data.target=first_n_sentences", "data.n_sentences=1", "data.test_size=8",
            "data.max_target_length=64", "lora.r=8", "lora.alpha=16", "lora.dropout=0.0", "train.epochs=1",
            "train.batch_size=8", "train.learning_rate=0.005", "train.save_steps=2", "train.logging_steps=1",
            "eval.max_new_tokens=8", "eval.batch_size=8", "export.dtype=fp32", "aws.deploy=false", *extra]


@pytest.fixture
def llama_cfg(tmp_path):
    def make(*extra: str, n_rows: int = 48, run: str = "run"):
        source = tmp_path / "terms.jsonl"
        if not source.exists():
            write_jsonl(source, medquad_rows(n_rows))
        return load_config(None, llama_overrides(tmp_path / run, source, *extra))

    return make


# ----------------------------------------------------------------------------- recognition and refusals


def test_decoder_configs_pick_their_family_and_unimportable_ones_are_refused_with_the_reason(tmp_path):
    from termtune.families import family_for, family_of

    for folder, name in (("llama-3.2-1b-instruct", "llama"), ("mistral-7b-instruct-v0.3", "mistral"),
                         ("qwen2.5-0.5b-instruct", "qwen2"), ("qwen3-0.6b", "qwen3")):
        config = json.loads((SHARED / "models" / folder / "config.json").read_text())
        assert family_of(config).name == name, folder
    for model_type, reason in (("gemma2", "does not accept Gemma 2"), ("gpt_oss", "needs transformers 4.55"),
                               ("phi3", "does not accept Phi-3")):
        arch = tmp_path / f"{model_type}.json"
        arch.write_text(json.dumps({"model_type": model_type, "architectures": ["X"]}))
        cfg = load_config(None, [f"run.dir={tmp_path / model_type}", "model.init=random",
                                 f"model.architecture={arch}", f"model.source={LLAMA_DIR}"])
        with pytest.raises(UserError, match=f"refused before training: .*{reason}"):
            family_for(cfg)


# ----------------------------------------------------------------------------- data: the loss is on the answer only


def test_prepared_rows_train_on_exactly_the_answer_and_its_end_of_turn_token(llama_cfg):
    from termtune import pipeline
    from termtune.data import load_split
    from termtune.families import family_for
    from termtune.modeling import load_tokenizer

    cfg = llama_cfg()
    pipeline.run_stage(cfg, "data")
    tokenizer = load_tokenizer(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "data" / "train.jsonl").read_text().splitlines()][:4]
    batch = family_for(cfg).collator(tokenizer, None)([{"input_ids": r["input_ids"], "labels": r["labels"]}
                                                       for r in rows])
    assert len(load_split(cfg, "train")) == 40
    for i, row in enumerate(rows):
        # the prompt is what a `messages` request renders before the model answers
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                               tokenize=False, date_string="26 Jul 2024")
        n_prompt = len(row["input_ids"])
        assert tokenizer.decode(batch["input_ids"][i, :n_prompt]) == prompt
        trained = batch["labels"][i][batch["labels"][i] != -100]
        assert tokenizer.decode(trained) == row["target"] + "<|eot_id|>"
        assert (batch["labels"][i, :n_prompt] == -100).all()
        assert int(batch["attention_mask"][i].sum()) == n_prompt + len(trained)
        answer = slice(n_prompt, n_prompt + len(trained))
        assert (batch["labels"][i, answer] == batch["input_ids"][i, answer]).all()


def test_an_over_long_prompt_keeps_its_generation_prompt_and_an_over_long_answer_its_end_of_turn(llama_cfg):
    from termtune import data
    from termtune.modeling import load_tokenizer

    cfg = llama_cfg("data.max_source_length=16", "data.max_target_length=8", n_rows=12)
    stats = data.prepare(cfg).stats
    tokenizer = load_tokenizer(cfg)
    eot, generation_prompt = tokenizer.convert_tokens_to_ids("<|eot_id|>"), \
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    rows = [json.loads(line) for split in ("train", "test")
            for line in (cfg.run_dir / "data" / f"{split}.jsonl").read_text().splitlines()]
    for row in rows:
        full = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                             date_string="26 Jul 2024")["input_ids"]
        # the bos token, then the prompt's last 15 tokens: the question's end and the generation prompt
        assert row["input_ids"] == [tokenizer.bos_token_id] + full[-15:]
        assert tokenizer.decode(row["input_ids"]).endswith("?<|eot_id|>" + generation_prompt)
        answer = tokenizer(row["target"], add_special_tokens=False)["input_ids"] + [eot]
        assert row["labels"] == (answer if len(answer) <= 8 else answer[:7] + [eot])
    assert stats["source_tokens"]["truncated_fraction"] == 1.0 and stats["target_tokens"]["truncated_fraction"] > 0
    assert (stats["source_kind"], stats["columns"]) == ("terms", {"term": "term", "definition": "definition"})


def test_a_chat_source_runs_through_data_train_and_evaluate(tmp_path):
    """The pipeline's stages read the rows the data stage writes from chat data: a system turn, multi-turn rows."""
    from termtune import pipeline
    from termtune.data import shape_target

    conversations = []
    for i, r in enumerate(medquad_rows(20, seed=1)):
        answer = shape_target(r["definition"], "first_n_sentences", 1)[:300]
        messages = [{"role": "user", "content": f"What is {r['term']}?"}, {"role": "assistant", "content": answer}]
        if i % 3 == 1:
            messages = [{"role": "system", "content": "Answer in one sentence."}] + messages
        if i % 3 == 2:
            messages += [{"role": "user", "content": "Say it more simply."},
                         {"role": "assistant", "content": f"In short: {answer}"}]
        conversations.append({"messages": messages})
    source = write_jsonl(tmp_path / "chat.jsonl", conversations)
    cfg = load_config(None, llama_overrides(tmp_path / "run", source, "data.max_rows=16", "data.test_size=4",
                                            "train.max_steps=2", "train.batch_size=4", "eval.max_new_tokens=4"))
    for stage in ("data", "train", "evaluate"):
        pipeline.run_stage(cfg, stage)
    stats = json.loads((cfg.run_dir / "data" / "stats.json").read_text())
    assert (stats["source_kind"], stats["rows_used"], stats["train_rows"], stats["test_rows"]) == \
        ("messages", 16, 12, 4)
    result = json.loads((cfg.run_dir / "train" / "result.json").read_text())
    assert result["global_step"] == 2
    # each held-out row evaluated: asked its last question, judged against its last answer, named by its first
    asked = {(c["messages"][-2]["content"], c["messages"][-1]["content"]):
             next(m["content"] for m in c["messages"] if m["role"] == "user") for c in conversations}
    predictions = [json.loads(line) for line in (cfg.run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4
    for p in predictions:
        assert asked[p["prompt"], p["reference"]] == p["term"] and isinstance(p["tuned"], str)


# ----------------------------------------------------------------------------- the whole run


def test_tiny_llama_runs_through_trl_export_4_51_3_check_deploy_and_invoke(
        llama_cfg, aws_env, bucket, capfd):  # noqa: F811
    from termtune import pipeline

    aws_env()
    cfg = llama_cfg("aws.deploy=true", f"aws.bucket={bucket}", "aws.role_name=tt-llama-role", "aws.poll_seconds=0.1",
                    "aws.invoke_max_tokens=8", "aws.invoke_prompt=Asthma")
    pipeline.run(cfg)
    out = capfd.readouterr().out
    for stage in ("data", "train", "evaluate", "export", "validate", "deploy", "invoke"):
        assert f"== {stage}\n" in out, stage

    # trained on TRL's SFTTrainer: its held-out pass logs its token accuracy on the answer tokens; the training
    # steps on a CPU take termtune's chunked loss, which makes no such line
    metrics = [json.loads(line) for line in (cfg.run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_mean_token_accuracy" in m for m in metrics)
    assert not any("mean_token_accuracy" in m for m in metrics if "loss" in m)
    result = json.loads((cfg.run_dir / "train" / "result.json").read_text())
    assert result["global_step"] == 5 and result["eval_loss"] < 12  # ln(128256) = 11.76: it learned something

    predictions = [json.loads(line) for line in (cfg.run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and any(p["tuned"] for p in predictions)

    artifact = cfg.run_dir / "artifact"
    config = json.loads((artifact / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"]["rope_type"] == "llama3"
    assert "rope_parameters" not in config and not (artifact / "chat_template.jinja").exists()
    assert json.loads((artifact / "tokenizer_config.json").read_text())["chat_template"]
    assert 128009 in json.loads((artifact / "generation_config.json").read_text())["eos_token_id"]
    check = json.loads((artifact / "manifest.json").read_text())["bedrock_check"]
    assert check["status"] == "passed" and check["max_abs_logit_diff"] <= 1e-4, check
    validation = json.loads((cfg.run_dir / "validation.json").read_text())
    assert validation["ok"], validation

    served = json.loads((cfg.run_dir / "invoke.json").read_text())
    assert served["text"].strip(), served


def test_validate_fails_a_plain_5x_save_of_the_same_decoder(llama_cfg, tmp_path):
    """The negative control: what transformers 5.x's save_pretrained writes for a Llama is refused by validate's
    decoder rules, each for what 4.51.3 would misread (RoPE settings, torch_dtype, tokenizer class and inputs)."""
    from termtune.families import family_for
    from termtune.families.base import base_model_dir, materialize_random_base
    from termtune.modeling import load_tokenizer
    from termtune.validate import validate
    from transformers import AutoModelForCausalLM

    cfg = llama_cfg()
    materialize_random_base(family_for(cfg), cfg)
    plain = tmp_path / "plain"
    AutoModelForCausalLM.from_pretrained(base_model_dir(cfg)).save_pretrained(plain)
    load_tokenizer(cfg).save_pretrained(plain)
    failed = {c.name: c.message for c in validate(plain) if c.failed}
    assert "rope_parameters" in failed["torch_dtype (transformers 4.51.3)"], failed
    assert "TokenizersBackend" in failed["tokenizer_config.json (transformers 4.51.3)"], failed


def test_rerun_is_up_to_date_and_a_resumed_training_ends_with_the_same_adapter(llama_cfg, capfd):
    from safetensors.torch import load_file

    from termtune import pipeline
    from termtune.train import train

    cfg = llama_cfg()
    for stage in ("data", "train"):
        pipeline.run_stage(cfg, stage)
    pipeline.run_stage(cfg, "train")
    assert "train: up to date" in capfd.readouterr().out

    # A run killed after step 4: its sealed checkpoint-4 is all that is left of training.
    resumed = llama_cfg(run="resumed")
    shutil.copytree(cfg.run_dir, resumed.run_dir)
    train_dir = resumed.run_dir / "train"
    for path in [train_dir / "result.json", train_dir / "adapter",
                 train_dir / "checkpoints" / "checkpoint-5"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = train(resumed)
    assert result.resumed_from and result.resumed_from.endswith("checkpoint-4") and result.global_step == 5
    a = load_file(str(cfg.run_dir / "train" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(train_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


# ----------------------------------------------------------------------------- a real model


@pytest.mark.skipif(not SMOLLM2.is_file(), reason="the SmolLM2 GGUF is fetched by `make models`")
def test_smollm2_from_its_gguf_trains_exports_in_bf16_and_loads_under_4_51_3_as_trained(tmp_path):
    from termtune import pipeline

    source = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(24))
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", f"model.source={SMOLLM2}", f"data.source={source}",
                             "data.target=first_n_sentences", "data.n_sentences=1", "data.test_size=4",
                             "data.max_target_length=48", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
                             "train.max_steps=2", "train.batch_size=4", "train.save_steps=10",
                             "eval.max_new_tokens=8", "eval.batch_size=4", "export.dtype=bf16", "aws.deploy=false"])
    for stage in ("data", "train", "evaluate", "export"):
        pipeline.run_stage(cfg, stage)
    artifact = cfg.run_dir / "artifact"
    config = json.loads((artifact / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "bfloat16"
    assert config["rope_theta"] == 100000.0 and "rope_parameters" not in config
    tokenizer_config = json.loads((artifact / "tokenizer_config.json").read_text())
    # 4.51.3's PreTrainedTokenizerFast would hand generate token_type_ids, which a LlamaForCausalLM refuses
    assert tokenizer_config["model_input_names"] == ["input_ids", "attention_mask"]
    # the bf16 weights as both versions read them, computed in fp32 on both sides: the same logits
    check = json.loads((artifact / "manifest.json").read_text())["bedrock_check"]
    assert check["status"] == "passed" and check["compute_dtype"] == "float32", check
    assert check["max_abs_logit_diff"] <= 1e-4 and check["tokens_differ"] == 0, check
    predictions = [json.loads(line) for line in (cfg.run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert all(p["base"] for p in predictions)  # an instruction-tuned model answers before any tuning


# ----------------------------------------------------------------------------- termtune plan


def test_plan_counts_the_parameters_and_lora_weights_the_model_has(llama_cfg):
    import torch

    from termtune.families import family_for
    from termtune.modeling import attach_lora, load_base
    from termtune.plan import model_shape

    for extra in ((), ("lora.target_modules=[q_proj, down_proj]", "lora.r=4")):
        cfg = llama_cfg(*extra, "model.architecture_overrides.tie_word_embeddings=false")
        shape = model_shape(cfg)
        counts = shape.parameter_counts()
        torch.manual_seed(0)
        model = attach_lora(cfg, load_base(cfg))
        assert counts["total"] == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        assert counts["lm_head"] == counts["embedding"] > 0
        assert shape.lora_parameters(cfg.lora.r, cfg.lora.target_modules) == \
            sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert family_for(cfg).name == "llama" and "Llama 2 layers, hidden 64" in shape.describe()
