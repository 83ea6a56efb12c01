"""The stage registry and the runner: what each stage reads and writes, and when it must run again.

    data -> train -> evaluate -> export -> validate -> deploy -> invoke

Every stage declares the config keys it reads, the stages whose outputs it reads, and (for the
data stage) the content of its source. When a stage completes, the runner records, last and
atomically, a fingerprint of all of that in <run>/provenance/<stage>.json. A stage is complete
only while that fingerprint equals the one computed from the current config, and its outputs
are there. So, like make:

- `termtune run` skips complete stages, re-runs every stage whose inputs changed (and so
  everything after it), and says why, naming the changed keys with old -> new values;
- a single stage command (`termtune export`, ...) refuses, in one line, to read outputs that
  were made from other settings;
- outputs that are replaced leave their record (settings, metrics, artifact digest, imported
  model) in <run>/history.json, shown in the report as "attempts".

Code changes do not invalidate a stage (the record keeps the git commit). Every stage that
writes holds the run directory's lock; the report is refreshed here after each stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from termtune import ownership
from termtune.config import Config, dump_config
from termtune.errors import UserError
from termtune.events import emit
from termtune.layout import RunLayout
from termtune.quiet import quiet
from termtune.rundir import exclusive, provenance, read_json, remove, sha256_file, write_json, write_text
from termtune.stages import IN_AWS, LOCAL_ONLY, ORDER, command_of


@dataclass
class Outcome:
    """What a stage returns to the runner: its result object, the lines to print, what to record."""

    result: Any
    summary: str
    record: dict[str, Any] = field(default_factory=dict)
    """Figures kept in the stage's record and, once replaced, in the run history."""


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Config, bool], Outcome]
    """Does the work; the bool is `force` (replace outputs termtune cannot prove are its own)."""
    reads: tuple[str, ...] = ()
    """Config sections or keys whose values make the outputs what they are."""
    ignores: tuple[str, ...] = ()
    """Keys under `reads` that do not change the outputs (logging cadence, timeouts, ...)."""
    upstream: tuple[str, ...] = ()
    """Stages whose outputs this one reads."""
    outputs: Callable[[RunLayout], list[Path]] = lambda layout: []
    """What the stage writes; set aside when it runs again, deleted once the new result is recorded."""
    markers: Callable[[RunLayout, Config], list[Path]] = lambda layout, cfg: []
    """The outputs that must exist for the stage to count as complete."""
    sources: Callable[[Config], dict[str, Any]] = lambda cfg: {}
    """Inputs that are not config values (the data file's content, the resolved tokenizer)."""
    always: bool = False
    """Cheap checks and calls worth repeating every run (validate, invoke): never skipped, not fingerprinted."""
    put_back: bool = True
    """Whether the old outputs come back when a re-run fails. Not deploy's: deploy.json tracks what the new
    attempt created in AWS (cleanup must find it); the old import stays listed in the history instead."""
    check: Callable[[Config], None] | None = None
    """Cheap checks that can refuse the settings (UserError): run before any output is touched."""
    still_valid: Callable[[Config], str | None] | None = None
    """For outputs that live outside the run directory (an imported model): why they no longer hold
    although the record says complete, or None. Asked only by `termtune run`, which then re-runs the stage."""
    read_back: Callable[[Config, RunLayout], Any] | None = None
    """The result of a stage found up to date, from the files it wrote (what `run` would have returned).
    None for the stages that always run."""


# ----------------------------------------------------------------------------- the stages


def _data(cfg: Config, force: bool) -> Outcome:
    from termtune import data

    prepared = data.prepare(cfg, force=True)
    return Outcome(prepared, data.summary(prepared.stats),
                   {"rows_used": prepared.stats["rows_used"], "train_rows": prepared.stats["train_rows"],
                    "test_rows": prepared.stats["test_rows"]})


