"""Models without the Hub: the real tokenizer, a seeded random-init base, LoRA, pickle refusal."""

from __future__ import annotations

import pytest

from termtune import modeling
from termtune.errors import UserError


def test_real_tokenizer_loads_correctly(tiny_cfg):
    tok = modeling.load_tokenizer(tiny_cfg())
    # Known ids of the Flan-T5 SentencePiece model (a broken tokenizer maps everything to <unk>=2).
    ids = tok("What is Dexamethasone suppression test")["input_ids"]
    assert ids == [363, 19, 374, 226, 9, 3493, 10293, 782, 23059, 794, 1]
    assert len(tok) == 32100 and tok.convert_tokens_to_ids("<extra_id_0>") == 32099
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)


def test_random_base_is_seeded_untied_and_saved_once(tiny_cfg):
    import torch

    cfg = tiny_cfg()
    model = modeling.load_base(cfg)
    base_dir = cfg.run_dir / "base-model"
    assert (base_dir / "config.json").is_file() and (base_dir / "model.safetensors").is_file()
    # Real Flan-T5 has its own lm_head; the random base must too, or export would change the model.
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    assert model.config.num_layers == 2 and model.config.d_model == 64

    again = modeling.load_base(cfg)  # loads the saved folder, not a fresh draw
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name

    other = tiny_cfg(run_name="other", extra={"run.seed": 7})
    assert not torch.equal(modeling.load_base(other).shared.weight, model.shared.weight)


def test_lora_wraps_all_linear_layers(tiny_cfg):
    cfg = tiny_cfg()
    peft_model = modeling.attach_lora(cfg, modeling.load_base(cfg))
    trainable = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    named = tiny_cfg(run_name="qv", extra={"lora.target_modules": "[q, v]"})
    peft_qv = modeling.attach_lora(named, modeling.load_base(named))
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in peft_qv.named_parameters() if p.requires_grad} == {"q", "v"}


def test_4bit_base_loads_on_cpu(tiny_cfg):
    pytest.importorskip("bitsandbytes")
    cfg = tiny_cfg(extra={"model.quantization": "4bit"})
    model = modeling.load_base(cfg)
    assert getattr(model, "is_loaded_in_4bit", False)
    assert type(model.encoder.block[0].layer[0].SelfAttention.q).__name__ == "Linear4bit"


def test_pickle_only_folder_is_refused(tmp_path, tiny_cfg):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    cfg = tiny_cfg(extra={"model.init": "pretrained", "model.architecture_overrides": "{}",
                          "model.source": str(folder)})
    with pytest.raises(UserError, match="only pickle .* model.allow_pickle=true"):
        modeling.load_base(cfg)


def test_bad_architecture_and_missing_source(tmp_path, tiny_cfg):
    cfg = tiny_cfg(extra={"model.architecture": str(tmp_path / "none.json")})
    with pytest.raises(UserError, match="none.json not found"):
        modeling.load_base(cfg)
    not_t5 = tmp_path / "gpt.json"
    not_t5.write_text('{"model_type": "gpt2"}')
    with pytest.raises(UserError, match="model_type 'gpt2' is refused before training: Bedrock Custom Model Import "
                                        "does not accept GPT-2"):
        modeling.load_base(tiny_cfg(run_name="g", extra={"model.architecture": str(not_t5)}))
    with pytest.raises(UserError, match="does not exist"):
        modeling.load_tokenizer(tiny_cfg(run_name="m", extra={"model.source": str(tmp_path / "nowhere")}))


# ----------------------------------------------------------------------------- settings checked against the model's shape


@pytest.mark.parametrize("extra,message", [
    ({"lora.r": 100000}, r"lora.r=100000 is larger than the targeted layers allow: encoder.block.0.layer.0."
                         r"SelfAttention.q is 64 -> 64, .*use lora.r <= 64"),
    ({"lora.r": 65}, r"lora.r=65 is larger than the targeted layers allow"),
    ({"lora.r": 100, "lora.target_modules": "[wi_0]"}, r"lora.r=100 is larger .*wi_0 is 64 -> 128.*lora.r <= 64"),
    ({"lora.target_modules": "[nope]"}, r"lora.target_modules=\['nope'\]: .*not found"),
    ({"lora.target_modules": "[q, vv]"}, r"lora.target_modules: 'vv' matches no layer of the model"),
    ({"model.architecture_overrides": "{num_layers:2}"},
     r"model.architecture_overrides: 'num_layers:2' is not a T5 config key \(did you mean num_layers\? "
     r"Write key: value with a space\)"),
    ({"model.architecture_overrides": "{numlayers: 2}"}, r"'numlayers' is not a T5 config key \(did you mean "
                                                         r"num_layers\?\)"),
    ({"model.architecture_overrides": "{d_model: wide}"}, r"model.architecture_overrides: not a valid T5 shape: "
                                                          r".*d_model"),
])
def test_model_settings_are_checked_against_the_model_shape(tiny_cfg, extra, message):
    cfg = tiny_cfg(extra=extra)
    with pytest.raises(UserError, match=message) as e:
        modeling.check_model_settings(cfg)
    assert "\n" not in str(e.value)
    assert not cfg.run_dir.exists()  # shapes only: nothing built, nothing written


def test_model_settings_that_fit_pass(tiny_cfg):
    modeling.check_model_settings(tiny_cfg(extra={"lora.r": 64, "lora.target_modules": "[q, v, wo]"}))


# ----------------------------------------------------------------------------- the model family registry


def test_the_family_comes_from_the_base_config_and_an_unknown_one_is_a_one_line_error(tmp_path, tiny_cfg):
    from termtune.families import family_for, family_of
    from termtune.families.t5 import T5

    assert family_for(tiny_cfg()) is T5  # model.init=random: the architecture file's model_type
    assert family_of({"architectures": ["T5ForConditionalGeneration"]}) is T5  # no model_type: by architecture
    assert family_of({"model_type": "mamba"}) is None and family_of(None) is None

    mamba = tmp_path / "mamba"
    mamba.mkdir()
    (mamba / "config.json").write_text('{"model_type": "mamba", "architectures": ["MambaForCausalLM"]}')
    cfg = tiny_cfg(run_name="l", extra={"model.init": "pretrained", "model.architecture_overrides": "{}",
                                        "model.source": str(mamba)})
    with pytest.raises(UserError, match=r"mamba/config.json: model_type is 'mamba', not a model family termtune "
                                        r"trains \(termtune knows t5, llama, mistral, qwen2, qwen3, mixtral, "
                                        r"qwen3_moe, gpt_bigcode\)$") as e:
        family_for(cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="model_type is 'mamba'"):  # a stage asks the registry before any work
        modeling.check_model_settings(cfg)
