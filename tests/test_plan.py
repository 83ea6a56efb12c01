"""`termtune plan`: the arithmetic against hand-computed cases and the real model, the sources rule, and the
settings it refuses (a shape or rank that cannot work, a run that does not fit)."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
from conftest import REPO
from test_cli import TERMTUNE, termtune

from termtune import plan as P
from termtune.families import t5

# A shape small enough to count by hand: d_model 4, d_ff 8, 2 heads of 2 (inner 4), 1+1 layers, vocab 10, 4 buckets.
HAND = t5.Shape(d_model=4, d_ff=8, d_kv=2, num_heads=2, num_layers=1, num_decoder_layers=1, vocab_size=10,
               gated=True, buckets=4, dropout=0.0)


def test_every_constant_has_a_source():
    rows = P.all_sourced_rows()
    assert len(rows) >= len(P.CONSTANTS) + len(P.GPUS) + len(P.CMI_PRICES)
    missing = [name for name, source in rows.items() if not source or len(source.strip()) < 10]
    assert missing == [], f"constants without a source: {missing}"
    for gpu in P.GPUS.values():  # a price row says where and when
        assert gpu.region and "20" in gpu.source, gpu


def test_the_sources_rule_catches_a_row_without_one(monkeypatch):
    monkeypatch.setitem(P.CONSTANTS, "made_up", P.Constant(1.0, "x", ""))
    assert P.all_sourced_rows()["CONSTANTS[made_up]"] == ""


def test_parameter_counts_by_hand():
    p = P.parameter_counts(HAND)
    # encoder layer: q,k,v,o 4*4*4=64; wi_0, wi_1 2*4*8=64, wo 8*4=32 -> 160
    # decoder layer: self 64 + cross 64 + ff 96 -> 224
    assert p["linear"] == 160 + 224
    # norms: encoder 2 + final 1, decoder 3 + final 1 = 7 x d_model 4 = 28; position biases 4 buckets x 2 heads x 2
    assert p["norms_and_biases"] == 28 + 16
    assert p["embedding"] == p["lm_head"] == 40
    assert p["total"] == 384 + 44 + 80


def test_lora_parameters_by_hand():
    # all-linear: r * (in + out) over q,k,v,o (3 each: enc, dec self, dec cross), wi_0, wi_1, wo (2 each)
    assert P.lora_parameters(HAND, r=2, targets="all-linear") == 2 * (4 * 3 * 8 + 2 * 2 * 12 + 2 * 12)
    assert P.lora_parameters(HAND, r=2, targets=["q", "v"]) == 2 * (2 * 3 * 8)
    src, tgt = HAND.lora_per_side(2, "all-linear")
    # source tokens: the encoder's 7 adapters + the cross-attention k, v; target: the rest of the decoder's
    assert (src, tgt) == (2 * (4 * 8 + 3 * 12) + 2 * (2 * 8), 2 * (6 * 8 + 3 * 12))


def test_base_bytes_by_hand():
    total, linear = 508, 384
    assert P.base_bytes(HAND, "none") == total * 4
    assert P.base_bytes(HAND, "4bit") == int((total - linear) * 4 + linear * P.CONSTANTS["nf4_bytes"].value)
    out_rows = 3 * 4 * 3 + 4 * 3 + 8 * 2 * 2 + 4 * 2  # one fp32 scale per output row of each linear
    assert P.base_bytes(HAND, "8bit") == (total - linear) * 4 + linear + out_rows * 4
    assert P.CONSTANTS["nf4_bytes"].value == pytest.approx(0.5 + 0.127 / 8, rel=1e-3)  # QLoRA: 4.127 bits


def test_flops_by_hand():
    b = P.Batching(steps_per_epoch=1, batches_per_epoch=1, padded_source=10, padded_target=20, real_source=9,
                   real_target=15, worst=(2, 5, 10, 15), attention_pairs=(2 * 25, 2 * 100, 2 * 50))
    # weights per token: encoder 4*4*4 + 3*4*8 = 160; cross k,v 2*4*4 = 32; decoder 6*4*4 + 96 = 192; lm_head 40
    forward = 2 * ((160 + 32) * 10 + 192 * 20)
    head = 2 * 40 * 15
    lora = 6 * (2 * (4 * 8 + 3 * 12 + 2 * 8) * 10 + 2 * (6 * 8 + 3 * 12) * 20)
    attention = 3 * 4 * 4 * (1 * 50 + 1 * (200 + 100))
    expected = 2 * forward + 2 * head + lora + attention
    assert P.flops_per_epoch(HAND, b, 2, "all-linear", checkpointing=False) == expected
    assert P.flops_per_epoch(HAND, b, 2, "all-linear", checkpointing=True) == expected + forward + attention / 3
    # A trained lm_head: its weight gradient too (6 per weight), over the padded target tokens (standard loss).
    trained_head = 6 * 40 * 20
    assert P.flops_per_epoch(HAND, b, 2, "all-linear", checkpointing=False, head_trained=True) \
        == expected - 2 * head + trained_head


def test_memory_terms_by_hand():
    # chunked loss: min(1024, 15) rows of logits (fp32) + the kept hidden states and their gradient
    assert P.loss_bytes(HAND, rows=2, tgt=10, real_tgt=15, bf16=False) == 15 * 10 * 4 + 2 * 15 * 4 * 4
    assert P.loss_bytes(HAND, rows=2, tgt=10, real_tgt=15, bf16=True) == 15 * 10 * 6 + 2 * 15 * 4 * 4
    assert P.eval_bytes(HAND, rows=3, tgt=7) == 3 * 7 * 10 * 8
    k = t5.ACTIVATION_COUNTS["off"]
    enc_tok = 4 * (k["e_d"] * 4 + k["e_inner"] * 4 + k["e_ff"] * 8 + k["e_r"] * 2 + k["e_HS"] * 2 * 5)
    dec_tok = 4 * (k["t_d"] * 4 + k["t_inner"] * 4 + k["t_ff"] * 8 + k["t_r"] * 2 + k["t_HT"] * 2 * 10
                   + k["t_HS"] * 2 * 5)
    cross_tok = 4 * (k["s_d"] * 4 + k["s_inner"] * 4 + k["s_r"] * 2)
    full = 2 * 5 * enc_tok + 2 * (10 * dec_tok + 5 * cross_tok)
    assert P.activation_bytes(HAND, 2, 5, 10, 2, dropout_on=False, bf16=False, checkpointing=False) == full
    kept = 2 * (5 + 10) * 4 * 4
    gc = P.activation_bytes(HAND, 2, 5, 10, 2, dropout_on=False, bf16=False, checkpointing=True)
    assert gc == kept + max(2 * 5 * enc_tok, 2 * (10 * dec_tok + 5 * cross_tok))


def test_cmi_money_by_hand():
    price = P.CMI_PRICES[("us-east-1", "v1.0")]
    assert price.usd_per_cmu_minute * P.CONSTANTS["cmi_window_minutes"].value == pytest.approx(0.2859)


def test_counts_match_the_real_model(tiny_cfg):
    """Parameter, LoRA and activation counts against transformers + peft themselves (fails if either changes)."""
    import torch
    from peft import get_peft_model
    from transformers import T5ForConditionalGeneration

    from termtune.families.t5 import architecture_config, untie_lm_head
    from termtune.modeling import lora_config

    for dropout in (0.0, 0.1):
        cfg = tiny_cfg(extra={"lora.dropout": dropout, "model.architecture_overrides":
                              json.dumps({"num_layers": 2, "num_decoder_layers": 2, "d_model": 48, "d_ff": 80,
                                          "d_kv": 8, "num_heads": 4, "dropout_rate": dropout})})
        shape = P.model_shape(cfg)
        torch.manual_seed(0)
        model = T5ForConditionalGeneration(architecture_config(cfg))
        untie_lm_head(model)
        assert sum(p.numel() for p in model.parameters()) == P.parameter_counts(shape)["total"]
        peft_model = get_peft_model(model, lora_config(cfg))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert trainable == P.lora_parameters(shape, cfg.lora.r, cfg.lora.target_modules)

        rows, src, tgt = 3, 11, 17
        measured = _saved_activation_bytes(peft_model, rows, src, tgt)
        predicted = P.activation_bytes(shape, rows, src, tgt, cfg.lora.r, dropout_on=dropout > 0, bf16=False,
                                       checkpointing=False)
        assert predicted == pytest.approx(measured, rel=0.10), (dropout, predicted, measured)


def _saved_activation_bytes(model, rows: int, src: int, tgt: int) -> int:
    """Bytes of the distinct tensors autograd saves for one forward, lm_head excluded (termtune's loss owns it)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    model.train()
    base = model.get_base_model()
    head, base.lm_head = base.lm_head, torch.nn.Identity()
    x = torch.randint(3, 1000, (rows, src))
    y = torch.randint(3, 1000, (rows, tgt))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=x, attention_mask=torch.ones_like(x), decoder_input_ids=y, use_cache=False)
    finally:
        base.lm_head = head
    return sum(seen.values())


