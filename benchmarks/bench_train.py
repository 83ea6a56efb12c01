"""Training speed and time to quality: the seed recipe, a best-practice hand-written recipe, and `termtune train`.

    .venv/bin/python benchmarks/bench_train.py             # three runs of the three recipes (~25 min on 2 cores)
    .venv/bin/python benchmarks/bench_train.py --runs 1    # one run (~8 min)
    .venv/bin/python benchmarks/bench_train.py --sides b --runs 2 --b train.precision=bf16   # one recipe (levers)
    .venv/bin/python benchmarks/bench_train.py --rows 64 --runs 1   # a quick smoke run (not comparable)

Everything is identical except the recipe:
- data: 256 rows of ../shared/data/medquad_definitions.jsonl drawn with random.Random(0).sample, split by
  termtune's seeded split (all three recipes train on the same rows and are scored on the same held-out rows);
- model: the flan-t5-small architecture cut to 2 encoder + 2 decoder layers, randomly initialised once with a
  fixed seed (all recipes load the same saved weights), fp32, CPU, the real Flan-T5 tokenizer;
- max lengths 128 input / 512 target; LoRA r 64, alpha 16, dropout 0.1, all-linear; one epoch.

(a) the seed recipe: inputs "What is " + term, `tokenizer(..., max_length, truncation=True, padding=True)` inside
    `datasets.map(batched=True)` (each 1000-row chunk padded to its longest row), labels = the padded target ids
    (pad not masked), per-device batch size 1, gradient accumulation 2, `TrainingArguments` defaults otherwise.
    Its SFTTrainer cannot train T5 (it fails on step 1), so it runs on Seq2SeqTrainer, which is what works.
    Deviation from the recipe as written, in its favour: it loads its base in 4-bit NF4, which this CPU run drops
    (on a CPU bitsandbytes dequantises the weights on every pass, which would slow (a) further).
(p) the peer: what an expert writes by hand today following the transformers documentation for seq2seq LoRA,
    with no termtune code: no padding at tokenisation, `DataCollatorForSeq2Seq(label_pad_token_id=-100)`,
    `train_sampling_strategy="group_by_length"` (transformers' length grouping) fed a `length` column of source +
    target tokens (without it the grouping measures only the ~10-token prompt; transformers 5 drops unknown columns
    before the sampler sees them, so the column is kept with remove_unused_columns=False and the collator drops it),
    the standard loss, and termtune's defaults for everything a user would copy (prompt, batch size 4, learning
    rate 1e-3, linear schedule, seed).
(b) `termtune train` (through termtune's Python API) with the config's train section left at its defaults.

Each recipe runs in its own subprocess (clean peak RSS, read with os.wait4), with the same callback: every
SNAPSHOT_EVERY examples it saves the adapter and notes the training clock. The clock runs from the start of the
training loop; held-out evaluations inside the loop (termtune's own) are excluded, checkpoint and snapshot saves
are included. Afterwards one function scores every snapshot and the untrained base: mean cross-entropy over the
non-pad target tokens of the held-out rows, each recipe with its own prompt. Time to quality (MLPerf style) is the
clock at which the held-out loss first reaches TARGET_LOSS, a target fixed here in advance, read off the straight
line between the two snapshots that bracket it (so the figure does not move with SNAPSHOT_EVERY), or "not reached"
with the final loss.

Useful FLOP/s = non-pad tokens x 6 x (weights each token passes through), over the clock, as a fraction of a
2048x2048 torch.mm measured in this run on all cores, in the precision the recipe's matmuls ran in (fp32 for (a) and
(p); termtune trains in bf16 autocast on a CPU with bf16 instructions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOKENIZER = SHARED / "models" / "flan-t5-large"
SMALL_CONFIG = SHARED / "models" / "flan-t5-small" / "config.json"
MEDQUAD = SHARED / "data" / "medquad_definitions.jsonl"
ARCH = {"num_layers": 2, "num_decoder_layers": 2}
MAX_SOURCE, MAX_TARGET = 128, 512
LORA = {"r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": "all-linear"}
SNAPSHOT_EVERY = 16
"""Examples between held-out scores, the same for every recipe (8 steps of (a), 4 of (p) and (b))."""
SIDES = {"a": "a seed recipe", "p": "p peer", "b": "b termtune"}
TARGET_LOSS = 10.0
"""Held-out loss target, fixed before any run: below ln(32128) = 10.38, the loss of a uniform guess over the
vocabulary, so no output-scale trick of a random-init model reaches it; only learning which tokens definitions use
does. The untrained base scores far above it (printed beside it in every run)."""


# ----------------------------------------------------------------------------- setup


def write_config(work: Path, test_rows: int, b_overrides: list[str]) -> Path:
    """The termtune config for (b): everything the benchmark fixes, and nothing in `train:` (its defaults)."""
    import yaml

    config = {
        "run": {"dir": str(work / "termtune-run"), "seed": 42},
        "model": {"source": str(TOKENIZER), "init": "random", "architecture": str(SMALL_CONFIG),
                  "architecture_overrides": ARCH},
        "data": {"source": str(work / "rows.jsonl"), "test_size": test_rows,
                 "max_source_length": MAX_SOURCE, "max_target_length": MAX_TARGET},
        "lora": {"r": LORA["r"], "alpha": LORA["lora_alpha"], "dropout": LORA["lora_dropout"],
                 "target_modules": LORA["target_modules"]},
    }
    for item in b_overrides:  # exploration only; the recorded runs use none
        key, _, value = item.partition("=")
        section, name = key.split(".", 1)
        config.setdefault(section, {})[name] = yaml.safe_load(value)
    path = work / "termtune.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def prepare(work: Path, n_rows: int, test_rows: int, b_overrides: list[str]) -> dict:
    """Sample the rows, run termtune's data stage (the shared split), build the random base once."""
    from termtune import pipeline
    from termtune.config import load_config
    from termtune.modeling import materialize_random_base

    rows = [json.loads(line) for line in MEDQUAD.read_text(encoding="utf-8").splitlines()]
    sample = random.Random(0).sample(rows, n_rows)
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sample), encoding="utf-8")
    config_path = write_config(work, test_rows, b_overrides)
    cfg = load_config(config_path)
    pipeline.run_stage(cfg, "data", force=True)
    base = materialize_random_base(cfg)
    # The other recipes train on the raw rows of the same terms termtune put in each split.
    by_term = {r["term"]: r for r in sample}
    split = {}
    for name in ("train", "test"):
        terms = [json.loads(line)["term"] for line in (cfg.run_dir / "data" / f"{name}.jsonl").open()]
        split[name] = [{"page_title": t, "page_text": by_term[t]["definition"]} for t in terms]
    (work / "split.json").write_text(json.dumps(split))
    return {"base": str(base), "config": str(config_path), "prompt_template": cfg.data.prompt_template,
            "train_rows": len(split["train"]), "test_rows": len(split["test"])}


