"""termtune's additions to a transformers Trainer, for whichever Trainer subclass the model family trains with.

    trainer = trainer_class(family_trainer)(model=..., args=..., batch_sampler=sampler, ...)
    trainer.add_callback(Checkpoints(trainer, seal))      # and the other callbacks below

Everything attaches through the Trainer's public hooks: `get_train_dataloader` (termtune's batch sampler),
`compute_loss` (the chunked loss, the per-batch token counts, the first non-finite loss) and callbacks
(throughput and padding per log, sealed checkpoints, the divergence stop, progress, the metrics log). No
private Trainer method is overridden, so a subclass with its own compute_loss (TRL's SFTTrainer) keeps it:
termtune's compute_loss wraps it, and replaces it in training steps only where termtune's chunked loss applies.

Imports transformers at the top (the callbacks subclass its classes): import this module inside functions.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from transformers import ProgressCallback, Trainer, TrainerCallback

from termtune.progress import Lines

LM_LOSS_CHUNK_ROWS = 1024
"""Target tokens per lm_head chunk (a 1024 x 32128 fp32 logits buffer is 128 MB). On the benchmark model (2-core
CPU, benchmarks/bench_lm_loss.py) one step is 9-18 % faster than with the standard loss for chunks from 512
tokens to the whole batch; smaller chunks are slower, as each one re-reads the 66 MB lm_head weight."""


def trainer_class(base: type) -> type:
    """`base` (any transformers.Trainer subclass) with termtune's additions mixed in before it."""
    return type(f"Termtune{base.__name__}", (TrainerAdditions, base), {})


