"""Does a role's trust policy let an AWS service assume it, for a given request context?

termtune serve plays Bedrock, which assumes the import role as the service principal
bedrock.amazonaws.com and sends aws:SourceAccount and aws:SourceArn with the request
(docs: model-import-iam-role.html, "confused deputy"). moto 5.2 cannot evaluate a trust
policy whose principal is a service, so serve evaluates it here, never more loosely than IAM:

- Allow/Deny statements with Principal or NotPrincipal (Service, or "*") and Action or NotAction;
  an explicit Deny wins over any Allow.
- The string and ARN condition operators, their negations, Null and Bool, each with the
  ...IfExists suffix (IAM User Guide, "IAM JSON policy elements: Condition operators").
  Condition keys match case-insensitively, as in IAM; values case-sensitively, except the
  ...IgnoreCase operators.
- An operator it does not know (IAM refuses such a policy when it is written; moto does not)
  fails closed: it never satisfies an Allow, and it always satisfies a Deny, so the Deny applies.
  So does an Effect other than "Allow".
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable

Test = Callable[[str, str], bool]


def _like(actual: str, expected: str) -> bool:
    # IAM's ARN operators both accept * and ? in each ARN component (IAM User Guide,
    # "Amazon Resource Name (ARN) condition operators"), as StringLike does over the whole value.
    return fnmatch.fnmatchcase(actual, expected)


POSITIVE: dict[str, Test] = {
    "StringEquals": lambda actual, expected: actual == expected,
    "StringEqualsIgnoreCase": lambda actual, expected: actual.lower() == expected.lower(),
    "StringLike": _like,
    "ArnEquals": _like,
    "ArnLike": _like,
    "Bool": lambda actual, expected: actual.lower() == expected.lower(),
}
NEGATED: dict[str, str] = {  # operator -> the positive one it negates
    "StringNotEquals": "StringEquals",
    "StringNotEqualsIgnoreCase": "StringEqualsIgnoreCase",
    "StringNotLike": "StringLike",
    "ArnNotEquals": "ArnEquals",
    "ArnNotLike": "ArnLike",
}


def allows_service(policy: dict[str, Any], service: str, action: str, context: dict[str, str]) -> bool:
    """True when some statement allows `service` to perform `action` in `context` and none denies it."""
    context = {key.lower(): value for key, value in context.items()}
    allowed = False
    for statement in _as_list(policy.get("Statement")):
        if not isinstance(statement, dict):
            return False  # a policy IAM would refuse: grants nothing
        if not _names(statement, service) or not _acts(statement, action):
            continue
        allow = statement.get("Effect") == "Allow"
        holds = _conditions_hold(statement.get("Condition") or {}, context, unknown=not allow)
        if holds and not allow:
            return False
        allowed = allowed or (holds and allow)
    return allowed


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value] if value is not None else []


def _names(statement: dict, service: str) -> bool:
    """Principal names the service, or NotPrincipal is given and does not."""
    if "NotPrincipal" in statement:
        return not _principal_has(statement["NotPrincipal"], service)
    return _principal_has(statement.get("Principal"), service)


def _principal_has(principal: Any, service: str) -> bool:
    if principal == "*":
        return True
    return isinstance(principal, dict) and service in _as_list(principal.get("Service"))


def _acts(statement: dict, action: str) -> bool:
    """Action matches, or NotAction is given and does not match (action names are case-insensitive)."""
    if "NotAction" in statement:
        return not _action_in(statement["NotAction"], action)
    return _action_in(statement.get("Action"), action)


def _action_in(actions: Any, action: str) -> bool:
    return any(fnmatch.fnmatchcase(action.lower(), str(a).lower()) for a in _as_list(actions))


def _conditions_hold(conditions: Any, context: dict[str, str], unknown: bool) -> bool:
    """Every operator's every key holds. `unknown` is the answer for what cannot be evaluated
    (an operator not known here, a malformed block): False for an Allow, True for a Deny."""
    if not isinstance(conditions, dict):
        return unknown
    for operator, pairs in conditions.items():
        if not isinstance(pairs, dict):
            return unknown
        for key, expected in pairs.items():
            result = _condition(str(operator), context.get(str(key).lower()), [str(e) for e in _as_list(expected)])
            if result is None:
                return unknown
            if not result:
                return False
    return True


def _condition(operator: str, actual: str | None, expected: list[str]) -> bool | None:
    """One key under one operator; None when the operator is not one known here."""
    if_exists = operator.endswith("IfExists") and operator != "IfExists"
    base = operator.removesuffix("IfExists") if if_exists else operator
    if base == "Null":  # "true": the key is absent; "false": present
        if if_exists or not all(e.lower() in ("true", "false") for e in expected):
            return None
        return any((actual is None) == (e.lower() == "true") for e in expected)
    if base in POSITIVE:
        if actual is None:
            return if_exists
        return any(POSITIVE[base](actual, e) for e in expected)
    if base in NEGATED:
        if actual is None:  # IAM: a negated operator on an absent key holds
            return True
        return not any(POSITIVE[NEGATED[base]](actual, e) for e in expected)
    return None
