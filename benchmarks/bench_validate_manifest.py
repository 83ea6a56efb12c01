"""The `manifest` check of `termtune validate`: every file streamed through sha256 and compared with
manifest.json, on a flan-t5-large-sized folder.

    .venv/bin/python benchmarks/bench_validate_manifest.py [--gb 3] [--reps 3] [--dir /tmp]

Writes one file of zeros (--gb, default 3: about a flan-t5-large fp32 model.safetensors) and its
manifest entry into a temporary folder, reads it once (so every rep reads from the page cache:
warm; a cold read adds the disk's sequential read time), then times
`termtune.validate.manifest_mismatch` (what the check runs: sizes first, then sha256 in 16 MiB
chunks) and prints the best and median throughput. sha256 cost does not depend on the bytes'
values, so zeros time the same as weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

CHUNK = 64 * 2**20


def build(folder: Path, size: int) -> list[dict]:
    from termtune.rundir import sha256_file

    path = folder / "model.safetensors"
    zeros = bytes(CHUNK)
    with open(path, "wb") as f:
        left = size
        while left:
            f.write(zeros[:min(CHUNK, left)])
            left -= min(CHUNK, left)
    return [{"path": path.name, "size": size, "sha256": sha256_file(path)}]  # also warms the page cache


def main() -> None:
    from termtune.validate import manifest_mismatch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    size = int(args.gb * 1e9)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        listed = build(Path(tmp), size)
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            assert manifest_mismatch(Path(tmp), listed) is None
            times.append(time.perf_counter() - start)
    best, median = min(times), statistics.median(times)
    load = os.getloadavg()[0]  # sha256 is CPU-bound: a busy machine divides the figure
    print(f"manifest sha256 check: {size / 1e9:.2f} GB file, {args.reps} reps, warm page cache, "
          f"load {load:.1f} on {os.cpu_count()} CPUs: best {best:.2f} s ({size / best / 1e6:.0f} MB/s), "
          f"median {median:.2f} s ({size / median / 1e6:.0f} MB/s)")


if __name__ == "__main__":
    main()
