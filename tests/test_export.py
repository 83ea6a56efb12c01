"""Export: merge + CMI artifact, and the proof that Bedrock's transformers (4.51.3) reads it
exactly as the merged model in memory.

The tiny run here trains for a few steps (so the run directory is complete as `termtune export`
requires), then replaces the adapter with one whose B matrices are random (a barely trained
adapter is close to B = 0 and would merge to almost a no-op), which makes the merge change every
targeted layer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, medquad_rows, tiny_overrides, write_jsonl

PROMPTS = ["What is Hypertension?", "What is (are) Paget's disease of bone ?", "What is café-au-lait macules?"]
MAX_NEW_TOKENS = 12
EXPECTED_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "spiece.model", "tokenizer.model",
                  "manifest.json"}


def make_config(run_dir: Path, *extra: str):
    from termtune.config import load_config

    data = write_jsonl(run_dir.parent / "medquad-rows.jsonl", medquad_rows(16))
    return load_config(None, [*tiny_overrides(run_dir, data), *extra])


def make_trained_run(run_dir: Path, quantization: str = "none", *extra: str):
    """A run with a base whose lm_head differs from the embeddings (as in real Flan-T5) and
    a non-trivial adapter in <run>/train/adapter (with lora.modules_to_save, trained copies of those modules)."""
    import torch
    from safetensors.torch import load_file, save_file

    from termtune import modeling, pipeline

    cfg = make_config(run_dir, f"model.quantization={quantization}", *extra)
    pipeline.run_stage(cfg, "data")
    pipeline.run_stage(cfg, "train")
    base_dir = modeling.materialize_random_base(cfg)
    weights = load_file(base_dir / "model.safetensors")
    weights["lm_head.weight"] = torch.randn(weights["lm_head.weight"].shape, generator=torch.Generator().manual_seed(1))
    save_file(weights, base_dir / "model.safetensors", metadata={"format": "pt"})

    model = modeling.attach_lora(cfg, modeling.load_base(cfg))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            elif "modules_to_save" in name:  # a trained copy: the export must carry it, not the base's
                param.add_(torch.randn(param.shape, generator=generator) * param.std())
    model.save_pretrained(run_dir / "train" / "adapter")
    record_adapter(cfg)
    return cfg


def record_adapter(cfg) -> None:
    """Make the train record name the adapter now in <run>/train/adapter, as a test that replaces it on purpose must."""
    from termtune.train import adapter_digest

    path = cfg.run_dir / "provenance" / "train.json"
    record = json.loads(path.read_text())
    record["result"]["result"]["adapter_sha256"] = adapter_digest(cfg.run_dir / "train" / "adapter")
    path.write_text(json.dumps(record))


def reference_model(cfg):
    """The merged model in memory, built without termtune.export."""
    import torch
    from peft import PeftModel

    from termtune import modeling

    base = modeling.load_base(cfg, quantization="none", dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(cfg.run_dir / "train" / "adapter")).merge_and_unload().eval()


def greedy_and_logits(model, tokenizer, decoder_ids=None):
    import torch

    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        tokens = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS,
                                do_sample=False, num_beams=1)
        decoder = tokens[:, :-1] if decoder_ids is None else decoder_ids
        logits = model(**batch, decoder_input_ids=decoder).logits
    return batch["input_ids"], tokens, logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(cfg, artifact) for one fp32 export of a tiny trained run."""
    from termtune.export import export

    cfg = make_trained_run(tmp_path_factory.mktemp("export") / "run")
    return cfg, export(cfg)


def copy_run(cfg, tmp_path: Path, *extra: str):
    """A fresh copy of the trained run (without its artifact) to export again."""
    run_dir = tmp_path / "run"
    shutil.copytree(cfg.run_dir, run_dir, ignore=shutil.ignore_patterns("artifact", ".artifact*"))
    return make_config(run_dir, *extra)


# ----------------------------------------------------------------------------- the artifact


