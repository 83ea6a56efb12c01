"""`termtune plan`: the memory, time and money a run will take, known before they are spent.

    termtune plan configs/flan-t5-large-medical.yaml --gpu a10g
    termtune plan configs/demo.yaml --json

Touches no GPU, network or AWS. Everything is arithmetic on the config, the model's shape and
the data's token lengths (the data stage's files when present, else a tokenised sample of a
local source, else the dataset card's row count at the maximum lengths). The only thing it
runs is one fp32 matmul, to measure this CPU's peak for the CPU time estimate.

Every number it uses lives in CONSTANTS, GPUS or CMI_PRICES below, each with its source; a
test fails if one has none. docs/plan.md gives the formulas, their assumptions and where they
are known to be off; benchmarks/bench_plan.py checks them against measurement.

Public entry points:
    plan(cfg, gpu=None) -> Plan               the estimate (Plan.summary(), Plan.one_line(), Plan.as_dict())
    before_training(cfg, force) -> str        the line `termtune run` prints before training; refuses
                                              a run that does not fit, unless force
    compare_with_measured(cfg) -> list[dict]  plan vs what the run measured, for the report
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from termtune.config import Config
from termtune.errors import UserError
from termtune.families import FAMILIES, family_for
from termtune.families.base import packed_tokens, trains_packed
from termtune.layout import RunLayout
from termtune.rundir import read_json

GiB = 2**30


# ----------------------------------------------------------------------------- the constants, with sources


@dataclass(frozen=True)
class Constant:
    value: float
    unit: str
    source: str


CONSTANTS: dict[str, Constant] = {
    # Bytes per parameter of the frozen base.
    "fp32_bytes": Constant(4, "B/param", "IEEE 754 single precision"),
    "bf16_bytes": Constant(2, "B/param", "bfloat16: 16 bits"),
    "nf4_bytes": Constant(0.5 + 1 / 64 + 4 / (64 * 256), "B/param",
                          "bitsandbytes NF4: 4-bit codes + double-quantized absmax (8-bit per 64-weight block, fp32 "
                          "per 256 blocks); QLoRA paper (Dettmers et al. 2023, arXiv:2305.14314) section 3, 0.127 "
                          "bits/param of constants"),
    "int8_bytes": Constant(1, "B/param", "bitsandbytes LLM.int8: int8 weights (+ one fp32 scale per output row, "
                                         "counted separately)"),
    # LoRA training state: fp32 weight, fp32 gradient, AdamW's two fp32 moments.
    "lora_state_bytes": Constant(16, "B/trainable param",
                                 "torch.optim.AdamW: exp_avg + exp_avg_sq (fp32) + the fp32 param and its grad"),
    # Framework memory that is not the model.
    "cpu_framework_bytes": Constant(610 * 2**20, "B",
                                    "measured 2026-11-29 on this project's CPU machine: ru_maxrss after importing "
                                    "torch, transformers, peft, datasets, accelerate, matplotlib and loading the "
                                    "default base model's tokenizer (609 MiB)"),
    "cuda_context_bytes": Constant(0.5 * GiB, "B",
                                   "assumption (no GPU measured here): CUDA context + cuBLAS workspace, 300-600 MiB "
                                   "on Ampere/Hopper; not counted by torch.cuda.max_memory_allocated (PyTorch CUDA "
                                   "semantics docs, 'Memory management')"),
    "gpu_headroom": Constant(0.10, "share of GPU memory",
                             "assumption: allocator fragmentation and spikes; PyTorch's caching allocator reserves "
                             "more than it allocates (PyTorch CUDA semantics docs)"),
    # Efficiencies: achieved / peak FLOP/s for this workload.
    "cpu_efficiency": Constant(0.50, "of measured fp32 matmul peak",
                               "BENCHMARKS.md, Training (2026-11-30): termtune defaults reached 151.1-161.1 useful "
                               "GFLOP/s counted as 6 x weights, i.e. 101-107 counted as 4 x (frozen base), of a "
                               "measured 190.3 GFLOP/s fp32 peak = 0.53-0.56; 0.50 leaves room for shorter batches"),
    "gpu_efficiency": Constant(0.35, "of dense bf16 peak",
                               "assumption (no GPU measured here): LoRA fine-tuning of a <1B model on one "
                               "GPU; the PaLM paper (Chowdhery et al. 2022, arXiv:2204.02311, table 3) reports 46 % "
                               "MFU at 540B scale, small models with short sequences reach less"),
    "cpu_bf16_efficiency": Constant(0.30, "of measured bf16 matmul peak",
                                    "BENCHMARKS.md, Plan (a one-off observation of 2026-11-29): the bench run with "
                                    "train.precision=bf16 took 46.6 s, 1.15x a plan at 0.35 of a 408 GFLOP/s bf16 "
                                    "peak"),
    "cpu_step_overhead_s": Constant(0.010, "s/optimizer step",
                                    "assumption: Trainer bookkeeping, AdamW over the LoRA tensors, data collation "
                                    "(Python, per step, independent of the model size)"),
    "standard_loss_passes": Constant(6, "passes over the full logits",
                                     "the standard loss path (a trained lm_head): the lm_head writes the batch x "
                                     "target x V fp32 logits, log-softmax reads and writes them, its backward reads "
                                     "the saved log-probabilities and writes their gradient: 6 passes, memory-bound"),
    "gc_recompute": Constant(2 / 4, "extra share of the 4-pass work",
                             "gradient checkpointing re-runs each layer's forward (2 of the 4 FLOP/param/token "
                             "of frozen-base training) in the backward pass"),
    # Data and money.
    "loss_chunk_rows": Constant(1024, "target tokens", "termtune.trainer_additions.LM_LOSS_CHUNK_ROWS"),
    "s3_usd_per_gb_month": Constant(0.023, "USD/GB-month",
                                    "https://aws.amazon.com/s3/pricing/ S3 Standard, first 50 TB, us-east-1 "
                                    "(looked up 2026-11-29)"),
    "cmi_window_minutes": Constant(5, "minutes",
                                   "https://docs.aws.amazon.com/bedrock/latest/userguide/import-model-calculate-cost"
                                   ".html: 'Billing is charged over 5-minute billing windows from the first "
                                   "successful inference call'"),
    "tokenizer_bytes": Constant(2.4e6, "B", "the default base model's tokenizer files: its SentencePiece model "
                                            "(792 kB) + tokenizer.json (2.4 MB) + configs, rounded"),
}


@dataclass(frozen=True)
class Gpu:
    name: str
    instance: str
    gpus: int
    memory_gib: float
    """Memory of one GPU."""
    bf16_tflops: float
    """Dense (no sparsity) bf16 tensor-core peak of one GPU."""
    usd_per_hour: float
    """On-demand price of the whole instance, Linux."""
    region: str
    source: str


# On-demand EC2 prices, us-east-1, Linux, as listed on https://aws.amazon.com/ec2/pricing/on-demand/ (read via public
# price tables on 2026-11-29; p4d/p5 after AWS's June 2025 GPU price cut). GPU peaks from NVIDIA's data sheets (the
# dense figure: the data sheets' headline numbers assume 2:4 sparsity and are twice these).
GPUS: dict[str, Gpu] = {
    "l4": Gpu("NVIDIA L4", "g6.xlarge", 1, 24, 121, 0.8048, "us-east-1",
              "NVIDIA L4 data sheet: BF16 242 TFLOPS with sparsity; EC2 on-demand g6.xlarge $0.8048/h (2026-11-29)"),
    "a10g": Gpu("NVIDIA A10G", "g5.xlarge", 1, 24, 70, 1.006, "us-east-1",
                "A10G (AWS-only A10 variant): 70 TFLOPS BF16 tensor, per baseten.co 'NVIDIA A10 vs A10G' spec "
                "table; EC2 on-demand g5.xlarge $1.006/h (2026-11-29)"),
    "l40s": Gpu("NVIDIA L40S", "g6e.xlarge", 1, 48, 362, 1.861, "us-east-1",
                "NVIDIA L40S data sheet: BF16 733 TFLOPS with sparsity; EC2 on-demand g6e.xlarge $1.861/h "
                "(2026-11-29)"),
    "a100": Gpu("NVIDIA A100 40GB", "p4d.24xlarge", 8, 40, 312, 21.957642, "us-east-1",
                "NVIDIA A100 data sheet: BF16 312 TFLOPS dense; EC2 on-demand p4d.24xlarge $21.96/h after the "
                "June 2025 cut (was $32.77) (2026-11-29)"),
    "h100": Gpu("NVIDIA H100 80GB", "p5.48xlarge", 8, 80, 989, 55.04, "us-east-1",
                "NVIDIA H100 SXM data sheet: BF16 1979 TFLOPS with sparsity; EC2 on-demand p5.48xlarge $55.04/h "
                "after the June 2025 cut (was $98.32) (2026-11-29)"),
}


SAGEMAKER_GPUS = {"g5": "a10g", "g6": "l4", "g6e": "l40s", "p4d": "a100", "p5": "h100"}
"""SageMaker instance families (ml.<family>.<size>) by the GPU each of their GPUs is, for train.on=sagemaker."""


def sagemaker_gpu(instance_type: str) -> str:
    """The GPUS key of a SageMaker training instance's GPUs; UserError for an instance plan has no figures for."""
    family = instance_type.removeprefix("ml.").split(".")[0]
    if family not in SAGEMAKER_GPUS:
        raise UserError(f"aws.sagemaker.instance_type: plan has no GPU figures for {instance_type} (it knows the "
                        f"{', '.join('ml.' + f for f in SAGEMAKER_GPUS)} families); give --gpu to plan for one of "
                        f"{', '.join(GPUS)}")
    return SAGEMAKER_GPUS[family]


