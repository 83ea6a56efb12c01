"""Preflight a model folder against the Bedrock Custom Model Import rules for Flan-T5.

    checks = validate("runs/demo/artifact")
    print(format_checks(checks))          # ✓ [1/22] merged model, not an adapter: ...   ✗ ...   ! ...
    if any(c.failed for c in checks): ...

Works on any folder (an export, a plain `save_pretrained` output, a trainer checkpoint)
without a GPU, without AWS and without importing torch: safetensors headers are parsed
straight from the file (an 8-byte little-endian length, then a JSON header), and every
weight is streamed once (numpy, memory-mapped) to find NaN and inf values.

It reads what it judges: the tensor names and shapes against what config.json implies (every
layer, every width), the tokenizer files parsed (tokenizer.json's vocabulary, the SentencePiece
model loaded), the embedding rows against the tokenizer's vocabulary, the pad/eos/decoder-start
ids across config.json, generation_config.json and the tokenizer, and every file's sha256
against manifest.json.

The rules are reference/bedrock-cmi.md §1.9 plus what transformers 4.51.3, the version
Bedrock serves imported models with, needs to read the folder the way it was meant:
the tie flag must agree with the presence of `lm_head.weight` (4.x ties and rescales the
output otherwise), `tokenizer_config.json` must not use 5.x-only forms, and `torch_dtype`
must be present.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from termtune.results import StageResult, html_table
from termtune.rundir import sha256_file

MAX_TOTAL_BYTES = 200 * 10**9  # CMI text-model size limit
INDEX_FILE = "model.safetensors.index.json"
# AWS's minimum import files name tokenizer.model; T5Tokenizer loads spiece.model: ship both, identical.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                   "tokenizer.model")
T5_TOKENIZERS = ("T5Tokenizer", "T5TokenizerFast")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
OTHER_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".gguf", ".onnx")
TRAINER_FILES = ("trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")
# What Bedrock reads as the model: each must be in an export's manifest.json.
MODEL_FILES = {"config.json", "generation_config.json", INDEX_FILE, "added_tokens.json", *TOKENIZER_FILES}
KNOWN_FILES = {*MODEL_FILES, "manifest.json", "README.md", ".gitattributes"}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 * 2**20
# Float dtype -> (its bits as an unsigned little-endian integer, the mask that drops the sign bit, the
# smallest masked value that is inf or NaN: all exponent bits set). Comparing integers finds NaN and inf
# in one vectorised pass, with no float conversion (numpy has no bfloat16).
FLOAT_BITS = {"F64": ("<u8", 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
              "F32": ("<u4", 0x7FFF_FFFF, 0x7F80_0000),
              "F16": ("<u2", 0x7FFF, 0x7C00),
              "BF16": ("<u2", 0x7FFF, 0x7F80)}
SCAN_CHUNK_BYTES = 8 * 2**20

OK, FAIL, WARN = "ok", "fail", "warn"


@dataclass
class Check:
    """One numbered rule and its outcome. A warning never fails the folder."""

    number: int
    name: str
    ok: bool
    message: str
    warning: bool = False

    @property
    def failed(self) -> bool:
        return not self.ok and not self.warning

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failed": self.failed}


@dataclass(repr=False)
class Validation(StageResult):
    """The preflight of one folder: every numbered check; it passes when no check failed."""

    folder: Path
    checks: list[Check]

    @property
    def failed(self) -> bool:
        return any(c.failed for c in self.checks)

    def summary(self) -> str:
        return format_checks(self.checks)

    def _repr_html_(self) -> str:
        rows = [[c.number, "✓" if c.ok else ("!" if c.warning else "✗"), c.name, c.message] for c in self.checks]
        verdict = self.summary().splitlines()[-1]
        return html_table(["#", "", "check", "finding"], rows, caption=f"{self.folder}: {verdict}")


def validate(directory: str | Path) -> list[Check]:
    """Run every rule on `directory` and return the numbered results (never raises)."""
    folder = _Folder(Path(directory))
    if not folder.path.is_dir():
        reason = "does not exist" if not folder.path.exists() else "is not a folder"
        return [Check(1, "folder", False, f"{folder.path} {reason}")]
    checks = []
    for number, (name, rule) in enumerate(RULES, start=1):
        try:
            status, message = rule(folder)
        except Exception as e:  # a rule must never take the whole preflight down
            status, message = FAIL, f"could not check: {type(e).__name__}: {e}"
        checks.append(Check(number, name, status == OK, message, warning=status == WARN))
    return checks


def format_checks(checks: list[Check]) -> str:
    """One line per check (✓ pass, ✗ fail, ! warning) and a one-line verdict."""
    total = len(checks)
    lines = []
    for c in checks:
        mark = "✓" if c.ok else ("!" if c.warning else "✗")
        lines.append(f"{mark} [{c.number}/{total}] {c.name}: {c.message}")
    failed = sum(c.failed for c in checks)
    warnings = sum(c.warning and not c.ok for c in checks)
    verdict = "FAILED" if failed else "OK"
    lines.append(f"{verdict}: {total - failed - warnings} passed, {failed} failed, {warnings} warnings")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- folder facts


class _Folder:
    """What the rules look at, read once: file list, config, safetensors headers, tokenizer vocabulary."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cache: dict[str, Any] = {}

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def files(self) -> dict[str, int]:
        """Top-level file name -> size in bytes."""
        return self._once("files", lambda: {p.name: p.stat().st_size for p in sorted(self.path.iterdir())
                                            if p.is_file()})

    @property
    def subfolders(self) -> list[str]:
        return self._once("dirs", lambda: sorted(p.name for p in self.path.iterdir() if p.is_dir()))

    def json(self, name: str) -> tuple[Any, str | None]:
        """(parsed JSON, None) or (None, why it could not be read)."""
        def load() -> tuple[Any, str | None]:
            if name not in self.files:
                return None, f"{name} is missing"
            try:
                return json.loads((self.path / name).read_text(encoding="utf-8")), None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                return None, f"{name} is not valid JSON ({e})"
        return self._once(f"json:{name}", load)

    @property
    def config(self) -> dict[str, Any] | None:
        value, _ = self.json("config.json")
        return value if isinstance(value, dict) else None

    @property
    def weight_files(self) -> list[str]:
        """Model (not adapter) safetensors files."""
        return [n for n in self.files if n.endswith(".safetensors") and not n.startswith("adapter_model")]

    @property
    def headers(self) -> dict[str, tuple[dict | None, str | None]]:
        return self._once("headers", lambda: {n: read_safetensors_header(self.path / n) for n in self.weight_files})

    @property
    def tensors(self) -> dict[str, tuple[str, list[int], str]]:
        """Tensor name -> (dtype, shape, file) over every readable shard."""
        def collect() -> dict[str, tuple[str, list[int], str]]:
            out = {}
            for file, (header, _) in self.headers.items():
                for name, info in (header or {}).items():
                    if name != "__metadata__" and isinstance(info, dict):
                        out[name] = (info.get("dtype"), info.get("shape"), file)
            return out
        return self._once("tensors", collect)

    @property
    def weights_label(self) -> str:
        """How messages name the weights: the file, or the shard count."""
        files = self.weight_files
        return files[0] if len(files) == 1 else f"the {len(files)} safetensors shards"

    @property
    def vocabulary(self) -> tuple[dict[str, int] | None, str | None]:
        """(tokenizer.json's token -> id, None) or (None, why it cannot be read)."""
        def load() -> tuple[dict[str, int] | None, str | None]:
            value, error = self.json("tokenizer.json")
            if error:
                return None, error
            try:
                return tokenizer_json_vocabulary(value), None
            except ValueError as e:
                return None, str(e)
        return self._once("vocabulary", load)


