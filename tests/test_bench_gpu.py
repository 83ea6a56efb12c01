"""benchmarks/gpu.sh: the GPU benchmark's whole code path, run on CPU with --dry-run (a tiny shape, a few steps)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO, SHARED

spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "benchmarks" / "bench_gpu.py")
bench_gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_gpu)


def test_dry_run_measures_every_recipe(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", "--shared", str(SHARED), "--work",
                           str(tmp_path / "work"), "--json", str(tmp_path / "figures.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = dict(item.split("=", 1) for item in proc.stdout.strip().splitlines()[-1].split())
    sides = "bqp" if importlib.util.find_spec("bitsandbytes") else "bp"
    assert line["dry_run"] == "1"
    for side in sides:
        for key in ("examples_per_s", "target_tokens_per_s", "mfu", "peak_mem_gib"):
            assert float(line[f"{side}_{key}"]) > 0, (side, key, line)
        assert float(line[f"{side}_mfu"]) < 5, line  # a fraction of the peak (6N overstates LoRA's work by 1.5x)
    assert float(line["b_over_p"]) > 0 and float(line["measured_tflops"]) > 0

    dry = bench_gpu.DRY
    results = json.loads((tmp_path / "figures.json").read_text())["results"]
    assert sorted(results) == sorted(sides)
    for side, r in results.items():
        # the warm-up steps are off the clock; every measured step is a full batch of the 40 training rows
        assert r["steps"] == dry["steps"] - dry["warmup"], (side, r)
        assert r["examples"] == r["steps"] * dry["batch_size"], (side, r)
        assert 0 <= r["padding_fraction"] < 1 and r["tgt_real"] > r["examples"], (side, r)
        assert r["precision"].startswith("fp32") and r["peak_gpu_bytes"] is None, (side, r)
    if "q" in results:
        assert results["q"]["precision"] == "fp32, 4bit base"


def test_weights_per_token_counts_every_linear_weight_once():
    """A source and a target token together pass through each linear weight (lm_head included) once."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config_file = SHARED / bench_gpu.LARGE / "config.json"
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(config_file.parent))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    per_source, per_target = bench_gpu.weights_per_token(config_file, {})
    assert per_source + per_target == linear
    assert per_target > per_source  # the decoder's cross-attention and the lm_head


def test_slim_wheel_drops_files_and_their_record_lines(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/__init__.py", "")
        z.writestr("pkg/libpkg_cuda118.so", b"x" * 100)
        z.writestr("pkg/libpkg_cuda130.so", b"y")
        z.writestr("pkg-1.0.dist-info/RECORD", "pkg/__init__.py,,\npkg/libpkg_cuda118.so,sha256=a,100\n"
                                               "pkg/libpkg_cuda130.so,sha256=b,1\npkg-1.0.dist-info/RECORD,,\n")
    bench_gpu.slim_wheel(wheel, keep=lambda name: "cuda118" not in name)
    with zipfile.ZipFile(wheel) as z:
        assert sorted(z.namelist()) == ["pkg-1.0.dist-info/RECORD", "pkg/__init__.py", "pkg/libpkg_cuda130.so"]
        assert "cuda118" not in z.read("pkg-1.0.dist-info/RECORD").decode()
        assert z.read("pkg/libpkg_cuda130.so") == b"y"
