"""`termtune plan` for the decoder-only families: the real published shapes (Llama 3.2 1B, Qwen2.5 0.5B, Qwen3 0.6B,
Mistral 7B v0.3) counted against transformers and peft themselves, the memory with and without QLoRA, the FLOPs of
padded and packed batches, and the money lines with their sources."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED, medquad_rows, write_jsonl

from termtune import plan as P
from termtune.config import load_config
from termtune.families.llama import DecoderShape

REAL_DECODERS = ("llama-3.2-1b-instruct", "qwen2.5-0.5b-instruct", "qwen3-0.6b", "mistral-7b-instruct-v0.3")
# A decoder small enough to count by hand: hidden 4, 2 heads of 2 (1 key/value head), MLP 8, 1 layer, vocabulary 10.
HAND = DecoderShape(hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1, head_dim=2, vocab_size=10)


def real_cfg(tmp_path, folder: str, *extra: str):
    source = tmp_path / "terms.jsonl"
    if not source.exists():
        write_jsonl(source, medquad_rows(40))
    return load_config(None, [f"run.dir={tmp_path / folder}", f"model.source={SHARED / 'models' / folder}",
                              f"data.source={source}", "data.test_size=8", "data.target=first_n_sentences",
                              "data.n_sentences=1", "data.max_target_length=64", "train.batch_size=4",
                              "aws.region=us-east-1", *extra])


@pytest.mark.parametrize("folder", REAL_DECODERS)
def test_plan_counts_the_published_shapes_as_transformers_and_peft_build_them(tmp_path, folder):
    """Exact: parameters = sum(numel) of the model transformers builds from the real config.json (on the meta
    device: no weights), LoRA weights = what peft makes trainable on it, all-linear and a list of targets."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from termtune.modeling import lora_config

    for targets in ("all-linear", "[q_proj, down_proj]"):
        cfg = real_cfg(tmp_path, folder, "lora.r=16", f"lora.target_modules={targets}")
        shape = P.model_shape(cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(SHARED / "models" / folder))
            counts = shape.parameter_counts()
            assert counts["total"] == sum(p.numel() for p in model.parameters()), folder  # tied weights once
            assert counts["lm_head"] == (0 if model.config.tie_word_embeddings else counts["embedding"])
            peft_model = get_peft_model(model, lora_config(cfg))
        assert shape.lora_parameters(cfg.lora.r, cfg.lora.target_modules) == \
            sum(p.numel() for p in peft_model.parameters() if p.requires_grad), (folder, targets)


def test_plan_gives_the_memory_with_and_without_qlora_whichever_the_config_loads(tmp_path):
    folder = "llama-3.2-1b-instruct"
    plans = {q: P.plan(real_cfg(tmp_path, folder, f"model.quantization={q}"), cpu_peak=1e11) for q in ("none", "4bit")}
    linear, total = plans["none"].params["linear"], plans["none"].params["total"]
    for q, planned in plans.items():
        # the run's own peak is the row for its quantization; the other row differs by the base alone
        assert planned.memory["total"] == planned.memory_by_quantization[q]["total"]
        assert planned.memory_by_quantization == plans["none"].memory_by_quantization
    rows = plans["none"].memory_by_quantization
    saved = rows["none"]["total"] - rows["4bit"]["total"]
    # NF4 turns each linear weight's 4 fp32 bytes into 0.5 B + its share of the block constants; the rest stays fp32
    assert saved == total * 4 - int((total - linear) * 4 + linear * P.CONSTANTS["nf4_bytes"].value)
    assert saved == pytest.approx(linear * (4 - (0.5 + 1 / 64 + 4 / (64 * 256))), abs=1)
    assert rows["4bit"]["base"] < rows["none"]["base"] == total * 4
    summary = plans["4bit"].summary()
    assert f"without QLoRA (fp32 base, {P._gib(total * 4)}): peak {P._gib(rows['none']['total'])}" in summary
    assert f"with QLoRA (model.quantization=4bit, NF4 base, {P._gib(rows['4bit']['base'])})" in summary
    assert "activations (estimate: counted, not measured)" in summary