# ----------------------------------------------------------------------------- the clock, the same for all


def add_clock(trainer: Any, out: Path, examples_per_step: int | None, n_examples: int,
              every: int = SNAPSHOT_EVERY) -> None:
    """Every `every` examples save the adapter and note the training clock; write <out>/clock.json at the end.

    The clock starts with the training loop; evaluations inside it are excluded, saves included. With
    examples_per_step None (packed batches, whose rows per step vary) a step counts as its share of the epoch.
    """
    from transformers import TrainerCallback

    evaluate = trainer.evaluate
    excluded = [0.0]

    def timed_evaluate(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return evaluate(*args, **kwargs)
        finally:
            excluded[0] += time.perf_counter() - start

    trainer.evaluate = timed_evaluate

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.start, self.snapshots, self.seen = time.perf_counter(), [], 0

        def clock(self) -> float:
            return time.perf_counter() - self.start - excluded[0]

        def snapshot(self, model: Any, seen: int) -> None:
            folder = out / f"snapshot-{seen:05d}"
            model.save_pretrained(str(folder))
            self.snapshots.append({"examples": seen, "clock_s": self.clock(), "adapter": str(folder)})

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if examples_per_step is None:
                seen = n_examples * state.global_step // state.max_steps
            else:
                seen = min(state.global_step * examples_per_step, n_examples)
            if seen // every > self.seen // every or seen == n_examples:
                self.snapshot(model, seen)
            self.seen = seen

        def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            (out / "clock.json").write_text(json.dumps({"clock_s": self.clock(), "examples": n_examples,
                                                        "steps": state.global_step, "snapshots": self.snapshots}))

    trainer.add_callback(Clock())


# ----------------------------------------------------------------------------- (a) the seed recipe


def run_seed_recipe(work: Path, out: Path, setup: dict) -> None:
    """The seed recipe, as it is written, in this process (called as a subprocess by main)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer,
                              Seq2SeqTrainingArguments)

    split = json.loads((work / "split.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))

    def preprocess_function(sample, padding=True):
        inputs = ["What is " + item for item in sample["page_title"]]
        model_inputs = tokenizer(inputs, max_length=MAX_SOURCE, padding=padding, truncation=True)
        labels = tokenizer(text_target=sample["page_text"], max_length=MAX_TARGET, padding=padding, truncation=True)
        model_inputs["labels"] = labels["input_ids"]  # the pad ids stay in the labels: the loss trains on them
        return model_inputs

    train_ds = Dataset.from_list(split["train"]).map(preprocess_function, batched=True,
                                                      remove_columns=["page_title", "page_text"])
    model = AutoModelForSeq2SeqLM.from_pretrained(setup["base"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(**LORA, bias="none", task_type=TaskType.SEQ_2_SEQ_LM))
    args = Seq2SeqTrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=1,
                                    gradient_accumulation_steps=2, num_train_epochs=1, use_cpu=True, report_to=[])
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train_ds,
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100,
                                                                  pad_to_multiple_of=8))
    add_clock(trainer, out, examples_per_step=2, n_examples=len(train_ds))
    trainer.train()

    pad = tokenizer.pad_token_id
    src_real = sum(sum(m) for m in train_ds["attention_mask"])
    src_slots = sum(len(m) for m in train_ds["attention_mask"])
    tgt_real = sum(sum(1 for t in labels if t != pad) for labels in train_ds["labels"])
    tgt_slots = sum(len(labels) for labels in train_ds["labels"])
    (out / "tokens.json").write_text(json.dumps({
        "src_real": src_real, "tgt_real": tgt_real, "padding_fraction": 1 - (src_real + tgt_real) / (src_slots + tgt_slots)}))


# ----------------------------------------------------------------------------- (p) the peer


def run_peer(work: Path, out: Path, setup: dict) -> None:
    """The recipe the transformers docs lead an expert to for seq2seq LoRA, written by hand (no termtune code)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer,
                              Seq2SeqTrainingArguments)

    split = json.loads((work / "split.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    template = setup["prompt_template"]

    def preprocess(batch: dict) -> dict:
        model_inputs = tokenizer([template.format(term=t) for t in batch["page_title"]], max_length=MAX_SOURCE,
                                 truncation=True)
        model_inputs["labels"] = tokenizer(text_target=batch["page_text"], max_length=MAX_TARGET,
                                           truncation=True)["input_ids"]
        # what the length grouping sorts by: the whole example, not only its prompt
        model_inputs["length"] = [len(s) + len(t) for s, t in zip(model_inputs["input_ids"], model_inputs["labels"])]
        return model_inputs

    train_ds = Dataset.from_list(split["train"]).map(preprocess, batched=True,
                                                      remove_columns=["page_title", "page_text"])
    model = AutoModelForSeq2SeqLM.from_pretrained(setup["base"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(**LORA, bias="none", task_type=TaskType.SEQ_2_SEQ_LM))
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    counts = [0, 0, 0, 0]  # real source, source slots, real target, target slots

    def counting_collator(features: list) -> dict:
        batch = collator([{k: v for k, v in f.items() if k != "length"} for f in features])
        mask, labels = batch["attention_mask"], batch["labels"]
        for i, n in enumerate((int(mask.sum()), mask.numel(), int((labels != -100).sum()), labels.numel())):
            counts[i] += n
        return batch

    args = Seq2SeqTrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=4,
                                    learning_rate=1e-3, lr_scheduler_type="linear", num_train_epochs=1,
                                    train_sampling_strategy="group_by_length", length_column_name="length",
                                    remove_unused_columns=False, seed=42, use_cpu=True, report_to=[])
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train_ds, data_collator=counting_collator)
    add_clock(trainer, out, examples_per_step=4, n_examples=len(train_ds))
    trainer.train()
    (out / "tokens.json").write_text(json.dumps({
        "src_real": counts[0], "tgt_real": counts[2], "padding_fraction": 1 - (counts[0] + counts[2]) / (counts[1] + counts[3])}))


# ----------------------------------------------------------------------------- (b) termtune


def train_with_clock(config: Path, out: Path, also: Any = None, every: int = SNAPSHOT_EVERY) -> Any:
    """`termtune train` through the Python API, with the benchmark's clock (a snapshot every `every` examples) and
    `also(trainer)`, when given, added to its trainer; the config it trained."""
    import importlib

    from termtune.api import train
    from termtune.config import load_config

    train_module = importlib.import_module("termtune.train")  # the module, not the API function of that name

    cfg = load_config(config)
    install = train_module._install_callbacks

    def install_with_clock(trainer: Any, *args: Any) -> Any:
        stop = install(trainer, *args)  # the SIGTERM callback, which train() arms
        add_clock(trainer, out, examples_per_step=cfg.train.batch_size, n_examples=len(trainer.train_dataset),
                  every=every)
        if also:
            also(trainer)
        return stop

    train_module._install_callbacks = install_with_clock
    train(cfg)
    return cfg


def run_termtune(work: Path, out: Path, setup: dict) -> None:
    """`termtune train` through the Python API, with the benchmark's clock added to its trainer."""
    cfg = train_with_clock(Path(setup["config"]), out)
    result = json.loads((cfg.run_dir / "train" / "result.json").read_text())
    rows = [json.loads(line) for line in (cfg.run_dir / "data" / "train.jsonl").open()]
    (out / "tokens.json").write_text(json.dumps({
        "src_real": sum(len(r["input_ids"]) for r in rows), "tgt_real": sum(len(r["labels"]) for r in rows),
        "padding_fraction": result["padding_fraction"], "precision": result["precision"]}))


RECIPES = {"a": run_seed_recipe, "p": run_peer, "b": run_termtune}


# ----------------------------------------------------------------------------- measurements


def run_child(cmd: list[str], log: Path) -> tuple[float, int]:
    """Run a recipe in its own process; (wall seconds, peak RSS bytes of that process)."""
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                     "TOKENIZERS_PARALLELISM": "false"})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def matmul_peaks() -> dict[str, float]:
    """FLOP/s of a 2048x2048 torch.mm on all cores (best of 10), in fp32 and in bf16."""
    from termtune.plan import measure_cpu_peak

    return {"fp32": measure_cpu_peak(repeats=10), "bf16": measure_cpu_peak(repeats=10, bf16=True)}


