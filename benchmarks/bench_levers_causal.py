"""Speed levers for one CPU training step (forward, backward, AdamW) of a decoder: SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/bench_levers_causal.py [--reps 3] [--batches 4]    # ~10 min on 2 quiet cores

The model, data and batches of benchmarks/bench_train_causal.py's (b): SmolLM2-135M-Instruct (the GGUF converted
once by termtune), the same 68 MedQuAD training rows prepared by termtune's data stage, termtune's LoRA defaults (r 64,
alpha 16, dropout 0.1, all linear layers), batch 4 from termtune's length-grouped sampler, in fp32. Every variant
takes the same first `--batches` batches of the epoch (the costliest first, as termtune orders them), starts from
the same weights and trains with fused AdamW (the Trainer's default optimizer), one change each against termtune's
current default:
- termtune: packed batches (train.packing's default), termtune's chunked loss over the answer positions
  (termtune.lm_loss, a decoder's loss on a CPU), fp32, all cores;
- TRL's fused LM head as SFTTrainer runs it off a GPU (termtune's decoder loss before the chunked loss was measured
  here): log-probs, entropy and top-1 for its metrics, every position scored, prompts included;
- TRL's fused head scoring only the labelled positions, as it does on GPUs with Triton (its torch tiles otherwise);
- full logits: the model's own forward and transformers' loss (a batch x length x vocab logits tensor);
- padded: length-grouped batches padded to their longest row (train.packing=false);
- bf16 autocast; bf16 base weights + bf16 autocast (the frozen base stored in bf16, LoRA weights in fp32);
- 1 thread; gradient checkpointing (TRL's default); torch.compile of the decoder stack (inductor, dynamic shapes).

Timed interleaved (a change in machine load hits all alike) after one warm-up pass over the batches per variant,
timed separately (a compiled model pays its compilation there). Before timing, each variant's loss on the first
batch is printed beside the default's: a lever that changes what is computed shows it there (bf16 differs by
rounding; the loss variants agree to float precision). Prints best and median step time per variant and the
speed-up against termtune's current default, with the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


@contextlib.contextmanager
def answer_positions_only() -> Any:
    """TRL's fused head scores only the labelled positions where it would use Triton; make it do so here."""
    import trl.trainer.utils as trl_utils

    use_triton = trl_utils._use_triton
    trl_utils._use_triton = lambda device: True  # the fused forward's "compact" switch only
    try:
        yield
    finally:
        trl_utils._use_triton = use_triton


