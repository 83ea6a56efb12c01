"""Training stage: LoRA / QLoRA fine-tuning of the base model on the prepared data.

    termtune train configs/demo.yaml                 # one process (CPU or one GPU)
    torchrun --nproc_per_node 2 -m termtune.cli train configs/demo.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml -m termtune.cli train configs/demo.yaml

Built on the trainer and collator of the model's family (termtune.families; labels padded with
-100). What this module adds is the glue the seed recipe got wrong or left out:

- batching: dynamic padding per batch, labels padded with -100 (never trained on), batches of
  similar-length examples, and optionally a token budget per batch instead of a fixed size;
- precision: bf16 on GPUs that support it, fp32 on CPU, fp16 refused where the family overflows in it;
- speed: the training loss over the non-pad target tokens without the full logits tensor
  (termtune.lm_loss), the same value as the standard loss;
- checkpoints that are sealed only once every file is on disk, so a run killed at any moment
  (even mid-save) resumes from the last complete one and ends with the same weights; a seal names
  the data it was trained on, so a run never resumes across a change of the data;
- SIGTERM (a stopped or interrupted cloud job, `kill`) seals a checkpoint at the end of the current step
  and stops (termtune.train.Stopped), so the rerun resumes from exactly there;
- a metrics log (JSONL, TensorBoard when installed), padding fraction and target tokens/s,
  held-out loss, the final adapter plus tokenizer and its digest (export checks it);
  `result.json` is written last.

Reads  <run>/data/{train,test}.jsonl and <run>/base-model/ (random-init bases).
Writes <run>/train/{checkpoints/, adapter/, metrics.jsonl, result.json} (the loss curve is drawn by the report).
Only rank 0 writes (each rank saves its own RNG state inside a checkpoint, as transformers does).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from termtune.config import Config
from termtune.errors import UserError
from termtune.families import family_for, family_of_model
from termtune.families.base import padded_separately
from termtune.events import emit
from termtune.layout import RunLayout
from termtune.modeling import check_model_settings
from termtune.oserrors import probe_writable, writing
from termtune.results import StageResult
from termtune.rundir import atomic_dir, sha256_file, write_json, write_text
from termtune.safepath import name_problem

SEAL_FILE = "termtune-complete.json"
"""Written into a checkpoint folder after everything else; a folder without it is never resumed."""

# Settings that change the optimisation trajectory: resuming with different values would splice
# two different runs together, so it is refused.
_TRAJECTORY_KEYS = {
    "train": ["epochs", "max_steps", "batch_size", "max_tokens_per_batch", "gradient_accumulation_steps",
              "learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm", "precision",
              "group_by_length"],
    "lora": ["r", "alpha", "dropout", "target_modules", "bias", "modules_to_save"],
    "model": ["source", "init", "architecture", "architecture_overrides", "quantization"],
    "run": ["seed"],
}


# ----------------------------------------------------------------------------- result


@dataclass(repr=False)
class TrainResult(StageResult):
    """What `termtune train` measured; saved as <run>/train/result.json."""

    run_dir: str
    adapter_dir: str
    global_step: int
    epochs: float
    train_loss: float | None
    eval_loss: float | None
    precision: str
    quantization: str
    world_size: int
    trainable_params: int
    resumed_from: str | None
    train_seconds: float
    """Wall time of this invocation's training loop (a resumed run counts only its own part)."""
    examples_per_s: float
    target_tokens_per_s: float
    """Non-pad target tokens per second, all ranks together."""
    padding_fraction: float
    """Share of the (source + target) token slots in the batches that were padding."""
    files: dict[str, str] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    """torch.cuda.max_memory_allocated on a GPU, the process's peak RSS on a CPU (what `termtune plan` predicts)."""
    device: str | None = None
    adapter_sha256: str | None = None
    """The saved adapter folder's digest (termtune.train.adapter_digest): export refuses an adapter that differs."""

    def summary(self) -> str:
        def num(x: float | None, fmt: str = ".4f") -> str:
            return "n/a" if x is None else format(x, fmt)

        lines = [
            f"trained {self.global_step} steps ({self.epochs:.2f} epochs) in {self.train_seconds:.1f} s"
            + (f", resumed from {Path(self.resumed_from).name}" if self.resumed_from else ""),
            f"  train loss {num(self.train_loss)}   held-out loss {num(self.eval_loss)}",
            f"  {self.examples_per_s:.2f} examples/s, {self.target_tokens_per_s:.0f} target tokens/s, "
            f"padding {self.padding_fraction:.1%}",
            f"  precision {self.precision}, quantization {self.quantization}, {self.world_size} process(es), "
            f"{self.trainable_params:,} trainable parameters",
            f"  adapter: {self.adapter_dir}",
        ]
        return "\n".join(lines)

    @classmethod
    def load(cls, path: Path) -> "TrainResult":
        data = json.loads(path.read_text(encoding="utf-8"))
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# ----------------------------------------------------------------------------- entry point


