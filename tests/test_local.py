"""termtune.local: the stand-ins start on free ports, the SDK reaches them only through its standard
variables, and on any exit exactly those processes stop and the environment is as it was."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # pytest's own, per phase


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def user_environment(monkeypatch):
    """A user's own AWS setup, which the block must override and then give back untouched."""
    monkeypatch.setenv("AWS_PROFILE", "someone-real")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAREALKEY")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return _environ()


def test_the_sdk_reaches_the_stand_ins_and_everything_is_restored(user_environment):
    import boto3

    from termtune.local import local_aws

    with local_aws(bucket="termtune-local-test", run_training_jobs=True) as aws:
        assert os.environ["AWS_ENDPOINT_URL_S3"] == os.environ["AWS_ENDPOINT_URL_STS"] == aws.moto_url
        assert os.environ["AWS_ENDPOINT_URL_CLOUDWATCH_LOGS"] == aws.moto_url
        assert os.environ["AWS_ENDPOINT_URL_BEDROCK_RUNTIME"] == os.environ["AWS_ENDPOINT_URL_SAGEMAKER"] == aws.bedrock_url
        # SageMaker's training jobs are serve's, and it was told to run them; their logs go to moto
        assert boto3.client("sagemaker", region_name="us-east-1").list_training_jobs()["TrainingJobSummaries"] == []
        assert "SageMaker runs training jobs' commands" in (aws.logs / "serve.log").read_text()
        assert boto3.client("logs", region_name="us-east-1").describe_log_groups()["logGroups"] == []
        assert "AWS_PROFILE" not in os.environ and "AWS_REGION" not in os.environ
        s3 = boto3.client("s3", region_name="us-east-1")
        assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["termtune-local-test"]
        # moto enforces IAM: the caller is the administrator whose key moto issued for this block
        identity = boto3.client("sts", region_name="us-east-1").get_caller_identity()
        assert identity["Arn"].endswith(":user/termtune-rehearsal-admin-" + aws.moto_url.rsplit(":", 1)[1])
        assert boto3.client("bedrock", region_name="us-east-1").list_imported_models()["modelSummaries"] == []
        pids, logs = aws.pids, aws.logs
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
    assert _environ() == user_environment
    assert not any(_alive(pid) for pid in pids)
    assert not logs.exists()  # a clean exit leaves nothing behind

    with local_aws(bucket="termtune-local-again"):  # another moto, another key: boto3.client() must use it
        assert [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]] == ["termtune-local-again"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_or_ctrl_c_in_the_block_stops_both_and_restores_the_environment(user_environment, error):
    from termtune.local import local_aws

    with pytest.raises(error):
        with local_aws() as aws:
            pids, logs = aws.pids, aws.logs
            raise error()
    assert _environ() == user_environment
    assert not any(_alive(pid) for pid in pids)
    assert (logs / "serve.log").is_file()  # kept to look at after a failure
    subprocess.run(["rm", "-r", str(logs)], check=True)


def test_a_stand_in_that_cannot_start_is_one_error_naming_its_log(user_environment, monkeypatch):
    from termtune import local
    from termtune.errors import UserError

    with socket.socket() as taken:  # bound, not listening: moto cannot bind it and nothing answers there
        taken.bind(("127.0.0.1", 0))
        monkeypatch.setattr(local, "free_port", lambda host="127.0.0.1": taken.getsockname()[1])
        with pytest.raises(UserError, match=r"^moto's server did not start in time; see (.*moto\.log)$") as e:
            with local.local_aws(startup_timeout_s=5):
                pass
    assert _environ() == user_environment
    log = e.value.args[0].rsplit("see ", 1)[1]
    assert "is in use" in open(log).read()  # the log says why
    subprocess.run(["rm", "-r", os.path.dirname(log)], check=True)


def test_the_command_line_runs_a_command_inside_and_passes_its_status_on():
    check = ("import boto3, os; assert os.environ['AWS_ENDPOINT_URL_BEDROCK'].startswith('http://127.0.0.1:'); "
             "print([b['Name'] for b in boto3.client('s3').list_buckets()['Buckets']])")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    ok = subprocess.run([sys.executable, "-m", "termtune.local", "--bucket", "termtune-demo", "--",
                         sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "['termtune-demo']"
    failed = subprocess.run([sys.executable, "-m", "termtune.local", "--", sys.executable, "-c", "exit(3)"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert failed.returncode == 3
    logs = failed.stderr.rsplit("logs kept in ", 1)[1].strip()
    subprocess.run(["rm", "-r", logs], check=True)
