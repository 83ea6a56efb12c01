"""Mixtral, Qwen3-MoE and GPTBigCode (termtune.families.other_decoders): validated and exported, not trained.

Each is a tiny random-init model (2 layers, hidden 64; the mixtures with 4 experts, 2 per token) with a real
tokenizer: Mistral v0.3's for Mixtral (SentencePiece, so tokenizer.model travels), Qwen3's for Qwen3-MoE, and for
GPTBigCode a byte-level BPE tokenizer of StarCoder's shape (GPT2Tokenizer, <|endoftext|> as id 0, no chat
template), trained here on MedQuAD definitions, as no GPT-2-style tokenizer is at hand. termtune's export of each
(decoder_export.write_decoder) loads under transformers 4.51.3 as the model in memory (termtune.bedrock_check:
fp32 logits within 1e-4, the same greedy tokens); `validate` passes it and fails broken copies; what a plain 5.x
save_pretrained writes is caught where it differs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import SHARED, medquad_rows, write_jsonl
from termtune.config import load_config
from termtune.errors import UserError
from test_decoder_export import bedrock_python

MODELS = SHARED / "models"
ATTENTION = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16}
# family -> (the published base whose config and tokenizer the tiny model takes, its mixture of experts)
MIXTURES = {
    "mixtral": ("mistral-7b-instruct-v0.3", {"intermediate_size": 64, "num_local_experts": 4,
                                             "num_experts_per_tok": 2}),
    # layer 0 dense (mlp_only_layers), layer 1 sparse: both kinds of layer 4.51.3 builds
    "qwen3_moe": ("qwen3-0.6b", {"intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 4,
                                 "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [0]}),
}
GPT_BIGCODE = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "n_positions": 256, "multi_query": True}
FAMILIES = (*MIXTURES, "gpt_bigcode")
END_OF_TEXT = "<|endoftext|>"


def starcoder_shaped_tokenizer(folder: Path) -> Path:
    """A base model's tokenizer folder as StarCoder's Hub snapshot has it: vocab.json, merges.txt,
    tokenizer.json and a 4.x tokenizer_config.json naming GPT2Tokenizer, <|endoftext|> at id 0, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([r["definition"] for r in medquad_rows(300)], trainer)
    folder.mkdir(parents=True)
    bpe.save(str(folder / "tokenizer.json"))
    bpe.model.save(str(folder))  # vocab.json, merges.txt
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT,
        "unk_token": END_OF_TEXT, "add_prefix_space": False, "model_max_length": 8192}))
    return folder


def tiny_model(family: str, root: Path):
    """(model, tokenizer) as a merge leaves them: random fp32 weights, the base's generation config and tokenizer."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if family == "gpt_bigcode":
        base = starcoder_shaped_tokenizer(root / "starcoder-shaped")
        tokenizer = AutoTokenizer.from_pretrained(base)
        eos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        config = CONFIG_MAPPING["gpt_bigcode"](vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos,
                                               **GPT_BIGCODE)
        generation = GenerationConfig(bos_token_id=eos, eos_token_id=eos)
    else:
        folder, experts = MIXTURES[family]
        values = json.loads((MODELS / folder / "config.json").read_text())
        values.pop("layer_types", None)  # recomputed for the tiny layer count
        values.update(ATTENTION, **experts, model_type=family, architectures=None)
        config = CONFIG_MAPPING[family](**values)
        tokenizer = AutoTokenizer.from_pretrained(MODELS / folder)
        generation = GenerationConfig.from_pretrained(MODELS / folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # spread the logits, so that greedy tokens are decided by clear margins
        model.get_output_embeddings().weight.mul_(30)
    model.generation_config = generation
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as termtune loads a tokenizer (base.load_tokenizer)
    return model, tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Per family: termtune's export (checked under 4.51.3 against the model where Bedrock's interpreter is), a
    plain 5.x save_pretrained, and for the mixtures a 5.x save of the experts fused as 5.x holds them in memory
    (save_original_format=False)."""
    from termtune.bedrock_check import check_artifact, probe_prompts
    from termtune.families.decoder_export import write_decoder

    root = tmp_path_factory.mktemp("other-decoders")
    cases = {}
    for family in FAMILIES:
        model, tokenizer = tiny_model(family, root / family)
        case = {name: root / family / name for name in ("export", "plain", "fused")}
        model.save_pretrained(case["plain"])
        tokenizer.save_pretrained(case["plain"])
        if family in MIXTURES:
            model.save_pretrained(case["fused"], save_original_format=False)
        case["export"].mkdir()
        case["summary"] = write_decoder(model, tokenizer, case["export"], dtype="fp32")
        case["check"] = check_artifact(case["export"], reference=(model, tokenizer, probe_prompts()))
        cases[family] = case
    return cases