def train(cfg: Config) -> TrainResult:
    """Train LoRA adapters on <run>/data and save them in <run>/train/adapter.

    An unfinished run resumes from its last complete checkpoint (refused if it was started with
    other settings). Whether a finished one is reused is the runner's decision (termtune.pipeline).
    """
    # -- validate inputs
    layout = RunLayout.of(cfg)
    check_model_settings(cfg)  # lora.r, lora.target_modules, architecture_overrides: before any data is read
    if not layout.split("train").is_file():
        raise UserError(f"{layout.split('train')}: no prepared data; run `termtune data prepare` "
                        "with the same config first")
    precision = resolve_precision(cfg)
    probe_writable(layout.train)
    checkpoints_dir = layout.checkpoints
    rank = int(os.environ.get("RANK", "0"))
    data_sha256 = prepared_data_digest(layout)
    resume = _resume_point(cfg, checkpoints_dir, data_sha256, rank)
    if rank == 0:
        _discard_incomplete_checkpoints(checkpoints_dir)
        _truncate_metrics(layout.train_metrics, _checkpoint_step(resume) if resume else 0)

    # -- set up
    from termtune.data import load_split
    from termtune.modeling import attach_lora, load_base, load_tokenizer

    tokenizer = load_tokenizer(cfg)
    train_ds = _model_columns(load_split(cfg, "train"))
    eval_ds = _model_columns(load_split(cfg, "test")) if layout.split("test").is_file() else None
    if len(train_ds) == 0:
        raise UserError(f"{layout.split('train')}: the training split is empty")
    if eval_ds is not None and len(eval_ds) == 0:
        eval_ds = None
    if eval_ds is not None:
        # Held-out batches of similar length pad less; the order does not change the loss.
        lengths = [(len(t), len(s)) for t, s in zip(eval_ds["labels"], eval_ds["input_ids"])]
        eval_ds = eval_ds.select(sorted(range(len(lengths)), key=lengths.__getitem__))

    family = family_for(cfg)
    trainer_base, arguments_class = family.trainer_classes()
    args = _training_arguments(cfg, precision, checkpoints_dir, has_eval=eval_ds is not None,
                               arguments_class=arguments_class)
    with args.main_process_first(desc="load the base model"):
        # rank 0 materialises a random-init base once; the other ranks then load that same folder
        model = attach_lora(cfg, load_base(cfg))
    collator = make_collator(tokenizer, model)
    batch_sampler = LengthGroupedBatchSampler(
        source_lengths=[len(x) for x in train_ds["input_ids"]],
        target_lengths=[len(x) for x in train_ds["labels"]],
        batch_size=cfg.train.batch_size, max_tokens=cfg.train.max_tokens_per_batch,
        group_by_length=cfg.train.group_by_length, seed=cfg.run.seed, padded_tokens=family.padded_tokens)
    from termtune.trainer_additions import trainer_class

    trainer = trainer_class(trainer_base)(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
        processing_class=tokenizer, batch_sampler=batch_sampler)
    stop = _install_callbacks(trainer, cfg, layout, rank, data_sha256)

    # -- do
    with writing(checkpoints_dir), _on_sigterm(stop.request):  # a full disk while saving: one line naming the folder
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.stopped_at is not None:
        raise Stopped(f"train: stopped by SIGTERM at step {stop.stopped_at}; its checkpoint is sealed in "
                      f"{checkpoints_dir}: run the same command again to resume from it")
    trainer.throughput.flush()  # steps after the last log still count in the totals (a collective: all ranks)
    last_eval_step = max((h["step"] for h in trainer.state.log_history if "eval_loss" in h), default=None)
    if eval_ds is not None and last_eval_step != trainer.state.global_step:
        trainer.evaluate()  # the result always carries the held-out loss of the final weights
    _debug_dump_adapter(trainer)

    _check_finite_adapter(trainer, cfg, layout.train)

    # -- save (rank 0 only) and report
    result = _result(cfg, trainer, precision, resume)
    if trainer.is_world_process_zero():
        with writing(layout.adapter), atomic_dir(layout.adapter, force=True) as tmp:
            trainer.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        result.files = {"adapter": str(layout.adapter), "metrics": str(layout.train_metrics),
                        "checkpoints": str(checkpoints_dir)}
        result.adapter_sha256 = adapter_digest(layout.adapter)
        write_json(layout.train_result, asdict(result))
    trainer.accelerator.wait_for_everyone()
    return result


