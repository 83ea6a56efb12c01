"""What every model family provides, and the parts of loading a model that no family changes.

`Family` is the protocol (termtune.families describes it); the functions below are shared by
every family: the tokenizer, the pickle refusal, quantized loading, LoRA, the random-init base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from termtune.config import Config
from termtune.errors import UserError
from termtune.gguf import model_source
from termtune.layout import RunLayout
from termtune.rundir import read_json

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

OK, FAIL, WARN = "ok", "fail", "warn"
"""The outcome of a Bedrock import rule (termtune.validate): a family's rules return (one of these, a reason)."""

TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
"""export.dtype -> the torch dtype's name, as config.json's torch_dtype writes it."""

BUILT_FROM = "termtune-built-from.json"
"""Written into a random-init base folder: the shape, seed and tokenizer it was built from."""


class Family:
    """One kind of model: everything termtune does differently for it. Subclasses fill in every
    attribute and method that raises NotImplementedError here; the stages call nothing else of theirs."""

    name: str = ""
    """Short name, as users and error messages see it."""
    model_types: tuple[str, ...] = ()
    """config.json `model_type` values this family trains."""
    architectures: tuple[str, ...] = ()
    """config.json `architectures` entries this family trains; an export names the first."""
    auto_class: str = ""
    """The transformers Auto class that loads its weights (e.g. AutoModelForCausalLM)."""
    lora_task_type: str = ""
    """peft.TaskType name for its LoRA config."""
    tokenizer_class: str | None = None
    """tokenizer_config.json's tokenizer_class in an export, where the tokenizer does not say."""
    bedrock_attention: str = "sdpa"
    """The attention implementation transformers 4.51.3 (Bedrock's) runs this family with."""
    generation_padding_side: str = "right"
    """Where a batch of prompts is padded for generate: "left" for a decoder-only model, which continues the prompt."""

    # -- model
    def architecture_config(self, cfg: Config) -> Any:
        """The transformers config for model.init=random: the architecture file plus overrides."""
        raise NotImplementedError

    def check_model_settings(self, cfg: Config) -> None:
        """Refuse (UserError) model sizes and LoRA settings that cannot work, before any data or weights."""
        raise NotImplementedError

    def build_random(self, config: Any) -> "PreTrainedModel":
        """A freshly initialised model of `config` (seeded by the caller), laid out as its real checkpoints are."""
        raise NotImplementedError

    # -- data and training
    chat_data: bool = False
    """Whether the family trains on conversations rendered through the tokenizer's chat template
    (termtune.conversations): term rows become one-question conversations, and chat (`messages`) and
    prompt/completion sources are accepted. False: term rows only, each encoded by `encode`."""

    def encode(self, tokenizer: Any, prompts: list[str], targets: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        """(input_ids, labels) token ids per (prompt, target) row, untruncated, each ending in eos (for a chat_data
        family: in its end-of-turn token). The data stage writes these for a family without chat_data;
        `termtune plan` estimates token lengths with them."""
        raise NotImplementedError

    def padded_tokens(self, source_lengths: list[int], target_lengths: list[int]) -> int:
        """Token slots one batch of rows with these lengths takes once padded (what a token budget counts)."""
        return padded_separately(source_lengths, target_lengths)

    def collator(self, tokenizer: Any, model: Any, packed: bool = False) -> Any:
        """Pads a batch of {input_ids, labels}; labels padded with -100. `packed` (train.packing, families with
        `packs`): the batch as one row instead, its examples end to end."""
        raise NotImplementedError

    packs: bool = False
    """Whether the family trains on packed batches (train.packing)."""

    def trainer_classes(self) -> tuple[type, type]:
        """(transformers.Trainer subclass, its TrainingArguments class) this family trains with."""
        raise NotImplementedError

    def refuse_precision(self, what: str, dtype: str) -> str | None:
        """Why `what` (train.precision, export.dtype) must not be `dtype` for this family, or None."""
        raise NotImplementedError

    def takes_chunked_loss(self, base: Any) -> bool:
        """Whether termtune.lm_loss's chunked loss can stand in for this (unwrapped) model's own loss."""
        raise NotImplementedError

    def chunked_loss_inputs(self, base: Any, labels: "torch.Tensor", inputs: dict[str, Any]) -> "torch.Tensor":
        """For termtune.lm_loss: complete `inputs` (in place) for a forward pass whose output positions line up
        with the returned labels."""
        raise NotImplementedError

    # -- generation
    def generation_settings(self, model: Any) -> dict[str, Any]:
        """Extra GenerationConfig settings the family needs."""
        raise NotImplementedError

    def answer_ids(self, output: "torch.Tensor", prompt_width: int) -> "torch.Tensor":
        """The generated answer's token ids in `model.generate`'s output (prompt and start tokens dropped)."""
        raise NotImplementedError

    def answer_text(self, text: str) -> str:
        """The answer a person reads (and evaluation scores) in a generated answer's decoded text."""
        return text.strip()

    # -- export (an artifact transformers 4.51.3, Bedrock's, reads as the model that was trained)
    def export_tokenizer_files(self, tokenizer_source: str) -> dict[str, Path]:
        """Files an artifact needs beyond what the tokenizer's save_pretrained writes: {name: source file}.
        Called before any weights are loaded, so a missing file fails the export at once."""
        raise NotImplementedError

    def write_artifact(self, model: Any, tokenizer: Any, folder: Path, dtype: str,
                       max_shard_bytes: int) -> dict[str, dict[str, Any]] | None:
        """Write the merged model, its config and tokenizer into `folder` the family's own way and return
        {weight file: {"sha256", "size", "dtype", "shapes"}}; None: the export stage's writer (weights streamed
        per tensor, then `fix_model_config` and `export_tokenizer_files`) serves this family."""
        return None

    def is_tied(self, model: Any) -> bool:
        """Whether the model's output layer is its input embeddings (then no lm_head.weight is written)."""
        raise NotImplementedError

    def shared_views(self, state: dict[str, Any]) -> set[str]:
        """Names in the state dict that are views of another tensor, which every reader re-ties on load."""
        raise NotImplementedError

    def fix_model_config(self, config: dict[str, Any]) -> None:
        """Edit an export's config.json values (in place) into the form transformers 4.51.3 reads as meant."""
        raise NotImplementedError

    # -- Bedrock Custom Model Import rules (termtune.validate; a folder's config.json picks the family)
    tokenizer_files: tuple[str, ...] = ()
    """The tokenizer files an artifact of this family must hold."""

    def cmi_rules(self) -> dict[str, Callable[[Any], tuple[str, str]]]:
        """termtune.validate's family rules by name ("architecture", "attention shape", "head count", "torch_dtype",
        "weight dtype", "tie flag", "tokenizer files", "tokenizer_config.json", "generation_config.json",
        "vocabulary vs embeddings", "special token ids"): each takes validate's view of the folder and returns
        (OK, FAIL or WARN, a one-line reason)."""
        raise NotImplementedError

    def tensor_table(self, config: dict[str, Any]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """(required, aliases) {tensor name: shape} that config.json implies, as transformers 4.51.3 saves the
        model; aliases are names a reader ties to another tensor (a file may hold them). ValueError on a config
        that implies no model."""
        raise NotImplementedError

    # -- `termtune plan` (no download: a Hub id plans from a shape the family knows by name)
    known_hub_ids: tuple[str, ...] = ()
    """Hub ids whose shape the family knows without reading their config.json."""

    def plan_shape(self, cfg: Config) -> Any:
        """The shape the run will train, refused (UserError naming the key) when a size cannot be. It provides
        describe(), check_lora_rank(r, targets), linear_layers(), parameter_counts() (embedding, linear,
        lm_head, total), lora_parameters(r, targets), activation_bytes(rows, src, tgt, r, dropout_on, bf16,
        checkpointing), training_flops(batching, r, targets, head_trained) -> (FLOPs, recomputed forward),
        d_model, vocab_size and dropout; `packs` (True: training_flops also takes packed=True, the rows packed
        with no pad tokens) and `activations_measured` (False: activation_bytes is an estimate)."""
        raise NotImplementedError

    def plan_sources(self) -> dict[str, str]:
        """name -> source of every measured or looked-up number plan_shape's counts use."""
        raise NotImplementedError

    # -- the report and the model card
    display_name: str = ""
    """What a model card calls the base model."""
    card_tags: tuple[str, ...] = ()
    """Hugging Face model card tags that name the family."""
    pipeline_tag: str = ""
    """Hugging Face model card pipeline_tag."""

    def describe_config(self, config: dict[str, Any]) -> str:
        """A model of this family in a few words, from its config.json values (for the report's headline)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- shared by every family


def padded_separately(source_lengths: list[int], target_lengths: list[int]) -> int:
    """Padded token slots of a batch whose sources and targets are two streams, each padded to its longest row."""
    return len(source_lengths) * (max(source_lengths) + max(target_lengths))


def trains_packed(cfg: Config, family: Family) -> bool:
    """Whether training packs its batches: train.packing, or where it is null, whether the family can."""
    return family.packs if cfg.train.packing is None else cfg.train.packing


def packed_tokens(source_lengths: list[int], target_lengths: list[int]) -> int:
    """Token slots of a packed batch (train.packing): its examples end to end, no padding."""
    return sum(source_lengths) + sum(target_lengths)


def check_local_or_hub(source: str, key: str) -> None:
    looks_local = source.startswith((".", "/", "~")) or Path(source).exists()
    if looks_local and not Path(source).expanduser().exists():
        raise UserError(f"{key}: {source} does not exist")


def base_config_json(cfg: Config) -> tuple[Any, str]:
    """(the base model's config.json values, where they were read)."""
    m = cfg.model
    if m.init == "random":
        arch = Path(m.architecture or "")
        path = arch / "config.json" if arch.is_dir() else arch
        if not path.is_file():
            raise UserError(f"model.architecture: {path} not found")
    else:
        check_local_or_hub(m.source, "model.source")
        source = model_source(cfg)  # a .gguf file: its converted folder
        local = Path(source).expanduser()
        if local.is_dir():
            path = local / "config.json"
            if not path.is_file():
                raise UserError(f"{m.source}: no config.json; a base model folder holds one")
        else:
            path = _hub_config(source)
    return read_json(path), str(path)


def cached_hub_config(repo: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id=repo, filename="config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


def _hub_config(repo: str) -> Path:
    from huggingface_hub import hf_hub_download

    cached = cached_hub_config(repo)
    if cached is not None:
        return cached

    try:
        return Path(hf_hub_download(repo_id=repo, filename="config.json"))
    except Exception as e:  # offline, unknown repo: both user-fixable
        raise UserError(f"model.source: cannot read {repo}'s config.json from the Hugging Face Hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def load_tokenizer(cfg: Config) -> "PreTrainedTokenizerBase":
    """Load the tokenizer with `from_pretrained` (a folder or Hub id: a tokenizer built from a vocabulary
    file alone can silently map every word to <unk> in transformers 5.x)."""
    from transformers import AutoTokenizer

    source = cfg.model.tokenizer or model_source(cfg)
    check_local_or_hub(source, "model.tokenizer" if cfg.model.tokenizer else "model.source")
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: cannot load a tokenizer: {str(e).splitlines()[0]}") from e
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        # Llama 3's and Mistral's tokenizers have no pad token. Padding is masked out of attention and loss
        # (labels -100 by position, never by id), so eos pads as well as any token, as TRL pads them.
        tok.pad_token = tok.eos_token
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise UserError(f"{source}: tokenizer has no pad or eos token; termtune pads batches and ends answers "
                        "with them")
    return tok


def base_model_dir(cfg: Config) -> str:
    """The folder or Hub id the base weights are loaded from (for a .gguf model.source: its converted folder)."""
    if cfg.model.init == "random":
        return str(RunLayout.of(cfg).base_model)
    return model_source(cfg)


def load_base(family: Family, cfg: Config, quantization: str | None = None,
              dtype: "torch.dtype | None" = None) -> "PreTrainedModel":
    """Load the base model.

    Args:
        quantization: override cfg.model.quantization ("none" for export, which must merge
            into unquantized weights).
        dtype: torch dtype for the unquantized weights (default fp32).
    """
    import torch
    import transformers
    from transformers import BitsAndBytesConfig

    quantization = quantization or cfg.model.quantization
    if cfg.model.init == "random":
        materialize_random_base(family, cfg)
    source = base_model_dir(cfg)
    check_local_or_hub(source, "model.source")
    refuse_pickle(source, cfg.model.allow_pickle)

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
        model = getattr(transformers, family.auto_class).from_pretrained(source, **kwargs)
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


def refuse_pickle(source: str, allow_pickle: bool) -> None:
    folder = Path(source)
    if not folder.is_dir() or allow_pickle:
        return
    if not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise UserError(f"{source}: only pickle (.bin) weights found; pickle can run code on load. "
                        "Convert to safetensors, or set model.allow_pickle=true if you trust this folder")


def model_config(family: Family, cfg: Config) -> "Any":
    """The base model's config (its shape), without loading any weights."""
    from transformers import AutoConfig

    if cfg.model.init == "random":
        return family.architecture_config(cfg)
    check_local_or_hub(cfg.model.source, "model.source")
    source = base_model_dir(cfg)
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: cannot read the model config: {str(e).splitlines()[0]}") from e


def check_lora_targets(family: "Family", cfg: Config, model: Any, hint: str) -> None:
    """Which layers lora.target_modules selects on `model` (built on the meta device), by PEFT's own matching: a
    name that matches no layer is refused (PEFT is satisfied when any one name matches, so a typo beside a good
    name would train less than meant), and so is a rank above the narrowest selected layer. `hint` names the
    family's linear layers for the messages."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    probe = lora_config(family, cfg)
    probe.r = 1  # which layers LoRA wraps does not depend on the rank, and lora.r=10**29 would not even build
    try:
        layers = [(name, m.in_features, m.out_features) for name, m in
                  get_peft_model(model, probe).named_modules() if isinstance(m, LoraLayer)]
    except ValueError as e:
        raise UserError(f"lora.target_modules={cfg.lora.target_modules}: {str(e).splitlines()[0]} {hint}") from e
    if isinstance(cfg.lora.target_modules, list):
        for wanted in cfg.lora.target_modules:
            if not any(name == wanted or name.endswith(f".{wanted}") for name, _, _ in layers):
                raise UserError(f"lora.target_modules: {wanted!r} matches no layer of the model {hint}")
    name, n_in, n_out = min(layers, key=lambda layer: min(layer[1:]))
    refuse_rank(cfg.lora.r, name.removeprefix("base_model.model."), n_in, n_out)


def refuse_rank(r: int, layer: str, n_in: int, n_out: int) -> None:
    """Refuse lora.r above the width of `layer` (n_in -> n_out): a higher rank adds parameters, not capacity."""
    if r > min(n_in, n_out):
        raise UserError(f"lora.r={r} is larger than the targeted layers allow: {layer} is {n_in} -> {n_out}, "
                        f"and a rank above {min(n_in, n_out)} adds parameters, not capacity; "
                        f"use lora.r <= {min(n_in, n_out)}")


def materialize_random_base(family: Family, cfg: Config) -> Path:
    """Build the seeded random-init base once and save it (atomically) in the run directory.

    The folder records what it was built from; one built from another shape, seed or tokenizer
    (a crashed run whose settings were then changed) is rebuilt, never reused.
    """
    import torch

    from termtune.oserrors import writing
    from termtune.rundir import atomic_dir, read_json, write_json

    target = RunLayout.of(cfg).base_model
    config = family.architecture_config(cfg)
    shape = {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"}
    built_from = {"architecture": shape, "seed": cfg.run.seed, "tokenizer": cfg.tokenizer_source}
    built_from = json.loads(json.dumps(built_from, sort_keys=True, default=str))
    if (target / "model.safetensors").is_file() and read_json(target / BUILT_FROM) == built_from:
        return target
    library_bars_on_terminal_only()
    torch.manual_seed(cfg.run.seed)
    model = family.build_random(config)
    tokenizer = load_tokenizer(cfg)
    with writing(target), atomic_dir(target, force=True) as tmp:  # a full disk: one line naming the folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / BUILT_FROM, built_from)
    return target


def lora_config(family: Family, cfg: Config) -> "Any":
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=getattr(TaskType, family.lora_task_type),
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        bias=cfg.lora.bias,
        modules_to_save=cfg.lora.modules_to_save or None,
    )


def attach_lora(family: Family, cfg: Config, model: "PreTrainedModel") -> "Any":
    """Wrap the base in LoRA adapters (preparing a quantized base for k-bit training first)."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    # LoRA init draws random numbers: seed it so a run (and its resume) is reproducible.
    torch.manual_seed(cfg.run.seed)
    return get_peft_model(model, lora_config(family, cfg))


# ----------------------------------------------------------------------------- tokenizer facts (for import rules)


def special_token(value: Any) -> str | None:
    """A special token as tokenizer_config.json or special_tokens_map.json write it: a string or
    {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def sentencepiece_problem(path: Path, vocabulary: dict[str, int]) -> str | None:
    """Why the SentencePiece model at `path` cannot stand for tokenizer.json's vocabulary (it does
    not load, or a piece has another id there), or None. A slow tokenizer reads the SentencePiece model,
    the fast one tokenizer.json: both must give every piece the same id."""
    import sentencepiece

    try:
        model = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        return f"{path.name} is not a loadable SentencePiece model ({str(e).splitlines()[0]})"
    for i in range(model.get_piece_size()):
        piece = model.id_to_piece(i)
        if vocabulary.get(piece) != i:
            return (f"{path.name} and tokenizer.json disagree: {piece!r} is id {i} in {path.name}, "
                    f"{vocabulary.get(piece)} in tokenizer.json")
    return None


def tokenizer_json_vocabulary(tokenizer: Any) -> dict[str, int]:
    """token -> id over tokenizer.json's model vocabulary (a [piece, score] list for Unigram, a
    {piece: id} map for BPE/WordPiece/WordLevel) and its added tokens. Raises ValueError."""
    model = tokenizer.get("model") if isinstance(tokenizer, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if not vocab or not isinstance(vocab, (list, dict)):
        raise ValueError("tokenizer.json has no model.vocab")
    if isinstance(vocab, list):
        ids = {}
        for i, entry in enumerate(vocab):
            if not isinstance(entry, list) or not entry or not isinstance(entry[0], str):
                raise ValueError(f"tokenizer.json: model.vocab entry {i} is not a [piece, score] pair")
            ids.setdefault(entry[0], i)
    else:
        ids = dict(vocab)
    for added in tokenizer.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("content"), str):
            ids[added["content"]] = added.get("id")
    bad = [token for token, i in ids.items() if not isinstance(i, int) or i < 0]
    if bad:
        raise ValueError(f"tokenizer.json: token {bad[0]!r} has no valid id")
    return ids
