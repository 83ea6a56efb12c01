"""Export: merge the trained LoRA adapter into the unquantized base and write a Bedrock
Custom Model Import artifact that transformers 4.51.3 (what Bedrock serves with) reads
exactly as the model that was trained.

    artifact = export(cfg, force=False)     # <run>/artifact (or cfg.export.dir)
    print(artifact.summary())

Steps: validate inputs -> load the base unquantized (also after 4-bit/8-bit training) and
apply + merge the adapter -> write weights, configs and tokenizer files into a temporary
folder -> verify it (the preflight rules, then every weight file re-read and compared with
the bytes that were written) -> write manifest.json last -> rename into place ->
<run>/validation.json. (The model card is rendered with the report: termtune.modelcard.)

Why not `save_pretrained` alone: transformers 5.x writes a `tokenizer_config.json` that 4.x cannot
read and no `special_tokens_map.json`, and the model family adds its own fix-ups (termtune.families:
for the demo's model, the tie flag 5.x gets wrong and the SentencePiece file Bedrock lists;
reference/cpu-findings.md §4b). Without them the folder loads in 4.51.3 as a different model:
different logits, different text. The weights are
also written here by a streaming safetensors writer: one tensor at a time, cast on the fly and
hashed on the way, so peak memory stays near the fp32 model itself (no second, cast copy of
the model) and the manifest needs no extra pass over the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from termtune.bedrock_check import check_artifact, probe_prompts
from termtune.config import Config
from termtune.errors import UserError
from termtune.families import family_for, family_of_model
from termtune.layout import RunLayout
from termtune.modelcard import TORCH_DTYPE_NAMES, base_name
from termtune.oserrors import probe_writable, writing
from termtune.rundir import atomic_dir, read_json, sha256_file, write_json
from termtune.results import StageResult
from termtune.validate import INDEX_FILE, Check, format_checks, validate

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

SAFETENSORS_DTYPES = {"bf16": "BF16", "fp32": "F32", "fp16": "F16"}
ARTIFACT_FORMAT = "termtune-cmi-artifact/1"
PAUSE_ENV = "TERMTUNE_EXPORT_TEST_PAUSE"  # seconds to sleep mid-export (crash tests only)


@dataclass(repr=False)
class Artifact(StageResult):
    """The artifact folder `termtune export` wrote, its files (from the manifest) and its preflight checks."""

    path: Path
    dtype: str
    base_model: str
    files: list[dict[str, Any]]
    checks: list[Check]
    seconds: float
    shards: int = 1
    bedrock_check: dict[str, Any] = field(default_factory=dict)
    """termtune.bedrock_check's result: status ("passed", "not run"; a failure is never published) and message."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f["size"] for f in self.files)

    @property
    def digest(self) -> str:
        return artifact_digest(self.files)

    def summary(self) -> str:
        failed = sum(c.failed for c in self.checks)
        warnings = sum(c.warning and not c.ok for c in self.checks)
        return (f"artifact: {self.path} ({len(self.files)} files, {self.total_bytes / 1e6:.1f} MB, {self.dtype}, "
                f"{self.shards} weight file{'s' if self.shards != 1 else ''}) in {self.seconds:.1f}s\n"
                f"validate: {len(self.checks)} checks, {failed} failed, {warnings} warnings "
                f"(details: termtune validate {self.path})\n"
                f"bedrock:  {self.bedrock_check.get('message', 'not checked under transformers 4.51.3')}")


