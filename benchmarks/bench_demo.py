"""What `make demo` teaches SmolLM2-135M-Instruct: configs/demo.yaml on two seeds, tuned vs base on held-out terms.

    .venv/bin/python benchmarks/bench_demo.py                 # seeds 42 and 7, one run each
    .venv/bin/python benchmarks/bench_demo.py --seeds 42

Each seed runs the stages `make demo` runs before it deploys (data, train, evaluate, export, validate) in a work
folder, with run.seed changed, which also changes the held-out split. Baseline beside termtune: the base model
(SmolLM2-135M-Instruct as its GGUF holds it, dequantized, no fine-tuning), scored by the same evaluate stage on the
same held-out rows: greedy answers through the chat template against the reference first sentences (ROUGE-L), and
the held-out answer loss (mean cross-entropy per reference answer token, teacher forcing). Tuned beats base when its
ROUGE-L is higher and its answer loss lower, on both seeds.

Seconds are wall-clock per stage on this machine; the load average (1 min) before and after each seed is printed
beside them, because other work on a shared machine slows the stages down. As on a fresh machine's `make demo` (which
installs no .venv-bedrock), export and validate run without the check under transformers 4.51.3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

STAGES = ("data", "train", "evaluate", "export", "validate")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def run_seed(work: Path, seed: int) -> dict:
    from termtune import api

    run_dir = work / f"seed{seed}"
    cfg = api.load_config(REPO / "configs" / "demo.yaml", [f"run.dir={run_dir}", f"run.seed={seed}"])
    steps = {"data": api.prepare_data, "train": api.train, "evaluate": api.evaluate, "export": api.export,
             "validate": api.validate}
    load_before = os.getloadavg()[0]
    seconds = {}
    for stage in STAGES:
        start = time.monotonic()
        steps[stage](cfg)
        seconds[stage] = time.monotonic() - start
    load_after = os.getloadavg()[0]

    stats = json.loads((run_dir / "data" / "stats.json").read_text(encoding="utf-8"))
    trained = json.loads((run_dir / "train" / "result.json").read_text(encoding="utf-8"))
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))
    validation = json.loads((run_dir / "validation.json").read_text(encoding="utf-8"))
    return {"seed": seed, "train_rows": stats["train_rows"], "test_rows": stats["test_rows"], "scored": metrics["n"],
            "steps": trained["global_step"], "seconds": seconds, "load": (load_before, load_after),
            "base_rougeL": metrics["base"]["rougeL"], "tuned_rougeL": metrics["tuned"]["rougeL"],
            "base_loss": metrics["base"]["answer_loss"], "tuned_loss": metrics["tuned"]["answer_loss"],
            "validated": validation["ok"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    args = parser.parse_args()
    os.environ["TERMTUNE_BEDROCK_PYTHON"] = ""  # empty: no check under 4.51.3 (see above)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        results = [run_seed(Path(tmp), seed) for seed in args.seeds]
    print("\n| seed | rows train / held-out (scored) | steps | " + " | ".join(f"{s} s" for s in STAGES)
          + " | ROUGE-L base → tuned | answer loss base → tuned | load before / after | validated |")
    print("|---|---|---|" + "---|" * len(STAGES) + "---|---|---|---|")
    for r in results:
        print(f"| {r['seed']} | {r['train_rows']} / {r['test_rows']} ({r['scored']}) | {r['steps']} | "
              + " | ".join(f"{r['seconds'][s]:.0f}" for s in STAGES)
              + f" | {r['base_rougeL']:.3f} → {r['tuned_rougeL']:.3f}"
              f" | {r['base_loss']:.3f} → {r['tuned_loss']:.3f}"
              f" | {r['load'][0]:.2f} / {r['load'][1]:.2f} | {'yes' if r['validated'] else 'NO'} |")
    rouge_beats = all(r["tuned_rougeL"] > r["base_rougeL"] for r in results)
    loss_beats = all(r["tuned_loss"] < r["base_loss"] for r in results)
    print(f"\ntuned_beats_base_rougeL={rouge_beats} tuned_beats_base_answer_loss={loss_beats} "
          f"stages_seconds_max={max(sum(r['seconds'].values()) for r in results):.0f}")


if __name__ == "__main__":
    main()