def test_plan_of_a_prepared_run(prepared_cfg):
    cfg = prepared_cfg
    p = P.plan(cfg, cpu_peak=100e9)
    train_rows = [json.loads(line) for line in (cfg.run_dir / "data" / "train.jsonl").open()]
    assert p.data["origin"] == "prepared" and p.data["train_rows"] == len(train_rows) == 56
    assert p.data["real_target"] == sum(len(r["labels"]) for r in train_rows)
    assert p.steps == math.ceil(56 / 8) * 1
    assert p.fits and p.device["name"] == "this CPU"
    fixed = p.memory["base"] + p.memory["lora_states"]
    assert p.memory["total"] == fixed + p.memory["framework"] + p.memory["activations"] + p.memory["loss"] \
        + p.memory["eval"]  # a CPU heap keeps the freed activations while the held-out pass runs
    assert not p.cpu_bf16 and p.cpu_seconds == pytest.approx(p.train_flops / (100e9 * 0.5) + p.steps * 0.010)
    assert "(fp32 matmul, measured now)" in p.summary()
    cfg.lora.modules_to_save = ["lm_head"]  # a trained head: the standard loss's full logits, timed at the bandwidth
    trained = P.plan(cfg, cpu_peak=100e9, cpu_bandwidth=10e9)
    traffic = 6 * trained.data["padded_target"] * trained.shape["vocab_size"] * 4
    assert trained.train_flops > p.train_flops
    assert trained.cpu_seconds == pytest.approx(trained.train_flops / (100e9 * 0.5) + trained.steps * 0.010
                                                + traffic / 10e9)
    cfg.lora.modules_to_save = []
    cfg.train.precision = "bf16"  # the CPU opt-in: planned at the bf16 matmul peak, with its memory caveat
    bf16 = P.plan(cfg, cpu_peak=200e9)
    assert bf16.cpu_bf16 and "(bf16 matmul, measured now)" in bf16.summary()
    assert bf16.cpu_seconds == pytest.approx(bf16.train_flops / (200e9 * 0.30) + bf16.steps * 0.010)
    assert any("bf16 autocast on a CPU" in note for note in bf16.notes)
    cfg.train.precision = "auto"
    line = p.one_line()
    assert line.startswith("plan: ") and "fits this CPU" in line and "steps" in line
    on_gpu = P.plan(cfg, gpu="a10g", cpu_peak=100e9)
    assert on_gpu.money["train_usd"] == pytest.approx(1.006 * on_gpu.train_seconds / 3600)
    m = on_gpu.memory
    assert m["total"] == fixed + m["framework"] + max(m["activations"] + m["loss"], m["eval"])
    assert "g5.xlarge" in on_gpu.summary()


