"""Evaluation speed: the seed recipe's one-prompt-at-a-time `generate` loop vs termtune's batched evaluation.

    .venv/bin/python benchmarks/bench_evaluate.py [--prompts 64] [--max-new-tokens 64] [--batch-size 16]
                                                  [--threads N] [--runs 3]

Same 64 held-out prompts (a seeded sample of ../shared/data/medquad_definitions.jsonl, through
the default prompt template), same model (flan-t5-small's config cut to 2+2 layers, random
init with a fixed seed, untied lm_head), same greedy decoding and max_new_tokens.

A random-init model rarely emits end-of-sequence, and the batched loop would keep finished
rows in the batch anyway, so both sides are forced to generate exactly max_new_tokens per
prompt (min_new_tokens = max_new_tokens): equal work, and the tokens generated are printed.

- seed:     for each prompt: tokenizer(prompt) -> model.generate(input_ids, ...) -> decode
- termtune: termtune.evaluate.generate(model, tokenizer, all_prompt_ids, EvalConfig(...))
            (length-sorted batches of --batch-size, padded, inference_mode)

Each run times both sides, the order alternating from run to run. Beside every timing it prints the machine's
load: the 1-minute load average before and after, and the CPU share the side got (process CPU seconds / wall
seconds / torch threads: 1.0 means its threads never waited for a core). A ratio measured at a CPU share well
below 1 was measured on a busy machine and is not comparable with one from a quiet machine. Ends with the
min / median / max over the runs and one line `ratio=<median seed seconds / termtune seconds> ...`. Target: >= 4.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MEDQUAD = SHARED / "data" / "medquad_definitions.jsonl"
TOKENIZER = SHARED / "models" / "flan-t5-large"
SMALL_CONFIG = SHARED / "models" / "flan-t5-small" / "config.json"


def held_out_prompts(n: int, seed: int = 0) -> list[str]:
    from termtune.config import DataConfig

    rows = [json.loads(line) for line in MEDQUAD.read_text(encoding="utf-8").splitlines()]
    template = DataConfig().prompt_template
    return [template.format(term=r["term"]) for r in random.Random(seed).sample(rows, n)]


def build_model():
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from termtune.families.t5 import untie_lm_head

    values = json.loads(SMALL_CONFIG.read_text(encoding="utf-8"))
    values.update(num_layers=2, num_decoder_layers=2)
    values.pop("model_type", None)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**values))
    untie_lm_head(model)
    return model.eval()


def seed_loop(model, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[list[str], int]:
    """The seed recipe's evaluation: one prompt at a time (its decoding bugs fixed, so work is equal)."""
    import torch

    texts, tokens = [], 0
    with torch.no_grad():
        for prompt in prompts:
            input_ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = model.generate(input_ids=input_ids, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            tokens += out.shape[1] - 1
            texts.append(tokenizer.decode(out[0], skip_special_tokens=True).strip())
    return texts, tokens


def termtune_batched(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int):
    from termtune.config import DataConfig, EvalConfig
    from termtune.evaluate import generate

    # What the data stage stores per row: token ids truncated to max_source_length.
    ids = tokenizer(prompts, truncation=True, max_length=DataConfig().max_source_length)["input_ids"]
    outputs = generate(model, tokenizer, ids, EvalConfig(max_new_tokens=max_new_tokens, batch_size=batch_size),
                       min_new_tokens=max_new_tokens)
    return [g.text for g in outputs], sum(g.n_tokens + (not g.cut) for g in outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of both sides, order alternating")
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = held_out_prompts(args.prompts)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    model = build_model()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"model: flan-t5-small shape cut to 2+2 layers, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"parameters; {len(prompts)} prompts, greedy, exactly {args.max_new_tokens} new tokens each")

    seed_loop(model, tokenizer, prompts[:2], 4)  # warm-up: first-call allocations, lazy imports
    termtune_batched(model, tokenizer, prompts[:2], 4, args.batch_size)

    sides = {"seed": lambda: seed_loop(model, tokenizer, prompts, args.max_new_tokens),
             "termtune": lambda: termtune_batched(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)}
    ratios, texts = [], {}
    for run in range(1, args.runs + 1):
        seconds = {}
        for side in (["seed", "termtune"] if run % 2 else ["termtune", "seed"]):
            load, wall, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
            texts[side], tokens = sides[side]()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            seconds[side] = wall
            print(f"run {run} {side:9}{wall:8.2f} s  {tokens} tokens  {tokens / wall:7.1f} tok/s   "
                  f"load {load:.1f} -> {os.getloadavg()[0]:.1f}, CPU share {cpu / wall / torch.get_num_threads():.2f}",
                  flush=True)
        ratios.append(seconds["seed"] / seconds["termtune"])
        print(f"run {run} ratio {ratios[-1]:.2f}")

    same = sum(a == b for a, b in zip(texts["seed"], texts["termtune"]))
    print(f"identical outputs: {same}/{len(prompts)}")
    print(f"ratio over {len(ratios)} run(s): min {min(ratios):.2f}, median {statistics.median(ratios):.2f}, "
          f"max {max(ratios):.2f}")
    print(f"ratio={statistics.median(ratios):.2f} ratio_min={min(ratios):.2f} ratio_max={max(ratios):.2f} "
          f"runs={len(ratios)}")


if __name__ == "__main__":
    main()
