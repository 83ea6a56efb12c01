"""Inside a SageMaker training job: train over the job's hosts and GPUs, export on the first host.

    python -m termtune.remote.entry          # what entry.sh runs, once per host
    python -m termtune.remote.entry train    # each torchrun worker (one per GPU; one on a CPU host)
    python -m termtune.remote.entry export   # the first host, once training has ended

The job's root is /opt/ml (TERMTUNE_OPT_ML moves it, for an offline rehearsal); the job runs in it, so the
config's relative paths (termtune.remote.bundle) point into the channels:

    input/config/resourceconfig.json   the hosts (algo-1, ...) and this one: torchrun's nodes and rank
    input/data/{code,config,data,model} the bundle's channels
    checkpoints/train/                 the run's train/ folder: sealed checkpoints, loss log, adapter;
                                       SageMaker restores it after a spot interruption, so training resumes
    termtune/run/                      the run directory (data copied from the data channel), made anew each start
    termtune/train.log                 everything the workers and the export printed
    model/artifact/                    the Bedrock artifact: exactly the files Custom Model Import reads
    model/termtune/                    manifest.json (sha256 of every artifact file), metrics.json,
                                       metrics.jsonl (the loss log), validation.json, train.log
    output/failure                     on any failure, one paragraph saying why (the job's FailureReason)

SIGTERM (StopTrainingJob, the runtime limit, a spot interruption) reaches the workers, which seal a
checkpoint of the step they are in and exit; the job then ends non-zero without exporting.
Rehearsal-only settings: TERMTUNE_HOST_ADDRESSES ({"algo-1": "127.0.0.1", ...}: host name -> address) and
TERMTUNE_MASTER_PORT (instead of 29500).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from termtune.errors import UserError

MASTER_PORT = 29500
"""torchrun's rendezvous port on the first host (the SageMaker SDK's too)."""
JOB_TRAIN = "checkpoints/train"
RECORDS = "model/termtune"
FAILURE = "output/failure"
LOG = "termtune/train.log"
ERRORS = "termtune/errors"
"""One file per failed step (train-rank<N>, export) holding its one-line reason, for output/failure."""


def job_root() -> Path:
    return Path(os.environ.get("TERMTUNE_OPT_ML") or "/opt/ml").resolve()


# ----------------------------------------------------------------------------- hosts -> torchrun


def torchrun_arguments(resource: dict[str, Any], gpus: int, addresses: dict[str, str] | None = None,
                       port: int | None = None) -> list[str]:
    """torchrun's arguments for this host, from resourceconfig.json ({"current_host", "hosts"}): one node per
    host, this host's index as its rank, one process per GPU (one on a CPU host), the first host as master.
    `addresses` maps host names to addresses (else the names, which resolve inside a job). A single host is
    its own master at 127.0.0.1: no name lookup needed."""
    hosts, current = resource.get("hosts"), resource.get("current_host")
    if not isinstance(hosts, list) or not hosts or current not in hosts:
        raise UserError(f"resourceconfig.json: current_host {current!r} is not among hosts {hosts!r}")
    master = "127.0.0.1" if len(hosts) == 1 else (addresses or {}).get(hosts[0], hosts[0])
    return [f"--nnodes={len(hosts)}", f"--node_rank={hosts.index(current)}", f"--nproc_per_node={max(gpus, 1)}",
            f"--master_addr={master}", f"--master_port={port or MASTER_PORT}"]


def _resource_config(root: Path) -> dict[str, Any]:
    path = root / "input/config/resourceconfig.json"
    try:
        resource = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; SageMaker writes it into every training job (so must a rehearsal)") \
            from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(resource, dict):
        raise UserError(f"{path}: not a JSON object")
    return resource


def _rehearsal_settings() -> tuple[dict[str, str] | None, int | None]:
    addresses, port = os.environ.get("TERMTUNE_HOST_ADDRESSES"), os.environ.get("TERMTUNE_MASTER_PORT")
    try:
        parsed = json.loads(addresses) if addresses else None
        if parsed is not None and not isinstance(parsed, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise UserError(f"TERMTUNE_HOST_ADDRESSES: {e}; expected {{\"algo-1\": \"127.0.0.1\", ...}}") from None
    if port is not None and not port.isdigit():
        raise UserError(f"TERMTUNE_MASTER_PORT={port!r}: not a port number")
    return parsed, int(port) if port else None


# ----------------------------------------------------------------------------- the run in the job


def load_job_config(root: Path) -> Any:
    """The config channel's termtune.yaml, checked against the channels it names. The job decides where the
    run directory and the artifact go (whatever the file says), and a `train.on` setting is forced to local:
    the job trains where it is."""
    from termtune.config import TrainConfig, load_config
    from termtune.remote.bundle import CONFIG_FILE, JOB_ARTIFACT, JOB_CHANNEL, JOB_RUN_DIR

    path = root / JOB_CHANNEL.format("config") / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing: the job has no termtune config channel (`config`), or it is empty")
    placed = {"run.dir": JOB_RUN_DIR, "export.dir": JOB_ARTIFACT}
    cfg = load_config(path, {**placed, "train.on": "local"} if "on" in TrainConfig.model_fields else placed)
    data = root / JOB_CHANNEL.format("data")
    if not (data / "train.jsonl").is_file():
        raise UserError(f"{data}/train.jsonl: missing: the job has no prepared-data channel (`data`), or it lacks "
                        "the training split; rebuild the bundle after `termtune data prepare`")
    for setting in ("source", "tokenizer", "architecture"):
        value = getattr(cfg.model, setting)
        if value and value.startswith(JOB_CHANNEL.format("model")) and not (root / value).exists():
            raise UserError(f"model.{setting}: {root / value} is missing: the job's `model` channel does not hold "
                            "the base model the config names")
    return cfg


def prepare_run_dir(cfg: Any, root: Path) -> None:
    """The run directory on this host, made anew: the prepared data from the data channel, and train/ in the
    checkpoint folder, so the checkpoints, the loss log and the adapter survive a restart of the job."""
    from termtune.layout import RunLayout
    from termtune.remote.bundle import JOB_CHANNEL, link_tree

    layout = RunLayout.of(cfg)
    run = root / layout.root
    if run.exists():
        shutil.rmtree(run)
    link_tree(root / JOB_CHANNEL.format("data"), root / layout.data)
    (root / JOB_TRAIN).mkdir(parents=True, exist_ok=True)
    (root / layout.train).symlink_to(root / JOB_TRAIN, target_is_directory=True)
    if cfg.model.init == "random":
        # Built here, before torchrun: under torch.distributed transformers saves on global rank 0 only, and the
        # other hosts do not share its disk.
        from termtune.modeling import materialize_random_base

        materialize_random_base(cfg)


# ----------------------------------------------------------------------------- the host's process


class _Stop:
    """SIGTERM while the workers run goes to the workers themselves (each seals a checkpoint and exits), not
    to torchrun: when the whole process group is signalled, torchrun gets it once, not twice (a second one
    cuts its wait for the workers short). Before or after them, it ends the job at once."""

    def __init__(self) -> None:
        self.requested = False
        self.child: subprocess.Popen | None = None
        self.launcher = False
        """Whether the child is torchrun, whose own children get the signal."""

    def handle(self, *_: Any) -> None:
        self.requested = True
        if self.child is None or self.child.poll() is not None:
            raise _Stopped()
        for pid in (_children(self.child.pid) if self.launcher else []) or [self.child.pid]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


class _Stopped(Exception):
    pass


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _run_logged(command: list[str], root: Path, stop: _Stop, launcher: bool = False) -> int:
    """Run `command` in the job's root, its output both on stdout (the job's log) and in termtune/train.log.
    `launcher`: the command is torchrun (see _Stop)."""
    log = root / LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        stop.child, stop.launcher = proc, launcher
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
            out.write(line)
        returncode = proc.wait()
    stop.child = None
    return returncode


def launch(root: Path) -> int:
    """This host's part of the job; returns the exit status (0: done)."""
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop.handle)
    first_host = False
    try:
        os.chdir(root)
        (root / FAILURE).unlink(missing_ok=True)  # an earlier attempt's, in a rehearsal that reuses the folder
        resource = _resource_config(root)
        addresses, port = _rehearsal_settings()
        cfg = load_job_config(root)
        import torch

        arguments = torchrun_arguments(resource, torch.cuda.device_count(), addresses, port)
        first_host = resource["current_host"] == resource["hosts"][0]
        import termtune

        print(f"termtune {termtune.__version__} from {Path(termtune.__file__).parent} on {resource['current_host']} "
              f"of {len(resource['hosts'])} host(s): torchrun {' '.join(arguments)}", flush=True)
        prepare_run_dir(cfg, root)
        shutil.rmtree(root / ERRORS, ignore_errors=True)
        me = [sys.executable, "-m", "termtune.remote.entry"]
        trained = _run_logged([sys.executable, "-m", "torch.distributed.run", *arguments, *me[1:], "train"],
                              root, stop, launcher=True)
        if stop.requested:
            raise _Stopped()
        if trained != 0:
            raise UserError(_step_failure(root, "training", trained))
        if first_host:
            exported = _run_logged([*me, "export"], root, stop)
            if stop.requested:
                raise _Stopped()
            if exported != 0:
                raise UserError(_step_failure(root, "export", exported))
        return 0
    except _Stopped:
        _write_failure(root, _stopped_reason(root))
        return 128 + signal.SIGTERM
    except UserError as e:
        _write_failure(root, str(e))
        return 1
    except Exception as e:  # a bug or an OS error: the reason, and the traceback in the job's log
        traceback.print_exc()
        _write_failure(root, f"termtune's job failed: {type(e).__name__}: {e} (traceback in the job's log)")
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if first_host and (root / LOG).is_file():
            (root / RECORDS).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / LOG, root / RECORDS / "train.log")