def _sagemaker_device(cfg: Config, device: Device) -> Device:
    """The job's instances: SageMaker's training rate (termtune.aws.sagemaker's dated table) for all of them."""
    from dataclasses import replace

    from termtune.aws.sagemaker import USD_PER_HOUR

    sm = cfg.aws.sagemaker
    rate = sm.usd_per_hour or USD_PER_HOUR.get(cfg.aws.region, {}).get(sm.instance_type)
    return replace(device, instance=f"{sm.instance_count} x {sm.instance_type} (SageMaker)",
                   usd_per_hour=None if rate is None else round(rate * sm.instance_count, 4))


@dataclass(frozen=True)
class CmiPrice:
    usd_per_cmu_minute: float
    usd_per_cmu_month_storage: float
    source: str


# (region, CMU version). The pricing page's Custom Model Import section could not be read from here; these are the
# figures quoted from it by ../shared/reference/bedrock-cmi.md (from an AWS sample notebook) and by two independent
# public write-ups (looked up 2026-11-29). Verify on https://aws.amazon.com/bedrock/pricing/ before budgeting.
CMI_PRICES: dict[tuple[str, str], CmiPrice] = {
    ("us-east-1", "v1.0"): CmiPrice(0.05718, 1.95, "aws.amazon.com/bedrock/pricing Custom Model Import, as quoted in "
                                                   "reference/bedrock-cmi.md and public write-ups (2026-11-29)"),
    ("us-west-2", "v1.0"): CmiPrice(0.05718, 1.95, "same as us-east-1 per public write-ups quoting the pricing page "
                                                   "(2026-11-29)"),
    ("eu-central-1", "v1.0"): CmiPrice(0.07144, 1.95, "a public CMI runbook quoting the pricing page: $0.07144 per "
                                                      "CMU-minute in eu-central-1 (2026-11-29); storage assumed equal"),
}


