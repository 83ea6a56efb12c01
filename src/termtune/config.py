"""One typed configuration for every termtune stage.

A run is described by one YAML file (see configs/) plus dotted command-line overrides:

    termtune train configs/demo.yaml train.learning_rate=3e-4 run.dir=runs/try2

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key is an error
with a did-you-mean instead of a silently ignored setting. Cross-field rules that would
otherwise fail hours into a run (fp16 with T5, merging onto a quantized base) are checked
here, at load time.

Relative paths in a config are resolved against the current working directory, so the
same config works from the CLI, from scripts and from tests.
"""

from __future__ import annotations

import difflib
import json
import string
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from termtune.errors import UserError


MAX_CONFIG_BYTES = 1 * 2**20
"""A termtune config is a few KB; anything near this size is a mistake or an attack."""
MAX_YAML_VALUES = 10_000
"""Values a config may hold once YAML aliases are expanded (the demo has about 100): a 600-byte alias
bomb otherwise expands to millions, which every later stage then copies, dumps and hashes."""
PREFIX_PLACEHOLDERS = ("run_name",)
MAX_EPOCHS = 1000
"""Fine-tuning takes a few epochs; the bound refuses a typo such as 1e300, a run that would never end."""


class Section(BaseModel):
    """A config section. Assigning to a setting (`cfg.train.epochs = 2`, `cfg.lora = {"r": 8}`) is checked
    as loading is: the value's type and range, then the whole config's cross-field rules; a refused value
    raises UserError naming the key and leaves the config as it was."""

    # allow_inf_nan=False: an infinite learning rate or timeout is never meant, and trains a NaN model.
    # use_attribute_docstrings: the string under each setting is its description (Field.description,
    # the JSON schema, docs/config-reference.md), written once.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)
    _owner: Optional["Config"] = PrivateAttr(None)
    """The Config holding this section, whose rules an assignment to this section must also pass."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in type(self).model_fields:  # private attributes
            return super().__setattr__(name, value)
        before = self.__dict__[name]
        try:
            super().__setattr__(name, value)  # the field's type and range (a Config: also its rules)
            if self._owner is not None:
                self._owner.check_rules()
        except (ValidationError, ValueError) as e:
            self.__dict__[name] = before  # pydantic has already stored the value when a model-level rule refuses it
            # a cross-field rule's message names its keys; a field's error is named by its dotted key
            raise UserError(_describe(e, self._prefix()) if isinstance(e, ValidationError) else str(e)) from None

    def _prefix(self) -> str:
        """'train.' for the Config's train section: how a config file spells this section's keys."""
        owner = self._owner
        if owner is None:
            return ""
        return next((f"{key}." for key in type(owner).model_fields if getattr(owner, key) is self), "")

    def __eq__(self, other: object) -> bool:
        # the settings only: pydantic would also compare _owner, and through it every other section
        return type(self) is type(other) and self.__dict__ == other.__dict__  # type: ignore[union-attr]

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # No path, id or name holds one, and the OS answers a path with a NUL by a traceback, not an error.
        if isinstance(value, (str, Path)) and "\x00" in str(value):
            raise ValueError("contains a NUL character")
        return value


class RunConfig(Section):
    dir: Path = Path("runs/default")
    """Run directory: every stage reads its inputs from here and writes its outputs here."""
    seed: int = Field(42, ge=0, lt=2**32)
    """Seed for the split, model initialisation, LoRA init and data order (0 to 2^32-1, what numpy accepts)."""


class ModelConfig(Section):
    source: str = "google/flan-t5-large"
    """Hub id or local directory of the base model (weights + config + tokenizer), or a .gguf file: converted
    once into an ordinary folder in export.dtype, kept in termtune's cache (docs/gguf.md)."""
    init: Literal["pretrained", "random"] = "pretrained"
    """'pretrained' loads weights from `source`; 'random' builds a randomly initialised model
    from `architecture` (for offline demos and tests; no weights needed)."""
    architecture: str | None = None
    """For init=random: a config.json (or a folder holding one) that gives the shape."""
    architecture_overrides: dict[str, Any] = Field(default_factory=dict)
    """For init=random: config values to change, e.g. {num_layers: 2, num_decoder_layers: 2}."""
    tokenizer: str | None = None
    """Hub id or folder of the tokenizer; defaults to `source`."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """Load the frozen base in 4-bit NF4 (double quantization) or 8-bit for QLoRA training.
    Export always reloads the base unquantized before merging."""
    allow_pickle: bool = False
    """Allow loading .bin (pickle) weights. Pickle can run code: off unless you trust the source."""


class DataConfig(Section):
    source: str = "gamino/wiki_medical_terms"
    """Hub dataset id, or a local .jsonl/.json/.csv/.parquet file: term/definition rows, or for a decoder-only model
    also chat (`messages`) or `prompt`/`completion` rows (docs/data-formats.md)."""
    hub_split: str = "train"
    """Which split of a Hub dataset to read."""
    revision: str | None = None
    """Hub dataset revision (a commit sha pins the data; None: the latest, which a re-run cannot tell apart)."""
    term_column: str | None = None
    """Column holding the term. None: recognise `term` or `page_title`."""
    definition_column: str | None = None
    """Column holding the definition. None: recognise `definition` or `page_text`."""
    prompt_template: str = "What is {term}?"
    """Input text for each row; `{term}` is replaced by the term."""
    target: Literal["full", "first_paragraph", "first_n_sentences"] = "full"
    """How much of the definition to train on (after a leading heading such as "Summary :" or "Key Points")."""
    n_sentences: int = Field(2, ge=1)
    """For target=first_n_sentences: how many sentences to keep."""
    duplicates: Literal["keep_first", "error"] = "keep_first"
    """Policy for a term that appears more than once (case, Unicode form and width, zero-width characters and
    repeated spaces do not make a term new)."""
    strict: bool = False
    """Turn every validation finding into an error instead of a counted skip."""
    max_rows: int | None = Field(None, ge=1)
    """Use only the first N usable rows (after cleaning), e.g. for a quick demo."""
    max_chars: int = Field(100_000, ge=1)
    """Rows whose term or definition (in a conversation: any turn) is longer than this are overlong (skipped)."""
    test_size: float = Field(0.1, gt=0)
    """Held-out share (0 < x < 1) or number of held-out rows (x >= 1)."""
    max_source_length: int = Field(128, ge=8)
    """Tokens kept of each prompt; longer prompts are cut (still ending in eos; through a chat template they keep
    their end: the latest turns and the generation prompt). Raise it when `termtune data prepare` reports many
    prompts truncated; memory and time per batch grow with it."""
    max_target_length: int = Field(512, ge=8)
    """Tokens kept of each definition or answer; longer ones are cut (still ending in eos or the end-of-turn token),
    so the model never sees their end. Raise it when data prepare reports many targets truncated, or shorten
    them with `target`."""


class LoraConfig(Section):
    r: int = Field(64, ge=1)
    """Rank of each adapter (PEFT LoRA): trainable parameters per adapted layer are r x (inputs + outputs).
    Lower it (8-16) for small data or tight memory, raise it for more capacity; at most the narrowest
    targeted layer's width (a larger r is refused)."""
    alpha: int = Field(16, ge=1)
    """Scale of the adapters' update: it is multiplied by alpha / r (16/64 = 0.25 by default). When you change
    `r`, change alpha with it to keep the same scale, or retune train.learning_rate."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Probability (0 to below 1) that each input to an adapter is zeroed during training; 0 turns it off. Raise
    it when the held-out loss rises while the training loss falls (overfitting), lower it on large data."""
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    """'all-linear' or a list of module names such as [q, v]."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Bias vectors trained beside the adapters (PEFT): none, all (every bias in the model) or lora_only (those
    of the adapted layers). In a model without bias vectors the three train the same."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full beside the adapters, e.g. [lm_head] (PEFT's modules_to_save); export merges
    them. A pretrained base needs none; a random-init one learns little through frozen random output weights."""

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: Any) -> Any:
        if isinstance(value, list) and not [name for name in value if name.strip()]:
            raise ValueError("no module names: LoRA would train nothing; name modules such as [q, v] or use all-linear")
        return value


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0, le=MAX_EPOCHS)
    """Passes over the training split, fractions allowed (0.5: half of it; at most 1000). Raise it while the
    held-out loss still falls at the end of training; lower it when it rises again (overfitting)."""
    max_steps: int = Field(-1, ge=-1)
    """Stop after this many optimizer steps, overriding `epochs` (-1: run `epochs`). For a quick trial run."""
    batch_size: int = Field(4, ge=1)
    """Examples per device per step (ignored when max_tokens_per_batch is set). 4 is fastest per token on
    CPU (larger batches spill out of cache); raise it on GPUs."""
    max_tokens_per_batch: int | None = Field(None, ge=1)
    """Token budget per batch (padded source + target tokens) instead of a fixed batch size. Set it when
    lengths vary widely: short rows then share large batches and long rows small ones, under one memory bound."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Batches whose gradients add up to one optimizer step: the effective batch is batch_size x this x the
    number of GPUs. Raise it for a larger batch than memory holds; max_steps, save_steps, eval_steps and
    logging_steps count optimizer steps."""
    learning_rate: float = Field(1e-3, gt=0)
    """Peak learning rate of the AdamW optimizer (no unit), reached after the warmup. Lower it (e.g. 3e-4)
    when training diverges or the loss jumps about; raise it when the loss falls too slowly."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """How the learning rate moves after the warmup: linear or cosine decay to 0 at the last step, or constant.
    `constant` ignores warmup_ratio; use constant_with_warmup to warm up and then hold."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Share of all optimizer steps (0 to below 1) over which the learning rate rises from 0 to learning_rate.
    Set 0.03-0.1 when the first steps' loss spikes or diverges."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay: each step shrinks the trained weights (not biases or norms) by
    learning_rate x this. 0 (off) suits LoRA; try 0.01 against overfitting on small data."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradients are scaled down before each step so that their combined L2 norm is at most this (0: no
    clipping). Lower it when the loss spikes; raise it only if clipping slows learning."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on GPUs that support it, fp32 on CPU. bf16 on a CPU with bf16 instructions (AVX512-BF16,
    AMX) is ~7 % faster but needs up to 1.6x the memory (BENCHMARKS.md)."""
    allow_fp16: bool = False
    """T5 overflows to inf/NaN in fp16; set this only if you know your checkpoint survives it."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    group_by_length: bool = True
    """Batch examples of similar length together so little compute is spent on padding."""
    packing: bool | None = None
    """Each batch as one row of its examples end to end, no padding; attention and loss stay within each example
    (position ids restart); max_tokens_per_batch then counts real tokens. null: on where the model can pack
    (decoders: no pad tokens computed; BENCHMARKS.md, "Packing"), off for encoder-decoders, which cannot."""
    eval_steps: int | None = Field(None, ge=1)
    """Held-out loss every N steps (None: every epoch)."""
    save_steps: int = Field(50, ge=1)
    """Checkpoint every N optimizer steps."""
    save_total_limit: int = Field(2, ge=1)
    """Keep at most N checkpoints."""
    logging_steps: int = Field(10, ge=1)
    """Log the loss (its mean since the last log) and throughput every N optimizer steps, to the progress
    display and <run>/train/metrics.jsonl, which the report's loss curve draws. Lower it on short runs."""
    dataloader_workers: int = Field(0, ge=0)
    """Worker processes that collate training batches in the background (0: in the training process). The
    data is tokenized beforehand, so 0 is enough unless a fast GPU waits for batches."""
    on: Literal["local", "sagemaker"] = "local"
    """Where `termtune train` (and `run`) trains: on this machine, or as an Amazon SageMaker training job
    set up by aws.sagemaker (docs/sagemaker.md). The data is prepared here first either way."""

    @field_validator("max_steps")
    @classmethod
    def _steps_to_run(cls, value: int) -> int:
        if value == 0:
            raise ValueError("0 steps would train nothing; use -1 to run train.epochs, or a positive number")
        return value


