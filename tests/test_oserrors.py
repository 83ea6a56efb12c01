"""OS failures: one line that names the path and the cause, found before a stage works, nothing half-written.

Real failures where a test can make them: a file where a folder is expected, a name too long, a
read-only folder (chmod; root, as in CI, runs termtune without its powers to override it), and a read-only or full file system (a tmpfs mounted in a
private user + mount namespace, when the kernel allows one). The full disk is also simulated
in-process, always: `open()` of the weight file returns a file whose write fails with ENOSPC, as
the kernel's write(2) does.
"""

from __future__ import annotations

import errno
import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, medquad_rows, tiny_overrides, write_jsonl

TERMTUNE = [sys.executable, "-m", "termtune.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def termtune(*args: str, prefix: list[str] | tuple[()] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *TERMTUNE, *args], cwd=REPO, capture_output=True, text=True, env=ENV,
                          timeout=300)


def error_line(out: subprocess.CompletedProcess) -> str:
    """The one `termtune: error:` line (libraries may print warnings before it); no traceback."""
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("termtune: error: "), out.stderr
    return last


def _private_mounts() -> bool:
    try:
        probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                                "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


needs_private_mounts = pytest.mark.skipif(not _private_mounts(), reason="no unprivileged user+mount namespaces here")


def in_tmpfs(mountpoint: Path, options: str, *args: str) -> subprocess.CompletedProcess:
    """Run termtune with a fresh tmpfs (`options`, e.g. size=1m or ro) mounted on `mountpoint`, which only
    this process sees; stdout ends with the tmpfs listing after the command, so a test can see leftovers."""
    script = ('mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; mnt="$2"; shift 2; "$@"; code=$?; '
              'echo "@@listing"; ls -A "$mnt"; exit $code')
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", options,
                           str(mountpoint), *TERMTUNE, *args], cwd=REPO, capture_output=True, text=True, env=ENV,
                          timeout=300)


def listing(out: subprocess.CompletedProcess) -> list[str]:
    return out.stdout.split("@@listing\n", 1)[1].split()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "terms.jsonl", medquad_rows(24))


# ----------------------------------------------------------------------------- before any work


def _file_in_the_way(tmp: Path) -> tuple[Path, Path]:
    (tmp / "notes").write_text("a file")
    return tmp / "notes", tmp / "notes"


def _under_a_file(tmp: Path) -> tuple[Path, Path]:
    (tmp / "notes").write_text("a file")
    return tmp / "notes" / "run", tmp / "notes" / "run"


def _name_too_long(tmp: Path) -> tuple[Path, Path]:
    return tmp / ("x" * 300) / "run", tmp / ("x" * 300)  # the OS may name a path below it


@pytest.mark.parametrize("make,cause", [
    (_file_in_the_way, "File exists (a file is where a folder is expected"),
    (_under_a_file, "Not a directory (a file is where a folder is expected"),
    (_name_too_long, "File name too long (a name is too long (at most 255 bytes per name)"),
], ids=["file-in-the-way", "under-a-file", "name-too-long"])
def test_unusable_run_dir_is_one_line_naming_path_and_cause(tmp_path, source, make, cause):
    run_dir, named = make(tmp_path)
    line = error_line(termtune("data", "prepare", *tiny_overrides(run_dir, source)))
    assert line.startswith(f"termtune: error: {named}") and f": {cause}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["terms.jsonl", *(["notes"] * (make != _name_too_long))])


def without_root_powers(workdir: Path) -> list[str]:
    """A command prefix that runs a command without root's power to write where permissions say no: nothing for
    a user; for root (as in CI) a user namespace, where root still reads its own files (the interpreter may live
    under /root) but holds no capability over the host's; else the user nobody, for whom `workdir` and the
    folders above it are opened (o+x). Fails the test when neither is possible: a skip would hide the case."""
    if os.geteuid() != 0:
        return []
    probe = workdir / "probe"
    probe.mkdir(mode=0o555)
    for prefix in (["unshare", "--user"], ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]):
        if prefix[0] == "setpriv":
            for folder in [workdir, *workdir.parents]:
                if folder == Path(tempfile.gettempdir()):
                    break
                folder.chmod(folder.stat().st_mode | 0o001)
        out = subprocess.run([*prefix, sys.executable, "-c", "import os, sys, termtune; os.mkdir(sys.argv[1])",
                              str(probe / "x")], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=60)
        if out.returncode != 0 and "PermissionError" in out.stderr:  # it ran, and the permissions held
            return prefix
    pytest.fail("root cannot run termtune without its powers here (no user namespace, and the user nobody "
                "cannot run the interpreter or read the checkout)")