def test_artifact_holds_exactly_the_cmi_files_and_passes_validation(exported):
    from termtune.rundir import sha256_file
    from termtune.validate import validate

    cfg, artifact = exported
    folder = cfg.run_dir / "artifact"
    assert artifact.path == folder
    assert {p.name for p in folder.iterdir()} == EXPECTED_FILES
    checks = validate(folder)
    assert not [c for c in checks if not c.ok], [c.message for c in checks if not c.ok]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} == EXPECTED_FILES - {"manifest.json"}
    for entry in manifest["files"]:
        assert entry["size"] == (folder / entry["path"]).stat().st_size
        assert entry["sha256"] == sha256_file(folder / entry["path"])
    assert manifest["dtype"] == "fp32"
    assert "random init" in manifest["base_model"]
    validation = json.loads((cfg.run_dir / "validation.json").read_text())
    assert validation["ok"] is True and len(validation["checks"]) == len(checks)
    assert "validate:" in artifact.summary() and "0 failed" in artifact.summary()
    umask = os.umask(0)
    os.umask(umask)  # the artifact gets a plain save's permissions, not the temp folder's 0700/0600
    assert (folder.stat().st_mode & 0o777) == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o666 & ~umask}


def test_configs_are_written_for_transformers_4(exported):
    cfg, _ = exported
    folder = cfg.run_dir / "artifact"
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "float32"
    assert "scale_decoder_outputs" not in config and "quantization_config" not in config
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert not isinstance(tok_config.get("extra_special_tokens"), list)
    assert len(tok_config["additional_special_tokens"]) == 100
    assert not {"backend", "is_local", "local_files_only"} & set(tok_config)
    special = json.loads((folder / "special_tokens_map.json").read_text())
    assert special["eos_token"] == "</s>" and special["pad_token"] == "<pad>"
    assert (folder / "spiece.model").read_bytes() == (Path(cfg.tokenizer_source) / "spiece.model").read_bytes()
    assert (folder / "tokenizer.model").read_bytes() == (folder / "spiece.model").read_bytes()


def test_model_card_names_base_data_license_and_settings(exported):
    from termtune import pipeline

    cfg, _ = exported
    pipeline.write_report(cfg)  # the model card is rendered with the report
    card = (cfg.run_dir / "model-card.md").read_text()
    for needle in ("CC BY 4.0", "Ben Abacha", "r=8", "alpha=16", "Not medical advice", "Not evaluated yet"):
        assert needle in card


def test_model_card_reports_training_and_evaluation_results(tmp_path):
    from termtune.modelcard import model_card

    cfg = make_config(tmp_path / "run", "data.source=gamino/wiki_medical_terms")
    (cfg.run_dir / "eval").mkdir(parents=True)
    (cfg.run_dir / "eval" / "metrics.json").write_text(json.dumps(
        {"n": 8, "decoding": {"num_beams": 1}, "base": {"rougeL": 0.05, "chrf": 10.0},
         "tuned": {"rougeL": 0.31, "chrf": 35.5}}))
    (cfg.run_dir / "train").mkdir()
    (cfg.run_dir / "train" / "result.json").write_text(json.dumps({"global_step": 7, "train_loss": 2.5,
                                                                    "eval_loss": 3.25}))
    card = model_card(cfg)
    assert "| rougeL | 0.05 | 0.31 |" in card and "8 held-out examples" in card
    assert "7 optimizer steps, training loss 2.5, held-out loss 3.25" in card
    assert "CC BY-SA" in card and "CC BY 4.0" not in card


def test_export_reloads_identically_in_transformers_5(exported):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from termtune.modeling import load_base, load_tokenizer

    cfg, _ = exported
    tokenizer = load_tokenizer(cfg)
    _, ref_tokens, ref_logits = greedy_and_logits(reference_model(cfg), tokenizer)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(cfg.run_dir / "artifact").eval()
    _, tokens, logits = greedy_and_logits(reloaded, tokenizer, decoder_ids=ref_tokens[:, :-1])
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(logits, ref_logits)
    # The adapter matters: the base alone gives clearly different logits.
    _, _, base_logits = greedy_and_logits(load_base(cfg, quantization="none").eval(), tokenizer,
                                          decoder_ids=ref_tokens[:, :-1])
    assert (base_logits - ref_logits).abs().max() > 1e-2


