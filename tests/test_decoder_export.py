"""Decoder export: Llama, Qwen2, Qwen3, Mistral (and Qwen3-MoE, Mixtral) folders that Bedrock's transformers
4.51.3 reads exactly as the model in memory (transformers 5.x) — and the plain 5.x save_pretrained that it
does not, which decoder_problems names.

Each model is random-initialised with tiny dimensions but the real tokenizer, vocabulary size, RoPE settings
and generation config of its published base (../shared/models/). All folders are read by one 4.51.3
subprocess; every comparison is in fp32.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import SHARED

MODELS = SHARED / "models"
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "head_dim": 16}
# family -> (base folder, model_type, extra config, the end-of-turn token its chat turns close with)
FAMILIES = {
    "llama": ("llama-3.2-1b-instruct", "llama", {}, "<|eot_id|>"),
    "qwen2": ("qwen2.5-0.5b-instruct", "qwen2", {}, "<|im_end|>"),
    "qwen3": ("qwen3-0.6b", "qwen3", {}, "<|im_end|>"),
    "mistral": ("mistral-7b-instruct-v0.3", "mistral", {}, "</s>"),
    "qwen3_moe": ("qwen3-0.6b", "qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                             "decoder_sparse_step": 1, "mlp_only_layers": []}, "<|im_end|>"),
    "mixtral": ("mistral-7b-instruct-v0.3", "mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, "</s>"),
    # GPTBigCode's own (StarCoder) tokenizer is not at hand: Qwen2.5's stands in for it.
    "gpt_bigcode": ("qwen2.5-0.5b-instruct", "gpt_bigcode", {"multi_query": True, "n_inner": 128}, "<|im_end|>"),
}
DENSE = ("llama", "qwen2", "qwen3", "mistral")
TEXTS = ["Hello world, 12345 tokens! 你好", "Paget's disease of bone: café-au-lait macules ... (rare)"]
CHAT = [{"role": "user", "content": "What is Dexamethasone suppression test?"}]
EXCHANGE = [*CHAT, {"role": "assistant", "content": "A test of how the adrenal glands respond."}]
TEMPLATE_KWARGS = {"date_string": "26 Jul 2024"}  # Llama 3.2's template prints today's date otherwise
NEW_TOKENS = 8

BEDROCK_SCRIPT = r"""
import json, sys
import torch, transformers
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

request, out = sys.argv[1:3]
req = json.load(open(request, encoding="utf-8"))
info, tensors = {"transformers": transformers.__version__}, {}
for name, job in req["folders"].items():
    folder, got = job["folder"], {}
    config = AutoConfig.from_pretrained(folder)
    got["config"] = {"rope_theta": getattr(config, "rope_theta", None), "rope_scaling": getattr(config, "rope_scaling", None),
                     "torch_dtype": str(config.torch_dtype), "num_experts": getattr(config, "num_experts", None)}
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        got["tokenizer"] = type(tok).__name__
        got["plain_ids"] = [tok(t)["input_ids"] for t in req["texts"]]
        got["chat_ids"] = [list(tok.apply_chat_template(c, tokenize=True, add_generation_prompt=g, **req["template_kwargs"]))
                           for c, g in ((req["chat"], True), (req["exchange"], False))]
    except Exception as e:
        got["tokenizer_error"] = f"{type(e).__name__}: {e}"
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype="auto").eval()
    except Exception as e:
        got["model_error"] = f"{type(e).__name__}: {e}"
        info[name] = got
        continue
    got["eos_token_id"] = model.generation_config.eos_token_id
    with torch.inference_mode():
        for i, prompt in enumerate(job["prompts"]):
            ids = torch.tensor([prompt])
            tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=req["new_tokens"],
                                    min_new_tokens=req["new_tokens"], do_sample=False, num_beams=1)
            tensors[f"{name}.tokens.{i}"] = tokens
            tensors[f"{name}.logits.{i}"] = model(torch.tensor([job["teacher"][i]])).logits.contiguous()
    info[name] = got