def weights_per_token(config_file: Path) -> tuple[int, int]:
    """Multiply-accumulates per non-pad (source, target) token in the linear layers, lm_head included."""
    c = json.loads(config_file.read_text())
    c.update(ARCH)
    d, inner, ff = c["d_model"], c["num_heads"] * c["d_kv"], c["d_ff"]
    ffn = (3 if c["feed_forward_proj"].startswith("gated") else 2) * d * ff
    per_source = c["num_layers"] * (4 * d * inner + ffn) + c["num_decoder_layers"] * 2 * d * inner  # + cross k, v
    per_target = c["num_decoder_layers"] * (4 * d * inner + 2 * d * inner + ffn) + d * c["vocab_size"]
    return per_source, per_target


class HeldOut:
    """Mean cross-entropy over the non-pad target tokens of the held-out rows (pad masked), the same for all."""

    def __init__(self, base: str, terms: list[str], definitions: list[str]) -> None:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.base, self.terms = AutoModelForSeq2SeqLM.from_pretrained(base).eval(), terms
        self.tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
        self.labels = self.tokenizer(text_target=definitions, max_length=MAX_TARGET, truncation=True)["input_ids"]

    def loss(self, adapter: str | None, prompt: str) -> float:
        """With `adapter` None: the untrained base's loss."""
        import torch
        from peft import PeftModel

        sources = self.tokenizer([prompt.format(term=t) for t in self.terms], max_length=MAX_SOURCE,
                                 truncation=True)["input_ids"]
        model = PeftModel.from_pretrained(self.base, adapter).eval() if adapter else self.base
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(sources), 8):
                src, tgt = sources[i:i + 8], self.labels[i:i + 8]
                s_len, t_len = max(map(len, src)), max(map(len, tgt))
                input_ids = torch.tensor([x + [0] * (s_len - len(x)) for x in src])
                label_ids = torch.tensor([x + [-100] * (t_len - len(x)) for x in tgt])
                logits = model(input_ids=input_ids, attention_mask=(input_ids != 0).long(), labels=label_ids).logits
                total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), label_ids.flatten(),
                                                                 ignore_index=-100, reduction="sum"))
                count += int((label_ids != -100).sum())
        if adapter:
            self.base = model.unload()  # the bare base again, for the next adapter
        return total / count


