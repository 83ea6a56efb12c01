"""The T5 family (Flan-T5): an encoder-decoder, trained on (prompt, target) pairs as two token streams.

Everything termtune does differently for T5 lives here: building and loading the model, tokenizing
a row, the trainer it runs on, slicing generated tokens into an answer, the export's fix-ups, its
Bedrock import rules and tensor table, and its shape and FLOP counts for `termtune plan`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from termtune.config import Config
from termtune.errors import UserError
from termtune.families.base import (FAIL, OK, WARN, Family, base_config_json, check_lora_targets,
                                    model_config, refuse_rank, sentencepiece_problem, special_token)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

MAX_SIZE = 2**24
"""The largest size a T5 shape may give: the widest T5 layer is t5-11b's d_ff of 65,536 and large vocabularies
hold a few hundred thousand tokens; far above that is a typo, not a model."""
SIZE_KEYS = ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers", "vocab_size",
             "relative_attention_num_buckets")
LINEAR_LAYERS_HINT = "(T5's linear layers: q, k, v, o, wi_0, wi_1, wo, or all-linear)"
# AWS's minimum import files name tokenizer.model; T5Tokenizer loads spiece.model: ship both, identical.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                   "tokenizer.model")
T5_TOKENIZERS = ("T5Tokenizer", "T5TokenizerFast")


class T5Family(Family):
    name = "t5"
    model_types = ("t5",)
    architectures = ("T5ForConditionalGeneration",)
    auto_class = "AutoModelForSeq2SeqLM"
    lora_task_type = "SEQ_2_SEQ_LM"
    tokenizer_class = "T5Tokenizer"
    bedrock_attention = "eager"  # 4.51.3 has no SDPA path for T5
    display_name = "Flan-T5"
    card_tags = ("t5", "flan-t5")
    pipeline_tag = "text2text-generation"

    def describe_config(self, config: dict[str, Any]) -> str:
        return (f"T5 ({config.get('num_layers', '?')}+{config.get('num_decoder_layers', '?')} layers, "
                f"d_model {config.get('d_model', '?')})")

    # ------------------------------------------------------------------------- model

    def architecture_config(self, cfg: Config) -> Any:
        return architecture_config(cfg)

    def check_model_settings(self, cfg: Config) -> None:
        check_model_settings(self, cfg)

    def build_random(self, config: Any) -> "PreTrainedModel":
        from transformers import T5ForConditionalGeneration

        model = T5ForConditionalGeneration(config)
        untie_lm_head(model)
        return model

    # ------------------------------------------------------------------------- data and training

    def encode(self, tokenizer: Any, prompts: list[str], targets: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        # The target is a second stream (the decoder's): tokenized as a target, not appended to the prompt.
        return tokenizer(prompts)["input_ids"], tokenizer(text_target=targets)["input_ids"]

    def collator(self, tokenizer: Any, model: Any, packed: bool = False) -> Any:
        """Pad each batch to its own longest row; labels are padded with -100 so the loss skips them.

        (The seed recipe padded labels with the pad id, so it trained the model to emit padding.)
        """
        import torch
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, padding="longest",
                                      pad_to_multiple_of=8 if torch.cuda.is_available() else None)

    def trainer_classes(self) -> tuple[type, type]:
        # TRL's SFTTrainer cannot train encoder-decoder models (it fails on the first step).
        from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

        return Seq2SeqTrainer, Seq2SeqTrainingArguments

    def refuse_precision(self, what: str, dtype: str) -> str | None:
        if dtype != "fp16":
            return None
        if what == "train.precision":
            return ("train.precision=fp16 is refused for T5: its activations overflow to inf/NaN in fp16 "
                    "(T5 was trained in bf16). Use bf16 on a GPU or fp32, or set train.allow_fp16=true "
                    "to force it.")
        return ("export.dtype=fp16 is refused for T5: it overflows to inf/NaN in fp16 at inference. "
                "Use bf16 or fp32, or set export.allow_fp16=true to force it.")

    def takes_chunked_loss(self, base: Any) -> bool:
        # The model's private _shift_right builds the decoder inputs exactly as its own loss does; without it the
        # standard loss runs (tests/test_train.py's chunked-loss test fails if transformers renames it).
        return callable(getattr(base, "_shift_right", None)) and getattr(base.config, "is_encoder_decoder", False)

    def chunked_loss_inputs(self, base: Any, labels: "torch.Tensor", inputs: dict[str, Any]) -> "torch.Tensor":
        inputs.pop("num_items_in_batch", None)  # the standard T5 loss ignores it too (a per-batch mean)
        if inputs.get("decoder_input_ids") is None:
            inputs["decoder_input_ids"] = base._shift_right(labels)
        return labels  # decoder position i predicts labels[i]

    # ------------------------------------------------------------------------- generation

    def generation_settings(self, model: Any) -> dict[str, Any]:
        return {"decoder_start_token_id": model.config.decoder_start_token_id}

    def answer_ids(self, output: "torch.Tensor", prompt_width: int) -> "torch.Tensor":
        return output[:, 1:]  # the decoder's output holds no prompt; drop the decoder start token

    # ------------------------------------------------------------------------- export

    def export_tokenizer_files(self, tokenizer_source: str) -> dict[str, Path]:
        # The SentencePiece model goes under both names: spiece.model is what T5Tokenizer loads,
        # tokenizer.model is what AWS's list of minimum import files names.
        spiece = spiece_model_path(tokenizer_source)
        return {"spiece.model": spiece, "tokenizer.model": spiece}

    def is_tied(self, model: Any) -> bool:
        return bool(getattr(model.config, "scale_decoder_outputs", model.config.tie_word_embeddings))

    def shared_views(self, state: dict[str, Any]) -> set[str]:
        # T5 keeps its token embeddings once (shared.weight); encoder/decoder embed_tokens are views of it
        # that every transformers version re-ties on load, so they are not written twice.
        return {name for name in TIED_TO_SHARED
                if name in state and state[name].data_ptr() == state["shared.weight"].data_ptr()}

    def fix_model_config(self, config: dict[str, Any]) -> None:
        # 5.x always writes tie_word_embeddings: true for T5; 4.x then ignores lm_head.weight, ties it to
        # the input embeddings and rescales the decoder output (the caller sets the flag to what was written).
        config.pop("scale_decoder_outputs", None)  # 5.x-only spelling of the same fact
        config["architectures"] = list(self.architectures)

    # ------------------------------------------------------------------------- Bedrock import rules

    tokenizer_files = TOKENIZER_FILES

    def cmi_rules(self) -> dict[str, Callable[[Any], tuple[str, str]]]:
        return {"architecture": _architecture, "attention shape": _attention_shape, "head count": _head_count,
                "torch_dtype": _torch_dtype, "weight dtype": _weight_dtype, "tie flag": _tie_flag,
                "tokenizer files": _tokenizer_files, "tokenizer_config.json": _tokenizer_config,
                "generation_config.json": _generation_config, "vocabulary vs embeddings": _vocabulary_fits_embeddings,
                "special token ids": _special_token_ids}

    def tensor_table(self, config: dict[str, Any]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        return t5_tensors(config)

    # ------------------------------------------------------------------------- termtune plan

    @property
    def known_hub_ids(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(KNOWN_SHAPES)

    def plan_shape(self, cfg: Config) -> "Shape":
        return plan_shape(cfg)

    def plan_sources(self) -> dict[str, str]:
        return {**{f"KNOWN_SHAPES[{k}]": KNOWN_SHAPES_SOURCE for k in KNOWN_SHAPES},
                "ACTIVATION_COUNTS": ACTIVATION_COUNTS_SOURCE}


T5 = T5Family()
TIED_TO_SHARED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def spiece_model_path(source: str) -> Path:
    """The SentencePiece model of the tokenizer source: a local folder, or the Hub (cached)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        path = folder / "spiece.model"
        if not path.is_file():
            raise UserError(f"{source}: no spiece.model in the tokenizer folder; Bedrock lists it for T5. "
                            "Point model.tokenizer at a Flan-T5 tokenizer folder that has it")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=source, filename="spiece.model"))
    except Exception as e:  # offline, unknown repo, no such file: all user-fixable
        raise UserError(f"{source}: cannot get spiece.model from the Hugging Face Hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


# ----------------------------------------------------------------------------- model


def architecture_config(cfg: Config) -> "Any":
    """The T5Config for model.init=random: the architecture file plus overrides."""
    from transformers import AutoConfig

    values, config_file = base_config_json(cfg)  # model.init=random: the architecture file
    model_type = values.get("model_type")
    if model_type != "t5":
        raise UserError(f"{config_file}: model_type is {model_type!r}; termtune trains T5 (Flan-T5) models")
    # T5Config keeps any unknown keyword as an attribute, so a typo ({num_layers:2} is the one key
    # "num_layers:2" in YAML) would silently train the full-size model: only known keys are accepted.
    known = set(AutoConfig.for_model("t5").to_dict()) | set(values)
    for key in cfg.model.architecture_overrides:
        if key not in known:
            guess = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {guess[0]}?{' Write key: value with a space' if ':' in str(key) else ''})" \
                if guess else ""
            raise UserError(f"model.architecture_overrides: {key!r} is not a T5 config key{hint}")
    values.update(cfg.model.architecture_overrides)
    values.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **values)
    except Exception as e:  # noqa: BLE001 - the config classes raise their own validation errors (a bad value)
        raise UserError(f"model.architecture_overrides: not a valid T5 shape: {' '.join(str(e).split())}") from e