save_file(tensors, out)
print(json.dumps(info))
"""


def bedrock_python() -> str:
    """The transformers==4.51.3 interpreter; in CI its absence is a failure, not a skip."""
    from termtune.bedrock_check import bedrock_python as find

    python, why_not = find()
    if python is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why_not)
        pytest.skip(why_not)
    return str(python)


def tiny_model(family: str, seed: int = 0):
    """(model, tokenizer) as training leaves them: the base's config at tiny dimensions, random fp32 weights,
    the base's generation config and the real tokenizer."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base, model_type, extra, _ = FAMILIES[family]
    config = json.loads((MODELS / base / "config.json").read_text())
    config.pop("layer_types", None)  # recomputed for the tiny layer count
    if model_type == "gpt_bigcode":  # no RoPE and its own key names: only the vocabulary comes from the base
        config = {"vocab_size": config["vocab_size"], **{k: TINY[k] for k in ("num_hidden_layers", "hidden_size",
                                                                             "num_attention_heads")}}
    else:
        config.update(TINY)
    config.update(model_type=model_type, architectures=None, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](**config), dtype=torch.float32).eval()
    with torch.no_grad():  # spread the logits, so that greedy tokens are decided by clear margins
        model.get_output_embeddings().weight.mul_(30)
    model.generation_config = GenerationConfig.from_pretrained(MODELS / base)
    return model, AutoTokenizer.from_pretrained(MODELS / base)