@dataclass(frozen=True)
class KnownDataset:
    rows: int
    source: str


# Hub datasets whose size is known without downloading them (the plan touches no network).
KNOWN_DATASETS: dict[str, KnownDataset] = {
    "gamino/wiki_medical_terms": KnownDataset(6861, "huggingface.co/datasets/gamino/wiki_medical_terms dataset "
                                                    "viewer: 6,861 rows in the train split (2026-11-29)"),
}


def all_sourced_rows() -> dict[str, str]:
    """name -> source of every constant the plan uses (a test checks none is empty)."""
    rows = {f"CONSTANTS[{k}]": c.source for k, c in CONSTANTS.items()}
    rows |= {f"GPUS[{k}]": g.source for k, g in GPUS.items()}
    rows |= {f"CMI_PRICES[{r}/{v}]": p.source for (r, v), p in CMI_PRICES.items()}
    rows |= {f"KNOWN_DATASETS[{k}]": d.source for k, d in KNOWN_DATASETS.items()}
    for family in FAMILIES:
        rows |= family.plan_sources()
    return rows


def _c(name: str) -> float:
    return CONSTANTS[name].value


# ----------------------------------------------------------------------------- the model
# The shape is the model family's (termtune.families): it counts its parameters, LoRA weights, activations
# and FLOPs; what follows turns those counts into bytes and seconds.


def model_shape(cfg: Config) -> Any:
    """The shape the run will train: the architecture file (+ overrides), the local config, or a known Hub id."""
    return family_for(cfg, download=False).plan_shape(cfg)


def parameter_counts(s: Any) -> dict[str, int]:
    return s.parameter_counts()


def lora_parameters(s: Any, r: int, targets: str | list[str]) -> int:
    return s.lora_parameters(r, targets)


def activation_bytes(s: Any, rows: int, src: int, tgt: int, r: int, dropout_on: bool, bf16: bool,
                     checkpointing: bool) -> int:
    return s.activation_bytes(rows, src, tgt, r, dropout_on, bf16, checkpointing)


def base_bytes(s: Any, quantization: str) -> int:
    """Resident bytes of the frozen base as termtune loads it (fp32 weights; linears quantized under QLoRA).

    bitsandbytes quantizes the Linear layers only: embeddings, norms, biases and the lm_head (left out by
    transformers as the output layer) stay fp32.
    """
    p = s.parameter_counts()
    rest = (p["total"] - p["linear"]) * _c("fp32_bytes")
    if quantization == "4bit":
        return int(rest + p["linear"] * _c("nf4_bytes"))
    if quantization == "8bit":
        scales = sum(o * n for _, _, o, n in s.linear_layers()) * _c("fp32_bytes")
        return int(rest + p["linear"] * _c("int8_bytes") + scales)
    return int(p["total"] * _c("fp32_bytes"))


# ----------------------------------------------------------------------------- the data


@dataclass
class DataEstimate:
    origin: str
    """'prepared' (the data stage's files), 'sample' (tokenised sample of the source) or 'card' (row count only)."""
    train_rows: int
    test_rows: int
    source_lengths: list[int] = field(repr=False)
    target_lengths: list[int] = field(repr=False)
    test_target_max: int
    note: str = ""


def data_estimate(cfg: Config, sample_rows: int = 256) -> DataEstimate:
    """Token lengths of the training rows: exact when the data stage has run, else estimated without a download."""
    d = cfg.data
    train_file = RunLayout.of(cfg).split("train")
    if train_file.is_file():
        train = _read_lengths(train_file)
        test_file = RunLayout.of(cfg).split("test")
        test = _read_lengths(test_file) if test_file.is_file() else ([], [])
        return DataEstimate("prepared", len(train[0]), len(test[0]), train[0], train[1],
                            max(test[1], default=0), f"from {train_file}")
    if Path(d.source).expanduser().is_file():
        return _sample_source(cfg, sample_rows)
    known = KNOWN_DATASETS.get(d.source)
    if known is None:
        raise UserError(f"data.source: {d.source} is a Hub dataset the plan knows nothing about and it does not "
                        "download; run `termtune data prepare` first, then plan again")
    rows = min(known.rows, d.max_rows or known.rows)
    n_test = int(d.test_size) if d.test_size >= 1 else max(1, round(rows * d.test_size))
    n_train = rows - n_test
    return DataEstimate("card", n_train, n_test, [d.max_source_length] * n_train, [d.max_target_length] * n_train,
                        d.max_target_length, f"{known.rows} rows per the dataset card; every row at the maximum "
                        "lengths (an upper bound: run `termtune data prepare` for the real lengths)")


def _read_lengths(path: Path) -> tuple[list[int], list[int]]:
    src, tgt = [], []
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            src.append(len(row["input_ids"]))
            tgt.append(len(row["labels"]))
    return src, tgt


