"""No remote or recorded name becomes a path outside its folder: S3 keys that termtune serve's import job
downloads, the S3 URI it reads under local_root, manifest entries deploy uploads, aws.prefix."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from aws_fixtures import (ACCOUNT, EXISTING_ROLE, artifact_template, aws_env, boto, bucket, moto_server,  # noqa: F401
                          moto_url, wait)
from termtune.errors import UserError
from termtune.safepath import UnsafeName, inside

HOSTILE = {
    "absolute": "/tmp/x/owned.txt",
    "empty segment": "a//b",
    "dot dot": "../owned.txt",
    "dot dot inside": "a/../../owned.txt",
    "dot": "./a",
    "encoded dot dot": "%2e%2e/owned.txt",
    "encoded dot dot, upper case": "a/%2E%2E/%2e%2E/owned.txt",
    "backslash": "..\\owned.txt",
    "backslash segment": "a\\b",
    "NUL": "a\x00b",
    "empty": "",
    "long segment": "a" * 256,
    "long key": "/".join(["a" * 200] * 6),
}


@pytest.mark.parametrize("name", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_names_are_refused_and_nothing_is_created(tmp_path, name):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(UnsafeName):
        inside(root, name)
    assert sorted(tmp_path.rglob("*")) == [root]


def test_plain_names_resolve_inside_and_symlinks_out_are_refused(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    assert inside(root, "sub/model.safetensors") == (root / "sub" / "model.safetensors").resolve()
    assert inside(root, "a..b/.hidden") == (root / "a..b" / ".hidden").resolve()  # dots inside a name are fine
    os.symlink(tmp_path, root / "out")
    with pytest.raises(UnsafeName, match="outside"):
        inside(root, "out/owned.txt")


# ----------------------------------------------------------------------------- termtune serve


def test_serve_import_never_writes_outside_its_work_folder(tmp_path, aws_env, bucket, artifact_template):  # noqa: F811
    """The reported attack: an object `<prefix>/` + `/abs/path` under the import prefix (after the prefix,
    the key is an absolute path). The job fails, naming the key, and nothing is written outside."""
    server = aws_env()
    s3 = boto("s3")
    target = tmp_path / "x" / "owned.txt"
    for f in sorted(artifact_template.iterdir()):
        s3.upload_file(str(f), bucket, f"termtune/evil/{f.name}")
    s3.put_object(Bucket=bucket, Key=f"termtune/evil/{target}", Body=b"owned")  # termtune/evil//tmp/.../owned.txt
    assert any(o["Key"].startswith("termtune/evil//") for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    br = boto("bedrock")
    arn = br.create_model_import_job(
        jobName="evil", importedModelName="evil", roleArn=f"arn:aws:iam::{ACCOUNT}:role/{EXISTING_ROLE}",
        modelDataSource={"s3DataSource": {"s3Uri": f"s3://{bucket}/termtune/evil/"}})["jobArn"]
    job = wait(br, arn)
    assert job["status"] == "Failed"
    assert "is an absolute path" in job["failureMessage"] and str(target) in job["failureMessage"]
    assert not target.parent.exists()
    assert not list(server.state.workdir.iterdir())  # the failed job's folder is gone too


def test_serve_local_root_never_reads_outside_it(tmp_path, artifact_template):  # noqa: F811
    """s3://bucket/../outside/ passes botocore's S3Uri pattern; under local_root it must not mean a folder
    beside the root."""
    import boto3
    from botocore.config import Config

    from termtune.serve import start_server

    shutil.copytree(artifact_template, tmp_path / "outside" / "model")  # a valid model, but not under the root
    (tmp_path / "root" / "bucket-a").mkdir(parents=True)
    server, url = start_server(local_root=tmp_path / "root", import_delay_seconds=0.0)
    try:
        br = boto3.client("bedrock", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="y", config=Config(retries={"total_max_attempts": 1}))
        arn = br.create_model_import_job(
            jobName="up", importedModelName="up", roleArn=f"arn:aws:iam::{ACCOUNT}:role/{EXISTING_ROLE}",
            modelDataSource={"s3DataSource": {"s3Uri": "s3://bucket-a/../../outside/model/"}})["jobArn"]
        job = wait(br, arn)
        assert job["status"] == "Failed" and "'..' segment" in job["failureMessage"], job
    finally:
        server.stop()


# ----------------------------------------------------------------------------- deploy


def test_manifest_entries_cannot_name_files_outside_the_artifact(tmp_path, artifact_template):  # noqa: F811
    from termtune.aws import s3

    secret = tmp_path / "secret.txt"
    secret.write_text("not for S3")
    folder = shutil.copytree(artifact_template, tmp_path / "artifact")
    manifest = json.loads((folder / "manifest.json").read_text())
    for hostile in ("../secret.txt", str(secret), "sub//x"):
        bad = {**manifest, "files": manifest["files"] + [{"path": hostile, "size": 10, "sha256": "0" * 64}]}
        (folder / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(UserError, match="re-run termtune export"):
            s3.artifact_files(folder)
    (folder / "manifest.json").unlink()  # without a manifest every file is sent: a symlink out is refused
    os.symlink(secret, folder / "linked.txt")
    with pytest.raises(UserError, match="outside"):
        s3.artifact_files(folder)
    (folder / "linked.txt").unlink()
    (folder / "manifest.json").write_text(json.dumps({**manifest, "files": [{"path": 3}]}))
    with pytest.raises(UserError, match="not a termtune manifest"):
        s3.artifact_files(folder)


@pytest.mark.parametrize("prefix", ["a//{run_name}", "a/../{run_name}", "/", "x/./{run_name}"])
def test_prefixes_with_empty_or_dot_segments_are_refused(tmp_path, prefix):
    from termtune.aws.stage import names
    from termtune.config import load_config

    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", "aws.bucket=b-1", f"aws.prefix={prefix}"])
    with pytest.raises(UserError, match="aws.prefix"):
        names(cfg, "0123456789ab")


def test_checkpoint_seals_naming_files_outside_are_not_complete(tmp_path):
    from termtune.train import SEAL_FILE, checkpoint_is_complete

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    needed = ["trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors", "rng_state.pth"]
    for name in needed:
        (folder / name).write_text("x")
    (tmp_path / "elsewhere").write_text("x")
    files = {name: 1 for name in needed}
    (folder / SEAL_FILE).write_text(json.dumps({"files": files}))
    assert checkpoint_is_complete(folder)
    (folder / SEAL_FILE).write_text(json.dumps({"files": {**files, "../elsewhere": 1}}))
    assert not checkpoint_is_complete(folder)
