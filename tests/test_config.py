"""The typed config: shipped YAMLs, overrides, unknown keys, cross-field rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO
from termtune.config import Config, dump_config, field_docs, load_config
from termtune.errors import UserError

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    names = {p.name for p in SHIPPED}
    assert {"demo.yaml", "flan-t5-large-medical.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # The dump is itself a valid config that loads to the same values.
    reloaded = Config.model_validate(__import__("yaml").safe_load(dump_config(cfg)))
    assert reloaded == cfg


def test_seed_recipe_values():
    cfg = load_config(REPO / "configs" / "flan-t5-large-medical.yaml")
    assert (cfg.model.source, cfg.data.source) == ("google/flan-t5-large", "gamino/wiki_medical_terms")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (64, 16, 0.1, "all-linear")
    assert cfg.model.quantization == "4bit"
    assert (cfg.data.max_source_length, cfg.data.max_target_length) == (128, 512)


def test_dotted_overrides_are_typed():
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      ["train.learning_rate=3e-4", "run.dir=/tmp/x", "lora.target_modules=[q, v]",
                       "data.max_rows=null", "data.prompt_template=Define: {term}", "eval.num_beams=4"])
    assert cfg.train.learning_rate == 3e-4
    assert cfg.run_dir == Path("/tmp/x")
    assert cfg.lora.target_modules == ["q", "v"]
    assert cfg.data.max_rows is None
    assert cfg.data.prompt_template == "Define: {term}"
    assert cfg.eval.num_beams == 4


@pytest.mark.parametrize("override,message", [
    ("train.learnin_rate=1", r"unknown key train.learnin_rate \(did you mean train.learning_rate\?\)"),
    ("trian.epochs=1", r"unknown key trian \(did you mean train\?\)"),
    ("train.epochs=many", r"train.epochs: Input should be a valid number"),
    ("train.precision=fp16", r"fp16 is refused for T5: .*overflow.*allow_fp16"),
    ("export.dtype=fp16", r"export.dtype=fp16 is refused for T5"),
    ("data.prompt_template=What is it?", r"must contain \{term\}"),
    ("data.test_size=2.5", r"test_size"),
    ("noequals", r"expected KEY=VALUE"),
])
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(UserError, match=message) as e:
        load_config(REPO / "configs" / "demo.yaml", [override])
    assert "\n" not in str(e.value)


def test_fp16_can_be_forced():
    cfg = load_config(None, ["train.precision=fp16", "train.allow_fp16=true"])
    assert cfg.train.precision == "fp16"


def test_random_init_needs_architecture():
    with pytest.raises(UserError, match="model.init=random needs model.architecture"):
        load_config(None, ["model.init=random"])


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(bad)
    bad.write_text("train:\n  epochs: 1\n  warmup: 3\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown key train.warmup \(did you mean train.warmup_ratio\?\)"):
        load_config(bad)


def test_every_field_is_documented():
    rows = field_docs()
    assert len(rows) > 40
    undocumented = [key for key, _, _, doc in rows if not doc]
    # Self-explanatory numeric knobs may go without a sentence; the rest must say what they do.
    allowed = {"lora.r", "lora.alpha", "lora.dropout", "lora.bias", "train.epochs", "train.learning_rate",
               "train.gradient_accumulation_steps", "train.weight_decay", "train.max_grad_norm",
               "train.lr_scheduler", "train.warmup_ratio", "train.logging_steps", "train.dataloader_workers",
               "eval.batch_size", "eval.samples_in_report", "export.dtype", "export.allow_fp16",
               "aws.region", "aws.bucket", "aws.sse", "aws.role_name", "aws.import_timeout_minutes",
               "aws.poll_seconds", "aws.invoke_max_tokens", "aws.invoke_temperature"}
    assert set(undocumented) <= allowed, set(undocumented) - allowed


def test_config_reference_is_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_reference", REPO / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = (REPO / "docs" / "config-reference.md").read_text(encoding="utf-8")
    assert current == module.render(), "docs/config-reference.md is stale: run python scripts/config_reference.py"
