"""Shared test fixtures: a tiny Flan-T5-shaped model with the real tokenizer, on real MedQuAD rows."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOKENIZER_DIR = SHARED / "models" / "flan-t5-large"
MEDQUAD = SHARED / "data" / "medquad_definitions.jsonl"
SMALL_CONFIG = SHARED / "models" / "flan-t5-small" / "config.json"

# A 2+2-layer T5 with d_model 64: about 4 M parameters (mostly the 32k-token embeddings),
# trains at tens of steps per second on two CPU cores.
TINY_ARCH = {"num_layers": 2, "num_decoder_layers": 2, "d_model": 64, "d_ff": 128, "d_kv": 16,
             "num_heads": 4, "dropout_rate": 0.0}


def pytest_configure(config: pytest.Config) -> None:
    # Tests never reach the Hub; fail fast instead of waiting on DNS.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Test models are tiny: one thread per process avoids thread hand-off costing more than
    # the matmuls (and oversubscription when a test runs two training processes).
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def medquad_rows(n: int, seed: int = 0) -> list[dict]:
    """n real MedQuAD rows (term, definition), drawn reproducibly."""
    rows = [json.loads(line) for line in MEDQUAD.read_text(encoding="utf-8").splitlines()]
    rows = random.Random(seed).sample(rows, n)
    return [{"term": r["term"], "definition": r["definition"]} for r in rows]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def loss_and_grads(model, compute) -> tuple:
    """(the loss `compute()` returns, the gradients of `model`'s trainable parameters) after one backward pass."""
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def tiny_overrides(run_dir: Path, data_source: Path | str) -> list[str]:
    """Dotted overrides that turn the demo config into a seconds-long tiny run."""
    return [
        f"run.dir={run_dir}",
        f"model.source={TOKENIZER_DIR}",
        "model.init=random",
        f"model.architecture={SMALL_CONFIG}",
        f"model.architecture_overrides={json.dumps(TINY_ARCH)}",
        f"data.source={data_source}",
        "data.target=first_n_sentences",
        "data.n_sentences=1",
        "data.test_size=8",
        "data.max_target_length=64",
        "lora.r=8",
        "lora.alpha=16",
        "lora.dropout=0.0",
        "train.epochs=1",
        "train.batch_size=8",
        "train.learning_rate=0.005",
        "train.save_steps=5",
        "train.logging_steps=2",
        "eval.max_new_tokens=16",
        "eval.batch_size=8",
        "export.dtype=fp32",
    ]


@pytest.fixture
def tiny_cfg(tmp_path: Path):
    """Build a tiny Config: `tiny_cfg(n_rows=64, **{"train.epochs": 2})`."""
    from termtune.config import load_config

    def make(n_rows: int = 64, extra: dict | None = None, run_name: str = "run"):
        data = write_jsonl(tmp_path / f"terms-{n_rows}.jsonl", medquad_rows(n_rows))
        overrides = tiny_overrides(tmp_path / run_name, data)
        overrides += [f"{k}={v}" for k, v in (extra or {}).items()]
        return load_config(None, overrides)

    return make


@pytest.fixture
def prepared_cfg(tiny_cfg):
    """A tiny Config whose data stage has already run (64 rows: 56 train / 8 test)."""
    from termtune import pipeline

    cfg = tiny_cfg()
    pipeline.run_stage(cfg, "data")
    return cfg
