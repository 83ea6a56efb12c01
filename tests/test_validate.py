"""The CMI preflight on crafted folders: each rule catches its own mistake, and only it."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TOKENIZER_DIR
from safetensors.numpy import save_file

from termtune.validate import format_checks, validate

CONFIG = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": 8, "d_kv": 2,
          "num_heads": 4, "d_ff": 16, "num_layers": 1, "num_decoder_layers": 1, "vocab_size": 32,
          "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "torch_dtype": "float32",
          "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}


def weights(dtype=np.float32, lm_head: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {"shared.weight": rng.standard_normal((32, 8)).astype(dtype),
           "encoder.block.0.layer.0.SelfAttention.q.weight": rng.standard_normal((8, 8)).astype(dtype),
           "decoder.block.0.layer.0.SelfAttention.q.weight": rng.standard_normal((8, 8)).astype(dtype)}
    if lm_head:
        out["lm_head.weight"] = rng.standard_normal((32, 8)).astype(dtype)
    return out


def make_folder(root: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    """A small folder that passes every rule: a v4-style config, safetensors, the real tokenizer files."""
    folder = root / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config or CONFIG))
    (folder / "generation_config.json").write_text(json.dumps({"decoder_start_token_id": 0, "eos_token_id": 1}))
    save_file(tensors or weights(), str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model"):
        shutil.copy(TOKENIZER_DIR / name, folder / name)
    shutil.copy(TOKENIZER_DIR / "spiece.model", folder / "tokenizer.model")
    return folder


def outcome(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(failed name -> message, warning name -> message)."""
    checks = validate(folder)
    return ({c.name: c.message for c in checks if c.failed},
            {c.name: c.message for c in checks if c.warning and not c.ok})


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_a_good_folder_passes_with_only_the_manifest_warning(tmp_path):
    failed, warnings = outcome(make_folder(tmp_path))
    assert failed == {}
    assert set(warnings) == {"manifest"}


