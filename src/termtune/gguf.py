"""A GGUF file as the base model: converted once into an ordinary folder that every stage loads.

    model_source(cfg)                                   # model.source, or for a .gguf its converted folder
    base_folder_from_gguf(path, cache_dir(), "bf16")    # -> the folder (converted now or reused)

transformers reads a GGUF file only through `from_pretrained(..., gguf_file=...)`, dequantizing
it on every load, while training, export, validate and the transformers 4.51.3 check all work
on an ordinary folder. So termtune converts a GGUF once, with transformers itself: the weights
dequantized into safetensors in the dtype asked for, config.json (the architecture),
generation_config.json, and the tokenizer with its chat template; beside them RECORD names the
GGUF file, its size and sha256. The folder is reused while the file's sha256 matches and
converted again when it does not (a file replaced under the same name).

The folders live in termtune's cache, one per GGUF file and dtype, shared by every run that
names the file: `gguf/<file stem>-<dtype>-<8 hex digits of the file's path>/` under
$TERMTUNE_CACHE, else $XDG_CACHE_HOME/termtune, else ~/.cache/termtune.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from termtune.errors import UserError

if TYPE_CHECKING:
    from termtune.config import Config

RECORD = "termtune-gguf.json"
"""Written into a converted folder: the GGUF file it came from (name, size, sha256) and the dtype."""
MAGIC = b"GGUF"
"""The first four bytes of every GGUF file."""
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def is_gguf(source: str) -> bool:
    return str(source).lower().endswith(".gguf")


def cache_dir() -> Path:
    """Where converted GGUF folders are kept (see the module docstring)."""
    root = os.environ.get("TERMTUNE_CACHE") or \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "termtune"
    return Path(root).expanduser() / "gguf"


def model_source(cfg: "Config") -> str:
    """model.source as transformers loads it: a .gguf file becomes its converted folder, in export.dtype (the
    dtype the model is shipped in, so export merges onto exactly the weights that were trained); anything
    else (a Hub id, a folder) is returned as it is."""
    source = cfg.model.source
    if not is_gguf(source):
        return source
    return str(base_folder_from_gguf(Path(source).expanduser(), cache_dir(), cfg.export.dtype))


def base_folder_from_gguf(path: Path, cache: Path, dtype: str) -> Path:
    """The base-model folder converted from the GGUF file at `path`: reused when its recorded sha256 and
    dtype match, else converted (again) into a temporary folder renamed into place when complete.

    Args:
        cache: the folder that holds converted folders (cache_dir() for termtune's own).
        dtype: "bf16", "fp16" or "fp32": what the dequantized weights are stored in.

    Raises:
        UserError: one line naming the file when it is missing, not a GGUF file, cut short or corrupt,
            or holds an architecture or tensor type transformers cannot convert.
    """
    from termtune.oserrors import writing
    from termtune.rundir import atomic_dir, read_json, sha256_file, write_json

    path, cache = Path(path), Path(cache)
    if dtype not in TORCH_DTYPES:
        raise UserError(f"{path}: cannot convert to dtype {dtype!r} (choose one of {', '.join(TORCH_DTYPES)})")
    check_gguf_file(path)
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    target = cache / f"{path.stem}-{dtype}-{where}"
    with writing(cache):
        cache.mkdir(parents=True, exist_ok=True)
    # Processes that load the same base at once (the ranks of a multi-GPU run) wait for one conversion
    # instead of each dequantizing the whole model into memory.
    with _locked(cache / f".{target.name}.lock"):
        record = {"gguf": {"file": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)},
                  "dtype": dtype}
        found = read_json(target / RECORD, {})
        if (target / "config.json").is_file() and isinstance(found, dict) and \
                {key: found.get(key) for key in record} == record:
            return target
        check_gguf_complete(path)
        model, tokenizer = _load_dequantized(path, dtype)
        with writing(target), atomic_dir(target, force=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / RECORD, {**record, "transformers": _transformers_version()})
    return target


def check_gguf_file(path: Path) -> None:
    """Refuse, in one line naming `path`, a file that is missing or is not GGUF (its first bytes)."""
    if not path.is_file():
        raise UserError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise UserError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")


def check_gguf_complete(path: Path) -> None:
    """Refuse, in one line naming `path`, a GGUF file that is cut short or corrupt: the header and every
    tensor's extent are read (memory-mapped, no weights loaded), so a file cut short fails here, not
    half-way through a conversion with numpy's message about array shapes."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except (ValueError, IndexError, KeyError) as e:  # numpy's, when a tensor runs past the end of the file
        raise UserError(f"{path}: the GGUF file is cut short or corrupt ({_first_line(e)})") from e


def _load_dequantized(path: Path, dtype: str):  # -> (model, tokenizer)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    from termtune.progress import interactive

    if not interactive():  # transformers' "de-quantizing" bar only adds redraws to a log
        hf_logging.disable_progress_bar()
    # An empty folder beside the absolute file name: nothing in the GGUF's own folder (another model's
    # config.json or tokenizer files) can be mixed into what is read.
    with tempfile.TemporaryDirectory(prefix="termtune-gguf-") as nothing:
        try:
            tokenizer = AutoTokenizer.from_pretrained(nothing, gguf_file=str(path.resolve()))
            model = AutoModelForCausalLM.from_pretrained(
                nothing, gguf_file=str(path.resolve()), dtype=getattr(torch, TORCH_DTYPES[dtype]),
                quantization_config=GgufConfig(dequantize=True))
        except (OSError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - gguf and transformers raise many kinds (ValueError, struct.error, ...)
            raise UserError(f"{path}: cannot convert this GGUF file: {_first_line(e)}") from e
    # The GGUF tokenizer leaves model_max_length unbounded; the model's context is its real limit.
    context = getattr(model.config, "max_position_embeddings", None)
    if context:
        tokenizer.model_max_length = context
    return model, tokenizer


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    from termtune.rundir import open_plain

    fd = open_plain(lock_path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel drops it when the holder exits, however it exits
        yield
    finally:
        os.close(fd)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
