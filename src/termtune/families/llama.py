"""The decoder-only families Bedrock imports: Llama (2, 3.x; SmolLM2), Mistral, Qwen2/Qwen2.5 and Qwen3 (dense).

One prompt and its answer are one token stream: the prompt rendered through the model's chat template up to the
assistant's generation prompt, then the answer and the template's end-of-turn token. The loss is on the answer only
(the prompt's labels are -100), which TRL's `assistant_only_loss` cannot give for the Llama 3.1+ and Mistral
templates; the rendering is termtune.conversations'. Training runs on TRL's SFTTrainer (termtune's additions attach
to it as to any Trainer); the export is termtune.families.decoder_export's `write_decoder`, which writes what
Bedrock's transformers 4.51.3 reads as the trained model; the import rules are decoder_export's problems and
warnings plus AWS's accepted architectures (termtune.serve_rules).

The four differ only in names (model_type, architecture, what the report calls them) and in their tensor tables
(Qwen2's attention biases, Qwen3's q/k norms), so they are four instances of one class.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from termtune.chat_template import PROBLEMS, ChatTemplate
from termtune.config import Config
from termtune.errors import UserError
from termtune.families.base import (FAIL, OK, WARN, Family, base_config_json, cached_hub_config,
                                    check_lora_targets, model_config, refuse_rank)
from termtune.families.decoder_export import (config_problems, decoder_warnings, end_of_turn_problems,
                                              is_sentencepiece, patch_config, tokenizer_config_problems, write_decoder)
from termtune.rundir import sha256_file
from termtune.serve_rules import ARCHITECTURES

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

EMPTY_REASONING = re.compile(r"^\s*<think>\s*</think>")
"""An answer's opening reasoning block with nothing in it (Qwen3)."""
TRL_LOSS_CHUNK = 32768
"""Positions TRL 1.16's fused lm_head scores at once (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)."""
MAX_SIZE = 2**24
"""The largest size a shape may give (the widest real layers are tens of thousands; vocabularies a few hundred
thousand): far above that is a typo, not a model."""
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
LINEAR_LAYERS_HINT = "(the decoder's linear layers: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, " \
                     "or all-linear)"

NOT_IMPORTED = {
    "gpt_oss": "GPT-OSS needs transformers 4.55 or newer; Bedrock serves imported models with 4.51.3, and AWS "
               "takes GPT-OSS only as 20B/120B MXFP4 checkpoints in us-east-1",
    "gemma": "Bedrock Custom Model Import does not accept Gemma (GemmaForCausalLM) models",
    "gemma2": "Bedrock Custom Model Import does not accept Gemma 2 (Gemma2ForCausalLM) models",
    "gemma3": "Bedrock Custom Model Import does not accept Gemma 3 models",
    "gemma3_text": "Bedrock Custom Model Import does not accept Gemma 3 models",
    "phi": "Bedrock Custom Model Import does not accept Phi (PhiForCausalLM) models",
    "phi3": "Bedrock Custom Model Import does not accept Phi-3/Phi-4 (Phi3ForCausalLM) models",
    "gpt2": "Bedrock Custom Model Import does not accept GPT-2 models (GPTBigCode is the GPT-2 variant it takes)",
}
"""model_type -> why termtune refuses to train it: Bedrock would not import the result (AWS's "Supported
architectures"; reference in docs/families.md)."""