def reference(model, tokenizer) -> dict:
    """What transformers 5.x computes: token ids, greedy tokens and fp32 logits on them."""
    import torch

    plain = [tokenizer(t)["input_ids"] for t in TEXTS]
    chat = [list(tokenizer.apply_chat_template(c, tokenize=True, add_generation_prompt=g, return_dict=False,
                                               **TEMPLATE_KWARGS))
            for c, g in ((CHAT, True), (EXCHANGE, False))]
    prompts, tokens, logits = [plain[0], chat[0]], [], []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1)
            tokens.append(out)
            logits.append(model(out[:, :-1]).logits)
    return {"plain_ids": plain, "chat_ids": chat, "prompts": prompts, "tokens": tokens, "logits": logits}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Per family: the 5.x reference, the write_decoder folder and a plain save_pretrained folder, all read
    under 4.51.3 in one subprocess -> {family: {"ref", "summary", "export", "plain", "v4": {...}}}."""
    import torch
    from safetensors.torch import load_file

    from termtune.families.decoder_export import write_decoder

    python = bedrock_python()
    root = tmp_path_factory.mktemp("decoders")
    cases, jobs = {}, {}
    for family in FAMILIES:
        model, tokenizer = tiny_model(family)
        ref = reference(model, tokenizer)
        plain, export = root / family / "plain", root / family / "export"
        model.save_pretrained(plain)
        tokenizer.save_pretrained(plain)
        export.mkdir(parents=True)
        summary = write_decoder(model, tokenizer, export, dtype="fp32")
        cases[family] = {"ref": ref, "summary": summary, "export": export, "plain": plain}
        teacher = [t[0, :-1].tolist() for t in ref["tokens"]]
        for kind, folder in (("export", export), ("plain", plain)):
            jobs[f"{family}.{kind}"] = {"folder": str(folder), "prompts": ref["prompts"], "teacher": teacher}
        if family == "qwen3":  # the default dtype too: written in bf16, computed in bf16 on both sides
            (root / family / "bf16").mkdir()
            write_decoder(model, tokenizer, root / family / "bf16", dtype="bf16")
            with torch.inference_mode():
                ref["bf16_logits"] = [model(t[:, :-1]).logits for t in ref["tokens"]]
            jobs[f"{family}.bf16"] = {"folder": str(root / family / "bf16"), "prompts": ref["prompts"],
                                      "teacher": teacher}
    request, out = root / "request.json", root / "out.safetensors"
    request.write_text(json.dumps({"folders": jobs, "texts": TEXTS, "chat": CHAT, "exchange": EXCHANGE,
                                   "template_kwargs": TEMPLATE_KWARGS, "new_tokens": NEW_TOKENS}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([python, "-I", "-c", BEDROCK_SCRIPT, str(request), str(out)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    info, tensors = json.loads(done.stdout.strip().splitlines()[-1]), load_file(out)
    assert info["transformers"] == "4.51.3"
    for name, got in info.items():
        if name != "transformers":
            family, kind = name.split(".")
            got["tokens"] = [tensors.get(f"{name}.tokens.{i}") for i in range(2)]
            got["logits"] = [tensors.get(f"{name}.logits.{i}") for i in range(2)]
            cases[family].setdefault("v4", {})[kind] = got
    return cases


def expected_rope(family: str) -> tuple[float, dict | None]:
    """rope_theta and rope_scaling as the published config.json states them (what 4.51.3 must read)."""
    config = json.loads((MODELS / FAMILIES[family][0] / "config.json").read_text())
    return float(config["rope_theta"]), config.get("rope_scaling")


@pytest.mark.parametrize("family", DENSE)
def test_export_reads_identically_in_transformers_4_51_3(folders, family):
    """Same token ids (plain and chat-templated), same greedy tokens, logits within 1e-4 in fp32, the
    published RoPE settings and torch_dtype."""
    import torch

    case = folders[family]
    ref, got = case["ref"], case["v4"]["export"]
    assert "tokenizer_error" not in got and "model_error" not in got, got
    assert got["plain_ids"] == ref["plain_ids"]
    assert got["chat_ids"] == ref["chat_ids"]
    for ref_tokens, tokens in zip(ref["tokens"], got["tokens"]):
        assert torch.equal(tokens, ref_tokens), "4.51.3 generates different greedy tokens"
    diff = max((a - b).abs().max().item() for a, b in zip(ref["logits"], got["logits"]))
    assert diff <= 1e-4, f"max |logit difference| {diff}"
    theta, scaling = expected_rope(family)
    assert got["config"]["rope_theta"] == theta
    assert got["config"]["rope_scaling"] == scaling
    assert got["config"]["torch_dtype"] == "torch.float32"


def test_llama_keeps_its_llama3_rope_scaling_in_transformers_4_51_3(folders):
    scaling = folders["llama"]["v4"]["export"]["config"]["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 32.0
    assert folders["llama"]["v4"]["export"]["config"]["rope_theta"] == 500000.0


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_stops_at_the_end_of_turn_token(folders, family):
    """generation_config.json's eos_token_id, as 4.51.3 reads it, holds the token chat turns end with."""
    from transformers import AutoTokenizer

    case = folders[family]
    token = FAMILIES[family][3]
    assert case["summary"]["end_of_turn"] == token
    token_id = AutoTokenizer.from_pretrained(MODELS / FAMILIES[family][0]).convert_tokens_to_ids(token)
    eos = case["v4"]["export"]["eos_token_id"]
    assert token_id in (eos if isinstance(eos, list) else [eos])


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_files_are_what_bedrock_reads(folders, family):
    """The chat template inside tokenizer_config.json and no .jinja; tokenizer.model exactly where the base
    tokenizer is SentencePiece (Mistral, Mixtral); a tokenizer class Bedrock lists; nothing decoder_problems flags."""
    from termtune.families.decoder_export import BEDROCK_TOKENIZER_CLASSES, decoder_problems

    export = folders[family]["export"]
    tokenizer_config = json.loads((export / "tokenizer_config.json").read_text())
    base = MODELS / FAMILIES[family][0]
    assert tokenizer_config["chat_template"] == json.loads((base / "tokenizer_config.json").read_text())["chat_template"]
    assert not (export / "chat_template.jinja").exists()
    assert tokenizer_config["tokenizer_class"] in BEDROCK_TOKENIZER_CLASSES
    loaded = folders[family]["v4"]["export"]["tokenizer"]  # 4.51.3 loads the fast variant of the class named
    assert loaded.removesuffix("Fast") == tokenizer_config["tokenizer_class"].removesuffix("Fast")
    if (base / "tokenizer.model").is_file():
        assert (export / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    else:
        assert not (export / "tokenizer.model").exists()
    assert decoder_problems(export) == []


def test_bf16_export_is_read_as_bf16_and_computes_like_the_bf16_model(folders):
    """The default dtype: 4.51.3 reads torch_dtype bfloat16, and computes what 5.x computes with the bf16 model."""
    import torch

    from termtune.bedrock_check import logit_tolerance

    case = folders["qwen3"]
    got = case["v4"]["bf16"]
    assert got["config"]["torch_dtype"] == "torch.bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in got["logits"])
    for ref_tokens, tokens in zip(case["ref"]["tokens"], got["tokens"]):
        assert torch.equal(tokens, ref_tokens)
    for ref_logits, logits in zip(case["ref"]["bf16_logits"], got["logits"]):
        diff = (ref_logits.float() - logits.float()).abs().max().item()
        assert diff <= logit_tolerance("bfloat16", ref_logits), diff


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_bigcode"])
def test_other_accepted_architectures_compute_identically(folders, family):
    """Qwen3-MoE (with its expert count under 4.51.3's key), Mixtral and GPTBigCode."""
    import torch

    case = folders[family]
    got = case["v4"]["export"]
    assert "model_error" not in got, got.get("model_error")
    if family == "qwen3_moe":
        assert got["config"]["num_experts"] == 4
        assert "num_experts" in json.loads((case["export"] / "config.json").read_text())
    for ref_tokens, tokens in zip(case["ref"]["tokens"], got["tokens"]):
        assert torch.equal(tokens, ref_tokens)
    diff = max((a - b).abs().max().item() for a, b in zip(case["ref"]["logits"], got["logits"]))
    assert diff <= 1e-4, f"max |logit difference| {diff}"


# ----------------------------------------------------------------------------- the negative control


@pytest.mark.parametrize("family", DENSE)
def test_a_plain_5x_save_is_read_differently_by_4_51_3_and_flagged(folders, family):
    """The hazard is real (else the tests above might check nothing): a plain 5.x save_pretrained of the same
    model loads in 4.51.3 with rope_theta 10000, no torch_dtype and other logits (and for most families a
    tokenizer that does not load); decoder_problems names each of these."""
    from termtune.families.decoder_export import decoder_problems

    case = folders[family]
    got = case["v4"]["plain"]
    theta, _ = expected_rope(family)
    assert got["config"]["rope_theta"] == 10000.0 != theta
    assert got["config"]["rope_scaling"] is None
    assert got["config"]["torch_dtype"] == "None"
    diff = max((a - b).abs().max().item() for a, b in zip(case["ref"]["logits"], got["logits"]))
    assert diff > 1e-3, f"the plain save computes like the model ({diff}): the RoPE hazard is not exercised"
    problems = "\n".join(decoder_problems(case["plain"]))
    assert "rope_parameters" in problems and f"instead of {int(theta)}" in problems
    assert "no torch_dtype" in problems
    assert "only in chat_template.jinja" in problems
    if family in ("llama", "mistral"):
        assert "tokenizer_error" in got and "TokenizersBackend" in got["tokenizer_error"]
        assert "tokenizer_class 'TokenizersBackend'" in problems
    if family in ("qwen2", "qwen3"):
        assert "tokenizer_error" in got and "keys" in got["tokenizer_error"]
        assert "extra_special_tokens as a list" in problems
    if family == "mistral":
        assert "tokenizer.model is missing" in problems


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_termtune_validate_refuses_a_plain_5x_save_for_each_thing_4_51_3_misreads(folders, family):
    """`termtune validate` on the same plain save (Llama's: test_family_decoder.py): its RoPE settings under
    rope_parameters and no torch_dtype; a tokenizer config 4.51.3 cannot load (Qwen's extra_special_tokens list,
    Mistral's TokenizersBackend class) with the chat template only in chat_template.jinja; for Mistral, no
    tokenizer.model. The folder termtune exported from the same model passes every rule."""
    from termtune.validate import validate

    failed = {c.name: c.message for c in validate(folders[family]["plain"]) if c.failed}
    theta, _ = expected_rope(family)
    config = failed["torch_dtype (transformers 4.51.3)"]
    assert "rope_parameters" in config and f"instead of {int(theta)}" in config and "no torch_dtype" in config
    tokenizer = failed["tokenizer_config.json (transformers 4.51.3)"]
    assert "only in chat_template.jinja" in tokenizer
    assert ("TokenizersBackend" if family == "mistral" else "extra_special_tokens as a list") in tokenizer
    assert ("tokenizer.model is missing" in failed["tokenizer files"]) if family == "mistral" else \
        "tokenizer files" not in failed
    exported = {c.name: c.message for c in validate(folders[family]["export"]) if c.failed}
    assert exported == {}


def test_plain_qwen3_moe_save_is_flagged_for_its_expert_count(folders):
    from termtune.families.decoder_export import decoder_problems

    assert "model_error" in folders["qwen3_moe"]["v4"]["plain"]  # 128 experts expected, 4 saved
    assert any("num_experts" in p and "num_local_experts" in p for p in decoder_problems(folders["qwen3_moe"]["plain"]))


def test_eos_without_the_end_of_turn_token_is_flagged(folders, tmp_path):
    """A Qwen base model's generation config stops only at <|endoftext|>; chat turns end with <|im_end|>."""
    import shutil

    from termtune.families.decoder_export import decoder_problems

    folder = tmp_path / "qwen2"
    shutil.copytree(folders["qwen2"]["export"], folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 151643}))
    assert decoder_problems(folder) == [
        "generation_config.json's eos_token_id [151643] lacks the end-of-turn token <|im_end|> (151645): "
        "Bedrock would generate past the end of the answer"]


