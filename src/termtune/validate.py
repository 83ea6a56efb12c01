"""Preflight a model folder against the Bedrock Custom Model Import rules for its model family.

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

from termtune.families import FAMILIES, family_of
from termtune.families.base import FAIL, OK, WARN, tokenizer_json_vocabulary
from termtune.results import StageResult, html_table
from termtune.rundir import sha256_file

MAX_TOTAL_BYTES = 200 * 10**9  # CMI text-model size limit
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
OTHER_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".gguf", ".onnx")
TRAINER_FILES = ("trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")
# What Bedrock reads as the model: each must be in an export's manifest.json.
MODEL_FILES = {"config.json", "generation_config.json", INDEX_FILE, "added_tokens.json",
               *(name for family in FAMILIES for name in family.tokenizer_files)}
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


# ----------------------------------------------------------------------------- rules
# Each rule returns (status, one-line reason). Order matters: it is the numbering users see.
# A family rule is the folder's model family's (termtune.families, picked by config.json).


def _family_rule(name: str) -> Callable[[_Folder], tuple[str, str]]:
    def rule(f: _Folder) -> tuple[str, str]:
        family = family_of(f.config)
        if family is None:
            if f.config is None:
                return FAIL, "no readable config.json"
            return FAIL, (f"model_type is {f.config.get('model_type')!r}: no model family termtune knows "
                          f"({', '.join(fam.name for fam in FAMILIES)})")
        return family.cmi_rules()[name](f)

    return rule


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


def _not_quantized(f: _Folder) -> tuple[str, str]:
    c = f.config or {}
    if "quantization_config" in c:
        method = (c["quantization_config"] or {}).get("quant_method", "?")
        return FAIL, (f"config.json has quantization_config ({method}): Bedrock imports full weights; "
                      "merge into the unquantized base (termtune export does)")
    return OK, "no quantization_config"


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


def _tensor_set(f: _Folder) -> tuple[str, str]:
    c = f.config
    if c is None:
        return FAIL, "no readable config.json to derive the tensors from"
    family = family_of(c)
    if family is None:
        known = ", ".join(f.name for f in FAMILIES)
        return FAIL, f"no tensor table for model_type {c.get('model_type')!r} (termtune knows {known})"
    if not f.tensors:
        return FAIL, "no readable tensors to compare with config.json"
    try:
        required, aliases = family.tensor_table(c)
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
    ("architecture", _family_rule("architecture")),
    ("attention shape", _family_rule("attention shape")),
    ("head count", _family_rule("head count")),
    ("not quantized", _not_quantized),
    ("torch_dtype (transformers 4.51.3)", _family_rule("torch_dtype")),
    ("safetensors shards and index", _shards),
    ("safetensors headers", _headers),
    ("weight dtype", _family_rule("weight dtype")),
    ("tensor set and shapes", _tensor_set),
    ("finite weights", _finite_weights),
    ("embeddings and tie flag (transformers 4.51.3)", _family_rule("tie flag")),
    ("tokenizer files", _family_rule("tokenizer files")),
    ("tokenizer_config.json (transformers 4.51.3)", _family_rule("tokenizer_config.json")),
    ("generation_config.json", _family_rule("generation_config.json")),
    ("tokenizer vocabulary vs embeddings", _family_rule("vocabulary vs embeddings")),
    ("special token ids", _family_rule("special token ids")),
    ("total size", _total_size),
    ("manifest", _manifest),
    ("other files", _other_files),
]