def main() -> None:
    from bench_levers import cpu_flags, time_interleaved  # this folder is on sys.path when run as a script
    from bench_train_causal import prepare

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="timed rounds over the batches")
    parser.add_argument("--batches", type=int, default=4, help="batches per round (the epoch's first)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants (and termtune)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a fresh temp folder)")
    opts = parser.parse_args()

    import transformers
    from trl.trainer.utils import add_fused_lm_head

    from termtune.config import load_config
    from termtune.data import load_split
    from termtune.families import family_for
    from termtune.lm_loss import chunked_lm_loss
    from termtune.modeling import attach_lora, load_base, load_tokenizer
    from termtune.train import LengthGroupedBatchSampler, make_collator
    from termtune.trainer_additions import LM_LOSS_CHUNK_ROWS

    transformers.logging.set_verbosity_error()
    work = opts.work or Path(tempfile.mkdtemp(prefix="bench-levers-causal-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    setup = prepare(work, 100, 32, [])
    cfg = load_config(Path(setup["config"]))
    tokenizer = load_tokenizer(cfg)
    train = load_split(cfg, "train").select_columns(["input_ids", "labels"])
    family = family_for(cfg)
    sampler = LengthGroupedBatchSampler(
        source_lengths=[len(x) for x in train["input_ids"]], target_lengths=[len(x) for x in train["labels"]],
        batch_size=cfg.train.batch_size, max_tokens=None, group_by_length=cfg.train.group_by_length,
        seed=cfg.run.seed, padded_tokens=family.padded_tokens)
    rows = [[train[i] for i in batch] for batch in list(sampler)[:opts.batches]]
    base = load_base(cfg)
    threads = torch.get_num_threads()
    flags = cpu_flags()
    print(f"cpu: {threads} threads; bf16 instructions: "
          f"{', '.join(sorted(f for f in flags if 'bf16' in f or 'amx' in f)) or 'none'}; "
          f"load average {load_start[0]:.2f} at the start")
    examples = sum(len(b) for b in rows)
    print(f"{len(rows)} batches of termtune's epoch order, {examples} examples, "
          f"{sum(len(r['input_ids']) + len(r['labels']) for b in rows for r in b)} tokens, "
          f"{sum(len(r['labels']) for b in rows for r in b)} answer tokens", flush=True)

    def variant(loss: str = "chunked", packed: bool = True, autocast: bool = False, bf16_base: bool = False,
                n_threads: int = threads, checkpointing: bool = False, compiled: bool = False) -> dict:
        torch.manual_seed(0)  # the same LoRA initialisation for every variant
        inner = copy.deepcopy(base)
        if bf16_base:
            inner.to(torch.bfloat16)
        add_fused_lm_head(inner, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
        if checkpointing:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = attach_lora(cfg, inner)
        model.train()
        if compiled:
            inner.model.compile(dynamic=True)
        collate = make_collator(tokenizer, model, packed=packed)
        batches = [collate(b) for b in rows]
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        forward: Callable[[dict], torch.Tensor] = {
            "chunked": lambda b: chunked_lm_loss(model, chunk_size=LM_LOSS_CHUNK_ROWS, **b)["loss"],
            "fused": lambda b: model(**b, fused_lm_head=True).loss,
            "fused-answers": lambda b: model(**b, fused_lm_head=True).loss,
            "logits": lambda b: model(**b, use_cache=False).loss,
        }[loss]

        def step(batch: dict) -> float:
            optimizer.zero_grad(set_to_none=True)
            precision = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            scope = answer_positions_only() if loss == "fused-answers" else contextlib.nullcontext()
            with precision, scope:
                value = forward(batch)
            value.backward()
            optimizer.step()
            return float(value.detach())

        return {"step": step, "batches": batches, "threads": n_threads}

    variants = {
        "termtune (packed, chunked loss, fp32)": variant(),
        "TRL fused head, every position": variant(loss="fused"),
        "TRL fused head, answer positions": variant(loss="fused-answers"),
        "full logits": variant(loss="logits"),
        "padded (length-grouped)": variant(packed=False),
        "bf16 autocast": variant(autocast=True),
        "bf16 base + autocast": variant(autocast=True, bf16_base=True),
        "1 thread": variant(n_threads=1),
        "gradient checkpointing": variant(checkpointing=True),
        "torch.compile (inductor)": variant(compiled=True),
    }
    if opts.only is not None:
        variants = {k: v for i, (k, v) in enumerate(variants.items()) if i == 0 or any(o in k for o in opts.only)}

    warmup, first_loss, times = time_interleaved(variants, opts.reps)
    ref = next(iter(times))
    best_ref, median_ref = min(times[ref]), sorted(times[ref])[len(times[ref]) // 2]
    print(f"{'variant':40}{'step-1 loss':>12}{'warm-up s':>10}{'best ms':>9}{'median ms':>11}"
          f"{'speed-up best':>15}{'median':>8}{'ex/s best':>10}")
    result = {}
    for name, ts in times.items():
        ts.sort()
        best, median = ts[0] / len(rows), ts[len(ts) // 2] / len(rows)
        result[name] = {"first_loss": first_loss[name], "warmup_s": warmup[name], "best_s": ts[0],
                        "median_s": ts[len(ts) // 2], "speedup_best": best_ref / ts[0],
                        "speedup_median": median_ref / ts[len(ts) // 2]}
        print(f"{name:40}{first_loss[name]:>12.5f}{warmup[name]:>10.1f}{best * 1e3:>9.0f}{median * 1e3:>11.0f}"
              f"{best_ref / ts[0]:>14.2f}x{median_ref / ts[len(ts) // 2]:>7.2f}x{examples / ts[0]:>10.2f}")
    load_end = os.getloadavg()
    print(f"load average {load_end[0]:.2f} at the end")
    (work / "levers.json").write_text(json.dumps({"variants": result, "load": [load_start[0], load_end[0]]}, indent=2))


if __name__ == "__main__":
    main()
