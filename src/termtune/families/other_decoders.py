"""Bedrock's other decoder-only architectures: Mixtral and Qwen3-MoE (sparse mixtures of experts), which termtune
trains, exports and validates, and GPTBigCode (StarCoder's GPT-2 with multi-query attention), which it exports and
validates but does not train.

Everything else is the decoder families' (termtune.families.llama): training on TRL, the import rules, the 4.51.3
reading of config.json and the tokenizer files, and the export (decoder_export.write_decoder, which writes what
4.51.3 reads for these three too). What differs is the tensor table, as transformers 4.51.3 (Bedrock's) saves
and loads each model:

- Mixtral: each layer's MLP is `block_sparse_moe`: a router `gate` [experts, hidden] and per expert `w1`, `w3`
  [intermediate, hidden] and `w2` [hidden, intermediate]; `num_local_experts` experts (4.51.3's default 8).
- Qwen3-MoE: Qwen3's attention (q/k norms), and on the layers `decoder_sparse_step` makes sparse and
  `mlp_only_layers` does not exclude, `mlp.gate` [experts, hidden] and per expert `gate_proj`, `up_proj`,
  `down_proj` of `moe_intermediate_size`; the other layers keep Qwen3's dense MLP of `intermediate_size`.
  4.51.3 reads the expert count from `num_experts` (default 128), which 5.x writes as `num_local_experts`.
- GPTBigCode: GPT-2's names (`transformer.wte`, `wpe`, `h.{i}.ln_1`, `attn.c_attn`, `mlp.c_fc`, `ln_f`), each
  linear layer and LayerNorm with a bias, one key/value head when `multi_query`, learned positions (`n_positions`
  rows), the config in GPT-2's keys (`n_embd`, `n_head`, `n_layer`, `n_inner`, default 4 x n_embd), the output
  layer tied to `wte` unless tie_word_embeddings is false.

transformers 5.x holds the experts fused in memory (`mlp.experts.gate_up_proj`, one 3-D tensor per layer); its
save_pretrained writes them back per expert as above (save_original_format, its default). A folder saved with
save_original_format=False holds the fused tensors, which 4.51.3 loads without a word, with random experts and
routers in their place: the tensor table names them.

Training a mixture of experts needs nothing of its own: peft's LoRA all-linear wraps the attention, the router
and the fused experts (as parameters), the merge folds them back, and save_pretrained writes the merged experts
per expert. `termtune plan` counts a mixture's parameters and LoRA weights on the model transformers and peft
build (MoEShape), and under QLoRA leaves the experts unquantized, as bitsandbytes does. GPTBigCode is not trained: its bases
(StarCoder, SantaCoder) ship no chat template, through which termtune renders every training row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from termtune.config import Config
from termtune.errors import UserError
from termtune.families.base import FAIL, OK, WARN, lora_config, model_config
from termtune.families.decoder_export import MAX_CONTEXT
from termtune.families.llama import LLAMA, DecoderFamily, DecoderShape, decoder_tensors, positive_int, qwen3_norms

DENSE_MLP = ("gate_proj", "up_proj", "down_proj")


class OtherDecoderFamily(DecoderFamily):
    """A decoder family with its own tensor table and import rules (`rules` replace DecoderFamily's of the same
    name; `embeddings` names its token embeddings, `tied_by_default` is 4.51.3's reading of a config.json without
    tie_word_embeddings). `not_trained`: why termtune does not train it (training, its data stage and its plan
    refuse with it), or None for a family that trains as the dense decoders do."""

    def __init__(self, name: str, model_type: str, architecture: str, display_name: str,
                 tensors: Callable[[dict[str, Any]], tuple[dict[str, list[int]], dict[str, list[int]]]],
                 rules: dict[str, Callable[[Any], tuple[str, str]]], not_trained: str | None = None,
                 embeddings: str = DecoderFamily.embeddings, tied_by_default: bool = False) -> None:
        super().__init__(name, model_type, architecture, display_name)
        self.embeddings, self.tied_by_default = embeddings, tied_by_default
        self._tensors = tensors
        self._rules = rules
        self.not_trained = not_trained

    def refuse_training(self) -> UserError:
        return UserError(f"termtune validates and exports {self.display_name} models ({self.architectures[0]}) but "
                         f"does not train them: {self.not_trained}")

    def check_model_settings(self, cfg: Config) -> None:
        if self.not_trained:
            raise self.refuse_training()
        super().check_model_settings(cfg)

    def takes_chunked_loss(self, base: Any) -> bool:
        return False  # TRL's loss adds the router's load-balancing loss, which the chunked loss has no part of

    def encode(self, tokenizer: Any, prompts: list[str], targets: list[str]) -> Any:
        if self.not_trained:
            raise self.refuse_training()
        return super().encode(tokenizer, prompts, targets)

    def plan_shape(self, cfg: Config) -> "MoEShape":
        """The shape read as a dense decoder's, then the mixture counted on the model transformers builds from the
        config (meta device: shapes only) and the LoRA weights on peft's wrapping of it: exact, whatever layout the
        installed transformers and peft give the experts."""
        import torch
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        if self.not_trained:
            raise self.refuse_training()
        dense = super().plan_shape(cfg)
        config = model_config(self, cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        counts = {"embedding": model.get_input_embeddings().weight.numel(), "linear": 0, "router": 0, "experts": 0,
                  "lm_head": 0 if dense.tied else model.get_output_embeddings().weight.numel(),
                  "total": sum(p.numel() for p in model.parameters())}
        sparse = 0
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings():
                counts["linear"] += sum(p.numel() for p in module.parameters())  # what bitsandbytes quantizes
            elif name.endswith("mlp.experts") or name.endswith("block_sparse_moe.experts"):
                counts["experts"] += sum(p.numel() for p in module.parameters())
                sparse += 1
            elif name.endswith(".gate") and not isinstance(module, torch.nn.Linear):
                counts["router"] += sum(p.numel() for p in module.parameters())
        counts["norms_and_biases"] = counts["total"] - sum(counts[k] for k in ("embedding", "linear", "router",
                                                                               "experts", "lm_head"))
        adapted = get_peft_model(model, lora_config(self, cfg))
        lora = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        values = config.to_dict()
        return MoEShape(**vars(dense), experts=values["num_local_experts"],
                        experts_per_token=values["num_experts_per_tok"],
                        expert_intermediate=values.get("moe_intermediate_size") or values["intermediate_size"],
                        sparse_layers=sparse, counted=tuple(counts.items()),
                        lora_counted=((cfg.lora.r, repr(cfg.lora.target_modules)), lora))

    def plan_sources(self) -> dict[str, str]:
        return {"MoEShape": "parameters and LoRA weights counted on the model transformers and peft build (meta "
                            "device); FLOPs and activations as the experts a token passes (an estimate)"}

    def cmi_rules(self) -> dict[str, Callable[[Any], tuple[str, str]]]:
        return {**super().cmi_rules(), **self._rules}

    def tensor_table(self, config: dict[str, Any]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        return self._tensors(config)


# ----------------------------------------------------------------------------- mixtures of experts


def _with_experts(required: dict[str, list[int]], config: dict[str, Any], layer: int, moe: str, experts: int,
                  names: tuple[str, str, str], width: int) -> None:
    """Replace layer `layer`'s dense MLP in `required` by a router and `experts` experts under `moe`, each expert's
    `names` being its (gate, up, down) projections of `width` (as 4.51.3 names them)."""
    hidden = positive_int(config, "hidden_size")
    p = f"model.layers.{layer}"
    for name in DENSE_MLP:
        del required[f"{p}.mlp.{name}.weight"]
    gate, up, down = names
    required[f"{p}.{moe}.gate.weight"] = [experts, hidden]
    for j in range(experts):
        e = f"{p}.{moe}.experts.{j}"
        required.update({f"{e}.{gate}.weight": [width, hidden], f"{e}.{up}.weight": [width, hidden],
                         f"{e}.{down}.weight": [hidden, width]})


def mixtral_tensors(config: dict[str, Any]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    required, aliases = decoder_tensors(config, None)
    experts = positive_int(config, "num_local_experts", 8)  # 4.51.3's default for a config.json without the key
    for i in range(positive_int(config, "num_hidden_layers")):
        _with_experts(required, config, i, "block_sparse_moe", experts, ("w1", "w3", "w2"),
                      positive_int(config, "intermediate_size"))
    return required, aliases


def qwen3_moe_layers(config: dict[str, Any]) -> list[int]:
    """The layers 4.51.3 builds with experts: every decoder_sparse_step-th, less mlp_only_layers."""
    dense = config.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        raise ValueError(f"config.json: mlp_only_layers is {dense!r}, not a list of layer numbers")
    step = positive_int(config, "decoder_sparse_step", 1)
    return [i for i in range(positive_int(config, "num_hidden_layers")) if i not in dense and (i + 1) % step == 0]


def qwen3_moe_tensors(config: dict[str, Any]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    def attention_extras(p: str, heads: int, kv: int, head_dim: int) -> dict[str, list[int]]:
        extras = qwen3_norms(p, heads, kv, head_dim)
        if config.get("attention_bias"):
            extras.update({f"{p}.self_attn.q_proj.bias": [heads * head_dim],
                           f"{p}.self_attn.k_proj.bias": [kv * head_dim], f"{p}.self_attn.v_proj.bias": [kv * head_dim],
                           f"{p}.self_attn.o_proj.bias": [positive_int(config, "hidden_size")]})
        return extras

    required, aliases = decoder_tensors(config, attention_extras)
    experts = positive_int(config, "num_experts", 128)  # 4.51.3's key and default: 5.x's num_local_experts is unread
    width = positive_int(config, "moe_intermediate_size", 768)
    for i in qwen3_moe_layers(config):
        _with_experts(required, config, i, "mlp", experts, DENSE_MLP, width)
    return required, aliases


def _experts_rule(key: str, default_experts: int, default_per_token: int) -> Callable[[Any], tuple[str, str]]:
    """"head count" for a mixture of experts: the layers and heads, then the experts and how many a token uses."""
    def rule(f: Any) -> tuple[str, str]:
        status, message = LLAMA.cmi_rules()["head count"](f)
        if status != OK:
            return status, message
        c = f.config or {}
        try:
            experts = positive_int(c, key, default_experts)
            per_token = positive_int(c, "num_experts_per_tok", default_per_token)
        except ValueError as e:
            return FAIL, str(e)
        if per_token > experts:
            return FAIL, f"num_experts_per_tok {per_token} is more than the model's {experts} experts"
        read = "" if key in c else f" (transformers 4.51.3's default: config.json has no {key})"
        return OK, f"{message}; {experts} experts{read}, {per_token} per token"

    return rule


MIXTRAL = OtherDecoderFamily("mixtral", "mixtral", "MixtralForCausalLM", "Mixtral", mixtral_tensors,
                             {"head count": _experts_rule("num_local_experts", 8, 2)})
QWEN3_MOE = OtherDecoderFamily("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3-MoE", qwen3_moe_tensors,
                               {"head count": _experts_rule("num_experts", 128, 8)})


@dataclass(frozen=True)
class MoEShape(DecoderShape):
    """A mixture of experts as `termtune plan` counts it. Parameters (`counted`) and LoRA weights (`lora_counted`)
    are counted on the built model, exact. bitsandbytes quantizes nn.Linear layers only, so under QLoRA the
    experts and routers (3-D parameters in transformers 5) stay unquantized: `linear` is the attention and dense
    MLPs alone. FLOPs and activations are a dense decoder's whose MLP, on the `sparse_layers`, is the
    `experts_per_token` experts a token passes: an estimate (routing is uneven, LoRA on the experts is not)."""

    experts: int = 1
    experts_per_token: int = 1
    expert_intermediate: int = 1
    sparse_layers: int = 0
    counted: tuple[tuple[str, int], ...] = ()
    lora_counted: tuple[tuple[int, str], int] = ((0, ""), 0)
    """((lora.r, repr(lora.target_modules)), trainable LoRA weights) as peft wraps the model."""

    def own_loss(self, on_gpu: bool) -> bool:
        return True  # TRL's on every device (OtherDecoderFamily.takes_chunked_loss)

    def describe(self) -> str:
        return (f"{super().describe()}; {self.experts} experts ({self.experts_per_token} per token) on "
                f"{self.sparse_layers} of {self.layers} layers")

    def parameter_counts(self) -> dict[str, int]:
        return dict(self.counted)

    def active_weights(self) -> int:
        p = self.parameter_counts()
        return int(p["linear"] + p["router"] + p["experts"] * self.experts_per_token / self.experts)

    def lora_parameters(self, r: int, targets: str | list[str]) -> int:
        (counted_r, counted_targets), count = self.lora_counted
        if (r, repr(targets)) != (counted_r, counted_targets):
            raise ValueError(f"LoRA weights were counted for r={counted_r}, {counted_targets}; not for r={r}, "
                             f"{targets!r}")
        return count

    def activation_bytes(self, rows: int, src: int, tgt: int, r: int, dropout_on: bool, bf16: bool,
                         checkpointing: bool) -> int:
        # a token's MLP tensors on a sparse layer are its experts' (each of expert_intermediate width)
        dense_layers = self.layers - self.sparse_layers
        width = (dense_layers * self.intermediate
                 + self.sparse_layers * self.experts_per_token * self.expert_intermediate) / self.layers
        as_dense = DecoderShape(**{f.name: getattr(self, f.name) for f in fields(DecoderShape)})
        return replace(as_dense, intermediate=round(width)).activation_bytes(rows, src, tgt, r, dropout_on, bf16,
                                                                             checkpointing)


# ----------------------------------------------------------------------------- GPTBigCode

# GPTBigCode's config keys and 4.51.3's defaults for them.
GPT_BIGCODE_DEFAULTS = {"n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024}
WTE = "transformer.wte.weight"


def _gpt_bigcode_shape(config: dict[str, Any]) -> dict[str, int]:
    shape = {key: positive_int(config, key, default) for key, default in GPT_BIGCODE_DEFAULTS.items()}
    hidden, heads = shape["n_embd"], shape["n_head"]
    if hidden % heads:
        raise ValueError(f"config.json: n_embd {hidden} is not a multiple of n_head {heads}")
    shape["n_inner"] = 4 * hidden if config.get("n_inner") is None else positive_int(config, "n_inner")
    shape["kv_width"] = hidden // heads if config.get("multi_query", True) else hidden
    return shape


def gpt_bigcode_tensors(config: dict[str, Any]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    if config.get("add_cross_attention"):
        raise ValueError("config.json: add_cross_attention is true: an encoder-decoder GPTBigCode, which Bedrock "
                         "does not serve")
    s = _gpt_bigcode_shape(config)
    vocab, hidden, inner = positive_int(config, "vocab_size"), s["n_embd"], s["n_inner"]
    qkv = hidden + 2 * s["kv_width"]  # queries, then one key and one value width
    required = {WTE: [vocab, hidden], "transformer.wpe.weight": [s["n_positions"], hidden],
                "transformer.ln_f.weight": [hidden], "transformer.ln_f.bias": [hidden]}
    for i in range(s["n_layer"]):
        p = f"transformer.h.{i}"
        for name, (n_out, n_in) in {"attn.c_attn": (qkv, hidden), "attn.c_proj": (hidden, hidden),
                                    "mlp.c_fc": (inner, hidden), "mlp.c_proj": (hidden, inner)}.items():
            required.update({f"{p}.{name}.weight": [n_out, n_in], f"{p}.{name}.bias": [n_out]})
        for norm in ("ln_1", "ln_2"):
            required.update({f"{p}.{norm}.weight": [hidden], f"{p}.{norm}.bias": [hidden]})
    aliases: dict[str, list[int]] = {}
    (aliases if config.get("tie_word_embeddings", True) else required)["lm_head.weight"] = [vocab, hidden]
    return required, aliases


def _gpt_bigcode_attention(f: Any) -> tuple[str, str]:
    try:
        s = _gpt_bigcode_shape(f.config or {})
    except ValueError as e:
        return FAIL, str(e)
    heads = s["n_head"]
    kind = "multi-query: one key/value head" if s["kv_width"] < s["n_embd"] else f"{heads} key/value heads"
    found = f"{heads} heads of {s['n_embd'] // heads} ({kind}), {s['n_positions']} learned positions"
    if s["n_positions"] > MAX_CONTEXT:
        return WARN, f"{found}: above Bedrock's 128K ({MAX_CONTEXT}); the import may refuse it"
    return OK, found


def _gpt_bigcode_layers(f: Any) -> tuple[str, str]:
    try:
        s = _gpt_bigcode_shape(f.config or {})
    except ValueError as e:
        return FAIL, str(e)
    return OK, f"{s['n_layer']} layers of {s['n_head']} heads"


GPT_BIGCODE = OtherDecoderFamily(
    "gpt_bigcode", "gpt_bigcode", "GPTBigCodeForCausalLM", "GPTBigCode", gpt_bigcode_tensors,
    {"attention shape": _gpt_bigcode_attention, "head count": _gpt_bigcode_layers},
    "GPTBigCode bases (StarCoder, SantaCoder) ship no chat template, and termtune trains every row as a chat "
    "turn rendered through one", embeddings=WTE, tied_by_default=True)
