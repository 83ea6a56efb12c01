"""One training step (forward, backward, AdamW) of the training benchmark's model: standard loss vs chunked loss.

    .venv/bin/python benchmarks/bench_lm_loss.py [--reps 14]     # ~1 min on 2 cores

The flan-t5-small architecture cut to 2 + 2 layers (random init), LoRA r 64 / alpha 16 / dropout 0.1 on all
linear layers, one batch of 4 rows x 24 source tokens and 256 / 250 / 241 / 230 target tokens. First checks
that the chunked loss and its LoRA gradients equal the standard ones (dropout off), then times the variants
interleaved (so a change in machine load hits all alike) and prints best and median step times.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

CONFIG = Path(__file__).resolve().parents[2] / "shared" / "models" / "flan-t5-small"


def benchmark_base() -> torch.nn.Module:
    """The training benchmark's model: flan-t5-small's architecture cut to 2 + 2 layers, random init (seed 0)."""
    from transformers import T5Config, T5ForConditionalGeneration

    from termtune.families.t5 import untie_lm_head

    torch.manual_seed(0)
    config = T5Config.from_pretrained(str(CONFIG))
    config.num_layers = config.num_decoder_layers = 2
    base = T5ForConditionalGeneration(config)
    untie_lm_head(base)
    return base


def benchmark_lora() -> Any:
    """The training benchmark's LoRA: r 64, alpha 16, dropout 0.1 on all linear layers."""
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=64, lora_alpha=16, lora_dropout=0.1,
                      target_modules="all-linear")


def main() -> None:
    from peft import get_peft_model

    from termtune.lm_loss import chunked_lm_loss, supports_chunked_loss

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=14)
    opts = parser.parse_args()

    base = benchmark_base()
    model = get_peft_model(base, benchmark_lora())
    assert supports_chunked_loss(model)
    g = torch.Generator().manual_seed(1)
    target_lengths = [256, 250, 241, 230]
    input_ids = torch.randint(2, 32000, (4, 24), generator=g)
    labels = torch.randint(2, 32000, (4, max(target_lengths)), generator=g)
    for row, n in enumerate(target_lengths):
        labels[row, n:] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
             "decoder_input_ids": base._shift_right(labels)}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    variants = {"standard": lambda: model(**batch).loss}
    for chunk in (256, 512, 1024, 4096):
        variants[f"chunk {chunk}"] = lambda chunk=chunk: chunked_lm_loss(model, chunk_size=chunk, **batch)["loss"]

    model.eval()  # no dropout: both paths compute the same function
    results = {}
    for name, loss_fn in variants.items():
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        results[name] = (loss.detach(), [p.grad.clone() for p in params])
    ref_loss, ref_grads = results["standard"]
    for name, (loss, grads) in results.items():
        diff = max(float((a - b).abs().max()) for a, b in zip(grads, ref_grads))
        print(f"{name:11} loss {loss.item():.6f} (standard {ref_loss.item():.6f}), max LoRA grad diff {diff:.1e}")

    model.train()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(opts.reps + 2):
        for name, loss_fn in variants.items():
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            optimizer.step()
            if rep >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - start)
    best_standard = min(times["standard"])
    median_standard = sorted(times["standard"])[len(times["standard"]) // 2]
    for name, ts in times.items():
        ts.sort()
        print(f"{name:11} best {ts[0] * 1e3:6.1f} ms  median {ts[len(ts) // 2] * 1e3:6.1f} ms  "
              f"target tok/s {sum(target_lengths) / ts[0]:6.0f}  speedup best {best_standard / ts[0]:.2f}x  "
              f"median {median_standard / ts[len(ts) // 2]:.2f}x")


if __name__ == "__main__":
    main()