def test_read_only_run_dir_fails_before_any_work(tmp_path, source):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o555)
    try:
        line = error_line(termtune("data", "prepare", *tiny_overrides(run_dir, source),
                                   prefix=without_root_powers(tmp_path)))
    finally:
        run_dir.chmod(0o755)
    assert line.startswith(f"termtune: error: {run_dir}") and "Permission denied (no permission to write" in line
    assert list(run_dir.iterdir()) == []


@needs_private_mounts
def test_read_only_file_system_fails_before_any_work(tmp_path, source):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = in_tmpfs(mnt, "ro", "data", "prepare", *tiny_overrides(mnt, source))
    assert error_line(out) == (f"termtune: error: {mnt}: Read-only file system "
                               "(the file system is read-only; choose a writable folder)")


@needs_private_mounts
def test_full_disk_is_found_by_the_probe_before_any_work(tmp_path, source):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = in_tmpfs(mnt, "size=16k", "data", "prepare", *tiny_overrides(mnt / "run", source))
    line = error_line(out)
    assert line.startswith(f"termtune: error: {mnt / 'run'}: No space left on device (no space left on the device; ")
    assert listing(out) == ["run"]  # the folder it made for the probe, and nothing in it


# ----------------------------------------------------------------------------- mid-stage: nothing half-written


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from test_export import make_trained_run

    return make_trained_run(tmp_path_factory.mktemp("oserrors") / "run")


@needs_private_mounts
def test_disk_filling_up_mid_export_is_one_line_and_leaves_nothing(trained, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # 1 MiB passes the probe; the fp32 weights of the tiny model are ~17 MB.
    out = in_tmpfs(mnt, "size=1m", "export", *tiny_overrides(trained.run_dir, trained.data.source),
                   f"export.dir={mnt / 'artifact'}")
    line = error_line(out)
    assert line.startswith(f"termtune: error: {mnt / 'artifact'}: No space left on device (no space left on the "
                           "device; free space or choose a folder on another disk; "), line
    assert listing(out) == []


def test_disk_full_mid_export_simulated_at_the_write_call(trained, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from termtune.cli import app

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write(2) on a full disk gives

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real_open = open

    def open_full(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if str(path).endswith(".safetensors") and "w" in mode else f

    # the stage module (termtune.export is the API function)
    monkeypatch.setattr(importlib.import_module("termtune.export"), "open", open_full, raising=False)
    artifact = tmp_path / "artifact"
    result = CliRunner().invoke(app, ["export", *tiny_overrides(trained.run_dir, trained.data.source),
                                      f"export.dir={artifact}"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith(
        f"termtune: error: {artifact}: No space left on device (no space left on the device; ")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- saving a model on a full disk


@needs_private_mounts
def test_disk_full_while_saving_the_random_init_base_is_one_line(tmp_path, source):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # 1 MiB holds the prepared data; the tiny base model's fp32 weights are ~17 MB (safetensors raises its own error)
    out = in_tmpfs(mnt, "size=1m", "run", *tiny_overrides(mnt, source), "aws.deploy=false")
    line = error_line(out)
    assert line.startswith(f"termtune: error: {mnt / 'base-model'}: No space left on device (no space left "
                           "on the device; free space or choose a folder on another disk; "), line
    assert not [name for name in listing(out) if "base-model" in name]  # no partial folder is left


@pytest.fixture
def prepared_args(tmp_path, source):
    from typer.testing import CliRunner

    from termtune.cli import app

    args = tiny_overrides(tmp_path / "run", source)
    assert CliRunner().invoke(app, ["data", "prepare", *args]).exit_code == 0
    return args


def _full_disk_line(args: list[str]) -> str:
    from typer.testing import CliRunner

    from termtune.cli import app

    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 2, result.output
    return result.output.strip().splitlines()[-1]


def test_disk_full_while_saving_the_base_model_names_it(tmp_path, prepared_args, monkeypatch):
    from safetensors import SafetensorError
    from transformers import T5ForConditionalGeneration

    def full(self, *args, **kwargs):  # what safetensors raises when write(2) fails with ENOSPC
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(T5ForConditionalGeneration, "save_pretrained", full)
    assert _full_disk_line(prepared_args).startswith(
        f"termtune: error: {tmp_path / 'run' / 'base-model'}: No space left on device (no space left on the device; ")


def test_disk_full_while_saving_a_checkpoint_names_it(tmp_path, prepared_args, monkeypatch):
    from transformers import Trainer

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Trainer, "_save_checkpoint", full)
    assert _full_disk_line(prepared_args).startswith(
        f"termtune: error: {tmp_path / 'run' / 'train' / 'checkpoints'}: No space left on device (no space left on ")
    assert not (tmp_path / "run" / "provenance" / "train.json").exists()
