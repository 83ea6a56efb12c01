"""The IAM service role Bedrock assumes to read the artifact (bedrock-cmi §3).

Least privilege: Bedrock may assume it only for this account's import jobs in this region
(aws:SourceAccount / aws:SourceArn, against the confused-deputy problem), and it may read
only the artifact's bucket and prefix, plus decrypt with the KMS key when one is set.
"""

from __future__ import annotations

import json
from typing import Any

POLICY_NAME = "termtune-artifact-read"
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


def create_or_update(iam: Any, role_name: str, trust: dict, permissions: dict) -> tuple[str, bool]:
    """Return (role ARN, created now). An existing role keeps its trust policy unless
    termtune created it; its artifact-read inline policy is brought up to date either way."""
    try:
        role = iam.get_role(RoleName=role_name)["Role"]
        created = False
        if CREATED_BY_TAG in (role.get("Tags") or []):
            iam.update_assume_role_policy(RoleName=role_name, PolicyDocument=json.dumps(trust))
    except iam.exceptions.NoSuchEntityException:
        role = iam.create_role(RoleName=role_name, AssumeRolePolicyDocument=json.dumps(trust),
                               Description="Bedrock Custom Model Import reads termtune artifacts",
                               Tags=[CREATED_BY_TAG])["Role"]
        created = True
    iam.put_role_policy(RoleName=role_name, PolicyName=POLICY_NAME, PolicyDocument=json.dumps(permissions))
    return role["Arn"], created


def delete(iam: Any, role_name: str) -> bool:
    """Delete the role and its inline policies; False when it was already gone."""
    try:
        for name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
            iam.delete_role_policy(RoleName=role_name, PolicyName=name)
        for attached in iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]:
            iam.detach_role_policy(RoleName=role_name, PolicyArn=attached["PolicyArn"])
        iam.delete_role(RoleName=role_name)
    except iam.exceptions.NoSuchEntityException:
        return False
    return True
