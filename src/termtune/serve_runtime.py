"""Where termtune serve runs imported models: under Bedrock's transformers, or in its own process.

Bedrock serves imported models with transformers 4.51.3, so serve runs each imported model the
same way: a long-lived worker process per model (termtune/_bedrock_worker.py, JSON lines over
stdin/stdout) under the interpreter named by TERMTUNE_BEDROCK_PYTHON, or else .venv-bedrock/bin/python
in the current folder or beside the virtual environment serve runs in (what `make install` creates). A served answer then is what that transformers computes from the
imported files. The worker starts on a model's first invoke, stops when the model is deleted or
serve stops, and a worker that crashed is started again on the next call.

Without such an interpreter, serve falls back to running the model in its own process with the
transformers termtune uses, and says so: in its startup line and in every response's
x-termtune-runtime header.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from termtune import _bedrock_worker
from termtune.errors import UserError

BEDROCK_TRANSFORMERS = "4.51.3"  # "Amazon Bedrock supports transformer version 4.51.3"
BEDROCK_VENV_PYTHON = Path(".venv-bedrock") / "bin" / "python"
# The same beside serve's own virtual environment: a notebook's kernel starts in notebooks/, not the root.
BESIDE_OUR_VENV = Path(sys.prefix).parent / BEDROCK_VENV_PYTHON
WORKER = Path(_bedrock_worker.__file__)
LOAD_SECONDS = 600.0  # a worker must load its model within this
STOP_SECONDS = 5.0
MODES = ("auto", "worker", "in-process")


class ModelFailure(Exception):
    """The model could not answer (it did not load, its worker crashed): ModelErrorException."""


class ModelTimeout(Exception):
    """The model did not answer in time (its worker was stopped): ModelTimeoutException."""


@dataclass
class Runtime:
    """How this serve runs models: `python` is the worker interpreter, None for in-process."""

    python: str | None
    label: str  # for the startup line and the x-termtune-runtime header

    def runner(self, folder: Path, log: Path) -> "WorkerRunner | InProcessRunner":
        return WorkerRunner(self.python, folder, log) if self.python else InProcessRunner(folder)


def choose(mode: str = "auto") -> Runtime:
    """`auto`: a worker when the Bedrock interpreter exists, else in-process; `worker` insists on it."""
    if mode not in MODES:
        raise UserError(f"serve: runtime {mode!r} is not one of {', '.join(MODES)}")
    named = os.environ.get("TERMTUNE_BEDROCK_PYTHON")
    python = Path(named) if named else next((p for p in (BEDROCK_VENV_PYTHON, BESIDE_OUR_VENV) if p.is_file()),
                                            BEDROCK_VENV_PYTHON)
    why = None
    if mode == "in-process":
        why = "as asked"
    elif named and not python.is_file():  # the user named an interpreter that is not there: never a silent fallback
        raise UserError(f"serve: TERMTUNE_BEDROCK_PYTHON={named}: no such file")
    elif not python.is_file():
        why = (f"no Bedrock interpreter at {python} or {BESIDE_OUR_VENV}: set TERMTUNE_BEDROCK_PYTHON or run "
               "make install")
        if mode == "worker":
            raise UserError(f"serve: {why}")
    if why is None:
        python = python.absolute()  # not resolve(): a virtual environment's python is a symlink out of it
        version = _transformers_in(str(python))
        other = "" if version == BEDROCK_TRANSFORMERS else f"; Bedrock runs {BEDROCK_TRANSFORMERS}"
        return Runtime(str(python), f"transformers {version} in a worker process per model, {python}{other}")
    version = metadata.version("transformers")
    return Runtime(None, f"transformers {version} in serve's own process, {why}; answers may differ "
                                  f"from Bedrock's {BEDROCK_TRANSFORMERS}")


def _transformers_in(python: str) -> str:
    try:
        done = subprocess.run([python, "-I", "-c", "import importlib.metadata as m; print(m.version('transformers'))"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"serve: cannot run the Bedrock interpreter {python}: {e}") from e
    if done.returncode != 0:
        raise UserError(f"serve: the Bedrock interpreter {python} has no transformers: "
                        f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return done.stdout.strip()


class InProcessRunner:
    """The fallback: the model loaded in serve's own process, on first use."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.loaded: tuple[Any, Any] | None = None

    def generate(self, request: dict, seconds: float) -> dict:
        if self.loaded is None:
            try:
                self.loaded = _bedrock_worker.load(str(self.folder))
            except Exception as e:
                raise ModelFailure(f"the model could not be loaded: {type(e).__name__}: {e}") from e
        try:
            return _bedrock_worker.generate(*self.loaded, request)
        except Exception as e:
            raise ModelFailure(f"{type(e).__name__}: {e}") from e

    def stop(self) -> None:
        self.loaded = None


class WorkerRunner:
    """One model in a worker process of its own, started on first use and again after a crash."""

    def __init__(self, python: str, folder: Path, log: Path):
        self.python, self.folder, self.log = python, folder, log
        self.process: subprocess.Popen | None = None
        self.buffer = b""
        self.guard = threading.Lock()  # start/stop against a concurrent stop (model deleted, serve stopping)

    def generate(self, request: dict, seconds: float) -> dict:
        with self.guard:
            if self.process is None or self.process.poll() is not None:
                self._start()
            process = self.process
        try:
            process.stdin.write((json.dumps(request) + "\n").encode())
            process.stdin.flush()
        except OSError:
            pass  # it died; reading says how
        answer = self._read(process, seconds, "answer")
        if "error" in answer:
            raise ModelFailure(answer["error"])
        return answer

    def _start(self) -> None:
        self._kill()
        with self.log.open("ab") as log:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            self.process = subprocess.Popen([self.python, "-I", str(WORKER), str(self.folder)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                                            start_new_session=True)  # Ctrl-C reaches serve, which stops it
        self.buffer = b""
        ready = self._read(self.process, LOAD_SECONDS, "load the model")
        if not ready.get("ready"):
            self._kill()
            raise ModelFailure(f"the model could not be loaded: {ready.get('error')}")

    def _read(self, process: subprocess.Popen, seconds: float, what: str) -> dict:
        """The worker's next line, within `seconds`; a worker that exits or overruns is stopped."""
        deadline = time.monotonic() + seconds
        fd = process.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill()
                raise ModelTimeout(f"the model did not {what} within {seconds:g} s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    status = process.wait()
                    self._kill()
                    raise ModelFailure(f"the model's worker process exited (status {status}): {self._last_line()}")
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def _last_line(self) -> str:
        try:
            lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            lines = []
        return lines[-1][:500] if lines else "no message"

    def stop(self) -> None:
        with self.guard:
            self._kill(gently=True)

    def _kill(self, gently: bool = False) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None and gently:
            try:
                process.stdin.close()  # it ends on end of input, once its generation is done
                process.wait(timeout=STOP_SECONDS)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdin, process.stdout):
            try:
                pipe.close()
            except OSError:
                pass