def run_rotated(work: Path, setup: dict, sides: str, n_runs: int, script: str = __file__) -> list[dict[str, dict]]:
    """Train the recipes `n_runs` times, who goes first rotating from run to run, each run in <work>/run-N."""
    runs = []
    for i in range(n_runs):
        order = list(sides[i % len(sides):] + sides[:i % len(sides)])
        run_dir = work / f"run-{i + 1}"
        run_dir.mkdir(exist_ok=True)
        for name in ("setup.json", "split.json"):
            (run_dir / name).write_text((work / name).read_text())
        runs.append(run_once(run_dir, setup, order, script))
        print(f"run {i + 1}: trained {', '.join(order)}", flush=True)
    return runs


def run_once(work: Path, setup: dict, order: list[str], script: str = __file__) -> dict[str, dict]:
    """Train the recipes once (in `order`), each in its own process of `script`; their clocks, tokens and RSS."""
    out = {}
    for side in order:
        folder = work / side
        subprocess.run(["rm", "-rf", str(folder)], check=True)
        if side == "b":
            subprocess.run(["rm", "-rf", str(Path(setup["config"]).parent / "termtune-run" / "train")], check=True)
        folder.mkdir()
        wall, rss = run_child([sys.executable, script, "--_side", side, "--work", str(work)], work / f"{side}.log")
        out[side] = {**json.loads((folder / "clock.json").read_text()),
                     **json.loads((folder / "tokens.json").read_text()), "process_wall_s": wall, "peak_rss": rss}
    return out


