"""Decoder training speed and time to quality on SmolLM2-135M-Instruct: the AWS sample recipe, TRL's SFTTrainer as
its documentation recommends, and `termtune train`.

    .venv/bin/python benchmarks/bench_train_causal.py              # three runs of the three recipes, order rotated
    .venv/bin/python benchmarks/bench_train_causal.py --runs 1     # one run (estimated ~5 min on 2 quiet cores;
                                                                   #   20 min at load average 4)
    .venv/bin/python benchmarks/bench_train_causal.py --sides b --runs 1 --b train.precision=bf16   # exploration
    .venv/bin/python benchmarks/bench_train_causal.py --rows 256 --runs 1  # bench_train.py's 256 rows (~3x longer)

Everything is identical except the recipe (structure, clock and time-to-target rule: benchmarks/bench_train.py):
- model: SmolLM2-135M-Instruct, real weights, from models/SmolLM2-135M-Instruct.Q4_1.gguf converted once by
  termtune (termtune.gguf, export.dtype bf16 into termtune's cache); all three recipes load that same folder;
- data: 100 rows of ../shared/data/medquad_definitions.jsonl drawn as bench_train.py draws its 256
  (random.Random(0).sample; 100 keeps one run of the three recipes to minutes: 68 train rows), prepared and split by
  termtune's data stage (duplicate terms dropped, seeded split, 32 held out); every recipe
  trains on the same training rows' prompt ("What is {term}?", termtune's default template) and answer, the
  definition's first sentence (data.target first_n_sentences, n 1, max_target_length 64: the answer
  configs/demo.yaml trains; full definitions are ~5x the tokens and would not fit one run in minutes);
- one epoch each, on this CPU, every core.

(a) the AWS sample recipe for Llama 3 fine-tuning before a Bedrock import, as written: aws-samples/
    amazon-bedrock-samples, custom-models/import_models/llama-3/llama3-sft-fine-tuning (its run_fsdp_qlora.py, after
    "Fine-tune Llama 3 with PyTorch FSDP and Q-Lora on Amazon SageMaker"; requirements trl 0.8.6, transformers
    4.40.2). Its "Anthropic/Vicuna like" chat template set on the tokenizer with pad = eos, its system message
    prepended to every conversation, the text rendered with it; SFTTrainer(packing=True, max_seq_length=3072 (the
    hyperparameter `max_seq_len`, which argparse takes as the abbreviation of --max_seq_length),
    dataset_kwargs add_special_tokens=False, append_concat_token=False): trl 0.8.6 packs with its
    ConstantLengthDataset, i.e. every text's tokens concatenated, cut into 3072-token sequences, the last partial
    one dropped, the sequences shuffled, and trains them with DataCollatorForLanguageModeling(mlm=False): full-length
    3072-token rows (no padding: every row is exactly max length), attention across the rows packed in a sequence,
    loss on every token (system message, prompt and answer alike) except the eos tokens, whose labels that collator
    sets to -100 because pad = eos. LoRA r 16, alpha 8, dropout 0.05, all-linear; batch 1, gradient accumulation 4,
    learning rate 2e-4 constant (its warmup_ratio 0.03 is ignored by the constant schedule, as in the recipe),
    max_grad_norm 0.3, adamw_torch, gradient checkpointing (use_reentrant True), one epoch, seed 42, bf16.
    The trl 0.8.6 API is gone from TRL 1.16, so its packing is rebuilt here and the recipe runs on transformers'
    Trainer, which is what trl 0.8.6's SFTTrainer trains a packed dataset with. Deviations on this CPU:
    - no 4-bit NF4 base (use_qlora True): in its favour (bitsandbytes on a CPU dequantises on every pass); the base
      loads in bf16 weights as the recipe's torch_dtype=bf16 storage dtype has it, when this CPU has fast bf16
      (below), else in fp32 with bf16=False (against it only where bf16 would be slow);
    - no FSDP (one process, nothing to shard): neutral to slightly in its favour (no communication);
    - sdpa attention instead of flash_attention_2 (not on a CPU): neutral for what it computes (flash-attention 2
      without position ids attends across the packed rows too), the speed of the CPU kernel is what it is;
    - tf32 dropped (a GPU setting; transformers refuses it on a CPU): neutral;
    - its per-epoch evaluation on the test split and the merge after training left out: outside the clock anyway.
(p) TRL's SFTTrainer as its documentation recommends for speed and quality: a conversational prompt/completion
    dataset (completion-only loss, TRL's default for such data), packing=True (BFD, which turns on padding-free
    batches: one flattened row per batch, position ids reset per packed row, no attention mask, so rows do not see
    each other), max_length 1024 (the pack length, TRL's default), its defaults otherwise (gradient checkpointing
    on, linear schedule, fused AdamW), except: termtune's learning rate, batch size and seed (1e-3, 4, 42); one
    epoch (the Trainer's default is 3; every recipe here trains one); termtune's LoRA defaults (r 64, alpha 16,
    dropout 0.1, all-linear: TRL has no LoRA default); and precision: TRL defaults to bf16=True. It is kept where
    this CPU has fast bf16 -- a bf16 2048^2 torch.mm at least 4x the fp32 one, as with AMX; an expert keeps a fast
    default -- and set to bf16=False otherwise (bf16 autocast on a CPU without AMX gained +6-9 % for +50-65 %
    memory in BENCHMARKS.md, "Speed levers"). The precision each recipe ran in is printed in the table.
(b) `termtune train` (through termtune's Python API) with the config's train and lora sections left at their
    defaults: batch 4 grouped by length, dynamic padding, loss on the answer only, lr 1e-3 linear, precision auto
    (fp32 on a CPU), a checkpoint every 50 steps, the held-out loss after the epoch (off the clock).

Each recipe runs in its own subprocess (peak RSS from os.wait4) with bench_train.py's clock callback: from the start of
the training loop, evaluations inside it excluded, saves included; the adapter is saved every SNAPSHOT_EVERY examples
(a packed step counts as its share of the epoch; the few big steps of (a) and (p) are each a snapshot). Afterwards one
function scores the untrained base and every snapshot: the mean cross-entropy over the answer tokens of the held-out
rows -- each row rendered with the chat template the model carries (the one its recipe trained with and its saved
tokenizer holds: (a)'s Vicuna-like template with its system message, SmolLM2's own for (p) and (b)), the answer = the
tokens after the generation prompt up to and including the end-of-turn token -- in right-padded batches with an
attention mask, never packed. Time to quality (MLPerf style) is the clock at which that loss first reaches
TARGET_LOSS, fixed below in advance, read off the line between the snapshots that bracket it (the run's start counts
as a point at the base's loss under the recipe's template), or "not reached" with the final loss.

Examples/s = training rows / clock ((a): the rows that begin inside its kept 3072-token sequences); tokens/s = the
non-pad tokens the model trained on (forward and backward) / clock; loss tok/s = the tokens with a label.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench_train import MEDQUAD, REPO, add_clock, matmul_peaks, run_rotated, spread, time_to_target, train_with_clock

GGUF = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = {"target": "first_n_sentences", "n_sentences": 1, "max_target_length": 64}
SNAPSHOT_EVERY = 32
"""Examples between held-out scores (8 steps of (b)); (a) and (p) take more rows per step, so every step."""
SIDES = {"a": "a AWS sample", "p": "p TRL SFTTrainer", "b": "b termtune"}
FAST_BF16 = 4.0
"""bf16 torch.mm over fp32 torch.mm at which this CPU has fast bf16 (AMX: ~7x; AVX512-BF16 alone: ~2x)."""
TARGET_LOSS = 2.0
"""Held-out answer loss target, fixed before any recipe was timed, from one smoke run of the untrained base on these
32 held-out answers (2026-12-04): 2.50 nats per answer token with SmolLM2's own template (0.24, the standard error of
its mean over the rows), 2.30 with (a)'s. The target is 20 % below the base: every answer token 1.65x as probable as
the pretrained model finds it, a margin of more than twice that standard error, so the luck of which rows are held out
does not reach it, and a pretrained instruct model's answer loss does not fall that far from a change of wording or
template (the two templates differ by 0.2); only learning how MedQuAD words its definitions closes it. The base's
loss is printed beside the target in every run."""

AWS = {"max_seq_length": 3072, "batch_size": 1, "gradient_accumulation_steps": 4, "learning_rate": 2e-4,
       "lr_scheduler_type": "constant", "warmup_ratio": 0.03, "max_grad_norm": 0.3, "optim": "adamw_torch",
       "lora": {"r": 16, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": "all-linear"}}
AWS_SYSTEM = ("You are Llama, an AI assistant to be helpful and honest. Your knowledge spans a wide range of topics, "
              "allowing you to engage in substantive conversations and provide analysis on complex subjects.")
# the recipe's LLAMA_3_CHAT_TEMPLATE, its "Anthropic/Vicuna like template without the need for special tokens"
AWS_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '\n\nHuman: ' + message['content'] +  eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '\n\nAssistant: '  + message['content'] +  eos_token  }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant: ' }}{% endif %}")


# ----------------------------------------------------------------------------- setup


def prepare(work: Path, n_rows: int, test_rows: int, b_overrides: list[str]) -> dict:
    """Sample the rows, run termtune's data stage (the shared split), convert the GGUF base once."""
    import yaml

    from termtune import pipeline
    from termtune.config import load_config
    from termtune.gguf import model_source

    rows = [json.loads(line) for line in MEDQUAD.read_text(encoding="utf-8").splitlines()]
    sample = random.Random(0).sample(rows, n_rows)  # drawn as bench_train.py draws
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sample), encoding="utf-8")
    config: dict[str, Any] = {"run": {"dir": str(work / "termtune-run"), "seed": 42}, "model": {"source": str(GGUF)},
                              "data": {"source": str(work / "rows.jsonl"), "test_size": test_rows, **DATA}}
    for item in b_overrides:  # exploration only; the recorded runs use none
        key, _, value = item.partition("=")
        section, name = key.split(".", 1)
        config.setdefault(section, {})[name] = yaml.safe_load(value)
    config_path = work / "termtune.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cfg = load_config(config_path)
    pipeline.run_stage(cfg, "data", force=True)
    split = {name: [{k: r[k] for k in ("prompt", "target")} for r in map(json.loads, path.open())]
             for name, path in ((n, cfg.run_dir / "data" / f"{n}.jsonl") for n in ("train", "test"))}
    (work / "split.json").write_text(json.dumps(split))
    return {"base": model_source(cfg), "config": str(config_path), "train": {"learning_rate": cfg.train.learning_rate,
            "batch_size": cfg.train.batch_size, "seed": cfg.run.seed},
            "lora": {"r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
                     "target_modules": cfg.lora.target_modules},
            "train_rows": len(split["train"]), "test_rows": len(split["test"])}


