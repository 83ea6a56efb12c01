"""termtune's Python API: every stage as a function, for notebooks and scripts.

    import termtune as tt

    cfg = tt.load_config("configs/demo.yaml", {"run.dir": "runs/nb", "train.epochs": 1})
    tt.prepare_data(cfg)                       # PreparedData: split sizes, token lengths
    tt.train(cfg)                              # TrainResult: steps, losses, throughput
    tt.evaluate(cfg)                           # EvalReport: base vs tuned scores
    tt.export(cfg)                             # Artifact: the folder Bedrock imports
    tt.validate(cfg)                           # Validation: the CMI preflight checks
    tt.deploy(cfg)                             # DeployResult: S3 URI, import job, model ARN
    tt.invoke(cfg, term="Hypertension")        # Invocation: the model's answer
    tt.cleanup(cfg, yes=True)                  # Cleanup: what was deleted

The `termtune` command calls exactly these functions, and they run every stage through
termtune.pipeline: a stage refuses outputs that earlier stages made with other settings, a stage
that is up to date (same settings and inputs) is skipped and its result read back from the run
directory (`result.up_to_date` is then True), the run directory's lock is held while a stage writes,
replaced results are kept in <run>/history.json, and the report is refreshed after each stage.

A result's repr is what the command prints; in a notebook, evaluation metrics and validation
checks show as tables. A mistake the user can fix (a missing file, a bad setting, outputs made
from other settings) raises termtune.errors.UserError with a one-line message.

What a stage says while it runs (a stage starting or skipped and why, the wait for Bedrock, the
answer `invoke` gets) goes through termtune.events: by default as the lines the command prints,
on standard output and standard error. To show it another way, give it a function of your own:

    from termtune import events

    with events.showing(lambda kind, message: my_log.append((kind, message))):
        tt.run(cfg)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from termtune.config import Config
from termtune.results import StageResult

if TYPE_CHECKING:
    from termtune.aws import DeployResult
    from termtune.data import PreparedData
    from termtune.evaluate import EvalReport
    from termtune.export import Artifact
    from termtune.train import TrainResult
    from termtune.validate import Validation

__all__ = ["load_config", "prepare_data", "inspect_data", "train", "evaluate", "export", "validate", "deploy",
           "invoke", "cleanup", "run", "write_report",
           "DataPreview", "Invocation", "Cleanup", "RunResult"]


# ----------------------------------------------------------------------------- config


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | Sequence[str] | None = None,
                **sections: Mapping[str, Any]) -> Config:
    """The typed config: a YAML file (None: the defaults) with overrides applied.

    Overrides are a mapping of dotted keys to values (`{"train.epochs": 1}`), or keyword
    arguments naming a section (`train={"epochs": 1}`), or both; or the command line's
    `["train.epochs=1", ...]` strings (values parsed as YAML). Reads only the config file.
    A setting assigned afterwards (`cfg.train.epochs = 2`, `cfg.lora = {"r": 8}`) is checked the
    same way, cross-field rules included; a refused value raises UserError and changes nothing.

    Example:
        cfg = tt.load_config("configs/demo.yaml", {"run.dir": "runs/nb"}, train={"epochs": 1})

    Raises:
        UserError: the file is missing or not valid YAML, a key is unknown (with a did-you-mean),
            a value has the wrong type or range, or a cross-field rule fails.
    """
    from termtune.config import load_config as load

    if isinstance(overrides, str):
        raise TypeError("overrides: a mapping of dotted keys ({'train.epochs': 1}) or a list of 'KEY=VALUE' strings")
    if overrides is not None and not isinstance(overrides, Mapping):
        if sections:
            raise TypeError("give section keywords with a mapping of overrides, not with 'KEY=VALUE' strings")
        return load(path, list(overrides))
    dotted = dict(overrides or {})
    for section, values in sections.items():
        if not isinstance(values, Mapping):
            raise TypeError(f"{section}=...: a mapping of that section's keys, e.g. {section}={{'key': value}}")
        dotted.update({f"{section}.{key}": value for key, value in values.items()})
    return load(path, dotted)


# ----------------------------------------------------------------------------- stages


def prepare_data(cfg: Config, force: bool = False) -> PreparedData:
    """Read, validate, clean, split (by term, seeded) and tokenize `data.source`.

    Reads `data.source` (a local file or folder, or a Hub dataset) and the tokenizer.
    Writes <run>/data/{train,test}.jsonl and stats.json, all at once. Skipped when the data
    was prepared from the same source content and settings, unless `force`.
    """
    return _stage(cfg, "data", force)


def inspect_data(cfg: Config, rows: int = 3) -> DataPreview:
    """The prepared data's stats and its first `rows` training examples. Reads <run>/data; writes nothing."""
    from termtune.data import inspect

    stats, examples = inspect(cfg, rows=rows)
    return DataPreview(stats, examples)


