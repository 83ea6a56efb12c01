"""Models: Hub ids, local folders, or random init from a config; quantization; LoRA.

Public entry points:
    check_model_settings(cfg)                -> None (raises UserError), before any work
    load_tokenizer(cfg)                      -> tokenizer
    base_model_dir(cfg)                      -> where the base weights live
    load_base(cfg, quantization=None, dtype=None) -> T5ForConditionalGeneration
    attach_lora(cfg, model)                  -> PeftModel

A randomly initialised base (model.init=random) is built once, seeded, and saved in the
run directory (`<run>/base-model/`). Every later stage loads that same folder, so the
evaluation baseline, the model that was trained and the model export merges onto are one
and the same set of weights.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from termtune.config import Config
from termtune.errors import UserError
from termtune.layout import RunLayout

MAX_SIZE = 2**24
"""The largest size a T5 shape may give: the widest T5 layer is t5-11b's d_ff of 65,536 and large vocabularies
hold a few hundred thousand tokens; far above that is a typo, not a model."""
SIZE_KEYS = ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers", "vocab_size",
             "relative_attention_num_buckets")

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


BUILT_FROM = "termtune-built-from.json"
"""Written into a random-init base folder: the shape, seed and tokenizer it was built from."""


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(cfg: Config) -> "PreTrainedTokenizerBase":
    """Load the tokenizer with `from_pretrained`.

    `T5Tokenizer(vocab_file=...)` silently builds a broken tokenizer in transformers 5.x
    (every word maps to <unk>), so a folder or Hub id is the only supported form.
    """
    from transformers import AutoTokenizer

    source = cfg.tokenizer_source
    _check_local_or_hub(source, "model.tokenizer" if cfg.model.tokenizer else "model.source")
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: cannot load a tokenizer: {str(e).splitlines()[0]}") from e
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise UserError(f"{source}: tokenizer has no pad or eos token; a T5 tokenizer is expected")
    return tok


def _check_local_or_hub(source: str, key: str) -> None:
    looks_local = source.startswith((".", "/", "~")) or Path(source).exists()
    if looks_local and not Path(source).expanduser().exists():
        raise UserError(f"{key}: {source} does not exist")


# ----------------------------------------------------------------------------- base model


def base_model_dir(cfg: Config) -> str:
    """The folder or Hub id the base weights are loaded from."""
    if cfg.model.init == "random":
        return str(RunLayout.of(cfg).base_model)
    return cfg.model.source


def load_base(cfg: Config, quantization: str | None = None, dtype: "torch.dtype | None" = None) -> "PreTrainedModel":
    """Load the base model.

    Args:
        quantization: override cfg.model.quantization ("none" for export, which must merge
            into unquantized weights).
        dtype: torch dtype for the unquantized weights (default fp32).
    """
    import torch
    from transformers import AutoModelForSeq2SeqLM, BitsAndBytesConfig

    quantization = quantization or cfg.model.quantization
    if cfg.model.init == "random":
        materialize_random_base(cfg)
    source = base_model_dir(cfg)
    _check_local_or_hub(source, "model.source")
    _refuse_pickle(source, cfg.model.allow_pickle)

    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if quantization == "4bit":
        # NF4 with double quantization, as QLoRA does; compute in fp32 on CPU, bf16 on GPU.
        compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
        kwargs["device_map"] = {"": _device_index()}
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": _device_index()}
    # True: safetensors only, never unpickle a .bin; None: either, the user trusts this source.
    kwargs["use_safetensors"] = None if cfg.model.allow_pickle else True
    library_bars_on_terminal_only()
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: cannot load the base model: {str(e).splitlines()[0]}") from e
    return model


def library_bars_on_terminal_only() -> None:
    """transformers' own bars ("Loading weights", "Writing model shards") only add redraws to a log."""
    from termtune.progress import interactive

    if not interactive():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _device_index() -> Any:
    import torch

    if torch.cuda.is_available():
        import os

        return int(os.environ.get("LOCAL_RANK", 0))
    return "cpu"


def _refuse_pickle(source: str, allow_pickle: bool) -> None:
    folder = Path(source)
    if not folder.is_dir() or allow_pickle:
        return
    if not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise UserError(f"{source}: only pickle (.bin) weights found; pickle can run code on load. "
                        "Convert to safetensors, or set model.allow_pickle=true if you trust this folder")


def architecture_config(cfg: Config) -> "Any":
    """The T5Config for model.init=random: the architecture file plus overrides."""
    from transformers import AutoConfig

    from termtune.rundir import read_json

    arch = Path(cfg.model.architecture or "")
    config_file = arch / "config.json" if arch.is_dir() else arch
    if not config_file.is_file():
        raise UserError(f"model.architecture: {config_file} not found")
    values = read_json(config_file)
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


