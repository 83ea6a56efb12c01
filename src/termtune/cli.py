"""The termtune command line: parse, call the Python API (termtune.api), print. No logic lives here.

Every stage command takes `[CONFIG] [KEY=VALUE ...]`:

    termtune data prepare configs/demo.yaml run.dir=runs/demo
    termtune train configs/demo.yaml train.learning_rate=3e-4
    termtune run configs/flan-t5-large-medical.yaml aws.bucket=my-bucket
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from termtune import api
from termtune.config import Config
from termtune.errors import Detached, UserError

app = typer.Typer(
    help="Teach a language model a field's terminology and ship it to Amazon Bedrock Custom Model Import.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Prepare and inspect the training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
jobs_app = typer.Typer(help="The run's SageMaker training jobs (train.on=sagemaker).", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")

_state: dict[str, Any] = {"debug": False, "run_dir": None}

ARGS_HELP = "[CONFIG] [KEY=VALUE ...]: a YAML config and dotted overrides, e.g. train.learning_rate=3e-4"


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for user errors."),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show the libraries' notices "
                                       "(always kept in <run>/library.log).")) -> None:
    _state["debug"] = debug
    if verbose:
        from termtune.quiet import set_verbose

        set_verbose(True)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a UserError as one line and exit 2; --debug keeps the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if _state["debug"]:
                raise
            typer.echo(f"termtune: error: {e}", err=True)
            raise typer.Exit(2) from None
        except Detached as e:  # on purpose: the work goes on elsewhere, and the message says how to follow it
            typer.echo(f"termtune: {e}", err=True)
            raise typer.Exit(0) from None
        except OSError as e:  # a full disk or a read-only folder mid-stage: the user's to fix, in one line
            if _state["debug"]:
                raise
            from termtune.oserrors import describe_os_error

            typer.echo(f"termtune: error: {describe_os_error(e, _state.get('run_dir'))}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("termtune: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def resolve(args: Optional[List[str]]) -> Config:
    """Split `[CONFIG] [KEY=VALUE ...]` and load the config."""
    args = list(args or [])
    path = None
    if args and "=" not in args[0]:
        path = args.pop(0)
    for a in args:
        if "=" not in a:
            raise UserError(f"{a!r}: expected KEY=VALUE (only the first argument may be a config file)")
    cfg = api.load_config(path, args)
    _state["run_dir"] = cfg.run_dir  # the folder an OS error names when the OS names none
    return cfg


# ----------------------------------------------------------------------------- data


@data_app.command("prepare")
@friendly
def data_prepare(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP),
    strict: bool = typer.Option(False, "--strict", help="Any finding in the data is an error."),
    force: bool = typer.Option(False, "--force", help="Prepare again even when the data is up to date."),
) -> None:
    """Load, validate, clean, split and tokenize the data into <run.dir>/data.

    Example:
        termtune data prepare configs/demo.yaml data.source=terms.csv
    """
    cfg = resolve(args)
    if strict:
        cfg.data.strict = True
    _echo(api.prepare_data(cfg, force=force))


@data_app.command("inspect")
@friendly
def data_inspect(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP),
    rows: int = typer.Option(3, "--rows", help="How many training examples to show."),
    as_json: bool = typer.Option(False, "--json", help="Print stats.json instead."),
) -> None:
    """Show the prepared data: stats and a few examples.

    Example:
        termtune data inspect configs/demo.yaml --rows 5
    """
    preview = api.inspect_data(resolve(args), rows=rows)
    typer.echo(json.dumps(preview.stats, indent=2) if as_json else preview.summary())


# ----------------------------------------------------------------------------- plan / train / evaluate


@app.command()
@friendly
def plan(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Plan for this GPU (l4, a10g, l40s, a100, h100); "
                                      "default: this machine's CPU, or with train.on=sagemaker the job's instance."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Estimate training memory, time and cost, and the Bedrock price, before spending them.

    Touches no GPU, network or AWS.

    Example:
        termtune plan configs/flan-t5-large-medical.yaml --gpu a10g
    """
    cfg = resolve(args)
    from termtune import plan as plan_stage

    estimate = plan_stage.plan(cfg, gpu=gpu)
    typer.echo(json.dumps(estimate.as_dict(), indent=2) if as_json else estimate.summary())



@app.command()
@friendly
def train(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP),
    force: bool = typer.Option(False, "--force", help="Train again from scratch even when the adapter is up to "
                               "date (the old result is kept in history.json)."),
    on: Optional[str] = typer.Option(None, "--on", help="Where to train: local or sagemaker (default: train.on)."),
    detach: bool = typer.Option(False, "--detach", help="With --on sagemaker: return once the job is submitted; "
                                "termtune jobs attach follows it."),
) -> None:
    """Fine-tune LoRA adapters; re-running after a crash resumes from the last checkpoint.

    Works the same under `torchrun --nproc_per_node N` and `accelerate launch`. With --on sagemaker the
    prepared data goes to a SageMaker training job (aws.sagemaker), whose status and log lines are shown.

    Example:
        termtune train configs/demo.yaml train.epochs=2
        termtune train configs/demo.yaml --on sagemaker aws.bucket=my-bucket
    """
    cfg = resolve(args)
    if on is not None:
        cfg.train.on = on
    if detach:
        cfg.aws.sagemaker.detach = True
    result = api.train(cfg, force=force)
    if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate, one summary, not one per process
        _echo(result)


