"""What termtune serve's import job accepts: Amazon Bedrock Custom Model Import's documented rules.

The stand-in decides from its own table, taken from AWS's documentation (the User Guide's
model-customization-import-model.html: "Supported architectures", "Import a model source from
Amazon S3", the size and context limits), never from termtune's own `validate`: an import that fails here fails for a reason AWS states,
and one that termtune's checks would miss still fails. Where AWS is silent, the choice is marked
"serve's reading" below, and docs/aws.md lists it.
"""

from __future__ import annotations

import json
from pathlib import Path


# config.json's architectures[0] -> (its model_type, AWS's name for it, multimodal).
ARCHITECTURES = {
    "T5ForConditionalGeneration": ("t5", "Flan", False),
    "MistralForCausalLM": ("mistral", "Mistral", False),
    "MixtralForCausalLM": ("mixtral", "Mixtral", False),
    "LlamaForCausalLM": ("llama", "Llama 2, Llama 3, 3.1, 3.2, 3.3", False),
    "MllamaForConditionalGeneration": ("mllama", "Mllama", True),
    "GPTBigCodeForCausalLM": ("gpt_bigcode", "GPTBigCode", False),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2, Qwen2.5", False),
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2-VL", True),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "Qwen2.5-VL", True),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3", False),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3", False),
    "GptOssForCausalLM": ("gpt_oss", "GPT-OSS", False),
}
GPT_OSS_REGIONS = ("us-east-1",)
# "You can use these tokenizers with any model."
TOKENIZERS = {f"{name}{fast}" for name in ("T5Tokenizer", "LlamaTokenizer", "CodeLlamaTokenizer", "GPT2Tokenizer",
                                           "GPTNeoXTokenizer", "PreTrainedTokenizer", "Qwen2Tokenizer")
              for fast in ("", "Fast")}
