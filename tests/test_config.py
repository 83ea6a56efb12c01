"""The typed config: shipped YAMLs, overrides, unknown keys, cross-field rules."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from conftest import REPO
from termtune.config import Config, dump_config, field_docs, load_config
from termtune.errors import UserError

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    names = {p.name for p in SHIPPED}
    assert {"demo.yaml", "demo-t5.yaml", "flan-t5-large-medical.yaml"} <= names


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
    cfg = load_config(REPO / "configs" / "demo-t5.yaml",
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
    ("train.learning_rate=inf", r"train.learning_rate: Input should be a finite number"),
    ("train.learning_rate=.nan", r"train.learning_rate: Input should be a finite number"),
    ("train.epochs=inf", r"train.epochs: Input should be a finite number"),
    ("train.max_grad_norm=.inf", r"train.max_grad_norm: Input should be a finite number"),
    ("aws.import_timeout_minutes=inf", r"aws.import_timeout_minutes: Input should be a finite number"),
    ("run.seed=-1", r"run.seed: Input should be greater than or equal to 0"),
    ("run.seed=4294967296", r"run.seed: Input should be less than 4294967296"),
    ("train.max_steps=0", r"train.max_steps: 0 steps would train nothing"),
    ("train.max_steps=-2", r"train.max_steps: Input should be greater than or equal to -1"),
    ("train.eval_steps=0", r"train.eval_steps: Input should be greater than or equal to 1"),
    ("lora.target_modules=[]", r"lora.target_modules: no module names"),
    ("aws.prefix=models/{run}", r"aws.prefix: 'models/\{run\}': unknown placeholder \{run\} \(known: \{run_name\}\)"),
    ("aws.prefix=models/{}", r"aws.prefix: .*unknown placeholder \{\}"),
    ("aws.prefix=models/{run_name", r"aws.prefix: .*write \{\{ or \}\} for a literal brace"),
])
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(UserError, match=message) as e:
        load_config(REPO / "configs" / "demo-t5.yaml", [override])
    assert "\n" not in str(e.value)


def test_fp16_can_be_forced():
    cfg = load_config(None, ["train.precision=fp16", "train.allow_fp16=true"])
    assert cfg.train.precision == "fp16"


def test_assigning_a_setting_is_checked_like_loading_and_a_refusal_changes_nothing():
    """The API's config object: a section or a single setting assigned after loading meets the same rules."""
    from termtune.config import LoraConfig, TrainConfig

    cfg = load_config(REPO / "configs" / "demo-t5.yaml")
    before = cfg.model_dump()
    refused = [
        (lambda: setattr(cfg, "train", TrainConfig(precision="fp16")), r"^train.precision=fp16 is refused for T5"),
        (lambda: setattr(cfg.train, "precision", "fp16"), r"^train.precision=fp16 is refused for T5"),
        (lambda: setattr(cfg.train, "epochs", 1e300), r"^train.epochs: Input should be less than or equal to 1000$"),
        (lambda: setattr(cfg, "lora", {"r": 0}), r"^lora.r: Input should be greater than or equal to 1$"),
        (lambda: setattr(cfg.lora, "target_modules", []), r"^lora.target_modules: no module names"),
        (lambda: setattr(cfg.model, "init", "pretrained"), r"^model.architecture_overrides only applies"),
        (lambda: setattr(cfg.data, "prompt_template", "Define it"), r"^data.prompt_template must contain \{term\}"),
        (lambda: setattr(cfg, "export", 5), r"^export: Input should be a valid dictionary or instance"),
    ]
    for assign, message in refused:
        with pytest.raises(UserError, match=message) as e:
            assign()
        assert "\n" not in str(e.value)
        assert cfg.model_dump() == before  # the refused value is not left behind

    cfg.train = TrainConfig(precision="fp16", allow_fp16=True)  # what the rules allow is kept
    cfg.lora = LoraConfig(r=8)
    cfg.train.epochs = 2
    assert (cfg.train.precision, cfg.lora.r, cfg.train.epochs) == ("fp16", 8, 2)
    with pytest.raises(UserError, match="train.precision=fp16 is refused"):
        cfg.train.allow_fp16 = False  # a section assigned whole is checked as part of the config afterwards
    assert load_config(REPO / "configs" / "demo-t5.yaml") == load_config(REPO / "configs" / "demo-t5.yaml")


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


def _settings(model, prefix=""):
    """(dotted key, pydantic field) of every field of `model` and of the sections inside it, also those
    inside a mapping (aws.cmu_prices holds CmuPrice sections per region and version)."""
    for name, field in model.model_fields.items():
        yield prefix + name, field
        for inner in _models_in(field.annotation):
            yield from _settings(inner, f"{prefix}{name}.")