def model_config(cfg: Config) -> "Any":
    """The base model's config (its shape), without loading any weights."""
    from transformers import AutoConfig

    if cfg.model.init == "random":
        return architecture_config(cfg)
    _check_local_or_hub(cfg.model.source, "model.source")
    try:
        return AutoConfig.from_pretrained(cfg.model.source)
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg.model.source}: cannot read the model config: {str(e).splitlines()[0]}") from e


def check_model_settings(cfg: Config) -> None:
    """Check the model's sizes and the LoRA settings against its real layers before any data or weights are
    touched.

    The model is built on the meta device (shapes only, no memory, well under a second for
    flan-t5-large) and PEFT's own matching decides which layers lora.target_modules selects.
    """
    import torch
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForSeq2SeqLM

    config = model_config(cfg)
    # sizes such as d_model=0 or num_heads=-2 first: torch fails on them with a traceback or builds an empty model
    check_shape(config.to_dict(), cfg.model.architecture or cfg.model.source,
                cfg.model.architecture_overrides if cfg.model.init == "random" else {})
    probe = lora_config(cfg)
    probe.r = 1  # which layers LoRA wraps does not depend on the rank, and lora.r=10**29 would not even build
    with torch.device("meta"):
        try:
            model = AutoModelForSeq2SeqLM.from_config(config)
        except (TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"{cfg.model.architecture or cfg.model.source}: cannot build the model from its "
                            f"config: {str(e).splitlines()[0]}") from e
        try:
            from peft import get_peft_model

            layers = [(name, m.in_features, m.out_features) for name, m in
                      get_peft_model(model, probe).named_modules() if isinstance(m, LoraLayer)]
        except ValueError as e:
            raise UserError(f"lora.target_modules={cfg.lora.target_modules}: {str(e).splitlines()[0]} "
                            "(T5's linear layers: q, k, v, o, wi_0, wi_1, wo, or all-linear)") from e
    if isinstance(cfg.lora.target_modules, list):
        # PEFT is satisfied when any one name matches; a typo beside a good name would train less than meant.
        for wanted in cfg.lora.target_modules:
            if not any(name == wanted or name.endswith(f".{wanted}") for name, _, _ in layers):
                raise UserError(f"lora.target_modules: {wanted!r} matches no layer of the model "
                                "(T5's linear layers: q, k, v, o, wi_0, wi_1, wo, or all-linear)")
    name, n_in, n_out = min(layers, key=lambda layer: min(layer[1:]))
    refuse_rank(cfg.lora.r, name.removeprefix("base_model.model."), n_in, n_out)


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


def refuse_rank(r: int, layer: str, n_in: int, n_out: int) -> None:
    """Refuse lora.r above the width of `layer` (n_in -> n_out): a higher rank adds parameters, not capacity."""
    if r > min(n_in, n_out):
        raise UserError(f"lora.r={r} is larger than the targeted layers allow: {layer} is {n_in} -> {n_out}, "
                        f"and a rank above {min(n_in, n_out)} adds parameters, not capacity; "
                        f"use lora.r <= {min(n_in, n_out)}")


def materialize_random_base(cfg: Config) -> Path:
    """Build the seeded random-init base once and save it (atomically) in the run directory.

    The folder records what it was built from; one built from another shape, seed or tokenizer
    (a crashed run whose settings were then changed) is rebuilt, never reused.
    """
    import torch
    from transformers import T5ForConditionalGeneration

    from termtune.oserrors import writing
    from termtune.rundir import atomic_dir, read_json, write_json

    target = RunLayout.of(cfg).base_model
    config = architecture_config(cfg)
    shape = {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"}
    built_from = {"architecture": shape, "seed": cfg.run.seed, "tokenizer": cfg.tokenizer_source}
    built_from = json.loads(json.dumps(built_from, sort_keys=True, default=str))
    if (target / "model.safetensors").is_file() and read_json(target / BUILT_FROM) == built_from:
        return target
    library_bars_on_terminal_only()
    torch.manual_seed(cfg.run.seed)
    model = T5ForConditionalGeneration(config)
    untie_lm_head(model)
    tokenizer = load_tokenizer(cfg)
    with writing(target), atomic_dir(target, force=True) as tmp:  # a full disk: one line naming the folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / BUILT_FROM, built_from)
    return target


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


# ----------------------------------------------------------------------------- LoRA


def lora_config(cfg: Config) -> "Any":
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        bias=cfg.lora.bias,
        modules_to_save=cfg.lora.modules_to_save or None,
    )


def attach_lora(cfg: Config, model: "PreTrainedModel") -> "Any":
    """Wrap the base in LoRA adapters (preparing a quantized base for k-bit training first)."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    # LoRA init draws random numbers: seed it so a run (and its resume) is reproducible.
    torch.manual_seed(cfg.run.seed)
    return get_peft_model(model, lora_config(cfg))