def train(cfg: Config, force: bool = False) -> TrainResult:
    """Fine-tune LoRA adapters with the model family's transformers Trainer (labels padded with -100).

    Reads <run>/data and the base model. Writes <run>/train: sealed checkpoints (a crashed run
    resumes from the last one trained on the same data), adapter/, metrics.jsonl (the loss curve)
    and result.json. Skipped when the adapter was trained from the same data and `model`, `lora`,
    `train` settings and is still there, unless `force` (which trains from scratch).
    """
    return _stage(cfg, "train", force)


def evaluate(cfg: Config, force: bool = False) -> EvalReport:
    """Generate on the held-out split with the base and the tuned model; ROUGE, BLEU, chrF.

    Reads <run>/data/test.jsonl and <run>/train/adapter. Writes <run>/eval/metrics.json and
    predictions.jsonl. Skipped when up to date, unless `force`.
    """
    return _stage(cfg, "evaluate", force)


def export(cfg: Config, force: bool = False) -> Artifact:
    """Merge the adapter into the unquantized base and write the Bedrock Custom Model Import artifact.

    Reads <run>/train/adapter and the base model. Writes the artifact folder (export.dir, default
    <run>/artifact: safetensors weights, config, tokenizer, manifest.json last) atomically, and
    <run>/validation.json. `force` replaces an existing termtune artifact outside the run directory.
    """
    return _stage(cfg, "export", force)


def validate(target: Config | str | Path, load: bool = True) -> Validation:
    """Preflight a folder against the Bedrock CMI rules (no GPU, no AWS).

    Given a config: the run's artifact, as a pipeline stage (it must come from the current export
    settings; failing checks raise UserError; export already loaded it under transformers 4.51.3).
    Given a folder: that folder, any folder, and with `load` a last check that loads it under
    transformers 4.51.3 when Bedrock's interpreter is there (termtune.bedrock_check); the result
    says whether it `failed`. Reads the folder; writes only the run's report (given a config).
    """
    from termtune.bedrock_check import as_validation_check
    from termtune.validate import Validation, validate as check

    if isinstance(target, Config):
        return _stage(target, "validate")
    checks = check(target)
    if load:
        checks.append(as_validation_check(Path(target), checks))
    return Validation(Path(target), checks)


def deploy(cfg: Config, dry_run: bool = False) -> DeployResult:
    """Upload the artifact to S3, ensure the IAM role, create the import job and wait for the model.

    Reads the artifact (validated first) and AWS (the standard credential chain and endpoint
    variables; see termtune.local for offline stand-ins). Writes <run>/deploy.json, S3 objects
    under `aws.prefix`, the IAM role (unless `aws.role_arn`) and the imported model. Skipped when
    the same artifact is already imported. `dry_run` prints the plan and the IAM policies and
    creates nothing.
    """
    if dry_run:
        from termtune import aws, pipeline

        pipeline.check_upstream(cfg, "deploy")
        return aws.deploy(cfg, dry_run=True)
    return _stage(cfg, "deploy")


def invoke(cfg: Config, term: str | None = None, *, raw: str | None = None, model_arn: str | None = None,
           stream: bool = False, as_json: bool = False) -> Invocation:
    """Ask the imported model for a definition, retrying through a cold start, and print the answer.

    `term` is sent through data.prompt_template (default: aws.invoke_prompt); `raw` is sent as it is.
    Reads <run>/deploy.json (the run's model, refused if made from other settings) unless
    `model_arn` names one. Writes <run>/invoke.json. `stream` prints tokens as they arrive;
    `as_json` prints the whole response as JSON instead of the text.
    """
    from termtune import pipeline

    saved = pipeline.invoke(cfg, term=term, raw=raw, model_arn=model_arn, stream=stream, as_json=as_json)
    return Invocation.of(saved)


