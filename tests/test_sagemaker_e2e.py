"""termtune train --on sagemaker end to end, offline: real boto3 against moto (S3, IAM, STS, KMS, CloudWatch Logs;
IAM enforced) and termtune serve (Bedrock, and its SageMaker training-job stand-in, which runs the job's own
bootstrap from the uploaded bundle as the job's role).

A job trains the tiny model and exports it; its artifact passes validate and equals a local train + export of
the same config and seed byte for byte (one CPU process, same seed: termtune.remote's tests show the same);
deploy imports it from the job's output and invoke answers as the locally trained model does; a role that
cannot write the output fails the job with access denied; stop leaves no process; unchanged settings submit
nothing.
"""

from __future__ import annotations

import os
import time

import pytest

import aws_fixtures

if not hasattr(aws_fixtures, "sagemaker_env"):
    pytest.skip("needs termtune serve's SageMaker training-job stand-in (tests/aws_fixtures.py: sagemaker_env)",
                allow_module_level=True)
pytest.importorskip("termtune.remote.bundle", reason="needs the job's bundle and bootstrap (termtune.remote)")

from aws_fixtures import (BUCKET, artifact_template, aws_env, boto, bucket, moto_server, moto_url,  # noqa: E402,F401
                          sagemaker_env, sagemaker_permissions)
from termtune.errors import Detached, UserError  # noqa: E402

CPU = "ml.m5.xlarge"


def sagemaker_cfg(tiny_cfg, run_name: str = "run", **extra):
    return tiny_cfg(extra={"train.on": "sagemaker", "aws.bucket": BUCKET, "aws.sagemaker.instance_type": CPU,
                           "aws.sagemaker.poll_seconds": 0.2, "aws.poll_seconds": 0.1, "aws.invoke_max_tokens": 8,
                           "train.max_steps": 6, **extra}, run_name=run_name)


def download(prefix_uri: str, target):
    from termtune.aws import s3

    bucket_name, prefix = s3.split_uri(prefix_uri)
    s3.download(boto("s3"), bucket_name, prefix, target)
    return target


def test_a_job_completes_matches_local_training_deploys_and_is_not_submitted_twice(tmp_path, tiny_cfg,
                                                                                  sagemaker_env):  # noqa: F811
    from termtune import api, pipeline
    from termtune.aws import jobrecord
    from termtune.validate import validate

    stand_in = sagemaker_env()
    cfg = sagemaker_cfg(tiny_cfg)  # no role named: termtune creates its least-privilege one
    pipeline.run_stage(cfg, "data")
    result = api.train(cfg)
    [job] = jobrecord.read_jobs(cfg)
    assert job["status"] == "Completed" and result.job["job_name"] == job["job_name"]
    assert job["role_created"] and job["billable_seconds"] is not None

    # the artifact where the job wrote it: Bedrock-valid, and what a local run of the same config makes
    job_artifact = download(job["artifact_uri"], tmp_path / "job-artifact")
    assert not [c for c in validate(job_artifact) if c.failed]
    local = tiny_cfg(extra={"train.max_steps": 6}, run_name="local")
    for stage in ("data", "train", "export"):
        pipeline.run_stage(local, stage)
    local_files = {p.name for p in local.run_dir.joinpath("artifact").iterdir() if p.name != "manifest.json"}
    assert {p.name for p in job_artifact.iterdir()} == local_files
    for name in local_files:
        assert (job_artifact / name).read_bytes() == (local.run_dir / "artifact" / name).read_bytes(), name

    # deploy from the job's output, with nothing uploaded again; invoke answers as the local model does
    s3 = boto("s3")
    before = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    deployed = api.deploy(cfg)
    assert deployed.s3_uri == job["artifact_uri"] and deployed.model_arn
    assert {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])} == before
    local.aws.bucket = BUCKET
    local.aws.invoke_max_tokens = 8
    api.deploy(local)
    assert api.invoke(cfg, term="Hypertension").text == api.invoke(local, term="Hypertension").text

    # the same settings again: no job is submitted
    jobs_before = len(stand_in.training.jobs)
    assert api.train(cfg).up_to_date
    assert len(stand_in.training.jobs) == jobs_before and len(jobrecord.read_jobs(cfg)) == 1