def failed_checks(folder: Path) -> dict[str, str]:
    from termtune.validate import validate

    return {c.name: c.message for c in validate(folder) if c.failed}


# ----------------------------------------------------------------------------- the export


@pytest.mark.parametrize("family", FAMILIES)
def test_export_computes_under_transformers_4_51_3_what_the_model_computes(folders, family):
    bedrock_python()  # skips (or, in CI, fails) without Bedrock's interpreter
    check = folders[family]["check"]
    assert check["status"] == "passed", check["message"]
    assert check["transformers"] == "4.51.3" and check["dtype"] == "float32"
    assert check["max_abs_logit_diff"] <= 1e-4 and check["tokens_differ"] == 0, check


@pytest.mark.parametrize("family", FAMILIES)
def test_validate_passes_the_export_with_the_family_tensor_table(folders, family):
    from termtune.families import family_of
    from termtune.validate import validate

    export = folders[family]["export"]
    config = json.loads((export / "config.json").read_text())
    assert family_of(config).name == family
    checks = {c.name: c for c in validate(export)}
    assert not [c for c in checks.values() if c.failed], [c.message for c in checks.values() if c.failed]
    tensors = checks["tensor set and shapes"].message
    expected = {  # per layer: attention, router, experts' projections, norms; then embeddings, final norm, lm_head
        "mixtral": 2 * (4 + 1 + 4 * 3 + 2) + 3,
        "qwen3_moe": (4 + 2 + 3 + 2) + (4 + 2 + 1 + 4 * 3 + 2) + 2,  # q/k norms; dense layer 0; tied lm_head
        "gpt_bigcode": 2 * (4 * 2 + 2 * 2) + 4,  # 4 linear layers and 2 LayerNorms, each with a bias; wte wpe ln_f
    }[family]
    assert tensors == f"all {expected} tensors config.json implies, each of the shape it implies"
    if family in MIXTURES:
        assert "4 experts, 2 per token" in checks["head count"].message
    if family == "qwen3_moe":  # 4.51.3's key for the expert count, as decoder_export writes it
        assert config["num_experts"] == 4 and "num_local_experts" not in config
    if family == "mixtral":  # a SentencePiece tokenizer: its tokenizer.model travels
        published = MODELS / MIXTURES[family][0] / "tokenizer.model"
        assert (export / "tokenizer.model").read_bytes() == published.read_bytes()
    if family == "gpt_bigcode":  # tied to wte, no chat template: prompt formats only (a warning, not a failure)
        assert "lm_head.weight" not in checks["tensor set and shapes"].message
        assert checks["tokenizer_config.json (transformers 4.51.3)"].warning
        assert folders[family]["summary"]["end_of_turn"] == END_OF_TEXT


# ----------------------------------------------------------------------------- broken copies