def test_packed_batches_cost_less_than_padded_ones_and_the_same_when_no_row_is_padded():
    def flops(lengths: list[list[tuple[int, int]]], packed: bool) -> float:
        rows = [row for batch in lengths for row in batch]
        b = P.Batching(steps_per_epoch=1, batches_per_epoch=len(lengths), padded_source=0, padded_target=0,
                       real_source=sum(s for s, _ in rows), real_target=sum(t for _, t in rows), worst=(0, 0, 0, 0),
                       padded_tokens=sum(len(batch) * max(s + t for s, t in batch) for batch in lengths),
                       lengths=lengths)
        return P.flops_per_epoch(HAND, b, 2, "all-linear", checkpointing=False, packed=packed)

    # per token: linear weights 4*4 (q) + 2*4*2 (k, v) + 4*4 (o) + 3*4*8 (MLP) = 144; lm_head 40; LoRA r=2 all-linear
    # 2 * ((4+4) + 2*(4+2) + (4+4) + 2*(4+8) + (8+4)) = 2 * 64 = 128
    def by_hand(tokens: int, pairs: int) -> float:
        return 2 * 2 * 144 * tokens + 2 * 2 * 40 * tokens + 6 * 128 * tokens + 3 * 4 * 2 * 2 * 1 * pairs / 2

    uneven = [[(3, 2), (1, 1)]]  # one batch: rows of 5 and 2 tokens, the second padded to 5
    assert flops(uneven, packed=False) == by_hand(tokens=10, pairs=2 * 5**2)
    assert flops(uneven, packed=True) == by_hand(tokens=7, pairs=5**2 + 2**2)
    assert flops(uneven, packed=True) < flops(uneven, packed=False)
    even = [[(2, 3), (4, 1)], [(1, 4)]]  # every row 5 tokens: nothing to pad, nothing packing saves
    assert flops(even, packed=True) == flops(even, packed=False)


def test_a_decoder_plan_counts_padding_as_one_stream_and_prices_packing(tmp_path):
    planned = P.plan(real_cfg(tmp_path, "qwen2.5-0.5b-instruct", "train.packing=false"), cpu_peak=1e11)
    data, f = planned.data, planned.flops
    real = data["real_source"] + data["real_target"]
    # the prompt and its answer are padded together to the batch's longest row, not each to its own longest
    assert data["padding_fraction"] == pytest.approx(1 - real / data["padded_tokens"])
    assert data["padded_tokens"] < data["padded_source"] + data["padded_target"]
    assert f["epoch_packed"] < f["epoch"] and f["per_token"] == pytest.approx(f["epoch"] / real)
    assert planned.train_flops == pytest.approx(f["epoch"] * planned.epochs)
    summary = planned.summary()
    assert f"{f['epoch'] / 1e12:.2f} TFLOP per epoch in termtune's padded batches" in summary
    assert f"packed (no pad tokens, each row attending to itself): {f['epoch_packed'] / 1e12:.2f} TFLOP" in summary


@pytest.mark.parametrize("kind", ["messages", "terms"])
def test_the_estimate_before_data_prepare_is_what_the_data_stage_then_writes(tmp_path, kind):
    """Fewer rows than the sample: the plan renders each as the data stage does (a chat source's conversations
    through the chat template, system turns and earlier turns included), so the lengths are exactly the prepared
    ones, in the same order."""
    from termtune import pipeline

    if kind == "messages":
        rows = [{"messages": [{"role": "system", "content": "Answer as a medical glossary."},
                              {"role": "user", "content": f"What is {r['term']}?"},
                              *([{"role": "assistant", "content": "A term."}, {"role": "user", "content": "More?"}]
                                if i % 3 == 0 else []),
                              {"role": "assistant", "content": r["definition"][:300]}]}
                for i, r in enumerate(medquad_rows(30))]
        write_jsonl(tmp_path / "terms.jsonl", rows)
    cfg = real_cfg(tmp_path, "qwen2.5-0.5b-instruct")
    before = P.data_estimate(cfg)
    assert before.origin == "sample"
    pipeline.run_stage(cfg, "data")
    after = P.data_estimate(cfg)
    assert after.origin == "prepared" and (before.train_rows, before.test_rows) == (after.train_rows, after.test_rows)
    assert (before.source_lengths, before.target_lengths) == (after.source_lengths, after.target_lengths)
    assert before.test_target_max == after.test_target_max