def prompt(side: str, setup: dict) -> str:
    """The prompt each recipe trained with: the seed recipe's own, termtune's template for the other two."""
    return "What is {term}" if side == "a" else setup["prompt_template"]


def time_to_target(snapshots: list[dict], target: float) -> float | None:
    """The clock at which the held-out loss first reaches `target`, on the straight line between the two snapshots
    that bracket the crossing (the run's start counts as a point at the base's loss); None when never reached."""
    for before, after in zip(snapshots, snapshots[1:]):
        if after["heldout"] <= target < before["heldout"]:
            share = (before["heldout"] - target) / (before["heldout"] - after["heldout"])
            return before["clock_s"] + share * (after["clock_s"] - before["clock_s"])
    return 0.0 if snapshots and snapshots[0]["heldout"] <= target else None


def score(runs: list[dict[str, dict]], setup: dict, held_out: HeldOut, base_loss: float) -> None:
    """Held-out loss of every snapshot; then each recipe's final loss and its time to TARGET_LOSS."""
    for run in runs:
        for side, r in run.items():
            for snap in r["snapshots"]:
                snap["heldout"] = held_out.loss(snap["adapter"], prompt(side, setup))
            r["heldout"] = r["snapshots"][-1]["heldout"]
            r["ttq_s"] = time_to_target([{"clock_s": 0.0, "heldout": base_loss}, *r["snapshots"]], TARGET_LOSS)