def broken_copy(source: Path, folder: Path, config: dict | None = None, drop: str | None = None) -> Path:
    """A copy of `source` with config.json keys changed (None removes a key) or one tensor removed."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    values = json.loads((folder / "config.json").read_text())
    for key, value in (config or {}).items():
        values.pop(key) if value is None else values.__setitem__(key, value)
    (folder / "config.json").write_text(json.dumps(values))
    if drop:
        tensors = load_file(folder / "model.safetensors")
        del tensors[drop]
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


BROKEN = {
    "mixtral, an expert's tensor missing": (
        "mixtral", {}, "model.layers.1.block_sparse_moe.experts.3.w2.weight",
        {"tensor set and shapes": "lacks 1 tensor that config.json implies (e.g. "
                                  "model.layers.1.block_sparse_moe.experts.3.w2.weight)"}),
    "mixtral, intermediate_size not the experts'": (
        "mixtral", {"intermediate_size": 96}, None,
        {"tensor set and shapes": "24 tensors of a shape config.json does not imply (e.g. model.layers."}),
    "qwen3_moe, the expert count under 5.x's key": (
        "qwen3_moe", {"num_local_experts": 4, "num_experts": None}, None,
        {"torch_dtype (transformers 4.51.3)": "config.json has no num_experts (4.51.3's expert count; 5.x wrote it "
                                              "as num_local_experts)",
         "tensor set and shapes": "lacks 372 tensors that config.json implies"}),
    "qwen3_moe, layer 0 sparse by its config but dense in the weights": (
        "qwen3_moe", {"mlp_only_layers": []}, None,
        {"tensor set and shapes": "lacks 13 tensors that config.json implies (e.g. model.layers.0.mlp.gate.weight)"}),
    "gpt_bigcode, a bias missing": (
        "gpt_bigcode", {}, "transformer.h.1.mlp.c_fc.bias",
        {"tensor set and shapes": "lacks 1 tensor that config.json implies (e.g. transformer.h.1.mlp.c_fc.bias)"}),
    "gpt_bigcode, multi_query off while the weights hold one key/value head": (
        "gpt_bigcode", {"multi_query": False}, None,
        {"tensor set and shapes": "4 tensors of a shape config.json does not imply (e.g. transformer.h."}),
}


@pytest.mark.parametrize("case", BROKEN)
def test_validate_fails_a_broken_copy_naming_what_is_wrong(folders, tmp_path, case):
    family, config, drop, expected = BROKEN[case]
    failed = failed_checks(broken_copy(folders[family]["export"], tmp_path / "broken", config, drop))
    assert set(failed) == set(expected), failed
    for name, words in expected.items():
        assert words in failed[name], failed[name]


# ----------------------------------------------------------------------------- what 5.x writes


def test_a_plain_5x_save_is_caught_where_4_51_3_would_misread_it(folders):
    """Mixtral: RoPE under rope_parameters, dtype not torch_dtype, tokenizer class TokenizersBackend, no
    tokenizer.model. Qwen3-MoE: the expert count under num_local_experts, so 4.51.3 expects 128 experts' tensors.
    GPTBigCode (no RoPE): no torch_dtype."""
    mixtral = failed_checks(folders["mixtral"]["plain"])
    assert "rope_parameters" in mixtral["torch_dtype (transformers 4.51.3)"]
    assert "no torch_dtype" in mixtral["torch_dtype (transformers 4.51.3)"]
    assert "TokenizersBackend" in mixtral["tokenizer_config.json (transformers 4.51.3)"]
    assert "tokenizer.model is missing" in mixtral["tokenizer files"]

    qwen3_moe = failed_checks(folders["qwen3_moe"]["plain"])
    assert "5.x wrote it as num_local_experts" in qwen3_moe["torch_dtype (transformers 4.51.3)"]
    assert "lacks 372 tensors" in qwen3_moe["tensor set and shapes"]
    assert "extra_special_tokens as a list" in qwen3_moe["tokenizer_config.json (transformers 4.51.3)"]

    gpt_bigcode = failed_checks(folders["gpt_bigcode"]["plain"])
    assert set(gpt_bigcode) == {"torch_dtype (transformers 4.51.3)"}, gpt_bigcode
    assert "no torch_dtype" in gpt_bigcode["torch_dtype (transformers 4.51.3)"]


@pytest.mark.parametrize("family", MIXTURES)
def test_fused_experts_as_5x_holds_them_are_caught(folders, family):
    """save_pretrained(save_original_format=False) writes each layer's experts as one 3-D tensor, which 4.51.3
    skips, running random experts in their place with no error: the tensor table names the per-expert tensors
    the folder lacks and the fused ones 4.51.3 does not know."""
    message = failed_checks(folders[family]["fused"])["tensor set and shapes"]
    assert "lacks" in message and "not in the model config.json describes" in message
    assert "experts.gate_up_proj" in message or "experts.down_proj" in message, message


# ----------------------------------------------------------------------------- training


def architecture_file(tmp_path: Path, family: str) -> Path:
    """The tiny model's config.json, as model.architecture (model.init=random) takes it."""
    values = ({"model_type": "gpt_bigcode", "vocab_size": 512, **GPT_BIGCODE} if family == "gpt_bigcode" else
              {**json.loads((MODELS / MIXTURES[family][0] / "config.json").read_text()), **ATTENTION,
               **MIXTURES[family][1], "model_type": family})
    values.pop("layer_types", None)
    path = tmp_path / f"{family}.json"
    path.write_text(json.dumps(values))
    return path


def tiny_run(tmp_path: Path, family: str, *extra: str):
    base = MODELS / (MIXTURES[family][0] if family in MIXTURES else "qwen3-0.6b")
    source = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(32))
    return load_config(None, [
        f"run.dir={tmp_path / 'run'}", f"model.source={base}", "model.init=random",
        f"model.architecture={architecture_file(tmp_path, family)}", f"data.source={source}",
        "data.target=first_n_sentences", "data.n_sentences=1", "data.test_size=4", "data.max_target_length=48",
        "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "train.max_steps=3", "train.batch_size=4",
        "train.save_steps=10", "eval.max_new_tokens=4", "eval.batch_size=4", "export.dtype=fp32",
        "aws.deploy=false", *extra])