def test_plan_from_the_source_before_the_data_stage(tiny_cfg):
    cfg = tiny_cfg(n_rows=48)
    p = P.plan(cfg, cpu_peak=100e9)
    assert p.data["origin"] == "sample"
    assert p.data["train_rows"] == 40 and p.data["test_rows"] == 8
    assert not (cfg.run_dir / "data").exists()  # planning writes nothing


def test_the_plan_keeps_the_rows_the_data_stage_keeps(tmp_path):
    """The plan reads the source through the data stage's own reader: a term repeated in another Unicode form
    (decomposed 'Cafe\u0301', full-width 'ＡＩＤＳ') is one term to both, and both split the same rows."""
    from conftest import medquad_rows, tiny_overrides, write_jsonl

    from termtune import data
    from termtune.config import load_config

    rows = medquad_rows(40)
    for first, again in (("Café", "Cafe\u0301"), ("AIDS", "ＡＩＤＳ"), ("Tinnitus", "tinnitus ")):
        rows += [{"term": first, "definition": f"{first} is a term. It has a definition."},
                 {"term": again, "definition": f"{again} is the same term written otherwise. Twice."}]
    cfg = load_config(None, tiny_overrides(tmp_path / "run", write_jsonl(tmp_path / "terms.jsonl", rows)))
    p = P.plan(cfg, cpu_peak=100e9)
    prepared = data.prepare(cfg)
    assert prepared.stats["rows_skipped"] == {"duplicate_term": 3}
    assert (p.data["train_rows"], p.data["test_rows"]) == (prepared.stats["train_rows"], prepared.stats["test_rows"])