def check_model_settings(family: Family, cfg: Config) -> None:
    """Check the model's sizes and the LoRA settings against its real layers before any data or weights are
    touched.

    The model is built on the meta device (shapes only, no memory, well under a second for
    flan-t5-large) and PEFT's own matching decides which layers lora.target_modules selects.
    """
    import torch
    from transformers import AutoModelForSeq2SeqLM

    config = model_config(family, cfg)
    # sizes such as d_model=0 or num_heads=-2 first: torch fails on them with a traceback or builds an empty model
    check_shape(config.to_dict(), cfg.model.architecture or cfg.model.source,
                cfg.model.architecture_overrides if cfg.model.init == "random" else {})
    with torch.device("meta"):
        try:
            model = AutoModelForSeq2SeqLM.from_config(config)
        except (TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"{cfg.model.architecture or cfg.model.source}: cannot build the model from its "
                            f"config: {str(e).splitlines()[0]}") from e
        check_lora_targets(family, cfg, model, LINEAR_LAYERS_HINT)


def check_shape(values: dict[str, Any], origin: str, overrides: dict[str, Any]) -> None:
    """Refuse (one line naming the key) a T5 size that is not a whole number from 1 to MAX_SIZE or a dropout
    outside [0, 1). `origin`: where the values come from; `overrides`: the keys model.architecture_overrides set."""

    def name(key: str) -> str:
        return f"model.architecture_overrides.{key}" if key in overrides else f"{origin}: {key}"

    for key in SIZE_KEYS:
        size = values.get(key)
        if key == "num_decoder_layers" and size is None:
            continue  # T5's default: as many as the encoder
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SIZE:
            raise UserError(f"{name(key)}={size!r}: a model size must be a whole number from 1 to {MAX_SIZE:,}")
    dropout = values.get("dropout_rate", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UserError(f"{name('dropout_rate')}={dropout!r}: a dropout must be a share from 0 to below 1")


def untie_lm_head(model: "PreTrainedModel") -> None:
    """Give the model its own lm_head, as real Flan-T5 checkpoints have (call right after init).

    transformers 5.x builds every T5 with tied input/output embeddings, even from a config
    that says `tie_word_embeddings: false`. Flan-T5 is untied, and an export must carry a
    separate `lm_head.weight`, so the random-init base is untied to match.
    """
    import torch

    if model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr():
        # A fresh draw, not a copy: with equal values transformers would tie the two again when
        # the folder is loaded. Scale: the final norm is frozen under LoRA, so the largest logit
        # the model can reach is about |h| * |w| = sqrt(d_model) * std * sqrt(d_model). T5's
        # std 1.0 starts a random model at a loss of ~30; d_model^-0.5 starts near ln(vocab) but
        # caps the loss near 3 (it can never be confident). d_model^-0.25 starts at ~15 and
        # leaves room to learn.
        std = model.config.initializer_factor * model.config.d_model ** -0.25
        weight = torch.empty_like(model.shared.weight).normal_(0.0, std)
        model.lm_head.weight = torch.nn.Parameter(weight)
    model.config.tie_word_embeddings = False


# ----------------------------------------------------------------------------- Bedrock Custom Model Import rules
# termtune.validate's family rules: each takes validate's view of the folder (its files, config.json,
# safetensors headers, tokenizer.json vocabulary) and returns (status, one-line reason).

def _architecture(f: Any) -> tuple[str, str]:
    c = f.config
    if c is None:
        return FAIL, "no readable config.json"
    if c.get("model_type") != "t5":
        return FAIL, f"model_type is {c.get('model_type')!r}; expected 't5' (Flan-T5)"
    if c.get("architectures") != ["T5ForConditionalGeneration"]:
        return FAIL, f"architectures is {c.get('architectures')!r}; expected ['T5ForConditionalGeneration']"
    return OK, "t5 / T5ForConditionalGeneration"


def _attention_shape(f: Any) -> tuple[str, str]:
    c = f.config or {}
    try:
        d_model, heads, d_kv = int(c["d_model"]), int(c["num_heads"]), int(c["d_kv"])
    except (KeyError, TypeError, ValueError):
        return FAIL, "config.json lacks integer d_model, num_heads or d_kv"
    if d_model != heads * d_kv:
        return FAIL, f"d_model {d_model} != num_heads {heads} * d_kv {d_kv}"
    return OK, f"d_model {d_model} = {heads} heads * d_kv {d_kv}"


def _head_count(f: Any) -> tuple[str, str]:
    heads = (f.config or {}).get("num_heads")
    if not isinstance(heads, int):
        return FAIL, "config.json has no integer num_heads"
    if heads % 4:
        return WARN, (f"num_heads {heads} is not a multiple of 4: CMI once required it (lifted in 2024-10, "
                      "flan-t5-small imports now); an import may still fail")
    return OK, f"num_heads {heads} is a multiple of 4"


def _torch_dtype(f: Any) -> tuple[str, str]:
    c = f.config or {}
    value = c.get("torch_dtype")
    if value is None:
        return FAIL, "config.json has no torch_dtype (transformers 5.x writes only 'dtype'; 4.51.3 reads torch_dtype)"
    if value not in ("float32", "bfloat16"):
        return FAIL, f"torch_dtype is {value!r}; use float32 or bfloat16 for T5"
    return OK, f"torch_dtype {value}"


def _weight_dtype(f: Any) -> tuple[str, str]:
    dtypes = sorted({dtype for dtype, _, _ in f.tensors.values()})
    if not dtypes:
        return FAIL, "no tensors found"
    if "F16" in dtypes:
        return FAIL, "F16 weights: T5 overflows to inf/NaN in fp16; export in bf16 or fp32"
    bad = [d for d in dtypes if d not in ("F32", "BF16")]
    if bad:
        return FAIL, f"{', '.join(bad)} weights (quantized or unsupported): export full-precision F32 or BF16"
    return OK, f"weights in {', '.join(dtypes)}"


def _tie_flag(f: Any) -> tuple[str, str]:
    if "shared.weight" not in f.tensors:
        return FAIL, "shared.weight (the token embeddings) is not in the weights"
    has_head = "lm_head.weight" in f.tensors
    # T5Config defaults tie_word_embeddings to true, so a missing flag means tied.
    tied = (f.config or {}).get("tie_word_embeddings", True)
    if has_head and tied is not False:
        return FAIL, ("lm_head.weight is in the weights but tie_word_embeddings is not false: transformers 4.51.3 "
                      "would ignore it, tie lm_head to shared.weight and rescale the output (wrong logits)")
    if not has_head and tied is False:
        return FAIL, "tie_word_embeddings is false but lm_head.weight is missing: the output layer would be random"
    if not has_head:
        return WARN, "tied embeddings without lm_head.weight (original T5 layout); Flan-T5 is untied"
    return OK, "untied lm_head.weight present and tie_word_embeddings false"


def _tokenizer_files(f: Any) -> tuple[str, str]:
    missing = [n for n in TOKENIZER_FILES if n not in f.files]
    if missing:
        return FAIL, f"missing {', '.join(missing)} (Bedrock lists every one of {', '.join(TOKENIZER_FILES)} for T5)"
    if (f.path / "spiece.model").read_bytes() != (f.path / "tokenizer.model").read_bytes():
        return FAIL, "tokenizer.model differs from spiece.model; both must be the same SentencePiece model"
    value, error = f.json("special_tokens_map.json")
    if error or not isinstance(value, dict):
        return FAIL, error or "special_tokens_map.json is not a JSON object"
    vocabulary, error = f.vocabulary
    if error:
        return FAIL, error
    problem = sentencepiece_problem(f.path / "spiece.model", vocabulary)
    if problem:
        return FAIL, problem
    return OK, (f"{', '.join(TOKENIZER_FILES)}; tokenizer.json ({len(vocabulary)} tokens) and spiece.model "
                "parse and agree")


def _tokenizer_config(f: Any) -> tuple[str, str]:
    value, error = f.json("tokenizer_config.json")
    if error:
        return FAIL, error
    if not isinstance(value, dict):
        return FAIL, "tokenizer_config.json is not a JSON object"
    if isinstance(value.get("extra_special_tokens"), list):
        return FAIL, ("extra_special_tokens is a list (transformers 5.x form): 4.51.3 fails with "
                      "\"'list' object has no attribute 'keys'\"; use additional_special_tokens")
    cls = value.get("tokenizer_class")
    if cls is None:
        return WARN, "no tokenizer_class; transformers falls back to the model type (T5TokenizerFast)"
    if cls not in T5_TOKENIZERS:
        return FAIL, f"tokenizer_class {cls!r}; expected one of {', '.join(T5_TOKENIZERS)}"
    return OK, f"{cls}, readable by transformers 4.x"


def _generation_config(f: Any) -> tuple[str, str]:
    if "generation_config.json" not in f.files:
        return WARN, "no generation_config.json (recommended: decoder_start_token_id 0, eos 1, pad 0)"
    value, error = f.json("generation_config.json")
    if error or not isinstance(value, dict):
        return FAIL, error or "generation_config.json is not a JSON object"
    return OK, "generation_config.json readable"


def _vocabulary_fits_embeddings(f: Any) -> tuple[str, str]:
    vocabulary, error = f.vocabulary
    if error:
        return FAIL, error
    if "shared.weight" not in f.tensors:
        return FAIL, "no shared.weight (the token embeddings) to hold tokenizer.json's tokens"
    _, shape, file = f.tensors["shared.weight"]
    rows, size = shape[0], max(vocabulary.values()) + 1
    if rows < size:
        return FAIL, (f"tokenizer.json has token ids up to {size - 1} but shared.weight in {file} has {rows} rows: "
                      f"ids {rows} and up have no embedding")
    return OK, f"shared.weight's {rows} rows hold every tokenizer.json id (0-{size - 1})"


SPECIAL_IDS = {"pad_token_id": "pad", "eos_token_id": "eos", "decoder_start_token_id": "decoder start"}


def _special_token_ids(f: Any) -> tuple[str, str]:
    vocabulary, error = f.vocabulary
    if error:
        return FAIL, error
    size = max(vocabulary.values()) + 1
    sources = [("config.json", f.config or {})]
    generation, _ = f.json("generation_config.json")
    if isinstance(generation, dict):
        sources.append(("generation_config.json", generation))
    problems = []
    first: dict[str, tuple[str, set[int], Any]] = {}  # key -> (the file that set it first, its ids, as written)
    for file, values in sources:
        for key in SPECIAL_IDS:
            value = values.get(key)
            if value is None:
                continue
            ids = value if isinstance(value, list) else [value]  # generation_config may list several eos ids
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                problems.append(f"{file}: {key} is {value!r}, not a token id")
                continue
            outside = [i for i in ids if not 0 <= i < size]
            if outside:
                problems.append(f"{file}: {key} {outside[0]} is outside tokenizer.json's ids 0-{size - 1}")
            if key in first and set(ids) != first[key][1]:
                problems.append(f"{file}: {key} is {value!r} but {first[key][0]} says {first[key][2]!r}")
            first.setdefault(key, (file, set(ids), value))
    problems += [f"neither config.json nor generation_config.json sets {key}"
                 + (" (transformers 4.51.3 cannot start generating)" if key == "decoder_start_token_id" else "")
                 for key in SPECIAL_IDS if key not in first]
    # The tokenizer's pad and eos tokens (where its files name them; T5's tokenizer defaults otherwise)
    # must be the ids the model pads with and stops at.
    for key, token_key in (("pad_token_id", "pad_token"), ("eos_token_id", "eos_token")):
        for file in ("special_tokens_map.json", "tokenizer_config.json"):
            value, _ = f.json(file)
            token = special_token(value.get(token_key)) if isinstance(value, dict) else None
            if token is None:
                continue
            if token not in vocabulary:
                problems.append(f"{file}: {token_key} {token!r} is not in tokenizer.json")
            elif key in first and vocabulary[token] not in first[key][1]:
                problems.append(f"{file}: {token_key} {token!r} is id {vocabulary[token]} in tokenizer.json but "
                                f"{first[key][0]} has {key} {first[key][2]!r}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return FAIL, problems[0] + more
    found = ", ".join(f"{label} {first[key][2]}" for key, label in SPECIAL_IDS.items())
    return OK, f"{found}: inside tokenizer.json's ids and the same in every file that sets them"


# ----------------------------------------------------------------------------- expected tensors


def _config_int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"config.json has no non-negative integer {key} (found {value!r})")
    return value


def t5_tensors(config: dict[str, Any]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """T5ForConditionalGeneration as transformers 4.51.3 saves it: shared.weight holds the token
    embeddings (encoder/decoder.embed_tokens are the same tensor), relative position biases in
    block 0 of each stack only, a gated (wi_0, wi_1) or plain (wi) feed-forward as feed_forward_proj
    says (or is_gated_act, where saved), and lm_head.weight unless tie_word_embeddings (T5's default:
    true) ties it to shared."""
    vocab, d_model = _config_int(config, "vocab_size"), _config_int(config, "d_model")
    inner = _config_int(config, "num_heads") * _config_int(config, "d_kv")
    d_ff, heads = _config_int(config, "d_ff"), _config_int(config, "num_heads")
    buckets = _config_int(config, "relative_attention_num_buckets", 32)
    encoder_layers = _config_int(config, "num_layers")
    decoder_layers = encoder_layers if config.get("num_decoder_layers") is None \
        else _config_int(config, "num_decoder_layers")
    # transformers reads a saved is_gated_act over the one feed_forward_proj implies (4.51.3 and 5.x alike)
    gated = bool(config.get("is_gated_act", str(config.get("feed_forward_proj", "relu")).split("-")[0] == "gated"))

    def attention(prefix: str) -> dict[str, list[int]]:
        return {f"{prefix}.q.weight": [inner, d_model], f"{prefix}.k.weight": [inner, d_model],
                f"{prefix}.v.weight": [inner, d_model], f"{prefix}.o.weight": [d_model, inner]}

    def feed_forward(prefix: str) -> dict[str, list[int]]:
        up = {f"{prefix}.wi_0.weight": [d_ff, d_model], f"{prefix}.wi_1.weight": [d_ff, d_model]} if gated \
            else {f"{prefix}.wi.weight": [d_ff, d_model]}
        return {**up, f"{prefix}.wo.weight": [d_model, d_ff]}

    required = {"shared.weight": [vocab, d_model]}
    for stack, layers in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        for i in range(layers):
            block = f"{stack}.block.{i}.layer"
            required.update(attention(f"{block}.0.SelfAttention"))
            required[f"{block}.0.layer_norm.weight"] = [d_model]
            if i == 0:
                required[f"{block}.0.SelfAttention.relative_attention_bias.weight"] = [buckets, heads]
            last = 1
            if stack == "decoder":
                required.update(attention(f"{block}.1.EncDecAttention"))
                required[f"{block}.1.layer_norm.weight"] = [d_model]
                last = 2
            required.update(feed_forward(f"{block}.{last}.DenseReluDense"))
            required[f"{block}.{last}.layer_norm.weight"] = [d_model]
        required[f"{stack}.final_layer_norm.weight"] = [d_model]
    aliases = {"encoder.embed_tokens.weight": [vocab, d_model], "decoder.embed_tokens.weight": [vocab, d_model]}
    if config.get("tie_word_embeddings", True) is False:
        required["lm_head.weight"] = [vocab, d_model]
    else:
        aliases["lm_head.weight"] = [vocab, d_model]
    return required, aliases


# ----------------------------------------------------------------------------- shape and FLOPs for `termtune plan`

# Shapes of the Hub checkpoints termtune is made for, so a Hub id plans without a download.
# From each google/flan-t5-* config.json on the Hub (small, base, large also in ../shared/models).
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "google/flan-t5-small": {"d_model": 512, "d_ff": 1024, "d_kv": 64, "num_heads": 6, "num_layers": 8,
                             "num_decoder_layers": 8},
    "google/flan-t5-base": {"d_model": 768, "d_ff": 2048, "d_kv": 64, "num_heads": 12, "num_layers": 12,
                            "num_decoder_layers": 12},
    "google/flan-t5-large": {"d_model": 1024, "d_ff": 2816, "d_kv": 64, "num_heads": 16, "num_layers": 24,
                             "num_decoder_layers": 24},
    "google/flan-t5-xl": {"d_model": 2048, "d_ff": 5120, "d_kv": 64, "num_heads": 32, "num_layers": 24,
                          "num_decoder_layers": 24},
    "google/flan-t5-xxl": {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
                           "num_decoder_layers": 24},
}
KNOWN_SHAPES_SOURCE = "config.json of each google/flan-t5-* repository on the Hugging Face Hub (read 2026-11-29)"
FLAN_DEFAULTS = {"vocab_size": 32128, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
                 "dropout_rate": 0.1, "tie_word_embeddings": False}

# Saved activations per token per layer, in tensors of each width, counted from the autograd graph
# (torch.autograd.graph.saved_tensors_hooks) of transformers 5.24's T5 (sdpa attention) under peft 0.21 LoRA on all
# linear layers, torch 2.13: 42 layer/shape combinations fitted to within 7 % (a one-off count of 2026-11-29, not kept
# as a script; benchmarks/bench_plan.py checks the memory plan these counts make against the measured peak RSS).
# "on": LoRA dropout and model dropout both > 0; "off": both 0.
#   e_*: per encoder token per encoder layer; t_*: per decoder token per decoder layer;
#   s_*: per encoder token per decoder layer (the cross-attention keys and values); *_HS: per (query, key) per head.
ACTIVATION_COUNTS = {
    "on": dict(e_d=14, e_inner=5, e_ff=9, e_r=7, e_HS=3, t_d=18, t_inner=8, t_ff=9, t_r=9, t_HT=3, t_HS=3,
               s_d=4, s_inner=2, s_r=2),
    "off": dict(e_d=4, e_inner=4, e_ff=7, e_r=7, e_HS=1, t_d=6, t_inner=6, t_ff=7, t_r=9, t_HT=1, t_HS=2,
                s_d=0, s_inner=2, s_r=2),
}
ACTIVATION_COUNTS_SOURCE = ("counted 2026-11-29 with saved-tensor hooks on tiny T5s (transformers 5.24.0, peft 0.21.2, "
                            "torch 2.13.0): see docs/plan.md")


@dataclass(frozen=True)
class Shape:
    """A T5's shape as `termtune plan` counts it (parameters, LoRA, activations, FLOPs)."""

    d_model: int
    d_ff: int
    d_kv: int
    num_heads: int
    num_layers: int
    num_decoder_layers: int
    vocab_size: int = 32128
    gated: bool = True
    buckets: int = 32
    dropout: float = 0.1
    origin: str = ""

    packs: ClassVar[bool] = False
    """An encoder-decoder's source and target are two streams: no packing to plan."""
    activations_measured: ClassVar[bool] = True
    """ACTIVATION_COUNTS were counted on real T5s."""

    def own_loss(self, on_gpu: bool) -> bool:
        return False  # trained on termtune's chunked loss: termtune.plan.loss_bytes

    @property
    def inner(self) -> int:
        return self.num_heads * self.d_kv

    def describe(self) -> str:
        """One line for `termtune plan`'s summary."""
        return (f"T5 {self.num_layers}+{self.num_decoder_layers} layers, d_model {self.d_model}, d_ff {self.d_ff}, "
                f"{self.num_heads} heads ({self.origin})")

    def check_lora_rank(self, r: int, targets: str | list[str]) -> None:
        """Refuse a LoRA rank above the narrowest targeted layer's width: it adds parameters, not capacity.
        Targets that name no T5 layer here (a PEFT suffix such as SelfAttention.q) are bounded by the widest layer;
        termtune.modeling.check_model_settings matches them to the model's layers as PEFT does."""
        layers = [(name, n_in, n_out) for name, n_in, n_out, _ in self.linear_layers()]
        targeted = [layer for layer in layers if targets == "all-linear" or layer[0] in targets]
        if targeted:
            refuse_rank(r, *min(targeted, key=lambda layer: min(layer[1:])))
        else:
            refuse_rank(r, *max(layers, key=lambda layer: min(layer[1:])))

    def linear_layers(self) -> list[tuple[str, int, int, int]]:
        """(module name, in_features, out_features, how many) for every nn.Linear of the T5 except lm_head."""
        ff_in = ["wi_0", "wi_1"] if self.gated else ["wi"]
        enc, dec = self.num_layers, self.num_decoder_layers
        rows = [(n, self.d_model, self.inner, enc + 2 * dec) for n in ("q", "k", "v")]
        rows.append(("o", self.inner, self.d_model, enc + 2 * dec))
        rows += [(n, self.d_model, self.d_ff, enc + dec) for n in ff_in]
        rows.append(("wo", self.d_ff, self.d_model, enc + dec))
        return rows

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by part for an untied T5 (Flan-T5): embeddings, linear layers, norms and position biases,
        lm_head."""
        linear = sum(i * o * n for _, i, o, n in self.linear_layers())
        # one norm per sublayer + each stack's final; position biases in each stack's first layer only
        norms = self.d_model * (2 * self.num_layers + 3 * self.num_decoder_layers + 2)
        biases = self.buckets * self.num_heads * (int(self.num_layers > 0) + int(self.num_decoder_layers > 0))
        embedding = lm_head = self.vocab_size * self.d_model
        return {"embedding": embedding, "linear": linear, "norms_and_biases": norms + biases, "lm_head": lm_head,
                "total": embedding + linear + norms + biases + lm_head}

    def lora_parameters(self, r: int, targets: str | list[str]) -> int:
        """r * (in + out) per adapted nn.Linear; 'all-linear' is every Linear but the output layer (peft's rule)."""
        wanted = None if targets == "all-linear" else set(targets)
        return sum(r * (i + o) * n for name, i, o, n in self.linear_layers() if wanted is None or name in wanted)

    def lora_per_side(self, r: int, targets: str | list[str]) -> tuple[int, int]:
        """LoRA parameters applied to each source token and to each target token."""
        wanted = None if targets == "all-linear" else set(targets)
        src = tgt = 0
        for name, i, o, _ in self.linear_layers():
            if wanted is not None and name not in wanted:
                continue
            per = r * (i + o)
            if name in ("q", "k", "v", "o"):
                src += per * self.num_layers + per * self.num_decoder_layers * (name in ("k", "v"))  # enc + cross k, v
                tgt += per * self.num_decoder_layers * (1 + (name in ("q", "o")))  # self + cross q, o
            else:
                src, tgt = src + per * self.num_layers, tgt + per * self.num_decoder_layers
        return src, tgt

    def activation_bytes(self, rows: int, src: int, tgt: int, r: int, dropout_on: bool, bf16: bool,
                         checkpointing: bool) -> int:
        """Bytes the autograd graph holds for one batch (rows x src source, rows x tgt target tokens).

        d_model-wide tensors (residual stream, normed inputs, dropout copies) stay fp32 under bf16 autocast (T5's
        weights are fp32 here); matmul outputs (q/k/v, feed-forward, LoRA, attention) are bf16 under autocast.
        """
        k = ACTIVATION_COUNTS["on" if dropout_on else "off"]
        wide, narrow = 4, (2 if bf16 else 4)
        h = self.num_heads
        enc_tok = k["e_d"] * self.d_model * wide + (k["e_inner"] * self.inner + k["e_ff"] * self.d_ff + k["e_r"] * r
                                                 + k["e_HS"] * h * src) * narrow
        dec_tok = k["t_d"] * self.d_model * wide + (k["t_inner"] * self.inner + k["t_ff"] * self.d_ff + k["t_r"] * r
                                                 + k["t_HT"] * h * tgt + k["t_HS"] * h * src) * narrow
        cross_tok = k["s_d"] * self.d_model * wide + (k["s_inner"] * self.inner + k["s_r"] * r) * narrow
        enc_layer = rows * src * enc_tok
        dec_layer = rows * (tgt * dec_tok + src * cross_tok)
        if checkpointing:
            # Each layer keeps only its input; one layer's graph is rebuilt at a time in the backward pass.
            kept = rows * (src * self.num_layers + tgt * self.num_decoder_layers) * self.d_model * wide
            return int(kept + max(enc_layer, dec_layer))
        return int(self.num_layers * enc_layer + self.num_decoder_layers * dec_layer)

    def training_flops(self, b: Any, r: int, targets: str | list[str],
                       head_trained: bool = False) -> tuple[float, float]:
        """(training FLOPs of one epoch, the forward work gradient checkpointing recomputes) for `b`, one epoch's
        termtune.plan.Batching.

        Frozen base: forward 2 FLOP/weight/token plus the backward's input gradient, 2 more; no weight gradient
        (the saving LoRA brings: 4 instead of 6). Encoder weights see the padded source tokens, decoder weights the
        padded target tokens, the cross-attention k/v the source tokens once per decoder layer, the lm_head only the
        real target tokens (termtune's loss drops padding before the lm_head). LoRA: 6 per adapter weight per token.
        Attention scores and mixing: 2 x 2 x length x inner per token per attention, x3 for training.
        A trained lm_head (lora.modules_to_save) also gets its weight gradient, 6 in all, and runs on the standard
        loss path, which makes logits for the padded target tokens too.
        """
        d, inner, ff = self.d_model, self.inner, self.d_ff
        ffn = (3 if self.gated else 2) * d * ff
        enc_w = self.num_layers * (4 * d * inner + ffn)
        dec_w = self.num_decoder_layers * (4 * d * inner + 2 * d * inner + ffn)
        cross_kv = self.num_decoder_layers * 2 * d * inner
        base_pass = 2 * ((enc_w + cross_kv) * b.padded_source + dec_w * b.padded_target)
        head_pass = 2 * self.vocab_size * d * (b.padded_target if head_trained else b.real_target)
        lora_src, lora_tgt = self.lora_per_side(r, targets)
        lora = 6 * (lora_src * b.padded_source + lora_tgt * b.padded_target)
        ss, tt, st = b.attention_pairs
        attention = 3 * 4 * inner * (self.num_layers * ss + self.num_decoder_layers * (tt + st))
        total = 2 * base_pass + (3 if head_trained else 2) * head_pass + lora + attention
        return float(total), float(2 * (base_pass + attention / 3))


def plan_shape(cfg: Config) -> Shape:
    """The T5 shape the run will train: the architecture file (+ overrides), the local config, or a known Hub id."""
    m = cfg.model
    if m.init != "random" and m.source in KNOWN_SHAPES and not Path(m.source).expanduser().exists():
        values, origin = {**FLAN_DEFAULTS, **KNOWN_SHAPES[m.source]}, f"{m.source} (known shape)"
    else:
        values, origin = base_config_json(cfg)
        values.update(m.architecture_overrides if m.init == "random" else {})
        origin = origin if m.init == "random" else m.source
    values = {**FLAN_DEFAULTS, **values}
    if values.get("num_decoder_layers") is None:  # T5's default: as many as the encoder
        values["num_decoder_layers"] = values.get("num_layers")
    missing = [key for key in SIZE_KEYS if key not in values]
    if missing:
        raise UserError(f"{origin}: not a T5 config (no {', '.join(missing)})")
    # a size of 0 or -2, or 10**30, names its key here rather than planning a model that cannot exist
    check_shape(values, origin, m.architecture_overrides if m.init == "random" else {})
    return Shape(d_model=values["d_model"], d_ff=values["d_ff"], d_kv=values["d_kv"], num_heads=values["num_heads"],
                 num_layers=values["num_layers"], num_decoder_layers=values["num_decoder_layers"],
                 vocab_size=values["vocab_size"], gated=str(values["feed_forward_proj"]).startswith("gated"),
                 buckets=values["relative_attention_num_buckets"], dropout=float(values["dropout_rate"]),
                 origin=origin)
