"""GPU training speed: termtune (bf16 LoRA r64, QLoRA 4-bit) and the best-practice peer recipe, on a flan-t5-large.

    bash benchmarks/gpu.sh --prepare      # here, once: the tokenizer, shape and data, and the missing wheels
    bash benchmarks/gpu.sh                # on the GPU machine (the device call is at the top of gpu.sh)
    bash benchmarks/gpu.sh --dry-run      # on CPU: a tiny shape, a few steps, fp32 (the code path only)

Three recipes, each in its own subprocess, on the same data, model and batch size:
(b) `termtune train` through termtune's Python API, train section at its defaults except train.batch_size and
    train.max_steps; precision auto (bf16 on the GPU);
(q) the same with model.quantization: 4bit (QLoRA: NF4 base, bf16 compute);
(p) the peer: benchmarks/bench_train.py's hand-written recipe as the transformers docs lead an expert to write it
    (no padding at tokenisation, DataCollatorForSeq2Seq(label_pad_token_id=-100), pad_to_multiple_of=8 on a GPU as
    the docs advise for tensor cores, train_sampling_strategy="group_by_length" fed a `length` column of source +
    target tokens, the standard loss, termtune's
    defaults for prompt, learning rate, schedule and seed), with bf16=True on the GPU.
Model: the flan-t5-large architecture (../shared/models/flan-t5-large/config.json), randomly initialised once
by termtune (seeded) and saved; every recipe loads that folder in fp32 (bf16 autocast on the GPU, as both
termtune and the Trainer's bf16=True do). The real Flan-T5 tokenizer; the rows of
../shared/data/medquad_definitions.jsonl split by termtune (the peer trains on the same training terms).

The clock: the same TrainerCallback in every recipe starts after the first --warmup optimizer steps and stops at
--steps (or once --budget-s seconds are measured), with the device synchronised at both ends; held-out
evaluations and checkpoint saves inside the window are timed separately and left out (termtune checkpoints every
50 steps, the peer every 500). Tokens are counted on the device per step and read once at the end.

Useful FLOP/s = 6 x (weights each non-pad token passes through) x tokens / s, as in bench_train.py; a LoRA step
on a frozen base does about 4x (no weight gradients for the base), so the conventional 6x overstates the work
done by 1.5x. MFU = useful FLOP/s over the GPU's dense bf16 peak (a small table by name, or --peak-tflops) and
over a measured 8192^3 bf16 torch.mm. Peak memory: torch.cuda.max_memory_allocated of each recipe's process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PREPARED = REPO / ".gpu-bench"
"""Ignored by git: what --prepare copies and downloads, carried to the GPU machine (../shared does not travel)."""
LARGE = Path("models/flan-t5-large")  # inside the shared folder: the tokenizer and, in config.json, the shape
SMALL_CONFIG = Path("models/flan-t5-small/config.json")  # the dry run's shape
DATA = Path("data/medquad_definitions.jsonl")
TOKENIZER_FILES = ("config.json", "special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json")
MAX_SOURCE, MAX_TARGET = 128, 512
LORA = {"r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": "all-linear"}
SIDES = {"b": "b termtune LoRA", "q": "q termtune QLoRA", "p": "p peer LoRA"}
DRY = {"arch": SMALL_CONFIG, "overrides": {"num_layers": 1, "num_decoder_layers": 1}, "rows": 48, "test_rows": 8,
       "max_target": 64, "batch_size": 4, "steps": 4, "warmup": 1}
EXTRA_PEAKS_TFLOPS = {"h200": 989.0}
"""Dense bf16 peaks beside termtune.plan.GPUS: the H200 (SXM) has the H100 SXM's tensor cores (NVIDIA data sheet:
BF16 1979 TFLOPS with sparsity). Names match as in termtune.plan (an H100 PCIe reads as the SXM part: use
--peak-tflops for it)."""

# Runtime packages termtune needs that the device image lacks (its python3 has torch, transformers, peft,
# accelerate, tokenizers, pyarrow, pandas, ...). datasets 5.0.1 asks for pyarrow >= 21 and huggingface_hub < 2 (the
# image has 1.33); 5.2 asks for pyarrow >= 24, and the image's pyarrow version is not recorded. One version of each.
WHEELS = ("datasets==5.0.1", "dill==0.4.1", "multiprocess==0.70.19", "pydantic==2.14.4", "pydantic-core==2.50.5",
          "annotated-types==0.8.0", "typing-inspection==0.4.5", "typing-extensions==4.16.0", "bitsandbytes==0.50.2",
          "trl==1.16.0")  # trl: the decoder recipes (bench_gpu_causal.py); its other needs are in the image
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
BNB_KEEP = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda13")
"""bitsandbytes ships one library per CUDA version (43 MB); the image's torch is cu130, so only these travel."""