class EvalConfig(Section):
    max_new_tokens: int = Field(128, ge=1)
    """Most new tokens per evaluated answer (never the library's 20-token default). Raise it when the report
    says many answers stopped at it."""
    num_beams: int = Field(1, ge=1)
    """Beam search width for the evaluated answers (1: greedy decoding). Each beam is one more candidate answer
    kept per prompt, at about that many times the generation cost."""
    no_repeat_ngram_size: int = Field(0, ge=0)
    """An integer n (0 = off); the seed recipe's `True` silently meant 1."""
    batch_size: int = Field(16, ge=1)
    """Prompts generated together during evaluation (train.batch_size sets the held-out loss's). Lower it when
    evaluation runs out of memory, raise it on a large GPU to evaluate faster."""
    max_examples: int | None = Field(None, ge=1)
    """Evaluate on at most N held-out rows."""
    compare_base: bool = True
    """Also generate with the base model on the same prompts."""
    samples_in_report: int = Field(10, ge=0)
    """Held-out predictions shown in the report's Samples section (0: none). Changing it does not
    re-run evaluation."""


class ExportConfig(Section):
    dtype: Literal["bf16", "fp32", "fp16"] = "bf16"
    """Number format of the exported weights, and config.json's torch_dtype, which Bedrock loads them in. The
    merge runs in fp32 and is rounded once: bf16 is half fp32's size; fp32 keeps the merged weights exact at
    twice the upload and storage. fp16 is refused for T5 (see allow_fp16)."""
    allow_fp16: bool = False
    """Permit export.dtype=fp16, refused by default because T5 overflows to inf/NaN in fp16 at inference.
    Set it only for a checkpoint you know survives fp16."""
    max_shard_size: str = "5GB"
    """Shard the safetensors weights above this size (e.g. 2GB, 500MB)."""
    dir: Path | None = None
    """Artifact folder (default: <run.dir>/artifact)."""


