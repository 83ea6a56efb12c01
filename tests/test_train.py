"""The training stage on a tiny random Flan-T5-shaped model with the real tokenizer and real MedQuAD rows."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, loss_and_grads, medquad_rows, tiny_overrides, write_jsonl
from termtune import data, pipeline
from termtune.config import load_config
from termtune.errors import UserError
from termtune.layout import RunLayout
from termtune.local import free_port

train = importlib.import_module("termtune.train")  # the stage module; termtune.train is the API function

TERMTUNE = [sys.executable, "-m", "termtune.cli"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            **extra}


def _prepared(tmp_path: Path, extra: dict | None = None, n_rows: int = 64, run: str = "run") -> tuple[list[str], object]:
    """Overrides for a tiny run whose data stage has run, and its Config."""
    src = tmp_path / "terms.jsonl"
    if not src.exists():
        write_jsonl(src, medquad_rows(n_rows))
    overrides = tiny_overrides(tmp_path / run, src) + [f"{k}={v}" for k, v in (extra or {}).items()]
    cfg = load_config(None, overrides)
    pipeline.run_stage(cfg, "data")
    return overrides, cfg


def _metrics(cfg) -> list[dict]:
    return [json.loads(line) for line in (cfg.run_dir / "train" / "metrics.jsonl").read_text().splitlines()]


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ----------------------------------------------------------------------------- training works


def test_loss_falls_and_stage_outputs_are_complete(tmp_path):
    _, cfg = _prepared(tmp_path, {"train.epochs": 3, "train.logging_steps": 1})
    result = pipeline.run_stage(cfg, "train").result

    rows = _metrics(cfg)
    train_losses = [r["loss"] for r in rows if "loss" in r]
    eval_losses = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(eval_losses) == 3  # held-out loss once per epoch
    assert sum(train_losses[-3:]) < 0.9 * sum(train_losses[:3])
    assert eval_losses[0] > eval_losses[1] > eval_losses[2]
    assert result.eval_loss == eval_losses[-1]
    assert all(0 <= r["padding_fraction"] < 1 and r["target_tokens_per_s"] > 0 for r in rows if "loss" in r)

    out = cfg.run_dir / "train"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
                 "result.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert (cfg.run_dir / "provenance" / "train.json").is_file()
    assert len(list((out / "checkpoints").glob("checkpoint-*"))) <= cfg.train.save_total_limit
    assert "held-out loss" in result.summary()

    # The stage is complete: running it again with the same config skips it.
    stamp = (out / "result.json").stat().st_mtime_ns
    assert pipeline.run_stage(cfg, "train") is None
    assert (out / "result.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_trains_on_cpu(tmp_path, bits):
    _, cfg = _prepared(tmp_path, {"model.quantization": bits, "train.epochs": 2, "train.logging_steps": 1})
    from termtune.modeling import attach_lora, load_base

    model = attach_lora(cfg, load_base(cfg))
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("Linear4bit" if bits == "4bit" else "Linear8bitLt") in kinds

    result = train.train(cfg)
    losses = [r["loss"] for r in _metrics(cfg) if "loss" in r]
    assert result.quantization == bits
    assert losses[-1] < losses[0]
    assert (cfg.run_dir / "train" / "adapter" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------- batching and labels


def test_collator_pads_labels_with_minus_100_and_loss_ignores_padding(tmp_path):
    import torch

    _, cfg = _prepared(tmp_path)
    from termtune.modeling import load_base, load_tokenizer

    tokenizer, model = load_tokenizer(cfg), load_base(cfg)
    rows = data.load_split(cfg, "train")
    short = min(range(len(rows)), key=lambda i: len(rows[i]["labels"]))
    long = max(range(len(rows)), key=lambda i: len(rows[i]["labels"]))
    features = [{"input_ids": rows[i]["input_ids"], "labels": rows[i]["labels"]} for i in (short, long)]
    assert len(features[0]["labels"]) < len(features[1]["labels"])

    batch = train.make_collator(tokenizer, model)(features)
    labels = batch["labels"]
    n_short = len(features[0]["labels"])
    assert labels.shape[1] == len(features[1]["labels"])  # padded to the longest row, not to a fixed length
    assert (labels[0, n_short:] == -100).all()  # padding is -100 ...
    assert (labels[labels != -100] != tokenizer.pad_token_id).all()  # ... and no real label is the pad id
    assert labels[0, :n_short].tolist() == features[0]["labels"]
    assert batch["attention_mask"][0].sum() == len(features[0]["input_ids"])

    # The padded batch's loss is exactly the token-weighted mean of the two rows alone.
    model.eval()
    with torch.no_grad():
        both = model(**batch).loss
        alone = [model(**train.make_collator(tokenizer, model)([f])).loss for f in features]
    counts = [len(f["labels"]) for f in features]
    expected = (alone[0] * counts[0] + alone[1] * counts[1]) / sum(counts)
    assert torch.allclose(both, expected, atol=1e-5)


def test_chunked_loss_and_its_lora_gradients_equal_the_standard_loss(tmp_path):
    import torch
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from termtune.lm_loss import chunked_lm_loss, supports_chunked_loss
    from termtune.modeling import attach_lora, load_base, load_tokenizer
    from termtune.trainer_additions import trainer_class

    _, cfg = _prepared(tmp_path)
    tokenizer, model = load_tokenizer(cfg), attach_lora(cfg, load_base(cfg))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # both paths then compute the same function, in training mode
    model.train()
    assert supports_chunked_loss(model)  # the lm_head is a plain frozen Linear, not LoRA-wrapped
    rows = data.load_split(cfg, "train").select(range(6))
    batch = train.make_collator(tokenizer, model)([{"input_ids": r["input_ids"], "labels": r["labels"]}
                                                   for r in rows])
    assert (batch["labels"] == -100).any()  # ragged targets: padding positions to drop

    def assert_equal(got, expected):
        assert torch.allclose(got[0], expected[0], atol=1e-5), (got[0], expected[0])
        assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(got[1], expected[1]))

    standard = loss_and_grads(model, lambda: model(**batch).loss)
    for chunk in (5, 10_000):  # several chunks with a short last one; the whole batch in one
        chunked = loss_and_grads(model, lambda c=chunk: chunked_lm_loss(model, chunk_size=c, **batch)["loss"])
        assert_equal(chunked, standard)

    # Through termtune's Trainer, as training runs it, against transformers' own compute_loss
    # (same num_items_in_batch handling).
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    trainer = trainer_class(Seq2SeqTrainer)(model=model, args=args, batch_sampler=None)
    assert trainer.chunked_loss
    n = (batch["labels"] != -100).sum()
    assert_equal(loss_and_grads(model, lambda: trainer.compute_loss(model, dict(batch), num_items_in_batch=n)),
                 loss_and_grads(model, lambda: Seq2SeqTrainer.compute_loss(trainer, model, dict(batch),
                                                                    num_items_in_batch=n)))
    assert_equal(standard, loss_and_grads(model, lambda: trainer.compute_loss(model, dict(batch))))

    # Anything unusual about the lm_head (here: trainable) keeps the standard path.
    model.get_base_model().lm_head.weight.requires_grad_(True)
    assert not supports_chunked_loss(model)


def test_the_additions_attach_to_any_trainer_subclass_and_keep_its_compute_loss(tmp_path, monkeypatch):
    """A family may train on another Trainer subclass with its own compute_loss (as TRL's SFTTrainer has):
    termtune's sampler, accounting, sealed checkpoints and logs attach to it through public hooks only."""
    from transformers import Trainer, TrainingArguments

    from termtune.families.t5 import T5Family
    from termtune.trainer_additions import TrainerAdditions

    calls = []

    class OwnLoss(Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            calls.append((type(self), model.training))
            return super().compute_loss(model, inputs, *args, **kwargs)

    monkeypatch.setattr(T5Family, "trainer_classes", lambda self: (OwnLoss, TrainingArguments))
    # where termtune's chunked loss applies it replaces the subclass's loss in training steps; elsewhere the
    # subclass's compute_loss runs for every step
    monkeypatch.setattr(T5Family, "takes_chunked_loss", lambda self, base: False)
    _, cfg = _prepared(tmp_path, {"train.save_steps": 3})
    result = train.train(cfg)

    assert all(issubclass(t, OwnLoss) and issubclass(t, TrainerAdditions) for t, _ in calls)
    assert sum(training for _, training in calls) == result.global_step == 7
    rows = [r for r in _metrics(cfg) if "loss" in r]
    assert rows and all(r["target_tokens_per_s"] > 0 and 0 <= r["padding_fraction"] < 1 for r in rows)
    assert result.target_tokens_per_s > 0 and result.examples_per_s > 0 and result.global_step == 7
    checkpoints = sorted((cfg.run_dir / "train" / "checkpoints").iterdir())
    assert checkpoints and all(train.checkpoint_is_complete(c) for c in checkpoints)
    # No private Trainer method is overridden; every callback is a module-level class.
    assert [name for name in vars(TrainerAdditions) if name.startswith("_") and not name.startswith("__")] == []
    from termtune import trainer_additions

    callbacks = [c for c in vars(trainer_additions).values() if isinstance(c, type) and c.__module__ ==
                 trainer_additions.__name__]
    assert len(callbacks) >= 8 and all("." not in c.__qualname__ for c in callbacks)


def test_token_budget_batches_are_deterministic_per_epoch_and_cover_every_row():
    import random

    rng = random.Random(1)
    src = [rng.randint(5, 30) for _ in range(200)]
    tgt = [rng.randint(10, 300) for _ in range(200)]
    sampler = train.LengthGroupedBatchSampler(src, tgt, batch_size=8, max_tokens=2000, group_by_length=True, seed=3)
    epochs = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(200))
        assert all(sampler.cost(b) <= 2000 or len(b) == 1 for b in batches)
        epochs.append(batches)
    assert epochs[0] == epochs[2] and epochs[0] != epochs[1]
    # Grouping by length wastes far less than random batches of the same sizes would.
    pad = sum(sampler.cost(b) for b in epochs[0]) / sum(src[i] + tgt[i] for b in epochs[0] for i in b) - 1
    assert pad < 0.2

    fixed = train.LengthGroupedBatchSampler(src, tgt, batch_size=8, max_tokens=None, group_by_length=True, seed=3)
    assert len(fixed) == 25 and all(len(b) <= 8 for b in fixed)


# ----------------------------------------------------------------------------- precision


def test_fp16_is_refused_for_t5_with_the_reason(tmp_path):
    overrides, cfg = _prepared(tmp_path)
    out = subprocess.run([*TERMTUNE, "train", *overrides, "train.precision=fp16"], capture_output=True, text=True,
                         env=_env(), cwd=REPO, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "fp16" in out.stderr and "overflow" in out.stderr and "allow_fp16" in out.stderr

    # Also when a config object is changed after loading (the library path, not just the CLI).
    with pytest.raises(UserError, match="overflow"):
        cfg.train.precision = "fp16"
    assert cfg.train.precision == "auto"
    assert train.resolve_precision(cfg) == "fp32"  # no GPU here: fp32 (bf16 on a CPU is opt-in)


# ----------------------------------------------------------------------------- checkpoints and resume


def _fake_checkpoint(folder: Path, cfg, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


def test_only_complete_checkpoints_are_resumed(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    ckpts = tmp_path / "train" / "checkpoints"
    full = {n: b"x" * 10 for n in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors",
                                    "adapter_config.json", "rng_state.pth")}
    train.seal_checkpoint(_fake_checkpoint(ckpts / "checkpoint-10", cfg, full), cfg, world_size=1, data_sha256="d")
    # newer, but unsealed (killed while saving)
    _fake_checkpoint(ckpts / "checkpoint-20", cfg, full)
    # newer, sealed, then half deleted (killed while rotating)
    half = _fake_checkpoint(ckpts / "checkpoint-30", cfg, full)
    train.seal_checkpoint(half, cfg, world_size=1, data_sha256="d")
    (half / "optimizer.pt").unlink()
    # newer, sealed, but a file was cut short afterwards
    cut = _fake_checkpoint(ckpts / "checkpoint-40", cfg, full)
    train.seal_checkpoint(cut, cfg, world_size=1, data_sha256="d")
    (cut / "adapter_model.safetensors").write_bytes(b"x")
    # a temp folder from an interrupted write
    _fake_checkpoint(ckpts / ".checkpoint-50.partial-abc", cfg, full)

    assert train.last_complete_checkpoint(ckpts) == ckpts / "checkpoint-10"

    # Resuming with settings that change the trajectory is refused, naming what changed.
    changed = load_config(None, [f"run.dir={tmp_path}", "train.learning_rate=0.5"])
    with pytest.raises(UserError, match="train.learning_rate"):
        train._check_same_trajectory(changed, ckpts / "checkpoint-10")


def test_sigkill_mid_run_then_rerun_gives_the_same_adapter(tmp_path):
    # Two epochs with gradient accumulation and LoRA dropout: resuming must restore the data position
    # (mid-epoch 2), the optimizer, the scheduler and the RNG that drives dropout.
    extra = {"train.epochs": 2, "train.batch_size": 4, "train.gradient_accumulation_steps": 2,
             "train.save_steps": 2, "train.save_total_limit": 2, "lora.dropout": 0.1}
    # 32 rows: 24 train -> 6 batches -> 3 optimizer steps per epoch, 6 in all; checkpoints at 2, 4, 6.
    plain_args, plain_cfg = _prepared(tmp_path, extra, n_rows=32, run="uninterrupted")
    crash_args, crash_cfg = _prepared(tmp_path, extra, n_rows=32, run="crashed")

    done = subprocess.run([*TERMTUNE, "train", *plain_args], capture_output=True, text=True, env=_env(), cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    ckpts = crash_cfg.run_dir / "train" / "checkpoints"
    proc = subprocess.Popen([*TERMTUNE, "train", *crash_args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=_env(TERMTUNE_TEST_STEP_DELAY="0.5"), cwd=REPO)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            last = train.last_complete_checkpoint(ckpts)
            if last is not None and int(last.name.split("-")[1]) >= 4:  # step 4 of 6 is in epoch 2
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)  # land somewhere inside a later step
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (crash_cfg.run_dir / "train" / "result.json").exists()
    resume_point = train.last_complete_checkpoint(ckpts)
    # What a kill during a save leaves behind: a newer checkpoint folder that was never sealed.
    half = ckpts / "checkpoint-5"
    if not half.exists():
        half.mkdir()
        (half / "trainer_state.json").write_text('{"global_step": 5}')

    rerun = subprocess.run([*TERMTUNE, "train", *crash_args], capture_output=True, text=True, env=_env(), cwd=REPO,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    result = json.loads((crash_cfg.run_dir / "train" / "result.json").read_text())
    assert result["resumed_from"] == str(resume_point)
    assert result["global_step"] == 6
    a = _adapter(plain_cfg.run_dir / "train" / "adapter" / "adapter_model.safetensors")
    b = _adapter(crash_cfg.run_dir / "train" / "adapter" / "adapter_model.safetensors")
    assert _max_abs_diff(a, b) <= 1e-5
    steps = [r["step"] for r in _metrics(crash_cfg) if "loss" in r]
    assert steps == sorted(set(steps))  # the redone steps replaced, not duplicated, their log rows


def test_sigterm_seals_a_checkpoint_of_the_current_step_and_the_rerun_resumes_from_it(tmp_path):
    args, cfg = _prepared(tmp_path, {"train.epochs": 2})  # 7 steps per epoch, checkpoints every 5
    ckpts = cfg.run_dir / "train" / "checkpoints"
    proc = subprocess.Popen([*TERMTUNE, "train", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env(TERMTUNE_TEST_STEP_DELAY="0.5"), cwd=REPO)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and train.last_complete_checkpoint(ckpts) is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be stopped"
        time.sleep(0.2)  # inside step 6
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    stopped = train.last_complete_checkpoint(ckpts)
    assert proc.returncode == 2, err[-3000:]
    assert f"stopped by SIGTERM at step {stopped.name.split('-')[1]}; its checkpoint is sealed" in err
    assert int(stopped.name.split("-")[1]) > 5  # the step the signal came in, not the last save_steps multiple
    assert not (cfg.run_dir / "train" / "result.json").exists()

    rerun = subprocess.run([*TERMTUNE, "train", *args], capture_output=True, text=True, env=_env(), cwd=REPO,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads((cfg.run_dir / "train" / "result.json").read_text())
    assert result["resumed_from"] == str(stopped) and result["global_step"] == 14


def test_a_checkpoint_trained_on_other_data_is_never_resumed(tmp_path, capsys):
    # What a kill after the last checkpoint leaves: sealed checkpoints, and no adapter, result or record.
    overrides, cfg = _prepared(tmp_path, {"data.max_rows": 40, "train.save_steps": 2}, n_rows=64)
    pipeline.run_stage(cfg, "train")
    for leftover in ("train/adapter", "train/result.json", "provenance/train.json"):
        path = cfg.run_dir / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    ckpts = cfg.run_dir / "train" / "checkpoints"
    old = train.last_complete_checkpoint(ckpts)
    trained_terms = {json.loads(line)["term"] for line in (cfg.run_dir / "data" / "train.jsonl").open()}

    # More rows: the data stage runs again and splits anew; some of the new held-out terms were trained on before.
    changed = load_config(None, overrides + ["data.max_rows=64"])
    pipeline.run_stage(changed, "data")
    held_out = {json.loads(line)["term"] for line in (changed.run_dir / "data" / "test.jsonl").open()}
    assert held_out & trained_terms, "the new split should hold terms the old run trained on"
    capsys.readouterr()
    started = time.time()
    result = pipeline.run_stage(changed, "train").result

    assert f"train: {old.name} was trained on other data (data changed); starting fresh" in capsys.readouterr().out
    assert result.resumed_from is None
    # Every logged step, and every checkpoint left to resume from, belongs to the run on the new data.
    assert all(row["time"] >= started for row in _metrics(changed))
    data_sha256 = train.prepared_data_digest(RunLayout.of(changed))
    seals = [json.loads((p / train.SEAL_FILE).read_text()) for p in ckpts.iterdir()]
    assert seals and all(seal["data_sha256"] == data_sha256 for seal in seals)


def test_resume_needs_a_seal_that_names_the_same_data(tmp_path, capsys):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    ckpts = tmp_path / "train" / "checkpoints"
    full = {n: b"x" * 10 for n in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors",
                                    "rng_state.pth")}
    folder = _fake_checkpoint(ckpts / "checkpoint-10", cfg, full)
    train.seal_checkpoint(folder, cfg, world_size=1, data_sha256="this data")
    assert train._resume_point(cfg, ckpts, "this data", rank=0) == folder

    # A seal written before seals named their data: nothing proves it is this data.
    seal = json.loads((folder / train.SEAL_FILE).read_text())
    del seal["data_sha256"]
    (folder / train.SEAL_FILE).write_text(json.dumps(seal))
    assert train._resume_point(cfg, ckpts, "this data", rank=0) is None
    assert "checkpoint-10 was trained on other data (its seal does not say which); starting fresh" in \
        capsys.readouterr().out
    assert not folder.exists()  # or rotation would keep it as the newest checkpoint


# ----------------------------------------------------------------------------- scale-out


def test_ddp_two_processes_train_to_the_end_with_identical_adapters(tmp_path):
    overrides, cfg = _prepared(tmp_path, {"train.epochs": 2})
    dump = tmp_path / "ranks"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "termtune.cli", "train", *overrides],
        capture_output=True, text=True, env=_env(TERMTUNE_DEBUG_DUMP_DIR=str(dump), OMP_NUM_THREADS="1"),
        cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    result = json.loads((cfg.run_dir / "train" / "result.json").read_text())
    assert result["world_size"] == 2
    # 56 rows, batches of 8 -> 7 batches per epoch; two ranks take turns, so 4 steps per epoch.
    assert result["global_step"] == 8
    rank0, rank1 = _adapter(dump / "rank0.safetensors"), _adapter(dump / "rank1.safetensors")
    assert _max_abs_diff(rank0, rank1) == 0.0
    assert any(float(t.abs().max()) > 0 for k, t in rank0.items() if "lora_B" in k)  # it did train
    saved = _adapter(cfg.run_dir / "train" / "adapter" / "adapter_model.safetensors")
    assert len(saved) == len(rank0)


# ----------------------------------------------------------------------------- a diverged run is never recorded


def test_training_stops_at_the_first_non_finite_loss_and_records_nothing(tmp_path):
    # Adam moves every LoRA weight by ~lr at step 1, so lr=1e30 overflows the forward pass of step 2.
    _, cfg = _prepared(tmp_path, {"train.learning_rate": "1e30", "train.save_steps": 1})
    with pytest.raises(UserError, match=r"^training diverged: the loss became nan at step 2 of 7 "
                                        r"\(train.learning_rate 1e\+30\); nothing was recorded as trained\. "
                                        r"Train again with a lower train.learning_rate") as e:
        train.train(cfg)
    assert "\n" not in str(e.value)
    train_dir = cfg.run_dir / "train"
    assert not (train_dir / "result.json").exists() and not (train_dir / "adapter").exists()
    assert not (cfg.run_dir / "provenance" / "train.json").exists()
    # The checkpoint of the diverged step is never written; step 1's (finite loss) is.
    assert sorted(p.name for p in (train_dir / "checkpoints").iterdir()) == ["checkpoint-1"]


def test_lora_rank_beyond_the_layer_width_fails_before_any_data_is_read(tmp_path):
    src = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(16))
    cfg = load_config(None, tiny_overrides(tmp_path / "run", src) + ["lora.r=65"])
    with pytest.raises(UserError, match=r"lora.r=65 is larger than the targeted layers allow"):
        train.train(cfg)  # the data stage has not run: the settings are checked first
    assert not (tmp_path / "run" / "train").exists()
