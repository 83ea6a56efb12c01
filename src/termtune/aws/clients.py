"""Every boto3 client termtune makes comes from here.

No endpoint_url is ever passed: boto3 (>= 1.34) reads the SDK's standard endpoint settings
itself (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL_BEDROCK,
AWS_ENDPOINT_URL_BEDROCK_RUNTIME, or `endpoint_url` / `services` in an AWS profile). So the
same code talks to real AWS, to moto's server, or to `termtune serve`, with no termtune flag.
"""

from __future__ import annotations

from typing import Any, Callable

from termtune.errors import UserError


def client(service: str, region: str, profile: str | None = None, read_timeout: int = 60,
           credentials: dict[str, str] | None = None) -> Any:
    """A boto3 client with standard-mode retries (the attempt count stays configurable the
    AWS way: AWS_MAX_ATTEMPTS or max_attempts in a profile). `credentials` (access key,
    secret, session token) replace the default chain, e.g. for an assumed role."""
    import boto3
    import botocore.exceptions
    from botocore.config import Config

    try:
        session = boto3.Session(profile_name=profile, region_name=region, **(credentials or {}))
    except botocore.exceptions.ProfileNotFound as e:
        raise UserError(f"aws.profile: {e}; list profiles with `aws configure list-profiles`") from e
    config = Config(retries={"mode": "standard"}, read_timeout=read_timeout, connect_timeout=10)
    return session.client(service, config=config)


def error_code(exc: BaseException) -> str | None:
    """The AWS error code of a botocore ClientError (None for anything else)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


def error_message(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Message") or str(exc)
    return str(exc)


STAND_IN_HEADER = "x-termtune-stand-in"  # termtune serve's mark on each of its answers
RUNTIME_HEADER = "x-termtune-runtime"  # and where it runs the model (Bedrock's transformers or not)


def stand_in(response: dict, header: str = STAND_IN_HEADER) -> str | None:
    """What termtune serve says of itself in a boto3 response ("local stand-in, not AWS: termtune
    serve", or with RUNTIME_HEADER where it ran the model); None from AWS, which sends no such header."""
    return ((response.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}).get(header)


def credentials_problem(exc: BaseException) -> UserError | None:
    """A clear UserError for missing credentials or unreachable endpoints, else None."""
    import botocore.exceptions

    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return UserError("no AWS credentials found: set AWS_PROFILE (or aws.profile), or "
                         "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; see docs/aws.md")
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return UserError(f"cannot reach {exc.kwargs.get('endpoint_url')}: check the network, or the "
                         "AWS_ENDPOINT_URL_* settings if you run against a local endpoint")
    return None


def retry_while_role_propagates(call: Callable[[], Any], service: str, codes: tuple[str, ...], seconds: float,
                                sleep: Callable[[float], None], on_retry: Callable[[str], None] | None = None) -> Any:
    """call(); while it fails with one of `codes` and a message naming the role, for up to `seconds` (given only
    for a role termtune has just created: IAM is eventually consistent), say so and call again, waiting 2 s,
    doubling to at most 15 s. Any other failure, or one past the deadline, is raised as it came."""
    import time

    from termtune.events import emit

    deadline = time.monotonic() + seconds
    delay = 2.0
    while True:
        try:
            return call()
        except Exception as e:
            code, message = error_code(e), error_message(e)
            if code not in codes or "role" not in message.lower() or time.monotonic() >= deadline:
                raise
            if on_retry:
                on_retry(f"{code}: {message}")
            emit("note", f"{service} cannot use the new IAM role yet ({code}: {message}); IAM propagation can take "
                         f"a minute or two, retrying in {delay:.0f}s")
            sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 15.0)


def role_credentials(sts_credentials: dict[str, Any]) -> dict[str, str]:
    """An AssumeRole answer's Credentials as keyword arguments for a boto3 client."""
    return {"aws_access_key_id": sts_credentials["AccessKeyId"],
            "aws_secret_access_key": sts_credentials["SecretAccessKey"],
            "aws_session_token": sts_credentials["SessionToken"]}
