"""Decoder-only export: write a merged Llama / Mistral / Mixtral / Qwen2 / Qwen3 / Qwen3-MoE / GPTBigCode
model and its tokenizer (transformers 5.x, in memory) into a folder that Bedrock's transformers 4.51.3
reads as the same model, and name what a folder gets wrong in that respect.

    summary = write_decoder(model, tokenizer, folder, dtype="bf16")   # folder: an existing, empty folder
    summary["end_of_turn"], summary["eos_token_id"]                    # '<|eot_id|>', [128001, 128008, 128009]
    problems = decoder_problems(folder)                                # [] when 4.51.3 reads it as written

Why not `save_pretrained` alone: 4.51.3 silently misreads or cannot load what transformers 5.x writes
(reference/decoder-cmi.md §6), and Bedrock serves imported models with 4.51.3:
- RoPE: 5.x writes `rope_parameters`; 4.51.3 ignores that key and runs with rope_theta 10000 and no
  scaling: a different model, with no error. Written back as `rope_theta` and `rope_scaling`.
- 5.x writes `dtype`; 4.51.3 reads `torch_dtype` (Bedrock sizes and loads the model by it).
- Qwen3-MoE: 5.x writes the expert count as `num_local_experts`; 4.51.3 reads `num_experts` (default
  128), so the weights do not fit. (Mixtral's key is `num_local_experts` in both versions.)
- tokenizer_config.json: 5.x writes `tokenizer_class: TokenizersBackend` (Llama 3, Mistral), which 4.51.3
  does not know and AWS does not list, an `extra_special_tokens` list 4.51.3 fails on, loader bookkeeping
  keys, no `added_tokens_decoder`, and the chat template in a separate chat_template.jinja, while
  Bedrock's messages format and Converse read it from tokenizer_config.json.
- tokenizer.model: 5.x writes only tokenizer.json; a SentencePiece tokenizer (Mistral, Llama 2) ships
  its tokenizer.model, as AWS's list of import files names it.
- generation_config.json: Bedrock stops generating at its `eos_token_id`; a base model's list may lack
  the chat template's end-of-turn token (a Qwen base model stops only at <|endoftext|>, while its chat
  turns end with <|im_end|>), and the tuned model would then talk past its answer.

The weights are written by 5.x's save_pretrained, which turns fused runtime tensors (MoE experts) back
into the per-expert names both versions load, with 5 GB shards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from termtune.errors import UserError
from termtune.rundir import write_json
from termtune.families.base import TORCH_DTYPE_NAMES, special_token, tokenizer_json_vocabulary

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The tokenizer classes AWS lists for imported models ("You can use these tokenizers with any model");
# transformers 4.51.3 knows each of them.
BEDROCK_TOKENIZER_CLASSES = frozenset(
    f"{name}{fast}" for name in ("T5Tokenizer", "LlamaTokenizer", "CodeLlamaTokenizer", "GPT2Tokenizer",
                                 "GPTNeoXTokenizer", "PreTrainedTokenizer", "Qwen2Tokenizer")
    for fast in ("", "Fast"))
# 5.x's name for a tokenizer that is only tokenizer.json; the class 4.51.3 loads such a file with.
GENERIC_5X_TOKENIZER, GENERIC_4X_TOKENIZER = "TokenizersBackend", "PreTrainedTokenizerFast"
# A SentencePiece-converted tokenizer (Mistral, Mixtral, Llama 2) is what LlamaTokenizer(Fast) loads.
SENTENCEPIECE_4X_TOKENIZER = "LlamaTokenizer"
# Keys 5.x writes into tokenizer_config.json about how it loaded the files, not about the tokenizer.
LOADER_KEYS = ("backend", "is_local", "local_files_only")
# model_type -> (the key 5.x writes the expert count under, the key 4.51.3 reads it from)
EXPERT_COUNT_KEYS = {"qwen3_moe": ("num_local_experts", "num_experts")}
# RoPE settings 4.51.3 reads from the top level of config.json, not from rope_scaling.
TOP_LEVEL_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")
CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_DIR = "chat_template.jinja", "additional_chat_templates"
# Rendered as one user and one assistant turn to see which token the template closes a turn with.
PROBE_ANSWER = "termtune-end-of-turn-probe"
# Bedrock "overrides llama3 rope_scaling" with these values (AWS's import documentation).
BEDROCK_LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
MAX_CONTEXT = 131072  # "should be less than 128K"; Llama 3.1-3.3 declare exactly 128Ki and import fine
MAX_SHARD_SIZE = "5GB"


# ----------------------------------------------------------------------------- write


def write_decoder(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", folder: Path, *,
                  dtype: str = "bf16", max_shard_size: str = MAX_SHARD_SIZE,
                  sentencepiece_model: Path | None = None) -> dict[str, Any]:
    """Write `model` (merged, unquantized) and `tokenizer` into `folder` (new or empty) as 4.51.3 reads
    them. `dtype` is "bf16", "fp16" or "fp32"; the model is cast to it in place. `sentencepiece_model` is the
    base's tokenizer.model for a SentencePiece tokenizer (default: the file the tokenizer was loaded from).

    Returns {"end_of_turn": token, "eos_token_id": [ids in generation_config.json], "tokenizer_class": name}.
    Raises UserError for a model or tokenizer that cannot be written so (quantized weights, RoPE that
    4.51.3 cannot express, a SentencePiece tokenizer without its tokenizer.model)."""
    import torch

    folder = Path(folder)
    if dtype not in TORCH_DTYPE_NAMES:
        raise UserError(f"decoder export: dtype {dtype!r}; expected one of {', '.join(TORCH_DTYPE_NAMES)}")
    if folder.is_dir() and any(folder.iterdir()):
        raise UserError(f"decoder export: {folder} is not empty; the export writes into a folder of its own")
    if getattr(model.config, "quantization_config", None):
        raise UserError("decoder export: the model holds quantized weights; merge the adapter into the "
                        "unquantized base first (Bedrock imports full bf16/fp16/fp32 weights only)")
    spiece = sentencepiece_model or _loaded_sentencepiece_model(tokenizer)
    special = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    end_of_turn = end_of_turn_token(default_template(tokenizer.chat_template), special, tokenizer.eos_token,
                                    tokenizer.bos_token)

    # The tokenizer first: it is quick, and a tokenizer that cannot be shipped stops the export before the weights.
    tokenizer.save_pretrained(folder)
    tokenizer_json = _read(folder / "tokenizer.json")
    sentencepiece = is_sentencepiece(tokenizer_json)
    if sentencepiece:
        if spiece is None or not Path(spiece).is_file():
            raise UserError("decoder export: the tokenizer is SentencePiece-based, and Bedrock's import reads its "
                            "tokenizer.model, but the tokenizer was not loaded from one; load it from the base "
                            "model's folder (with tokenizer.model)")
        shutil.copyfile(spiece, folder / "tokenizer.model")
    tokenizer_config = patch_tokenizer_config(_read(folder / "tokenizer_config.json"), tokenizer, sentencepiece)
    write_json(folder / "tokenizer_config.json", tokenizer_config)
    (folder / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)  # now inside tokenizer_config.json
    shutil.rmtree(folder / CHAT_TEMPLATE_DIR, ignore_errors=True)

    model.to(getattr(torch, TORCH_DTYPE_NAMES[dtype]))
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    config = patch_config(_read(folder / "config.json"), TORCH_DTYPE_NAMES[dtype])
    write_json(folder / "config.json", config)

    eos = _eos_ids(model.generation_config.eos_token_id if model.generation_config else None) \
        or _eos_ids(config.get("eos_token_id"))
    end_of_turn_id = tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else None
    if end_of_turn_id is not None and end_of_turn_id not in eos:
        eos.append(end_of_turn_id)
    generation = _read(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    generation.pop("_from_model_config", None)  # else 4.51.3 may prefer config.json's generation values
    generation["eos_token_id"] = eos
    write_json(folder / "generation_config.json", generation)
    return {"end_of_turn": end_of_turn, "eos_token_id": eos, "tokenizer_class": tokenizer_config["tokenizer_class"]}


def patch_config(config: dict[str, Any], torch_dtype: str) -> dict[str, Any]:
    """config.json as written by 5.x -> the same model in the keys 4.51.3 reads."""
    config = dict(config)
    rope = config.pop("rope_parameters", None)
    if isinstance(rope, dict):
        if any(isinstance(v, dict) for v in rope.values()):
            raise UserError("decoder export: the model has RoPE settings per attention type, which transformers "
                            "4.51.3 (Bedrock's) cannot express")
        rope = dict(rope)
        for key in TOP_LEVEL_ROPE_KEYS:
            if key in rope:
                config[key] = rope.pop(key)
        config["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    config["torch_dtype"] = config["dtype"] = torch_dtype
    renamed = EXPERT_COUNT_KEYS.get(config.get("model_type", ""))
    if renamed and renamed[0] in config:
        config[renamed[1]] = config.pop(renamed[0])
    if "output_router_logits" in config:
        config["output_router_logits"] = False  # training turns it on; inference has no use for it
    config["use_cache"] = True  # training turns the cache off
    return config


def patch_tokenizer_config(config: dict[str, Any], tokenizer: "PreTrainedTokenizerBase",
                           sentencepiece: bool) -> dict[str, Any]:
    """tokenizer_config.json as written by 5.x -> the 4.x form: a class 4.51.3 loads, additional special
    tokens as a list under their 4.x key, added_tokens_decoder, and the chat template inside."""
    config = {k: v for k, v in config.items() if k not in LOADER_KEYS}
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, dict):
        config["extra_special_tokens"] = extra  # the named-token form 4.x understands
    elif extra:
        config["additional_special_tokens"] = [str(t) for t in extra]
    if config.get("tokenizer_class") not in BEDROCK_TOKENIZER_CLASSES:
        config["tokenizer_class"] = SENTENCEPIECE_4X_TOKENIZER if sentencepiece else GENERIC_4X_TOKENIZER
    # 4.51.3's PreTrainedTokenizerFast also returns token_type_ids unless told otherwise, and a decoder-only
    # model's generate refuses them ("model_kwargs are not used by the model: ['token_type_ids']").
    config.setdefault("model_input_names", list(tokenizer.model_input_names))
    config["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tokenizer.added_tokens_decoder.items())}
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: 4.x's list form
        config["chat_template"] = [{"name": name, "template": text} for name, text in template.items()]
    elif template:
        config["chat_template"] = template
    return config


def _loaded_sentencepiece_model(tokenizer: "PreTrainedTokenizerBase") -> Path | None:
    path = getattr(tokenizer, "vocab_file", None)
    return Path(path) if isinstance(path, str) and path.endswith(".model") and Path(path).is_file() else None


def _eos_ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int)]


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- shared by write and check


def default_template(chat_template: Any) -> str | None:
    """The template Bedrock applies: the only one, or the one named "default" among named templates (5.x
    holds them as {name: template}, tokenizer_config.json as [{"name", "template"}])."""
    if isinstance(chat_template, list):
        chat_template = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("default")
    return chat_template if isinstance(chat_template, str) and chat_template else None


def end_of_turn_token(chat_template: str | None, special_tokens: list[str], eos_token: str | None,
                      bos_token: str | None = None) -> str | None:
    """The token the chat template ends an assistant turn with (<|eot_id|> for Llama 3, <|im_end|> for Qwen
    and SmolLM2, </s> for Mistral), found by rendering one exchange; the eos token without a template."""
    if not chat_template:
        return eos_token
    from transformers.utils.chat_template_utils import render_jinja_template

    exchange = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": PROBE_ANSWER}]
    try:
        rendered, _ = render_jinja_template([exchange], chat_template=chat_template, bos_token=bos_token or "",
                                            eos_token=eos_token or "")
    except Exception:  # a template that rejects this exchange (jinja raise_exception) tells nothing
        return eos_token
    if PROBE_ANSWER not in rendered[0]:  # a template that drops the assistant's words tells nothing either
        return eos_token
    after = rendered[0].rpartition(PROBE_ANSWER)[2].lstrip()
    closing = [t for t in special_tokens if t and after.startswith(t)]
    return max(closing, key=len) if closing else eos_token


def is_sentencepiece(tokenizer_json: dict[str, Any]) -> bool:
    """Whether tokenizer.json is a conversion of a SentencePiece model (Mistral, Llama 2: '▁' for spaces,
    or a Unigram model), as opposed to byte-level BPE (Llama 3, Qwen, GPT-2), which has no tokenizer.model."""
    model = tokenizer_json.get("model") or {}
    if isinstance(model, dict) and model.get("type") == "Unigram":
        return True
    parts = [tokenizer_json.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")]
    return "▁" in json.dumps(parts, ensure_ascii=False)


# ----------------------------------------------------------------------------- check


def decoder_problems(folder: Path) -> list[str]:
    """What keeps transformers 4.51.3 (Bedrock's) from reading `folder` as the model it was saved from, and
    what Bedrock's chat formats need: one line per problem, [] when none. Reads the JSON files and renders the
    chat template; loads no weights."""
    folder = Path(folder)
    problems: list[str] = []
    config = _json_or_problem(folder / "config.json", problems)
    tokenizer_config = _json_or_problem(folder / "tokenizer_config.json", problems)
    tokenizer_json = _json_or_problem(folder / "tokenizer.json", problems)
    generation = _json_or_problem(folder / "generation_config.json", problems)
    if config is not None:
        problems += config_problems(config)
    if tokenizer_config is not None:
        problems += tokenizer_config_problems(folder, tokenizer_config)
    if tokenizer_json is not None and is_sentencepiece(tokenizer_json) and not (folder / "tokenizer.model").is_file():
        problems.append("tokenizer.json is SentencePiece-based but tokenizer.model is missing (Bedrock's import "
                        "lists it; copy the base model's)")
    if config is not None and tokenizer_json is not None:
        problems += _vocabulary_problems(config, tokenizer_json)
    if tokenizer_config is not None and tokenizer_json is not None and generation is not None:
        problems += end_of_turn_problems(folder, tokenizer_config, tokenizer_json, generation)
    return problems


def decoder_warnings(folder: Path) -> list[str]:
    """What Bedrock may serve differently from what was trained, without 4.51.3 misreading anything: one
    line per warning. Reads config.json and tokenizer_config.json; missing or unreadable files are
    decoder_problems' to report."""
    folder = Path(folder)
    config = _json_or_problem(folder / "config.json", []) or {}
    tokenizer_config = _json_or_problem(folder / "tokenizer_config.json", []) or {}
    warnings = []
    context = config.get("max_position_embeddings")
    if isinstance(context, int) and context > MAX_CONTEXT:
        warnings.append(f"max_position_embeddings {context} is above Bedrock's 128K ({MAX_CONTEXT}); the import may "
                        "refuse it or serve a shorter context")
    scaling = _scaling(config.get("rope_scaling"))
    if scaling and scaling["rope_type"] == "llama3":
        differ = {k: scaling.get(k) for k, v in BEDROCK_LLAMA3_ROPE.items() if scaling.get(k) != v}
        if differ:
            warnings.append(f"rope_scaling llama3 {differ}: Bedrock overrides llama3 RoPE scaling with "
                            f"{BEDROCK_LLAMA3_ROPE}, so it serves this model with other RoPE frequencies than it "
                            "was trained with (long inputs are affected most)")
    elif scaling:
        warnings.append(f"rope_scaling {scaling['rope_type']!r}: whether Bedrock honours it is not documented")
    if not tokenizer_config.get("chat_template"):
        warnings.append("no chat_template in tokenizer_config.json: Bedrock's messages format and Converse need "
                        "one (prompt formats still work)")
    return warnings


def _json_or_problem(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        problems.append(f"{path.name} is missing")
        return None
    try:
        value = _read(path)
    except (OSError, ValueError) as e:
        problems.append(f"{path.name} is not readable JSON ({e})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path.name} is not a JSON object")
        return None
    return value


def config_problems(config: dict[str, Any]) -> list[str]:
    problems = []
    if "rope_parameters" in config:
        rope = config["rope_parameters"]
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        if config.get("rope_theta") != theta or _scaling(rope) != _scaling(config.get("rope_scaling")):
            problems.append("config.json holds RoPE settings under rope_parameters (transformers 5.x), which "
                            "4.51.3 ignores: it would run with rope_theta "
                            f"{config.get('rope_theta', 10000.0)} instead of {theta}"
                            + ("" if _scaling(rope) == _scaling(config.get("rope_scaling")) else
                               f" and rope_scaling {config.get('rope_scaling')} instead of {_scaling(rope)}"))
    if not config.get("torch_dtype"):
        problems.append("config.json has no torch_dtype (4.51.3 does not read 5.x's dtype key)"
                        + (f"; set torch_dtype to {config['dtype']!r}" if config.get("dtype") else ""))
    renamed = EXPERT_COUNT_KEYS.get(config.get("model_type", ""))
    if renamed and renamed[1] not in config:
        problems.append(f"config.json has no {renamed[1]} (4.51.3's expert count"
                        + (f"; 5.x wrote it as {renamed[0]}" if renamed[0] in config else "") + ")")
    return problems


def _scaling(rope: Any) -> dict[str, Any] | None:
    """RoPE scaling in one comparable form: the settings other than theta, None for plain RoPE."""
    if not isinstance(rope, dict):
        return None
    rest = {k: v for k, v in rope.items() if k not in TOP_LEVEL_ROPE_KEYS}
    kind = rest.pop("rope_type", rest.pop("type", "default"))
    return None if kind == "default" else {"rope_type": kind, **rest}


def tokenizer_config_problems(folder: Path, config: dict[str, Any]) -> list[str]:
    problems = []
    cls = config.get("tokenizer_class")
    if cls not in BEDROCK_TOKENIZER_CLASSES:
        problems.append(f"tokenizer_config.json names tokenizer_class {cls!r}, which transformers 4.51.3 does not "
                        "load and Bedrock does not list"
                        + (f" (use {GENERIC_4X_TOKENIZER})" if cls == GENERIC_5X_TOKENIZER else ""))
    if cls == GENERIC_4X_TOKENIZER and "token_type_ids" in config.get("model_input_names", ["token_type_ids"]):
        problems.append(f"tokenizer_config.json names {GENERIC_4X_TOKENIZER} without model_input_names "
                        "[input_ids, attention_mask]: under 4.51.3 it returns token_type_ids, which a decoder-only "
                        "model's generate refuses")
    if isinstance(config.get("extra_special_tokens"), list):
        problems.append("tokenizer_config.json has extra_special_tokens as a list (5.x form); 4.51.3 fails on it "
                        "('list' object has no attribute 'keys'): use additional_special_tokens")
    if not config.get("chat_template"):
        if (folder / CHAT_TEMPLATE_FILE).is_file():
            problems.append(f"the chat template is only in {CHAT_TEMPLATE_FILE}; Bedrock's messages format and "
                            "Converse read it from tokenizer_config.json")
    elif (folder / CHAT_TEMPLATE_FILE).is_file():
        problems.append(f"{CHAT_TEMPLATE_FILE} is present besides the chat_template in tokenizer_config.json; "
                        "Bedrock prefers the separate file: ship one")
    return problems


def _vocabulary_problems(config: dict[str, Any], tokenizer_json: dict[str, Any]) -> list[str]:
    try:
        largest = max(tokenizer_json_vocabulary(tokenizer_json).values())
    except ValueError as e:
        return [str(e)]
    rows = config.get("vocab_size")
    if isinstance(rows, int) and largest >= rows:
        return [f"the tokenizer has token ids up to {largest} but config.json's vocab_size is {rows}: those tokens "
                "have no embedding row"]
    return []


def end_of_turn_problems(folder: Path, tokenizer_config: dict[str, Any], tokenizer_json: dict[str, Any],
                          generation: dict[str, Any]) -> list[str]:
    template = default_template(tokenizer_config.get("chat_template"))
    if not template and (folder / CHAT_TEMPLATE_FILE).is_file():
        template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    try:
        vocabulary = tokenizer_json_vocabulary(tokenizer_json)
    except ValueError as e:
        return [str(e)]
    special = [t["content"] for t in tokenizer_json.get("added_tokens") or []
               if isinstance(t, dict) and t.get("special") and isinstance(t.get("content"), str)]
    token = end_of_turn_token(template, special,
                              special_token(tokenizer_config.get("eos_token")),
                              special_token(tokenizer_config.get("bos_token")))
    if token is None:
        return []
    eos = _eos_ids(generation.get("eos_token_id"))
    if vocabulary.get(token) not in eos:
        return [f"generation_config.json's eos_token_id {eos} lacks the end-of-turn token {token} "
                f"({vocabulary.get(token)}): Bedrock would generate past the end of the answer"]
    return []
