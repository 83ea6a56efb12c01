"""Local stand-ins for AWS, for the demo, notebooks and tests: nothing here can reach AWS.

    moto's server      S3, IAM, STS, KMS and CloudWatch Logs, with IAM access control on (termtune.rehearsal)
    termtune serve     Amazon Bedrock: import jobs and InvokeModel, with real generation; and SageMaker
                       training jobs (run as local processes only with run_training_jobs=True)

Both run as child processes on free 127.0.0.1 ports. Inside the block, the AWS SDK's standard
variables point every boto3 client at them (AWS_ENDPOINT_URL_<SERVICE>, the access key moto
issued, a region, no profile or ~/.aws files), so termtune's own code is the code that talks to
real AWS; on exit, also on an exception or Ctrl-C, exactly these two processes are stopped and
every variable is restored as it was.

    import termtune as tt
    from termtune.local import local_aws

    with local_aws(bucket="termtune-demo"):
        tt.deploy(cfg)
        tt.invoke(cfg, term="Hypertension")
        tt.cleanup(cfg, yes=True)

    python -m termtune.local --bucket termtune-demo -- termtune run configs/demo.yaml   # scripts/demo.sh

The tests run the same two servers inside the test process (to inspect their state) and use
`aws_variables` and `environment` from here to point boto3 at them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from termtune.errors import UserError
from termtune.events import emit

HOST = "127.0.0.1"
REGION = "us-east-1"
MOTO_SERVICES = ("S3", "IAM", "STS", "KMS", "CLOUDWATCH_LOGS")
SERVE_SERVICES = ("BEDROCK", "BEDROCK_RUNTIME", "SAGEMAKER")
# Settings that would send a client elsewhere or sign with other credentials: unset in the block.
CLEARED = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_MAX_ATTEMPTS",
           "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_REGION")
STOP_TIMEOUT_S = 10.0


def free_port(host: str = HOST) -> int:
    """A TCP port free on `host` right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def aws_variables(moto_url: str | None = None, bedrock_url: str | None = None,
                  credentials: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The AWS SDK's standard variables that point boto3 at the stand-ins (None: unset).

    With `credentials` (moto's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) the block is cut off from
    the user's own setup too: no profile, session token or ~/.aws files, region us-east-1.
    """
    values: dict[str, str | None] = {}
    if credentials is not None:
        values.update(dict.fromkeys(CLEARED))
        values.update(credentials)
        values.update(AWS_DEFAULT_REGION=REGION, AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    if moto_url:
        values.update({f"AWS_ENDPOINT_URL_{service}": moto_url for service in MOTO_SERVICES})
    if bedrock_url:
        values.update({f"AWS_ENDPOINT_URL_{service}": bedrock_url for service in SERVE_SERVICES})
    return values


@contextmanager
def environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) these environment variables for the block; restore each on exit."""
    before = {key: os.environ.get(key) for key in values}
    try:
        _apply(values)
        yield
    finally:
        _apply(before)


def _apply(values: Mapping[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    # boto3's default session (boto3.client(...)) keeps the credentials it first read from the
    # environment: drop it, so the next boto3.client() reads the variables as they are now.
    if "boto3" in sys.modules:
        sys.modules["boto3"].DEFAULT_SESSION = None


@dataclass
class LocalAWS:
    """The running stand-ins: where they listen, the credentials moto issued, their logs."""

    moto_url: str
    bedrock_url: str
    credentials: dict[str, str]
    logs: Path
    """moto.log and serve.log; removed on a clean exit, kept when the block failed."""
    pids: list[int] = field(default_factory=list)

    @property
    def variables(self) -> dict[str, str | None]:
        return aws_variables(self.moto_url, self.bedrock_url, self.credentials)


@contextmanager
def local_aws(bucket: str | None = None, cold_start_seconds: float = 0.0, import_delay_seconds: float = 1.0,
              startup_timeout_s: float = 120.0, run_training_jobs: bool = False, training_time_scale: float = 1.0,
              spot_interrupt_after_seconds: float = 0.0) -> Iterator[LocalAWS]:
    """Start moto's server and termtune serve, point the AWS SDK at them for the block, then stop both.

    `bucket` is created in the local S3 first. `cold_start_seconds` makes the local Bedrock answer
    ModelNotReadyException for that long after each import, as a real cold start does;
    `import_delay_seconds` is how long an import job stays InProgress. `run_training_jobs` lets serve
    run SageMaker training jobs as processes here (termtune serve --run-training-jobs);
    `training_time_scale` and `spot_interrupt_after_seconds` are its --training-time-scale and
    --spot-interrupt-after.

    Raises:
        UserError: a stand-in exited or did not answer within `startup_timeout_s` (naming its log).
    """
    logs = Path(tempfile.mkdtemp(prefix="termtune-local-"))
    processes: list[subprocess.Popen] = []
    clean = False
    try:
        # moto first: it issues the access key everything else signs with, termtune serve included
        # (serve assumes the import role through moto's STS and reads the artifact from moto's S3).
        moto_port, keys_file = free_port(), logs / "moto.env"
        processes.append(_spawn([sys.executable, "-m", "termtune.rehearsal", "--host", HOST, "--port",
                                 str(moto_port), "--env-file", str(keys_file)], logs / "moto.log",
                                aws_variables(credentials={})))  # no user profile or ~/.aws file in its way
        credentials = _wait_for_keys(processes[0], keys_file, logs / "moto.log", startup_timeout_s)
        moto_url = f"http://{HOST}:{moto_port}"
        serve_port = free_port()
        processes.append(_spawn([sys.executable, "-m", "termtune.cli", "serve", "--host", HOST,
                                 "--port", str(serve_port), "--cold-start", str(cold_start_seconds),
                                 "--import-delay", str(import_delay_seconds),
                                 "--training-time-scale", str(training_time_scale),
                                 "--spot-interrupt-after", str(spot_interrupt_after_seconds),
                                 *(["--run-training-jobs"] if run_training_jobs else [])],
                                logs / "serve.log", aws_variables(moto_url, None, credentials)))
        _wait_for_port(processes[1], serve_port, logs / "serve.log", startup_timeout_s)
        stand_ins = LocalAWS(moto_url, f"http://{HOST}:{serve_port}", credentials, logs, [p.pid for p in processes])
        with environment(stand_ins.variables):
            if bucket:
                import boto3

                boto3.Session(region_name=REGION).client("s3").create_bucket(Bucket=bucket)
            yield stand_ins
        clean = True
    finally:
        _stop(processes)
        if clean:
            shutil.rmtree(logs, ignore_errors=True)


def _spawn(command: list[str], log: Path, variables: Mapping[str, str | None]) -> subprocess.Popen:
    """Start `command` with this environment changed by `variables` (None: unset), output to `log`."""
    env = {k: v for k, v in {**os.environ, **variables}.items() if v is not None}
    # A session of its own: Ctrl-C at a terminal reaches this process, which then stops the
    # stand-ins in order, rather than killing them mid-request.
    with log.open("wb") as out:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def _wait_for_keys(process: subprocess.Popen, keys_file: Path, log: Path, timeout_s: float) -> dict[str, str]:
    """The administrator's access key that termtune.rehearsal writes once moto is listening."""
    deadline = time.monotonic() + timeout_s
    while True:
        if keys_file.is_file():
            pairs = [line.removeprefix("export ").partition("=") for line in keys_file.read_text().splitlines()]
            keys = {k: v for k, _, v in pairs if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") and v}
            if len(keys) == 2:
                return keys
        _check_alive(process, "moto's server", log, deadline)
        time.sleep(0.1)


def _wait_for_port(process: subprocess.Popen, port: int, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            _check_alive(process, "termtune serve", log, deadline)
            time.sleep(0.1)


def _check_alive(process: subprocess.Popen, name: str, log: Path, deadline: float) -> None:
    if process.poll() is not None:
        raise UserError(f"{name} exited with status {process.returncode} while starting; see {log}")
    if time.monotonic() > deadline:
        raise UserError(f"{name} did not start in time; see {log}")


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM (both shut down cleanly on it), then SIGKILL what is still there; the last started first."""
    for process in reversed(processes):
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m termtune.local",
        description="Run a command with local stand-ins for AWS (moto: S3/IAM/STS/KMS/Logs; termtune serve: "
                    "Bedrock and SageMaker training jobs); "
                    "both stop when it ends.")
    parser.add_argument("--bucket", help="create this bucket in the local S3 first")
    parser.add_argument("--cold-start", type=float, default=0.0, metavar="SECONDS",
                        help="the local Bedrock answers ModelNotReadyException this long after each import")
    parser.add_argument("--run-training-jobs", action="store_true",
                        help="the local SageMaker runs training jobs as processes on this machine")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    for sig in (signal.SIGTERM, signal.SIGHUP):  # `kill` or a closed terminal: stop the stand-ins on the way out
        signal.signal(sig, lambda number, _: sys.exit(128 + number))
    try:
        with local_aws(args.bucket, cold_start_seconds=args.cold_start,
                       run_training_jobs=args.run_training_jobs) as aws:
            emit("note", f"local AWS: S3/IAM/STS/KMS/Logs (moto, IAM enforced) on {aws.moto_url}, Bedrock and "
                         f"SageMaker (termtune serve) on {aws.bedrock_url}; running {shlex.join(command)}")
            status = subprocess.run(command).returncode
            if status != 0:  # a failed command keeps the stand-ins' logs for a look
                emit("note", f"local AWS: {command[0]} exited with status {status}; logs kept in {aws.logs}")
                raise SystemExit(status)
    except UserError as e:
        emit("note", f"termtune.local: error: {e}")
        return 2
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
