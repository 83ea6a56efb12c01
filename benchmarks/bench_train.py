"""Training speed and quality: the seed recipe, reproduced faithfully, against `termtune train` at its defaults.

    .venv/bin/python benchmarks/bench_train.py             # the full comparison (~10 min on 2 cores)
    .venv/bin/python benchmarks/bench_train.py --rows 64   # a quick smoke run (not comparable)

Everything is identical except the recipe:
- data: 256 rows of ../shared/data/medquad_definitions.jsonl drawn with random.Random(0).sample, split by
  termtune's seeded split into 224 train / 32 held out (both recipes use those same rows);
- model: the flan-t5-small architecture cut to 2 encoder + 2 decoder layers, randomly initialised once with a
  fixed seed (both recipes load the same saved weights), fp32, CPU, the real Flan-T5 tokenizer;
- max lengths 128 input / 512 target; LoRA r 64, alpha 16, dropout 0.1, all-linear; one epoch.

(a) the seed recipe: inputs "What is " + term, `tokenizer(..., max_length, truncation=True, padding=True)` inside
    `datasets.map(batched=True)` (each 1000-row chunk padded to its longest row), labels = the padded target ids
    (pad not masked), per-device batch size 1, gradient accumulation 2, `TrainingArguments` defaults otherwise.
    Its SFTTrainer cannot train T5 (it fails on step 1), so it runs on Seq2SeqTrainer, which is what works.
(b) `termtune train` with the config's train section left at its defaults.

Each recipe runs in its own subprocess (clean peak RSS, read with os.wait4). Held-out loss is computed afterwards
by one function for both: mean cross-entropy over the non-pad target tokens of the 32 held-out rows, each recipe
with its own prompt. Useful FLOP/s = non-pad tokens x 6 x (weights each token passes through), over the training
loop's wall time, as a fraction of a 2048x2048 fp32 torch.mm measured in this run on all cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOKENIZER = SHARED / "models" / "flan-t5-large"
SMALL_CONFIG = SHARED / "models" / "flan-t5-small" / "config.json"
MEDQUAD = SHARED / "data" / "medquad_definitions.jsonl"
ARCH = {"num_layers": 2, "num_decoder_layers": 2}
MAX_SOURCE, MAX_TARGET = 128, 512


# ----------------------------------------------------------------------------- setup


def write_config(work: Path, rows: int, test_rows: int, b_overrides: list[str]) -> Path:
    """The termtune config for (b): everything the benchmark fixes, and nothing in `train:` (its defaults)."""
    import yaml

    config = {
        "run": {"dir": str(work / "termtune-run"), "seed": 42},
        "model": {"source": str(TOKENIZER), "init": "random", "architecture": str(SMALL_CONFIG),
                  "architecture_overrides": ARCH},
        "data": {"source": str(work / "rows.jsonl"), "test_size": test_rows,
                 "max_source_length": MAX_SOURCE, "max_target_length": MAX_TARGET},
        "lora": {"r": 64, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"},
    }
    for item in b_overrides:  # exploration only; the recorded run uses none
        key, _, value = item.partition("=")
        section, name = key.split(".", 1)
        config.setdefault(section, {})[name] = yaml.safe_load(value)
    path = work / "termtune.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def prepare(work: Path, n_rows: int, test_rows: int, b_overrides: list[str]) -> tuple[Path, dict]:
    """Sample the rows, run termtune's data stage (the shared split), build the random base once."""
    from termtune import pipeline
    from termtune.config import load_config
    from termtune.modeling import materialize_random_base

    rows = [json.loads(line) for line in MEDQUAD.read_text(encoding="utf-8").splitlines()]
    sample = random.Random(0).sample(rows, n_rows)
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sample), encoding="utf-8")
    config_path = write_config(work, n_rows, test_rows, b_overrides)
    cfg = load_config(config_path)
    pipeline.run_stage(cfg, "data", force=True)
    base = materialize_random_base(cfg)
    # The seed recipe trains on the raw rows of the same terms termtune put in each split.
    by_term = {r["term"]: r for r in sample}
    split = {}
    for name in ("train", "test"):
        terms = [json.loads(line)["term"] for line in (cfg.run_dir / "data" / f"{name}.jsonl").open()]
        split[name] = [{"page_title": t, "page_text": by_term[t]["definition"]} for t in terms]
    (work / "seed-split.json").write_text(json.dumps(split))
    return config_path, {"base": str(base), "train_rows": len(split["train"]), "test_rows": len(split["test"]),
                         "rows_used": len(split["train"]) + len(split["test"])}


# ----------------------------------------------------------------------------- (a) the seed recipe


