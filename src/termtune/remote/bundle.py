"""The bundle: what a SageMaker training job is given, one folder per input channel.

    channels = build(cfg, Path("runs/demo/sagemaker/bundle"))
    # {"code": .../code, "config": .../config, "data": .../data, "model": .../model}

- code:   termtune's wheel (py3-none-any, built from this checkout without network), requirements.txt
          (termtune's runtime dependencies pinned to the versions installed here, torch left out) and entry.sh,
          the job's bootstrap (termtune.remote.entry).
- config: termtune.yaml, the run's resolved config with its paths rewritten to where the channels land in
          the job, relative to the job's root (/opt/ml): the job runs in that folder.
- data:   the prepared data the local data stage wrote (<run>/data): the job trains on exactly these rows
          and token ids, with no Hub access and no second data stage.
- model:  only when the config names local files: model.source (source/), model.tokenizer (tokenizer/) and
          model.architecture (architecture/). A Hub id is downloaded by the job itself.

Beside the channels, manifest.json lists every file's size and sha256, so an uploader can skip the files
whose digest has not changed. A rebuild from unchanged inputs writes identical bytes (the wheel's
timestamps are fixed), and model and data files are hard-linked when the filesystem allows, so building
costs the wheel (about two seconds) plus hashing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from termtune.config import Config
from termtune.errors import UserError
from termtune.layout import RunLayout
from termtune.rundir import atomic_dir, sha256_file, write_json, write_text

CHANNELS = ("code", "config", "data", "model")
MANIFEST = "manifest.json"
BUNDLE_FORMAT = "termtune-sagemaker-bundle/1"
CONFIG_FILE = "termtune.yaml"
REQUIREMENTS = "requirements.txt"
ENTRY_SCRIPT = "entry.sh"

# Where things are inside the job, relative to its root (/opt/ml, or TERMTUNE_OPT_ML in a rehearsal).
JOB_CHANNEL = "input/data/{}"
JOB_RUN_DIR = "termtune/run"
JOB_ARTIFACT = "model/artifact"

SOURCE_DATE_EPOCH = "315532800"
"""1980-01-01, the earliest time a zip entry can hold: the wheel's file times, so that its bytes depend on its
content only."""

_MODEL_PATHS = ("source", "tokenizer", "architecture")
"""The model settings that may name local files, each shipped as a folder of that name in the model channel."""


def build(cfg: Config, dest: Path) -> dict[str, Path]:
    """Write the job's input channels into `dest` (replaced whole; refused when it holds anything else than a
    bundle). Returns channel name -> the folder holding exactly that channel's files.

    Raises:
        UserError: the data stage has not run, termtune is not running from a source checkout, or the wheel
            cannot be built.
    """
    layout = RunLayout.of(cfg)
    if not layout.split("train").is_file():
        raise UserError(f"{layout.split('train')}: no prepared data; run `termtune data prepare` with the same "
                        "config first")
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not (dest / MANIFEST).is_file():
        raise UserError(f"{dest}: exists and is not a termtune bundle (no {MANIFEST}); choose another folder")
    job_yaml, local_model = job_config(cfg)
    with atomic_dir(dest, force=True) as tmp:
        channels = {name: tmp / name for name in CHANNELS if name != "model" or local_model}
        wheel = build_wheel(channels["code"])
        write_text(channels["code"] / REQUIREMENTS, requirements(wheel, cfg))
        shutil.copyfile(Path(__file__).with_name(ENTRY_SCRIPT), channels["code"] / ENTRY_SCRIPT)
        write_text(channels["config"] / CONFIG_FILE, job_yaml)
        link_tree(layout.data, channels["data"])
        for name, path in local_model.items():
            if path.is_dir():
                link_tree(path, channels["model"] / name)
            else:
                _link_file(path, channels["model"] / name / path.name)
        write_json(tmp / MANIFEST, {"format": BUNDLE_FORMAT,
                                    "channels": {name: _files(folder) for name, folder in channels.items()}})
    return {name: dest / name for name in channels}


# ----------------------------------------------------------------------------- config


def job_config(cfg: Config) -> tuple[str, dict[str, Path]]:
    """The config the job runs, as YAML, and the local model paths it ships (model channel folder -> path).

    Paths point into the channels, relative to the job's root; the run directory is job-local and the artifact
    goes to model/artifact, which SageMaker uploads. A `train.on` setting becomes `local`: the job trains where
    it is."""
    tree = cfg.model_dump(mode="json")
    local: dict[str, Path] = {}
    model = tree["model"]
    given = dict(model)
    for name in _MODEL_PATHS:
        value = given.get(name)
        if not value:
            continue
        path = Path(value).expanduser()
        if name == "tokenizer" and value == given["source"]:
            model[name] = model["source"]  # the same folder or Hub id: shipped once
            continue
        if path.exists():
            local[name] = path.resolve()
            where = JOB_CHANNEL.format("model") + f"/{name}"
            model[name] = f"{where}/{path.name}" if path.is_file() else where
    tree["run"]["dir"] = JOB_RUN_DIR
    tree["data"]["source"] = JOB_CHANNEL.format("data")
    tree["export"]["dir"] = JOB_ARTIFACT
    if "on" in tree["train"]:
        tree["train"]["on"] = "local"
    Config.model_validate(tree)  # what the job will load
    header = ("# The run's resolved config, as a SageMaker training job runs it (termtune.remote.bundle).\n"
              "# Paths are relative to the job's root (/opt/ml), where the job runs.\n")
    return header + yaml.safe_dump(tree, sort_keys=False), local


# ----------------------------------------------------------------------------- code


def source_checkout() -> Path:
    """The termtune source tree this code runs from (pyproject.toml and src/termtune)."""
    root = Path(__file__).resolve().parents[3]
    pyproject = root / "pyproject.toml"
    if not (pyproject.is_file() and re.search(r'^name = "termtune"$', pyproject.read_text(encoding="utf-8"), re.M)):
        raise UserError(f"termtune runs from {Path(__file__).resolve().parents[1]}, not from a source checkout: the "
                        "job's wheel is built from one; install termtune from a git checkout (pip install -e .)")
    return root


def build_wheel(out: Path) -> Path:
    """termtune's wheel, built from a clean copy of the checkout (no stale build/ folder, no network: the
    setuptools installed here), into `out`."""
    root = source_checkout()
    out.mkdir(parents=True, exist_ok=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".*", "*.egg-info")
    with tempfile.TemporaryDirectory(prefix="termtune-wheel-") as tmp:
        tree = Path(tmp) / "termtune"
        shutil.copytree(root / "src" / "termtune", tree / "src" / "termtune", ignore=skip)
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (root / name).is_file():
                shutil.copy2(root / name, tree / name)
        built = subprocess.run(
            [sys.executable, "-c", "import sys\nfrom setuptools import build_meta\n"
                                   "print(build_meta.build_wheel(sys.argv[1]))", str(out.resolve())],
            cwd=tree, capture_output=True, text=True, env={**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH})
    if built.returncode != 0:
        tail = " | ".join((built.stderr or built.stdout).strip().splitlines()[-3:])
        raise UserError(f"could not build termtune's wheel from {root}: {tail}")
    return out / built.stdout.strip().splitlines()[-1]


def requirements(wheel: Path, cfg: Config) -> str:
    """requirements.txt: the wheel's dependencies (and bitsandbytes when the config quantizes), each pinned to
    the version installed here, the one termtune ran with locally; torch left out."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(name).decode("utf-8")
    extras = {"quant"} if cfg.model.quantization != "none" else set()
    lines = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        wanted = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""})
        if not wanted or req.name == "torch":
            continue
        try:
            pin = f"{req.name}=={metadata.version(req.name)}"
        except metadata.PackageNotFoundError:
            pin = f"{req.name}{req.specifier}"  # not installed here: the range termtune accepts
        marker = req.marker if req.marker is not None and "extra" not in str(req.marker) else None
        lines.append(f"{pin}; {marker}" if marker else pin)
    return ("# termtune's runtime dependencies, pinned to the versions installed where this bundle was built.\n"
            "# torch is left out on purpose: the training image (a SageMaker PyTorch DLC) fixes torch and its CUDA\n"
            "# build, and pip would otherwise replace it with one that may not match the image's drivers.\n"
            + "".join(f"{line}\n" for line in sorted(lines, key=str.lower)))


# ----------------------------------------------------------------------------- files


def _link_file(src: Path, dst: Path) -> None:
    """A hard link when the filesystem allows (instant for multi-GB weights), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def link_tree(src: Path, dst: Path) -> None:
    """The folder's files (links followed, hidden files left out) under `dst`."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"),
                    copy_function=lambda s, d: _link_file(Path(s), Path(d)))


def _files(folder: Path) -> list[dict[str, Any]]:
    return [{"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()]