class CmuPrice(Section):
    per_minute: float = Field(gt=0)
    """US dollars per Custom Model Unit per minute of an active model copy."""
    storage_per_month: float | None = Field(None, ge=0)
    """US dollars per Custom Model Unit per month of storage (None: not known)."""
    source: str = ""
    """Where and when the price was read."""


# Bedrock's Custom Model Import prices, per region and customModelUnitsVersion. Billing is per
# 5-minute window of an active model copy (docs: import-model-calculate-cost.html). The v1.0
# figures are those the issue cites from AWS's pricing page and AWS's Qwen3 CMI sample notebook
# (aws-samples/amazon-bedrock-samples, Jan 2026: 4 CMU -> $7.80/month storage, ~$0.23/min);
# the pricing page itself (aws.amazon.com/bedrock/pricing, "Custom Model Import") could not be
# read from this machine on 2026-11-29: check it before relying on these, and add your region.
DEFAULT_CMU_PRICES = {
    "us-east-1": {"v1.0": CmuPrice(per_minute=0.05718, storage_per_month=1.95,
                                   source="AWS Bedrock pricing page as cited in AWS's Qwen3 CMI sample, "
                                          "Jan 2026; unverified here 2026-11-29")},
}


SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(value: Any) -> Any:
    """4h, 90m, 1d, 3600s or a number of seconds -> whole seconds (other values are left to pydantic)."""
    if isinstance(value, str):
        text = value.strip().lower()
        unit = text[-1:] if text[-1:] in SECONDS_PER_UNIT else "s"
        number = text[:-1] if text[-1:] in SECONDS_PER_UNIT else text
        try:
            seconds = float(number) * SECONDS_PER_UNIT[unit]
        except ValueError:
            raise ValueError(f"{value!r} is not a duration; write e.g. 4h, 90m, 1d or a number of seconds") from None
        if seconds != int(seconds):
            raise ValueError(f"{value!r} is not a whole number of seconds")
        return int(seconds)
    return value