def read_safetensors_header(path: Path) -> tuple[dict | None, str | None]:
    """Parse a safetensors header without loading tensors; also catch truncated files.

    Returns (header, None) or (None, what is wrong).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return None, "shorter than 8 bytes"
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER_BYTES, size - 8):
                return None, f"header length {n} is impossible for a {size}-byte file"
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable header ({e})"
    if not isinstance(header, dict):
        return None, "header is not a JSON object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            count = 1
            for dim in info["shape"]:
                count *= dim
            width = DTYPE_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            return None, f"tensor {name}: malformed header entry"
        if width is not None and stop - begin != count * width:
            return None, f"tensor {name}: {stop - begin} bytes for shape {info['shape']} {info['dtype']}"
        end = max(end, stop)
    if size != 8 + n + end:
        return None, f"file is {size} bytes but the header describes {8 + n + end} (truncated or padded)"
    return header, None


def nonfinite_tensors(path: Path) -> tuple[list[str], int]:
    """(names of the float tensors holding NaN or inf, float tensors scanned) in a safetensors file.

    Streams the file through a memory map in SCAN_CHUNK_BYTES pieces, so memory stays flat
    whatever the model size. Raises ValueError for a file whose header cannot be read.
    """
    import numpy as np

    header, error = read_safetensors_header(path)
    if error:
        raise ValueError(f"{path.name}: {error}")
    with open(path, "rb") as f:
        start = 8 + struct.unpack("<Q", f.read(8))[0]
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size > start else np.empty(0, np.uint8)
    bad, scanned = [], 0
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in FLOAT_BITS:
            continue
        dtype, mask, nonfinite = FLOAT_BITS[info["dtype"]]
        begin, end = info["data_offsets"]
        values = data[start + begin:start + end].view(dtype)
        step = SCAN_CHUNK_BYTES // values.itemsize
        buffer = np.empty(min(step, values.size), dtype=dtype)
        scanned += 1
        for i in range(0, values.size, step):
            part = buffer[:min(step, values.size - i)]
            np.bitwise_and(values[i:i + step], mask, out=part)
            if part.max() >= nonfinite:
                bad.append(name)
                break
    del data
    return bad, scanned


# ----------------------------------------------------------------------------- expected tensors
# model_type -> function(config.json) -> (required, aliases), each {tensor name: shape}. Required
# tensors must all be in the weights; aliases are names transformers ties to another tensor on load
# (a file may hold them, as older saves did, but need not). A new model family adds its function.


def _config_int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"config.json has no non-negative integer {key} (found {value!r})")
    return value


def t5_tensors(config: dict[str, Any]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """T5ForConditionalGeneration as transformers 4.51.3 saves it: shared.weight holds the token
    embeddings (encoder/decoder.embed_tokens are the same tensor), relative position biases in
    block 0 of each stack only, a gated (wi_0, wi_1) or plain (wi) feed-forward as feed_forward_proj
    says (or is_gated_act, where saved), and lm_head.weight unless tie_word_embeddings (T5's default:
    true) ties it to shared."""
    vocab, d_model = _config_int(config, "vocab_size"), _config_int(config, "d_model")
    inner = _config_int(config, "num_heads") * _config_int(config, "d_kv")
    d_ff, heads = _config_int(config, "d_ff"), _config_int(config, "num_heads")
    buckets = _config_int(config, "relative_attention_num_buckets", 32)
    encoder_layers = _config_int(config, "num_layers")
    decoder_layers = encoder_layers if config.get("num_decoder_layers") is None \
        else _config_int(config, "num_decoder_layers")
    # transformers reads a saved is_gated_act over the one feed_forward_proj implies (4.51.3 and 5.x alike)
    gated = bool(config.get("is_gated_act", str(config.get("feed_forward_proj", "relu")).split("-")[0] == "gated"))

    def attention(prefix: str) -> dict[str, list[int]]:
        return {f"{prefix}.q.weight": [inner, d_model], f"{prefix}.k.weight": [inner, d_model],
                f"{prefix}.v.weight": [inner, d_model], f"{prefix}.o.weight": [d_model, inner]}

    def feed_forward(prefix: str) -> dict[str, list[int]]:
        up = {f"{prefix}.wi_0.weight": [d_ff, d_model], f"{prefix}.wi_1.weight": [d_ff, d_model]} if gated \
            else {f"{prefix}.wi.weight": [d_ff, d_model]}
        return {**up, f"{prefix}.wo.weight": [d_model, d_ff]}

    required = {"shared.weight": [vocab, d_model]}
    for stack, layers in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        for i in range(layers):
            block = f"{stack}.block.{i}.layer"
            required.update(attention(f"{block}.0.SelfAttention"))
            required[f"{block}.0.layer_norm.weight"] = [d_model]
            if i == 0:
                required[f"{block}.0.SelfAttention.relative_attention_bias.weight"] = [buckets, heads]
            last = 1
            if stack == "decoder":
                required.update(attention(f"{block}.1.EncDecAttention"))
                required[f"{block}.1.layer_norm.weight"] = [d_model]
                last = 2
            required.update(feed_forward(f"{block}.{last}.DenseReluDense"))
            required[f"{block}.{last}.layer_norm.weight"] = [d_model]
        required[f"{stack}.final_layer_norm.weight"] = [d_model]
    aliases = {"encoder.embed_tokens.weight": [vocab, d_model], "decoder.embed_tokens.weight": [vocab, d_model]}
    if config.get("tie_word_embeddings", True) is False:
        required["lm_head.weight"] = [vocab, d_model]
    else:
        aliases["lm_head.weight"] = [vocab, d_model]
    return required, aliases


TENSOR_TABLES: dict[str, Callable[[dict[str, Any]], tuple[dict[str, list[int]], dict[str, list[int]]]]] = {
    "t5": t5_tensors,
}


# ----------------------------------------------------------------------------- tokenizer facts


def special_token(value: Any) -> str | None:
    """A special token as tokenizer_config.json or special_tokens_map.json write it: a string or
    {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


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


# ----------------------------------------------------------------------------- rules
# Each rule returns (status, one-line reason). Order matters: it is the numbering users see.


def _adapter(f: _Folder) -> tuple[str, str]:
    found = [n for n in ADAPTER_FILES if n in f.files]
    if not found:
        return OK, "no LoRA adapter files"
    if not f.weight_files:
        return FAIL, f"adapter only ({', '.join(found)}): run termtune export first to merge it into the base"
    return FAIL, f"adapter files beside the merged weights ({', '.join(found)}): remove them; merge LoRA first"


def _pickle_and_trainer(f: _Folder) -> tuple[str, str]:
    pickles = [n for n in f.files if n.endswith(PICKLE_SUFFIXES) or n.startswith(("rng_state", "optimizer"))]
    trainer = [n for n in f.files if n in TRAINER_FILES and n not in pickles]
    others = [n for n in f.files if n.endswith(OTHER_WEIGHT_SUFFIXES)]
    bad = pickles + trainer + others
    if not bad:
        return OK, "no pickle, trainer-state or non-PyTorch weight files"
    if not f.weight_files and any(n.endswith(".bin") for n in pickles):
        return FAIL, (f"pickle weights only ({', '.join(pickles)}): Bedrock reads safetensors; "
                      "run termtune export (or save_pretrained with safe_serialization=True)")
    return FAIL, f"remove {', '.join(bad)}: Bedrock needs only the merged safetensors model and its tokenizer"


def _config_present(f: _Folder) -> tuple[str, str]:
    value, error = f.json("config.json")
    if error:
        return FAIL, error
    if not isinstance(value, dict):
        return FAIL, "config.json is not a JSON object"
    return OK, "config.json readable"


def _architecture(f: _Folder) -> tuple[str, str]:
    c = f.config
    if c is None:
        return FAIL, "no readable config.json"
    if c.get("model_type") != "t5":
        return FAIL, f"model_type is {c.get('model_type')!r}; expected 't5' (Flan-T5)"
    if c.get("architectures") != ["T5ForConditionalGeneration"]:
        return FAIL, f"architectures is {c.get('architectures')!r}; expected ['T5ForConditionalGeneration']"
    return OK, "t5 / T5ForConditionalGeneration"


def _attention_shape(f: _Folder) -> tuple[str, str]:
    c = f.config or {}
    try:
        d_model, heads, d_kv = int(c["d_model"]), int(c["num_heads"]), int(c["d_kv"])
    except (KeyError, TypeError, ValueError):
        return FAIL, "config.json lacks integer d_model, num_heads or d_kv"
    if d_model != heads * d_kv:
        return FAIL, f"d_model {d_model} != num_heads {heads} * d_kv {d_kv}"
    return OK, f"d_model {d_model} = {heads} heads * d_kv {d_kv}"


def _head_count(f: _Folder) -> tuple[str, str]:
    heads = (f.config or {}).get("num_heads")
    if not isinstance(heads, int):
        return FAIL, "config.json has no integer num_heads"
    if heads % 4:
        return WARN, (f"num_heads {heads} is not a multiple of 4: CMI once required it (lifted in 2024-10, "
                      "flan-t5-small imports now); an import may still fail")
    return OK, f"num_heads {heads} is a multiple of 4"


def _not_quantized(f: _Folder) -> tuple[str, str]:
    c = f.config or {}
    if "quantization_config" in c:
        method = (c["quantization_config"] or {}).get("quant_method", "?")
        return FAIL, (f"config.json has quantization_config ({method}): Bedrock imports full weights; "
                      "merge into the unquantized base (termtune export does)")
    return OK, "no quantization_config"


def _torch_dtype(f: _Folder) -> tuple[str, str]:
    c = f.config or {}
    value = c.get("torch_dtype")
    if value is None:
        return FAIL, "config.json has no torch_dtype (transformers 5.x writes only 'dtype'; 4.51.3 reads torch_dtype)"
    if value not in ("float32", "bfloat16"):
        return FAIL, f"torch_dtype is {value!r}; use float32 or bfloat16 for T5"
    return OK, f"torch_dtype {value}"


def _shards(f: _Folder) -> tuple[str, str]:
    files = f.weight_files
    if not files:
        return FAIL, "no model *.safetensors file"
    if INDEX_FILE not in f.files:
        if files == ["model.safetensors"]:
            return OK, "single model.safetensors"
        return FAIL, f"{len(files)} safetensors files ({', '.join(files)}) but no {INDEX_FILE}"
    index, error = f.json(INDEX_FILE)
    if error:
        return FAIL, error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        return FAIL, f"{INDEX_FILE} has no weight_map"
    named = set(weight_map.values())
    missing = sorted(named - set(files))
    if missing:
        return FAIL, f"{INDEX_FILE} names shards that are missing: {', '.join(missing)}"
    unlisted = sorted(set(files) - named)
    if unlisted:
        return FAIL, f"safetensors files not in {INDEX_FILE}: {', '.join(unlisted)}"
    wrong = [t for t, shard in weight_map.items() if t in f.tensors and f.tensors[t][2] != shard]
    absent = [t for t, shard in weight_map.items() if f.headers[shard][0] is not None and t not in f.tensors]
    extra = [t for t in f.tensors if t not in weight_map]
    if wrong or absent or extra:
        first = (wrong or absent or extra)[0]
        return FAIL, (f"{INDEX_FILE} disagrees with the shard headers ({len(wrong)} misplaced, "
                      f"{len(absent)} missing, {len(extra)} unlisted tensors; e.g. {first})")
    return OK, f"{len(files)} shards match {INDEX_FILE}"


def _headers(f: _Folder) -> tuple[str, str]:
    if not f.weight_files:
        return FAIL, "no safetensors headers to read"
    for name, (header, error) in f.headers.items():
        if error:
            return FAIL, f"{name}: {error}"
        fmt = (header.get("__metadata__") or {}).get("format")
        if fmt != "pt":
            return FAIL, f"{name}: metadata format is {fmt!r}; transformers needs {{'format': 'pt'}}"
    return OK, f"{len(f.tensors)} tensors, metadata format pt, sizes consistent"


def _weight_dtype(f: _Folder) -> tuple[str, str]:
    dtypes = sorted({dtype for dtype, _, _ in f.tensors.values()})
    if not dtypes:
        return FAIL, "no tensors found"
    if "F16" in dtypes:
        return FAIL, "F16 weights: T5 overflows to inf/NaN in fp16; export in bf16 or fp32"
    bad = [d for d in dtypes if d not in ("F32", "BF16")]
    if bad:
        return FAIL, f"{', '.join(bad)} weights (quantized or unsupported): export full-precision F32 or BF16"
    return OK, f"weights in {', '.join(dtypes)}"


def _tensor_set(f: _Folder) -> tuple[str, str]:
    c = f.config
    if c is None:
        return FAIL, "no readable config.json to derive the tensors from"
    table = TENSOR_TABLES.get(c.get("model_type"))
    if table is None:
        known = ", ".join(TENSOR_TABLES)
        return FAIL, f"no tensor table for model_type {c.get('model_type')!r} (termtune knows {known})"
    if not f.tensors:
        return FAIL, "no readable tensors to compare with config.json"
    try:
        required, aliases = table(c)
    except ValueError as e:
        return FAIL, str(e)
    expected = {**aliases, **required}
    missing = [n for n in required if n not in f.tensors]
    misshapen = [n for n in f.tensors if n in expected and list(f.tensors[n][1]) != expected[n]]
    unexpected = [n for n in f.tensors if n not in expected]
    problems = []
    if missing:
        problems.append(f"{f.weights_label} lacks {_tensors(missing)} that config.json implies (e.g. {missing[0]})")
    if misshapen:
        n = misshapen[0]
        problems.append(f"{_tensors(misshapen)} of a shape config.json does not imply (e.g. {n} in "
                        f"{f.tensors[n][2]} is {f.tensors[n][1]}, config.json implies {expected[n]})")
    if unexpected:
        n = unexpected[0]
        problems.append(f"{_tensors(unexpected)} not in the model config.json describes (e.g. {n} in "
                        f"{f.tensors[n][2]})")
    if problems:
        return FAIL, "; ".join(problems)
    return OK, f"all {len(required)} tensors config.json implies, each of the shape it implies"


def _tensors(names: list[str]) -> str:
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''}"