def test_a_role_that_cannot_write_the_output_fails_the_job_with_access_denied(tiny_cfg, sagemaker_env):  # noqa: F811
    from termtune import api, pipeline
    from termtune.aws import jobrecord

    stand_in = sagemaker_env(role_name="termtune-no-output-write", permissions=sagemaker_permissions(write=False))
    cfg = sagemaker_cfg(tiny_cfg, **{"aws.sagemaker.role_arn": stand_in.role_arn})
    pipeline.run_stage(cfg, "data")
    with pytest.raises(UserError) as e:
        api.train(cfg)
    [job] = jobrecord.read_jobs(cfg)
    assert job["status"] == "Failed"
    assert "accessdenied" in str(e.value).lower().replace(" ", "") or "access denied" in str(e.value).lower()


def test_stop_ends_the_job_and_leaves_no_process(tiny_cfg, sagemaker_env):  # noqa: F811
    from termtune import api, pipeline
    from termtune.aws import jobrecord, training

    stand_in = sagemaker_env(training_time_scale=0.01)
    cfg = sagemaker_cfg(tiny_cfg, **{"train.max_steps": -1, "train.epochs": 50})
    pipeline.run_stage(cfg, "data")
    cfg.aws.sagemaker.detach = True
    with pytest.raises(Detached):
        api.train(cfg)
    [job] = jobrecord.read_jobs(cfg)
    host = None
    for _ in range(1200):  # until the job's process runs
        hosts = stand_in.training.jobs[job["job_name"]].hosts
        if hosts and hosts[0].process:
            host = hosts[0]
            break
        time.sleep(0.05)
    assert host is not None, "the job never started"
    assert "asked SageMaker to stop" in training.jobs_stop(cfg)
    with pytest.raises(UserError, match="stopped"):
        pipeline.attach_job(cfg)
    assert jobrecord.read_jobs(cfg)[0]["status"] == "Stopped"
    pgid = host.process.pid
    for _ in range(100):
        if not _live_in_group(pgid):
            break
        time.sleep(0.05)
    assert not _live_in_group(pgid)


def _live_in_group(pgid: int) -> list[int]:
    """Processes of the group that still run (a zombie runs nothing)."""
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in "ZX" and int(fields[2]) == pgid:
            live.append(int(entry))
    return live


def test_the_jobs_lines_stream_in_order_once_and_jobs_reads_the_recorded_job(tiny_cfg, sagemaker_env,  # noqa: F811
                                                                              capfd):
    """With a role moto lets write the logs: moto authorises CloudWatch Logs calls only against the resource
    "*", and termtune's own role names the training-job log group (as AWS documents), so moto drops the lines
    of a job that runs as termtune's role."""
    from termtune import api, pipeline
    from termtune.aws import jobrecord, training

    stand_in = sagemaker_env()
    cfg = sagemaker_cfg(tiny_cfg, **{"aws.sagemaker.role_arn": stand_in.role_arn})
    pipeline.run_stage(cfg, "data")
    api.train(cfg)
    shown = [line for line in capfd.readouterr().out.splitlines() if line.startswith("[algo-1] ")]
    # what the job wrote, read whole from CloudWatch Logs afterwards: shown once each, in order, none missing
    logs = boto("logs")
    job_name = jobrecord.read_jobs(cfg)[0]["job_name"]
    [stream] = [s["logStreamName"] for s in logs.describe_log_streams(
        logGroupName="/aws/sagemaker/TrainingJobs", logStreamNamePrefix=job_name + "/")["logStreams"]]
    written, token = [], None
    while True:
        page = logs.get_log_events(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream,
                                   startFromHead=True, **({"nextToken": token} if token else {}))
        if not page["events"]:
            break
        written += [f"[algo-1] {e['message'].rstrip()}" for e in page["events"]]
        token = page["nextForwardToken"]
    assert len(written) > 10 and any("train: step" in line for line in written)
    assert shown == written
    status = training.jobs_status(cfg)
    assert ": Completed (Completed)" in status.splitlines()[0] and "output " in status
    assert training.jobs_logs(cfg) == written
    assert training.jobs_list(cfg, pipeline.train_fingerprint(cfg)).count("Completed") == 1


