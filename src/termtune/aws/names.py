"""Bedrock Custom Model Import constraints, shared by the client (termtune deploy) and the
local endpoint (termtune serve) so both reject exactly what AWS rejects.

The patterns come from botocore's bedrock service model (reference: bedrock-cmi.md §2.3).
botocore checks only required members and minimum lengths, so these are checked here,
before a request goes out. Patterns carry no anchors in the model: use re.fullmatch.
"""

from __future__ import annotations

import re

CMI_REGIONS = ("eu-central-1", "us-east-1", "us-east-2", "us-west-2")
"""Regions where Custom Model Import is available (bedrock-cmi §1.7)."""

JOB_NAME_RE = r"[a-zA-Z0-9](-*[a-zA-Z0-9\+\-\.])*"
MODEL_NAME_RE = r"([0-9a-zA-Z][_-]?)+"
ROLE_ARN_RE = r"arn:aws(-[^:]+)?:iam::([0-9]{12})?:role/.+"
S3_URI_RE = r"s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](?:/[-!_*'().a-z0-9A-Z]+(?:/[-!_*'().a-z0-9A-Z]+)*)?/?"
TOKEN_RE = r"[a-zA-Z0-9]([-a-zA-Z0-9]{0,254}[a-zA-Z0-9])?"
JOB_ARN_RE = r"arn:aws(-[^:]+)?:bedrock:[a-z0-9-]{1,20}:[0-9]{12}:model-import-job/[a-z0-9]{12}"
MODEL_ARN_RE = r"arn:aws(-[^:]+)?:bedrock:[a-z0-9-]{1,20}:[0-9]{12}:imported-model/[a-z0-9]{12}"
KMS_KEY_ID_RE = (r"(arn:aws(-[^:]+)?:kms:[a-zA-Z0-9-]*:[0-9]{12}:((key/[a-zA-Z0-9-]{36})|(alias/[a-zA-Z0-9-_/]+)))"
                 r"|([a-zA-Z0-9-]{36})|(alias/[a-zA-Z0-9-_/]+)")
KMS_KEY_ARN_RE = r"arn:aws(-[^:]+)?:kms:[a-zA-Z0-9-]*:[0-9]{12}:key/[a-zA-Z0-9-]{36}"
TAG_RE = r"[a-zA-Z0-9\s._:/=+@-]*"
VPC_ID_RE = r"[-0-9a-zA-Z]+"
SORT_BY = ("CreationTime",)
SORT_ORDER = ("Ascending", "Descending")
MAX_TAGS = 200  # TagList
MAX_SUBNETS, MAX_SECURITY_GROUPS = 16, 5  # SubnetIds, SecurityGroupIds

# field -> (pattern, min length, max length)
FIELDS = {
    "jobName": (JOB_NAME_RE, 1, 63),
    "importedModelName": (MODEL_NAME_RE, 1, 63),
    "roleArn": (ROLE_ARN_RE, 0, 2048),
    "s3Uri": (S3_URI_RE, 1, 1024),
    "clientRequestToken": (TOKEN_RE, 1, 256),
    "jobIdentifier": (f"({JOB_ARN_RE})|({JOB_NAME_RE})", 0, 1011),
    "modelIdentifier": (f"({MODEL_ARN_RE})|({MODEL_NAME_RE})", 1, 1011),
    "importedModelKmsKeyId": (KMS_KEY_ID_RE, 1, 2048),
    "key": (TAG_RE, 1, 128),
    "value": (TAG_RE, 0, 256),
    "subnetIds": (VPC_ID_RE, 0, 32),
    "securityGroupIds": (VPC_ID_RE, 0, 32),
}


def field_problem(field: str, value: object) -> str | None:
    """Why `value` is not a valid `field` (the wording AWS uses), or None when it is valid."""
    pattern, low, high = FIELDS[field]
    if not isinstance(value, str):
        return f"Value at '{field}' failed to satisfy constraint: Member must be a string"
    if not low <= len(value) <= high:
        return (f"Value at '{field}' failed to satisfy constraint: "
                f"Member must have length between {low} and {high}")
    if not re.fullmatch(pattern, value):
        return f"Value '{value}' at '{field}' failed to satisfy constraint: Member must satisfy regular expression pattern: {pattern}"
    return None


def job_name_for(model_name: str, suffix: str) -> str:
    """A JobName derived from an importedModelName: the model pattern allows `_`, the job
    pattern does not, so underscores become hyphens; `suffix` (a timestamp) keeps it unique."""
    return f"{model_name[:63 - len(suffix) - 1].replace('_', '-')}-{suffix}"


def safe_name(text: str, limit: int = 48) -> str:
    """Turn any text (e.g. a run directory name) into a name valid as both jobName and
    importedModelName: lowercase alphanumerics separated by single hyphens."""
    parts = re.findall(r"[a-z0-9]+", text.lower())
    name = "-".join(parts)[:limit].strip("-")
    return name or "model"


# S3's rules for general purpose bucket names (Amazon S3 User Guide, "General purpose bucket
# naming rules"); the Bedrock S3Uri pattern alone lets `a..b`, `192.168.5.4` or `xn--x` through.
BUCKET_PREFIXES_RESERVED = ("xn--", "sthree-", "amzn-s3-demo-")
BUCKET_SUFFIXES_RESERVED = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
# IAM's RoleName: 1 to 64 characters of [\w+=,.@-] (IAM API Reference, CreateRole).
ROLE_NAME_RE = r"[\w+=,.@-]{1,64}"


def bucket_problem(name: str) -> str | None:
    """Why S3 refuses `name` as a general purpose bucket name, or None when it is valid."""
    if not 3 <= len(name) <= 63:
        return f"has {len(name)} characters; a bucket name has 3 to 63"
    if not re.fullmatch(r"[a-z0-9.-]+", name):
        return "may hold only lowercase letters, digits, dots and hyphens"
    if not (name[0].isalnum() and name[-1].isalnum()):
        return "must begin and end with a letter or digit"
    if ".." in name:
        return "must not contain two adjacent dots"
    if re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", name):
        return "must not be formatted as an IP address"
    for prefix in BUCKET_PREFIXES_RESERVED:
        if name.startswith(prefix):
            return f"must not start with {prefix} (reserved by S3)"
    for suffix in BUCKET_SUFFIXES_RESERVED:
        if name.endswith(suffix):
            return f"must not end with {suffix} (reserved by S3)"
    return None


def role_name_problem(name: str) -> str | None:
    """Why IAM refuses `name` as a role name, or None when it is valid."""
    if not 1 <= len(name) <= 64:
        return f"has {len(name)} characters; a role name has 1 to 64"
    if not re.fullmatch(ROLE_NAME_RE, name, flags=re.ASCII):
        return "may hold only letters, digits and + = , . @ _ -"
    return None