# per family: (an expert's projection, the router) as 4.51.3 names them in the export
EXPERT_TENSORS = {"mixtral": ("model.layers.1.block_sparse_moe.experts.0.w1.weight",
                              "model.layers.1.block_sparse_moe.gate.weight"),
                  "qwen3_moe": ("model.layers.1.mlp.experts.0.gate_proj.weight", "model.layers.1.mlp.gate.weight")}


@pytest.mark.parametrize("family", MIXTURES)
def test_a_mixture_of_experts_trains_its_experts_and_exports_what_4_51_3_reads_as_trained(tmp_path, family):
    """TRL with LoRA all-linear adapts the attention, the router and the (fused) experts; the merged experts are
    exported per expert under 4.51.3's names, and 4.51.3 computes what the merged model computes."""
    from safetensors.torch import load_file

    from termtune import pipeline
    from termtune.layout import RunLayout
    from termtune.plan import before_training

    cfg = tiny_run(tmp_path, family)
    for stage in ("data", "train", "evaluate", "export", "validate"):
        pipeline.run_stage(cfg, stage)
    layout = RunLayout.of(cfg)
    adapted = {name.split(".lora_")[0] for name in load_file(layout.adapter / "adapter_model.safetensors")}
    assert any(name.endswith("mlp.experts") for name in adapted) and any(name.endswith("mlp.gate") for name in adapted)
    base = load_file(layout.base_model / "model.safetensors")
    exported = load_file(layout.artifact / "model.safetensors")
    for name in EXPERT_TENSORS[family]:  # trained: the merge changed them
        assert (exported[name] - base[name]).abs().max() > 0, name
    assert (exported["model.embed_tokens.weight"] == base["model.embed_tokens.weight"]).all()  # not trained
    assert json.loads(layout.validation.read_text())["ok"]
    check = json.loads((layout.artifact / "manifest.json").read_text())["bedrock_check"]
    if check["status"] != "not run":
        assert check["status"] == "passed" and check["max_abs_logit_diff"] <= 1e-4, check
    from termtune.plan import compare_with_measured

    assert before_training(cfg).startswith("plan:") and "not available" not in before_training(cfg)
    planned = {r["quantity"]: r for r in compare_with_measured(cfg)}
    # counted on the model peft wraps: exactly the LoRA weights training trained (router and experts included)
    assert planned["trainable parameters"]["planned"] == planned["trainable parameters"]["measured"]


def test_gpt_bigcode_training_is_refused_in_one_line_before_any_work(tmp_path):
    from termtune.modeling import check_model_settings
    from termtune.plan import model_shape

    cfg = tiny_run(tmp_path, "gpt_bigcode")
    for refused in (check_model_settings, model_shape):
        with pytest.raises(UserError, match="validates and exports GPTBigCode models .* but does not train them: "
                                            ".*ship no chat template") as e:
            refused(cfg)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", MIXTURES)
def test_the_plan_counts_a_mixture_on_the_model_transformers_builds_and_keeps_its_experts_out_of_qlora(
        tmp_path, family):
    import torch
    from transformers import AutoModelForCausalLM

    from termtune import plan as P
    from termtune.families import family_for
    from termtune.families.base import model_config

    cfg = tiny_run(tmp_path, family)
    fam = family_for(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(fam, cfg))
    planned = P.plan(cfg, cpu_peak=1e11, cpu_bandwidth=1e10)
    shape = fam.plan_shape(cfg)
    p = shape.parameter_counts()
    assert p["total"] == sum(t.numel() for t in model.parameters()) == planned.params["total"]
    assert p["experts"] > 0 and p["linear"] > 0 and p["router"] > 0
    # under QLoRA only the nn.Linear layers are 4-bit: experts and routers stay fp32, as bitsandbytes leaves them
    assert planned.memory_by_quantization["4bit"]["base"] == int(
        (p["total"] - p["linear"]) * P.CONSTANTS["fp32_bytes"].value + p["linear"] * P.CONSTANTS["nf4_bytes"].value)
    # a token passes num_experts_per_tok of the experts: fewer FLOPs than every expert, more than none
    dense_part = p["linear"] + p["router"]
    assert dense_part < shape.active_weights() < dense_part + p["experts"]
    assert f"{shape.experts} experts ({shape.experts_per_token} per token)" in planned.summary()
