#!/usr/bin/env bash
# GPU training speed: termtune in bf16 LoRA r64 and QLoRA 4-bit, and the best-practice peer recipe in bf16, on a
# random-init flan-t5-large with the real tokenizer and data; no network. benchmarks/bench_gpu.py says what is
# measured and how; its options (--steps, --batch-size, --peak-tflops, --json, ...) pass through.
#
#   bash benchmarks/gpu.sh --prepare      # here, once (pip download): the tokenizer, shapes, data and wheels
#                                         #   into .gpu-bench/ (ignored by git, 21 MiB; never torch)
#   bash benchmarks/gpu.sh                # on the GPU machine: estimated 4-6 min on one H200 (not run yet;
#                                         #   --budget-s caps each recipe's measured window)
#   bash benchmarks/gpu.sh --dry-run      # on CPU: a tiny shape, a few steps, fp32 (tests/test_bench_gpu.py)
#
# The device machine's image lacks datasets, pydantic, bitsandbytes and trl (and what they need), and ../shared does
# not travel: carry .gpu-bench. When an import is missing, this script installs the carried wheels offline into
# /tmp/termtune-gpu-site; the run reads .gpu-bench/shared. The device tool call, after --prepare:
#
#   run(command="set -o pipefail; bash benchmarks/gpu.sh --json $OUT/gpu-bench.json 2>&1 | tee $OUT/gpu.log",
#       carry=[".gpu-bench"], timeout_s=540)
#
# Decoder models (benchmarks/bench_gpu_causal.py: termtune and TRL's SFTTrainer on the SmolLM2-135M, Qwen2.5-0.5B and
# Llama-3.2-1B shapes with their real tokenizers; --prepare stages them too), estimated 5-7 min, its own call:
#
#   bash benchmarks/gpu.sh causal --dry-run      # on CPU: tiny shapes, a few steps, fp32
#   run(command="set -o pipefail; bash benchmarks/gpu.sh causal --json $OUT/gpu-causal.json 2>&1 \
#                | tee $OUT/gpu-causal.log",
#       carry=[".gpu-bench"], timeout_s=540)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false  # no network there; none needed here

wheels=$REPO/.gpu-bench/wheels
if [[ " $* " != *" --prepare "* ]] && [ -d "$wheels" ] \
        && ! "$PYTHON" -c "import datasets, pydantic, bitsandbytes, trl" 2>/dev/null; then
    site=/tmp/termtune-gpu-site
    "$PYTHON" -m pip install -q --no-index --find-links "$wheels" --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site:$PYTHONPATH"
fi
if [ "${1:-}" = causal ]; then
    shift
    exec "$PYTHON" "$REPO/benchmarks/bench_gpu_causal.py" "$@"
fi
if [[ " $* " == *" --prepare "* ]]; then
    "$PYTHON" "$REPO/benchmarks/bench_gpu.py" "$@"
    exec "$PYTHON" "$REPO/benchmarks/bench_gpu_causal.py" "$@"
fi
exec "$PYTHON" "$REPO/benchmarks/bench_gpu.py" "$@"