def _train(cfg: Config, force: bool) -> Outcome:
    if cfg.train.on == "sagemaker":
        from termtune.aws import training

        job = training.train(cfg, fingerprint(cfg, BY_NAME["train"]))
        return Outcome(job, job.summary(), {"sagemaker_job": {k: job.job.get(k) for k in (
            "job_name", "job_arn", "s3_model_artifacts", "artifact_uri", "billable_seconds", "cost")}})
    from termtune.train import train

    result = train(cfg)
    record: dict[str, Any] = {"result": asdict(result)}
    if os.environ.get("RANK", "0") == "0":
        from termtune import plan

        try:  # the report shows the plan beside what was measured
            record["plan_vs_measured"] = plan.compare_with_measured(cfg)
        except UserError:
            pass  # no plan for this config (e.g. a Hub source of unknown shape): nothing to compare
    return Outcome(result, result.summary(), record)


def _check_train(cfg: Config) -> None:
    if cfg.train.on == "sagemaker":
        from termtune.aws.sagemaker import check_settings

        check_settings(cfg)  # offline, before anything is uploaded or paid for
    from termtune.modeling import check_model_settings

    check_model_settings(cfg)  # lora.r, lora.target_modules, architecture_overrides against the model


def _evaluate(cfg: Config, force: bool) -> Outcome:
    from termtune.evaluate import evaluate

    report = evaluate(cfg)
    metrics = report.metrics
    return Outcome(report, report.summary(), {"metrics": {k: metrics[k] for k in ("base", "tuned", "n") if k in metrics}})


def _export(cfg: Config, force: bool) -> Outcome:
    from termtune.export import export

    layout = RunLayout.of(cfg)
    # An artifact inside the run directory is termtune's to replace (export still checks it is one);
    # one elsewhere (export.dir) is replaced only with --force or when a record proves it is this run's.
    inside = layout.artifact.resolve().is_relative_to(layout.root.resolve())
    artifact = export(cfg, force=force or inside)
    return Outcome(artifact, artifact.summary(), {
        "artifact": str(artifact.path), "artifact_sha256": artifact.digest, "dtype": artifact.dtype,
        "seconds": round(artifact.seconds, 1),
        "total_bytes": artifact.total_bytes, "weight_files": artifact.shards,
        "validation_failed": sum(c.failed for c in artifact.checks),
        "bedrock_check": {k: artifact.bedrock_check.get(k) for k in ("status", "message")}})


def _validate(cfg: Config, force: bool) -> Outcome:
    from termtune.validate import Validation, validate

    folder = RunLayout.of(cfg).artifact
    result = Validation(folder, validate(folder))
    if result.failed:
        emit("result", result.summary())
        raise UserError(f"{folder}: the artifact fails the Bedrock preflight (see the checks above)")
    return Outcome(result, result.summary())


def _deploy(cfg: Config, force: bool) -> Outcome:
    from termtune import aws

    result = aws.deploy(cfg)
    return Outcome(result, result.summary(), {k: getattr(result, k) for k in
                                              ("s3_uri", "model_name", "job_arn", "model_arn", "role_arn")})


def _deployed_model_gone(cfg: Config) -> str | None:
    from termtune import aws

    return aws.imported_model_gone(cfg)


def _invoke(cfg: Config, force: bool) -> Outcome:
    from termtune import aws

    saved = aws.invoke_cli(cfg, term=cfg.aws.invoke_prompt, raw=None, model_arn=None, stream=False, as_json=False)
    return Outcome(saved, "", {"model_arn": saved["model_arn"], "prompt": saved["prompt"]})


def _train_sources(cfg: Config) -> dict[str, Any]:
    """Where it trains. Local training adds nothing, so runs made before train.on existed stay up to date; a
    SageMaker job adds the settings that change its weights (the instances, hence the batch, and the image)."""
    if cfg.train.on == "local":
        return {}
    from termtune.aws.sagemaker import image

    sm = cfg.aws.sagemaker
    return {"train.on": cfg.train.on, "sagemaker": {"instance_type": sm.instance_type,
                                                    "instance_count": sm.instance_count, "image": image(cfg)}}


