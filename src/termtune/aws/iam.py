"""The IAM service role Bedrock assumes to read the artifact (bedrock-cmi §3).

Least privilege: Bedrock may assume it only for this account's import jobs in this region
(aws:SourceAccount / aws:SourceArn, against the confused-deputy problem), and it may read
only the artifacts' bucket and prefixes, plus decrypt with the KMS key when one is set.

Several run directories may share one role: each run puts its own inline policy on it, named
by the run's id (POLICY_PREFIX + id), granting only that run's prefix. cleanup removes that
policy, and deletes the role only when termtune created it and nothing else is left on it.
"""

from __future__ import annotations

import json
from typing import Any

POLICY_PREFIX = "termtune-artifact-read-"
CREATED_BY_TAG = {"Key": "created-by", "Value": "termtune"}


def trust_policy(account: str, region: str) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": {"Service": "bedrock.amazonaws.com"},
            "Action": "sts:AssumeRole",
            "Condition": {
                "StringEquals": {"aws:SourceAccount": account},
                "ArnEquals": {"aws:SourceArn": f"arn:aws:bedrock:{region}:{account}:model-import-job/*"},
            },
        }],
    }


def permissions_policy(bucket: str, prefix: str, account: str, kms_key_arn: str | None = None) -> dict[str, Any]:
    """Read the import prefix and nothing else; with SSE-KMS, decrypt with that one key.
    `kms_key_arn` must be a key ARN: IAM does not authorise kms:Decrypt through an alias."""
    prefix = prefix.rstrip("/")
    owner = {"StringEquals": {"aws:ResourceAccount": account}}
    statements: list[dict[str, Any]] = [
        {"Sid": "ReadArtifact", "Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": [f"arn:aws:s3:::{bucket}/{prefix}/*"], "Condition": owner},
        {"Sid": "ListArtifact", "Effect": "Allow", "Action": ["s3:ListBucket"],
         "Resource": [f"arn:aws:s3:::{bucket}"],
         "Condition": {**owner, "StringLike": {"s3:prefix": [f"{prefix}/", f"{prefix}/*"]}}},
    ]
    if kms_key_arn:
        statements.append({"Sid": "DecryptArtifact", "Effect": "Allow",
                           "Action": ["kms:Decrypt", "kms:DescribeKey"], "Resource": [kms_key_arn]})
    return {"Version": "2012-10-17", "Statement": statements}


def policy_name(run_id: str) -> str:
    """The inline policy that grants one run's prefix."""
    return POLICY_PREFIX + run_id


def create_or_update(iam: Any, role_name: str, trust: dict, permissions: dict, policy: str,
                     description: str = "Bedrock Custom Model Import reads termtune artifacts") -> tuple[str, bool]:
    """Return (role ARN, created now). An existing role keeps its trust policy unless
    termtune created it; the inline policy `policy` (this run's) is brought up to date either
    way, and the other runs' policies on the role are left as they are."""
    from termtune.aws.clients import error_code
    from termtune.errors import UserError

    try:
        role = iam.get_role(RoleName=role_name)["Role"]
        created = False
        if CREATED_BY_TAG in (role.get("Tags") or []):
            iam.update_assume_role_policy(RoleName=role_name, PolicyDocument=json.dumps(trust))
    except iam.exceptions.NoSuchEntityException:
        role = iam.create_role(RoleName=role_name, AssumeRolePolicyDocument=json.dumps(trust),
                               Description=description,
                               Tags=[CREATED_BY_TAG])["Role"]
        created = True
    try:
        iam.put_role_policy(RoleName=role_name, PolicyName=policy, PolicyDocument=json.dumps(permissions))
    except Exception as e:
        if error_code(e) != "LimitExceeded":
            raise
        raise UserError(f"aws.role_name: the role {role_name} holds as many inline policies as IAM allows "
                        "(10,240 characters in all; each termtune run that shares it adds one); run termtune "
                        "cleanup in finished runs, or give this run its own aws.role_name") from e
    return role["Arn"], created


def release(iam: Any, role_name: str, policy: str) -> list[str]:
    """Remove this run's inline policy from the role, then the role itself when termtune created
    it and no policy of any kind is left on it (another run's, or one an administrator added).
    Returns what was deleted; nothing when both were already gone."""
    done = []
    try:
        iam.delete_role_policy(RoleName=role_name, PolicyName=policy)
        done.append(f"deleted the inline policy {policy} from IAM role {role_name}")
    except iam.exceptions.NoSuchEntityException:
        pass
    try:
        role = iam.get_role(RoleName=role_name)["Role"]
        if CREATED_BY_TAG not in (role.get("Tags") or []):
            return done
        if iam.list_role_policies(RoleName=role_name)["PolicyNames"] or \
                iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]:
            return done  # still in use; the last run to clean up deletes it
        iam.delete_role(RoleName=role_name)
    except (iam.exceptions.NoSuchEntityException, iam.exceptions.DeleteConflictException):
        return done  # gone already, or a policy was added since the listing
    return done + [f"deleted IAM role {role_name} (termtune created it; no run uses it any more)"]
