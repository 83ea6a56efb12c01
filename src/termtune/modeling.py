"""Models: Hub ids, local folders, or random init from a config; quantization; LoRA.

Public entry points (each asks the base model's family, termtune.families, for what differs):
    check_model_settings(cfg)                -> None (raises UserError), before any work
    load_tokenizer(cfg)                      -> tokenizer
    base_model_dir(cfg)                      -> where the base weights live
    load_base(cfg, quantization=None, dtype=None) -> the base model
    attach_lora(cfg, model)                  -> PeftModel

A randomly initialised base (model.init=random) is built once, seeded, and saved in the
run directory (`<run>/base-model/`). Every later stage loads that same folder, so the
evaluation baseline, the model that was trained and the model export merges onto are one
and the same set of weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from termtune.config import Config
from termtune.errors import UserError
from termtune.families import base, family_for
from termtune.families.base import base_model_dir, load_tokenizer

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

__all__ = ["attach_lora", "base_model_dir", "check_model_settings", "load_base", "load_tokenizer", "lora_config",
           "materialize_random_base"]


def load_base(cfg: Config, quantization: str | None = None, dtype: "torch.dtype | None" = None) -> "PreTrainedModel":
    """Load the base model (quantization: override cfg.model.quantization, "none" for export; dtype: of the
    unquantized weights, fp32 by default)."""
    if cfg.model.init != "random":  # a pickle-only folder is refused before anything in it is read
        base.check_local_or_hub(cfg.model.source, "model.source")
        base.refuse_pickle(cfg.model.source, cfg.model.allow_pickle)
    return base.load_base(family_for(cfg), cfg, quantization, dtype)


def materialize_random_base(cfg: Config) -> Path:
    return base.materialize_random_base(family_for(cfg), cfg)


def check_model_settings(cfg: Config) -> None:
    """Check the model's sizes and the LoRA settings against its real layers before any data or weights are
    touched."""
    family = family_for(cfg)
    if cfg.train.packing and not family.packs:  # null (the default) packs only where the family can
        raise UserError(f"train.packing: {family.display_name} cannot train on packed batches (its encoder and "
                        "decoder inputs are padded separately); set train.packing: false")
    family.check_model_settings(cfg)


def lora_config(cfg: Config) -> Any:
    return base.lora_config(family_for(cfg), cfg)


def attach_lora(cfg: Config, model: "PreTrainedModel") -> Any:
    """Wrap the base in LoRA adapters (preparing a quantized base for k-bit training first)."""
    return base.attach_lora(family_for(cfg), cfg, model)