def _train_markers(layout: RunLayout, cfg: Config) -> list[Path]:
    if cfg.train.on == "sagemaker":  # the adapter stays in the job; its records come back
        return [layout.job_records / "manifest.json"]
    return [layout.train_result, layout.adapter / "adapter_model.safetensors"]


def upstream_of(cfg: Config, stage: Stage) -> tuple[str, ...]:
    """The stages whose outputs `stage` reads: a model trained on SageMaker is exported in the job, so deploy
    reads the training job's output, not a local export."""
    if stage.name == "deploy" and cfg.train.on == "sagemaker":
        return ("train",)
    return stage.upstream


def _data_sources(cfg: Config) -> dict[str, Any]:
    """The data's identity: a local file's size and sha256, a folder's files, or the Hub id and revision."""
    path = Path(cfg.data.source).expanduser()
    if path.is_file():
        content = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        content = {"files": {str(p.relative_to(path)): sha256_file(p) for p in files}}
        content = {"sha256": hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()}
    else:
        content = {"hub": cfg.data.source, "revision": cfg.data.revision or "latest (unpinned)"}
    from termtune.data import ROWS_AND_SPLIT, TARGET_SHAPING

    return {"data.source content": content, "tokenizer": cfg.tokenizer_source, "target shaping": TARGET_SHAPING,
            "rows and split": ROWS_AND_SPLIT}


# ----------------------------------------------------------------------------- results read back


def _read_data(cfg: Config, layout: RunLayout) -> Any:
    from termtune.data import PreparedData

    return PreparedData(layout.split("train"), layout.split("test"), read_json(layout.stats))


def _read_train(cfg: Config, layout: RunLayout) -> Any:
    if cfg.train.on == "sagemaker":
        from termtune.aws.jobrecord import completed_job
        from termtune.aws.training import JobResult

        return JobResult(completed_job(cfg) or {"job_name": "?", "status": "unknown"}, reused=True)
    from termtune.train import TrainResult

    return TrainResult.load(layout.train_result)


def _read_evaluate(cfg: Config, layout: RunLayout) -> Any:
    from termtune.evaluate import EvalReport

    return EvalReport(layout.eval, read_json(layout.eval_metrics))


def _read_export(cfg: Config, layout: RunLayout) -> Any:
    from termtune.export import Artifact
    from termtune.validate import Check

    manifest = read_json(layout.manifest, {})
    checks = [Check(**{k: v for k, v in c.items() if k != "failed"})
              for c in read_json(layout.validation, {}).get("checks", [])]
    record = read_json(layout.record("export"), {}).get("result", {})
    return Artifact(path=layout.artifact, dtype=manifest.get("dtype", cfg.export.dtype),
                    base_model=manifest.get("base_model", ""), files=manifest.get("files", []), checks=checks,
                    seconds=record.get("seconds", 0.0), shards=record.get("weight_files", 1),
                    bedrock_check=manifest.get("bedrock_check") or {})


def _read_deploy(cfg: Config, layout: RunLayout) -> Any:
    from termtune.aws import DeployResult
    from termtune.aws.stage import read_record

    r = read_record(cfg)
    return DeployResult(r["s3_uri"], r["model_name"], r["job_name"], r.get("role_arn"), r.get("job_arn"),
                        r.get("model_arn"), facts=r.get("imported_model") or {}, cost=r.get("cost_estimate"),
                        already_deployed=True)