def _finite_weights(f: _Folder) -> tuple[str, str]:
    files = [name for name, (_, error) in f.headers.items() if not error]
    if not files:
        return FAIL, "no readable safetensors weights to scan"
    bad: list[tuple[str, str]] = []
    scanned = 0
    for name in files:
        names, count = nonfinite_tensors(f.path / name)
        bad += [(tensor, name) for tensor in names]
        scanned += count
    if bad:
        return FAIL, (f"{len(bad)} of {scanned} tensors hold NaN or inf (e.g. {bad[0][0]} in {bad[0][1]}): "
                      "the model diverged in training; do not ship it")
    return OK, f"{scanned} tensors scanned, no NaN or inf"


def _tie_flag(f: _Folder) -> tuple[str, str]:
    if "shared.weight" not in f.tensors:
        return FAIL, "shared.weight (the token embeddings) is not in the weights"
    has_head = "lm_head.weight" in f.tensors
    # T5Config defaults tie_word_embeddings to true, so a missing flag means tied.
    tied = (f.config or {}).get("tie_word_embeddings", True)
    if has_head and tied is not False:
        return FAIL, ("lm_head.weight is in the weights but tie_word_embeddings is not false: transformers 4.51.3 "
                      "would ignore it, tie lm_head to shared.weight and rescale the output (wrong logits)")
    if not has_head and tied is False:
        return FAIL, "tie_word_embeddings is false but lm_head.weight is missing: the output layer would be random"
    if not has_head:
        return WARN, "tied embeddings without lm_head.weight (original T5 layout); Flan-T5 is untied"
    return OK, "untied lm_head.weight present and tie_word_embeddings false"