def test_adapter_only_folder_says_export_first(tmp_path):
    folder = tmp_path / "checkpoint-50"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file({"base_model.model.lora_A.weight": np.zeros((8, 8), np.float32)},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (folder / name).write_bytes(b"\x80\x04pickle")
    (folder / "trainer_state.json").write_text("{}")
    failed, _ = outcome(folder)
    assert failed["merged model, not an adapter"].startswith("adapter only")
    assert "run termtune export first" in failed["merged model, not an adapter"]
    assert "optimizer.pt" in failed["no pickle or trainer files"]


def test_adapter_files_beside_merged_weights_fail(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "adapter_config.json").write_text("{}")
    failed, _ = outcome(folder)
    assert set(failed) == {"merged model, not an adapter"}
    assert "merge LoRA first" in failed["merged model, not an adapter"]


def test_fp16_weights_fail_with_the_t5_reason(tmp_path):
    folder = make_folder(tmp_path, tensors=weights(np.float16))
    failed, _ = outcome(folder)
    assert set(failed) == {"weight dtype"}
    assert "overflows" in failed["weight dtype"]


def test_tokenizer_model_must_be_there_and_equal_spiece_model(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "tokenizer.model").write_bytes(b"not the same model")
    failed, _ = outcome(folder)
    assert "differs from spiece.model" in failed["tokenizer files"]
    (folder / "tokenizer.model").unlink()
    failed, _ = outcome(folder)
    assert "tokenizer.model" in failed["tokenizer files"]


def test_missing_spiece_model_fails(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "spiece.model").unlink()
    failed, _ = outcome(folder)
    assert set(failed) == {"tokenizer files"}
    assert "spiece.model" in failed["tokenizer files"]


@pytest.mark.parametrize("tie, lm_head", [(True, True), (None, True), (False, False)])
def test_tie_flag_must_agree_with_lm_head(tmp_path, tie, lm_head):
    config = {k: v for k, v in CONFIG.items() if k != "tie_word_embeddings"}
    if tie is not None:
        config["tie_word_embeddings"] = tie
    failed, _ = outcome(make_folder(tmp_path, config=config, tensors=weights(lm_head=lm_head)))
    assert set(failed) == {"embeddings and tie flag (transformers 4.51.3)"}


def test_tied_folder_without_lm_head_is_only_a_warning(tmp_path):
    config = {**CONFIG, "tie_word_embeddings": True}
    failed, warnings = outcome(make_folder(tmp_path, config=config, tensors=weights(lm_head=False)))
    assert failed == {}
    assert "embeddings and tie flag (transformers 4.51.3)" in warnings


def test_bin_only_folder_fails_as_pickle(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    failed, _ = outcome(folder)
    assert failed["no pickle or trainer files"].startswith("pickle weights only")
    assert "no model *.safetensors" in failed["safetensors shards and index"]


def make_sharded(tmp_path: Path) -> Path:
    folder = make_folder(tmp_path)
    tensors = weights()
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_consistent_shards_pass(tmp_path):
    failed, _ = outcome(make_sharded(tmp_path))
    assert failed == {}


@pytest.mark.parametrize("removed, expected", [
    ("model-00002-of-00002.safetensors", "missing: model-00002-of-00002.safetensors"),
    ("model.safetensors.index.json", "no model.safetensors.index.json"),
])
def test_a_missing_shard_or_index_fails(tmp_path, removed, expected):
    folder = make_sharded(tmp_path)
    (folder / removed).unlink()
    failed, _ = outcome(folder)
    assert expected in failed["safetensors shards and index"]


def test_index_disagreeing_with_the_headers_fails(tmp_path):
    folder = make_sharded(tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["shared.weight"] = "model-00001-of-00002.safetensors"
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    failed, _ = outcome(folder)
    assert "disagrees" in failed["safetensors shards and index"]


def test_quantized_config_and_int_weights_fail(tmp_path):
    config = {**CONFIG, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    tensors = {**weights(), "encoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((32, 1), np.uint8)}
    failed, _ = outcome(make_folder(tmp_path, config=config, tensors=tensors))
    assert set(failed) == {"not quantized", "weight dtype"}
    assert "bitsandbytes" in failed["not quantized"] and "U8" in failed["weight dtype"]


def test_head_count_not_multiple_of_four_is_a_warning_not_a_failure(tmp_path):
    config = {**CONFIG, "num_heads": 6, "d_kv": 2, "d_model": 12}
    failed, warnings = outcome(make_folder(tmp_path, config=config))
    assert failed == {}
    assert "num_heads 6" in warnings["head count"]


def test_attention_shape_mismatch_fails(tmp_path):
    failed, _ = outcome(make_folder(tmp_path, config={**CONFIG, "d_kv": 3}))
    assert set(failed) == {"attention shape"}


def test_config_written_by_transformers_5_fails_the_4x_rules(tmp_path):
    folder = make_folder(tmp_path, config={**{k: v for k, v in CONFIG.items() if k != "torch_dtype"},
                                           "dtype": "float32"})
    edit_json(folder / "tokenizer_config.json", extra_special_tokens=[f"<extra_id_{i}>" for i in range(100)],
              additional_special_tokens=None)
    failed, _ = outcome(folder)
    assert set(failed) == {"torch_dtype (transformers 4.51.3)", "tokenizer_config.json (transformers 4.51.3)"}
    assert "'list' object has no attribute 'keys'" in failed["tokenizer_config.json (transformers 4.51.3)"]


def test_wrong_architecture_fails(tmp_path):
    config = {**CONFIG, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    failed, _ = outcome(make_folder(tmp_path, config=config))
    assert "model_type is 'llama'" in failed["architecture"]


def test_truncated_or_unmarked_safetensors_fail(tmp_path):
    folder = make_folder(tmp_path)
    blob = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(blob[:-10])
    assert "truncated" in outcome(folder)[0]["safetensors headers"]
    save_file(weights(), str(folder / "model.safetensors"), metadata={"format": "np"})
    assert "format is 'np'" in outcome(folder)[0]["safetensors headers"]


def test_manifest_size_mismatch_fails_and_strays_warn(tmp_path):
    folder = make_folder(tmp_path)
    files = [{"path": p.name, "size": p.stat().st_size} for p in folder.iterdir()]
    (folder / "manifest.json").write_text(json.dumps({"files": files}))
    assert outcome(folder) == ({}, {})
    (folder / "notes.txt").write_text("hello")
    assert outcome(folder) == ({}, {"other files": "unexpected entries notes.txt: upload only the model files "
                                                   "(flat prefix)"})
    (folder / "config.json").write_text(json.dumps({**CONFIG, "comment": "edited after export"}))
    assert "manifest says" in outcome(folder)[0]["manifest"]


def test_missing_folder_is_one_failing_check(tmp_path):
    checks = validate(tmp_path / "nope")
    assert len(checks) == 1 and checks[0].failed and "does not exist" in checks[0].message


def test_format_checks_numbers_every_line(tmp_path):
    folder = make_folder(tmp_path, config={**CONFIG, "num_heads": 6, "d_model": 12})
    (folder / "spiece.model").unlink()
    checks = validate(folder)
    lines = format_checks(checks).splitlines()
    total = len(checks)
    assert len(lines) == total + 1
    assert lines[0].startswith(f"✓ [1/{total}] merged model, not an adapter: ")
    assert any(line.startswith("✗ [") and "spiece.model" in line for line in lines)
    assert any(line.startswith("! [") and "num_heads 6" in line for line in lines)
    assert lines[-1].startswith("FAILED: ")
    assert checks[0].as_dict() == {"number": 1, "name": "merged model, not an adapter", "ok": True,
                                   "message": "no LoRA adapter files", "warning": False, "failed": False}


def test_cli_exit_codes_and_json(tmp_path):
    from typer.testing import CliRunner

    from termtune.cli import app

    folder = make_folder(tmp_path)
    runner = CliRunner()
    # --no-load: this crafted folder only passes the preflight rules; loading it under transformers 4.51.3
    # is tested on real exports (tests/test_export.py)
    good = runner.invoke(app, ["validate", str(folder), "--no-load"])
    assert good.exit_code == 0 and "OK: " in good.output
    as_json = runner.invoke(app, ["validate", str(folder), "--json", "--no-load"])
    assert as_json.exit_code == 0 and not [c for c in json.loads(as_json.output) if c["failed"]]
    (folder / "config.json").unlink()
    bad = runner.invoke(app, ["validate", str(folder)])
    assert bad.exit_code == 1 and "✗" in bad.output


def test_validate_imports_no_torch(tmp_path):
    folder = make_folder(tmp_path)
    code = ("import sys; from termtune.validate import validate; validate(sys.argv[1]); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F64"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_in_any_weight_fails(tmp_path, monkeypatch, dtype, value):
    import torch
    from safetensors.torch import save_file as save_torch

    # the stage module (termtune.validate is the API function)
    monkeypatch.setattr(importlib.import_module("termtune.validate"), "SCAN_CHUNK_BYTES", 24)  # many chunks per tensor, a short last one

    torch_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}[dtype]
    tensors = {name: torch.from_numpy(array).to(torch_dtype) for name, array in weights().items()}
    tensors["decoder.block.0.layer.0.SelfAttention.q.weight"][7, 7] = value  # the very last value of a tensor
    folder = make_folder(tmp_path)
    save_torch(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    failed, _ = outcome(folder)
    assert failed["finite weights"] == ("1 of 4 tensors hold NaN or inf (e.g. decoder.block.0.layer.0.SelfAttention.q."
                                        "weight in model.safetensors): the model diverged in training; do not ship it")


def test_extreme_finite_weights_pass_and_every_shard_is_scanned(tmp_path):
    import torch
    from safetensors.torch import save_file as save_torch

    tensors = {name: torch.from_numpy(array) for name, array in weights().items()}
    names = sorted(tensors)  # the first two go to an F32 shard, the last two to a BF16 one
    for name, dtype in ((names[0], torch.float32), (names[3], torch.bfloat16)):
        tensors[name][0, :2] = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max])
    folder = make_folder(tmp_path)
    (folder / "model.safetensors").unlink()
    save_torch({n: tensors[n] for n in names[:2]}, str(folder / "model-00001-of-00002.safetensors"),
               metadata={"format": "pt"})
    save_torch({n: tensors[n].to(torch.bfloat16) for n in names[2:]}, str(folder / "model-00002-of-00002.safetensors"),
               metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f"model-0000{1 + (i >= 2)}-of-00002.safetensors" for i, n in enumerate(names)}}))
    checks = {c.name: c for c in validate(folder)}
    assert checks["finite weights"].ok and checks["finite weights"].message == "4 tensors scanned, no NaN or inf"
    tensors[names[3]][0, 0] = float("nan")
    save_torch({n: tensors[n].to(torch.bfloat16) for n in names[2:]}, str(folder / "model-00002-of-00002.safetensors"),
               metadata={"format": "pt"})
    assert outcome(folder)[0]["finite weights"].startswith(f"1 of 4 tensors hold NaN or inf (e.g. {names[3]} in "
                                                           "model-00002-of-00002.safetensors)")
