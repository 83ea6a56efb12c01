"""moto's S3/IAM/STS/KMS/CloudWatch Logs server with IAM access control on, for the offline rehearsal.

With access control on, moto checks every request's signature against an access key it
issued and evaluates the caller's IAM policies for the action and resource, so the import
role's permission policy decides what `termtune serve`'s import job can read from S3.

    server, url, keys = start_moto()            # tests
    python -m termtune.rehearsal --port 5055 --env-file moto.env   # termtune.local

Switching it on (moto's documented way, server mode): POST the number of requests that may
still go unauthenticated to /moto-api/reset-auth (the INITIAL_NO_AUTH_ACTION_COUNT setting);
those few requests create an administrator user and its access key, and every request after
them is authenticated and authorised.

One fix is applied to moto here: moto 5.2 raises TypeError when AssumeRole meets a trust
policy whose principal is a service ("Service": "bedrock.amazonaws.com"), because it only
knows AWS principals. moto cannot tell which service calls, so such a statement is left to
the caller to evaluate; termtune serve does that (termtune.aws.trust) with the request
context Bedrock sends. See docs/aws.md, "What the rehearsal proves".
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

from termtune.events import emit

ADMIN = "termtune-rehearsal-admin"
BOOTSTRAP_REQUESTS = 3  # CreateUser, PutUserPolicy, CreateAccessKey


def _patch_service_principals() -> None:
    from moto.iam.access_control import IAMPolicyStatement

    if getattr(IAMPolicyStatement, "_termtune_patched", False):
        return
    original = IAMPolicyStatement._check_principal

    def check_principal(self: Any, principal: str) -> bool:
        expected = self._statement.get("Principal")
        if isinstance(expected, dict) and "AWS" not in expected and "Service" in expected:
            return True  # a service principal: evaluated by the service (termtune serve), not here
        return original(self, principal)

    IAMPolicyStatement._check_principal = check_principal
    IAMPolicyStatement._termtune_patched = True


def start_moto(host: str = "127.0.0.1", port: int = 0) -> tuple[Any, str, dict[str, str]]:
    """Start moto's server in this process with IAM access control on; returns (server,
    URL, the administrator's access key as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)."""
    import boto3
    import requests
    from moto.server import ThreadedMotoServer

    from termtune.local import free_port

    _patch_service_principals()
    port = port or free_port(host)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    url = f"http://{host}:{port}"
    requests.post(f"{url}/moto-api/reset-auth", data=str(BOOTSTRAP_REQUESTS).encode(), timeout=10).raise_for_status()
    iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1",
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    # moto's state is per process: a second server in the same process sees the first's users.
    admin = f"{ADMIN}-{port}"
    iam.create_user(UserName=admin)
    iam.put_user_policy(UserName=admin, PolicyName="everything", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=admin)["AccessKey"]
    return server, url, {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5055)
    parser.add_argument("--env-file", required=True, help="where to write the administrator's keys (export lines)")
    args = parser.parse_args(argv)
    server, url, keys = start_moto(args.host, args.port)
    with open(args.env_file, "w", encoding="utf-8") as f:
        f.write("".join(f"export {k}={v}\n" for k, v in keys.items()))
    emit("note", f"moto (S3, IAM, STS, KMS, CloudWatch Logs; IAM access control on) on {url}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