def add_counter(trainer: Any, out: Path, n_examples: int, precision: str) -> None:
    """Count the tokens every micro-batch trains on; write <out>/tokens.json when training ends."""
    from transformers import TrainerCallback

    counts = {"tokens": 0, "slots": 0, "loss_tokens": 0}
    training_step = trainer.training_step

    def counted_step(model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")  # padding-free batches carry no mask
        counts["tokens"] += int(mask.sum()) if mask is not None else ids.numel()
        counts["slots"] += ids.numel()
        counts["loss_tokens"] += int((inputs["labels"] != -100).sum())
        return training_step(model, inputs, *args, **kwargs)

    trainer.training_step = counted_step

    class WriteCounts(TrainerCallback):
        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            (out / "tokens.json").write_text(json.dumps({
                **counts, "trained_rows": n_examples, "precision": precision,
                "padding_fraction": 1 - counts["tokens"] / counts["slots"]}))

    trainer.add_callback(WriteCounts())


# ----------------------------------------------------------------------------- (a) the AWS sample recipe


def aws_messages(row: dict) -> list[dict[str, str]]:
    """The recipe's conversation: its system message, then the user's question and the answer."""
    return [{"role": "system", "content": AWS_SYSTEM}, {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["target"]}]


def constant_length_chunks(ids: list[list[int]], seq_length: int, seed: int) -> tuple[list[list[int]], int]:
    """trl 0.8.6's ConstantLengthDataset as the recipe runs it (append_concat_token=False; all texts fit its buffer):
    the rows' tokens concatenated, cut into seq_length pieces, the last partial piece dropped, the pieces shuffled;
    and how many rows begin inside the kept pieces."""
    stream: list[int] = []
    starts = []
    for row in ids:
        starts.append(len(stream))
        stream += row
    kept = len(stream) // seq_length * seq_length
    if not kept:
        sys.exit(f"(a): {len(stream)} tokens do not fill one {seq_length}-token sequence; use more --rows")
    chunks = [stream[i:i + seq_length] for i in range(0, kept, seq_length)]
    random.Random(seed).shuffle(chunks)
    return chunks, sum(1 for s in starts if s < kept)


def run_aws(work: Path, out: Path, setup: dict) -> None:
    """The AWS sample recipe, as written (deviations: the module docstring), in this process."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments)

    split = json.loads((work / "split.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(setup["base"], use_fast=True)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = AWS_TEMPLATE
    texts = [tokenizer.apply_chat_template(aws_messages(r), tokenize=False) for r in split["train"]]
    chunks, rows = constant_length_chunks(tokenizer(texts, add_special_tokens=False)["input_ids"],
                                          AWS["max_seq_length"], seed=42)
    bf16 = setup["fast_bf16"]
    model = AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 use_cache=False)  # use_cache False: the recipe's, for checkpointing
    model.enable_input_require_grads()  # what trl 0.8.6 does for reentrant checkpointing under PEFT
    model = get_peft_model(model, LoraConfig(**AWS["lora"], bias="none", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out / "trainer"), num_train_epochs=1, per_device_train_batch_size=AWS["batch_size"],
        gradient_accumulation_steps=AWS["gradient_accumulation_steps"], gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True}, optim=AWS["optim"], logging_steps=10,
        save_strategy="epoch", learning_rate=AWS["learning_rate"], bf16=bf16, max_grad_norm=AWS["max_grad_norm"],
        warmup_steps=AWS["warmup_ratio"],  # transformers 5's spelling of warmup_ratio (a float below 1: a share)
        lr_scheduler_type=AWS["lr_scheduler_type"], seed=42, use_cpu=True,
        report_to=[])
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list([{"input_ids": c} for c in chunks]),
                      data_collator=DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False))
    add_clock(trainer, out, examples_per_step=None, n_examples=rows, every=SNAPSHOT_EVERY)
    add_counter(trainer, out, rows, "bf16" if bf16 else "fp32")
    trainer.train()


# ----------------------------------------------------------------------------- (p) TRL's SFTTrainer


def run_trl(work: Path, out: Path, setup: dict) -> None:
    """TRL's SFTTrainer as its documentation recommends (settings: the module docstring), in this process."""
    import torch
    import yaml
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    split = json.loads((work / "split.json").read_text())
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["target"]}]} for r in split["train"]]
    overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in setup["p_overrides"])}
    args = SFTConfig(output_dir=str(out / "trainer"), packing=True, num_train_epochs=1,
                     learning_rate=setup["train"]["learning_rate"],
                     per_device_train_batch_size=setup["train"]["batch_size"], seed=setup["train"]["seed"],
                     bf16=setup["fast_bf16"], use_cpu=True, report_to=[], **overrides)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.float32), args=args,
                         train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(setup["base"]),
                         peft_config=LoraConfig(**setup["lora"], bias="none", task_type="CAUSAL_LM"))
    add_clock(trainer, out, examples_per_step=None, n_examples=len(rows), every=SNAPSHOT_EVERY)
    add_counter(trainer, out, len(rows), "bf16" if args.bf16 else "fp32")
    trainer.train()