BY_NAME: dict[str, Stage] = {s.name: s for s in (
    Stage("data", _data, reads=("data", "run.seed"),
          # the source is known by its content (sources); strict only decides whether a finding
          # is an error, and a run that succeeds writes the same data either way
          ignores=("data.source", "data.strict"),
          outputs=lambda l: [l.data], markers=lambda l, cfg: [l.split("test")], sources=_data_sources,
          read_back=_read_data),
    Stage("train", _train, reads=("model", "lora", "train", "run.seed"),
          # how often to log, save and evaluate does not change the trained weights
          # train.on counts through _train_sources (where it trains changes nothing when it is local)
          ignores=("train.logging_steps", "train.save_steps", "train.save_total_limit", "train.eval_steps",
                   "train.dataloader_workers", "train.on"),
          upstream=("data",), outputs=lambda l: [l.train, l.base_model],
          # the adapter is what evaluate and export read: deleted, the stage is not complete
          markers=_train_markers, check=_check_train, sources=_train_sources, read_back=_read_train),
    Stage("evaluate", _evaluate, reads=("eval",), ignores=("eval.samples_in_report",),
          upstream=("data", "train"), outputs=lambda l: [l.eval], markers=lambda l, cfg: [l.eval_metrics],
          read_back=_read_evaluate),
    Stage("export", _export, reads=("export",), upstream=("train",),
          outputs=lambda l: [l.validation], markers=lambda l, cfg: [l.manifest], read_back=_read_export),
    Stage("validate", _validate, upstream=("export",), always=True),
    Stage("deploy", _deploy, reads=("aws",),
          # how long to wait and how to invoke do not change what is imported
          ignores=("aws.import_timeout_minutes", "aws.poll_seconds", "aws.invoke_schema", "aws.invoke_max_tokens",
                   "aws.invoke_temperature", "aws.cold_start_budget_minutes", "aws.invoke_prompt",
                   "aws.model_quota", "aws.role_retry_minutes", "aws.deploy",
                   # the training job's settings reach deploy through train (its fingerprint), not directly
                   "aws.sagemaker"),
          upstream=("export",), outputs=lambda l: [l.deploy], markers=lambda l, cfg: [l.deploy], put_back=False,
          # deleted elsewhere, the recorded model is gone: make-like, `run` imports it again
          still_valid=_deployed_model_gone, read_back=_read_deploy),
    Stage("invoke", _invoke, upstream=("deploy",), always=True),
)}
STAGES: tuple[Stage, ...] = tuple(BY_NAME[name] for name in ORDER)
"""Every stage, in the order they run (termtune.stages)."""


# ----------------------------------------------------------------------------- fingerprints