def _artifact_tensors(folder):
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def _job_train_result(cfg) -> dict:
    """The train result the job recorded (model/termtune/metrics.json), as the client downloaded it."""
    import json

    [metrics] = list(cfg.run_dir.rglob("metrics.json"))
    return json.loads(metrics.read_text())["train"]


def test_a_spot_interruption_resumes_from_the_s3_checkpoints_to_the_uninterrupted_weights(tmp_path, tiny_cfg,
                                                                                           sagemaker_env):  # noqa: F811
    """The stand-in interrupts the spot job once a sealed checkpoint is in S3; the restarted job (new instances,
    checkpoints restored from S3) resumes from it and ends with the weights a job that was never interrupted
    ends with (the resume test's tolerance)."""
    import threading

    from termtune import api, pipeline
    from termtune.aws import jobrecord

    stand_in = sagemaker_env(spot_interrupt_after_seconds=1e9)  # armed below, once a checkpoint is in S3
    spot = sagemaker_cfg(tiny_cfg, "spot", **{"aws.sagemaker.spot": True, "train.max_steps": 12,
                                              "train.save_steps": 2})
    plain = sagemaker_cfg(tiny_cfg, "plain", **{"train.max_steps": 12, "train.save_steps": 2})
    s3 = boto("s3")

    def interrupt_after_the_first_checkpoint():
        for _ in range(3000):
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
            if any("/checkpoints/" in k and k.endswith("termtune-complete.json") for k in keys):
                stand_in.training.interrupt_after_seconds = 1e-3
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=interrupt_after_the_first_checkpoint, daemon=True)
    pipeline.run_stage(spot, "data")
    watcher.start()
    api.train(spot)
    watcher.join(timeout=1)
    [job] = jobrecord.read_jobs(spot)
    assert job["status"] == "Completed"
    assert stand_in.training.jobs[job["job_name"]].interrupted
    assert _job_train_result(spot)["resumed_from"], "the restarted job did not resume from a checkpoint"

    stand_in.training.interrupt_after_seconds = 0.0
    pipeline.run_stage(plain, "data")
    api.train(plain)
    [plain_job] = jobrecord.read_jobs(plain)
    resumed = _artifact_tensors(download(job["artifact_uri"], tmp_path / "spot"))
    uninterrupted = _artifact_tensors(download(plain_job["artifact_uri"], tmp_path / "plain"))
    assert resumed.keys() == uninterrupted.keys()
    assert max(float((resumed[k].float() - uninterrupted[k].float()).abs().max()) for k in resumed) <= 1e-5


def test_two_instances_train_one_model_together(tmp_path, tiny_cfg, sagemaker_env):  # noqa: F811
    from termtune import api, pipeline
    from termtune.aws import jobrecord
    from termtune.validate import validate

    stand_in = sagemaker_env()
    cfg = sagemaker_cfg(tiny_cfg, **{"aws.sagemaker.instance_count": 2})
    pipeline.run_stage(cfg, "data")
    api.train(cfg)
    [job] = jobrecord.read_jobs(cfg)
    assert job["status"] == "Completed" and job["instance_count"] == 2
    assert len(stand_in.training.jobs[job["job_name"]].hosts) == 2
    assert _job_train_result(cfg)["world_size"] == 2  # one torchrun process per host, one process group
    assert not [c for c in validate(download(job["artifact_uri"], tmp_path / "artifact")) if c.failed]
