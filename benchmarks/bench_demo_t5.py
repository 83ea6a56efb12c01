"""What the Flan-T5 demo's random-init model learns: configs/demo-t5.yaml trained on two seeds, scored, and probed for
prompt use.

    .venv/bin/python benchmarks/bench_demo_t5.py              # seeds 42 and 7 (~4 min on 2 quiet cores)
    .venv/bin/python benchmarks/bench_demo_t5.py --seeds 42

Each seed runs the demo as `make demo-t5` does (data, train, evaluate, export; no deploy) in a work folder, with
run.seed changed, which also changes the held-out split. Then, beside the figures the run records (held-out loss,
base and tuned ROUGE-L, training seconds), three probes of the exported (merged) model:
- prompt use: the exported model's held-out loss with each row's own prompt against the same targets under another
  row's prompt. Equal losses mean the answers do not depend on the term asked, only on the answer's words so far.
- term copied: the share of tuned answers that contain the first word of the asked term, beside the share of
  reference first sentences that do.
- the copying ceiling: ROUGE-L of the model's most common answer with the asked term written into it — what the
  same sentence would score if the model copied the term.
Baseline beside termtune: the base (random-init, untrained) model's ROUGE-L, from the same evaluate stage.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def run_demo(work: Path, seed: int) -> Path:
    from termtune import api

    run_dir = work / f"seed{seed}"
    cfg = api.load_config(REPO / "configs" / "demo-t5.yaml",
                          [f"run.dir={run_dir}", f"run.seed={seed}", "aws.deploy=false"])
    api.prepare_data(cfg)
    api.train(cfg)
    api.evaluate(cfg)
    api.export(cfg)
    return run_dir


def heldout_losses(run_dir: Path) -> tuple[float, float]:
    """Mean held-out loss per row: with each row's own prompt, and with the next row's prompt."""
    import torch
    from transformers import T5ForConditionalGeneration

    from termtune.quiet import quiet

    with quiet(run_dir / "library.log"):  # transformers' notices go to the run's log, as in the stages
        model = T5ForConditionalGeneration.from_pretrained(run_dir / "artifact", torch_dtype=torch.float32).eval()
    rows = [json.loads(line) for line in (run_dir / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()]

    def loss(prompt_row: dict, row: dict) -> float:
        with torch.no_grad():
            ids, labels = torch.tensor([prompt_row["input_ids"]]), torch.tensor([row["labels"]])
            return model(input_ids=ids, labels=labels).loss.item()

    own = sum(loss(row, row) for row in rows) / len(rows)
    other = sum(loss(rows[(i + 1) % len(rows)], row) for i, row in enumerate(rows)) / len(rows)
    return own, other


def copy_probes(run_dir: Path) -> dict[str, float]:
    from rouge_score import rouge_scorer

    predictions = [json.loads(line) for line in
                   (run_dir / "eval" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]

    def has_first_word(text: str, term: str) -> bool:
        return re.search(rf"\b{re.escape(term.split()[0])}\b", text, re.IGNORECASE) is not None

    n = len(predictions)
    common, count = collections.Counter(p["tuned"] for p in predictions).most_common(1)[0]
    # The words before " is " hold the term's slot ("A a is a rare condition …"); write the asked term there.
    tail = common.split(" is ", 1)[1] if " is " in common else common
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    ceiling = sum(scorer.score(p["reference"], f"{p['term']} is {tail}")["rougeL"].fmeasure for p in predictions) / n
    return {
        "term_in_answer": sum(has_first_word(p["tuned"], p["term"]) for p in predictions) / n,
        "term_in_reference": sum(has_first_word(p["reference"], p["term"]) for p in predictions) / n,
        "most_common_answer_share": count / n,
        "copying_ceiling_rougeL": ceiling,
        "most_common_answer": common,
    }


def measure(run_dir: Path, seed: int) -> dict:
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))
    trained = json.loads((run_dir / "train" / "result.json").read_text(encoding="utf-8"))
    own, other = heldout_losses(run_dir)
    return {"seed": seed, "train_seconds": trained["train_seconds"], "steps": trained["global_step"],
            "heldout_loss": trained["eval_loss"], "base_rougeL": metrics["base"]["rougeL"],
            "tuned_rougeL": metrics["tuned"]["rougeL"], "loss_own_prompt": own, "loss_other_prompt": other,
            **copy_probes(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        results = [measure(run_demo(Path(tmp), seed), seed) for seed in args.seeds]
    print("\n| seed | steps | train s | held-out loss (training) | exported: own prompt | another row's prompt "
          "| base ROUGE-L | tuned ROUGE-L "
          "| term in answer / reference | same answer | ROUGE-L if the term were copied |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['seed']} | {r['steps']} | {r['train_seconds']:.0f} | {r['heldout_loss']:.3f} "
              f"| {r['loss_own_prompt']:.3f} | {r['loss_other_prompt']:.3f} "
              f"| {r['base_rougeL']:.3f} | {r['tuned_rougeL']:.3f} "
              f"| {r['term_in_answer']:.0%} / {r['term_in_reference']:.0%} | {r['most_common_answer_share']:.0%} "
              f"| {r['copying_ceiling_rougeL']:.3f} |")
    for r in results:
        print(f"seed {r['seed']}: most common answer {r['most_common_answer']!r}")
    worst = min(results, key=lambda r: r["tuned_rougeL"])
    print(f"tuned_rougeL_min={worst['tuned_rougeL']:.3f} "
          f"heldout_loss_max={max(r['heldout_loss'] for r in results):.3f} "
          f"prompt_gap_max={max(r['loss_other_prompt'] - r['loss_own_prompt'] for r in results):.3f} "
          f"base_rougeL_max={max(r['base_rougeL'] for r in results):.3f}")


if __name__ == "__main__":
    main()