def export(cfg: Config, force: bool = False) -> Artifact:
    """Merge, write, verify and atomically publish the CMI artifact. See the module docstring."""
    started = time.time()
    # ---- validate inputs (cheap checks first, before loading any weights)
    layout = RunLayout.of(cfg)
    adapter_dir = layout.adapter
    _check_adapter(adapter_dir, cfg.model.allow_pickle)
    _check_adapter_is_the_trained_one(layout)
    final = layout.artifact
    _check_replaceable(final, layout.root, force)
    max_shard = parse_size(cfg.export.max_shard_size)
    family = family_for(cfg)
    refusal = family.refuse_precision("export.dtype", cfg.export.dtype)
    if refusal and not cfg.export.allow_fp16:
        raise UserError(refusal)
    tokenizer_files = family.export_tokenizer_files(cfg.tokenizer_source)
    probe_writable(layout.root)
    probe_writable(final.resolve().parent)
    _remove_stale_partials(final.resolve())

    # ---- set up: the base unquantized, whatever training used, with the adapter merged in
    model = merged_model(cfg, adapter_dir)
    tied = family.is_tied(model)
    from termtune.modeling import load_tokenizer

    tokenizer = load_tokenizer(cfg)

    # ---- do + save: into a temporary folder that becomes `final` only when verified
    with writing(final), atomic_dir(final, force=force) as tmp:
        weights = family.write_artifact(model, tokenizer, tmp, cfg.export.dtype, max_shard)
        if weights is None:
            weights = write_weights(model, tmp, cfg.export.dtype, max_shard, tied=tied)
            write_model_config(model, tmp, cfg.export.dtype, tied=tied)
            write_tokenizer(tokenizer, tmp, tokenizer_files, family.tokenizer_class)
        _pause_for_crash_tests()
        checks = validate(tmp)
        if any(c.failed for c in checks):
            raise UserError(f"export: the artifact fails the CMI preflight:\n{format_checks(checks)}")
        verify_weights(tmp, weights)
        # The folder under Bedrock's transformers against the merged model (termtune.bedrock_check)
        bedrock = check_artifact(tmp, reference=(model, tokenizer, probe_prompts(cfg.data.prompt_template)))
        if bedrock["status"] == "failed":
            raise UserError(f"export: the artifact {bedrock['message']}; nothing was published")
        files = write_manifest(tmp, cfg, weights, tied=tied, bedrock_check=bedrock)
        _shareable_permissions(tmp)
    del model

    # ---- report
    checks = validate(final)
    write_json(layout.validation, {
        "directory": str(final), "ok": not any(c.failed for c in checks), "checks": [c.as_dict() for c in checks]})
    return Artifact(path=final, dtype=cfg.export.dtype, base_model=base_name(cfg), files=files, checks=checks,
                    seconds=time.time() - started, shards=len(weights), bedrock_check=bedrock)


# ----------------------------------------------------------------------------- inputs


def _check_adapter_is_the_trained_one(layout: RunLayout) -> None:
    """The adapter must be the one the train record names: another run's adapter copied into train/adapter
    would otherwise be shipped under this run's records. (No record, as when the Python API's stage
    functions are called directly, or one from before the digest was recorded: nothing to compare.)"""
    recorded: Any = read_json(layout.record("train"), {})
    for key in ("result", "result", "adapter_sha256"):  # the record's stage result, then TrainResult's field
        recorded = recorded.get(key) if isinstance(recorded, dict) else None
    if not isinstance(recorded, str):
        return
    from termtune.train import adapter_digest

    found = adapter_digest(layout.adapter)
    if found != recorded:
        raise UserError(f"{layout.adapter} does not match the adapter train recorded (sha256 {recorded[:16]}…, "
                        f"found {found[:16]}…); re-run `termtune train --force`")


def _check_adapter(adapter_dir: Path, allow_pickle: bool) -> None:
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir}: no trained adapter (adapter_config.json); run termtune train first")
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        from termtune.validate import nonfinite_tensors

        try:
            bad, scanned = nonfinite_tensors(weights)
        except ValueError as e:
            raise UserError(f"{adapter_dir}: unreadable adapter weights: {e}") from e
        if bad:
            raise UserError(f"{weights}: {len(bad)} of {scanned} LoRA tensors hold NaN or inf (e.g. {bad[0]}): training "
                            "diverged; train again with a lower train.learning_rate (in a new run.dir)")
        return
    if (adapter_dir / "adapter_model.bin").is_file():
        if not allow_pickle:
            raise UserError(f"{adapter_dir}: only a pickle adapter (adapter_model.bin) was found; pickle can run "
                            "code on load. Re-save it as safetensors, or set model.allow_pickle=true if you trust it")
        return
    raise UserError(f"{adapter_dir}: no adapter weights (adapter_model.safetensors); run termtune train first")


def _check_replaceable(final: Path, run_dir: Path, force: bool) -> None:
    """An existing export.dir is replaced only with --force, and only when it is a termtune artifact:
    every entry a file that its manifest lists. A run directory, a folder holding one, or anyone
    else's folder is never deleted. A symlink is judged (and later replaced) by its target."""
    target = final.resolve()
    if not target.exists():
        return
    if target == run_dir.resolve() or target in run_dir.resolve().parents:
        raise UserError(f"export.dir={final}: that folder holds the run directory {run_dir}; export into a folder "
                        "of its own (the default is <run.dir>/artifact)")
    if not target.is_dir():
        raise UserError(f"export.dir={final}: a file is in the way; move it or choose another export.dir")
    entries = sorted(target.iterdir())
    if entries:  # an empty folder holds nothing to lose
        manifest = read_json(target / "manifest.json")
        listed = {f.get("path") for f in manifest.get("files", []) if isinstance(f, dict)} \
            if isinstance(manifest, dict) and manifest.get("format") == ARTIFACT_FORMAT else None
        if listed is None:
            raise UserError(f"export.dir={final}: exists and is not a termtune artifact (no termtune manifest.json); "
                            "termtune replaces only its own artifacts: choose another export.dir, or move the folder")
        foreign = [p.name for p in entries
                   if p.name != "manifest.json" and (p.name not in listed or p.is_symlink() or not p.is_file())]
        if foreign:
            raise UserError(f"export.dir={final}: holds {', '.join(foreign[:3])}, which the artifact's manifest does "
                            "not list; termtune replaces only its own files: move them, or choose another export.dir")
    if not force:
        raise UserError(f"{final} already exists; pass --force to replace it")


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '500MB' -> 5e8, '2GiB' -> 2*2**30 (the units save_pretrained accepts)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"export.max_shard_size: {text!r} is not a size such as 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise UserError(f"export.max_shard_size: {text!r} must be positive")
    return size