# "you minimally need": config.json, tokenizer_config.json, tokenizer.json, tokenizer.model, .safetensors.
REQUIRED = ("config.json", "tokenizer_config.json", "tokenizer.json")
# serve's reading: a slow SentencePiece tokenizer's save_pretrained may give it its own name instead
SENTENCEPIECE = ("tokenizer.model", "spiece.model")
# serve's reading: tokenizer.model is the SentencePiece model, so a byte-level BPE tokenizer (Llama 3, Qwen,
# GPT-2) has none to ship; AWS's own Qwen3 and DeepSeek-R1-Distill-Llama samples import without it.
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5")  # "Hugging Face weights format"
MAX_TEXT_BYTES = 200 * 10**9  # "less than 100GB for multimodal models and 200GB for text models"
MAX_MULTIMODAL_BYTES = 100 * 10**9
MAX_CONTEXT = 128 * 1024  # "should be less than 128K"; serve's reading: Llama 3.1's 131,072 imports
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# What the stand-in itself can run under Bedrock's transformers 4.51.3: the encoder-decoder and the decoder-only
# text models. Not the multimodal ones, nor GPT-OSS, which 4.51.3 does not have (it arrived in 4.55).
SERVED_HERE = ("T5ForConditionalGeneration", "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
               "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "GPTBigCodeForCausalLM")
NOT_SERVED_WHY = {"GptOssForCausalLM": "transformers 4.51.3, which the stand-in runs models with, has no GPT-OSS"}
# Converse "is supported for Mistral AI, Llama, Qwen, Flan, GPTBigCode, and Mixtral architectures only"; "not
# supported for Qwen2.5, Qwen2-VL, Qwen2.5-VL, and GPT-OSS models"; "also not supported for Qwen3 models".
NO_CONVERSE = {"Qwen2VLForConditionalGeneration": "Qwen2-VL", "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL",
               "Qwen3ForCausalLM": "Qwen3", "Qwen3MoeForCausalLM": "Qwen3", "GptOssForCausalLM": "GPT-OSS",
               "MllamaForConditionalGeneration": "Mllama"}
# serve's reading: Qwen2 and Qwen2.5 share Qwen2ForCausalLM; Qwen2.5's tokenizer adds these tokens, Qwen2's has
# only <|endoftext|>, <|im_start|> and <|im_end|>.
QWEN2_5_TOKENS = ("<|fim_prefix|>", "<|vision_start|>", "<tool_call>")


def problems(folder: Path, region: str) -> list[str]:
    """Why Bedrock would refuse this folder's files (the prefix's top level), by AWS's rules; [] if none."""
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    found = [f"{name} is missing" for name in REQUIRED if name not in files]
    if not any(name in files for name in SENTENCEPIECE) and _sentencepiece(files):
        found.append(f"tokenizer.model is missing (or {' or '.join(SENTENCEPIECE[1:])}, its other name)")
    found += _weight_problems(files)
    if "adapter_config.json" in files:  # "LoRA adapters must be merged into the base weights"
        found.append("adapter_config.json: unmerged adapters are not importable; merge them into the model's weights")
    if "config.json" in files:
        found += _config_problems(files, region)
    if "tokenizer_config.json" in files:
        tokenizer = _json(files["tokenizer_config.json"]).get("tokenizer_class")
        if tokenizer is not None and tokenizer not in TOKENIZERS:
            found.append(f"tokenizer_config.json: tokenizer_class {tokenizer!r} is not a supported tokenizer "
                         f"({', '.join(sorted(TOKENIZERS))})")
    return found


def chat_problem(folder: Path) -> str | None:
    """Why the messages format (and Converse) cannot be used with this model, or None: "the chat template
    needs to be part of the tokenizer_config.json. Custom Model Import will not apply any default chat
    templates." """
    template = _json(folder / "tokenizer_config.json").get("chat_template")
    if template and isinstance(template, (str, list)):
        return None
    elsewhere = " (chat_template.jinja alone is not enough)" if (folder / "chat_template.jinja").is_file() else ""
    return f"the model's tokenizer_config.json has no chat_template{elsewhere}"


def converse_problem(folder: Path) -> str | None:
    """Why Bedrock's Converse does not serve this model (its family, or no chat template), or None."""
    architecture = (_json(folder / "config.json").get("architectures") or ["?"])[0]
    family = NO_CONVERSE.get(architecture)
    if architecture == "Qwen2ForCausalLM":
        family = "Qwen2.5" if _added_tokens(folder) & set(QWEN2_5_TOKENS) else None
    if family:
        return f"the Converse API is not supported for {family} models"
    return chat_problem(folder)


def _added_tokens(folder: Path) -> set[str]:
    """The tokens the tokenizer adds to its vocabulary (tokenizer.json's and tokenizer_config.json's lists)."""
    listed = _json(folder / "tokenizer.json").get("added_tokens")
    decoder = _json(folder / "tokenizer_config.json").get("added_tokens_decoder")
    tokens = [*(listed if isinstance(listed, list) else []), *(decoder.values() if isinstance(decoder, dict) else [])]
    return {t.get("content") for t in tokens if isinstance(t, dict)}


def _sentencepiece(files: dict[str, Path]) -> bool:
    """Whether tokenizer.json converts a SentencePiece model (a Unigram model, or '▁' for spaces), or
    cannot tell (no readable tokenizer.json)."""
    tokenizer = _json(files["tokenizer.json"]) if "tokenizer.json" in files else {}
    if not tokenizer:
        return True
    model = tokenizer.get("model")
    parts = [tokenizer.get(key) for key in ("normalizer", "pre_tokenizer", "decoder")]
    return (isinstance(model, dict) and model.get("type") == "Unigram") or "▁" in json.dumps(parts,
                                                                                         ensure_ascii=False)


def _weight_problems(files: dict[str, Path]) -> list[str]:
    found = [f"{name}: weights must be .safetensors files (Hugging Face weights format)"
             for name in sorted(files) if name.endswith(PICKLED_WEIGHTS)]  # serve's reading: refused, not ignored
    shards = sorted(name for name in files if name.endswith(".safetensors"))
    if not shards:
        return found + ["no .safetensors file: the model's weights must be stored in .safetensors files"]
    index = files.get("model.safetensors.index.json")
    if index is not None:
        weight_map = _json(index).get("weight_map")
        named = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        found += [f"model.safetensors.index.json names {name}, which is missing" for name in sorted(named - set(files))]
    elif len(shards) > 1:
        found.append(f"{len(shards)} .safetensors files and no model.safetensors.index.json to say how they fit")
    return found


def _config_problems(files: dict[str, Path], region: str) -> list[str]:
    config = _json(files["config.json"])
    if not config:
        return ["config.json is not a JSON object (the Hugging Face model configuration)"]
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
        return [f"config.json: architectures {architectures!r} is not a supported architecture "
                f"({', '.join(ARCHITECTURES)}); embedding models are not supported"]
    model_type, aws_name, multimodal = ARCHITECTURES[architectures[0]]
    found = []
    if config.get("model_type") != model_type:
        found.append(f"config.json: model_type {config.get('model_type')!r} does not match {architectures[0]} "
                     f"({model_type!r})")
    if model_type == "gpt_oss" and region not in GPT_OSS_REGIONS:
        found.append(f"{aws_name} models import only in {', '.join(GPT_OSS_REGIONS)}, not {region}")
    if "quantization_config" in config:  # serve's reading of "Hugging Face weights format": full weights
        found.append("config.json: quantization_config: quantized weights are not importable; save full weights")
    for key in CONTEXT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > MAX_CONTEXT:
            found.append(f"config.json: {key} {value} is over the 128K context limit")
    size = sum(p.stat().st_size for name, p in files.items() if name.endswith(".safetensors"))
    limit = MAX_MULTIMODAL_BYTES if multimodal else MAX_TEXT_BYTES
    if size >= limit:
        found.append(f"the weights are {size / 1e9:.1f} GB; a {'multimodal' if multimodal else 'text'} model's must "
                     f"be under {limit / 1e9:.0f} GB")
    return found


def _json(path: Path) -> dict:
    """The file's JSON object, or {} when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}