def inputs(cfg: Config, stage: Stage, cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything `stage` reads, resolved now: its config values, its upstream fingerprints, its sources.
    With a `cache` (one per command), each stage's inputs are resolved once: the data source is hashed once."""
    cache = {} if cache is None else cache
    key = f"inputs:{stage.name}"
    if key not in cache:
        flat = _flatten(cfg.model_dump(mode="json"))
        keys = {k: v for k, v in flat.items()
                if any(k == r or k.startswith(r + ".") for r in stage.reads)
                and not any(k == i or k.startswith(i + ".") for i in stage.ignores)}
        upstream = {name: fingerprint(cfg, BY_NAME[name], cache) for name in upstream_of(cfg, stage)}
        cache[key] = {"keys": keys, "upstream": upstream, "sources": stage.sources(cfg)}
    return cache[key]


def fingerprint(cfg: Config, stage: Stage, cache: dict[str, Any] | None = None) -> str:
    cache = {} if cache is None else cache
    key = f"fingerprint:{stage.name}"
    if key not in cache:
        text = json.dumps(inputs(cfg, stage, cache), sort_keys=True, default=str)
        cache[key] = hashlib.sha256(text.encode()).hexdigest()
    return cache[key]


@dataclass
class State:
    """Where a stage stands against the current config."""

    complete: bool
    reasons: list[str]
    """Why it must run: the changed keys (old -> new), changed upstream stages, missing outputs."""
    record: dict[str, Any] | None


def state(cfg: Config, stage: Stage, cache: dict[str, Any] | None = None) -> State:
    layout = RunLayout.of(cfg)
    record = read_json(layout.record(stage.name))
    if not isinstance(record, dict) or "fingerprint" not in record:
        return State(False, ["not run yet"], None)
    now = inputs(cfg, stage, cache)
    if fingerprint(cfg, stage, cache) == record["fingerprint"]:
        missing = [path for path in stage.markers(layout, cfg) if not path.exists()]
        if missing:
            return State(False, [f"{path} is missing" for path in missing], record)
        return State(True, [], record)
    return State(False, _differences(record.get("inputs", {}), now), record)


def _differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    reasons = []
    old_keys, new_keys = before.get("keys", {}), now["keys"]
    for key in sorted(set(old_keys) | set(new_keys)):
        if old_keys.get(key, "(unset)") != new_keys.get(key, "(unset)"):
            reasons.append(f"{key} {_short(old_keys.get(key, '(unset)'))} → {_short(new_keys.get(key, '(unset)'))}")
    old_sources, new_sources = before.get("sources", {}), now["sources"]
    for key in sorted(set(old_sources) | set(new_sources)):
        if old_sources.get(key) != new_sources.get(key):
            reasons.append(f"{key} changed" if isinstance(new_sources.get(key), dict)
                           else f"{key} {_short(old_sources.get(key, '(unset)'))} → {_short(new_sources.get(key))}")
    for name, fp in now["upstream"].items():
        if before.get("upstream", {}).get(name) != fp:
            reasons.append(f"{name} changed")
    return reasons or ["its inputs changed"]


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and prefix == "":  # sections; values that are mappings stay whole
            out.update(_flatten(value, f"{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ----------------------------------------------------------------------------- running


def run_stage(cfg: Config, name: str, force: bool = False, quiet_skip: bool = False) -> Outcome | None:
    """Run one stage the way `termtune <stage>` does: refuse stale upstream outputs, skip when
    complete (unless `force`), otherwise replace the old outputs (kept in the history) and run.
    Returns None when the stage was skipped."""
    stage = BY_NAME[name]
    cache: dict[str, Any] = {}
    _check_upstream(cfg, stage, cache)
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun / accelerate only rank 0 writes records
    if not rank0:
        with quiet(RunLayout.of(cfg).library_log):
            return stage.run(cfg, force)
    with locked(cfg, f"termtune {command_of(name)}"), quiet(RunLayout.of(cfg).library_log):
        # verify: a deploy recorded complete is still asked whether Bedrock has the model (as `run` does)
        return _run_locked(cfg, stage, force, cache, announce=not quiet_skip, verify=True)


@contextmanager
def locked(cfg: Config, command: str, create: bool = True) -> Iterator[None]:
    """The run directory's lock: one writer at a time. A folder that is not a termtune run is refused
    first (termtune.ownership), an unwritable one next, naming it; `create=False` also refuses a run
    directory that does not exist. Under the lock, what a killed command left set aside is sorted out."""
    from termtune.oserrors import probe_writable

    layout = RunLayout.of(cfg)
    ownership.claim(layout, create=create)
    probe_writable(layout.root)
    with exclusive(layout.lock, command=command):
        ownership.mark(layout)
        ownership.recover(layout, {s.name: s.outputs(layout) for s in STAGES})
        yield


def check_upstream(cfg: Config, name: str) -> None:
    """Refuse (one line) when a stage before `name` is missing or was made with other settings."""
    _check_upstream(cfg, BY_NAME[name], {})


def _check_upstream(cfg: Config, stage: Stage, cache: dict[str, Any]) -> None:
    if cfg.train.on == "sagemaker" and stage.name in LOCAL_ONLY:
        raise UserError(f"{stage.name}: train.on=sagemaker trains, exports and validates in the SageMaker job, so "
                        "there is no local adapter to read; termtune deploy imports the job's artifact (or set "
                        "train.on=local to train here)")
    for name in upstream_of(cfg, stage):
        up = BY_NAME[name]
        if up.always:
            _check_upstream(cfg, up, cache)
            continue
        st = state(cfg, up, cache)
        if st.complete:
            continue
        if st.record is None:
            raise UserError(f"{stage.name}: {name} has not completed for this config in {cfg.run_dir}; "
                            f"run `termtune {command_of(name)}` (or `termtune run`) with the same config first")
        raise UserError(f"{stage.name}: refusing to use {name} outputs made with other settings "
                        f"({', '.join(st.reasons)}); run `termtune run` with this config to redo {name} "
                        "and what depends on it")


def _run_locked(cfg: Config, stage: Stage, force: bool, cache: dict[str, Any], announce: bool,
                verify: bool = False, before: Callable[[], None] | None = None) -> Outcome | None:
    """`verify`: also ask a complete stage's `still_valid` (termtune run); `before`: called just
    before the stage runs (not when it is skipped)."""
    layout = RunLayout.of(cfg)
    if stage.always:
        outcome = stage.run(cfg, force)
        _finish(cfg, stage, outcome, fingerprint=None, inputs=None)
        return outcome
    st = state(cfg, stage, cache)
    if st.complete and not force and verify and stage.still_valid:
        gone = stage.still_valid(cfg)
        if gone:
            st = State(False, [gone], st.record)
    if st.complete and not force:
        if announce:
            emit("skipped", f"{stage.name}: up to date in {cfg.run_dir} (same settings and inputs), skipped")
        return None
    # Everything that can refuse runs before any output is touched.
    if stage.check is not None:
        stage.check(cfg)
    outputs = stage.outputs(layout)
    ownership.check_replaceable(layout, outputs, stage.name)
    why = st.reasons if not st.complete else ["--force"]
    if st.record is not None:
        emit("rerun", f"{stage.name}: re-running: {', '.join(why)}")
        if os.environ.get("WORLD_SIZE", "1") != "1" and stage.name == "train":
            raise UserError(f"train: {layout.train} was made with other settings; under torchrun/accelerate "
                            "start over in a new run.dir (or run once without them to replace it)")
    now = inputs(cfg, stage, cache)
    if before is not None:
        before()
    # The old outputs (a record proves they are termtune's) are set aside, kept in the history and
    # deleted once the new record is written; if the stage fails they are put back.
    with ownership.replacing(layout, stage.name, outputs, st.record, why, put_back=stage.put_back):
        outcome = stage.run(cfg, force or st.record is not None)
        _finish(cfg, stage, outcome, fingerprint(cfg, stage, cache), now)
    return outcome


def _finish(cfg: Config, stage: Stage, outcome: Outcome, fingerprint: str | None, inputs: dict | None) -> None:
    """Record the stage as complete (last, atomically), then refresh the report."""
    layout = RunLayout.of(cfg)
    write_text(layout.config, dump_config(cfg))
    record = {"stage": stage.name, "fingerprint": fingerprint, "inputs": inputs, "seed": cfg.run.seed,
              **provenance(), "config": cfg.model_dump(mode="json"), "result": outcome.record}
    write_json(layout.record(stage.name), {k: v for k, v in record.items() if v is not None})
    write_report(cfg)


def write_report(cfg: Config) -> Path:
    """Bring report.html / report.md / the model card up to date with what the run directory holds."""
    from termtune.report import write_report as render

    return render(cfg)


def invoke(cfg: Config, term: str | None = None, raw: str | None = None, model_arn: str | None = None,
           stream: bool = False, as_json: bool = False) -> dict[str, Any]:
    """`termtune invoke`: ask the run's imported model (refused when it was made from other settings),
    or any model given by ARN."""
    from termtune import aws

    with locked(cfg, "termtune invoke"):
        if model_arn is None:
            check_upstream(cfg, "invoke")
        saved = aws.invoke_cli(cfg, term=term, raw=raw, model_arn=model_arn, stream=stream, as_json=as_json)
        _finish(cfg, BY_NAME["invoke"], Outcome(saved, "", {"model_arn": saved["model_arn"],
                                                            "prompt": saved["prompt"]}), None, None)
    return saved


def cleanup(cfg: Config, yes: bool = False) -> list[str]:
    """`termtune cleanup`: delete what the run imported; deploy then counts as not done."""
    from termtune import aws

    layout = RunLayout.of(cfg)
    if not layout.root.is_dir():
        return aws.cleanup(cfg, yes=yes)
    with locked(cfg, "termtune cleanup"):
        done = aws.cleanup(cfg, yes=yes)
        if done or not read_json(layout.deploy, {}).get("model_arn"):
            remove(layout.record("deploy"))
            remove(layout.record("invoke"))
        write_json(layout.record("cleanup"), {"stage": "cleanup", **provenance(), "deleted": done})
        write_report(cfg)
    return done


def _echo_plan(cfg: Config, force: bool) -> None:
    """The one-line plan, printed when training is about to start (after data: the real batches); a plan that
    does not fit refuses to train unless `force`."""
    from termtune import plan

    emit("result", plan.before_training(cfg, force))


def run(cfg: Config, force: bool = False) -> dict[str, Outcome | None]:
    """`termtune run`: every stage in order; deploy and invoke only when aws.deploy is true.
    Returns each stage's outcome by name (None for a stage that was up to date).
    `force`: train even when the plan says training does not fit this machine."""
    stages = [s for s in STAGES if (cfg.aws.deploy or s.name not in IN_AWS)
              and not (cfg.train.on == "sagemaker" and s.name in LOCAL_ONLY)]
    layout = RunLayout.of(cfg)
    started = time.perf_counter()

    outcomes: dict[str, Outcome | None] = {}
    with locked(cfg, "termtune run"), quiet(layout.library_log):
        cache: dict[str, Any] = {}
        if not state(cfg, BY_NAME["train"], cache).complete:
            _check_train(cfg)  # the model's shape against lora.*, the SageMaker settings: before the data stage
        for stage in stages:
            emit("stage", f"== {stage.name}")
            t0 = time.perf_counter()
            # the plan is this machine's: a SageMaker job's instance is checked by aws.sagemaker's rules
            before = (lambda: _echo_plan(cfg, force)) if stage.name == "train" and cfg.train.on == "local" else None
            outcome = outcomes[stage.name] = _run_locked(cfg, stage, force=False, cache=cache, announce=True,
                                                         verify=True, before=before)
            if outcome is not None:
                if outcome.summary:
                    emit("result", outcome.summary)
                emit("result", f"   ({stage.name} took {time.perf_counter() - t0:.1f}s)")
    from termtune.headline import headline, terminal_block

    emit("finished", f"== result (done in {time.perf_counter() - started:.0f}s)")
    emit("result", terminal_block(headline(cfg)))
    emit("result", f"report      {layout.report_html}")
    return outcomes


def attach_job(cfg: Config, name: str | None = None) -> Any:
    """`termtune jobs attach`: follow a recorded SageMaker job until it ends. The job of the current settings
    completes the train stage as `termtune train` would (recorded, reported); another is followed and recorded
    in <run>/sagemaker/jobs.json only."""
    from termtune.aws import jobrecord, training

    job = jobrecord.job_named(cfg, name)
    if cfg.train.on == "sagemaker" and job.get("fingerprint") == fingerprint(cfg, BY_NAME["train"]):
        cfg.aws.sagemaker.detach = False
        outcome = run_stage(cfg, "train")
        return outcome.result if outcome is not None else BY_NAME["train"].read_back(cfg, RunLayout.of(cfg))
    with locked(cfg, "termtune jobs attach", create=False):
        return training.follow_recorded(cfg, job)


def train_fingerprint(cfg: Config) -> str:
    """The train stage's fingerprint for the current settings (which SageMaker jobs are current)."""
    return fingerprint(cfg, BY_NAME["train"])
