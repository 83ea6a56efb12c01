"""GPU decoder training speed: termtune and TRL's SFTTrainer on the SmolLM2-135M, Qwen2.5-0.5B and Llama-3.2-1B shapes.

    bash benchmarks/gpu.sh --prepare             # here, once: tokenizers, shapes, data and the missing wheels
    bash benchmarks/gpu.sh causal                # on the GPU machine (the device call is at the top of gpu.sh)
    bash benchmarks/gpu.sh causal --dry-run      # on CPU: tiny shapes, a few steps, fp32 (the code path only)

Per model, two recipes, each in its own subprocess, on the same data, base weights, batch size and steps:
(b) `termtune train` through termtune's Python API, train section at its defaults except train.batch_size and
    train.max_steps; precision auto (bf16 on the GPU); batches padded to a multiple of 8, loss on the answer;
(p) TRL's SFTTrainer as in benchmarks/bench_train_causal.py: conversational prompt/completion data
    (completion-only loss), packing=True (BFD, padding-free: one flattened row per batch, no attention mask, rows
    kept apart by their position ids), TRL's defaults otherwise (bf16=True, gradient checkpointing on, pack length
    1024), termtune's learning rate and seed, the same per-device batch size (of packed rows) and LoRA (r 64, alpha 16,
    dropout 0.1, all-linear).
Models: the published config.json of each (SmolLM2-135M-Instruct: the one termtune converts from
models/SmolLM2-135M-Instruct.Q4_1.gguf; Qwen2.5-0.5B-Instruct and Llama-3.2-1B-Instruct: ../shared/models), randomly
initialised once by termtune (seeded) and saved; both recipes load that folder in fp32 (bf16 autocast). Real tokenizers
and chat templates. SmolLM2's real weights (the 98 MB GGUF, 270 MB in bf16) do not fit what travels to the device
(64 MiB in all), so its shape is random-initialised there as the others are: the same work per step, no quality.
Data: the rows of ../shared/data/medquad_definitions.jsonl, split by termtune (64 held out), whole definitions
(max_target_length 512), the prompt "What is {term}?" rendered through each model's chat template.

The clock and token counts are benchmarks/bench_gpu.py's meter (the first --warmup steps off the clock, evaluations
and checkpoint saves inside the window left out, the device synchronised at both ends). Tokens/s: non-pad tokens the
model trains on; loss tok/s: the tokens with a label. Useful FLOP/s = 6 x (the linear weights a token passes
through: attention and MLP projections of every layer, and the lm_head) x non-pad tokens / s (attention scores and
LoRA's own matmuls not counted; a LoRA step on a frozen base does about 4x, so 6x overstates its work by 1.5x); MFU =
useful FLOP/s over the GPU's dense bf16 peak (by name; --peak-tflops overrides) and over a measured 8192^3 bf16
torch.mm. Peak memory: torch.cuda.max_memory_allocated of each recipe's process.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
import time
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from bench_gpu import (DATA, PREPARED, REPO, add_meter, datasheet_peak, device_name, measured_peak, run_child,
                       run_termtune, write_config)

MODELS = {"smollm2-135m": Path("models/smollm2-135m-instruct"), "qwen2.5-0.5b": Path("models/qwen2.5-0.5b-instruct"),
          "llama-3.2-1b": Path("models/llama-3.2-1b-instruct")}
"""Folders inside the shared folder: config.json, tokenizer files and chat template, no weights."""
GGUF = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
NOT_COPIED = ("LICENSE", "NOTICE", "SOURCE.md", "model.safetensors", "termtune-gguf.json")
RECIPES = {"b": "termtune", "p": "TRL SFTTrainer"}
DRY = {"overrides": {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
                     "intermediate_size": 128},  # head_dim stays where a config sets it (Qwen2 has none)
       "rows": 48, "test_rows": 8, "max_target": 64, "batch_size": 4, "steps": 4, "warmup": 1}


# ----------------------------------------------------------------------------- --prepare (here)


def model_folder(shared: Path, name: str) -> Path:
    """Where a model's config and tokenizer are: in the shared folder, or for SmolLM2 where --prepare has not staged it
    (a run here, from ../shared), termtune's conversion of the GGUF."""
    folder = shared / MODELS[name]
    if name == "smollm2-135m" and not folder.is_dir() and GGUF.is_file():
        from termtune.gguf import base_folder_from_gguf, cache_dir

        return base_folder_from_gguf(GGUF, cache_dir(), "bf16")
    return folder