# ----------------------------------------------------------------------------- (b) termtune


def run_termtune(work: Path, out: Path, setup: dict) -> None:
    """`termtune train` through the Python API, the clock and the token counter added to its trainer."""
    from termtune.config import load_config
    from termtune.train import resolve_precision

    precision = resolve_precision(load_config(Path(setup["config"])))
    train_with_clock(Path(setup["config"]), out, every=SNAPSHOT_EVERY,
                     also=lambda trainer: add_counter(trainer, out, len(trainer.train_dataset), precision))


RECIPES = {"a": run_aws, "p": run_trl, "b": run_termtune}


# ----------------------------------------------------------------------------- scoring, the same for all


class AnswerLoss:
    """Mean cross-entropy over the answer tokens of the held-out rows, each rendered with a chat template; right-padded
    batches with an attention mask (never packed: sdpa would let packed rows see each other)."""

    def __init__(self, base: str, rows: list[dict]) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        self.tokenizer, self.rows = AutoTokenizer.from_pretrained(base), rows

    def encode(self, template: str | None, system: str | None) -> list[tuple[list[int], int, int]]:
        """(ids, answer start, answer end) per row, the whole conversation tokenized as it is trained: the answer is
        the tokens that cover the answer's text, up to and including the first eos after it (the end-of-turn token
        of both templates here). (a)'s generation prompt ends in a space, which the answer's first token absorbs:
        that token counts as the answer's."""
        encoded = []
        for row in self.rows:
            head = [{"role": "system", "content": system}] if system else []
            question = head + [{"role": "user", "content": row["prompt"]}]
            prompt = self.tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False,
                                                        chat_template=template)
            whole = self.tokenizer.apply_chat_template(question + [{"role": "assistant", "content": row["target"]}],
                                                       tokenize=False, chat_template=template)
            if not whole.startswith(prompt):
                sys.exit(f"the template renders the prompt differently with its answer: {row['prompt']!r}")
            tokens = self.tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
            ids = tokens["input_ids"]
            start = next(i for i, (_, end) in enumerate(tokens["offset_mapping"]) if end > len(prompt))
            encoded.append((ids, start, ids.index(self.tokenizer.eos_token_id, start) + 1))
        return encoded

    def per_row(self, adapter: str | None, template: str | None = None, system: str | None = None) -> list[float]:
        """Each held-out row's mean answer-token loss (adapter None: the untrained base's)."""
        import torch
        from peft import PeftModel

        encoded = self.encode(template, system)
        model = PeftModel.from_pretrained(self.base, adapter).eval() if adapter else self.base
        losses = []
        with torch.no_grad():
            for i in range(0, len(encoded), 8):
                batch = encoded[i:i + 8]
                width = max(len(ids) for ids, _, _ in batch)
                input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _, _ in batch])
                mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in batch])
                logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
                for row, (ids, start, end) in enumerate(batch):
                    # the logit at position t predicts token t + 1
                    losses.append(float(torch.nn.functional.cross_entropy(
                        logits[row, start - 1:end - 1], input_ids[row, start:end])))
        if adapter:
            self.base = model.unload()  # the bare base again, for the next adapter
        return losses


