"""What a SageMaker training job is given (the bundle) and what it runs (entry.sh, termtune.remote.entry).

The jobs here run the real bootstrap from a built bundle, in a temporary folder laid out like /opt/ml
(TERMTUNE_OPT_ML), with the tiny T5 and the test machine's Python on PATH.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from conftest import TOKENIZER_DIR, medquad_rows, tiny_overrides, write_jsonl
from termtune import pipeline
from termtune.config import load_config
from termtune.errors import UserError
from termtune.local import free_port
from termtune.remote import bundle
from termtune.remote.entry import torchrun_arguments
from termtune.rundir import sha256_file
from termtune.train import SEAL_FILE, last_complete_checkpoint
from termtune.validate import validate

EPOCHS = {"train.epochs": 2}  # 56 training rows in batches of 8: 7 steps per epoch, checkpoints every 5


def _prepared(base: Path, run: str = "run", extra: dict | None = None):
    data = base / "terms.jsonl"
    if not data.exists():
        write_jsonl(data, medquad_rows(64))
    cfg = load_config(None, tiny_overrides(base / run, data) + [f"{k}={v}" for k, v in (extra or {}).items()])
    pipeline.run_stage(cfg, "data")
    return cfg


def _job_root(channels: dict[str, Path], root: Path, host: str = "algo-1", hosts: tuple[str, ...] = ("algo-1",),
              checkpoints: Path | None = None) -> Path:
    """A job root as SageMaker lays out /opt/ml: the channels, resourceconfig.json, the restored checkpoints."""
    for name, folder in channels.items():
        shutil.copytree(folder, root / "input" / "data" / name)
    config = root / "input" / "config"
    config.mkdir(parents=True)
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": host, "hosts": list(hosts), "network_interface_name": "eth0"}))
    (config / "inputdataconfig.json").write_text(json.dumps({name: {"TrainingInputMode": "File"} for name in channels}))
    (config / "hyperparameters.json").write_text("{}")
    if checkpoints is not None:
        shutil.copytree(checkpoints, root / "checkpoints", symlinks=True)
    return root


def _job_env(root: Path, **extra: str) -> dict[str, str]:
    """The job's environment: this machine's Python first on PATH, no termtune checkout on the import path
    (the job must run the wheel), no package index (like a job without internet)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "TERMTUNE_OPT_ML": str(root),
            "PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _start(root: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(root / "input/data/code/entry.sh")], env=_job_env(root, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(root: Path, **env: str) -> tuple[int, str]:
    proc = _start(root, **env)
    out, _ = proc.communicate(timeout=400)
    return proc.returncode, out


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    """One job run to the end, from a bundle of a tiny two-epoch run."""
    base = tmp_path_factory.mktemp("job")
    cfg = _prepared(base, extra=EPOCHS)
    channels = bundle.build(cfg, base / "bundle")
    root = _job_root(channels, base / "opt_ml")
    returncode, out = _run(root)
    assert returncode == 0, out[-3000:]
    return base, cfg, channels, root, out


# ----------------------------------------------------------------------------- the bundle


def test_bundle_holds_the_channels_and_rebuilds_to_the_same_bytes(tmp_path):
    cfg = _prepared(tmp_path)
    first = bundle.build(cfg, tmp_path / "one")
    second = bundle.build(cfg, tmp_path / "two")

    assert set(first) == {"code", "config", "data", "model"}  # the tiny model's tokenizer and shape are local files
    files = {name: sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
             for name, folder in first.items()}
    assert files["code"] == ["entry.sh", "requirements.txt", "termtune-0.1.0-py3-none-any.whl"]
    assert files["config"] == ["termtune.yaml"]
    assert files["data"] == sorted(p.name for p in (cfg.run_dir / "data").iterdir())
    assert "source/tokenizer.json" in files["model"] and "architecture/config.json" in files["model"]
    # Unchanged inputs, identical bytes: an uploader skips every file.
    for name, folder in first.items():
        for rel in files[name]:
            assert (folder / rel).read_bytes() == (second[name] / rel).read_bytes(), f"{name}/{rel}"
    assert (tmp_path / "one" / bundle.MANIFEST).read_bytes() == (tmp_path / "two" / bundle.MANIFEST).read_bytes()
    manifest = json.loads((tmp_path / "one" / bundle.MANIFEST).read_text())
    listed = {name: {f["path"]: f["sha256"] for f in entries} for name, entries in manifest["channels"].items()}
    assert listed == {name: {rel: sha256_file(first[name] / rel) for rel in rels} for name, rels in files.items()}

    # A changed input changes exactly its channel.
    cfg.train.learning_rate = 0.001
    third = bundle.build(cfg, tmp_path / "one")
    changed = json.loads((tmp_path / "one" / bundle.MANIFEST).read_text())["channels"]
    assert [n for n in changed if changed[n] != manifest["channels"][n]] == ["config"]
    assert third == first