def _sample_source(cfg: Config, sample_rows: int) -> DataEstimate:
    """Read and check every row as the data stage does (term rows, or conversations for a family that trains on
    chat data); tokenise an evenly spread sample of the usable ones as the data stage would."""
    from termtune import conversations, data
    from termtune.modeling import load_tokenizer
    from termtune.rowcheck import Findings

    d = cfg.data
    family = family_for(cfg, download=False)
    source = data.read_source(cfg, family, lenient=True)
    if family.chat_data:  # split as the data stage splits rendered rows: by the term (first user turn) and answer
        examples = [{"term": c.term, "target": c.answer, "conversation": c} for c in source.conversations]
    else:
        examples = source.read.rows
    train, test = data.split_by_term(examples, d.test_size, cfg.run.seed)
    step = max(1, len(train) // sample_rows)
    tokenizer = load_tokenizer(cfg)

    def lengths(rows: list[dict]) -> tuple[list[int], list[int]]:
        if family.chat_data:  # rows the template refuses are skipped, as the data stage skips them
            found: dict[str, list[int]] = {"source": [], "target": []}
            conversations.render_conversations([r["conversation"] for r in rows], tokenizer, d.max_source_length,
                                               d.max_target_length, Findings(strict=False), found)
            sources, targets = found["source"], found["target"]
        else:
            encoded = family.encode(tokenizer, [r["prompt"] for r in rows], [r["target"] for r in rows])
            sources, targets = [len(x) for x in encoded[0]], [len(x) for x in encoded[1]]
        return [min(n, d.max_source_length) for n in sources], [min(n, d.max_target_length) for n in targets]

    src, tgt = lengths(train[::step][:sample_rows])
    n_sample = len(src)
    if not n_sample:
        raise UserError(f"{source.label}: the chat template renders none of the sampled training rows")
    test_src, test_tgt = lengths(test[:sample_rows])
    src, tgt = src + test_src, tgt + test_tgt
    # The training rows take the sampled lengths in turn, so the batch simulation sees their spread.
    src_train = [src[i % n_sample] for i in range(len(train))]
    tgt_train = [tgt[i % n_sample] for i in range(len(train))]
    return DataEstimate("sample", len(train), len(test), src_train, tgt_train, max(tgt[n_sample:], default=0),
                        f"{len(examples)} usable rows in {source.label}; lengths from a sample of {n_sample} "
                        "tokenised rows")


@dataclass
class Batching:
    steps_per_epoch: int
    batches_per_epoch: int
    padded_source: int
    padded_target: int
    real_source: int
    real_target: int
    worst: tuple[int, int, int, int]
    """The costliest batch (termtune trains it first): rows, source length, target length, real target tokens."""
    attention_pairs: tuple[int, int, int] = (0, 0, 0)
    """Sum over batches of rows x (source^2, target^2, source x target): the attention score entries."""
    padded_tokens: int = 0
    """Token slots of the padded batches as the family pads them (termtune.families.base.Family.padded_tokens):
    source and target as two streams, or prompt and answer as one, each padded to the batch's longest row."""
    lengths: list[list[tuple[int, int]]] = field(default_factory=list, repr=False)
    """Epoch 0's batches: (source, target) length of each row."""

    @property
    def padding_fraction(self) -> float:
        real = self.real_source + self.real_target
        return 1 - real / self.padded_tokens if self.padded_tokens else 0.0


def batching(cfg: Config, data: DataEstimate) -> Batching:
    """Epoch 0's batches exactly as termtune's sampler makes them (so padding and the worst batch are exact)."""
    from termtune.train import LengthGroupedBatchSampler

    t = cfg.train
    family = family_for(cfg, download=False)
    padded_tokens = packed_tokens if trains_packed(cfg, family) else family.padded_tokens
    sampler = LengthGroupedBatchSampler(data.source_lengths, data.target_lengths, batch_size=t.batch_size,
                                        max_tokens=t.max_tokens_per_batch, group_by_length=t.group_by_length,
                                        seed=cfg.run.seed, padded_tokens=padded_tokens)
    batches = list(sampler)
    pad_s = pad_t = real_s = real_t = ss = tt = st = slots = 0
    lengths = []
    for b in batches:
        s = [data.source_lengths[i] for i in b]
        g = [data.target_lengths[i] for i in b]
        pad_s, pad_t = pad_s + len(b) * max(s), pad_t + len(b) * max(g)
        real_s, real_t = real_s + sum(s), real_t + sum(g)
        ss, tt, st = ss + len(b) * max(s) ** 2, tt + len(b) * max(g) ** 2, st + len(b) * max(s) * max(g)
        slots += padded_tokens(s, g)
        lengths.append(list(zip(s, g)))
    first = batches[0]
    worst = (len(first), max(data.source_lengths[i] for i in first), max(data.target_lengths[i] for i in first),
             sum(data.target_lengths[i] for i in first))
    steps = math.ceil(len(batches) / t.gradient_accumulation_steps)
    return Batching(steps, len(batches), pad_s, pad_t, real_s, real_t, worst, (ss, tt, st), slots, lengths)


# ----------------------------------------------------------------------------- memory


def loss_bytes(s: Any, rows: int, tgt: int, real_tgt: int, bf16: bool, chunked: bool = True) -> int:
    """The lm_head and loss working memory: termtune's chunked loss keeps one chunk of logits, never the batch's."""
    if chunked:
        chunk = min(int(_c("loss_chunk_rows")), real_tgt)
        logits = chunk * s.vocab_size * (2 + 4 if bf16 else 4)  # bf16 logits + their fp32 log-softmax
        return int(logits + 2 * real_tgt * s.d_model * 4)  # + the kept hidden states and their gradient
    return int(rows * tgt * s.vocab_size * 4 * 3)  # logits, log-softmax, gradient


def eval_bytes(s: Any, rows: int, tgt: int) -> int:
    """The held-out loss pass (standard path, no gradient): full logits and their log-softmax, fp32."""
    return int(rows * tgt * s.vocab_size * 4 * 2)


# ----------------------------------------------------------------------------- time


def flops_per_epoch(s: Any, b: Batching, r: int, targets: str | list[str], checkpointing: bool,
                    head_trained: bool = False, packed: bool = False) -> float:
    """Training FLOPs of one epoch (the family's count), plus the forward work gradient checkpointing repeats.
    packed: the rows packed with no pad tokens, each attending to itself only (a shape that `packs`)."""
    total, recomputed = (s.training_flops(b, r, targets, head_trained, packed=True) if packed
                         else s.training_flops(b, r, targets, head_trained))
    if checkpointing:
        total += _c("gc_recompute") * recomputed
    return float(total)


def standard_loss_bytes(s: Any, b: Batching, head_trained: bool) -> float:
    """Memory traffic per epoch of the full logits on the standard loss path (only a trained lm_head takes it).

    Memory-bound, so it is timed at the memory bandwidth, not in FLOPs. termtune's chunked loss (the default,
    frozen head) moves its logits too, but that is inside the CPU efficiency, which was measured with it.
    """
    return _c("standard_loss_passes") * b.padded_target * s.vocab_size * 4 if head_trained else 0.0


def _best_seconds(work: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` timed calls of `work` (the others lose time to the rest of the machine)."""
    import time

    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def measure_cpu_bandwidth(repeats: int = 3) -> float:
    """This machine's memory bandwidth in bytes/s: a 256 MB fp32 tensor copied (read + write), best of `repeats`."""
    import torch

    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), repeats)


def measure_cpu_peak(repeats: int = 5, bf16: bool = False) -> float:
    """This CPU's FLOP/s: a 2048 x 2048 torch.mm (fp32, or bf16) on all cores, best of `repeats` (about half a second)."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    torch.mm(a, b)  # warm-up: oneDNN picks its kernel on the first call
    return 2 * 2048**3 / _best_seconds(lambda: torch.mm(a, b), repeats)


# ----------------------------------------------------------------------------- the plan


@dataclass
class Device:
    name: str
    memory_bytes: float
    peak_flops: float
    efficiency: float
    usd_per_hour: float | None
    instance: str | None
    bf16: bool


@dataclass
class Plan:
    config: str
    shape: dict[str, Any]
    params: dict[str, int]
    trainable: int
    quantization: str
    base_bytes: int
    data: dict[str, Any]
    memory: dict[str, int]
    """Training peak by part (bytes); 'total' is what the device must hold."""
    fits: bool
    device: dict[str, Any]
    epochs: float
    steps: int
    train_flops: float
    train_seconds: float
    cpu_seconds: float
    cpu_peak_flops: float
    """Measured 2048^2 matmul FLOP/s on this CPU, in the precision it trains in (cpu_bf16)."""
    money: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside LoRA (lora.modules_to_save); counted in `trainable`."""
    cpu_bf16: bool = False
    """train.precision=bf16 on this CPU (bf16 autocast, opt-in): its time is planned at the bf16 peak."""
    model: str = ""
    """The model in one line (its family's description of the shape)."""
    memory_by_quantization: dict[str, dict[str, int]] = field(default_factory=dict)
    """{"none", "4bit"} -> {"base", "total"}: the frozen base and the training peak without and with QLoRA,
    whichever model.quantization this run uses."""
    flops: dict[str, float] = field(default_factory=dict)
    """Training FLOPs of one epoch and per real (non-pad) token as termtune batches the rows; for a family whose
    rows can be packed (its shape `packs`), also with them packed (`epoch_packed`, `per_token_packed`)."""
    activations_measured: bool = True
    """False where the family's activation counts are counted from the layer shapes, not measured (an estimate)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def one_line(self) -> str:
        d = self.device
        cost = f", ~${self.money['train_usd']:.2f} on {d['instance']}" if self.money.get("train_usd") is not None else ""
        verdict = "fits" if self.fits else "does NOT fit"
        return (f"plan: {self.trainable / 1e6:.1f} M trainable of {self.params['total'] / 1e6:.0f} M; peak "
                f"{_gib(self.memory['total'])} {verdict} {d['name']} ({_gib(d['memory_bytes'])}); "
                f"~{_duration(self.train_seconds)} for {self.steps} steps{cost}")

    def summary(self) -> str:
        p, m, d, money = self.params, self.memory, self.device, self.money
        s = self.shape
        lines = [
            f"plan for the run in {self.config}",
            f"model: {self.model}",
            f"  parameters {p['total']:,} (embedding {p['embedding']:,}, linear {p['linear']:,}, lm_head "
            f"{p['lm_head']:,}); trainable {self.trainable:,} ({self.trainable / p['total']:.2%}): LoRA"
            + (f" and {', '.join(self.modules_to_save)} in full" if self.modules_to_save else ", no other modules"),
            f"  frozen base at quantization={self.quantization}: {_gib(self.base_bytes)}",
            f"data ({self.data['origin']}): {self.data['train_rows']:,} train / {self.data['test_rows']:,} held-out "
            f"rows; {self.data['real_source']:,} source + {self.data['real_target']:,} target tokens per epoch; "
            f"padding {self.data['padding_fraction']:.1%} with termtune's batching",
            f"  {self.data['note']}",
            f"training memory on {d['name']} (peak at the costliest batch, {self.data['worst']}):",
        ]
        activations = "activations" if self.activations_measured else "activations (estimate: counted, not measured)"
        labels = {"base": "frozen base", "lora_states": "LoRA weights + grads + AdamW (16 B/param)",
                  "activations": activations, "loss": "lm_head / loss working memory",
                  "eval": "held-out loss pass (GPU: instead of activations + loss)", "framework": "framework overhead",
                  "total": "total"}
        for key, label in labels.items():
            lines.append(f"  {label:<52}{_gib(m[key]):>10}")
        lines.append(f"  without gradient checkpointing activations would be {_gib(m['activations_no_gc'])}, with it "
                     f"{_gib(m['activations_gc'])}")
        headroom = d.get("headroom")
        lines.append(f"  {'fits' if self.fits else 'does NOT fit'} in {_gib(d['memory_bytes'])}"
                     + (f" with {headroom:.0%} headroom kept free" if headroom else ""))
        plain, qlora = self.memory_by_quantization["none"], self.memory_by_quantization["4bit"]
        lines.append(f"  without QLoRA (fp32 base, {_gib(plain['base'])}): peak {_gib(plain['total'])}; with QLoRA "
                     f"(model.quantization=4bit, NF4 base, {_gib(qlora['base'])}): peak {_gib(qlora['total'])}")
        f = self.flops
        lines += [
            f"training time: {self.train_flops / 1e12:.2f} TFLOP per run ({self.epochs:g} epochs, {self.steps} "
            "optimizer steps)",
            f"  {f['epoch'] / 1e12:.2f} TFLOP per epoch in termtune's {f['batches']} batches = "
            f"{f['per_token'] / 1e9:.3f} GFLOP per real token",
        ]
        if "epoch_packed" in f:
            lines.append(f"  packed (no pad tokens, each row attending to itself): {f['epoch_packed'] / 1e12:.2f} "
                         f"TFLOP per epoch = {f['per_token_packed'] / 1e9:.3f} GFLOP per token, "
                         f"{1 - f['epoch_packed'] / f['epoch']:.0%} less; the times are the padded ones "
                         "(train.packing trains packed)")
        if d["instance"]:
            lines.append(f"  {d['name']}: {_duration(self.train_seconds)} at {d['efficiency']:.0%} of "
                         f"{d['peak_flops'] / 1e12:.0f} TFLOP/s dense bf16 peak")
        lines += [
            f"  this CPU: {_duration(self.cpu_seconds)} at {_cpu_efficiency(self.cpu_bf16):.0%} of "
            f"{self.cpu_peak_flops / 1e9:.0f} GFLOP/s ({'bf16' if self.cpu_bf16 else 'fp32'} matmul, measured now)",
            "money:",
        ]
        if money.get("train_usd") is not None:
            lines.append(f"  training on {d['instance']} ({d['name']}, ${d['usd_per_hour']}/h on demand, "
                         f"{money['region']}): ${money['train_usd']:.2f}")
        lines += [
            f"  artifact ({money['export_dtype']}): {money['artifact_bytes'] / 1e9:.2f} GB; S3 ${money['s3_usd_month']:.3f}"
            " per month",
            f"  Bedrock CMI ({money['region']}, CMU {money['cmu_version']}): ${money['usd_per_cmu_minute']} per "
            f"CMU-minute, billed in {money['window_minutes']:g}-minute windows from the first call = "
            f"${money['usd_per_window_per_cmu']:.4f} per active window per CMU; storage ${money['storage_per_cmu_month']}"
            f" per CMU-month ({money['price_source']})",
            f"  CMUs per model copy: {money['cmus'] if money['cmus'] else 'known only after import'}"
            f"{' (recorded by deploy)' if money['cmus'] else ''}. Bedrock sets it at import from the model; AWS "
            "publishes no rule from size to CMUs (import-model-calculate-cost.html: read it from GetImportedModel), "
            "and `termtune deploy` records it. Cost = copies x CMUs x windows x the window price.",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan(cfg: Config, gpu: str | None = None, cpu_peak: float | None = None,
         cpu_bandwidth: float | None = None) -> Plan:
    """Estimate memory, time and money for `cfg` on `gpu` (a GPUS key), or on this machine's CPU when None.

    `cpu_peak` (FLOP/s) and `cpu_bandwidth` (bytes/s) skip measuring this CPU (tests pass fixed values).
    """
    if gpu is not None and gpu.lower() not in GPUS:
        raise UserError(f"--gpu {gpu}: unknown GPU (known: {', '.join(GPUS)})")
    on_sagemaker = gpu is None and cfg.train.on == "sagemaker"  # the job's instance, not this machine
    if on_sagemaker:
        gpu = sagemaker_gpu(cfg.aws.sagemaker.instance_type)
    shape = model_shape(cfg)
    shape.check_lora_rank(cfg.lora.r, cfg.lora.target_modules)
    params = shape.parameter_counts()
    trainable = shape.lora_parameters(cfg.lora.r, cfg.lora.target_modules)
    # lora.modules_to_save trains a full copy of each named module beside the adapters
    trainable += sum({"lm_head": params["lm_head"], "shared": params["embedding"]}.get(name, 0)
                     for name in cfg.lora.modules_to_save)
    data = data_estimate(cfg)
    if data.train_rows == 0:
        raise UserError("the training split is empty; nothing to plan")
    batches = batching(cfg, data)
    cpu_bf16 = cfg.train.precision == "bf16"  # an opt-in on a CPU (termtune.train.resolve_precision)
    cpu_peak = cpu_peak or measure_cpu_peak(bf16=cpu_bf16)
    device = _device(gpu, cpu_peak, cfg, cpu_bf16)
    if on_sagemaker:
        device = _sagemaker_device(cfg, device)
    gc = cfg.train.gradient_checkpointing
    dropout_on = cfg.lora.dropout > 0 or shape.dropout > 0
    rows, src, tgt, real_tgt = batches.worst
    act = {flag: shape.activation_bytes(rows, src, tgt, cfg.lora.r, dropout_on, device.bf16, flag)
           for flag in (False, True)}
    base = base_bytes(shape, cfg.model.quantization)
    eval_rows = min(cfg.train.batch_size, max(1, data.test_rows))
    memory = {"base": base, "lora_states": int(trainable * _c("lora_state_bytes")), "activations": act[gc],
              "loss": shape.loss_bytes(rows, src + tgt) if shape.own_loss(on_gpu=gpu is not None)
              else loss_bytes(shape, rows, tgt, real_tgt, device.bf16),
              "eval": eval_bytes(shape, eval_rows, data.test_target_max) if data.test_rows else 0,
              "framework": int(_c("cpu_framework_bytes") if gpu is None else _c("cuda_context_bytes"))}
    step = memory["activations"] + memory["loss"]
    # On a CPU the freed activations stay in the process's heap (glibc keeps chunks below its 32 MiB mmap
    # threshold), so the held-out pass's large logits add to them; a GPU's caching allocator reuses the space.
    transient = step + memory["eval"] if gpu is None else max(step, memory["eval"])
    memory["total"] = memory["base"] + memory["lora_states"] + memory["framework"] + transient
    memory["activations_no_gc"], memory["activations_gc"] = act[False], act[True]
    # The same run over an unquantized and a QLoRA base, whichever this config loads: only the base differs
    # (prepare_model_for_kbit_training keeps gradient checkpointing as train.gradient_checkpointing sets it).
    by_quantization = {q: {"base": base_bytes(shape, q), "total": memory["total"] - base + base_bytes(shape, q)}
                       for q in ("none", "4bit")}
    usable = device.memory_bytes * (1 - (_c("gpu_headroom") if gpu else 0))
    fits = memory["total"] <= usable

    packed = trains_packed(cfg, family_for(cfg, download=False))
    epochs = cfg.train.epochs
    steps = batches.steps_per_epoch * epochs if cfg.train.max_steps < 0 else cfg.train.max_steps
    epoch_share = steps / max(1, batches.steps_per_epoch)
    head_trained = "lm_head" in cfg.lora.modules_to_save
    epoch_flops = flops_per_epoch(shape, batches, cfg.lora.r, cfg.lora.target_modules, gc, head_trained,
                                  packed=packed)
    flops = epoch_flops * epoch_share
    real_tokens = batches.real_source + batches.real_target
    flop_counts = {"epoch": epoch_flops, "per_token": epoch_flops / real_tokens,
                   "batches": "packed" if packed else "padded"}
    if shape.packs and not packed:  # what the same epoch would cost with the rows packed: no pad tokens
        packed = flops_per_epoch(shape, batches, cfg.lora.r, cfg.lora.target_modules, gc, head_trained, packed=True)
        flop_counts |= {"epoch_packed": packed, "per_token_packed": packed / real_tokens}
    loss_traffic = standard_loss_bytes(shape, batches, head_trained) * epoch_share
    if loss_traffic and cpu_bandwidth is None:
        cpu_bandwidth = measure_cpu_bandwidth()
    # per optimizer step: framework overhead; per epoch on the standard loss path: the logits' memory traffic
    cpu_extra = steps * _c("cpu_step_overhead_s") + (loss_traffic / cpu_bandwidth if loss_traffic else 0.0)
    seconds = flops / (device.peak_flops * device.efficiency) + (cpu_extra if gpu is None else 0)
    cpu_seconds = flops / (cpu_peak * _cpu_efficiency(cpu_bf16)) + cpu_extra
    notes = []
    if cfg.model.quantization != "none" and gpu is None:
        notes.append("4-bit/8-bit layers dequantize their weights on every pass; that is not in the FLOP count "
                     "(measured 0.8-1.3x this plan's time on a 2-core CPU; docs/plan.md)")
    if cpu_bf16 and gpu is None:
        notes.append("bf16 autocast on a CPU: the benchmark run's peak memory was 1.65x this plan's, which "
                     "models GPU autocast (docs/plan.md)")
    if set(cfg.lora.modules_to_save) - {"lm_head"}:
        notes.append(f"{', '.join(sorted(set(cfg.lora.modules_to_save) - {'lm_head'}))} trained in full: their "
                     "gradients are not in the FLOP count, so the time is a lower bound")
    if on_sagemaker and device.usd_per_hour is None:
        notes.append(f"no SageMaker price for {cfg.aws.sagemaker.instance_type} in {cfg.aws.region}: set "
                     "aws.sagemaker.usd_per_hour (docs/sagemaker.md)")
    if data.origin == "card":
        notes.append("no token lengths without the data: memory and time are upper bounds at the maximum lengths")
    return Plan(
        config=str(cfg.run_dir), shape=asdict(shape), params=params, trainable=trainable,
        quantization=cfg.model.quantization, base_bytes=base,
        data={"origin": data.origin, "train_rows": data.train_rows, "test_rows": data.test_rows,
              "real_source": batches.real_source, "real_target": batches.real_target,
              "padded_source": batches.padded_source, "padded_target": batches.padded_target,
              "padded_tokens": batches.padded_tokens,
              "padding_fraction": batches.padding_fraction, "steps_per_epoch": batches.steps_per_epoch,
              "worst": f"{rows} rows x {src} source + {tgt} target tokens", "note": data.note},
        memory=memory, fits=fits, device={**asdict(device), "headroom": _c("gpu_headroom") if gpu else 0.0},
        epochs=epochs, steps=int(steps), train_flops=flops, train_seconds=seconds, cpu_seconds=cpu_seconds,
        cpu_peak_flops=cpu_peak, money=_money(cfg, params["total"], device, seconds), notes=notes,
        modules_to_save=list(cfg.lora.modules_to_save), cpu_bf16=cpu_bf16, model=shape.describe(),
        memory_by_quantization=by_quantization, flops=flop_counts,
        activations_measured=shape.activations_measured)


def _cpu_efficiency(bf16: bool) -> float:
    return _c("cpu_bf16_efficiency") if bf16 else _c("cpu_efficiency")


def _device(gpu: str | None, cpu_peak: float, cfg: Config, cpu_bf16: bool) -> Device:
    if gpu is None:
        import os

        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            memory = 0
        return Device("this CPU", float(memory), cpu_peak, _cpu_efficiency(cpu_bf16), None, None, bf16=cpu_bf16)
    g = GPUS[gpu.lower()]
    return Device(g.name, g.memory_gib * GiB, g.bf16_tflops * 1e12, _c("gpu_efficiency"), g.usd_per_hour,
                  g.instance, bf16=cfg.train.precision in ("auto", "bf16"))


def _money(cfg: Config, total_params: int, device: Device, seconds: float) -> dict[str, Any]:
    region = cfg.aws.region
    cmus, version = _recorded_cmus(cfg)
    price = CMI_PRICES.get((region, version)) or CMI_PRICES[("us-east-1", "v1.0")]
    export_bytes = {"fp32": 4, "bf16": 2, "fp16": 2}[cfg.export.dtype]
    artifact = total_params * export_bytes + _c("tokenizer_bytes")
    window = _c("cmi_window_minutes")
    return {
        "region": region, "cmu_version": version,
        "train_usd": None if device.usd_per_hour is None else device.usd_per_hour * seconds / 3600,
        "export_dtype": cfg.export.dtype, "artifact_bytes": int(artifact),
        "s3_usd_month": artifact / 1e9 * _c("s3_usd_per_gb_month"),
        "usd_per_cmu_minute": price.usd_per_cmu_minute, "window_minutes": window,
        "usd_per_window_per_cmu": price.usd_per_cmu_minute * window,
        "storage_per_cmu_month": price.usd_per_cmu_month_storage, "cmus": cmus, "price_source": price.source,
        "price_is_for": "us-east-1 (no price on record for this region)" if (region, version) not in CMI_PRICES
        else region,
    }


def _recorded_cmus(cfg: Config) -> tuple[int | None, str]:
    """CMUs per copy and CMU version as deploy recorded them in deploy.json, else unknown and v1.0."""
    record = read_json(RunLayout.of(cfg).deploy)
    # deploy keeps GetImportedModel's facts under "imported_model", in the response's own names
    imported = record.get("imported_model") if isinstance(record, dict) else None
    units = (imported or {}).get("customModelUnits") if isinstance(imported, dict) else None
    if not isinstance(units, dict):
        return None, "v1.0"
    count = units.get("customModelUnitsPerModelCopy")
    return (count if isinstance(count, int) else None), str(units.get("customModelUnitsVersion") or "v1.0")


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ----------------------------------------------------------------------------- for `termtune run` and the report


def before_training(cfg: Config, force: bool = False) -> str:
    """The plan in one line, for `termtune run` before training. Raises UserError when the training peak does
    not fit the device that trains (this machine's GPU, else its RAM), unless `force`; a plan that cannot be
    made (a Hub model of unknown shape) says why and refuses nothing, and so does a plan of this CPU on a
    machine whose GPU is not in GPUS (the training runs on a device the plan does not describe)."""
    gpu = _this_gpu()
    try:
        planned = plan(cfg, gpu=gpu)
    except UserError as e:
        return f"plan: not available ({e})"
    if not planned.fits and not force and (gpu is not None or _gpu_name() is None):
        d = planned.device
        raise UserError(f"train: the planned training peak of {_gib(planned.memory['total'])} does not fit "
                        f"{d['name']} ({_gib(d['memory_bytes'])}); `termtune plan` shows where it goes. Lower "
                        "train.batch_size, set train.gradient_checkpointing=true or model.quantization=4bit, "
                        "or run with --force to train anyway")
    return planned.one_line()


def _this_gpu() -> str | None:
    """The GPUS key of this machine's GPU, or None (CPU, or a GPU not in the table: planned as the CPU)."""
    name = _gpu_name()
    return next((key for key in GPUS if key in name.replace(" ", "")), None) if name else None


def _gpu_name() -> str | None:
    """This machine's CUDA GPU, lower case, or None."""
    try:
        import torch

        return torch.cuda.get_device_name(0).lower() if torch.cuda.is_available() else None
    except Exception:  # a broken CUDA install must not stop a run over a one-line estimate
        return None


def compare_with_measured(cfg: Config, planned: Plan | None = None) -> list[dict[str, Any]]:
    """Rows of (quantity, planned, measured, ratio) for a trained run, for the report. Empty before training.

    Reads <run>/train/result.json (and metrics.jsonl for the step count); the peak memory is compared when the
    train stage recorded it (`peak_memory_bytes`).
    """
    result = read_json(RunLayout.of(cfg).train_result)
    if not isinstance(result, dict):
        return []
    if planned is None:
        planned = plan(cfg, gpu=_gpu_key(result.get("device")))
    rows = [
        ("trainable parameters", planned.trainable, result.get("trainable_params")),
        ("optimizer steps", planned.steps, result.get("global_step")),
        ("padding fraction", round(planned.data["padding_fraction"], 4), result.get("padding_fraction")),
        ("training time (s)", round(planned.train_seconds, 1), result.get("train_seconds")),
        ("peak memory (GiB)", round(planned.memory["total"] / GiB, 3),
         round(result["peak_memory_bytes"] / GiB, 3) if result.get("peak_memory_bytes") else None),
    ]
    out = []
    for name, p, m in rows:
        ratio = (m / p) if isinstance(m, (int, float)) and p else None
        out.append({"quantity": name, "planned": p, "measured": m,
                    "measured_over_planned": None if ratio is None else round(ratio, 3)})
    return out


def _gpu_key(device: str | None) -> str | None:
    if not device:
        return None
    name = device.lower().replace(" ", "")
    return next((key for key in GPUS if key in name), None)
