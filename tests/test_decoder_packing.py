"""Decoder training beyond one padded batch: packed batches (train.packing) score every example exactly as it
would be scored alone, and two processes (torchrun, gloo) train one decoder to identical adapters, as the T5 path
does (tests/test_train.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, loss_and_grads, medquad_rows, tiny_overrides, write_jsonl
from termtune.config import load_config
from termtune.errors import UserError
from termtune.local import free_port
from test_family_decoder import llama_cfg, llama_overrides  # noqa: F401  (fixture)

ROWS = [{"input_ids": [5, 6, 7], "labels": [8, 9]},
        {"input_ids": [10, 11, 12, 13, 14], "labels": [15, 16, 17, 18]},
        {"input_ids": [19], "labels": [20, 21, 22]}]


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return LlamaForCausalLM(config).train()  # training mode, as the Trainer runs it (dropout is 0)


def test_the_packed_row_holds_every_example_with_restarting_positions_and_no_cross_example_label():
    from termtune.families.llama import PackedCompletionCollator

    batch = PackedCompletionCollator()(ROWS)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9, -100, -100, -100, -100, -100, 15, 16, 17, 18,
                                         -100, 20, 21, 22]]
    assert "attention_mask" not in batch  # a mask would switch off transformers' packed-sequence attention


def test_a_packed_batch_gives_each_example_its_own_logits_and_the_padded_batch_loss_and_gradients():
    import torch

    from termtune.families.llama import CompletionCollator, PackedCompletionCollator

    model = _tiny_llama()
    packed = PackedCompletionCollator()(ROWS)
    out = model(**packed, use_cache=False)
    start = 0
    for row in ROWS:  # each example's logits in the packed row are those it gets alone
        ids = row["input_ids"] + row["labels"]
        alone = model(torch.tensor([ids]), use_cache=False).logits[0]
        assert torch.allclose(out.logits[0, start:start + len(ids)], alone, atol=1e-5)
        start += len(ids)
    # negative control: the same row without the restarting positions lets later examples attend to earlier ones
    unpacked = model(packed["input_ids"], use_cache=False).logits[0]
    assert not torch.allclose(unpacked[5:], out.logits[0, 5:], atol=1e-3)  # 5: where the second example starts

    out.loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    padded = model(**CompletionCollator(0)(ROWS), use_cache=False)
    padded.loss.backward()
    assert abs(float(out.loss) - float(padded.loss)) < 1e-6
    for name, p in model.named_parameters():
        assert torch.allclose(packed_grads[name], p.grad, atol=1e-6), name


@pytest.mark.parametrize("packed", [False, True])
def test_a_decoders_chunked_loss_equals_trls_fused_loss_and_its_lora_gradients(packed):
    """On a CPU a decoder trains on termtune's chunked loss over the answer positions (TRL's fused head scores every
    position there): the same loss and LoRA gradients as TRL's, divided by the accumulated batch's token count
    when the Trainer gives one, and by the batch's own otherwise."""
    import torch
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from termtune.families.llama import CompletionCollator, PackedCompletionCollator
    from termtune.lm_loss import LinearCrossEntropy, chunked_lm_loss, supports_chunked_loss

    base = _tiny_llama()
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer patches it
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                            init_lora_weights=False))  # non-zero B: every LoRA weight has a gradient
    assert supports_chunked_loss(model)
    batch = (PackedCompletionCollator() if packed else CompletionCollator(0))(ROWS)
    means = []
    for num_items in (None, torch.tensor(20)):  # 9 answer tokens here; 20 as if accumulated with other batches
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        trl = loss_and_grads(model, lambda: model(**batch, fused_lm_head=True, **extra).loss)
        means.append(trl[0])
        for chunk in (2, 10_000):  # several chunks with a short last one; all positions in one
            ours = loss_and_grads(model, lambda c=chunk: chunked_lm_loss(model, chunk_size=c, **batch,
                                                                         **extra)["loss"])
            assert torch.allclose(ours[0], trl[0], atol=1e-6), (num_items, chunk, ours[0], trl[0])
            assert all(torch.allclose(o, t, atol=1e-6) for o, t in zip(ours[1], trl[1]))
    assert torch.allclose(means[1], means[0] * 9 / 20)
    # negative control: each answer position scored against its own token (labels not shifted) is another loss
    with torch.no_grad():
        hidden = model.get_base_model().model(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state
        keep = batch["labels"] != -100
        unshifted = LinearCrossEntropy.apply(hidden[keep], base.lm_head.weight, batch["labels"][keep], 2) / 9
    assert not torch.allclose(unshifted, means[0], atol=1e-3)


def test_a_decoder_trains_packed_by_default_from_the_padded_loss_and_exports(llama_cfg):  # noqa: F811
    from termtune import pipeline

    def first_losses(cfg):
        pipeline.run_stage(cfg, "data")
        pipeline.run_stage(cfg, "train")
        lines = (cfg.run_dir / "train" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)]

    cfg_padded = llama_cfg("train.packing=false", run="padded")  # one epoch: 5 batches of 8
    padded = first_losses(cfg_padded)
    packed_cfg = llama_cfg(run="packed")  # a decoder packs unless train.packing says otherwise
    packed = first_losses(packed_cfg)
    # step 1 scores the same batches with the same weights: one loss, whatever the layout
    assert abs(packed[0] - padded[0]) < 1e-4, (packed, padded)
    result = json.loads((packed_cfg.run_dir / "train" / "result.json").read_text())
    assert result["global_step"] == 5 and result["padding_fraction"] == 0.0
    # 40 rows: the examples are counted where positions restart, not as the one row each batch is
    assert result["examples_per_s"] * result["train_seconds"] == pytest.approx(40, rel=1e-3)
    padded_result = json.loads((cfg_padded.run_dir / "train" / "result.json").read_text())
    assert 0 < padded_result["padding_fraction"] < 0.5  # one stream: prompt and answer slots counted once
    from termtune.plan import compare_with_measured

    for cfg in (cfg_padded, packed_cfg):  # the plan batches as training does: its padding is what training measured
        row = next(r for r in compare_with_measured(cfg) if r["quantity"] == "padding fraction")
        assert row["measured"] == pytest.approx(row["planned"], abs=1e-4), (cfg.train.packing, row)
    pipeline.run_stage(packed_cfg, "export")  # the merged artifact of a packed run exports like any other
    assert (packed_cfg.run_dir / "artifact" / "config.json").is_file()