class DecoderFamily(Family):
    auto_class = "AutoModelForCausalLM"
    lora_task_type = "CAUSAL_LM"
    tokenizer_class = None  # write_decoder picks one 4.51.3 loads
    bedrock_attention = "sdpa"
    pipeline_tag = "text-generation"
    generation_padding_side = "left"  # a decoder continues the prompt: pad before it, never between it and the answer
    chat_data = True  # rows are conversations rendered through the tokenizer's chat template
    packs = True  # one causal stream per example: examples can sit end to end with position ids restarting

    def __init__(self, name: str, model_type: str, architecture: str, display_name: str,
                 extra_tensors: Callable[[str, int, int, int], dict[str, list[int]]] | None = None) -> None:
        self.name = name
        self.model_types = (model_type,)
        self.architectures = (architecture,)
        self.display_name = display_name
        self.card_tags = (model_type,)
        self._extra_tensors = extra_tensors

    def describe_config(self, config: dict[str, Any]) -> str:
        return (f"{self.display_name} ({config.get('num_hidden_layers', '?')} layers, "
                f"hidden {config.get('hidden_size', '?')})")

    # ------------------------------------------------------------------------- model

    def architecture_config(self, cfg: Config) -> Any:
        from transformers import AutoConfig

        values, config_file = base_config_json(cfg)
        model_type = values.get("model_type")
        if model_type not in self.model_types:
            raise UserError(f"{config_file}: model_type is {model_type!r}; expected {self.model_types[0]!r}")
        known = set(AutoConfig.for_model(model_type).to_dict()) | set(values)
        for key in cfg.model.architecture_overrides:
            if key not in known:
                guess = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f" (did you mean {guess[0]}?)" if guess else ""
                raise UserError(f"model.architecture_overrides: {key!r} is not a {self.display_name} config key{hint}")
        values.update(cfg.model.architecture_overrides)
        values.pop("model_type")
        try:
            return AutoConfig.for_model(model_type, **values)
        except Exception as e:  # noqa: BLE001 - the config classes raise their own validation errors
            raise UserError(f"model.architecture_overrides: not a valid {self.display_name} shape: "
                            f"{' '.join(str(e).split())}") from e

    def check_model_settings(self, cfg: Config) -> None:
        """Sizes, then which layers lora.target_modules selects (PEFT's own matching on a meta-device model)."""
        import torch
        from transformers import AutoModelForCausalLM

        config = model_config(self, cfg)
        origin = cfg.model.architecture or cfg.model.source
        values = config.to_dict()
        for key in SIZE_KEYS:
            size = values.get(key)
            if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SIZE:
                raise UserError(f"{origin}: {key}={size!r}: a model size must be a whole number from 1 to {MAX_SIZE:,}")
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config)
            except (TypeError, ValueError, RuntimeError) as e:
                raise UserError(f"{origin}: cannot build the model from its config: {str(e).splitlines()[0]}") from e
            check_lora_targets(self, cfg, model, LINEAR_LAYERS_HINT)

    def build_random(self, config: Any) -> "PreTrainedModel":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(config)

    # ------------------------------------------------------------------------- data and training

    def encode(self, tokenizer: Any, prompts: list[str], targets: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt ids, answer ids): the prompt as the user's turn rendered through the chat template up to the
        assistant's generation prompt (what Bedrock's server renders for a `messages` request), the answer and the
        template's end-of-turn token, as termtune.conversations renders a term row for the data stage (which
        writes its rows, and cuts them); `termtune plan` estimates lengths with this."""
        template = ChatTemplate.of(tokenizer)
        template.check()
        sources, answers = [], []
        for prompt, target in zip(prompts, targets):
            try:
                rendered = template.render([{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": target}])
            except ValueError as e:
                raise UserError(f"the chat template of {template.name} refuses the row {prompt!r} ({e})") from e
            if rendered.problem:
                raise UserError(f"the row {prompt!r}: {PROBLEMS[rendered.problem]}")
            sources.append(rendered.ids[:rendered.start])
            answers.append(rendered.ids[rendered.start:rendered.end])
        return sources, answers

    def padded_tokens(self, source_lengths: list[int], target_lengths: list[int]) -> int:
        # one stream per row: prompt and answer side by side, padded to the longest row
        return len(source_lengths) * max(s + t for s, t in zip(source_lengths, target_lengths))

    def collator(self, tokenizer: Any, model: Any, packed: bool = False) -> Any:
        import torch

        if packed:
            return PackedCompletionCollator()
        return CompletionCollator(tokenizer.pad_token_id, 8 if torch.cuda.is_available() else None)

    def trainer_classes(self) -> tuple[type, type]:
        from trl import SFTTrainer

        return SFTTrainer, sft_arguments_class()

    def refuse_precision(self, what: str, dtype: str) -> str | None:
        # Llama, Mistral and Qwen are trained and published in bf16; fp16 (with fp32 master weights in training)
        # runs them, and Bedrock imports fp16 weights. Nothing is refused.
        return None

    def takes_chunked_loss(self, base: Any) -> bool:
        # TRL's fused LM head scores only the answer positions where it runs its Triton kernel (CUDA, XPU). Elsewhere
        # its torch fallback scores every position, prompts included, in several passes over each vocabulary tile,
        # and recomputes the tiles in the backward: termtune's chunked loss over the answer positions gave 1.25-1.31x
        # the examples/s on SmolLM2 (BENCHMARKS.md, "Decoder loss on a CPU"). On a GPU TRL's kernel is kept.
        return base.device.type not in ("cuda", "xpu")

    def chunked_loss_inputs(self, base: Any, labels: "torch.Tensor", inputs: dict[str, Any]) -> "torch.Tensor":
        import torch

        # position t predicts token t + 1; a packed batch's example starts are labelled -100, so no position is
        # scored on the next example's first token. num_items_in_batch stays: like TRL's loss, the chunked loss
        # divides by the tokens of the whole accumulated batch when the Trainer gives their count.
        return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)

    # ------------------------------------------------------------------------- generation

    def generation_settings(self, model: Any) -> dict[str, Any]:
        return {}

    def answer_ids(self, output: "torch.Tensor", prompt_width: int) -> "torch.Tensor":
        return output[:, prompt_width:]  # generate returns the (left-padded) prompt, then the answer

    def answer_text(self, text: str) -> str:
        # Qwen3's template writes an empty reasoning block before every answer it renders without reasoning, so
        # a model trained on those rows opens its answers with one: not part of the answer a person reads
        return EMPTY_REASONING.sub("", text, count=1).strip()

    # ------------------------------------------------------------------------- export

    def export_tokenizer_files(self, tokenizer_source: str) -> dict[str, Path]:
        return {}  # write_decoder copies tokenizer.model itself where the tokenizer is SentencePiece

    def write_artifact(self, model: Any, tokenizer: Any, folder: Path, dtype: str,
                       max_shard_bytes: int) -> dict[str, dict[str, Any]] | None:
        import json
        import struct

        write_decoder(model, tokenizer, folder, dtype=dtype, max_shard_size=max_shard_bytes)
        weights = {}
        for path in sorted(folder.glob("*.safetensors")):
            with path.open("rb") as f:  # the header: its length (8 bytes, little-endian), then JSON
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            weights[path.name] = {"sha256": sha256_file(path), "size": path.stat().st_size,
                                  "dtype": next(iter(tensors.values()))["dtype"] if tensors else "",
                                  "shapes": {k: v["shape"] for k, v in tensors.items()}}
        return weights

    def is_tied(self, model: Any) -> bool:
        return bool(model.config.tie_word_embeddings)

    def shared_views(self, state: dict[str, Any]) -> set[str]:
        return set()

    def fix_model_config(self, config: dict[str, Any]) -> None:
        patched = patch_config(config, config.get("torch_dtype") or config.get("dtype") or "float32")
        config.clear()
        config.update(patched)
        config["architectures"] = list(self.architectures)

    # ------------------------------------------------------------------------- Bedrock import rules

    tokenizer_files = ("tokenizer.json", "tokenizer_config.json")
    embeddings = "model.embed_tokens.weight"  # the token embeddings' tensor
    tied_by_default = False  # what 4.51.3 reads when config.json has no tie_word_embeddings

    def cmi_rules(self) -> dict[str, Callable[[Any], tuple[str, str]]]:
        return {"architecture": self._architecture, "attention shape": _attention_shape, "head count": _head_count,
                "torch_dtype": _config_for_4_51_3, "weight dtype": _weight_dtype,
                "tie flag": partial(_tie_flag, embeddings=self.embeddings, tied_by_default=self.tied_by_default),
                "tokenizer files": _tokenizer_files, "tokenizer_config.json": _tokenizer_config,
                "generation_config.json": _generation_config,
                "vocabulary vs embeddings": partial(_vocabulary, embeddings=self.embeddings),
                "special token ids": _special_token_ids}

    def _architecture(self, f: Any) -> tuple[str, str]:
        c = f.config or {}
        architectures = c.get("architectures")
        if not isinstance(architectures, list) or not architectures:
            return FAIL, "config.json has no architectures list (Bedrock's import detects the model by it)"
        if architectures[0] not in ARCHITECTURES:
            return FAIL, f"{architectures[0]} is not an architecture Bedrock Custom Model Import accepts"
        if architectures[0] not in self.architectures:
            return FAIL, f"architectures is {architectures!r} but model_type {c.get('model_type')!r} is " \
                         f"{self.architectures[0]}"
        return OK, f"{c.get('model_type')} / {architectures[0]} ({ARCHITECTURES[architectures[0]][1]})"

    def tensor_table(self, config: dict[str, Any]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        return decoder_tensors(config, self._extra_tensors)

    # ------------------------------------------------------------------------- termtune plan

    def plan_shape(self, cfg: Config) -> "DecoderShape":
        m = cfg.model
        if m.init != "random" and not Path(m.source).expanduser().exists() and not m.source.endswith(".gguf"):
            if cached_hub_config(m.source) is None:
                raise UserError(f"model.source: {m.source}: termtune plan knows no {self.display_name} shape by "
                                "name; point model.source at a local folder, or download it once")
        values, origin = base_config_json(cfg)
        values = {**values, **(m.architecture_overrides if m.init == "random" else {})}
        origin = origin if m.init == "random" else m.source
        for key in SIZE_KEYS:
            size = values.get(key)
            if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SIZE:
                raise UserError(f"{origin}: {key}={size!r}: a model size must be a whole number from 1 to {MAX_SIZE:,}")
        heads = values["num_attention_heads"]
        return DecoderShape(
            hidden=values["hidden_size"], intermediate=values["intermediate_size"], layers=values["num_hidden_layers"],
            heads=heads, kv_heads=values.get("num_key_value_heads") or heads,
            head_dim=values.get("head_dim") or values["hidden_size"] // heads, vocab_size=values["vocab_size"],
            tied=bool(values.get("tie_word_embeddings", False)), qkv_bias=self.name == "qwen2",
            qk_norm=self.name in ("qwen3", "qwen3_moe"), dropout=float(values.get("attention_dropout") or 0.0),
            name=self.display_name, origin=origin)

    def plan_sources(self) -> dict[str, str]:
        return {"DecoderShape": "counted from the layer shapes (no measured constants; see DecoderShape)"}


# ----------------------------------------------------------------------------- training


def sft_arguments_class() -> type:
    """TRL's SFTConfig, set for the data the data stage prepared: already tokenized (prompt and answer ids), so
    TRL's own dataset preparation (tokenizing, truncating) is skipped and termtune's collator builds the labels."""
    made = globals().get("PreparedDataSFTConfig")
    if made is None:  # made once, on first use (importing trl takes seconds), under a name pickle finds
        from trl import SFTConfig

        @dataclass
        class PreparedDataSFTConfig(SFTConfig):
            dataset_kwargs: dict[str, Any] | None = field(default_factory=lambda: {"skip_prepare_dataset": True})

        PreparedDataSFTConfig.__qualname__ = PreparedDataSFTConfig.__name__
        made = globals()["PreparedDataSFTConfig"] = PreparedDataSFTConfig
    return made


class CompletionCollator:
    """Joins each row's prompt ids (input_ids) and answer ids (labels) into one sequence, labels -100 on the prompt,
    padded on the right to the batch's longest row (pad positions: attention mask 0, labels -100)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, "torch.Tensor"]:
        import torch

        width = max(len(r["input_ids"]) + len(r["labels"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            prompt, answer = list(r["input_ids"]), list(r["labels"])
            n = len(prompt) + len(answer)
            input_ids[i, :n] = torch.tensor(prompt + answer, dtype=torch.long)
            attention_mask[i, :n] = 1
            labels[i, len(prompt):n] = torch.tensor(answer, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PackedCompletionCollator:
    """The batch as one row (train.packing): each example's prompt and answer ids end to end, with no padding and
    no attention mask. Position ids restart at 0 for every example, and from them transformers builds attention
    that stays within each example (masking_utils' packed-sequence detection, which needs no attention mask and no
    cache: TRL's SFTTrainer passes use_cache=False). Every example's first label is -100 whatever it is, so no
    token is ever scored as a continuation of the example before it."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, "torch.Tensor"]:
        import torch

        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for r in rows:
            prompt, answer = list(r["input_ids"]), list(r["labels"])
            input_ids += prompt + answer
            labels += [-100] * len(prompt) + answer
            labels[len(input_ids) - len(prompt) - len(answer)] = -100
            positions += range(len(prompt) + len(answer))
        return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions])}


# ----------------------------------------------------------------------------- Bedrock Custom Model Import rules


def positive_int(config: dict[str, Any], key: str, default: Any = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.json: {key} is {value!r}, not a positive whole number")
    return value


def _attention_shape(f: Any) -> tuple[str, str]:
    c = f.config or {}
    try:
        hidden, heads = positive_int(c, "hidden_size"), positive_int(c, "num_attention_heads")
        kv = positive_int(c, "num_key_value_heads", heads)
        head_dim = c.get("head_dim") or hidden // heads
    except ValueError as e:
        return FAIL, str(e)
    if heads % kv:
        return FAIL, f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
    if not c.get("head_dim") and hidden % heads:
        return FAIL, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
    context = [w for w in decoder_warnings(f.path) if w.startswith(("max_position", "rope_scaling"))]
    if context:
        return WARN, "; ".join(context)
    return OK, f"{heads} heads ({kv} key/value) of {head_dim}"


def _head_count(f: Any) -> tuple[str, str]:
    c = f.config or {}
    try:
        layers, heads = positive_int(c, "num_hidden_layers"), positive_int(c, "num_attention_heads")
        return OK, f"{layers} layers of {heads} heads"
    except ValueError as e:
        return FAIL, str(e)


def _config_for_4_51_3(f: Any) -> tuple[str, str]:
    c = f.config or {}
    problems = config_problems(c)
    if problems:
        return FAIL, "; ".join(problems)
    if c.get("torch_dtype") not in ("float32", "bfloat16", "float16"):
        return FAIL, f"torch_dtype is {c.get('torch_dtype')!r}; use bfloat16, float16 or float32"
    return OK, f"torch_dtype {c['torch_dtype']}; RoPE settings where 4.51.3 reads them"


def _weight_dtype(f: Any) -> tuple[str, str]:
    dtypes = sorted({dtype for dtype, _, _ in f.tensors.values()})
    if not dtypes:
        return FAIL, "no tensors found"
    bad = [d for d in dtypes if d not in ("F32", "BF16", "F16")]
    if bad:
        return FAIL, f"{', '.join(bad)} weights (quantized or unsupported): export full-precision BF16, F16 or F32"
    return OK, f"weights in {', '.join(dtypes)}"


def _tie_flag(f: Any, embeddings: str, tied_by_default: bool) -> tuple[str, str]:
    if embeddings not in f.tensors:
        return FAIL, f"{embeddings} (the token embeddings) is not in the weights"
    has_head = "lm_head.weight" in f.tensors
    tied = (f.config or {}).get("tie_word_embeddings", tied_by_default)
    if not has_head and not tied:
        return FAIL, "tie_word_embeddings is false but lm_head.weight is missing: the output layer would be random"
    if has_head and tied:
        return FAIL, ("lm_head.weight is in the weights but tie_word_embeddings is true: transformers ties the output "
                      "layer to the embeddings and ignores it")
    return OK, "tied embeddings, no lm_head.weight" if tied else "untied lm_head.weight present"


def _tokenizer_files(f: Any) -> tuple[str, str]:
    missing = [n for n in ("tokenizer.json", "tokenizer_config.json") if n not in f.files]
    if missing:
        return FAIL, f"missing {', '.join(missing)}"
    value, error = f.json("tokenizer.json")
    if error or not isinstance(value, dict):
        return FAIL, error or "tokenizer.json is not a JSON object"
    if is_sentencepiece(value) and "tokenizer.model" not in f.files:
        return FAIL, "tokenizer.json is SentencePiece-based but tokenizer.model is missing (Bedrock lists it)"
    return OK, "tokenizer.json, tokenizer_config.json" + (", tokenizer.model" if "tokenizer.model" in f.files else "")


def _tokenizer_config(f: Any) -> tuple[str, str]:
    value, error = f.json("tokenizer_config.json")
    if error or not isinstance(value, dict):
        return FAIL, error or "tokenizer_config.json is not a JSON object"
    problems = tokenizer_config_problems(f.path, value)
    if problems:
        return FAIL, "; ".join(problems)
    if not value.get("chat_template"):
        return WARN, (f"{value.get('tokenizer_class')}, no chat_template: Bedrock's messages format and Converse "
                      "need one (prompt formats still work)")
    return OK, f"{value.get('tokenizer_class')} with its chat template, readable by transformers 4.51.3"


def _generation_config(f: Any) -> tuple[str, str]:
    files = {}
    for name in ("generation_config.json", "tokenizer_config.json", "tokenizer.json"):
        value, error = f.json(name)
        if error or not isinstance(value, dict):
            return FAIL, error or f"{name} is not a JSON object"
        files[name] = value
    problems = end_of_turn_problems(f.path, files["tokenizer_config.json"], files["tokenizer.json"],
                                     files["generation_config.json"])
    if problems:
        return FAIL, "; ".join(problems)
    return OK, f"eos_token_id {files['generation_config.json'].get('eos_token_id')} includes the end-of-turn token"


def _vocabulary(f: Any, embeddings: str) -> tuple[str, str]:
    vocabulary, error = f.vocabulary
    if error:
        return FAIL, error
    if embeddings not in f.tensors:
        return FAIL, f"no {embeddings} to hold tokenizer.json's tokens"
    rows, size = f.tensors[embeddings][1][0], max(vocabulary.values()) + 1
    if rows < size:
        return FAIL, f"tokenizer.json has token ids up to {size - 1} but the embeddings have {rows} rows"
    return OK, f"the embeddings' {rows} rows hold every tokenizer.json id (0-{size - 1})"


def _special_token_ids(f: Any) -> tuple[str, str]:
    vocabulary, error = f.vocabulary
    if error:
        return FAIL, error
    size = max(vocabulary.values()) + 1
    problems = []
    for file in ("config.json", "generation_config.json"):
        values, _ = f.json(file)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = values.get(key) if isinstance(values, dict) else None
            ids = value if isinstance(value, list) else [] if value is None else [value]
            bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size]
            if bad:
                problems.append(f"{file}: {key} {bad[0]!r} is not a token id of tokenizer.json (0-{size - 1})")
    if problems:
        return FAIL, "; ".join(problems)
    return OK, f"special token ids within tokenizer.json's 0-{size - 1}"


# ----------------------------------------------------------------------------- tensor table


def decoder_tensors(config: dict[str, Any], extra: Callable[[str, int, int, int], dict[str, list[int]]] | None
                    ) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """A Llama-layout decoder as transformers 4.51.3 saves it: embeddings, per layer q/k/v/o and a gated MLP with two
    norms, the final norm, and lm_head.weight unless tie_word_embeddings ties it to the embeddings."""
    vocab, hidden = positive_int(config, "vocab_size"), positive_int(config, "hidden_size")
    heads = positive_int(config, "num_attention_heads")
    kv = positive_int(config, "num_key_value_heads", heads)
    head_dim = positive_int(config, "head_dim", hidden // heads) if config.get("head_dim") else hidden // heads
    ff = positive_int(config, "intermediate_size")
    required = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden]}
    for i in range(positive_int(config, "num_hidden_layers")):
        p = f"model.layers.{i}"
        required.update({
            f"{p}.self_attn.q_proj.weight": [heads * head_dim, hidden],
            f"{p}.self_attn.k_proj.weight": [kv * head_dim, hidden],
            f"{p}.self_attn.v_proj.weight": [kv * head_dim, hidden],
            f"{p}.self_attn.o_proj.weight": [hidden, heads * head_dim],
            f"{p}.mlp.gate_proj.weight": [ff, hidden], f"{p}.mlp.up_proj.weight": [ff, hidden],
            f"{p}.mlp.down_proj.weight": [hidden, ff],
            f"{p}.input_layernorm.weight": [hidden], f"{p}.post_attention_layernorm.weight": [hidden]})
        if extra:
            required.update(extra(p, heads, kv, head_dim))
    aliases: dict[str, list[int]] = {}
    if config.get("tie_word_embeddings", False):
        aliases["lm_head.weight"] = [vocab, hidden]
    else:
        required["lm_head.weight"] = [vocab, hidden]
    return required, aliases


def _qwen2_biases(p: str, heads: int, kv: int, head_dim: int) -> dict[str, list[int]]:
    return {f"{p}.self_attn.q_proj.bias": [heads * head_dim], f"{p}.self_attn.k_proj.bias": [kv * head_dim],
            f"{p}.self_attn.v_proj.bias": [kv * head_dim]}


def qwen3_norms(p: str, heads: int, kv: int, head_dim: int) -> dict[str, list[int]]:
    return {f"{p}.self_attn.q_norm.weight": [head_dim], f"{p}.self_attn.k_norm.weight": [head_dim]}


LLAMA = DecoderFamily("llama", "llama", "LlamaForCausalLM", "Llama")
MISTRAL = DecoderFamily("mistral", "mistral", "MistralForCausalLM", "Mistral")
QWEN2 = DecoderFamily("qwen2", "qwen2", "Qwen2ForCausalLM", "Qwen2", _qwen2_biases)
QWEN3 = DecoderFamily("qwen3", "qwen3", "Qwen3ForCausalLM", "Qwen3", qwen3_norms)


# ----------------------------------------------------------------------------- shape and FLOPs for `termtune plan`


@dataclass(frozen=True)
class DecoderShape:
    """A Llama-layout decoder's shape as `termtune plan` counts it. Counted, not measured: parameters and LoRA
    weights exactly from the layer shapes; FLOPs by the usual rule (2 per weight per token forward, 2 more for the
    input gradient of a frozen weight, 6 in all for a trained one); activations as a per-layer tally of the tensors
    autograd keeps (an estimate: the T5 counts were measured, these are not yet)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tied: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    dropout: float = 0.0
    name: str = "decoder"
    origin: str = ""

    packs: ClassVar[bool] = True
    """Prompt and answer are one stream, so rows can be packed (training_flops(..., packed=True) counts it)."""
    activations_measured: ClassVar[bool] = False
    """activation_bytes is a tally from the layer shapes: an estimate (T5's counts were measured)."""

    def own_loss(self, on_gpu: bool) -> bool:
        """Trained on its trainer's own loss (TRL's fused LM head, whose memory loss_bytes counts) on a GPU; on a
        CPU on termtune's chunked loss (DecoderFamily.takes_chunked_loss), whose memory termtune.plan counts."""
        return on_gpu

    @property
    def d_model(self) -> int:
        return self.hidden

    def describe(self) -> str:
        return (f"{self.name} {self.layers} layers, hidden {self.hidden}, {self.heads} heads "
                f"({self.kv_heads} key/value), vocabulary {self.vocab_size:,} ({self.origin})")

    def linear_layers(self) -> list[tuple[str, int, int, int]]:
        """(module name, in_features, out_features, how many) for every nn.Linear but lm_head."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [("q_proj", self.hidden, q, self.layers), ("k_proj", self.hidden, kv, self.layers),
                ("v_proj", self.hidden, kv, self.layers), ("o_proj", q, self.hidden, self.layers),
                ("gate_proj", self.hidden, self.intermediate, self.layers),
                ("up_proj", self.hidden, self.intermediate, self.layers),
                ("down_proj", self.intermediate, self.hidden, self.layers)]

    def check_lora_rank(self, r: int, targets: str | list[str]) -> None:
        layers = [(name, n_in, n_out) for name, n_in, n_out, _ in self.linear_layers()]
        targeted = [layer for layer in layers if targets == "all-linear" or layer[0] in targets] or layers
        refuse_rank(r, *min(targeted, key=lambda layer: min(layer[1:])))

    def parameter_counts(self) -> dict[str, int]:
        linear = sum(i * o * n for _, i, o, n in self.linear_layers())
        norms = self.hidden * (2 * self.layers + 1) + (2 * self.head_dim * self.layers if self.qk_norm else 0)
        biases = (self.heads + 2 * self.kv_heads) * self.head_dim * self.layers if self.qkv_bias else 0
        embedding = self.vocab_size * self.hidden
        lm_head = 0 if self.tied else embedding
        return {"embedding": embedding, "linear": linear, "norms_and_biases": norms + biases, "lm_head": lm_head,
                "total": embedding + linear + norms + biases + lm_head}

    def active_weights(self) -> int:
        """The weights (lm_head aside) each token passes through: all of a dense model's linear layers."""
        return self.parameter_counts()["linear"]

    def lora_parameters(self, r: int, targets: str | list[str]) -> int:
        """r * (in + out) per adapted nn.Linear; 'all-linear' is every Linear but lm_head (peft's rule)."""
        return sum(r * (i + o) * n for name, i, o, n in self.linear_layers()
                   if targets == "all-linear" or name in targets)

    def activation_bytes(self, rows: int, src: int, tgt: int, r: int, dropout_on: bool, bf16: bool,
                         checkpointing: bool) -> int:
        """Bytes autograd keeps for one batch of rows x (src + tgt) tokens: per token per layer ~10 hidden-wide
        tensors (norm inputs and outputs, residual, attention output), 4 intermediate-wide (gate, up, activation,
        product), q, k, v, the attention weights (heads x sequence, the math attention CPUs run) and 2 per LoRA
        layer of width r."""
        seq = src + tgt
        wide, narrow = 4, (2 if bf16 else 4)
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_token = (10 + 2 * dropout_on) * self.hidden * wide + (4 * self.intermediate + q + 2 * kv
                                                                  + self.heads * seq + 14 * r) * narrow
        layer = rows * seq * per_token
        if checkpointing:
            return int(rows * seq * self.hidden * self.layers * wide + layer)
        return int(self.layers * layer)

    def loss_bytes(self, rows: int, seq: int) -> int:
        """The lm_head and loss working memory of TRL's fused lm_head (SFTTrainer's loss): it scores TRL_LOSS_CHUNK
        positions at a time (every position off CUDA) in fp32, keeping a chunk's logits, their log-softmax and
        gradient, and the fp32 hidden states and their gradient. termtune's batches fit in one chunk."""
        positions = rows * seq
        return int(min(positions, TRL_LOSS_CHUNK) * self.vocab_size * 4 * 3 + 2 * positions * self.hidden * 4)

    def training_flops(self, b: Any, r: int, targets: str | list[str], head_trained: bool = False,
                       packed: bool = False) -> tuple[float, float]:
        """(training FLOPs of one epoch, the forward work gradient checkpointing recomputes) for `b` (one epoch's
        termtune.plan.Batching). Prompt and answer are one stream: as termtune batches them (CompletionCollator)
        every row is padded to the batch's longest and every weight sees every padded position, the lm_head too
        (TRL makes logits at every position); packed, the weights see only the real tokens. Attention is causal:
        half the length^2 score entries of each row (the padded width; packed, the row's own length: each row
        attends to itself only), 2 x 2 x head_dim FLOPs each per head per layer forward, 3x that in training."""
        if packed:
            tokens = b.real_source + b.real_target
            pairs = sum((s + t) ** 2 for batch in b.lengths for s, t in batch)
        else:
            tokens = b.padded_tokens
            pairs = sum(len(batch) * max(s + t for s, t in batch) ** 2 for batch in b.lengths)
        base_pass = 2 * self.active_weights() * tokens
        head_pass = 2 * self.vocab_size * self.hidden * tokens
        lora = 6 * self.lora_parameters(r, targets) * tokens
        attention = 3 * 4 * self.heads * self.head_dim * self.layers * pairs / 2
        total = 2 * base_pass + (3 if head_trained else 2) * head_pass + lora + attention
        return float(total), float(base_pass + attention / 3)