def _step_failure(root: Path, step: str, status: int) -> str:
    errors = sorted((root / ERRORS).glob("*")) if (root / ERRORS).is_dir() else []
    if errors:  # the first rank's reason; the others usually only say that rank failed
        return errors[0].read_text(encoding="utf-8").strip()
    log = (root / LOG).read_text(encoding="utf-8", errors="replace") if (root / LOG).is_file() else ""
    last = log.strip().splitlines()[-1] if log.strip() else "no output"
    return f"termtune's {step} exited with status {status} without saying why (killed, or out of memory?); " \
           f"its last log line: {last}"


def _stopped_reason(root: Path) -> str:
    from termtune.train import last_complete_checkpoint

    checkpoint = last_complete_checkpoint(root / JOB_TRAIN / "checkpoints")
    saved = (f"the last sealed checkpoint is {checkpoint.name}, kept in the job's checkpoints; a job started with "
             "the same CheckpointConfig resumes from it") if checkpoint else "no checkpoint had been sealed yet"
    return f"termtune's job was stopped (SIGTERM: StopTrainingJob, the runtime limit or a spot interruption) " \
           f"before it finished; {saved}."


def _write_failure(root: Path, reason: str) -> None:
    print(f"termtune: error: {reason}", file=sys.stderr, flush=True)
    path = root / FAILURE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(reason.split()) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- the steps