def test_base_model_eos_gains_the_end_of_turn_token(tmp_path):
    """Exporting a model whose generation config lacks the end-of-turn token adds it."""
    from transformers import GenerationConfig

    from termtune.families.decoder_export import write_decoder

    model, tokenizer = tiny_model("qwen2")
    model.generation_config = GenerationConfig(eos_token_id=151643)
    summary = write_decoder(model, tokenizer, tmp_path, dtype="bf16")
    assert summary["eos_token_id"] == [151643, 151645]
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [151643, 151645]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and "rope_parameters" not in config


def test_sentencepiece_tokenizer_without_its_model_file_is_refused(tmp_path):
    """Mistral's tokenizer re-loaded from a folder without tokenizer.model: export says what is missing."""
    from transformers import AutoTokenizer

    from termtune.families.decoder_export import write_decoder
    from termtune.errors import UserError

    model, tokenizer = tiny_model("mistral")
    tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="SentencePiece-based.*tokenizer.model"):
        write_decoder(model, reloaded, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.safetensors")), "refused before the weights were written"


def test_export_refuses_a_folder_that_holds_anything(tmp_path):
    from termtune.families.decoder_export import write_decoder
    from termtune.errors import UserError

    model, tokenizer = tiny_model("qwen3")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty"):
        write_decoder(model, tokenizer, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_end_of_turn_of_a_chatml_template_is_im_end_not_the_eos_token():
    """SmolLM2-135M-Instruct's template (as published): its turns end with <|im_end|>, while its GGUF names
    <|endoftext|> as end of sequence."""
    from termtune.families.decoder_export import end_of_turn_token

    smollm2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
               "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}")
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert end_of_turn_token(smollm2, special, eos_token="<|endoftext|>") == "<|im_end|>"
    assert end_of_turn_token(None, special, eos_token="<|endoftext|>") == "<|endoftext|>"


def test_warnings_name_bedrocks_llama3_rope_override_and_a_context_above_128k(folders, tmp_path):
    """Llama 3.2 ships llama3 RoPE scaling with factor 32; Bedrock serves it with factor 8. Qwen's settings
    raise nothing; a context above 128K and a missing chat template are named."""
    import shutil

    from termtune.families.decoder_export import decoder_warnings

    (llama,) = decoder_warnings(folders["llama"]["export"])
    assert "Bedrock overrides llama3 RoPE scaling" in llama and "'factor': 32.0" in llama
    assert decoder_warnings(folders["qwen2"]["export"]) == []
    folder = tmp_path / "qwen2"
    shutil.copytree(folders["qwen2"]["export"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 262144}))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    del tokenizer_config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    context, template = decoder_warnings(folder)
    assert "max_position_embeddings 262144 is above Bedrock's 128K" in context
    assert "no chat_template" in template


def test_tokens_beyond_the_embedding_rows_are_flagged(folders, tmp_path):
    import shutil

    from termtune.families.decoder_export import decoder_problems

    folder = tmp_path / "qwen3"
    shutil.copytree(folders["qwen3"]["export"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 151665}))
    assert decoder_problems(folder) == [
        "the tokenizer has token ids up to 151668 but config.json's vocab_size is 151665: those tokens have no "
        "embedding row"]