def run_seed_recipe(work: Path, base: str) -> None:
    """The seed recipe, as it is written, in this process (called as a subprocess by main)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer,
                              Seq2SeqTrainingArguments)

    split = json.loads((work / "seed-split.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))

    def preprocess_function(sample, padding=True):
        inputs = ["What is " + item for item in sample["page_title"]]
        model_inputs = tokenizer(inputs, max_length=MAX_SOURCE, padding=padding, truncation=True)
        labels = tokenizer(text_target=sample["page_text"], max_length=MAX_TARGET, padding=padding, truncation=True)
        model_inputs["labels"] = labels["input_ids"]  # the pad ids stay in the labels: the loss trains on them
        return model_inputs

    train_ds = Dataset.from_list(split["train"]).map(preprocess_function, batched=True,
                                                      remove_columns=["page_title", "page_text"])
    model = AutoModelForSeq2SeqLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, target_modules="all-linear", lora_dropout=0.1,
                                             bias="none", task_type=TaskType.SEQ_2_SEQ_LM))
    args = Seq2SeqTrainingArguments(output_dir=str(work / "seed-run"), per_device_train_batch_size=1,
                                    gradient_accumulation_steps=2, num_train_epochs=1, use_cpu=True, report_to=[])
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train_ds,
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100,
                                                                  pad_to_multiple_of=8))
    out = trainer.train()
    model.save_pretrained(str(work / "seed-adapter"))

    pad = tokenizer.pad_token_id
    src_real = sum(sum(m) for m in train_ds["attention_mask"])
    src_slots = sum(len(m) for m in train_ds["attention_mask"])
    tgt_real = sum(sum(1 for t in labels if t != pad) for labels in train_ds["labels"])
    tgt_slots = sum(len(labels) for labels in train_ds["labels"])
    (work / "seed-result.json").write_text(json.dumps({
        "train_runtime": out.metrics["train_runtime"], "examples": len(train_ds), "steps": out.global_step,
        "src_real": src_real, "tgt_real": tgt_real, "padding_fraction": 1 - (src_real + tgt_real) / (src_slots + tgt_slots),
        "train_loss": out.training_loss}))


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


def matmul_peak() -> float:
    """fp32 FLOP/s of a 2048x2048 torch.mm on all cores (best of 10)."""
    from termtune.plan import measure_cpu_peak

    return measure_cpu_peak(repeats=10)


def weights_per_token(config_file: Path) -> tuple[int, int]:
    """Multiply-accumulates per non-pad (source, target) token in the linear layers, lm_head included."""
    c = json.loads(config_file.read_text())
    c.update(ARCH)
    d, inner, ff = c["d_model"], c["num_heads"] * c["d_kv"], c["d_ff"]
    ffn = (3 if c["feed_forward_proj"].startswith("gated") else 2) * d * ff
    per_source = c["num_layers"] * (4 * d * inner + ffn) + c["num_decoder_layers"] * 2 * d * inner  # + cross k, v
    per_target = c["num_decoder_layers"] * (4 * d * inner + 2 * d * inner + ffn) + d * c["vocab_size"]
    return per_source, per_target


def heldout_loss(base: str, adapter: Path, prompts: list[str], targets: list[str]) -> float:
    """Mean cross-entropy over the non-pad target tokens (pad masked), the same way for both recipes."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base), str(adapter)).eval()
    sources = tokenizer(prompts, max_length=MAX_SOURCE, truncation=True)["input_ids"]
    labels = tokenizer(text_target=targets, max_length=MAX_TARGET, truncation=True)["input_ids"]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(sources), 8):
            src, tgt = sources[i:i + 8], labels[i:i + 8]
            s_len, t_len = max(map(len, src)), max(map(len, tgt))
            input_ids = torch.tensor([x + [0] * (s_len - len(x)) for x in src])
            label_ids = torch.tensor([x + [-100] * (t_len - len(x)) for x in tgt])
            logits = model(input_ids=input_ids, attention_mask=(input_ids != 0).long(), labels=label_ids).logits
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), label_ids.flatten(),
                                                             ignore_index=-100, reduction="sum"))
            count += int((label_ids != -100).sum())
    return total / count


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--test-rows", type=int, default=32)
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a fresh temp folder)")
    parser.add_argument("--skip-seed", action="store_true", help="reuse (a)'s results from --work (exploration)")
    parser.add_argument("--b", action="append", default=[], help="override for (b), exploration only")
    parser.add_argument("--_seed", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts._seed:
        run_seed_recipe(opts.work, json.loads((opts.work / "setup.json").read_text())["base"])
        return

    import tempfile

    import torch
    import transformers

    work = opts.work or Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    if not opts.skip_seed:
        for stale in ("termtune-run", "seed-run", "seed-adapter"):
            subprocess.run(["rm", "-rf", str(work / stale)], check=True)
    else:
        subprocess.run(["rm", "-rf", str(work / "termtune-run" / "train")], check=True)
    config_path, setup = prepare(work, opts.rows, opts.test_rows, opts.b)
    (work / "setup.json").write_text(json.dumps(setup))
    peak = matmul_peak()

    if opts.skip_seed:
        a_wall, a_rss = json.loads((work / "seed-process.json").read_text())
    else:
        a_wall, a_rss = run_child([sys.executable, __file__, "--_seed", "--work", str(work)], work / "seed.log")
        (work / "seed-process.json").write_text(json.dumps([a_wall, a_rss]))
    b_wall, b_rss = run_child([sys.executable, "-m", "termtune.cli", "train", str(config_path)], work / "termtune.log")
    peak = max(peak, matmul_peak())

    seed = json.loads((work / "seed-result.json").read_text())
    run_dir = work / "termtune-run"
    result = json.loads((run_dir / "train" / "result.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    b_runtime = next(m["train_runtime"] for m in metrics if "train_runtime" in m)
    train_rows = [json.loads(line) for line in (run_dir / "data" / "train.jsonl").open()]
    b_src = sum(len(r["input_ids"]) for r in train_rows)
    b_tgt = sum(len(r["labels"]) for r in train_rows)

    split = json.loads((work / "seed-split.json").read_text())
    terms = [r["page_title"] for r in split["test"]]
    definitions = [r["page_text"] for r in split["test"]]
    template = json.loads((run_dir / "provenance" / "train.json").read_text())["config"]["data"]["prompt_template"]
    heldout_a = heldout_loss(setup["base"], work / "seed-adapter", ["What is " + t for t in terms], definitions)
    heldout_b = heldout_loss(setup["base"], run_dir / "train" / "adapter", [template.format(term=t) for t in terms],
                             definitions)

    per_src, per_tgt = weights_per_token(SMALL_CONFIG)
    rows = {}
    for name, runtime, examples, src, tgt, pad, wall, rss, heldout in (
        ("a seed recipe", seed["train_runtime"], seed["examples"], seed["src_real"], seed["tgt_real"],
         seed["padding_fraction"], a_wall, a_rss, heldout_a),
        ("b termtune", b_runtime, len(train_rows), b_src, b_tgt, result["padding_fraction"], b_wall, b_rss,
         heldout_b),
    ):
        useful = 6 * (per_src * src + per_tgt * tgt) / runtime
        rows[name] = {"examples_per_s": examples / runtime, "target_tokens_per_s": tgt / runtime,
                      "padding_fraction": pad, "peak_rss_mib": rss / 2**20, "heldout_loss": heldout,
                      "useful_gflops": useful / 1e9, "peak_fraction": useful / peak, "train_loop_s": runtime,
                      "process_wall_s": wall}

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; fp32 torch.mm 2048^2 peak {peak / 1e9:.1f} GFLOP/s")
    print(f"data: {setup['train_rows']} train / {setup['test_rows']} held-out rows; work folder {work}")
    print(f"{'':16}{'examples/s':>11}{'tgt tok/s':>11}{'padding':>9}{'peak RSS':>10}{'held-out':>10}"
          f"{'GFLOP/s':>9}{'of peak':>9}{'loop s':>8}{'wall s':>8}")
    for name, r in rows.items():
        print(f"{name:16}{r['examples_per_s']:>11.3f}{r['target_tokens_per_s']:>11.1f}{r['padding_fraction']:>9.1%}"
              f"{r['peak_rss_mib']:>8.0f}Mi{r['heldout_loss']:>10.4f}{r['useful_gflops']:>9.1f}"
              f"{r['peak_fraction']:>9.1%}{r['train_loop_s']:>8.1f}{r['process_wall_s']:>8.1f}")
    a, b = rows["a seed recipe"], rows["b termtune"]
    ratio = b["examples_per_s"] / a["examples_per_s"]
    (work / "bench-result.json").write_text(json.dumps({"peak_flops": peak, "ratio": ratio, **rows}, indent=2))
    print(f"ratio={ratio:.2f} a_examples_per_s={a['examples_per_s']:.3f} b_examples_per_s={b['examples_per_s']:.3f} "
          f"heldout_a={a['heldout_loss']:.4f} heldout_b={b['heldout_loss']:.4f} peak_fraction_b={b['peak_fraction']:.3f}")


if __name__ == "__main__":
    main()
