"""Model families: what differs between kinds of model, behind one seam.

The stages never name a model family; they ask `family_for(cfg)` (the base model's config.json:
`model_type`, then `architectures`) or `family_of(config)` (a folder's config.json) and call it.

A family is one module here holding one `termtune.families.base.Family` subclass, listed in FAMILIES.
What a second family must provide (each documented on `Family`):
  - recognition: `name`, `model_types`, `architectures`; `auto_class` and `lora_task_type` to load and wrap it;
  - the model: `architecture_config` (random init from a shape), `build_random`, `check_model_settings`;
  - a row: `encode` (prompt and target to input_ids / labels), `padded_tokens` (a batch's cost once padded),
    `collator`;
  - training: `trainer_classes` (any transformers.Trainer subclass: termtune's additions attach to it through
    callbacks and compute_loss), `refuse_precision`, `chunked_loss_inputs`;
  - generation: `generation_settings`, `answer_ids` (the answer's tokens in generate's output);
  - export: `export_tokenizer_files`, `tensors_to_skip`, `is_tied`, `fix_model_config`, `fix_tokenizer`;
  - Bedrock import rules for termtune.validate: `cmi_rules` and `tensor_table`;
  - `termtune plan`: `plan_shape`, `parameter_counts`, `lora_parameters`, `activation_bytes`, `flops`...
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from termtune.config import Config
from termtune.errors import UserError
from termtune.families.base import Family, check_local_or_hub
from termtune.families.t5 import T5

FAMILIES: tuple[Family, ...] = (T5,)


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
        if _cached_hub_config(cfg.model.source) is None:
            ids = ", ".join(i for f in FAMILIES for i in f.known_hub_ids)
            raise UserError(f"model.source: {cfg.model.source} is neither a local folder with config.json nor a "
                            f"known Hub id ({ids}); the plan does not download anything")
    config, where = base_config_json(cfg)
    family = family_of(config)
    if family is None:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise UserError(f"{where}: model_type is {found!r}, not a model family termtune trains "
                        f"(termtune knows {', '.join(f.name for f in FAMILIES)})")
    return family


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
        local = Path(m.source).expanduser()
        if local.is_dir():
            path = local / "config.json"
            if not path.is_file():
                raise UserError(f"{m.source}: no config.json; a base model folder holds one")
        else:
            path = _hub_config(m.source)
    try:
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e


def _cached_hub_config(repo: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id=repo, filename="config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


def _hub_config(repo: str) -> Path:
    from huggingface_hub import hf_hub_download

    cached = _cached_hub_config(repo)
    if cached is not None:
        return cached

    try:
        return Path(hf_hub_download(repo_id=repo, filename="config.json"))
    except Exception as e:  # offline, unknown repo: both user-fixable
        raise UserError(f"model.source: cannot read {repo}'s config.json from the Hugging Face Hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