# ----------------------------------------------------------------------------- transformers 4.51.3

BEDROCK_SCRIPT = r"""
import json, sys
import torch, transformers
from safetensors.torch import save_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

artifact, request, out = sys.argv[1:4]
req = json.load(open(request))
tok = AutoTokenizer.from_pretrained(artifact)
model = AutoModelForSeq2SeqLM.from_pretrained(artifact, torch_dtype="auto").eval()  # config's dtype, as Bedrock
batch = tok(req["prompts"], return_tensors="pt", padding=True)
with torch.no_grad():
    tokens = model.generate(**batch, max_new_tokens=req["max_new_tokens"], min_new_tokens=req["max_new_tokens"],
                            do_sample=False, num_beams=1)
    logits = model(**batch, decoder_input_ids=torch.tensor(req["decoder_ids"])).logits
save_file({"input_ids": batch["input_ids"], "tokens": tokens, "logits": logits.contiguous()}, out)
print(json.dumps({"transformers": transformers.__version__, "tokenizer": type(tok).__name__, "dtype": str(model.dtype),
                  "tied": model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()}))
"""


def bedrock_python() -> str:
    """The transformers==4.51.3 interpreter; in CI its absence is a failure, not a skip."""
    python = os.environ.get("TERMTUNE_BEDROCK_PYTHON", str(REPO / ".venv-bedrock" / "bin" / "python"))
    if not Path(python).is_file():
        message = f"no transformers 4.51.3 python at {python} (make install; set TERMTUNE_BEDROCK_PYTHON)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return python


