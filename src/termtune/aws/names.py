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

# field -> (pattern, min length, max length)
FIELDS = {
    "jobName": (JOB_NAME_RE, 1, 63),
    "importedModelName": (MODEL_NAME_RE, 1, 63),
    "roleArn": (ROLE_ARN_RE, 0, 2048),
    "s3Uri": (S3_URI_RE, 1, 1024),
    "clientRequestToken": (TOKEN_RE, 1, 256),
    "jobIdentifier": (f"({JOB_ARN_RE})|({JOB_NAME_RE})", 0, 1011),
    "modelIdentifier": (f"({MODEL_ARN_RE})|({MODEL_NAME_RE})", 1, 1011),
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


def safe_name(text: str, limit: int = 48) -> str:
    """Turn any text (e.g. a run directory name) into a name valid as both jobName and
    importedModelName: lowercase alphanumerics separated by single hyphens."""
    parts = re.findall(r"[a-z0-9]+", text.lower())
    name = "-".join(parts)[:limit].strip("-")
    return name or "model"