def _remove_stale_partials(final: Path) -> None:
    """Temporary folders left by an export that was killed (atomic_dir names them .<name>.partial-*)."""
    for stale in final.parent.glob(f".{final.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _shareable_permissions(folder: Path) -> None:
    """The temporary folder and atomic files are owner-only (0700/0600); give the artifact the
    permissions a plain save would have (umask applied) so it can be shared and uploaded."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _pause_for_crash_tests() -> None:
    seconds = os.environ.get(PAUSE_ENV)
    if seconds:
        time.sleep(float(seconds))


# ----------------------------------------------------------------------------- merge


def merged_model(cfg: Config, adapter_dir: Path) -> "PreTrainedModel":
    """Base in fp32 and unquantized (merging into 4-bit weights would bake in quantization
    error, and CMI needs full weights), with the adapter applied and merged."""
    import torch
    from peft import PeftModel

    from termtune.modeling import load_base

    base = load_base(cfg, quantization="none", dtype=torch.float32)
    try:
        # low_cpu_mem_usage: create the LoRA weights on the meta device and fill them from the file,
        # instead of initialising random values that are overwritten at once.
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False, low_cpu_mem_usage=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{adapter_dir}: cannot apply the adapter to {base_name(cfg)}: "
                        f"{str(e).splitlines()[0]}") from e
    model = peft_model.merge_and_unload()
    model.eval()
    return model


# ----------------------------------------------------------------------------- weights


def _tensors_to_write(model: "PreTrainedModel", tied: bool) -> list[tuple[str, "torch.Tensor"]]:
    state = model.state_dict()
    views = family_of_model(model).shared_views(state)  # names transformers re-ties on load: not written twice
    out = []
    for name, tensor in state.items():
        if name in views:
            continue
        if name == "lm_head.weight" and tied:
            continue  # a tied model is written without an lm_head; the reader ties it back
        out.append((name, tensor))
    return out


def write_weights(model: "PreTrainedModel", folder: Path, dtype: str, max_shard_bytes: int,
                  tied: bool) -> dict[str, dict[str, Any]]:
    """Write model.safetensors, or shards plus model.safetensors.index.json above max_shard_bytes.

    Returns {file name: {"sha256", "size", "dtype", "shapes"}} for the weight files (hashed while writing).
    """
    import torch

    target = getattr(torch, TORCH_DTYPE_NAMES[dtype])
    width = torch.tensor([], dtype=target).element_size()
    tensors = _tensors_to_write(model, tied)
    groups: list[list[tuple[str, torch.Tensor]]] = [[]]
    used = 0
    for name, tensor in tensors:
        n = tensor.numel() * width
        if groups[-1] and used + n > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append((name, tensor))
        used += n
    if len(groups) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    written = {}
    for name, group in zip(names, groups):
        written[name] = write_safetensors(folder / name, group, target, SAFETENSORS_DTYPES[dtype])
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * width for _, t in tensors)},
                 "weight_map": {t: file for file, group in zip(names, groups) for t, _ in group}}
        write_json(folder / INDEX_FILE, index)
    return written


def write_safetensors(path: Path, tensors: list[tuple[str, "torch.Tensor"]], target: "torch.dtype",
                      dtype_name: str) -> dict[str, Any]:
    """Stream tensors into a safetensors file, one at a time, casting on the fly.

    Casting the whole model first (model.to(bf16), then save) would hold the fp32 and the cast
    copies at once; this casts one tensor, writes its buffer, hashes it and lets it go.
    """
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    width = torch.tensor([], dtype=target).element_size()
    for name, tensor in tensors:
        n = tensor.numel() * width
        header[name] = {"dtype": dtype_name, "shape": list(tensor.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(blob)), blob):
            f.write(chunk)
            digest.update(chunk)
        for name, tensor in tensors:
            data = tensor.detach().to(target).contiguous()
            if not bool(torch.isfinite(data).all()):  # a diverged model, or values beyond the export dtype's range
                raise UserError(f"export: the merged weight {name} holds NaN or inf in {dtype_name}; a model that "
                                "diverged in training is never shipped (train again with a lower "
                                "train.learning_rate)")
            data = data.reshape(-1).view(torch.uint8)
            view = memoryview(data.numpy())
            f.write(view)
            digest.update(view)
            del data, view
        f.flush()
        os.fsync(f.fileno())
    shapes = {name: list(tensor.shape) for name, tensor in tensors}
    return {"sha256": digest.hexdigest(), "size": path.stat().st_size, "dtype": dtype_name, "shapes": shapes}


def verify_weights(folder: Path, written: dict[str, dict[str, Any]]) -> None:
    """Read every weight file back: its header must list exactly the tensors, shapes and dtype that
    were meant, and its bytes must hash to what was written."""
    from termtune.validate import read_safetensors_header

    for name, expected in written.items():
        header, error = read_safetensors_header(folder / name)
        if error:
            raise RuntimeError(f"{folder / name}: unreadable after writing: {error}")
        found = {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}
        if found != {k: (expected["dtype"], shape) for k, shape in expected["shapes"].items()}:
            raise RuntimeError(f"{folder / name}: the header read back does not list the tensors written")
        if sha256_file(folder / name) != expected["sha256"]:
            raise RuntimeError(f"{folder / name}: read back differs from what was written (disk or filesystem error)")


# ----------------------------------------------------------------------------- configs + tokenizer


def write_model_config(model: "PreTrainedModel", folder: Path, dtype: str, tied: bool) -> None:
    """config.json and generation_config.json as transformers 4.51.3 must read them."""
    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    # Say what the written weights are: a reader that believes them tied ignores lm_head.weight.
    config["tie_word_embeddings"] = tied
    config.pop("quantization_config", None)    # merged into full weights: nothing is quantized
    config["torch_dtype"] = TORCH_DTYPE_NAMES[dtype]  # 4.x reads torch_dtype; 5.x reads dtype
    config["dtype"] = TORCH_DTYPE_NAMES[dtype]
    config["use_cache"] = True  # training turns the cache off; inference wants it on
    family_of_model(model).fix_model_config(config)
    write_json(folder / "config.json", config)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)


def write_tokenizer(tokenizer: Any, folder: Path, extra_files: dict[str, Path],
                    tokenizer_class: str | None = None) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and the family's extra tokenizer
    files (name in the artifact -> source file), all 4.x-readable."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, dict):
        config["extra_special_tokens"] = extra  # the named-token form 4.x understands
    elif extra:
        # 5.x lists the <extra_id_N> sentinels here; 4.x crashes on a list ('list' object has no
        # attribute 'keys') and expects them as additional_special_tokens.
        config["additional_special_tokens"] = [str(t) for t in extra]
    for key in ("backend", "is_local", "local_files_only"):  # 5.x loader bookkeeping, not tokenizer settings
        config.pop(key, None)
    if tokenizer_class:
        config.setdefault("tokenizer_class", tokenizer_class)
    write_json(path, config)
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    if config.get("additional_special_tokens"):
        special["additional_special_tokens"] = config["additional_special_tokens"]
    write_json(folder / "special_tokens_map.json", special)
    for name, source in extra_files.items():
        shutil.copyfile(source, folder / name)


# ----------------------------------------------------------------------------- manifest + card


def artifact_digest(files: list[dict[str, Any]]) -> str:
    """One sha256 for the model files of an artifact (from the manifest's entries), the identity that
    names its import and that the run history records."""
    lines = "".join(f"{f['path']}:{f['sha256']}\n" for f in sorted(files, key=lambda f: f["path"]))
    return hashlib.sha256(lines.encode()).hexdigest()


def write_manifest(folder: Path, cfg: Config, weights: dict[str, dict[str, Any]], tied: bool,
                   bedrock_check: dict[str, Any]) -> list[dict]:
    """manifest.json (written last: its presence marks a complete artifact), with the Bedrock check's result."""
    files = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name == "manifest.json":
            continue
        known = weights.get(path.name)
        files.append({"path": path.name, "size": path.stat().st_size,
                      "sha256": known["sha256"] if known else sha256_file(path)})
    write_json(folder / "manifest.json", {
        "format": ARTIFACT_FORMAT,
        "base_model": base_name(cfg),
        "adapter": str(RunLayout.of(cfg).adapter),
        "dtype": cfg.export.dtype,
        "torch_dtype": TORCH_DTYPE_NAMES[cfg.export.dtype],
        "tie_word_embeddings": tied,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "bedrock_check": bedrock_check,
        "files": files,
    })
    return files