def run_in_transformers_4(artifact: Path, decoder_ids, tmp_path: Path):
    from safetensors.torch import load_file

    python = bedrock_python()
    script, request, out = tmp_path / "bedrock_check.py", tmp_path / "request.json", tmp_path / "out.safetensors"
    script.write_text(BEDROCK_SCRIPT)
    request.write_text(json.dumps({"prompts": PROMPTS, "max_new_tokens": MAX_NEW_TOKENS,
                                   "decoder_ids": decoder_ids.tolist()}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([python, str(script), str(artifact), str(request), str(out)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["transformers"] == "4.51.3"
    return info, load_file(out)


def test_artifact_reads_identically_in_transformers_4_51_3(exported, tmp_path):
    """The artifact under Bedrock's transformers gives the merged model's greedy tokens and logits."""
    import torch

    from termtune.modeling import load_tokenizer

    cfg, _ = exported
    input_ids, ref_tokens, ref_logits = greedy_and_logits(reference_model(cfg), load_tokenizer(cfg))
    info, v4 = run_in_transformers_4(cfg.run_dir / "artifact", ref_tokens[:, :-1], tmp_path)
    assert info["tied"] is False
    assert torch.equal(v4["input_ids"], input_ids), "4.51.3 tokenizes the prompts differently"
    assert torch.equal(v4["tokens"], ref_tokens), "4.51.3 generates different greedy tokens"
    diff = (v4["logits"] - ref_logits).abs().max().item()
    assert diff <= 1e-4, f"max |logit difference| {diff}"


def test_trained_lm_head_is_merged_and_reads_identically_in_transformers_4_51_3(tmp_path):
    """lora.modules_to_save=[lm_head] (the demo trains its random model's output layer): the export carries
    the trained head, and Bedrock's transformers reads the artifact as the merged model."""
    import torch
    from safetensors.torch import load_file

    from termtune.export import export
    from termtune.modeling import load_tokenizer

    cfg = make_trained_run(tmp_path / "run", "none", "lora.modules_to_save=[lm_head]")
    export(cfg)
    base_head = load_file(cfg.run_dir / "base-model" / "model.safetensors")["lm_head.weight"]
    exported_head = load_file(cfg.run_dir / "artifact" / "model.safetensors")["lm_head.weight"]
    assert not torch.equal(exported_head, base_head), "the artifact holds the base's lm_head, not the trained one"
    merged = reference_model(cfg)
    assert torch.equal(exported_head, merged.lm_head.weight)
    input_ids, ref_tokens, ref_logits = greedy_and_logits(merged, load_tokenizer(cfg))
    info, v4 = run_in_transformers_4(cfg.run_dir / "artifact", ref_tokens[:, :-1], tmp_path)
    assert info["tied"] is False
    assert torch.equal(v4["tokens"], ref_tokens), "4.51.3 generates different greedy tokens"
    assert (v4["logits"] - ref_logits).abs().max().item() <= 1e-4


# bf16 keeps 8 bits of mantissa: one rounding is off by up to 2^-9 relative, so a logit of size ~10 that
# two implementations round differently once moves by ~0.02-0.04. 5e-2 admits that much and no more; a
# wrong weight, a tied head or a lost config field moves logits by whole units. (Measured: 0, as both
# sides run the same torch kernels in the same order.)
BF16_LOGIT_TOLERANCE = 5e-2


def test_bf16_export_computes_like_the_trained_model_in_transformers_4_51_3(exported, tmp_path):
    """The default export dtype: 4.51.3 loads it as bf16 (config torch_dtype) and computes the greedy tokens and
    logits of the trained model run in bf16 too, with the eager attention 4.51.3 runs T5 with."""
    import torch

    from termtune.export import export
    from termtune.modeling import load_tokenizer

    cfg = copy_run(exported[0], tmp_path, "export.dtype=bf16")
    export(cfg)
    merged = reference_model(cfg)
    merged.set_attn_implementation("eager")
    input_ids, ref_tokens, ref_logits = greedy_and_logits(merged.to(torch.bfloat16), load_tokenizer(cfg))
    info, v4 = run_in_transformers_4(cfg.run_dir / "artifact", ref_tokens[:, :-1], tmp_path)
    assert info["dtype"] == "torch.bfloat16" and info["tied"] is False
    assert torch.equal(v4["input_ids"], input_ids)
    assert torch.equal(v4["tokens"], ref_tokens), "4.51.3 generates different greedy tokens from the bf16 export"
    diff = (v4["logits"].float() - ref_logits.float()).abs().max().item()
    assert diff <= BF16_LOGIT_TOLERANCE, f"max |logit difference| {diff}"


def test_sharded_export_reads_identically_in_transformers_4_51_3(exported, tmp_path):
    """Large models are written in shards with an index: 4.51.3 must assemble them into the trained model."""
    import torch

    from termtune.export import export
    from termtune.modeling import load_tokenizer

    cfg = copy_run(exported[0], tmp_path, "export.max_shard_size=3MB")
    artifact = export(cfg)
    assert artifact.shards > 1 and (artifact.path / "model.safetensors.index.json").is_file()
    input_ids, ref_tokens, ref_logits = greedy_and_logits(reference_model(cfg), load_tokenizer(cfg))
    info, v4 = run_in_transformers_4(artifact.path, ref_tokens[:, :-1], tmp_path)
    assert info["dtype"] == "torch.float32" and info["tied"] is False
    assert torch.equal(v4["input_ids"], input_ids)
    assert torch.equal(v4["tokens"], ref_tokens), "4.51.3 generates different greedy tokens from the shards"
    assert (v4["logits"] - ref_logits).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- the product's own 4.51.3 check


def test_export_records_the_4_51_3_check_and_the_card_states_the_measured_result(exported):
    from termtune import pipeline
    from termtune.headline import headline, terminal_block

    bedrock_python()
    cfg, artifact = exported
    check = json.loads((artifact.path / "manifest.json").read_text())["bedrock_check"]
    assert check["status"] == "passed" and check["transformers"] == "4.51.3" and check["dtype"] == "float32"
    assert check["probes"] == 4 and len(check["recorded"]["tokens"]) == 4
    assert 0 <= check["max_abs_logit_diff"] <= 1e-4
    measured = f"max |Δlogit| {check['max_abs_logit_diff']:.2g}"
    assert check["message"].startswith("loaded under transformers 4.51.3 (float32): greedy tokens equal the "
                                       "trained model's on 4 probes × 16 tokens, " + measured)
    assert check["message"] in artifact.summary()
    pipeline.write_report(cfg)
    for output in ((cfg.run_dir / "model-card.md").read_text(), (cfg.run_dir / "report.md").read_text(),
                   terminal_block(headline(cfg))):
        assert check["message"] in output


def test_without_bedrocks_interpreter_nothing_claims_the_4_51_3_check(exported, tmp_path, monkeypatch):
    from termtune import pipeline
    from termtune.export import export
    from termtune.headline import headline, terminal_block

    monkeypatch.setenv("TERMTUNE_BEDROCK_PYTHON", str(tmp_path / "no-such-python"))
    cfg = copy_run(exported[0], tmp_path)
    artifact = export(cfg)
    check = json.loads((artifact.path / "manifest.json").read_text())["bedrock_check"]
    assert check == {"status": "not run", "message": "not checked under transformers 4.51.3: "
                     f"TERMTUNE_BEDROCK_PYTHON={tmp_path / 'no-such-python'} is not a file"}
    pipeline.write_report(cfg)
    card = (cfg.run_dir / "model-card.md").read_text()
    for output in (card, (cfg.run_dir / "report.md").read_text(), terminal_block(headline(cfg)), artifact.summary()):
        assert "not checked under transformers 4.51.3" in output.replace("Not checked", "not checked")
        assert "loaded under" not in output and "checked to load" not in output and "greedy tokens" not in output


def test_export_refuses_an_artifact_that_4_51_3_computes_differently(exported, tmp_path, monkeypatch):
    """A config field that the preflight does not judge (layer_norm_epsilon) changes every logit under 4.51.3:
    the check catches it and nothing is published."""
    import importlib

    from termtune.errors import UserError

    bedrock_python()
    export_module = importlib.import_module("termtune.export")  # the module; termtune.export is the function
    write_config = export_module.write_model_config

    def with_another_epsilon(model, folder, dtype, tied):
        write_config(model, folder, dtype, tied)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": 0.5}))

    monkeypatch.setattr(export_module, "write_model_config", with_another_epsilon)
    cfg = copy_run(exported[0], tmp_path)
    with pytest.raises(UserError, match=r"export: the artifact loaded under transformers 4.51.3 \(float32\), but it "
                                        r"differs: greedy tokens equal the trained model's on 0 of 4 probes .*max \|Δlogit\| .*nothing was published"):
        export_module.export(cfg)
    assert sorted(p.name for p in cfg.run_dir.iterdir() if "artifact" in p.name) == []


def test_greedy_tokens_that_part_at_a_near_tie_are_told_apart_from_a_difference():
    """Where a probe's tokens part, 4.51.3's logits there decide: two candidates within the tolerance are a
    near-tie (reported, not counted as equal), further apart a difference (the check fails)."""
    import torch

    from termtune.bedrock_check import _compare

    tokens = torch.tensor([[0, 5, 6, 7], [0, 5, 6, 7]])
    parted = torch.tensor([[0, 5, 6, 7], [0, 5, 8, 9]])  # the second probe parts at its third token
    logits = torch.zeros(2, 3, 10)
    logits[:, :, 1] = 30.0  # the largest logit: bf16 steps of 0.125, so a tolerance of 0.5
    expected = {"input_ids": torch.ones(2, 3), "tokens": tokens, "logits": logits}
    for gap, status, said in ((0.25, "passed", "on 1 of 2 probes × 16 tokens; 1 part at a near-tie (two candidate "
                                               "tokens within 0.25 of each other), max |Δlogit| 0"),
                              (2.0, "failed", "on 1 of 2 probes × 16 tokens; 1 differs, max |Δlogit| 0")):
        got_logits = logits.clone()
        got_logits[1, 1, 6], got_logits[1, 1, 8] = 3.0, 3.0 + gap  # 4.51.3 rates both candidates at that step
        got = {"input_ids": torch.ones(2, 3), "tokens": parted, "logits": got_logits}
        result = _compare({**expected, "logits": got_logits}, got, "bfloat16", has_logits=True)
        assert result["status"] == status and said in result["message"], result["message"]
        assert result["tolerance"] == 0.5


def test_validate_loads_a_folder_under_4_51_3_against_the_tokens_export_recorded(exported, tmp_path):
    from typer.testing import CliRunner

    from termtune.cli import app
    from termtune.rundir import sha256_file

    bedrock_python()
    folder = tmp_path / "artifact"
    shutil.copytree(exported[0].run_dir / "artifact", folder)
    good = CliRunner().invoke(app, ["validate", str(folder)])
    assert good.exit_code == 0, good.output
    assert ("✓ [" in good.output and "loads and generates under transformers 4.51.3: loaded under transformers 4.51.3 "
            "(float32): greedy tokens equal those recorded at export on 4 probes × 16 tokens") in good.output
    # Another layer_norm_epsilon (manifest updated, so every preflight rule still passes): other tokens.
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": 0.5}))
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == "config.json":
            entry.update(size=(folder / "config.json").stat().st_size, sha256=sha256_file(folder / "config.json"))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    bad = CliRunner().invoke(app, ["validate", str(folder)])
    assert bad.exit_code == 1, bad.output
    assert "✗ [" in bad.output and "but it differs: greedy tokens equal those recorded at export on 0 of 4" in bad.output


def test_a_plain_5x_resave_would_not_read_identically(exported, tmp_path):
    """The hazard the export fixes is real (if this ever passes, the 4.51.3 test above may be
    checking nothing): a merged model loaded by transformers 5.x and re-saved with
    save_pretrained loads in 4.51.3 with a tied, rescaled lm_head. The validator catches it."""
    from transformers import AutoModelForSeq2SeqLM

    from termtune.modeling import load_tokenizer
    from termtune.validate import validate

    cfg, _ = exported
    naive = tmp_path / "naive"
    AutoModelForSeq2SeqLM.from_pretrained(cfg.run_dir / "artifact").save_pretrained(naive)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                 "tokenizer.model"):
        shutil.copy(cfg.run_dir / "artifact" / name, naive / name)  # isolate the weights/config hazard
    failed = {c.name for c in validate(naive) if c.failed}
    assert "embeddings and tie flag (transformers 4.51.3)" in failed
    _, ref_tokens, ref_logits = greedy_and_logits(reference_model(cfg), load_tokenizer(cfg))
    info, v4 = run_in_transformers_4(naive, ref_tokens[:, :-1], tmp_path)
    assert info["tied"] is True
    assert (v4["logits"] - ref_logits).abs().max().item() > 1e-2


# ----------------------------------------------------------------------------- options and refusals


def test_bf16_sharded_export_matches_the_merged_weights(exported, tmp_path):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from termtune.export import export
    from termtune.validate import validate

    cfg = copy_run(exported[0], tmp_path, "export.dtype=bf16", "export.max_shard_size=3MB")
    artifact = export(cfg)
    names = {p.name for p in artifact.path.iterdir()}
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in names and artifact.shards == len(shards)
    assert not [c for c in validate(artifact.path) if c.failed]
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(artifact.path, dtype=torch.bfloat16)
    assert reloaded.lm_head.weight.data_ptr() != reloaded.shared.weight.data_ptr()
    expected = reference_model(cfg).state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name


def test_existing_artifact_is_replaced_only_with_force(exported, tmp_path):
    from termtune.errors import UserError
    from termtune.export import export

    cfg = copy_run(exported[0], tmp_path)
    first = export(cfg)
    stamp = json.loads((first.path / "manifest.json").read_text())["created_at"]
    marker = first.path / "config.json"
    before = marker.stat().st_ino
    with pytest.raises(UserError, match="already exists; pass --force"):
        export(cfg)
    assert marker.stat().st_ino == before
    time.sleep(1.1)
    export(cfg, force=True)
    assert marker.stat().st_ino != before
    assert json.loads((first.path / "manifest.json").read_text())["created_at"] != stamp


def test_missing_adapter_says_train_first(tmp_path):
    from termtune.errors import UserError
    from termtune.export import export

    cfg = make_config(tmp_path / "run")
    with pytest.raises(UserError, match="run termtune train first"):
        export(cfg)


def test_pickle_adapter_is_refused_unless_allowed(exported, tmp_path):
    import torch
    from safetensors.torch import load_file

    from termtune.errors import UserError
    from termtune.export import export

    cfg = copy_run(exported[0], tmp_path)
    adapter = cfg.run_dir / "train" / "adapter"
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="pickle"):
        export(cfg)
    allowed = make_config(cfg.run_dir, "model.allow_pickle=true")
    record_adapter(allowed)
    assert not [c for c in export(allowed).checks if c.failed]


def test_fp16_export_is_refused_with_the_reason(tmp_path):
    from termtune.errors import UserError

    with pytest.raises(UserError, match="overflows"):
        make_config(tmp_path / "run", "export.dtype=fp16")


def test_export_after_4bit_training_merges_into_the_unquantized_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from termtune.export import export

    cfg = make_trained_run(tmp_path / "run", quantization="4bit")
    artifact = export(cfg)
    config = json.loads((artifact.path / "config.json").read_text())
    assert "quantization_config" not in config
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(artifact.path)
    reference = reference_model(cfg).state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, reference[name]), name


# ----------------------------------------------------------------------------- crash safety


def start_export(cfg, *flags: str) -> subprocess.Popen:
    data = cfg.data.source
    args = [sys.executable, "-m", "termtune.cli", "export", *tiny_overrides(cfg.run_dir, data), *flags]
    env = {**os.environ, "TERMTUNE_EXPORT_TEST_PAUSE": "60", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_mid_write(proc: subprocess.Popen, run_dir: Path) -> Path:
    """SIGKILL the export once its temporary folder holds weights; return that folder."""
    deadline = time.time() + 120
    while time.time() < deadline:
        partials = [p for p in run_dir.glob(".artifact.partial-*") if (p / "spiece.model").exists()]
        if partials:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return partials[0]
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the export never reached its temporary folder")


def test_kill_during_export_leaves_no_valid_looking_artifact(exported, tmp_path):
    from termtune.export import export
    from termtune.validate import validate

    cfg = copy_run(exported[0], tmp_path)
    partial = kill_mid_write(start_export(cfg), cfg.run_dir)
    final = cfg.run_dir / "artifact"
    assert not final.exists()
    assert [c for c in validate(final) if c.failed]
    assert (partial / "model.safetensors").exists() and not (partial / "manifest.json").exists()
    # The next export needs no --force (nothing was published) and sweeps the leftover.
    assert not [c for c in export(cfg).checks if c.failed]
    assert not partial.exists()


def test_kill_during_forced_export_keeps_the_old_artifact(exported, tmp_path):
    from termtune.rundir import sha256_file

    cfg = copy_run(exported[0], tmp_path)
    shutil.copytree(exported[0].run_dir / "artifact", cfg.run_dir / "artifact")
    manifest = json.loads((cfg.run_dir / "artifact" / "manifest.json").read_text())
    kill_mid_write(start_export(cfg, "--force"), cfg.run_dir)
    for entry in manifest["files"]:
        assert sha256_file(cfg.run_dir / "artifact" / entry["path"]) == entry["sha256"]


# ----------------------------------------------------------------------------- --force never destroys what is not its own


def tree(folder: Path) -> dict[str, bytes]:
    # the lock file names the last command that held it: it is not output
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".termtune.lock"}


@pytest.mark.parametrize("where,message", [
    ("run", r"export.dir=.*/run: that folder holds the run directory"),
    ("parent", r"export.dir=.*: that folder holds the run directory"),
    ("someone-elses", r"exists and is not a termtune artifact \(no termtune manifest.json\)"),
    ("artifact-plus-notes", r"holds notes.txt, which the artifact's manifest does not list"),
    ("artifact-plus-folder", r"holds keep, which the artifact's manifest does not list"),
    ("a-file", r"a file is in the way"),
])
def test_force_replaces_only_a_termtune_artifact(exported, tmp_path, where, message):
    from typer.testing import CliRunner

    from termtune.cli import app

    cfg = copy_run(exported[0], tmp_path)
    target = {"run": cfg.run_dir, "parent": tmp_path}.get(where, tmp_path / where)
    if where.startswith("artifact"):
        shutil.copytree(exported[0].run_dir / "artifact", target)
        (target / "notes.txt").write_text("mine") if where.endswith("notes") else (target / "keep").mkdir()
    elif where == "someone-elses":
        target.mkdir()
        (target / "thesis.tex").write_text("years of work")
    elif where == "a-file":
        target.write_text("a file")
    before = tree(tmp_path) if target.is_dir() else target.read_bytes()
    args = ["export", *tiny_overrides(cfg.run_dir, cfg.data.source), f"export.dir={target}", "--force"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), result.output
    assert (tree(tmp_path) if target.is_dir() else target.read_bytes()) == before


def test_symlinked_export_dir_is_written_through_and_leaves_nothing_behind(exported, tmp_path):
    from termtune.export import export

    cfg = copy_run(exported[0], tmp_path)
    real = tmp_path / "disk" / "artifact"
    real.parent.mkdir()
    shutil.copytree(exported[0].run_dir / "artifact", real)
    link = tmp_path / "links" / "artifact"
    link.parent.mkdir()
    link.symlink_to(real, target_is_directory=True)
    old_inode = (real / "model.safetensors").stat().st_ino
    (real.parent / ".artifact.old-99999").mkdir()  # a swap killed half-way, long ago
    artifact = export(make_config(cfg.run_dir, f"export.dir={link}"), force=True)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert (real / "model.safetensors").stat().st_ino != old_inode
    assert not [c for c in artifact.checks if c.failed]
    assert sorted(p.name for p in link.parent.iterdir()) == ["artifact"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["artifact"]


# ----------------------------------------------------------------------------- a diverged model is never shipped


def test_adapter_with_nan_is_refused_before_merging(exported, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from termtune.errors import UserError
    from termtune.export import export

    cfg = copy_run(exported[0], tmp_path)
    path = cfg.run_dir / "train" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    for name in list(tensors)[:3]:
        tensors[name][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match=rf"3 of {len(tensors)} LoRA tensors hold NaN or inf .*lower "
                                        r"train.learning_rate") as e:
        export(cfg)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in cfg.run_dir.iterdir() if "artifact" in p.name) == []


def test_merged_weights_with_inf_are_refused_and_nothing_is_published(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    from termtune.errors import UserError
    from termtune.export import export

    cfg = copy_run(exported[0], tmp_path)
    path = cfg.run_dir / "base-model" / "model.safetensors"
    tensors = load_file(path)
    tensors["decoder.final_layer_norm.weight"][0] = float("inf")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"merged weight decoder.final_layer_norm.weight holds NaN or inf in F32"):
        export(cfg)
    assert sorted(p.name for p in cfg.run_dir.iterdir() if "artifact" in p.name) == []


def test_an_adapter_other_than_the_trained_one_is_refused_before_merging(exported, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from termtune.errors import UserError
    from termtune.export import export

    # Another run's adapter copied over this one's: same shapes, other weights.
    cfg = copy_run(exported[0], tmp_path)
    path = cfg.run_dir / "train" / "adapter" / "adapter_model.safetensors"
    tensors = {name: t + 0.01 * torch.ones_like(t) for name, t in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"train/adapter does not match the adapter train recorded \(sha256 [0-9a-f]{16}…, "
                                        r"found [0-9a-f]{16}…\); re-run `termtune train --force`$") as e:
        export(cfg)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in cfg.run_dir.iterdir() if "artifact" in p.name) == []