@app.command()
@friendly
def evaluate(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP),
    force: bool = typer.Option(False, "--force", help="Evaluate again even when the evaluation is up to date."),
) -> None:
    """Generate on the held-out split with the base and the tuned model; ROUGE, BLEU, chrF.

    Example:
        termtune evaluate configs/demo.yaml eval.max_new_tokens=64
    """
    _echo(api.evaluate(resolve(args), force=force))


@app.command()
@friendly
def report(args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP)) -> None:
    """(Re)write report.html and report.md from what the run directory holds.

    Example:
        termtune report configs/demo.yaml
    """
    typer.echo(f"report: {api.write_report(resolve(args))}")


# ----------------------------------------------------------------------------- export / validate


@app.command()
@friendly
def export(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP),
    force: bool = typer.Option(False, "--force", help="Export again, replacing an existing artifact folder."),
) -> None:
    """Merge the adapter into the unquantized base and write a Bedrock CMI artifact.

    Example:
        termtune export configs/demo.yaml export.dtype=fp32
    """
    _echo(api.export(resolve(args), force=force))


@app.command()
@friendly
def validate(
    directory: Path = typer.Argument(..., help="A model folder to check against the Bedrock CMI rules."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    load: bool = typer.Option(True, "--load/--no-load",
                              help="Last, load the folder under transformers 4.51.3 (Bedrock's) and generate."),
) -> None:
    """Preflight a folder for Bedrock Custom Model Import (no GPU, no AWS needed).

    Exits non-zero if any check fails. With Bedrock's interpreter (TERMTUNE_BEDROCK_PYTHON, or
    .venv-bedrock from make install) the last check loads the folder under transformers 4.51.3.

    Example:
        termtune validate runs/demo/artifact
    """
    result = api.validate(directory, load=load)
    typer.echo(json.dumps([c.as_dict() for c in result.checks], indent=2) if as_json else result.summary())
    if result.failed:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- AWS


@app.command()
@friendly
def deploy(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would happen (and the IAM policies)."),
) -> None:
    """Upload the artifact to S3, ensure the IAM role, create the import job and wait.

    Example:
        termtune deploy configs/flan-t5-large-medical.yaml aws.bucket=my-bucket
    """
    _echo(api.deploy(resolve(args), dry_run=dry_run))


@app.command()
@friendly
def role(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the trust and permission policies only."),
) -> None:
    """Create or reuse the IAM service role Bedrock assumes to read the artifact.

    Example:
        termtune role configs/flan-t5-large-medical.yaml aws.bucket=my-bucket --dry-run
    """
    cfg = resolve(args)
    from termtune import aws, pipeline

    if dry_run:
        typer.echo(aws.ensure_role(cfg, dry_run=True))
        return
    with pipeline.locked(cfg, "termtune role"):
        typer.echo(aws.ensure_role(cfg))


@app.command()
@friendly
def invoke(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP),
    term: Optional[str] = typer.Option(None, "--term", "-t", help="A term: sent through the training prompt."),
    text: Optional[str] = typer.Option(None, "--raw", help="Send this text as the prompt, unchanged."),
    model: Optional[str] = typer.Option(None, "--model", help="Imported model ARN (default: the run's)."),
    stream: bool = typer.Option(False, "--stream", help="Stream tokens as they are generated."),
    as_json: bool = typer.Option(False, "--json", help="Print the response as JSON."),
) -> None:
    """Ask the imported model for a definition.

    Example:
        termtune invoke configs/demo.yaml --term "Hypertension"
    """
    api.invoke(resolve(args), term=term, raw=text, model_arn=model, stream=stream, as_json=as_json)