class SageMakerVpcConfig(Section):
    subnets: list[str] = Field(default_factory=list)
    """Subnet ids the job's instances run in (VpcConfig.Subnets); give security_group_ids with them."""
    security_group_ids: list[str] = Field(default_factory=list)
    """Security group ids of the job's instances (VpcConfig.SecurityGroupIds); give subnets with them."""


class SageMakerConfig(Section):
    instance_type: str = "ml.g5.2xlarge"
    """Instance type of the training job (one of SageMaker's, e.g. ml.g5.2xlarge: 1 A10G with 24 GB)."""
    instance_count: int = Field(1, ge=1, le=100)
    """Instances; torchrun spans them all, one process per GPU."""
    volume_gb: int = Field(100, ge=1, le=16384)
    """Storage per instance in GB (ResourceConfig.VolumeSizeInGB): the base model, checkpoints and the export."""
    image: str | None = None
    """Training image URI; None: the Hugging Face PyTorch Deep Learning Container termtune is tested with, for
    aws.region and GPU or CPU (docs/sagemaker.md). Set it for a custom or VPC-mirrored image."""
    spot: bool = False
    """Managed spot training: billed for less, may be interrupted; the job resumes from its S3 checkpoints."""
    max_runtime: int = Field(4 * 3600, ge=1, le=28 * 86400)
    """Longest the job may train before SageMaker stops it (4h, 90m, 1d or seconds; at most 28 days)."""
    max_wait: int | None = Field(None, ge=1, le=28 * 86400)
    """With spot: longest to wait for spot capacity and train, at least max_runtime (None: twice max_runtime,
    at most 28 days)."""
    checkpoints: bool = True
    """Sync the job's checkpoints to S3 (CheckpointConfig), so a spot interruption or a re-run resumes.
    Spot needs it."""
    role_arn: str | None = None
    """Execution role the job runs as; None: termtune creates termtune-sagemaker-<run id>, allowed only this
    run's S3 prefix, the job's logs and metrics, the image's ECR repository and the KMS keys set here."""
    vpc: SageMakerVpcConfig = Field(default_factory=SageMakerVpcConfig)
    """Run the job's instances in your VPC (both lists, or neither)."""
    network_isolation: bool = False
    """No network at all inside the job (EnableNetworkIsolation): the base model must be a local folder
    (sent as the job's model channel) and the image must hold every requirement."""
    output_kms_key_id: str | None = None
    """KMS key (id, alias or ARN) that encrypts the job's output in S3; resolved to its key ARN."""
    volume_kms_key_id: str | None = None
    """KMS key (id, alias or ARN) that encrypts the instances' storage volume; resolved to its key ARN."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Tags on the job, besides termtune's own (project, run, fingerprint); at most 47."""
    job_name: str | None = None
    """Training job name (default: tt-<run>-<timestamp>); 1 to 63 letters, digits and hyphens, unique in the
    account and region."""
    usd_per_hour: float | None = Field(None, gt=0)
    """On-demand price of one instance-hour, for the cost termtune prints; None: termtune's dated price table
    (docs/sagemaker.md), which knows the common GPU instances in a few regions."""
    poll_seconds: float = Field(15, gt=0)
    """Seconds between two status and log checks while termtune follows a job."""
    detach: bool = False
    """Return as soon as the job is submitted (termtune train --detach); `termtune jobs attach` follows it later."""

    @field_validator("max_runtime", "max_wait", mode="before")
    @classmethod
    def _durations(cls, value: Any) -> Any:
        return _seconds(value)