def test_flan_t5_refuses_packing_in_one_line_before_any_data_is_read(tmp_path):
    from termtune.modeling import check_model_settings

    src = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(8))
    cfg = load_config(None, tiny_overrides(tmp_path / "run", src) + ["train.packing=true"])
    with pytest.raises(UserError, match=r"^train.packing: Flan-T5 cannot train on packed batches") as e:
        check_model_settings(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("packing", [False, True])
def test_two_processes_train_one_decoder_to_identical_adapters(tmp_path, packing):
    from safetensors.torch import load_file

    from termtune import pipeline

    src = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(40))
    overrides = llama_overrides(tmp_path / "run", src, "train.max_steps=3", f"train.packing={str(packing).lower()}")
    cfg = load_config(None, overrides)
    pipeline.run_stage(cfg, "data")
    dump = tmp_path / "ranks"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "termtune.cli", "train", *overrides],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "TERMTUNE_DEBUG_DUMP_DIR": str(dump), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]

    result = json.loads((cfg.run_dir / "train" / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 3
    rank0, rank1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    assert max(float((rank0[k] - rank1[k]).abs().max()) for k in rank0) == 0.0  # DDP kept the ranks in step
    assert any(float(t.abs().max()) > 0 for k, t in rank0.items() if "lora_B" in k)  # it did train
