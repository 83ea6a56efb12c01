"""The `finite weights` check of `termtune validate` on a flan-t5-large-sized tensor set, against loading
each tensor with safetensors + torch and calling torch.isfinite.

    .venv/bin/python benchmarks/bench_validate_finite.py [--dtype bf16|fp32] [--reps 3] [--dir /tmp/x]

Writes the flan-t5-large tensor set (every weight of the real architecture, untied lm_head, the shapes of
../shared/models/flan-t5-large/config.json, random values) into one safetensors file with termtune's
export writer, then times, alternating (so a change in machine load hits both alike):

- **termtune**: `termtune.validate.nonfinite_tensors` (numpy over a memory map, 8 MiB chunks, integer
  compare of the exponent bits; no torch);
- **torch**: `safetensors.safe_open(framework="pt")`, each tensor loaded and `torch.isfinite(t).all()`.

The file is read once before timing, so both sides read from the page cache (warm); a cold read adds
the disk's sequential read time to both.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "shared" / "models" / "flan-t5-large"


def build(folder: Path, dtype: str) -> Path:
    import torch
    from transformers import AutoConfig, T5ForConditionalGeneration

    from termtune.export import SAFETENSORS_DTYPES, TORCH_DTYPE_NAMES, write_safetensors

    with torch.device("meta"):
        model = T5ForConditionalGeneration(AutoConfig.from_pretrained(CONFIG))
    shapes = [(name, t.shape) for name, t in model.state_dict().items()
              if name not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")]
    generator = torch.Generator().manual_seed(0)
    tensors = [(name, torch.randn(shape, generator=generator)) for name, shape in shapes]
    path = folder / "model.safetensors"
    write_safetensors(path, tensors, getattr(torch, TORCH_DTYPE_NAMES[dtype]), SAFETENSORS_DTYPES[dtype])
    return path


def scan_torch(path: Path) -> list[str]:
    import torch
    from safetensors import safe_open

    bad = []
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            if not bool(torch.isfinite(f.get_tensor(name)).all()):
                bad.append(name)
    return bad


def main() -> None:
    from termtune.validate import nonfinite_tensors

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = build(Path(tmp), args.dtype)
        size = path.stat().st_size
        path.read_bytes()  # warm the page cache for both sides
        sides = {"termtune": lambda: nonfinite_tensors(path)[0], "torch": lambda: scan_torch(path)}
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.reps):
            for name, scan in sides.items():
                start = time.perf_counter()
                assert scan() == [], name
                times[name].append(time.perf_counter() - start)
        print(f"{path.name}: {size / 1e9:.2f} GB {args.dtype}, flan-t5-large tensor set; {args.reps} reps, warm cache")
        for name, values in times.items():
            best, median = min(values), statistics.median(values)
            print(f"  {name:9s} best {best:6.2f} s  median {median:6.2f} s  ({size / best / 1e9:.2f} GB/s)")
        print(f"  ratio termtune/torch (median): {statistics.median(times['termtune']) / statistics.median(times['torch']):.2f}")


if __name__ == "__main__":
    main()