class Stopped(UserError):
    """Training was asked to stop (SIGTERM) and did, after sealing a checkpoint of the step it reached."""


@contextmanager
def _on_sigterm(handler: Callable[..., None]) -> Iterator[None]:
    """Call `handler` on SIGTERM for the block instead of dying (only the main thread can set handlers:
    elsewhere SIGTERM keeps its default action)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _check_finite_adapter(trainer: Any, cfg: Config, train_dir: Path) -> None:
    """The last update can turn weights to NaN/inf with a finite loss: never save such an adapter."""
    import torch

    bad = [name for name, p in trainer.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise diverged(cfg, train_dir, f"{len(bad)} LoRA weights hold NaN or inf after step "
                                       f"{trainer.state.global_step} (e.g. {bad[0]})")


def diverged(cfg: Config, train_dir: Path, what: str) -> UserError:
    return UserError(f"training diverged: {what} (train.learning_rate {cfg.train.learning_rate:g}); nothing was "
                     "recorded as trained. Train again with a lower train.learning_rate in a new run.dir "
                     f"(or delete {train_dir})")


# ----------------------------------------------------------------------------- precision


def resolve_precision(cfg: Config) -> str:
    """'bf16' on GPUs that support it, 'fp32' on CPU; fp16 only when explicitly forced."""
    import torch

    wanted = cfg.train.precision
    cuda = torch.cuda.is_available()
    if wanted == "fp16":
        refusal = family_for(cfg).refuse_precision("train.precision", wanted)
        if refusal and not cfg.train.allow_fp16:
            raise UserError(refusal)
        if not cuda:
            raise UserError("train.precision=fp16 needs a CUDA GPU; on CPU use fp32 (or auto)")
        return "fp16"
    if wanted == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("train.precision=bf16: this GPU has no bf16 support; use fp32 (or auto)")
    if wanted == "auto":
        # CPUs train in fp32. On a CPU with bf16 instructions (AVX512-BF16) bf16 autocast gave +6-9 % examples/s
        # at the same held-out loss but +50-65 % peak memory (BENCHMARKS.md, "Training"), so it is opt-in there.
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    return wanted


# ----------------------------------------------------------------------------- batching


class LengthGroupedBatchSampler:
    """Batches of examples of similar length, in a fresh random order each epoch.

    With a token budget, each batch holds as many examples as fit in `max_tokens` padded
    (source + target) token slots. The number of batches per epoch never changes, and each
    epoch's batches depend only on (seed, epoch): that is what lets a resumed run skip exactly
    the batches it already trained on.
    """

    batch_size = None  # batches vary in size; tells accelerate's per-rank sharding not to assume one

    def __init__(self, source_lengths: list[int], target_lengths: list[int], batch_size: int,
                 max_tokens: int | None, group_by_length: bool, seed: int,
                 padded_tokens: Callable[[list[int], list[int]], int] = padded_separately) -> None:
        self.source_lengths = source_lengths
        self.target_lengths = target_lengths
        self.padded_tokens = padded_tokens
        self.fixed_size = batch_size
        self.max_tokens = max_tokens
        self.group_by_length = group_by_length or max_tokens is not None
        self.seed = seed
        self.epoch = 0
        self._len = len(self._batches(0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches(self.epoch))

    def cost(self, batch: list[int]) -> int:
        """Padded token slots of a batch (the model family's padding rule)."""
        return self.padded_tokens([self.source_lengths[i] for i in batch], [self.target_lengths[i] for i in batch])

    def _batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        n = len(self.source_lengths)
        if self.max_tokens is not None:
            batches = self._pack_by_tokens(rng)
        elif self.group_by_length:
            # Sort within random "megabatches" of 50 batches: similar lengths together, yet a
            # different grouping each epoch. Megabatches are whole batches, so the count is fixed.
            order = list(range(n))
            rng.shuffle(order)
            mega = self.fixed_size * 50
            batches = []
            for start in range(0, n, mega):
                chunk = sorted(order[start:start + mega], key=self._length_key)
                batches += [chunk[i:i + self.fixed_size] for i in range(0, len(chunk), self.fixed_size)]
        else:
            order = list(range(n))
            rng.shuffle(order)
            return [order[i:i + self.fixed_size] for i in range(0, n, self.fixed_size)]
        rng.shuffle(batches)
        # The most expensive batch goes first, so an out-of-memory shows up at step 1, not hours in.
        costliest = max(range(len(batches)), key=lambda b: self.cost(batches[b]))
        batches.insert(0, batches.pop(costliest))
        return batches

    def _length_key(self, i: int) -> tuple[int, int]:
        return (self.target_lengths[i], self.source_lengths[i])

    def _pack_by_tokens(self, rng: random.Random) -> list[list[int]]:
        # Sort by length with random tie-breaking: the sequence of lengths (and so the batch
        # boundaries and their count) is the same every epoch, the examples within ties are not.
        ties = [rng.random() for _ in self.source_lengths]
        order = sorted(range(len(ties)), key=lambda i: (*self._length_key(i), ties[i]))
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            if current and self.cost(current + [i]) > self.max_tokens:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches


def make_collator(tokenizer: Any, model: Any) -> Any:
    """The model family's collator: each batch padded to its own longest row, labels padded with -100."""
    return family_of_model(model).collator(tokenizer, model)


def _model_columns(ds: Any) -> Any:
    """Keep only what the model consumes; terms and texts stay in the JSONL for people."""
    missing = {"input_ids", "labels"} - set(ds.column_names)
    if missing:
        raise UserError(f"prepared data lacks {sorted(missing)}; re-run `termtune data prepare --force`")
    return ds.select_columns(["input_ids", "labels"])


# ----------------------------------------------------------------------------- trainer


def _training_arguments(cfg: Config, precision: str, output_dir: Path, has_eval: bool,
                        arguments_class: type) -> Any:
    import torch

    t = cfg.train
    # transformers 5.x renamed gradient_checkpointing to activation_checkpointing; pyproject allows releases
    # on either side of the rename
    checkpointing = ("activation_checkpointing" if "activation_checkpointing" in arguments_class.__dataclass_fields__
                     else "gradient_checkpointing")
    if has_eval:
        eval_strategy, eval_steps = ("steps", t.eval_steps) if t.eval_steps else ("epoch", None)
    else:
        eval_strategy, eval_steps = "no", None
    return arguments_class(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a share of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        **{checkpointing: t.gradient_checkpointing,
           f"{checkpointing}_kwargs": {"use_reentrant": False} if t.gradient_checkpointing else None},
        eval_strategy=eval_strategy,
        eval_steps=eval_steps,
        prediction_loss_only=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # rotation is ours: only after the new checkpoint is sealed
        logging_steps=t.logging_steps,
        logging_first_step=True,
        seed=cfg.run.seed,
        data_seed=cfg.run.seed,
        dataloader_num_workers=t.dataloader_workers,
        remove_unused_columns=False,
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        report_to=[],
        disable_tqdm=False,
    )


# ----------------------------------------------------------------------------- callbacks


def _install_callbacks(trainer: Any, cfg: Config, layout: RunLayout, rank: int, data_sha256: str) -> Any:
    """Add termtune's callbacks; returns the one that stops training on SIGTERM."""
    from transformers import ProgressCallback

    from termtune.progress import interactive
    from termtune.trainer_additions import (Checkpoints, DivergenceGuard, MetricsLog, ProgressBar, ProgressLines,
                                            StepDelay, StopOnSignal)

    def seal(folder: Path, world_size: int) -> None:
        seal_checkpoint(folder, cfg, world_size, data_sha256)
        rotate_checkpoints(folder.parent, cfg.train.save_total_limit)

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBar() if interactive() else ProgressLines())
    trainer.add_callback(DivergenceGuard(trainer, lambda what: diverged(cfg, layout.train, what)))
    trainer.add_callback(Checkpoints(trainer, seal))
    if rank == 0:
        layout.train.mkdir(parents=True, exist_ok=True)
        trainer.add_callback(MetricsLog(layout.train_metrics))
        tensorboard = _tensorboard_callback(layout.tensorboard)
        if tensorboard is not None:
            trainer.add_callback(tensorboard)
    if os.environ.get("TERMTUNE_TEST_STEP_DELAY"):
        trainer.add_callback(StepDelay())
    stop = StopOnSignal(trainer)  # last: it sees a signal that came during the step's other callbacks
    trainer.add_callback(stop)
    return stop