def _tokenizer_files(f: _Folder) -> tuple[str, str]:
    missing = [n for n in TOKENIZER_FILES if n not in f.files]
    if missing:
        return FAIL, f"missing {', '.join(missing)} (Bedrock lists every one of {', '.join(TOKENIZER_FILES)} for T5)"
    if (f.path / "spiece.model").read_bytes() != (f.path / "tokenizer.model").read_bytes():
        return FAIL, "tokenizer.model differs from spiece.model; both must be the same SentencePiece model"
    value, error = f.json("special_tokens_map.json")
    if error or not isinstance(value, dict):
        return FAIL, error or "special_tokens_map.json is not a JSON object"
    vocabulary, error = f.vocabulary
    if error:
        return FAIL, error
    problem = sentencepiece_problem(f.path / "spiece.model", vocabulary)
    if problem:
        return FAIL, problem
    return OK, (f"{', '.join(TOKENIZER_FILES)}; tokenizer.json ({len(vocabulary)} tokens) and spiece.model "
                "parse and agree")


def sentencepiece_problem(path: Path, vocabulary: dict[str, int]) -> str | None:
    """Why the SentencePiece model at `path` cannot stand for tokenizer.json's vocabulary (it does
    not load, or a piece has another id there), or None. The slow T5Tokenizer reads spiece.model,
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


def _tokenizer_config(f: _Folder) -> tuple[str, str]:
    value, error = f.json("tokenizer_config.json")
    if error:
        return FAIL, error
    if not isinstance(value, dict):
        return FAIL, "tokenizer_config.json is not a JSON object"
    if isinstance(value.get("extra_special_tokens"), list):
        return FAIL, ("extra_special_tokens is a list (transformers 5.x form): 4.51.3 fails with "
                      "\"'list' object has no attribute 'keys'\"; use additional_special_tokens")
    cls = value.get("tokenizer_class")
    if cls is None:
        return WARN, "no tokenizer_class; transformers falls back to the model type (T5TokenizerFast)"
    if cls not in T5_TOKENIZERS:
        return FAIL, f"tokenizer_class {cls!r}; expected one of {', '.join(T5_TOKENIZERS)}"
    return OK, f"{cls}, readable by transformers 4.x"


def _generation_config(f: _Folder) -> tuple[str, str]:
    if "generation_config.json" not in f.files:
        return WARN, "no generation_config.json (recommended: decoder_start_token_id 0, eos 1, pad 0)"
    value, error = f.json("generation_config.json")
    if error or not isinstance(value, dict):
        return FAIL, error or "generation_config.json is not a JSON object"
    return OK, "generation_config.json readable"


def _vocabulary_fits_embeddings(f: _Folder) -> tuple[str, str]:
    vocabulary, error = f.vocabulary
    if error:
        return FAIL, error
    if "shared.weight" not in f.tensors:
        return FAIL, "no shared.weight (the token embeddings) to hold tokenizer.json's tokens"
    _, shape, file = f.tensors["shared.weight"]
    rows, size = shape[0], max(vocabulary.values()) + 1
    if rows < size:
        return FAIL, (f"tokenizer.json has token ids up to {size - 1} but shared.weight in {file} has {rows} rows: "
                      f"ids {rows} and up have no embedding")
    return OK, f"shared.weight's {rows} rows hold every tokenizer.json id (0-{size - 1})"


SPECIAL_IDS = {"pad_token_id": "pad", "eos_token_id": "eos", "decoder_start_token_id": "decoder start"}


def _special_token_ids(f: _Folder) -> tuple[str, str]:
    vocabulary, error = f.vocabulary
    if error:
        return FAIL, error
    size = max(vocabulary.values()) + 1
    sources = [("config.json", f.config or {})]
    generation, _ = f.json("generation_config.json")
    if isinstance(generation, dict):
        sources.append(("generation_config.json", generation))
    problems = []
    first: dict[str, tuple[str, set[int], Any]] = {}  # key -> (the file that set it first, its ids, as written)
    for file, values in sources:
        for key in SPECIAL_IDS:
            value = values.get(key)
            if value is None:
                continue
            ids = value if isinstance(value, list) else [value]  # generation_config may list several eos ids
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                problems.append(f"{file}: {key} is {value!r}, not a token id")
                continue
            outside = [i for i in ids if not 0 <= i < size]
            if outside:
                problems.append(f"{file}: {key} {outside[0]} is outside tokenizer.json's ids 0-{size - 1}")
            if key in first and set(ids) != first[key][1]:
                problems.append(f"{file}: {key} is {value!r} but {first[key][0]} says {first[key][2]!r}")
            first.setdefault(key, (file, set(ids), value))
    problems += [f"neither config.json nor generation_config.json sets {key}"
                 + (" (transformers 4.51.3 cannot start generating)" if key == "decoder_start_token_id" else "")
                 for key in SPECIAL_IDS if key not in first]
    # The tokenizer's pad and eos tokens (where its files name them; T5's tokenizer defaults otherwise)
    # must be the ids the model pads with and stops at.
    for key, token_key in (("pad_token_id", "pad_token"), ("eos_token_id", "eos_token")):
        for file in ("special_tokens_map.json", "tokenizer_config.json"):
            value, _ = f.json(file)
            token = special_token(value.get(token_key)) if isinstance(value, dict) else None
            if token is None:
                continue
            if token not in vocabulary:
                problems.append(f"{file}: {token_key} {token!r} is not in tokenizer.json")
            elif key in first and vocabulary[token] not in first[key][1]:
                problems.append(f"{file}: {token_key} {token!r} is id {vocabulary[token]} in tokenizer.json but "
                                f"{first[key][0]} has {key} {first[key][2]!r}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return FAIL, problems[0] + more
    found = ", ".join(f"{label} {first[key][2]}" for key, label in SPECIAL_IDS.items())
    return OK, f"{found}: inside tokenizer.json's ids and the same in every file that sets them"


def _total_size(f: _Folder) -> tuple[str, str]:
    total = sum(f.files.values())
    if total >= MAX_TOTAL_BYTES:
        return FAIL, f"{total / 1e9:.1f} GB is over the 200 GB CMI limit"
    return OK, f"{total / 1e9:.3f} GB (limit 200 GB)"


def _manifest(f: _Folder) -> tuple[str, str]:
    if "manifest.json" not in f.files:
        return WARN, "no manifest.json (not written by termtune export, or the export did not finish)"
    value, error = f.json("manifest.json")
    listed = value.get("files") if isinstance(value, dict) else None
    if error or not isinstance(listed, list):
        return FAIL, error or "manifest.json has no files list"
    problem = manifest_mismatch(f.path, listed)
    if problem:
        return FAIL, problem
    named = {entry["path"] for entry in listed}
    unlisted = [n for n in f.files if n not in named and (n in MODEL_FILES or n in f.weight_files)]
    if unlisted:
        return FAIL, f"{', '.join(unlisted)} not in manifest.json: added after export (export again)"
    total = sum(entry["size"] for entry in listed)
    return OK, f"{len(listed)} files match manifest.json (size and sha256 of {total / 1e9:.3f} GB)"


def manifest_mismatch(folder: Path, listed: list[Any]) -> str | None:
    """The first way `folder` differs from manifest.json's file entries (a file missing, a size or a
    sha256 that differs), or None. Sizes are compared for every file before any is hashed, so a
    wrong size costs no reading; then each file is streamed through sha256 in 16 MiB chunks."""
    for entry in listed:
        name = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not isinstance(entry.get("sha256"), str):
            return f"manifest.json entry {entry!r} lacks a path or a sha256"
        path = folder / name
        if "/" in name or not path.is_file():
            return f"manifest lists {name}, which is missing"
        if path.stat().st_size != entry.get("size"):
            return f"{name} is {path.stat().st_size} bytes, manifest says {entry.get('size')}"
    for entry in listed:
        digest = sha256_file(folder / entry["path"])
        if digest != entry["sha256"]:
            return (f"{entry['path']}: sha256 {digest[:12]}… differs from manifest.json's {entry['sha256'][:12]}… "
                    "(changed after export)")
    return None


def _other_files(f: _Folder) -> tuple[str, str]:
    handled = KNOWN_FILES | set(f.weight_files) | set(ADAPTER_FILES) | set(TRAINER_FILES)
    unknown = [n for n in f.files if n not in handled and not n.endswith(PICKLE_SUFFIXES + OTHER_WEIGHT_SUFFIXES)
               and not n.startswith(("rng_state", "optimizer"))]
    unknown += [f"{d}/" for d in f.subfolders]
    if unknown:
        return WARN, f"unexpected entries {', '.join(unknown[:5])}: upload only the model files (flat prefix)"
    return OK, "no unexpected files"


RULES: list[tuple[str, Callable[[_Folder], tuple[str, str]]]] = [
    ("merged model, not an adapter", _adapter),
    ("no pickle or trainer files", _pickle_and_trainer),
    ("config.json", _config_present),
    ("architecture", _architecture),
    ("attention shape", _attention_shape),
    ("head count", _head_count),
    ("not quantized", _not_quantized),
    ("torch_dtype (transformers 4.51.3)", _torch_dtype),
    ("safetensors shards and index", _shards),
    ("safetensors headers", _headers),
    ("weight dtype", _weight_dtype),
    ("tensor set and shapes", _tensor_set),
    ("finite weights", _finite_weights),
    ("embeddings and tie flag (transformers 4.51.3)", _tie_flag),
    ("tokenizer files", _tokenizer_files),
    ("tokenizer_config.json (transformers 4.51.3)", _tokenizer_config),
    ("generation_config.json", _generation_config),
    ("tokenizer vocabulary vs embeddings", _vocabulary_fits_embeddings),
    ("special token ids", _special_token_ids),
    ("total size", _total_size),
    ("manifest", _manifest),
    ("other files", _other_files),
]