@app.command()
@friendly
def cleanup(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete every model this run directory imported, their S3 prefixes, and the role if termtune created it.

    Example:
        termtune cleanup configs/demo.yaml --yes
    """
    api.cleanup(resolve(args), yes=yes)


@app.command()
@friendly
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(8787, "--port", help="Port to bind (0: any free port)."),
    cold_start: float = typer.Option(0.0, "--cold-start", help="Answer ModelNotReadyException for N seconds "
                                     "after each import (rehearse a cold start)."),
    throttle_every: int = typer.Option(0, "--throttle-every", help="Answer ThrottlingException to every Nth call."),
    import_delay: float = typer.Option(1.0, "--import-delay", help="Seconds an import job stays InProgress."),
    model_quota: int = typer.Option(3, "--model-quota", help="Imported models allowed (Bedrock's default is 3)."),
    region: str = typer.Option("us-east-1", "--region"),
    runtime: str = typer.Option("auto", "--runtime", help="Where imported models run: worker (a process per "
                                "model under Bedrock's transformers 4.51.3: TERMTUNE_BEDROCK_PYTHON, or "
                                ".venv-bedrock/bin/python here or beside this virtual environment), in-process, "
                                "or auto (worker when that interpreter exists)."),
    run_training_jobs: bool = typer.Option(False, "--run-training-jobs", help="Run SageMaker training jobs: each "
                                           "job's ContainerEntrypoint + ContainerArguments runs as a process on this "
                                           "machine (binds 127.0.0.1 only). Without it every training job fails."),
    training_time_scale: float = typer.Option(1.0, "--training-time-scale", help="Multiply serve's own training-job "
                                              "waits (the 120 s stop grace, the spot wait, the checkpoint sync "
                                              "period) by this."),
    spot_interrupt_after: float = typer.Option(0.0, "--spot-interrupt-after", metavar="SECONDS",
                                               help="Interrupt each managed spot training job once, this long into "
                                               "training (it restarts from its S3 checkpoints)."),
    training_capacity_error: bool = typer.Option(False, "--training-capacity-error", help="Answer "
                                                 "ResourceLimitExceeded to every CreateTrainingJob."),
) -> None:
    """A local Bedrock-compatible endpoint (control plane + runtime) for offline runs and tests.

    Point boto3 at it with AWS_ENDPOINT_URL_BEDROCK / AWS_ENDPOINT_URL_BEDROCK_RUNTIME, and SageMaker training
    jobs with AWS_ENDPOINT_URL_SAGEMAKER (they run only with --run-training-jobs).
    Its startup line says where models run; every answer says so in its x-termtune-runtime header.

    Example:
        termtune serve --port 8787
    """
    from termtune import serve as serve_stage

    serve_stage.serve(host=host, port=port, cold_start_seconds=cold_start, throttle_every=throttle_every,
                      import_delay_seconds=import_delay, model_quota=model_quota, region=region, runtime=runtime,
                      run_training_jobs=run_training_jobs, training_time_scale=training_time_scale,
                      spot_interrupt_after_seconds=spot_interrupt_after,
                      training_capacity_error=training_capacity_error)


# ----------------------------------------------------------------------------- the whole path


@app.command()
@friendly
def run(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP),
    force: bool = typer.Option(False, "--force", help="Train even when the plan says the training peak does not "
                               "fit this machine's memory (the plan is an estimate: `termtune plan` shows it)."),
) -> None:
    """Run every stage in order, skipping stages made from the same settings and inputs.

    data -> train -> evaluate -> export -> validate -> deploy -> invoke

    A changed setting re-runs exactly the stages that read it, and those after them; the
    replaced results are kept in <run>/history.json. Training is refused when the plan says it
    does not fit this machine's memory, unless --force.

    Example:
        termtune run configs/demo.yaml
    """
    api.run(resolve(args), force=force)


# ----------------------------------------------------------------------------- SageMaker jobs

JOB_HELP = "A job of this run by name (default: the newest)."


@jobs_app.command("list")
@friendly
def jobs_list(args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP)) -> None:
    """The training jobs this run submitted, newest last (from <run>/sagemaker/jobs.json).

    Example:
        termtune jobs list configs/demo.yaml
    """
    from termtune import pipeline
    from termtune.aws import training

    cfg = resolve(args)
    typer.echo(training.jobs_list(cfg, pipeline.train_fingerprint(cfg)))


@jobs_app.command("status")
@friendly
def jobs_status(args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP),
                job: Optional[str] = typer.Option(None, "--job", help=JOB_HELP)) -> None:
    """A job's status, transitions, failure reason, billable time and output, as SageMaker reports them now.

    Example:
        termtune jobs status configs/demo.yaml
    """
    from termtune.aws import training

    typer.echo(training.jobs_status(resolve(args), job))


@jobs_app.command("logs")
@friendly
def jobs_logs(args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP),
              job: Optional[str] = typer.Option(None, "--job", help=JOB_HELP)) -> None:
    """Every log line a job has written so far (CloudWatch Logs), its hosts merged by time.

    Example:
        termtune jobs logs configs/demo.yaml
    """
    from termtune.aws import training

    for line in training.jobs_logs(resolve(args), job):
        typer.echo(line)


@jobs_app.command("stop")
@friendly
def jobs_stop(args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP),
              job: Optional[str] = typer.Option(None, "--job", help=JOB_HELP)) -> None:
    """Ask SageMaker to stop a job (it checkpoints on SIGTERM and ends Stopped).

    Example:
        termtune jobs stop configs/demo.yaml
    """
    from termtune.aws import training

    typer.echo(training.jobs_stop(resolve(args), job))


@jobs_app.command("attach")
@friendly
def jobs_attach(args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP),
                job: Optional[str] = typer.Option(None, "--job", help=JOB_HELP)) -> None:
    """Follow a job's status and log lines until it ends, then record its result as termtune train does.

    Example:
        termtune jobs attach configs/demo.yaml
    """
    from termtune import pipeline

    _echo(pipeline.attach_job(resolve(args), job))


def _echo(result: Any) -> None:
    """Print a stage's summary; a skipped stage has already said why."""
    if not result.up_to_date:
        typer.echo(result.summary())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
