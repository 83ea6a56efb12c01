"""Export memory and time: termtune export vs the plain recipe (merge + save_pretrained).

    .venv/bin/python benchmarks/bench_export.py [--workdir /tmp/bench-export] [--dtype fp32|bf16]
    .venv/bin/python benchmarks/bench_export.py --dtype bf16 --bedrock-check   # time the 4.51.3 check

A flan-t5-large-shaped model (random init, untied lm_head, ~3.1 GB in fp32) and an r=64
all-linear LoRA adapter with non-zero B are built once. Then, each in its own process so
peak RSS is clean, from the same files:

- plain:    from_pretrained(base) -> PeftModel.from_pretrained -> merge_and_unload -> save_pretrained
- termtune: termtune.export.export(cfg)  (merge, stream-write, 4.x fixes, validate, re-read check, manifest)

Targets (issue 5): termtune peak RSS <= 1.5x the fp32 weight bytes; wall <= 2x the plain save.
Both sides above run without export's check under transformers 4.51.3 (TERMTUNE_BEDROCK_PYTHON is set
empty for them). --bedrock-check runs the termtune side alone with it (Bedrock's interpreter from
TERMTUNE_BEDROCK_PYTHON or .venv-bedrock) and reports how long the check took, its result, and the peak
RSS of the export process.
Needs ~10 GB of disk in --workdir and ~5 GB of free memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LARGE = REPO.parent / "shared" / "models" / "flan-t5-large"


def make_config(workdir: Path, dtype: str):
    from termtune.config import load_config

    return load_config(None, [
        f"run.dir={workdir / 'run'}", f"model.source={LARGE}", "model.init=random",
        f"model.architecture={LARGE / 'config.json'}", "lora.r=64", "lora.alpha=16", "lora.dropout=0.0",
        f"export.dtype={dtype}", f"data.source={REPO.parent / 'shared' / 'data' / 'medquad_definitions.jsonl'}",
    ])


def setup(workdir: Path, dtype: str) -> dict:
    """Random-init base (saved by termtune's own materialize) and an r=64 adapter."""
    import torch

    from termtune import modeling

    cfg = make_config(workdir, dtype)
    adapter = cfg.run_dir / "train" / "adapter"
    if (adapter / "adapter_model.safetensors").is_file():
        return {"reused": True}
    modeling.materialize_random_base(cfg)
    model = modeling.attach_lora(cfg, modeling.load_base(cfg))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    model.save_pretrained(adapter)
    return {"lora_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)}


def plain(workdir: Path, dtype: str) -> dict:
    """The recipe AWS samples use: merge in memory, save_pretrained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    cfg = make_config(workdir, dtype)
    out = workdir / "plain"
    shutil.rmtree(out, ignore_errors=True)
    started = time.time()
    base = AutoModelForSeq2SeqLM.from_pretrained(cfg.run_dir / "base-model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(cfg.run_dir / "train" / "adapter")).merge_and_unload()
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    save_started = time.time()
    model.save_pretrained(out)
    return {"save_s": time.time() - save_started, "wall_s": time.time() - started}


def termtune_export(workdir: Path, dtype: str) -> dict:
    from termtune.export import export

    started = time.time()
    artifact = export(make_config(workdir, dtype), force=True)
    check = {k: v for k, v in artifact.bedrock_check.items() if k != "recorded"}
    return {"wall_s": time.time() - started, "failed_checks": sum(c.failed for c in artifact.checks),
            "bedrock_check": check}


ROLES = {"setup": setup, "plain": plain, "termtune": termtune_export}


def child(role: str, workdir: Path, dtype: str) -> None:
    result = ROLES[role](workdir, dtype)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024
    result["cpu_s"] = usage.ru_utime + usage.ru_stime  # less sensitive than wall time to a busy machine
    print("RESULT " + json.dumps(result), flush=True)


def run_child(role: str, workdir: Path, dtype: str, bedrock_check: bool = False) -> dict:
    import os

    started = time.time()
    env = {**os.environ} if bedrock_check else {**os.environ, "TERMTUNE_BEDROCK_PYTHON": ""}
    done = subprocess.run([sys.executable, __file__, "--child", role, "--workdir", str(workdir), "--dtype", dtype],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{role} failed:\n{done.stderr[-3000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return {**json.loads(line[len("RESULT "):]), "process_s": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-export"))
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--child", choices=list(ROLES))
    parser.add_argument("--keep", action="store_true", help="keep the workdir (base, adapter, outputs)")
    parser.add_argument("--bedrock-check", action="store_true",
                        help="time export's check under transformers 4.51.3 (the termtune side only)")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.workdir, args.dtype)

    args.workdir.mkdir(parents=True, exist_ok=True)
    made = run_child("setup", args.workdir, args.dtype)
    print(f"setup: {made}")
    if args.bedrock_check:
        return time_bedrock_check(args)
    base_file = args.workdir / "run" / "base-model" / "model.safetensors"
    fp32_bytes = base_file.stat().st_size  # the base is saved in fp32
    results = {"plain": run_child("plain", args.workdir, args.dtype),
               "termtune": run_child("termtune", args.workdir, args.dtype)}
    gib = 2**30
    print(f"\nflan-t5-large shape, r=64 all-linear adapter, export dtype {args.dtype}; "
          f"fp32 weights {fp32_bytes / gib:.2f} GiB")
    print(f"{'':10} {'peak RSS GiB':>13} {'x fp32 bytes':>13} {'wall s':>8} {'CPU s':>8}")
    for name, r in results.items():
        print(f"{name:10} {r['peak_rss_bytes'] / gib:13.2f} {r['peak_rss_bytes'] / fp32_bytes:13.2f} "
              f"{r['wall_s']:8.1f} {r['cpu_s']:8.1f}")
    plain_r, ours = results["plain"], results["termtune"]
    print(f"plain save_pretrained alone: {plain_r['save_s']:.1f} s")
    print(f"termtune / plain: RSS {ours['peak_rss_bytes'] / plain_r['peak_rss_bytes']:.2f}x, "
          f"wall {ours['wall_s'] / plain_r['wall_s']:.2f}x, CPU {ours['cpu_s'] / plain_r['cpu_s']:.2f}x  "
          f"(targets: RSS <= 1.5x fp32 bytes -> {ours['peak_rss_bytes'] / fp32_bytes:.2f}x; wall <= 2x plain)")
    (args.workdir / "results.json").write_text(json.dumps({"fp32_bytes": fp32_bytes, **results}, indent=2))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


def time_bedrock_check(args: argparse.Namespace) -> None:
    import os

    from termtune.bedrock_check import bedrock_python

    python, why_not = bedrock_python()
    if python is None:
        sys.exit(f"--bedrock-check: {why_not}")
    load_before = os.getloadavg()
    r = run_child("termtune", args.workdir, args.dtype, bedrock_check=True)
    load_after = os.getloadavg()
    check, gib = r["bedrock_check"], 2**30
    print(f"\nflan-t5-large shape, export dtype {args.dtype}, with the check under transformers 4.51.3 ({python})")
    print(f"export wall {r['wall_s']:.1f} s, of which the check {check.get('seconds', float('nan')):.1f} s "
          f"(load + {check.get('probes')} probes x {check.get('new_tokens')} tokens in 4.51.3, after the reference "
          f"in this process)")
    # (the 4.51.3 process's own peak is not measured: RUSAGE_CHILDREN counts the pages it shared at fork)
    print(f"peak RSS of the export process {r['peak_rss_bytes'] / gib:.2f} GiB; CPU {r['cpu_s']:.1f} s (export "
          "process, without the 4.51.3 process)")
    print(f"result: {check.get('status')}: {check.get('message')}")
    print(f"load average (1/5/15 min) before {load_before}, after {load_after}; {os.cpu_count()} CPUs")
    (args.workdir / "results-bedrock-check.json").write_text(json.dumps(
        {**r, "load_before": load_before, "load_after": load_after}, indent=2))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
