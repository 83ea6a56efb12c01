"""Does a role's trust policy let an AWS service assume it, for a given request context?

termtune serve plays Bedrock, which assumes the import role as the service principal
bedrock.amazonaws.com and sends aws:SourceAccount and aws:SourceArn with the request
(docs: model-import-iam-role.html, "confused deputy"). moto 5.2 cannot evaluate a trust
policy whose principal is a service, so serve evaluates it here, as IAM does for the parts
termtune's policies use: Allow/Deny statements, Principal.Service, Action, and the
StringEquals / StringLike / ArnEquals / ArnLike condition operators. Any other operator
counts as not satisfied, so an unknown condition never grants access.
"""

from __future__ import annotations

import fnmatch
from typing import Any

OPERATORS = {
    "StringEquals": lambda actual, expected: actual == expected,
    "StringLike": lambda actual, expected: fnmatch.fnmatchcase(actual, expected),
    # IAM's ARN operators both accept * and ? in each ARN component (IAM User Guide,
    # "Amazon Resource Name (ARN) condition operators").
    "ArnEquals": lambda actual, expected: fnmatch.fnmatchcase(actual, expected),
    "ArnLike": lambda actual, expected: fnmatch.fnmatchcase(actual, expected),
}


def allows_service(policy: dict[str, Any], service: str, action: str, context: dict[str, str]) -> bool:
    allowed = False
    for statement in _as_list(policy.get("Statement")):
        if not _names(statement.get("Principal"), service) or not _matches(statement.get("Action"), action):
            continue
        if not _conditions_hold(statement.get("Condition") or {}, context):
            continue
        if statement.get("Effect") == "Deny":
            return False
        allowed = allowed or statement.get("Effect") == "Allow"
    return allowed


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value] if value is not None else []


def _names(principal: Any, service: str) -> bool:
    if principal == "*":
        return True
    return isinstance(principal, dict) and service in _as_list(principal.get("Service"))


def _matches(actions: Any, action: str) -> bool:
    return any(fnmatch.fnmatchcase(action.lower(), str(a).lower()) for a in _as_list(actions))


def _conditions_hold(conditions: dict[str, Any], context: dict[str, str]) -> bool:
    for operator, pairs in conditions.items():
        test = OPERATORS.get(operator)
        if test is None or not isinstance(pairs, dict):
            return False
        for key, expected in pairs.items():
            actual = context.get(key)
            if actual is None or not any(test(actual, str(e)) for e in _as_list(expected)):
                return False
    return True