def _tensorboard_callback(log_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback
    except ImportError:  # tensorboard is optional
        return None
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))


# ----------------------------------------------------------------------------- checkpoints


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _checkpoint_step(folder: Path) -> int:
    match = _CHECKPOINT.match(folder.name)
    return int(match.group(1)) if match else -1


def seal_checkpoint(folder: Path, cfg: Config, world_size: int, data_sha256: str) -> None:
    """Flush a finished checkpoint to disk and record its files (name -> size), the settings that shape the
    trajectory and the digest of the data it was trained on in the seal."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
            files[path.name] = path.stat().st_size
    write_json(folder / SEAL_FILE, {"step": _checkpoint_step(folder), "world_size": world_size,
                                    "trajectory": _trajectory(cfg), "data_sha256": data_sha256, "files": files})


def checkpoint_is_complete(folder: Path) -> bool:
    """Sealed, and every sealed file still there with its size (a half-deleted one is not complete)."""
    try:
        seal = json.loads((folder / SEAL_FILE).read_text(encoding="utf-8"))
        files = seal["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    needed = {"trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors"}
    world_size = int(seal.get("world_size", 1))
    needed |= {f"rng_state_{i}.pth" for i in range(world_size)} if world_size > 1 else {"rng_state.pth"}
    if not needed <= set(files) or any(name_problem(name) for name in files):  # no name leads out of the folder
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


def last_complete_checkpoint(checkpoints_dir: Path) -> Path | None:
    if not checkpoints_dir.is_dir():
        return None
    folders = sorted((p for p in checkpoints_dir.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)),
                     key=_checkpoint_step, reverse=True)
    return next((p for p in folders if checkpoint_is_complete(p)), None)


def _resume_point(cfg: Config, checkpoints_dir: Path, data_sha256: str, rank: int) -> Path | None:
    """The last complete checkpoint, when it was trained on this data (and refused when with other
    trajectory settings); None to start fresh.

    A checkpoint of other data (the data stage ran again after a kill: another prompt template,
    max_rows, source file) is of no use: resuming would finish a model that has seen other rows, the
    new held-out terms among them. Its checkpoints are removed, or rotation would keep them as the
    newest. Settings are compared only after the data: with other data they no longer matter."""
    resume = last_complete_checkpoint(checkpoints_dir)
    if resume is None:
        return None
    trained_on = json.loads((resume / SEAL_FILE).read_text(encoding="utf-8")).get("data_sha256")
    if trained_on != data_sha256:
        if rank == 0:
            why = "data changed" if trained_on else "its seal does not say which"
            emit("rerun", f"train: {resume.name} was trained on other data ({why}); starting fresh")
            for folder in checkpoints_dir.iterdir():
                if folder.is_dir() and _CHECKPOINT.match(folder.name):
                    shutil.rmtree(folder)
        return None
    _check_same_trajectory(cfg, resume)
    return resume


def rotate_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and any unsealed leftovers."""
    folders = sorted((p for p in checkpoints_dir.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)),
                     key=_checkpoint_step, reverse=True)
    complete = [p for p in folders if checkpoint_is_complete(p)]
    newest = _checkpoint_step(complete[0]) if complete else -1
    for p in complete[keep:] + [p for p in folders if p not in complete and _checkpoint_step(p) < newest]:
        shutil.rmtree(p, ignore_errors=True)