def rendering(side: str) -> dict[str, str | None]:
    """The chat template each recipe's model carries: (a) its own template and system message, else SmolLM2's."""
    return {"template": AWS_TEMPLATE, "system": AWS_SYSTEM} if side == "a" else {"template": None, "system": None}


def mean_loss(per_row: list[float], scorer: AnswerLoss, side: str) -> float:
    """Mean over the answer tokens (rows weighted by their answer length)."""
    lengths = [end - start for _, start, end in scorer.encode(**rendering(side))]
    return sum(loss * n for loss, n in zip(per_row, lengths)) / sum(lengths)


def score(runs: list[dict[str, dict]], scorer: AnswerLoss, base: dict[str, float]) -> None:
    """Held-out loss of every snapshot; each recipe's final loss (and per-row losses) and its time to TARGET_LOSS."""
    for run in runs:
        for side, r in run.items():
            for snap in r["snapshots"]:
                snap["per_row"] = scorer.per_row(snap["adapter"], **rendering(side))
                snap["heldout"] = mean_loss(snap["per_row"], scorer, side)
            r["heldout"], r["per_row"] = r["snapshots"][-1]["heldout"], r["snapshots"][-1]["per_row"]
            r["ttq_s"] = time_to_target([{"clock_s": 0.0, "heldout": base[side]}, *r["snapshots"]], TARGET_LOSS)