def _models_in(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def test_every_field_is_documented():
    settings = dict(_settings(Config))
    assert {"train.learning_rate", "lora.r", "aws.sse", "aws.cmu_prices.per_minute", "train"} <= set(settings)
    undocumented = sorted(key for key, field in settings.items() if not (field.description or "").strip())
    assert not undocumented, f"write a docstring under each of these config fields: {undocumented}"
    # one to three source lines: a sentence on what it does, its unit, when to change it
    too_long = sorted(key for key, field in settings.items() if len(" ".join(field.description.split())) > 330)
    assert not too_long, f"keep these descriptions to three lines: {too_long}"


def test_the_reference_shows_every_description():
    shown = {doc for _, _, _, doc in field_docs()}
    settings = dict(_settings(Config))
    keys = [key for key in settings if key not in Config.model_fields]  # the eight sections are not rows
    missing = sorted(key for key in keys if " ".join((settings[key].description or "").split()) not in shown)
    assert not missing, f"field_docs leaves out {missing}"


def test_config_reference_is_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_reference", REPO / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = (REPO / "docs" / "config-reference.md").read_text(encoding="utf-8")
    assert current == module.render(), "docs/config-reference.md is stale: run python scripts/config_reference.py"


# ----------------------------------------------------------------------------- hostile settings and files

ALIAS_BOMB = "".join(
    f"    {name}: &{name} [{', '.join([f'*{prev}'] * 9 if prev else ['lol'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi"))


def test_edge_values_that_are_fine_still_load():
    cfg = load_config(None, ["run.seed=0", "run.seed=4294967295", "train.max_steps=1", "aws.prefix=a/{run_name}/b"])
    assert (cfg.run.seed, cfg.train.max_steps, cfg.aws.prefix) == (4294967295, 1, "a/{run_name}/b")


@pytest.mark.parametrize("content,message", [
    (b"train:\n  epochs: 1\nlora:\n  r: 4\ntrain:\n  epochs: 2\n",
     r"line 5: train is given twice \(also on line 1\); YAML would silently drop the first"),
    (b"train:\n  epochs: 1\n  epochs: 2\n", r"line 3: epochs is given twice"),
    (b"", r"the config file is empty"),
    (b"# only a comment\n", r"the config file is empty"),
    (b"run:\n  dir: caf\xe9\n", r"not UTF-8 text \(byte 0xe9 at offset 15\)"),
    (b"model:\n  architecture_overrides:\n" + ALIAS_BOMB.encode(),
     r"expands to 490,329,068 values \(more than 10,000\): aliases .* are refused"),
    (b"model:\n  architecture_overrides: " + b"[" * 5000 + b"]" * 5000 + b"\n", r"nested too deeply"),
    (b"# padding\n" * 120_000, r"1,200,000 bytes; a config file over 1 MiB is refused"),
])
def test_hostile_config_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "hostile.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_alias_bomb_in_an_override_is_refused():
    flow = "{" + ALIAS_BOMB.strip().replace("\n    ", ", ") + "}"
    with pytest.raises(UserError, match=r"override model.architecture_overrides: expands to 490,329,064 values"):
        load_config(None, ["model.init=random", "model.architecture=x", f"model.architecture_overrides={flow}"])


def test_merge_keys_and_small_aliases_are_still_yaml(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("lora: &l {r: 4, alpha: 8}\neval: {max_new_tokens: 8}\n"
                    "train: {learning_rate: 0.001, epochs: 1}\n")
    cfg = load_config(path)
    assert (cfg.lora.r, cfg.lora.alpha) == (4, 8)


def test_make_demo_fine_tunes_smollm2_and_the_t5_demo_is_one_command_away():
    """`make demo` runs configs/demo.yaml, the real SmolLM2-135M-Instruct from the GGUF file `make models` fetches;
    `make demo-t5` runs the random-init Flan-T5 demo, configs/demo-t5.yaml, in a run folder of its own."""
    import re

    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    demo, t5 = load_config(REPO / "configs" / "demo.yaml"), load_config(REPO / "configs" / "demo-t5.yaml")
    assert f"SMOLLM2_GGUF := {demo.model.source}\n" in makefile and demo.model.init == "pretrained"
    assert re.search(r"^demo: .*\$\(SMOLLM2_GGUF\)\n\t.*CONFIG=configs/demo\.yaml bash scripts/demo\.sh$", makefile,
                     re.MULTILINE)
    assert t5.model.init == "random" and "flan-t5" in str(t5.model.architecture)
    assert re.search(r"^demo-t5: .*\n\t.*CONFIG=configs/demo-t5\.yaml bash scripts/demo\.sh$", makefile, re.MULTILINE)
    assert demo.run_dir != t5.run_dir


def test_the_demo_asks_its_model_a_held_out_term():
    """The deployed model is asked a term whose definition training never saw (the demo's seed and split)."""
    from termtune.data import read_examples, split_rows

    cfg = load_config(REPO / "configs" / "demo.yaml")
    split = split_rows(read_examples(cfg).rows, cfg.data.test_size, cfg.run.seed)
    assert cfg.aws.invoke_prompt in [row["term"] for row in split.test]