def _discard_incomplete_checkpoints(checkpoints_dir: Path) -> None:
    """A run killed mid-save leaves an unsealed folder (or a temp folder): remove it before resuming."""
    if not checkpoints_dir.is_dir():
        return
    for p in checkpoints_dir.iterdir():
        if p.is_dir() and not checkpoint_is_complete(p):
            shutil.rmtree(p, ignore_errors=True)


def _trajectory(cfg: Config) -> dict[str, Any]:
    dump = cfg.model_dump(mode="json")
    return {f"{section}.{key}": dump[section][key] for section, keys in _TRAJECTORY_KEYS.items() for key in keys}


def _check_same_trajectory(cfg: Config, checkpoint: Path) -> None:
    seal = json.loads((checkpoint / SEAL_FILE).read_text(encoding="utf-8"))
    before, now = seal.get("trajectory", {}), _trajectory(cfg)
    changed = [f"{k} {before[k]!r} -> {now[k]!r}" for k in now if k in before and before[k] != now[k]]
    if changed:
        raise UserError(f"{checkpoint}: this run was started with different settings ({'; '.join(changed)}); "
                        f"resuming would mix two runs. Restore them, or delete {checkpoint.parent.parent} "
                        "(or use a new run.dir) to start over")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log rows from after the checkpoint we resume from: they are about to be redone."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue  # a line cut short by the crash
    write_text(path, "".join(line + "\n" for line in keep))