# ----------------------------------------------------------------------------- --prepare (here, with a network)


def prepare_assets(shared: Path, into: Path) -> None:
    """Copy the tokenizer, the shapes and the data into `into`/shared, and the missing wheels into `into`/wheels."""
    target = into / "shared"
    for rel in [*(LARGE / f for f in TOKENIZER_FILES), SMALL_CONFIG, DATA]:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared / rel, target / rel)
    wheels = into / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheels), *WHEELS],
                   check=True)
    for wheel in wheels.glob("bitsandbytes-*.whl"):
        slim_wheel(wheel, keep=lambda name: not name.endswith(".so") or Path(name).name.startswith(BNB_KEEP))
    size = sum(p.stat().st_size for p in into.rglob("*") if p.is_file())
    print(f"prepared {into} ({size / 2**20:.1f} MiB): " + ", ".join(sorted(p.name for p in wheels.iterdir())))


def slim_wheel(wheel: Path, keep: Any) -> None:
    """Rewrite a wheel without the files `keep` rejects (and without their RECORD lines)."""
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if not keep(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if keep(line.split(",", 1)[0])).encode()
            dst.writestr(info, data)
    slim.replace(wheel)


# ----------------------------------------------------------------------------- setup (in the driver process)


def write_config(path: Path, config: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def setup_work(work: Path, shared: Path, o: argparse.Namespace) -> dict:
    """Rows, the random base (built once), termtune's data stage for (b) and (q), the peer's split."""
    from termtune import pipeline
    from termtune.config import load_config
    from termtune.modeling import materialize_random_base

    rows = [json.loads(line) for line in (shared / DATA).read_text(encoding="utf-8").splitlines()]
    if o.rows:
        rows = random.Random(0).sample(rows, o.rows)
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tokenizer = shared / LARGE
    base_cfg = load_config(write_config(work / "base.yaml", {
        "run": {"dir": str(work / "base-run"), "seed": 42},
        "model": {"source": str(tokenizer), "init": "random", "architecture": str(shared / o.arch),
                  "architecture_overrides": o.overrides}}))
    base = materialize_random_base(base_cfg)  # weights and tokenizer; (b), (q) and (p) load this folder
    for side, quantization in (("b", "none"), ("q", "4bit")):
        cfg = load_config(write_config(work / f"{side}.yaml", {
            "run": {"dir": str(work / f"{side}-run"), "seed": 42},
            "model": {"source": str(base), "quantization": quantization},
            "data": {"source": str(work / "rows.jsonl"), "test_size": o.test_rows,
                     "max_source_length": MAX_SOURCE, "max_target_length": o.max_target},
            "lora": {"r": LORA["r"], "alpha": LORA["lora_alpha"], "dropout": LORA["lora_dropout"],
                     "target_modules": LORA["target_modules"]},
            "train": {"batch_size": o.batch_size, "max_steps": o.steps}}))
        pipeline.run_stage(cfg, "data", force=True)
    # The peer trains on the raw rows of the terms termtune put in its training split.
    by_term: dict[str, dict] = {}
    for r in rows:
        by_term.setdefault(r["term"], r)
    terms = [json.loads(line)["term"] for line in (work / "b-run" / "data" / "train.jsonl").open()]
    peer_rows = [{"page_title": t, "page_text": by_term[t]["definition"]} for t in terms]
    (work / "peer-train.json").write_text(json.dumps(peer_rows))
    setup = {"base": str(base), "arch": str(shared / o.arch), "overrides": o.overrides,
             "prompt_template": cfg.data.prompt_template, "max_target": o.max_target, "batch_size": o.batch_size,
             "steps": o.steps, "warmup": o.warmup, "budget_s": o.budget_s, "train_rows": len(terms)}
    (work / "setup.json").write_text(json.dumps(setup))
    return setup


# ----------------------------------------------------------------------------- the meter, the same for all


def add_meter(trainer: Any, out: Path, setup: dict, decoder: bool = False) -> None:
    """Time the optimizer steps after the first `warmup` ones and count their tokens; write <out>/meter.json.

    Evaluations and checkpoint saves inside the window are timed and left out. Counts stay on the device until
    the window closes, so the meter adds no synchronisation to a step. For a seq2seq model the counts are
    (non-pad source, non-pad target) tokens; for a decoder (non-pad tokens, tokens with a label), where a
    padding-free batch (one flattened row, no attention mask) holds as many examples as its position ids restart.
    """
    import torch
    from transformers import TrainerCallback

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    warmup, budget = setup["warmup"], setup["budget_s"]
    m: dict[str, Any] = {"start": None, "done": False, "excluded_s": 0.0, "counts": 0, "slots": 0, "examples": 0}

    def measuring() -> bool:
        return m["start"] is not None and not m["done"]

    training_step = trainer.training_step

    def counted_step(model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
        if measuring():
            ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"]
            real = mask.sum() if mask is not None else torch.tensor(ids.numel(), device=ids.device)
            m["counts"] = m["counts"] + torch.stack([real, (labels != -100).sum()])
            m["slots"] += ids.numel() + (0 if decoder else labels.numel())
            m["examples"] += labels.shape[0] if mask is not None else (inputs["position_ids"] == 0).sum()
        return training_step(model, inputs, *args, **kwargs)

    trainer.training_step = counted_step

    def left_out(method: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not measuring():
                return method(*args, **kwargs)
            sync()
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                sync()
                m["excluded_s"] += time.perf_counter() - start
        return timed

    trainer.evaluate = left_out(trainer.evaluate)
    trainer._save_checkpoint = left_out(trainer._save_checkpoint)

    class Meter(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == warmup:
                sync()
                m["start"], m["first_step"] = time.perf_counter(), state.global_step
                return
            if not measuring():
                return
            timed_out = time.perf_counter() - m["start"] - m["excluded_s"] >= budget
            if state.global_step < state.max_steps and not timed_out:
                return
            sync()
            seconds = time.perf_counter() - m["start"] - m["excluded_s"]
            m["done"] = True
            src, tgt = (int(x) for x in m["counts"].tolist())
            (out / "meter.json").write_text(json.dumps({
                "steps": state.global_step - m["first_step"], "examples": int(m["examples"]), "seconds": seconds,
                "src_real": src, "tgt_real": tgt,
                "padding_fraction": 1 - (src + (0 if decoder else tgt)) / m["slots"],
                "excluded_s": m["excluded_s"], "stopped_by_budget": timed_out and state.global_step < state.max_steps}))
            control.should_training_stop = True

    trainer.add_callback(Meter())


# ----------------------------------------------------------------------------- the recipes (one subprocess each)


def run_termtune(work: Path, out: Path, setup: dict, side: str, decoder: bool = False) -> str:
    """`termtune train` through the Python API (the config <work>/<side>.yaml), with the meter added to its trainer;
    the precision it chose."""
    from termtune.api import train
    from termtune.config import load_config

    train_module = importlib.import_module("termtune.train")  # the module, not the API function of that name
    install = train_module._install_callbacks

    def install_with_meter(trainer: Any, *args: Any) -> Any:
        stop = install(trainer, *args)  # the SIGTERM callback, which train() arms
        add_meter(trainer, out, setup, decoder)
        return stop

    train_module._install_callbacks = install_with_meter
    result = train(load_config(work / f"{side}.yaml"))
    return result.precision + ("" if result.quantization == "none" else f", {result.quantization} base")


def run_peer(work: Path, out: Path, setup: dict, side: str) -> str:
    """The recipe the transformers docs lead an expert to for seq2seq LoRA, written by hand (no termtune code)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer,
                              Seq2SeqTrainingArguments)

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(setup["base"])
    template = setup["prompt_template"]

    def preprocess(batch: dict) -> dict:
        model_inputs = tokenizer([template.format(term=t) for t in batch["page_title"]], max_length=MAX_SOURCE,
                                 truncation=True)
        model_inputs["labels"] = tokenizer(text_target=batch["page_text"], max_length=setup["max_target"],
                                           truncation=True)["input_ids"]
        # what the length grouping sorts by: the whole example, not only its prompt (as in bench_train.py)
        model_inputs["length"] = [len(s) + len(t) for s, t in zip(model_inputs["input_ids"], model_inputs["labels"])]
        return model_inputs

    rows = json.loads((work / "peer-train.json").read_text())
    train_ds = Dataset.from_list(rows).map(preprocess, batched=True, remove_columns=["page_title", "page_text"])
    model = AutoModelForSeq2SeqLM.from_pretrained(setup["base"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(**LORA, bias="none", task_type=TaskType.SEQ_2_SEQ_LM))
    pad = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100,
                                 pad_to_multiple_of=8 if cuda else None)

    def collator(features: list) -> dict:
        return pad([{k: v for k, v in f.items() if k != "length"} for f in features])

    # transformers 5.x replaced group_by_length=True with train_sampling_strategy; the device image may be older
    grouping = ({"train_sampling_strategy": "group_by_length"}
                if "train_sampling_strategy" in Seq2SeqTrainingArguments.__dataclass_fields__ else {"group_by_length": True})
    args = Seq2SeqTrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=setup["batch_size"],
                                    learning_rate=1e-3, lr_scheduler_type="linear", max_steps=setup["steps"],
                                    **grouping, length_column_name="length", remove_unused_columns=False,
                                    seed=42, bf16=cuda, use_cpu=not cuda, report_to=[])
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train_ds, data_collator=collator)
    add_meter(trainer, out, setup)
    trainer.train()
    return "bf16" if args.bf16 else "fp32"


RECIPES = {"b": run_termtune, "q": run_termtune, "p": run_peer}


def run_side(work: Path, side: str) -> None:
    """One recipe in this (child) process; writes <work>/<side>/recipe.json: its precision and peak GPU memory."""
    import torch

    setup = json.loads((work / "setup.json").read_text())
    out = work / side
    precision = RECIPES[side](work, out, setup, side)
    if not (out / "meter.json").is_file():
        sys.exit(f"{side}: training ended before the measured window closed (steps {setup['steps']}, "
                 f"warm-up {setup['warmup']})")
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    (out / "recipe.json").write_text(json.dumps({"precision": precision, "peak_gpu_bytes": peak}))


# ----------------------------------------------------------------------------- measurements


def run_child(work: Path, side: str, script: str = __file__) -> int:
    """Run one recipe in its own process of `script`; the peak RSS of that process in bytes."""
    log = work / f"{side}.log"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, script, "--_side", side, "--work", str(work)], cwd=REPO,
                                stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                     "TOKENIZERS_PARALLELISM": "false"})
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"recipe {side} failed ({os.waitstatus_to_exitcode(status)}); see {log}:\n{log.read_text()[-3000:]}")
    return usage.ru_maxrss * 1024


def weights_per_token(config_file: Path, overrides: dict) -> tuple[int, int]:
    """Multiply-accumulates per non-pad (source, target) token in the linear layers, lm_head included."""
    c = {**json.loads(config_file.read_text()), **overrides}
    d, inner, ff = c["d_model"], c["num_heads"] * c["d_kv"], c["d_ff"]
    ffn = (3 if c["feed_forward_proj"].startswith("gated") else 2) * d * ff
    per_source = c["num_layers"] * (4 * d * inner + ffn) + c["num_decoder_layers"] * 2 * d * inner  # + cross k, v
    per_target = c["num_decoder_layers"] * (4 * d * inner + 2 * d * inner + ffn) + d * c["vocab_size"]
    return per_source, per_target


def measured_peak() -> tuple[float, str]:
    """FLOP/s of a big matmul: bf16 8192^3 on the GPU (mean of 10 after 3 warm-ups), else this CPU's fp32 mm."""
    import torch

    if not torch.cuda.is_available():
        from termtune.plan import measure_cpu_peak

        return measure_cpu_peak(repeats=3), "fp32 torch.mm 2048^3 on the CPU"
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    flops = 10 * 2 * n**3 / (start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return flops, "bf16 torch.mm 8192^3 on the GPU"


def datasheet_peak(device: str) -> float | None:
    """Dense bf16 FLOP/s of a known GPU by name (termtune.plan's table plus the H200), else None."""
    from termtune.plan import GPUS

    peaks = {**EXTRA_PEAKS_TFLOPS, **{key: g.bf16_tflops for key, g in GPUS.items()}}
    name = device.lower().replace(" ", "")
    return next((tflops * 1e12 for key, tflops in peaks.items() if key in name), None)


def device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


# ----------------------------------------------------------------------------- main


def summarise(results: dict[str, dict], setup: dict, peak: float | None, measured: float) -> dict[str, float]:
    """Print the table; the figures of the summary line."""
    per_src, per_tgt = weights_per_token(Path(setup["arch"]), setup["overrides"])
    gpu = results and next(iter(results.values()))["peak_gpu_bytes"] is not None
    print(f"{'recipe':18}{'precision':>16}{'steps':>6}{'examples/s':>11}{'tgt tok/s':>11}{'padding':>9}{'TFLOP/s':>9}"
          f"{'MFU':>7}{'of mm':>7}{'peak GPU' if gpu else 'peak RSS':>10}{'left out':>9}")
    figures: dict[str, float] = {}
    for side, r in results.items():
        useful = 6 * (per_src * r["src_real"] + per_tgt * r["tgt_real"]) / r["seconds"]
        memory = r["peak_gpu_bytes"] if gpu else r["peak_rss"]
        figures |= {f"{side}_examples_per_s": r["examples"] / r["seconds"],
                    f"{side}_target_tokens_per_s": r["tgt_real"] / r["seconds"],
                    f"{side}_mfu": useful / (peak or measured), f"{side}_peak_mem_gib": memory / 2**30}
        print(f"{SIDES[side]:18}{r['precision']:>16}{r['steps']:>6}{figures[f'{side}_examples_per_s']:>11.2f}"
              f"{figures[f'{side}_target_tokens_per_s']:>11.0f}{r['padding_fraction']:>9.1%}{useful / 1e12:>9.2f}"
              f"{figures[f'{side}_mfu']:>7.1%}{useful / measured:>7.1%}{memory / 2**30:>8.2f}Gi"
              f"{r['excluded_s']:>8.1f}s" + ("  (stopped by --budget-s)" if r["stopped_by_budget"] else ""))
    if "b" in results and "p" in results:
        figures["b_over_p"] = figures["b_examples_per_s"] / figures["p_examples_per_s"]
    if "b" in results and "q" in results:
        figures["q_over_b"] = figures["q_examples_per_s"] / figures["b_examples_per_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=None,
                        help="folder holding models/flan-t5-large and data/medquad_definitions.jsonl (default: "
                             f"{PREPARED.name}/shared once prepared, else ../shared)")
    parser.add_argument("--prepare", action="store_true",
                        help=f"copy what a run reads from --shared into {PREPARED.name}/shared and download the wheels "
                             f"the device image lacks into {PREPARED.name}/wheels, then stop (needs the network)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, a tiny shape, a few steps, fp32: the code path")
    parser.add_argument("--sides", default="bqp", help="which recipes to run (default all three)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100,
                        help="optimizer steps per recipe (100 x 32 rows: under one epoch of the ~3400 training rows)")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the clock")
    parser.add_argument("--budget-s", type=float, default=60.0, help="stop a recipe after this many measured seconds")
    parser.add_argument("--rows", type=int, default=None, help="use N random rows (default: all)")
    parser.add_argument("--test-rows", type=int, default=64, help="termtune's held-out rows (evaluated off the clock)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak for the MFU (default: by name; H100/H200 SXM 989)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a fresh temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    parser.add_argument("--_side", choices=sorted(RECIPES), help=argparse.SUPPRESS)
    o = parser.parse_args()
    if o._side:
        return run_side(o.work, o._side)
    if o.prepare:
        return prepare_assets(o.shared or REPO.parent / "shared", PREPARED)
    if o.shared is None:
        o.shared = PREPARED / "shared" if (PREPARED / "shared").is_dir() else REPO.parent / "shared"

    import torch

    o.arch, o.overrides, o.max_target = LARGE / "config.json", {}, MAX_TARGET
    if o.dry_run:
        for key, value in DRY.items():
            setattr(o, key, value)
        if torch.cuda.is_available():
            sys.exit("--dry-run is the CPU check; hide the GPU (CUDA_VISIBLE_DEVICES=) to run it here")
    elif not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run this on a GPU machine, or use --dry-run for the CPU check")
    missing = [str(o.shared / p) for p in (LARGE / "tokenizer.json", o.arch, DATA) if not (o.shared / p).is_file()]
    if missing:
        sys.exit(f"--shared {o.shared}: missing {', '.join(missing)}")
    if not 0 < o.warmup < o.steps:
        sys.exit(f"--warmup {o.warmup} must be at least 1 and below --steps {o.steps}")
    sides = [s for s in o.sides if s in SIDES]
    skipped = []
    if "q" in sides and importlib.util.find_spec("bitsandbytes") is None:
        sides.remove("q")
        skipped.append("q")
        print("q termtune QLoRA: skipped (bitsandbytes is not installed here)")

    started = time.perf_counter()
    device = device_name()
    packages = ("torch", "transformers", "peft", "bitsandbytes") if "q" in sides else ("torch", "transformers", "peft")
    print(f"device: {device}; {', '.join(f'{name} {package_version(name)}' for name in packages)}"
          + ("; DRY RUN: tiny shape, fp32, CPU, figures are not comparable" if o.dry_run else ""), flush=True)
    measured, how = measured_peak()
    peak = o.peak_tflops * 1e12 if o.peak_tflops else (None if o.dry_run else datasheet_peak(device))
    print(f"peak: {'datasheet dense bf16 ' + format(peak / 1e12, '.0f') + ' TFLOP/s' if peak else 'none known'}; "
          f"measured {measured / 1e12:.2f} TFLOP/s ({how}){'' if peak else ' - the MFU is against it'}", flush=True)

    work = o.work or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("base-run", "b-run", "q-run", *SIDES):
        shutil.rmtree(work / name, ignore_errors=True)
    setup = setup_work(work, o.shared, o)
    print(f"model: {o.arch.parent.name} shape{' ' + json.dumps(o.overrides) if o.overrides else ''}, random init; "
          f"{setup['train_rows']} training rows; batch {o.batch_size}, {o.steps} steps, the first {o.warmup} "
          f"off the clock; work folder {work} (setup {time.perf_counter() - started:.0f} s)", flush=True)

    results = {}
    for side in sides:
        (work / side).mkdir()
        rss = run_child(work, side)
        results[side] = {**json.loads((work / side / "meter.json").read_text()), "peak_rss": rss,
                         **json.loads((work / side / "recipe.json").read_text())}
        print(f"{SIDES[side]}: done ({time.perf_counter() - started:.0f} s so far)", flush=True)
    figures = summarise(results, setup, peak, measured)
    if o.json:
        o.json.write_text(json.dumps({"device": device, "peak_flops": peak, "measured_peak_flops": measured,
                                      "setup": setup, "results": results, "figures": figures}, indent=2))
    print(f"total {time.perf_counter() - started:.0f} s")
    line = {"device": re.sub(r"[^A-Za-z0-9.-]+", "_", device).strip("_"), "dry_run": int(o.dry_run),
            "peak_tflops": round(peak / 1e12, 1) if peak else "none", "measured_tflops": round(measured / 1e12, 2),
            **{k: round(v, 4) for k, v in figures.items()}}
    if skipped:
        line["skipped"] = ",".join(skipped)
    print(" ".join(f"{k}={v}" for k, v in line.items()))


if __name__ == "__main__":
    main()