def _train(root: Path) -> None:
    from termtune.train import train

    train(load_job_config(root))


def _export(root: Path) -> None:
    """The artifact into model/artifact (its manifest moved beside it: Bedrock imports the folder whole), and
    termtune's records into model/termtune."""
    from termtune.export import export
    from termtune.layout import RunLayout
    from termtune.rundir import write_json

    cfg = load_job_config(root)
    layout = RunLayout.of(cfg)
    # The job's own output: an earlier attempt's artifact (its manifest moved out) is replaced, not refused.
    shutil.rmtree(root / layout.artifact, ignore_errors=True)
    artifact = export(cfg, force=True)
    records = root / RECORDS
    records.mkdir(parents=True, exist_ok=True)
    os.replace(root / layout.manifest, records / "manifest.json")
    shutil.copyfile(root / layout.validation, records / "validation.json")
    if (root / layout.train_metrics).is_file():
        shutil.copyfile(root / layout.train_metrics, records / "metrics.jsonl")
    train_result = json.loads((root / layout.train_result).read_text(encoding="utf-8"))
    write_json(records / "metrics.json", {
        "train": train_result,
        "export": {"artifact_sha256": artifact.digest, "dtype": artifact.dtype, "total_bytes": artifact.total_bytes,
                   "weight_files": artifact.shards, "seconds": round(artifact.seconds, 1),
                   "validation_failed": sum(c.failed for c in artifact.checks),
                   "bedrock_check": {k: artifact.bedrock_check.get(k) for k in ("status", "message")}}})
    print(artifact.summary(), flush=True)


def _step(name: str, root: Path) -> int:
    """Run a worker step; a failure leaves its one-line reason in termtune/errors/ for output/failure."""
    try:
        (_train if name == "train" else _export)(root)
        return 0
    except Exception as e:
        if not isinstance(e, UserError):
            traceback.print_exc()
        reason = str(e) if isinstance(e, UserError) else f"termtune's {name} failed: {type(e).__name__}: {e}"
        print(f"termtune: error: {reason}", file=sys.stderr, flush=True)
        tag = f"train-rank{int(os.environ.get('RANK', '0')):05d}" if name == "train" else name
        (root / ERRORS).mkdir(parents=True, exist_ok=True)
        (root / ERRORS / tag).write_text(reason + "\n", encoding="utf-8")
        return 1


def main(argv: list[str]) -> int:
    root = job_root()
    if argv and argv[0] in ("train", "export"):
        return _step(argv[0], root)
    if argv:
        print(f"usage: python -m termtune.remote.entry [train|export] (got {argv[0]!r})", file=sys.stderr)
        return 2
    return launch(root)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