def test_a_decoder_plan_counts_the_loss_memory_once_as_the_device_trains_it(tmp_path):
    """On a GPU the logits live in TRL's loss (its fused lm_head), on a CPU in termtune's chunked loss (one chunk
    of the answer positions): either is counted once, as the loss's working memory; the activations do not grow
    with the vocabulary."""
    import dataclasses

    from termtune.families import family_for

    cfg = real_cfg(tmp_path, "qwen2.5-0.5b-instruct")
    shape = family_for(cfg).plan_shape(cfg)
    rows, src, tgt, real_tgt = P.batching(cfg, P.data_estimate(cfg)).worst
    on_gpu = P.plan(cfg, gpu="a10g", cpu_peak=1e11).memory
    assert on_gpu["loss"] == shape.loss_bytes(rows, src + tgt) > rows * (src + tgt) * shape.vocab_size * 4
    on_cpu = P.plan(cfg, cpu_peak=1e11, cpu_bandwidth=1e10).memory
    assert on_cpu["loss"] == P.loss_bytes(shape, rows, tgt, real_tgt, bf16=False) < on_gpu["loss"]
    wider = dataclasses.replace(shape, vocab_size=2 * shape.vocab_size)
    assert wider.activation_bytes(rows, src, tgt, 8, False, False, False) == \
        shape.activation_bytes(rows, src, tgt, 8, False, False, False)
    for m in (on_cpu, on_gpu):
        transient = m["activations"] + m["loss"]
        transient = transient + m["eval"] if m is on_cpu else max(transient, m["eval"])
        assert m["total"] == m["base"] + m["lora_states"] + m["framework"] + transient


def test_a_packed_decoder_plan_has_no_padding_and_prices_the_packed_batches(tmp_path):
    padded = P.plan(real_cfg(tmp_path, "qwen2.5-0.5b-instruct", "train.packing=false"), cpu_peak=1e11)
    packed = P.plan(real_cfg(tmp_path, "qwen2.5-0.5b-instruct"), cpu_peak=1e11)  # a decoder packs by default
    assert packed.data["padding_fraction"] == 0.0 < padded.data["padding_fraction"]
    assert packed.flops["epoch"] == pytest.approx(padded.flops["epoch_packed"])
    assert "epoch_packed" not in packed.flops and packed.train_flops < padded.train_flops
    summary = packed.summary()
    assert "TFLOP per epoch in termtune's packed batches" in summary and "the times are the padded" not in summary


def test_the_money_lines_come_from_the_cited_price_table(tmp_path):
    price = P.CMI_PRICES[("us-east-1", "v1.0")]
    planned = P.plan(real_cfg(tmp_path, "qwen3-0.6b", "export.dtype=bf16"), cpu_peak=1e11)
    money = planned.money
    assert money["price_source"] == price.source and money["usd_per_cmu_minute"] == price.usd_per_cmu_minute
    assert money["artifact_bytes"] == int(planned.params["total"] * 2 + P.CONSTANTS["tokenizer_bytes"].value)
    summary = planned.summary()
    assert f"${price.usd_per_cmu_minute} per CMU-minute" in summary and price.source in summary
    assert f"${price.usd_per_cmu_minute * 5:.4f} per active window per CMU" in summary
    assert "CMUs per model copy: known only after import" in summary and "no rule from size to CMUs" in summary


def test_a_t5_plan_has_no_packing_and_measured_activations(prepared_cfg):
    planned = P.plan(prepared_cfg, cpu_peak=1e11, cpu_bandwidth=1e10)
    assert "epoch_packed" not in planned.flops and planned.activations_measured
    summary = planned.summary()
    assert "packed (no pad tokens" not in summary and "estimate: counted" not in summary
    assert json.loads(json.dumps(planned.as_dict()))["memory_by_quantization"]["4bit"]["total"] > 0


@pytest.mark.parametrize("folder", REAL_DECODERS)
def test_a_4bit_decoder_base_trains_its_lora_weights_and_weighs_what_the_plan_says(tmp_path, folder):
    """QLoRA for each decoder family: bitsandbytes quantizes the linear layers of a tiny random model of the
    published config, LoRA gets gradients through them, and the frozen base's bytes are what `termtune plan`
    counts for a 4-bit base."""
    import torch

    from termtune.modeling import attach_lora, load_base

    config = SHARED / "models" / folder / "config.json"
    tiny = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "tie_word_embeddings": False}
    if "head_dim" in json.loads(config.read_text()):  # Qwen2 has none: hidden / heads, 16 here too
        tiny["head_dim"] = 16
    cfg = real_cfg(tmp_path, folder, "model.init=random", f"model.architecture={config}",
                   f"model.architecture_overrides={json.dumps(tiny)}", "model.quantization=4bit", "lora.r=4")
    base = load_base(cfg)
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    constants = sum(m.weight.quant_state.absmax.numel() * m.weight.quant_state.absmax.element_size()
                    + m.weight.quant_state.state2.absmax.numel() * 4
                    for m in base.modules() if type(m).__name__ == "Linear4bit")
    assert weights + constants == pytest.approx(P.base_bytes(P.model_shape(cfg), "4bit"), rel=0.01)
    model = attach_lora(cfg, base)
    ids = torch.randint(0, 1000, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert torch.isfinite(loss) and grads and all(g is not None for g in grads.values())
    # lora_B starts at zero (the adapter begins as the identity), so the first gradient reaches it, not lora_A
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