def prepare_assets(shared: Path, into: Path) -> None:
    """Copy each model's config and tokenizer files and the data into `into`/shared (SmolLM2's from termtune's
    conversion of the GGUF, without its weights); bench_gpu.py --prepare downloads the wheels (trl among them)."""
    for name in MODELS:
        source = model_folder(shared, name)
        target = into / "shared" / MODELS[name]
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for path in source.iterdir():
            if path.is_file() and not path.name.startswith(NOT_COPIED):
                shutil.copyfile(path, target / path.name)
    (into / "shared" / DATA).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared / DATA, into / "shared" / DATA)
    size = sum(p.stat().st_size for p in (into / "shared" / "models").rglob("*") if p.is_file())
    print(f"prepared the decoder shapes and tokenizers in {into / 'shared'} ({size / 2**20:.1f} MiB)")


# ----------------------------------------------------------------------------- setup (in the driver process)


def setup_work(work: Path, shared: Path, o: argparse.Namespace) -> dict[str, dict]:
    """Per model: the random base (built once), termtune's data stage, the prompt/answer rows TRL trains on."""
    from termtune import pipeline
    from termtune.config import load_config
    from termtune.modeling import materialize_random_base

    rows = [json.loads(line) for line in (shared / DATA).read_text(encoding="utf-8").splitlines()]
    if o.rows:
        rows = random.Random(0).sample(rows, o.rows)
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    setups = {}
    for name in o.models:
        folder = model_folder(shared, name)
        cfg = load_config(write_config(work / f"{name}.yaml", {
            "run": {"dir": str(work / f"{name}-run"), "seed": 42},
            "model": {"source": str(folder), "init": "random", "architecture": str(folder),
                      "architecture_overrides": o.overrides},
            "data": {"source": str(work / "rows.jsonl"), "test_size": o.test_rows, "max_target_length": o.max_target},
            "train": {"batch_size": o.batch_size, "max_steps": o.steps}}))
        pipeline.run_stage(cfg, "data", force=True)  # first: it makes the folder a termtune run
        base = materialize_random_base(cfg)  # both recipes load this folder
        trl_rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                     "completion": [{"role": "assistant", "content": r["target"]}]}
                    for r in map(json.loads, (cfg.run_dir / "data" / "train.jsonl").open())]
        (work / f"{name}-trl-train.json").write_text(json.dumps(trl_rows))
        setups[name] = {"model": name, "base": str(base), "batch_size": o.batch_size, "steps": o.steps,
                        "warmup": o.warmup, "budget_s": o.budget_s, "train_rows": len(trl_rows),
                        "learning_rate": cfg.train.learning_rate, "seed": cfg.run.seed,
                        "lora": {"r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
                                 "target_modules": cfg.lora.target_modules}}
    (work / "setup.json").write_text(json.dumps(setups))
    return setups


# ----------------------------------------------------------------------------- the recipes (in child processes)


def run_trl(work: Path, out: Path, setup: dict) -> str:
    """TRL's SFTTrainer as its documentation recommends (the module docstring); the precision it ran in."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    rows = json.loads((work / f"{setup['model']}-trl-train.json").read_text())
    args = SFTConfig(output_dir=str(out / "trainer"), packing=True, max_steps=setup["steps"],
                     learning_rate=setup["learning_rate"], per_device_train_batch_size=setup["batch_size"],
                     seed=setup["seed"], bf16=cuda, use_cpu=not cuda, report_to=[])
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.float32), args=args,
                         train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(setup["base"]),
                         peft_config=LoraConfig(**setup["lora"], bias="none", task_type="CAUSAL_LM"))
    add_meter(trainer, out, setup, decoder=True)
    trainer.train()
    return "bf16" if args.bf16 else "fp32"


def run_side(work: Path, side: str) -> None:
    """One recipe on one model ("<recipe>-<model>") in this process; writes <work>/<side>/recipe.json."""
    import torch

    recipe, model = side.split("-", 1)
    setup = json.loads((work / "setup.json").read_text())[model]
    out = work / side
    if recipe == "b":
        precision = run_termtune(work, out, setup, model, decoder=True)
    else:
        precision = run_trl(work, out, setup)
    if not (out / "meter.json").is_file():
        sys.exit(f"{side}: training ended before the measured window closed (steps {setup['steps']}, "
                 f"warm-up {setup['warmup']})")
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    (out / "recipe.json").write_text(json.dumps({"precision": precision, "peak_gpu_bytes": peak}))


# ----------------------------------------------------------------------------- measurements


def linear_weights(config: dict) -> int:
    """Multiply-accumulates per token in the linear layers: each layer's q, k, v, o and gated MLP, and the lm_head."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads, head_dim = config.get("num_key_value_heads") or heads, config.get("head_dim") or hidden // heads
    per_layer = (2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
                 + 3 * hidden * config["intermediate_size"])
    return config["num_hidden_layers"] * per_layer + hidden * config["vocab_size"]