def test_unknown_gpu_and_unknown_hub_source_are_user_errors(prepared_cfg):
    from termtune.config import load_config
    from termtune.errors import UserError

    with pytest.raises(UserError, match="unknown GPU"):
        P.plan(prepared_cfg, gpu="tpu", cpu_peak=1e9)
    cfg = load_config(None, ["model.source=someone/unknown-model", f"run.dir={prepared_cfg.run_dir}x"])
    with pytest.raises(UserError, match="known Hub id"):
        P.plan(cfg, cpu_peak=1e9)
    assert P.before_training(cfg).startswith("plan: not available (")


def test_compare_with_measured(prepared_cfg):
    cfg = prepared_cfg
    assert P.compare_with_measured(cfg) == []
    planned = P.plan(cfg, cpu_peak=100e9)
    (cfg.run_dir / "train").mkdir()
    (cfg.run_dir / "train" / "result.json").write_text(json.dumps({
        "trainable_params": planned.trainable, "global_step": 7, "padding_fraction": 0.1, "train_seconds": 2 * round(
            planned.train_seconds, 1), "peak_memory_bytes": planned.memory["total"], "device": "cpu"}))
    rows = {r["quantity"]: r for r in P.compare_with_measured(cfg, planned)}
    assert rows["trainable parameters"]["measured_over_planned"] == 1.0
    assert rows["training time (s)"]["measured_over_planned"] == pytest.approx(2.0, rel=0.01)
    assert rows["peak memory (GiB)"]["measured_over_planned"] == pytest.approx(1.0, rel=0.01)