def summarise(runs: list[dict[str, dict]], sides: str) -> dict[str, float | None]:
    """Per-run table, the b - p held-out difference with its noise, min / median / max; returns the medians."""
    print(f"{'run recipe':22}{'precision':>10}{'examples/s':>11}{'tok/s':>8}{'loss tok/s':>11}{'padding':>9}"
          f"{'peak RSS':>10}{'held-out':>10}{'clock s':>9}{'to target':>13}{'wall s':>8}")
    for i, run in enumerate(runs, 1):
        for side in sides:
            r = run[side]
            r["examples_per_s"] = r["trained_rows"] / r["clock_s"]
            r["tokens_per_s"], r["loss_tokens_per_s"] = r["tokens"] / r["clock_s"], r["loss_tokens"] / r["clock_s"]
            ttq = f"{r['ttq_s']:.1f}s" if r.get("ttq_s") is not None else "not reached"
            print(f"{i} {SIDES[side]:20}{r['precision']:>10}{r['examples_per_s']:>11.3f}{r['tokens_per_s']:>8.0f}"
                  f"{r['loss_tokens_per_s']:>11.0f}{r['padding_fraction']:>9.1%}{r['peak_rss'] / 2**20:>8.0f}Mi"
                  f"{r['heldout']:>10.4f}{r['clock_s']:>9.1f}{ttq:>13}{r['process_wall_s']:>8.1f}")
        if "b" in run and "p" in run:
            diffs = [b - p for b, p in zip(run["b"]["per_row"], run["p"]["per_row"])]
            mean, noise = statistics.mean(diffs), 2 * statistics.stdev(diffs) / len(diffs) ** 0.5
            verdict = "equal within noise" if abs(mean) <= noise else "better" if mean < 0 else "worse"
            print(f"  run {i}: b - p held-out, per row: {mean:+.4f} +/- {noise:.4f} (2 standard "
                  f"errors over {len(diffs)} rows, paired): b is {verdict}")

    def ratio(top: str, bottom: str, key: str) -> list[float]:
        return [run[top][key] / run[bottom][key] for run in runs
                if top in run and bottom in run and run[top][key] is not None and run[bottom][key]]

    figures = {"ratio": ratio("b", "a", "examples_per_s"), "peer_ratio": ratio("b", "p", "examples_per_s"),
               "ttq_ratio": ratio("p", "b", "ttq_s"),
               **{f"{s}_examples_per_s": [run[s]["examples_per_s"] for run in runs] for s in sides},
               **{f"{s}_tokens_per_s": [run[s]["tokens_per_s"] for run in runs] for s in sides},
               **{f"heldout_{s}": [run[s]["heldout"] for run in runs] for s in sides},
               **{f"ttq_{s}_s": [run[s]["ttq_s"] for run in runs if run[s]["ttq_s"] is not None] for s in sides}}
    return spread(figures, len(runs))


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--test-rows", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="train the recipes this many times, order rotated")
    parser.add_argument("--sides", default="apb", help="which recipes to train (exploration; the ratios need all)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a fresh temp folder)")
    parser.add_argument("--b", action="append", default=[], help="section.key=value for (b), exploration only")
    parser.add_argument("--p", action="append", default=[], help="SFTConfig field=value for (p), exploration only")
    parser.add_argument("--_side", choices=sorted(RECIPES), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts._side:
        RECIPES[opts._side](opts.work, opts.work / opts._side, json.loads((opts.work / "setup.json").read_text()))
        return

    import torch
    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    work = opts.work or Path(tempfile.mkdtemp(prefix="bench-train-causal-"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    peaks = matmul_peaks()
    setup = {**prepare(work, opts.rows, opts.test_rows, opts.b), "p_overrides": opts.p,
             "fast_bf16": peaks["bf16"] >= FAST_BF16 * peaks["fp32"]}
    (work / "setup.json").write_text(json.dumps(setup))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}; load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f} at the start")
    print(f"torch.mm 2048^2: fp32 {peaks['fp32'] / 1e9:.1f}, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s: fast bf16 "
          f"{'yes' if setup['fast_bf16'] else 'no'} ((a) and (p) in {'bf16' if setup['fast_bf16'] else 'fp32'})")
    print(f"data: {setup['train_rows']} train / {setup['test_rows']} held-out rows; work folder {work}", flush=True)

    runs = run_rotated(work, setup, opts.sides, opts.runs, script=__file__)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end of training", flush=True)
    split = json.loads((work / "split.json").read_text())
    scorer = AnswerLoss(setup["base"], split["test"])
    base_rows = scorer.per_row(None)
    base = {side: mean_loss(scorer.per_row(None, **rendering(side)) if side == "a" else base_rows, scorer, side)
            for side in "apb"}
    print(f"held-out answer loss of the untrained base: {base['b']:.4f} with SmolLM2's "
          f"template (standard error over the rows {statistics.stdev(base_rows) / len(base_rows) ** 0.5:.4f})"
          f", {base['a']:.4f} with (a)'s; target {TARGET_LOSS:g} (fixed in advance)")
    score(runs, scorer, base)
    med = summarise(runs, opts.sides)
    (work / "bench-result.json").write_text(json.dumps({"median": med, "runs": runs, "heldout_base": base,
                                                       "target": TARGET_LOSS, "peak_flops": peaks}, indent=2))
    if set(opts.sides) != set(SIDES):
        return

    def fmt(value: float | None, spec: str) -> str:
        return "not_reached" if value is None else format(value, spec)

    print(f"ratio={med['ratio']:.2f} peer_ratio={med['peer_ratio']:.2f} ttq_ratio={fmt(med['ttq_ratio'], '.2f')} "
          f"a_examples_per_s={med['a_examples_per_s']:.3f} p_examples_per_s={med['p_examples_per_s']:.3f} "
          f"b_examples_per_s={med['b_examples_per_s']:.3f} heldout_base={base['b']:.4f} "
          f"heldout_a={med['heldout_a']:.4f} heldout_p={med['heldout_p']:.4f} heldout_b={med['heldout_b']:.4f} "
          f"target={TARGET_LOSS:g}")


if __name__ == "__main__":
    main()
