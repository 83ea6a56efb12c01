"""Model families: what differs between kinds of model, behind one seam.

The stages never name a model family; they ask `family_for(cfg)` (the base model's config.json:
`model_type`, then `architectures`) or `family_of(config)` (a folder's config.json) and call it.

A family is one module here holding one `termtune.families.base.Family` subclass, listed in FAMILIES.
What a second family must provide (each documented on `Family`):
  - recognition and loading: `name`, `model_types`, `architectures` (the first is what an export names),
    `auto_class`, `lora_task_type`;
  - the model: `architecture_config` (model.init=random: a shape plus overrides), `build_random`,
    `check_model_settings` (sizes and lora.* against its layers, before any work);
  - a row and a batch: `chat_data` (rows rendered through the chat template, chat sources accepted), `encode`
    (prompts and targets to input_ids / labels), `padded_tokens` (what a batch costs once padded), `collator`;
  - training: `trainer_classes` (any transformers.Trainer subclass and its arguments class: termtune's
    additions attach through compute_loss and callbacks, termtune.trainer_additions), `refuse_precision`,
    `takes_chunked_loss` and `chunked_loss_inputs` (termtune.lm_loss);
  - generation: `generation_settings`, `answer_ids` (the answer's tokens in generate's output);
  - export: `export_tokenizer_files`, `tokenizer_class`, `is_tied`, `shared_views`, `fix_model_config`,
    `bedrock_attention`;
  - Bedrock import rules (termtune.validate): `cmi_rules`, `tensor_table`, `tokenizer_files`;
  - `termtune plan`: `known_hub_ids`, `plan_shape` (a shape that counts parameters, LoRA weights,
    activations and FLOPs), `plan_sources`;
  - the report: `display_name`, `card_tags`, `pipeline_tag`, `describe_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from termtune.config import Config
from termtune.errors import UserError
from termtune.families.base import Family, base_config_json, cached_hub_config
from termtune.families.llama import LLAMA, MISTRAL, NOT_IMPORTED, QWEN2, QWEN3
from termtune.families.other_decoders import GPT_BIGCODE, MIXTRAL, QWEN3_MOE
from termtune.families.t5 import T5

# Mixtral and Qwen3-MoE train; GPTBigCode is validated and exported, not trained (families.other_decoders).
FAMILIES: tuple[Family, ...] = (T5, LLAMA, MISTRAL, QWEN2, QWEN3, MIXTRAL, QWEN3_MOE, GPT_BIGCODE)


def family_of(config: Any) -> Family | None:
    """The family of a config.json's values (by model_type, else by architectures), or None."""
    if not isinstance(config, dict):
        return None
    for family in FAMILIES:
        if config.get("model_type") in family.model_types:
            return family
    architectures = config.get("architectures")
    for family in FAMILIES:
        if isinstance(architectures, list) and set(map(str, architectures)) & set(family.architectures):
            return family
    return None


def family_of_model(model: Any) -> Family:
    """The family of a loaded (possibly PEFT- or DDP-wrapped) model."""
    while hasattr(model, "module"):
        model = model.module
    family = family_of(model.config.to_dict())
    if family is None:
        raise UserError(f"model_type {model.config.model_type!r} is not a model family termtune trains "
                        f"(termtune knows {', '.join(f.name for f in FAMILIES)})")
    return family


def family_for(cfg: Config, download: bool = True) -> Family:
    """The family of the base model the run trains: from model.architecture (model.init=random), else the
    config.json of model.source (a local folder, or the Hub's, cached). download=False (`termtune plan`):
    a Hub id a family knows by name, else only a config.json already in the Hugging Face cache."""
    if not download and cfg.model.init != "random" and not Path(cfg.model.source).expanduser().exists():
        known = next((f for f in FAMILIES if cfg.model.source in f.known_hub_ids), None)
        if known is not None:
            return known
        if cached_hub_config(cfg.model.source) is None:
            ids = ", ".join(i for f in FAMILIES for i in f.known_hub_ids)
            raise UserError(f"model.source: {cfg.model.source} is neither a local folder with config.json nor a "
                            f"known Hub id ({ids}); the plan does not download anything")
    config, where = base_config_json(cfg)
    family = family_of(config)
    if family is None:
        found = config.get("model_type") if isinstance(config, dict) else None
        if found in NOT_IMPORTED:
            raise UserError(f"{where}: model_type {found!r} is refused before training: {NOT_IMPORTED[found]}")
        raise UserError(f"{where}: model_type is {found!r}, not a model family termtune trains "
                        f"(termtune knows {', '.join(f.name for f in FAMILIES)})")
    return family