def cleanup(cfg: Config, yes: bool = False) -> Cleanup:
    """Delete every model this run directory imported, their S3 prefixes, and the role if termtune made it.

    Reads <run>/deploy.json and <run>/history.json. Writes deploy.json (marked deleted) and removes
    the deploy and invoke records, so the next deploy imports again. Without `yes` it asks at a
    terminal and refuses elsewhere.
    """
    from termtune import pipeline

    return Cleanup(pipeline.cleanup(cfg, yes=yes))


def run(cfg: Config, force: bool = False) -> RunResult:
    """Every stage in order (data, train, evaluate, export, validate, then deploy and invoke unless
    aws.deploy is false), skipping each stage that is up to date and saying why the others run.

    Reads and writes what the stages do; replaced results are kept in <run>/history.json. Before
    training it prints the plan (termtune.plan) and refuses when the planned training peak does not
    fit this machine's memory, unless `force`.
    """
    from termtune import pipeline

    outcomes = pipeline.run(cfg, force=force)
    results: dict[str, Any] = {}
    for name, outcome in outcomes.items():
        if outcome is None:
            results[name] = _read_back(cfg, name)
        else:
            results[name] = Invocation.of(outcome.result) if name == "invoke" else outcome.result
    return RunResult(results)


def write_report(cfg: Config) -> Path:
    """(Re)write <run>/report.html, report.md and model-card.md from what the run directory holds,
    under its lock. A run directory that does not exist (a mistyped run.dir) is refused, not created."""
    from termtune import pipeline

    with pipeline.locked(cfg, "termtune report", create=False):
        return pipeline.write_report(cfg)


def _stage(cfg: Config, name: str, force: bool = False) -> Any:
    from termtune import pipeline

    outcome = pipeline.run_stage(cfg, name, force=force)
    return _read_back(cfg, name) if outcome is None else outcome.result


# ----------------------------------------------------------------------------- results read back


def _read_back(cfg: Config, name: str) -> StageResult:
    """The result of a stage the runner found up to date, from the files it wrote."""
    from termtune import pipeline
    from termtune.layout import RunLayout

    result = pipeline.BY_NAME[name].read_back(cfg, RunLayout.of(cfg))
    result.up_to_date = True
    return result


# ----------------------------------------------------------------------------- result types of their own


@dataclass(repr=False)
class DataPreview(StageResult):
    """What `termtune data inspect` shows: <run>/data/stats.json and the first training examples."""

    stats: dict[str, Any]
    examples: list[dict[str, Any]]
    """Training rows as prepared: term, prompt, target, input_ids, labels."""

    def summary(self) -> str:
        from termtune.data import summary

        shown = [f"\n[{ex['term']}]\n  prompt: {ex['prompt']}\n  target: {ex['target'][:300]}" for ex in self.examples]
        return summary(self.stats) + "".join(shown)


@dataclass(repr=False)
class Invocation(StageResult):
    """One answer from the imported model, as saved in <run>/invoke.json."""

    model_arn: str
    prompt: str
    text: str
    seconds: float
    cold_start_retries: int
    saved: dict[str, Any] = field(default_factory=dict)
    """The whole record: the request body and the raw response (or stream chunks)."""

    @classmethod
    def of(cls, saved: dict[str, Any]) -> Invocation:
        return cls(saved["model_arn"], saved["prompt"], saved["text"], saved.get("seconds", 0.0),
                   saved.get("cold_start_retries", 0), saved)

    def summary(self) -> str:
        retries = f", {self.cold_start_retries} cold-start retries" if self.cold_start_retries else ""
        return f"{self.prompt}\n  {self.text}\n  ({self.model_arn}, {self.seconds:.1f}s{retries})"


@dataclass(repr=False)
class Cleanup(StageResult):
    """What cleanup deleted, one line each (empty when nothing was left or the user declined)."""

    deleted: list[str]

    def summary(self) -> str:
        return "\n".join(self.deleted) if self.deleted else "nothing deleted"


@dataclass(repr=False)
class RunResult(StageResult):
    """Each stage's result by name, in the order `run` ran them: `result["evaluate"].metrics`."""

    results: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.results[name]

    def summary(self) -> str:
        return "\n".join(f"== {name}\n{result!r}" for name, result in self.results.items())