def test_bundle_config_points_into_the_channels_and_requirements_pin_the_local_versions(tmp_path):
    cfg = _prepared(tmp_path)
    channels = bundle.build(cfg, tmp_path / "bundle")
    job = yaml.safe_load((channels["config"] / "termtune.yaml").read_text())
    assert job["run"]["dir"] == "termtune/run"
    assert job["data"]["source"] == "input/data/data"
    assert job["model"]["source"] == "input/data/model/source"
    assert job["model"]["architecture"] == "input/data/model/architecture/config.json"
    assert job["export"]["dir"] == "model/artifact"
    original = cfg.model_dump(mode="json")
    assert {k: v for k, v in job["train"].items() if k != "on"} == \
        {k: v for k, v in original["train"].items() if k != "on"}
    assert job["lora"] == original["lora"] and job["run"]["seed"] == original["run"]["seed"]

    pins = [line for line in (channels["code"] / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    names = {line.split("==")[0] for line in pins}
    assert "torch" not in names and {"transformers", "peft", "accelerate", "datasets"} <= names
    for line in pins:
        name, version = line.split(";")[0].split("==")
        assert metadata.version(name) == version

    # A Hub model is downloaded by the job: no model channel, the id unchanged.
    hub = load_config(None, [f"run.dir={cfg.run_dir}", "model.source=google/flan-t5-small"])
    text, local = bundle.job_config(hub)
    assert local == {} and yaml.safe_load(text)["model"]["source"] == "google/flan-t5-small"
    # ... while a local tokenizer beside it goes up in its own folder.
    hub.model.tokenizer = str(TOKENIZER_DIR)
    text, local = bundle.job_config(hub)
    assert local == {"tokenizer": TOKENIZER_DIR.resolve()}
    assert yaml.safe_load(text)["model"]["tokenizer"] == "input/data/model/tokenizer"


def test_bundle_refuses_a_run_without_prepared_data_and_a_folder_that_is_not_a_bundle(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path / "run", tmp_path / "terms.jsonl"))
    with pytest.raises(UserError, match=r"train.jsonl: no prepared data; run `termtune data prepare`"):
        bundle.build(cfg, tmp_path / "bundle")
    cfg = _prepared(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not a termtune bundle"):
        bundle.build(cfg, mine)
    assert (mine / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- hosts -> torchrun


@pytest.mark.parametrize(("hosts", "current", "gpus", "expected"), [
    (["algo-1"], "algo-1", 0, ["--nnodes=1", "--node_rank=0", "--nproc_per_node=1", "--master_addr=127.0.0.1"]),
    (["algo-1"], "algo-1", 4, ["--nnodes=1", "--node_rank=0", "--nproc_per_node=4", "--master_addr=127.0.0.1"]),
    (["algo-1", "algo-2"], "algo-2", 2, ["--nnodes=2", "--node_rank=1", "--nproc_per_node=2", "--master_addr=algo-1"]),
    (["algo-1", "algo-2"], "algo-1", 2, ["--nnodes=2", "--node_rank=0", "--nproc_per_node=2", "--master_addr=algo-1"]),
])
def test_resourceconfig_gives_torchrun_its_nodes_rank_processes_and_master(hosts, current, gpus, expected):
    resource = {"current_host": current, "hosts": hosts}
    assert torchrun_arguments(resource, gpus) == [*expected, "--master_port=29500"]


def test_rehearsal_addresses_and_port_replace_the_host_names():
    resource = {"current_host": "algo-2", "hosts": ["algo-1", "algo-2"]}
    assert torchrun_arguments(resource, 0, {"algo-1": "10.0.0.5", "algo-2": "10.0.0.6"}, 40123)[-2:] == \
        ["--master_addr=10.0.0.5", "--master_port=40123"]
    with pytest.raises(UserError, match="current_host 'algo-3' is not among hosts"):
        torchrun_arguments({"current_host": "algo-3", "hosts": ["algo-1"]}, 0)


# ----------------------------------------------------------------------------- jobs


def test_job_artifact_equals_a_local_train_and_export_and_passes_validate(finished_job, tmp_path):
    base, cfg, _, root, out = finished_job
    assert f"from {root / 'termtune' / 'site' / 'termtune'}" in out  # the job ran the bundle's wheel

    local = load_config(None, tiny_overrides(tmp_path / "local", base / "terms.jsonl")
                        + [f"{k}={v}" for k, v in EPOCHS.items()])
    for stage in ("data", "train", "export"):
        pipeline.run_stage(local, stage)

    job_artifact = root / "model" / "artifact"
    local_artifact = local.run_dir / "artifact"
    # Exactly the files Bedrock imports: termtune's manifest lies beside them, in model/termtune.
    assert sorted(p.name for p in job_artifact.iterdir()) == \
        sorted(p.name for p in local_artifact.iterdir() if p.name != "manifest.json")
    for path in job_artifact.iterdir():  # one process on a CPU, same seed: the same bytes
        assert path.read_bytes() == (local_artifact / path.name).read_bytes(), path.name
    assert not [c for c in validate(job_artifact) if c.failed]

    records = root / "model" / "termtune"
    manifest = json.loads((records / "manifest.json").read_text())
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == \
        {p.name: sha256_file(p) for p in job_artifact.iterdir()}
    metrics = json.loads((records / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 14 and metrics["train"]["world_size"] == 1
    assert metrics["export"]["validation_failed"] == 0
    assert [json.loads(line)["step"] for line in (records / "metrics.jsonl").read_text().splitlines()]
    assert "train: step 14/14" in (records / "train.log").read_text()
    assert not (root / "output" / "failure").exists()


def test_sigterm_checkpoints_and_a_restarted_job_ends_with_the_same_weights(finished_job, tmp_path):
    base, cfg, channels, done_root, _ = finished_job
    first = _job_root(channels, tmp_path / "attempt-1")
    sealed = first / "checkpoints" / "train" / "checkpoints"
    proc = _start(first, TERMTUNE_TEST_STEP_DELAY="0.5")
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and last_complete_checkpoint(sealed) is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before it could be stopped"
        time.sleep(0.2)  # inside step 6 or 7
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    stopped_at = last_complete_checkpoint(sealed)
    step = json.loads((stopped_at / SEAL_FILE).read_text())["step"]
    assert 5 < step < 14  # a checkpoint of the step the signal came in, not of a save_steps multiple
    failure = (first / "output" / "failure").read_text()
    assert "stopped (SIGTERM" in failure and stopped_at.name in failure
    assert not (first / "model" / "artifact").exists()

    # SageMaker restores the checkpoint folder into the restarted job.
    second = _job_root(channels, tmp_path / "attempt-2", checkpoints=first / "checkpoints")
    returncode, out = _run(second)
    assert returncode == 0, out[-3000:]
    metrics = json.loads((second / "model" / "termtune" / "metrics.json").read_text())
    assert metrics["train"]["resumed_from"].endswith(f"checkpoints/{stopped_at.name}")
    assert metrics["train"]["global_step"] == 14
    resumed = _adapter(second / "checkpoints" / "train" / "adapter")
    uninterrupted = _adapter(done_root / "checkpoints" / "train" / "adapter")
    assert max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in uninterrupted) <= 1e-5
    steps = [json.loads(line)["step"] for line in
             (second / "model" / "termtune" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 14  # the loss log went on across the restart


def test_two_hosts_rendezvous_and_train_together(finished_job, tmp_path):
    base, cfg, channels, _, _ = finished_job
    hosts = ("algo-1", "algo-2")
    roots = [_job_root(channels, tmp_path / host, host=host, hosts=hosts) for host in hosts]
    rehearsal = {"TERMTUNE_HOST_ADDRESSES": json.dumps({h: "127.0.0.1" for h in hosts}),
                 "TERMTUNE_MASTER_PORT": str(free_port())}
    procs = [_start(root, **rehearsal) for root in roots]
    outs = [proc.communicate(timeout=400)[0] for proc in procs]
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-3000:]

    metrics = json.loads((roots[0] / "model" / "termtune" / "metrics.json").read_text())
    assert metrics["train"]["world_size"] == 2
    batches = math.ceil(56 / 8)  # per epoch; the two hosts take turns
    assert metrics["train"]["global_step"] == 2 * math.ceil(batches / 2)
    assert not [c for c in validate(roots[0] / "model" / "artifact") if c.failed]
    assert not (roots[1] / "model" / "artifact").exists()  # only the first host exports


def test_a_job_without_its_data_or_with_a_bad_config_fails_with_the_reason(finished_job, tmp_path):
    _, _, channels, _, _ = finished_job
    no_data = _job_root({k: v for k, v in channels.items() if k != "data"}, tmp_path / "no-data")
    returncode, out = _run(no_data)
    assert returncode != 0
    failure = (no_data / "output" / "failure").read_text()
    assert "input/data/data/train.jsonl: missing: the job has no prepared-data channel" in failure

    bad = _job_root(channels, tmp_path / "bad-config")
    config = bad / "input" / "data" / "config" / "termtune.yaml"
    config.write_text(config.read_text().replace("learning_rate:", "learning_rat:"))
    returncode, out = _run(bad)
    assert returncode != 0
    assert "unknown key train.learning_rat (did you mean train.learning_rate?)" in \
        (bad / "output" / "failure").read_text()

    unmet = _job_root(channels, tmp_path / "unmet")
    with (unmet / "input" / "data" / "code" / "requirements.txt").open("a") as f:
        f.write("termtune-no-such-package==1.0\n")
    returncode, out = _run(unmet)  # PIP_NO_INDEX: as in a job without internet access
    assert returncode != 0
    assert "pip could not install termtune's requirements" in (unmet / "output" / "failure").read_text()

    no_code = _job_root(channels, tmp_path / "no-wheel")
    next((no_code / "input" / "data" / "code").glob("*.whl")).unlink()
    returncode, out = _run(no_code)
    assert returncode != 0
    assert "no termtune wheel in" in (no_code / "output" / "failure").read_text()