class TrainerAdditions:
    """termtune's batch sampler, chunked loss and accounting, for a Trainer subclass (see trainer_class)."""

    def __init__(self, *args: Any, batch_sampler: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_sampler = batch_sampler
        self.throughput = Throughput(self)
        self.add_callback(self.throughput)  # before termtune's other callbacks: they read the figures it adds
        self.chunked_loss = chunked_loss_applies(self)
        self.nonfinite_loss: float | None = None  # the first NaN/inf loss this rank saw (see DivergenceGuard)

    def get_train_dataloader(self) -> Any:
        from torch.utils.data import DataLoader

        loader = DataLoader(self.train_dataset, batch_sampler=self.batch_sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        # accelerate shards the batches across ranks (every Nth batch per rank).
        return self.accelerator.prepare(loader)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        training = model.training and not return_outputs  # the held-out pass asks for outputs, in eval mode
        if training:
            self.throughput.count(inputs)
        if training and self.chunked_loss:
            # The lm_head and its softmax are most of the work per target token; termtune.lm_loss computes the
            # same loss over the non-pad tokens only, without the full logits tensor (~10-15 % faster steps on
            # CPU). It stands in for the model call inside transformers.Trainer's compute_loss, so the Trainer's
            # own handling of num_items_in_batch, gradient accumulation and DDP scaling applies as is. That one,
            # not a subclass's: TRL's SFTTrainer would call it as its fused LM head (its entropy and token accuracy
            # log lines are then not made).
            from termtune.lm_loss import chunked_lm_loss

            loss_fn = functools.partial(chunked_lm_loss, model, chunk_size=LM_LOSS_CHUNK_ROWS)
            loss = Trainer.compute_loss(self, loss_fn, inputs, num_items_in_batch=num_items_in_batch)
        else:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        # One device sync per batch, as the Trainer's own NaN log filter already does.
        if training and self.nonfinite_loss is None and not bool(loss.isfinite()):
            self.nonfinite_loss = float(loss.detach())
        return loss


def chunked_loss_applies(trainer: Any) -> bool:
    """Chunked loss for a plain frozen lm_head under no or plain data parallelism; the standard path otherwise."""
    from accelerate.utils import DistributedType

    from termtune.lm_loss import supports_chunked_loss

    return (trainer.label_smoother is None and trainer.compute_loss_func is None
            and trainer.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                         DistributedType.MULTI_GPU)
            and supports_chunked_loss(trainer.model))


# ----------------------------------------------------------------------------- callbacks


class Throughput(TrainerCallback):
    """Examples and target tokens per second and the padding share, added to each training log (all ranks summed).

    Only training counts: the seconds from a step's end to the end of an evaluation or a checkpoint save that
    follows it are left out, as is the setup before the first step."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        # An encoder-decoder's targets are a second padded stream beside its sources; a decoder's prompt and
        # answer are one stream, which its attention mask covers.
        self.two_streams = bool(getattr(trainer.model.config, "is_encoder_decoder", False))
        # [real tokens, token slots (real + padding), answer tokens, examples]: since the last log, and in all
        self.window = [0, 0, 0, 0]
        self.totals = [0, 0, 0, 0]
        self.seconds = 0.0
        self.window_start = self.mark = time.perf_counter()
        self.excluded = 0.0

    def count(self, inputs: dict[str, Any]) -> None:
        labels = inputs["labels"]
        answers = int((labels != -100).sum())
        if "attention_mask" not in inputs:  # packed (train.packing): one row, no padding, an example per restart
            real = slots = labels.numel()
            examples = int((inputs["position_ids"] == 0).sum())
        else:
            mask = inputs["attention_mask"]
            real, slots, examples = int(mask.sum()), mask.numel(), labels.shape[0]
        if self.two_streams:  # every target token is a label; the label stream's padding is -100
            real, slots = real + answers, slots + labels.numel()
        self.window = [a + b for a, b in zip(self.window, (real, slots, answers, examples))]

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.window_start = self.mark = time.perf_counter()
        self.excluded = 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.mark = time.perf_counter()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._exclude_since_mark()

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._exclude_since_mark()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        if logs is not None and "loss" in logs:  # a training log: every rank gets here at the same step
            logs.update(self.flush())

    def _exclude_since_mark(self) -> None:
        now = time.perf_counter()
        self.excluded += now - self.mark
        self.mark = now

    def flush(self) -> dict[str, float]:
        """Close the window (a collective under data parallelism: every rank calls it) and return its figures."""
        import torch

        now = time.perf_counter()
        seconds = max(now - self.window_start - self.excluded, 1e-9)
        counts = torch.tensor(self.window, dtype=torch.float64)
        trainer = self.trainer
        if trainer.args.world_size > 1:
            counts = trainer.accelerator.reduce(counts.to(trainer.args.device), reduction="sum").cpu()
        real, slots, answers, examples = counts.tolist()
        self.totals = [a + b for a, b in zip(self.totals, (real, slots, answers, examples))]
        self.seconds += seconds
        self.window, self.window_start, self.mark, self.excluded = [0, 0, 0, 0], now, now, 0.0
        return {"examples_per_s": examples / seconds, "target_tokens_per_s": answers / seconds,
                "padding_fraction": 1 - real / slots if slots else 0.0}


class ProgressBar(ProgressCallback):
    """tqdm bar with loss and throughput in its postfix instead of a dict printed per log."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        if not (state.is_world_process_zero and self.training_bar is not None and logs):
            return
        if "loss" in logs:
            self.postfix = {"loss": f"{logs['loss']:.3f}", "tok/s": f"{logs.get('target_tokens_per_s', 0):.0f}",
                            "ex/s": f"{logs.get('examples_per_s', 0):.1f}"}
        if "eval_loss" in logs:
            self.postfix = {**getattr(self, "postfix", {}), "eval": f"{logs['eval_loss']:.3f}"}
        self.training_bar.set_postfix(getattr(self, "postfix", {}), refresh=True)


class ProgressLines(TrainerCallback):
    """Off a terminal (a log file, CI): one line every ~10 % of the steps or ~30 s, not a redrawn bar."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.lines = Lines("train: step", state.max_steps) if state.is_world_process_zero else None
        self.detail: dict[str, str] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        for key, name in (("loss", "loss"), ("eval_loss", "held-out loss")):
            if logs and key in logs:
                self.detail[name] = f"{logs[key]:.3f}"

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.lines is not None:
            self.lines.update(state.global_step, ", ".join(f"{k} {v}" for k, v in self.detail.items()))


class MetricsLog(TrainerCallback):
    """One JSON object per log event in `path` (rank 0)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        if state.is_world_process_zero and logs:
            row = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


class Checkpoints(TrainerCallback):
    """Seal each checkpoint once all ranks have written it: `seal(folder, world_size)` runs on rank 0."""

    def __init__(self, trainer: Any, seal: Callable[[Path, int], None]) -> None:
        self.trainer, self.seal = trainer, seal

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.trainer.accelerator.wait_for_everyone()  # every rank's rng_state_<i>.pth is on disk
        if state.is_world_process_zero:
            self.seal(Path(args.output_dir) / f"checkpoint-{state.global_step}", args.world_size)


class DivergenceGuard(TrainerCallback):
    """Stop at the first optimizer step whose loss is NaN or inf, before that step's weights are saved
    (on_step_end runs before the checkpoint), so no checkpoint, adapter or result.json holds them.
    `diverged(what)` is the error raised."""

    def __init__(self, trainer: Any, diverged: Callable[[str], Exception]) -> None:
        self.trainer, self.diverged = trainer, diverged

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        import torch

        seen = self.trainer.nonfinite_loss
        stop = seen is not None
        if args.world_size > 1:  # every rank stops at the same step, or the others would wait forever
            flag = torch.tensor([float(stop)], device=args.device)
            stop = bool(self.trainer.accelerator.reduce(flag, reduction="sum").item())
        if stop:
            loss = seen if seen is not None else "NaN or inf"
            raise self.diverged(f"the loss became {loss} at step {state.global_step} of {state.max_steps}")


class StopOnSignal(TrainerCallback):
    """SIGTERM (a stopped or interrupted cloud job, `kill`): save a sealed checkpoint at the end of the current
    step and stop training, so a rerun resumes from exactly there. `request` is the signal handler; every rank
    stops at the same step (a rank that saved alone would wait forever for the others). `stopped_at` is the step
    training stopped at, None when it ran to the end."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.requested = False
        self.stopped_at: int | None = None

    def request(self, *_: Any) -> None:
        self.requested = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        import torch

        stop = self.requested
        if args.world_size > 1:
            flag = torch.tensor([float(stop)], device=args.device)
            stop = bool(self.trainer.accelerator.reduce(flag, reduction="sum").item())
        if stop:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step


class StepDelay(TrainerCallback):
    """Test hook: TERMTUNE_TEST_STEP_DELAY=<seconds> slows each step so a test can kill a run mid-way."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        time.sleep(float(os.environ["TERMTUNE_TEST_STEP_DELAY"]))