def test_cli_plan(prepared_cfg, tmp_path):
    from termtune.config import dump_config

    config = tmp_path / "c.yaml"
    config.write_text(dump_config(prepared_cfg))
    out = termtune("plan", str(config), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["fits"] is True and data["trainable"] > 0
    out = termtune("plan", str(config), "--gpu", "h100")
    assert out.returncode == 0 and "p5.48xlarge" in out.stdout and "per CMU-minute" in out.stdout
    out = termtune("plan", str(config), "--gpu", "nope")
    assert out.returncode == 2 and "unknown GPU" in out.stderr


def test_recorded_cmus_price_the_import(prepared_cfg):
    cfg = prepared_cfg
    assert P.plan(cfg, cpu_peak=1e11).money["cmus"] is None
    (cfg.run_dir / "deploy.json").write_text(json.dumps({"status": "Completed", "imported_model": {
        "customModelUnits": {"customModelUnitsPerModelCopy": 2, "customModelUnitsVersion": "v1.0"}}}))
    money = P.plan(cfg, cpu_peak=1e11).money
    assert money["cmus"] == 2 and money["cmu_version"] == "v1.0"


# ----------------------------------------------------------------------------- settings that cannot work


@pytest.mark.parametrize("override,message", [
    ({"model.architecture_overrides": {"d_model": 0}}, "model.architecture_overrides.d_model=0: a model size must "
                                                       "be a whole number from 1 to 16,777,216"),
    ({"model.architecture_overrides": {"num_heads": -2}}, "model.architecture_overrides.num_heads=-2: a model size"),
    ({"model.architecture_overrides": {"num_decoder_layers": 0}}, "model.architecture_overrides.num_decoder_layers=0"),
    ({"model.architecture_overrides": {"vocab_size": 2**30}}, "model.architecture_overrides.vocab_size=1073741824"),
    ({"model.architecture_overrides": {"d_ff": 1.5}}, r"model.architecture_overrides.*d_ff.*1\.5"),
    ({"model.architecture_overrides": {"dropout_rate": 2}}, "model.architecture_overrides.dropout_rate=2: a dropout"),
    ({"lora.r": 10**29}, f"lora.r={10**29} is larger than the targeted layers allow: (.*\\.)?q is 64 -> 64"),
    ({"lora.r": 65, "lora.target_modules": ["wi_0"]}, r"lora.r=65 is larger than .*wi_0 is 64 -> 128"),
])
def test_plan_and_the_model_check_refuse_a_shape_or_rank_that_cannot_work(tiny_cfg, override, message):
    """One line naming the key, from `termtune plan` and from the check every training run makes first."""
    from termtune.errors import UserError
    from termtune.modeling import check_model_settings

    cfg = tiny_cfg(n_rows=24)
    cfg.model.architecture_overrides = {**cfg.model.architecture_overrides,
                                        **override.get("model.architecture_overrides", {})}
    if "lora.target_modules" in override:
        cfg.lora.target_modules = override["lora.target_modules"]
    cfg.lora.r = override.get("lora.r", cfg.lora.r)
    for check in (lambda: P.plan(cfg, cpu_peak=1e9), lambda: check_model_settings(cfg)):
        with pytest.raises(UserError, match=message) as e:
            check()
        assert "\n" not in str(e.value)


def test_cli_plan_refuses_absurd_settings_in_one_line(tiny_cfg, tmp_path):
    from termtune.config import dump_config

    config = tmp_path / "c.yaml"
    config.write_text(dump_config(tiny_cfg(n_rows=24)))
    for override, message in [("model.architecture_overrides.d_model=0", "model.architecture_overrides.d_model=0: "),
                              ("lora.r=100000000000000000000000000000", "lora.r=100000000000000000000000000000 is "
                                                                         "larger than the targeted layers allow"),
                              ("train.epochs=1e300", "train.epochs: Input should be less than or equal to 1000")]:
        out = termtune("plan", str(config), override)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert message in out.stderr.strip().splitlines()[-1]


# A T5 no machine holds: 4 M-wide states and 16 M-wide feed-forward layers (petabytes of weights).
HUGE = json.dumps({"num_layers": 2, "num_decoder_layers": 2, "d_model": 2**22, "d_ff": 2**24, "d_kv": 16,
                   "num_heads": 4, "dropout_rate": 0.0})


def test_run_refuses_to_train_what_its_plan_says_does_not_fit(tmp_path):
    from conftest import medquad_rows, tiny_overrides, write_jsonl

    source = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(24))
    run_dir = tmp_path / "run"
    out = subprocess.run([*TERMTUNE, "run", *tiny_overrides(run_dir, source), f"model.architecture_overrides={HUGE}",
                          "aws.deploy=false"], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})  # planned on the CPU
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("termtune: error: train: the planned training peak of ") and "does not fit this CPU" in line
    assert "--force" in line
    assert (run_dir / "data" / "train.jsonl").is_file()  # the data stage ran; training never started
    assert not (run_dir / "train").exists() and not (run_dir / "base-model").exists()
    assert "--force" in termtune("run", "--help").stdout


def test_force_trains_past_a_plan_that_does_not_fit(tiny_cfg, monkeypatch):
    from termtune.errors import UserError

    cfg = tiny_cfg(n_rows=24, extra={"model.architecture_overrides": HUGE})
    monkeypatch.setattr(P, "measure_cpu_peak", lambda **_: 1e11)
    monkeypatch.setattr(P, "_gpu_name", lambda: None)  # planned on, and trained on, this CPU
    with pytest.raises(UserError, match="does not fit"):
        P.before_training(cfg)
    line = P.before_training(cfg, force=True)
    assert line.startswith("plan: ") and "does NOT fit this CPU" in line
    assert P.before_training(tiny_cfg(n_rows=24, run_name="small")).startswith("plan: ")  # the tiny model fits
    monkeypatch.setattr(P, "_gpu_name", lambda: "nvidia b300")  # a GPU the plan has no figures for: it trains there
    assert "does NOT fit this CPU" in P.before_training(cfg)