class AwsConfig(Section):
    region: str = "us-east-1"
    """AWS region of every call (S3 upload, IAM, import, invoke). Custom Model Import runs in us-east-1,
    us-east-2, us-west-2 and eu-central-1; others are refused. Use your bucket's region."""
    profile: str | None = None
    """AWS profile name (None: the default credential chain)."""
    bucket: str | None = None
    """Name of an existing S3 bucket you can write to (no s3://), where deploy uploads the artifact. Required
    by deploy and by `termtune run` unless aws.deploy is false."""
    prefix: str = "termtune/{run_name}"
    """S3 key prefix for the artifact; {run_name} is the run directory's name. deploy appends
    -<run id> (<run>/deploy-id), so no two run directories share a prefix."""
    sse: Literal["AES256", "aws:kms"] = "AES256"
    """Server-side encryption of the uploaded objects: AES256 (S3-managed keys) or aws:kms (the key in
    aws.kms_key_id; without one, S3's AWS managed key). Use aws:kms when your bucket policy requires KMS."""
    kms_key_id: str | None = None
    """KMS key (id, alias or ARN) for S3 SSE-KMS; the import role gets kms:Decrypt on its key ARN."""
    model_kms_key_id: str | None = None
    """KMS key that encrypts the imported model (importedModelKmsKeyId); None: an AWS owned key.
    deploy resolves it first and refuses a key that is missing, disabled or in another region."""
    role_arn: str | None = None
    """Existing CMI service role; None: create or reuse `role_name`."""
    role_name: str = "termtune-bedrock-import"
    """IAM role deploy creates or reuses when aws.role_arn is unset; each run adds its own inline policy, and
    cleanup deletes the role (if termtune created it) once no run uses it. Change it to follow your
    account's role naming rules."""
    job_name: str | None = None
    """Import job name (default: <model_name>-<timestamp>)."""
    model_name: str | None = None
    """Imported model name (default: derived from the run directory)."""
    import_timeout_minutes: float = Field(120, gt=0)
    """Minutes deploy (and cleanup, for a running job) waits for the import job before it stops with an error;
    the job keeps running in Bedrock and a later deploy resumes waiting. An import takes minutes, up to an hour."""
    poll_seconds: float = Field(30, gt=0)
    """Longest pause, in seconds, between two status checks of the import job (the first come every 2 s, then
    further apart). Raise it to make fewer API calls on long imports."""
    invoke_schema: Literal["auto", "messages", "max_tokens", "max_gen_len"] = "auto"
    """Request body: OpenAI chat completion (messages: the prompt as the user's turn, put through the model's
    chat template by Bedrock), OpenAI completion (max_tokens) or Bedrock completion (max_gen_len); auto:
    messages when the run's artifact has a chat template in tokenizer_config.json, else max_tokens."""
    invoke_max_tokens: int = Field(128, ge=1)
    """Most tokens the imported model generates per `termtune invoke` (and `run`'s test call), sent as the
    invoke_schema field. Raise it when answers stop mid-sentence."""
    invoke_temperature: float = Field(0.0, ge=0)
    """Sampling temperature sent with each invoke: 0 is greedy (the same answer every time); above 0 gives
    varied answers, more so the higher it is."""
    cold_start_budget_minutes: float = Field(10, ge=0)
    """How long invoke keeps retrying ModelNotReadyException (a cold start)."""
    invoke_prompt: str = "Hypertension"
    """Term sent by `termtune run` once the model is imported."""
    model_quota: int = Field(3, ge=1)
    """Imported models allowed per region (Bedrock's default quota; deploy checks it first)."""
    role_retry_minutes: float = Field(2, ge=0)
    """How long deploy retries a role error from Bedrock while a role it just created propagates."""
    cmu_prices: dict[str, dict[str, CmuPrice]] = Field(default_factory=lambda: dict(DEFAULT_CMU_PRICES))
    """Custom Model Unit prices by region, then CMU version (customModelUnitsVersion), e.g. {us-east-1: {v1.0:
    {per_minute: ...}}}, for the cost deploy prints. Add your region's prices from AWS's pricing page."""
    deploy: bool = True
    """`termtune run` deploys and invokes after export; false stops at validate."""
    sagemaker: SageMakerConfig = Field(default_factory=SageMakerConfig)
    """The SageMaker training job of train.on=sagemaker (termtune train --on sagemaker)."""

    @field_validator("prefix")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        except ValueError as e:  # a lone { or }
            raise ValueError(f"{value!r}: {e}; write {{{{ or }}}} for a literal brace") from None
        unknown = [name for name in names if name not in PREFIX_PLACEHOLDERS]
        if unknown:
            raise ValueError(f"{value!r}: unknown placeholder {{{unknown[0]}}} "
                             f"(known: {', '.join('{' + p + '}' for p in PREFIX_PLACEHOLDERS)})")
        return value


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    """Where the run lives and its seed."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The base model and tokenizer."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Terms and definitions: their source, cleaning, split and token limits (termtune data prepare)."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """The LoRA adapters trained on the frozen base."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The optimisation (termtune train)."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Generation and scoring on the held-out split (termtune evaluate)."""
    export: ExportConfig = Field(default_factory=ExportConfig)
    """The merged model folder Bedrock imports (termtune export)."""
    aws: AwsConfig = Field(default_factory=AwsConfig)
    """Upload, import, invoke and cost on Amazon Bedrock (termtune deploy, invoke, cleanup)."""

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "Config":
        self.check_rules()
        for name in type(self).model_fields:  # assignments to a section are then checked against these rules
            getattr(self, name)._owner = self
        return self

    def check_rules(self) -> None:
        """Raise ValueError when settings of different sections cannot work together."""
        if self.train.precision == "fp16" and not self.train.allow_fp16:
            raise ValueError(
                "train.precision=fp16 is refused for T5: its activations overflow to inf/NaN in fp16 "
                "(T5 was trained in bf16). Use bf16 on a GPU or fp32, or set train.allow_fp16=true to force it."
            )
        if self.export.dtype == "fp16" and not self.export.allow_fp16:
            raise ValueError(
                "export.dtype=fp16 is refused for T5: it overflows to inf/NaN in fp16 at inference. "
                "Use bf16 or fp32, or set export.allow_fp16=true to force it."
            )
        if self.model.init == "random" and not self.model.architecture:
            raise ValueError("model.init=random needs model.architecture (a config.json or a folder holding one)")
        if self.model.architecture_overrides and self.model.init != "random":
            raise ValueError("model.architecture_overrides only applies with model.init=random")
        if self.data.test_size >= 1 and self.data.test_size != int(self.data.test_size):
            raise ValueError("data.test_size must be a share below 1 or a whole number of rows")
        if "{term}" not in self.data.prompt_template:
            raise ValueError("data.prompt_template must contain {term}")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir)

    @property
    def tokenizer_source(self) -> str:
        return self.model.tokenizer or self.model.source


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] | Mapping[str, Any] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None) and apply overrides: `KEY=VALUE`
    strings (values parsed as YAML, as on the command line) or a mapping of dotted keys to values
    (used as given: {"train.epochs": 1, "lora.target_modules": ["q", "v"]}).

    Raises:
        UserError: the file is missing, empty, too large, not UTF-8 or not YAML, repeats a key or
            expands aliases beyond MAX_YAML_VALUES, a key is unknown (with a did-you-mean), a value
            has the wrong type or range, or a cross-field rule fails.
    """
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        raw = _read_config_file(Path(path))
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            _set_key(raw, str(key), str(value) if isinstance(value, Path) else value)
    else:
        for item in overrides:
            _apply_override(raw, item)
    _check_keys(raw, Config, prefix="", where=where)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{where}: {_describe(e)}") from e


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UserError(f"{path}: {size:,} bytes; a config file over {MAX_CONFIG_BYTES // 2**20} MiB is refused")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "save the file as UTF-8") from None
    try:
        raw = parse_yaml(text)
    except RefusedYAML as e:
        raise UserError(f"{path}: {e}") from e
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from e
    if raw is None:
        raise UserError(f"{path}: the config file is empty; write settings into it (see configs/demo.yaml), "
                        "or give no file to use the defaults")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (run, model, data, ...)")
    return raw


