"""`termtune plan` against measurement on this CPU: predicted vs measured peak RSS and training time.

    .venv/bin/python benchmarks/bench_plan.py                  # the three runs below (~10 min on 2 quiet cores)
    .venv/bin/python benchmarks/bench_plan.py --only demo      # one of: bench, demo, qlora

Runs, each planned after its data stage and then trained by `termtune train` in its own process:
- bench: the benchmark model of bench_train.py (flan-t5-small architecture cut to 2+2 layers, random init, fp32),
  256 MedQuAD rows sampled with random.Random(0) (224 train / 32 held out), max lengths 128 / 512, LoRA r 64,
  alpha 16, dropout 0.1, all-linear, the train section at its defaults (batch 4, one epoch);
- demo: configs/demo-t5.yaml (the Flan-T5 demo) as shipped (its run.dir moved to the work folder);
- qlora: the bench run with model.quantization=4bit (bitsandbytes NF4 on the CPU).

Measured: the train process's peak RSS (os.wait4's ru_maxrss) and the training loop's seconds as the train stage
records them (result.json's train_seconds: evaluation and checkpoint time excluded, as the plan excludes them).
Targets (issue 13): peak memory within +-25 %, time within +-35 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MEDQUAD = SHARED / "data" / "medquad_definitions.jsonl"


def bench_config(work: Path, name: str, quantization: str) -> Path:
    import yaml

    rows = [json.loads(line) for line in MEDQUAD.read_text(encoding="utf-8").splitlines()]
    sample = random.Random(0).sample(rows, 256)
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sample), encoding="utf-8")
    config = {
        "run": {"dir": str(work / name), "seed": 42},
        "model": {"source": str(SHARED / "models" / "flan-t5-large"), "init": "random",
                  "architecture": str(SHARED / "models" / "flan-t5-small" / "config.json"),
                  "architecture_overrides": {"num_layers": 2, "num_decoder_layers": 2},
                  "quantization": quantization},
        "data": {"source": str(data), "test_size": 32, "max_source_length": 128, "max_target_length": 512},
        "lora": {"r": 64, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def demo_config(work: Path) -> Path:
    import yaml

    config = yaml.safe_load((REPO / "configs" / "demo-t5.yaml").read_text())
    config["run"]["dir"] = str(work / "demo")
    for section, key in (("model", "source"), ("model", "architecture"), ("data", "source")):
        config[section][key] = str((REPO / config[section][key]).resolve())
    path = work / "demo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_train(config: Path, log: Path) -> int:
    """`termtune train CONFIG` in its own process; its peak RSS in bytes."""
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "termtune.cli", "train", str(config)], cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                               "HF_DATASETS_OFFLINE": "1",
                                                               "TOKENIZERS_PARALLELISM": "false"})
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"train failed; see {log}:\n{log.read_text()[-3000:]}")
    return usage.ru_maxrss * 1024


def one(name: str, config_path: Path, work: Path) -> dict:
    from termtune import pipeline, plan
    from termtune.config import load_config
    from termtune.modeling import materialize_random_base

    cfg = load_config(config_path)
    pipeline.run_stage(cfg, "data", force=True)  # with its provenance record, which the train stage checks
    materialize_random_base(cfg)  # built here, so the train process's peak is training's, not model building's
    load = os.getloadavg()[0]
    estimate = plan.plan(cfg)
    rss = run_train(config_path, work / f"{name}.log")
    result = json.loads((cfg.run_dir / "train" / "result.json").read_text())
    row = {"run": name, "load_before": load, "load_after": os.getloadavg()[0],
           "cpu_peak_gflops": estimate.cpu_peak_flops / 1e9, "steps": result["global_step"],
           "planned_steps": estimate.steps, "planned_peak_mib": estimate.memory["total"] / 2**20,
           "measured_peak_mib": rss / 2**20, "planned_s": estimate.cpu_seconds, "measured_s": result["train_seconds"],
           "memory_parts_mib": {k: round(v / 2**20, 1) for k, v in estimate.memory.items()}}
    row["peak_ratio"] = row["measured_peak_mib"] / row["planned_peak_mib"]
    row["time_ratio"] = row["measured_s"] / row["planned_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["bench", "demo", "qlora"], action="append")
    parser.add_argument("--work", type=Path, default=None)
    opts = parser.parse_args()
    import torch
    import transformers

    work = opts.work or Path(tempfile.mkdtemp(prefix="bench-plan-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = {"bench": lambda: bench_config(work, "bench", "none"), "demo": lambda: demo_config(work),
            "qlora": lambda: bench_config(work, "qlora", "4bit")}
    rows = []
    for name in opts.only or list(runs):
        started = time.perf_counter()
        rows.append(one(name, runs[name](), work))
        print(f"{name}: done in {time.perf_counter() - started:.0f} s", flush=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; work folder {work}")
    print(f"{'run':6}{'load':>10}{'peak GF/s':>10}{'steps':>8}{'plan MiB':>10}{'RSS MiB':>9}{'ratio':>7}"
          f"{'plan s':>8}{'meas s':>8}{'ratio':>7}")
    for r in rows:
        print(f"{r['run']:6}{r['load_before']:>5.1f}/{r['load_after']:<4.1f}{r['cpu_peak_gflops']:>10.0f}"
              f"{r['steps']:>8}{r['planned_peak_mib']:>10.0f}{r['measured_peak_mib']:>9.0f}{r['peak_ratio']:>7.2f}"
              f"{r['planned_s']:>8.1f}{r['measured_s']:>8.1f}{r['time_ratio']:>7.2f}")
        print(f"      plan parts (MiB): {r['memory_parts_mib']}")
    (work / "bench-plan.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