def _debug_dump_adapter(trainer: Any) -> None:
    """Test hook: TERMTUNE_DEBUG_DUMP_DIR=<dir> makes every rank save its LoRA weights as rank<N>.safetensors,
    so a test can check that data-parallel ranks ended with identical adapters."""
    out = os.environ.get("TERMTUNE_DEBUG_DUMP_DIR")
    if not out:
        return
    from safetensors.torch import save_file

    Path(out).mkdir(parents=True, exist_ok=True)
    weights = {n: p.detach().cpu().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
    save_file(weights, str(Path(out) / f"rank{trainer.args.process_index}.safetensors"))


# ----------------------------------------------------------------------------- digests


def adapter_digest(folder: Path) -> str:
    """The identity of a saved adapter: sha256 over its files (weights, config, tokenizer), names included.
    Hidden files (.DS_Store, ...) are left out: nothing reads them."""
    files = [p for p in folder.rglob("*") if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return _files_digest(folder, files)


def prepared_data_digest(layout: RunLayout) -> str:
    """The identity of the data a run trains on: the prepared splits, which hold the token ids, so the
    template, the rows, the split, the tokenizer and the length limits are all in it."""
    return _files_digest(layout.data, [layout.split(s) for s in ("train", "test") if layout.split(s).is_file()])


def _files_digest(root: Path, files: list[Path]) -> str:
    lines = "".join(f"{p.relative_to(root).as_posix()}:{sha256_file(p)}\n" for p in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


# ----------------------------------------------------------------------------- report


def _result(cfg: Config, trainer: Any, precision: str, resume: Path | None) -> TrainResult:
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    src, src_slots, tgt, tgt_slots, examples = trainer.throughput.totals
    seconds = trainer.throughput.seconds
    model = trainer.model
    return TrainResult(
        run_dir=str(cfg.run_dir),
        adapter_dir=str(RunLayout.of(cfg).adapter),
        global_step=trainer.state.global_step,
        epochs=float(trainer.state.epoch or 0.0),
        train_loss=train_losses[-1] if train_losses else None,
        eval_loss=eval_losses[-1] if eval_losses else None,
        precision=precision,
        quantization=cfg.model.quantization,
        world_size=trainer.args.world_size,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        resumed_from=str(resume) if resume else None,
        train_seconds=round(seconds, 3),
        examples_per_s=examples / seconds if seconds else 0.0,
        target_tokens_per_s=tgt / seconds if seconds else 0.0,
        padding_fraction=1 - (src + tgt) / (src_slots + tgt_slots) if src_slots + tgt_slots else 0.0,
        **_peak_memory(),
    )


def _peak_memory() -> dict[str, Any]:
    import resource

    import torch

    if torch.cuda.is_available():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "device": torch.cuda.get_device_name(0)}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "device": "cpu"}
