"""Speed levers for one CPU training step (forward, backward, AdamW) of the training benchmark's model.

    .venv/bin/python benchmarks/bench_levers.py [--reps 8]     # ~4 min on 2 cores

The model of benchmarks/bench_train.py: the flan-t5-small architecture cut to 2 + 2 layers (random init), LoRA
r 64 / alpha 16 / dropout 0.1 on all linear layers, fp32, trained the way `termtune train` trains it (chunked
loss, batch 4). Each step takes the next of three batches of different shapes (4 rows x 12-24 source tokens x
150-512 target tokens), as length-grouped batches do, so a compiled model meets changing shapes.

Variants, timed interleaved (a change in machine load hits all alike), after warm-up steps that are timed
separately (a compiled model pays its compilation there, once per run):
- termtune: the current default (chunked loss, 1024-token chunks, fused AdamW, all cores);
- loss chunk 512 / whole batch; AdamW foreach / for-loop; 1 thread;
- bf16 autocast (the CPU's avx512_bf16 / AMX instructions, where it has them);
- torch.compile of the encoder and decoder stacks (inductor, dynamic shapes).
Prints best and median step time per variant and the speed-up against termtune's current default.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from pathlib import Path
from typing import Any

import torch

SHAPES = [(24, [512, 498, 470, 455]), (16, [260, 251, 240, 236]), (12, [150, 148, 141, 139])]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def batches(base: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for source_len, target_lengths in SHAPES:
        input_ids = torch.randint(2, 32000, (4, source_len), generator=g)
        labels = torch.randint(2, 32000, (4, max(target_lengths)), generator=g)
        for row, n in enumerate(target_lengths):
            labels[row, n:] = -100
        out.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
                    "decoder_input_ids": base._shift_right(labels)})
    return out


def time_interleaved(variants: dict[str, dict], reps: int) -> tuple[dict[str, float], dict[str, Any],
                                                                    dict[str, list[float]]]:
    """Each variant ({"step": step(batch), "threads": n, "batches": [...]}) once over its batches (compilation and
    allocator warm-up, timed apart), then `reps` interleaved rounds, so a change in machine load hits all alike.
    Returns the warm-up seconds, what each variant's first step returned, and each round's seconds."""
    threads = torch.get_num_threads()
    warmup: dict[str, float] = {}
    first: dict[str, Any] = {}
    for name, v in variants.items():
        torch.set_num_threads(v["threads"])
        start = time.perf_counter()
        results = [v["step"](batch) for batch in v["batches"]]
        warmup[name], first[name] = time.perf_counter() - start, results[0]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, v in variants.items():
            torch.set_num_threads(v["threads"])
            start = time.perf_counter()
            for batch in v["batches"]:
                v["step"](batch)
            times[name].append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    return warmup, first, times


def main() -> None:
    from bench_lm_loss import benchmark_base, benchmark_lora  # this folder is on sys.path when run as a script
    from peft import get_peft_model

    from termtune.lm_loss import chunked_lm_loss

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=8, help="timed rounds over the three batches")
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants (and termtune)")
    opts = parser.parse_args()

    base, lora = benchmark_base(), benchmark_lora()
    data = batches(base)
    threads = torch.get_num_threads()
    flags = cpu_flags()
    print(f"cpu: {torch.get_num_threads()} threads; bf16 instructions: "
          f"{', '.join(sorted(f for f in flags if 'bf16' in f or 'amx' in f)) or 'none'}")

    def variant(optim: dict | None = None, chunk: int = 1024, autocast: bool = False, compiled: bool = False,
                n_threads: int = threads) -> dict:
        model = get_peft_model(copy.deepcopy(base), lora)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, **(optim or {"fused": True}))
        if compiled:  # the encoder and decoder stacks; the chunked loss swaps the lm_head around them
            inner = model.get_base_model()
            inner.encoder.compile(dynamic=True)
            inner.decoder.compile(dynamic=True)

        def step(batch: dict) -> None:
            optimizer.zero_grad(set_to_none=True)
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with ctx:
                loss = chunked_lm_loss(model, chunk_size=chunk, **batch)["loss"]
            loss.backward()
            optimizer.step()

        return {"step": step, "threads": n_threads, "batches": data}

    variants = {
        "termtune (chunk 1024, fused AdamW)": variant(),
        "loss chunk 512": variant(chunk=512),
        "loss chunk whole batch": variant(chunk=1 << 20),
        "AdamW foreach": variant(optim={"foreach": True}),
        "AdamW for-loop": variant(optim={"foreach": False}),
        "1 thread": variant(n_threads=1),
        "bf16 autocast": variant(autocast=True),
        "torch.compile (inductor)": variant(compiled=True),
    }
    if opts.only is not None:
        variants = {k: v for i, (k, v) in enumerate(variants.items()) if i == 0 or any(o in k for o in opts.only)}

    warmup, _, times = time_interleaved(variants, opts.reps)
    ref = next(iter(times))
    best_ref, median_ref = min(times[ref]), sorted(times[ref])[len(times[ref]) // 2]
    print(f"{'variant':36}{'warm-up s':>10}{'best ms':>9}{'median ms':>11}{'speed-up best':>15}{'median':>8}")
    for name, ts in times.items():
        ts.sort()
        best, median = ts[0] / len(data), ts[len(ts) // 2] / len(data)
        print(f"{name:36}{warmup[name]:>10.1f}{best * 1e3:>9.0f}{median * 1e3:>11.0f}"
              f"{best_ref / ts[0]:>14.2f}x{median_ref / ts[len(ts) // 2]:>7.2f}x")


if __name__ == "__main__":
    main()