def plot(runs: list[dict[str, dict]], path: Path) -> None:
    """Held-out loss against the training clock, each recipe's runs in one colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for side, colour in (("a", "tab:gray"), ("p", "tab:blue"), ("b", "tab:green")):
        for i, run in enumerate(runs):
            snaps = run[side]["snapshots"]
            ax.plot([s["clock_s"] for s in snaps], [s["heldout"] for s in snaps], color=colour, alpha=0.8,
                    marker=".", label=SIDES[side][2:] if i == 0 else None)
    ax.axhline(TARGET_LOSS, color="tab:red", linestyle=":", linewidth=1,
               label=f"target {TARGET_LOSS:g}, fixed in advance (uniform guess: 10.38)")
    ax.set_xlabel("training clock, s (held-out evaluations excluded)")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"Time to quality, one epoch each, {len(runs)} run(s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarise(runs: list[dict[str, dict]], peaks: dict[str, float]) -> dict[str, Any]:
    """Per-run table, min / median / max over the runs; returns the medians. Utilisation is against the matmul peak
    of the precision each recipe's matmuls ran in (fp32 for (a) and (p); (b) in what termtune chose)."""
    per_src, per_tgt = weights_per_token(SMALL_CONFIG)
    for run in runs:
        for r in run.values():
            r["examples_per_s"] = r["examples"] / r["clock_s"]
            r["target_tokens_per_s"] = r["tgt_real"] / r["clock_s"]
            useful = 6 * (per_src * r["src_real"] + per_tgt * r["tgt_real"]) / r["clock_s"]
            r["useful_gflops"], r["peak_fraction"] = useful / 1e9, useful / peaks[r.get("precision", "fp32")]
    print(f"{'run recipe':20}{'examples/s':>11}{'tgt tok/s':>11}{'padding':>9}{'peak RSS':>10}{'held-out':>10}"
          f"{'GFLOP/s':>9}{'of peak':>9}{'clock s':>9}{'to target':>14}{'wall s':>8}")
    for i, run in enumerate(runs, 1):
        for side in SIDES:
            r = run[side]
            ttq = f"{r['ttq_s']:.1f}s" if r["ttq_s"] is not None else "not reached"
            name = SIDES[side] + (f" {r['precision']}" if "precision" in r else "")
            print(f"{i} {name:18}{r['examples_per_s']:>11.3f}{r['target_tokens_per_s']:>11.1f}"
                  f"{r['padding_fraction']:>9.1%}{r['peak_rss'] / 2**20:>8.0f}Mi{r['heldout']:>10.4f}"
                  f"{r['useful_gflops']:>9.1f}{r['peak_fraction']:>9.1%}{r['clock_s']:>9.1f}{ttq:>14}"
                  f"{r['process_wall_s']:>8.1f}")

    def ttq_ratio(slow: str, fast: str) -> list[float]:
        """Time-to-target ratios of the runs where both recipes reached the target."""
        return [run[slow]["ttq_s"] / run[fast]["ttq_s"] for run in runs
                if run[slow]["ttq_s"] is not None and run[fast]["ttq_s"]]

    figures = {
        "ratio": [run["b"]["examples_per_s"] / run["a"]["examples_per_s"] for run in runs],
        "peer_ratio": [run["b"]["examples_per_s"] / run["p"]["examples_per_s"] for run in runs],
        "ttq_ratio": ttq_ratio("a", "b"),
        "peer_ttq_ratio": ttq_ratio("p", "b"),
        **{f"{s}_examples_per_s": [run[s]["examples_per_s"] for run in runs] for s in SIDES},
        **{f"heldout_{s}": [run[s]["heldout"] for run in runs] for s in SIDES},
        **{f"ttq_{s}_s": [run[s]["ttq_s"] for run in runs if run[s]["ttq_s"] is not None] for s in SIDES},
        "peak_fraction_b": [run["b"]["peak_fraction"] for run in runs],
    }
    return spread(figures, len(runs))