def summarise(results: dict[str, dict], setups: dict[str, dict], peak: float | None,
              measured: float) -> dict[str, float]:
    """Print the table; the figures of the summary line."""
    gpu = results and next(iter(results.values()))["peak_gpu_bytes"] is not None
    print(f"{'model':14}{'recipe':16}{'precision':>10}{'steps':>6}{'examples/s':>11}{'tok/s':>9}{'loss tok/s':>11}"
          f"{'padding':>9}{'TFLOP/s':>9}{'MFU':>7}{'of mm':>7}{'peak GPU' if gpu else 'peak RSS':>10}{'left out':>9}")
    figures: dict[str, float] = {}
    for side, r in results.items():
        recipe, model = side.split("-", 1)
        config = json.loads((Path(setups[model]["base"]) / "config.json").read_text())
        useful = 6 * linear_weights(config) * r["src_real"] / r["seconds"]
        memory = r["peak_gpu_bytes"] if gpu else r["peak_rss"]
        key = f"{model}_{recipe}"
        figures |= {f"{key}_examples_per_s": r["examples"] / r["seconds"],
                    f"{key}_tokens_per_s": r["src_real"] / r["seconds"],
                    f"{key}_mfu": useful / (peak or measured), f"{key}_peak_mem_gib": memory / 2**30}
        print(f"{model:14}{recipe + ' ' + RECIPES[recipe]:16}{r['precision']:>10}{r['steps']:>6}"
              f"{figures[f'{key}_examples_per_s']:>11.2f}{figures[f'{key}_tokens_per_s']:>9.0f}"
              f"{r['tgt_real'] / r['seconds']:>11.0f}{r['padding_fraction']:>9.1%}{useful / 1e12:>9.2f}"
              f"{figures[f'{key}_mfu']:>7.1%}{useful / measured:>7.1%}{memory / 2**30:>8.2f}Gi{r['excluded_s']:>8.1f}s"
              + ("  (stopped by --budget-s)" if r["stopped_by_budget"] else ""))
    for model in setups:
        if f"{model}_b_examples_per_s" in figures and f"{model}_p_examples_per_s" in figures:
            figures[f"{model}_b_over_p"] = figures[f"{model}_b_examples_per_s"] / figures[f"{model}_p_examples_per_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=None,
                        help=f"folder holding the models and the data (default: {PREPARED.name}/shared once prepared, "
                             "else ../shared)")
    parser.add_argument("--prepare", action="store_true",
                        help=f"copy the shapes, tokenizers and data into {PREPARED.name}/shared, then stop")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, a few steps, fp32: the code path")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--sides", default="bp", help="which recipes to run (default both)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per step ((p): packed rows of 1024 tokens)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per recipe")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the clock")
    parser.add_argument("--budget-s", type=float, default=30.0, help="stop a recipe after this many measured seconds")
    parser.add_argument("--rows", type=int, default=None, help="use N random rows (default: all)")
    parser.add_argument("--test-rows", type=int, default=64, help="termtune's held-out rows (evaluated off the clock)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak for the MFU")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a fresh temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    parser.add_argument("--_side", help=argparse.SUPPRESS)
    o = parser.parse_args()
    if o._side:
        return run_side(o.work, o._side)
    if o.prepare:
        return prepare_assets(o.shared or REPO.parent / "shared", PREPARED)
    if o.shared is None:
        prepared = (PREPARED / "shared" / MODELS["smollm2-135m"]).is_dir()
        o.shared = PREPARED / "shared" if prepared else REPO.parent / "shared"

    import torch

    o.models = [m for m in o.models.split(",") if m]
    unknown = [m for m in o.models if m not in MODELS]
    if unknown:
        sys.exit(f"--models: unknown {', '.join(unknown)} (choose from {', '.join(MODELS)})")
    o.overrides, o.max_target = {}, 512
    if o.dry_run:
        for key, value in DRY.items():
            setattr(o, key, value)
        if torch.cuda.is_available():
            sys.exit("--dry-run is the CPU check; hide the GPU (CUDA_VISIBLE_DEVICES=) to run it here")
    elif not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run this on a GPU machine, or use --dry-run for the CPU check")
    missing = [str(p) for p in [*(model_folder(o.shared, m) / "tokenizer.json" for m in o.models), o.shared / DATA]
               if not p.is_file()]
    if missing:
        sys.exit(f"--shared {o.shared}: missing {', '.join(missing)} (run `bash benchmarks/gpu.sh --prepare`)")
    if not 0 < o.warmup < o.steps:
        sys.exit(f"--warmup {o.warmup} must be at least 1 and below --steps {o.steps}")

    started = time.perf_counter()
    device = device_name()
    print(f"device: {device}; " + ", ".join(f"{name} {package_version(name)}" for name in ("torch", "transformers",
                                                                                          "peft", "trl"))
          + ("; DRY RUN: tiny shapes, fp32, CPU, figures are not comparable" if o.dry_run else ""), flush=True)
    measured, how = measured_peak()
    peak = o.peak_tflops * 1e12 if o.peak_tflops else (None if o.dry_run else datasheet_peak(device))
    print(f"peak: {'datasheet dense bf16 ' + format(peak / 1e12, '.0f') + ' TFLOP/s' if peak else 'none known'}; "
          f"measured {measured / 1e12:.2f} TFLOP/s ({how}){'' if peak else ' - the MFU is against it'}", flush=True)

    work = o.work or Path(tempfile.mkdtemp(prefix="bench-gpu-causal-"))
    work.mkdir(parents=True, exist_ok=True)
    sides = [f"{recipe}-{model}" for model in o.models for recipe in o.sides if recipe in RECIPES]
    for name in [*sides, *(f"{m}-run" for m in o.models)]:
        shutil.rmtree(work / name, ignore_errors=True)
    setups = setup_work(work, o.shared, o)
    print(f"models: {', '.join(o.models)}, random init{' ' + json.dumps(o.overrides) if o.overrides else ''}; "
          f"{next(iter(setups.values()))['train_rows']} training rows; batch {o.batch_size}, {o.steps} steps, "
          f"the first "
          f"{o.warmup} off the clock; work folder {work} (setup {time.perf_counter() - started:.0f} s)", flush=True)

    results = {}
    for side in sides:
        (work / side).mkdir()
        rss = run_child(work, side, script=__file__)
        results[side] = {**json.loads((work / side / "meter.json").read_text()), "peak_rss": rss,
                         **json.loads((work / side / "recipe.json").read_text())}
        print(f"{side}: done ({time.perf_counter() - started:.0f} s so far)", flush=True)
    figures = summarise(results, setups, peak, measured)
    if o.json:
        o.json.write_text(json.dumps({"device": device, "peak_flops": peak, "measured_peak_flops": measured,
                                      "setups": setups, "results": results, "figures": figures}, indent=2))
    print(f"total {time.perf_counter() - started:.0f} s")
    line = {"device": re.sub(r"[^A-Za-z0-9.-]+", "_", device).strip("_"), "dry_run": int(o.dry_run),
            "peak_tflops": round(peak / 1e12, 1) if peak else "none", "measured_tflops": round(measured / 1e12, 2),
            **{k: round(v, 4) for k, v in figures.items()}}
    print(" ".join(f"{k}={v}" for k, v in line.items()))


if __name__ == "__main__":
    main()