class RefusedYAML(yaml.YAMLError):
    """Well-formed YAML that a config must not be: a repeated key, an alias bomb, absurd nesting."""


class _ConfigLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML keeps the last, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` may be overridden by explicit keys: that is its purpose
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise RefusedYAML(f"line {key_node.start_mark.line + 1}: {key} is given twice (also on line "
                                     f"{seen[key] + 1}); YAML would silently drop the first")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """yaml.safe_load with duplicate keys refused and aliases expanding to at most MAX_YAML_VALUES values."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        values = _expanded_size(node, {})
        if values > MAX_YAML_VALUES:
            raise RefusedYAML(f"expands to {values:,} values (more than {MAX_YAML_VALUES:,}): "
                                 "aliases (*name) that repeat other aliases are refused")
        return loader.construct_document(node)
    except RecursionError:
        raise RefusedYAML("nested too deeply") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Values in the document once every alias is copied out (an alias shares its anchor's node,
    so memoising by node counts a billion-value bomb in a few steps)."""
    if id(node) not in memo:
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        memo[id(node)] = 1 + sum(_expanded_size(child, memo) for child in children)
    return memo[id(node)]


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UserError(f"override {item!r}: expected KEY=VALUE, e.g. train.learning_rate=3e-4")
    # YAML parsing turns "3e-4" into a float, "[q, v]" into a list and "null" into None.
    try:
        value = parse_yaml(text) if text != "" else ""
    except RefusedYAML as e:
        raise UserError(f"override {key}: {e}") from e
    except yaml.YAMLError:
        value = text
    if _expects_text(key.split(".")) and value is not None and not isinstance(value, str):
        value = text  # "Define: {term}" is a template, not a YAML mapping
    _set_key(raw, key, value)


def _set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def _expects_text(parts: list[str]) -> bool:
    """True when the dotted key names a plain text field (str or str | None)."""
    model: Any = Config
    for part in parts[:-1]:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, Section)):
            return False
        model = field.annotation
    field = model.model_fields.get(parts[-1])
    return field is not None and field.annotation in (str, Optional[str])


def _check_keys(raw: dict[str, Any], model: type[BaseModel], prefix: str, where: str) -> None:
    """Unknown keys are errors; say which known key was probably meant."""
    fields = model.model_fields
    for key, value in raw.items():
        if key not in fields:
            known = list(fields)
            guess = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {prefix}{guess[0]}?)" if guess else f" (known: {', '.join(known)})"
            raise UserError(f"{where}: unknown key {prefix}{key}{hint}")
        annotation = fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, Section) and isinstance(value, dict):
            _check_keys(value, annotation, prefix=f"{prefix}{key}.", where=where)


def _describe(error: ValidationError, prefix: str = "") -> str:
    first = error.errors()[0]
    loc = prefix + ".".join(str(x) for x in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, the form written into every run directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def attribute_docs(cls: type) -> dict[str, str]:
    """A class's attribute docstrings (the string right after a field), by field name, on one line each."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
    return {a.target.id: " ".join(str(b.value.value).split())  # type: ignore[union-attr]
            for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def field_docs() -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every config key, for docs/config-reference.md. The settings
    of a mapping of sections (aws.cmu_prices) follow it with a `*` per mapping level."""
    rows: list[tuple[str, str, str, str]] = []
    for name, field in Config.model_fields.items():
        rows += _section_docs(field.annotation, f"{name}.")
    return rows


def _section_docs(section: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    from pydantic_core import to_jsonable_python

    rows: list[tuple[str, str, str, str]] = []
    for key, field in section.model_fields.items():
        annotation = field.annotation
        type_name = annotation.__name__ if isinstance(annotation, type) else str(annotation)
        type_name = type_name.replace("typing.", "").replace("pathlib.", "").replace(f"{__name__}.", "")
        type_name = type_name.replace("Path", "path")
        if field.is_required():
            shown = "required"
        else:
            default = field.get_default(call_default_factory=True)
            shown = json.dumps(str(default) if isinstance(default, Path) else to_jsonable_python(default))
        if isinstance(annotation, type) and issubclass(annotation, Section):  # a section inside a section
            rows.append((f"{prefix}{key}", "section", "{}", " ".join((field.description or "").split())))
            rows += _section_docs(annotation, f"{prefix}{key}.")
            continue
        rows.append((f"{prefix}{key}", type_name, shown, " ".join((field.description or "").split())))
        levels, inner = _mapping_levels(annotation)
        if levels and isinstance(inner, type) and issubclass(inner, Section):
            rows += _section_docs(inner, f"{prefix}{key}." + "*." * levels)
    return rows


def _mapping_levels(annotation: Any) -> tuple[int, Any]:
    """dict[str, dict[str, X]] -> (2, X): how many mappings wrap the value type, and the value type."""
    import typing

    levels = 0
    while typing.get_origin(annotation) is dict:
        annotation = typing.get_args(annotation)[1]
        levels += 1
    return levels, annotation