def spread(figures: dict[str, list[float]], runs: int) -> dict[str, float | None]:
    """Print each figure's min / median / max over the runs; return the medians (None: no run had the figure)."""
    print(f"over {runs} run(s): min / median / max (times to target: over the runs that reached it)")
    for name, values in figures.items():
        if values:
            print(f"  {name:18} {min(values):10.4f} {statistics.median(values):10.4f} {max(values):10.4f}")
        else:
            print(f"  {name:18} {'not reached in any run':>32}")
    return {name: statistics.median(values) if values else None for name, values in figures.items()}


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--test-rows", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="train the three recipes this many times")
    parser.add_argument("--sides", default="apb", help="which recipes to train (exploration; the ratios need all)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a fresh temp folder)")
    parser.add_argument("--b", action="append", default=[], help="override for (b), exploration only")
    parser.add_argument("--_side", choices=sorted(RECIPES), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts._side:
        setup = json.loads((opts.work / "setup.json").read_text())
        RECIPES[opts._side](opts.work, opts.work / opts._side, setup)
        return

    import tempfile

    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # the data stage's over-long-row notice is termtune's to report
    work = opts.work or Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["rm", "-rf", str(work / "termtune-run")], check=True)
    setup = prepare(work, opts.rows, opts.test_rows, opts.b)
    (work / "setup.json").write_text(json.dumps(setup))
    peaks = matmul_peaks()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; load average {os.getloadavg()[0]:.1f}")
    print(f"data: {setup['train_rows']} train / {setup['test_rows']} held-out rows; work folder {work}", flush=True)

    runs = run_rotated(work, setup, opts.sides, opts.runs)
    end = matmul_peaks()
    peaks = {k: max(v, end[k]) for k, v in peaks.items()}
    print(f"torch.mm 2048^2 peak: fp32 {peaks['fp32'] / 1e9:.1f}, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s "
          "(best of the start and the end)")

    split = json.loads((work / "split.json").read_text())
    held_out = HeldOut(setup["base"], [r["page_title"] for r in split["test"]], [r["page_text"] for r in split["test"]])
    if set(opts.sides) != set(SIDES):
        for run in runs:
            for side, r in run.items():
                heldout = held_out.loss(r["snapshots"][-1]["adapter"], prompt(side, setup))
                print(f"{SIDES[side]}: {r['examples'] / r['clock_s']:.3f} examples/s, held-out loss {heldout:.4f}")
        return
    base_loss = held_out.loss(None, setup["prompt_template"])
    print(f"held-out loss: untrained base {base_loss:.4f}, target {TARGET_LOSS:g} (fixed in advance)")
    score(runs, setup, held_out, base_loss)
    med = summarise(runs, peaks)
    plot(runs, work / "time-to-quality.png")
    (work / "bench-result.json").write_text(json.dumps({"peak_flops": peaks, "median": med, "runs": runs,
                                                       "heldout_base": base_loss, "target": TARGET_LOSS}, indent=2))
    print(f"plot: {work / 'time-to-quality.png'}")

    def fmt(value: float | None, spec: str) -> str:
        return "not_reached" if value is None else format(value, spec)

    print(f"ratio={med['ratio']:.2f} peer_ratio={med['peer_ratio']:.2f} ttq_ratio={fmt(med['ttq_ratio'], '.1f')} "
          f"peer_ttq_ratio={fmt(med['peer_ttq_ratio'], '.2f')} "
          f"a_examples_per_s={med['a_examples_per_s']:.3f} p_examples_per_s={med['p_examples_per_s']:.3f} "
          f"b_examples_per_s={med['b_examples_per_s']:.3f} heldout_a={med['heldout_a']:.4f} "
          f"heldout_p={med['heldout_p']:.4f} heldout_b={med['heldout_b']:.4f} "
          f"peak_fraction_b={med['peak_fraction_b']:.3f} heldout_base={base_loss:.4f} target={TARGET_LOSS:g}")


if __name__ == "__main__":
    main()
