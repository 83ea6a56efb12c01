"""The run history (<run>/history.json): the record of every result a re-run replaced.

When a stage runs again because its inputs changed, its previous record (settings, metrics,
artifact digest, imported model) is appended here before its outputs are replaced, so nothing
is lost without a trace. Imports from earlier attempts stay listed as live until `cleanup`
deletes them; the report shows the history as "attempts".
"""

from __future__ import annotations

import time
from typing import Any

from termtune.layout import RunLayout
from termtune.rundir import read_json, write_json


def read(layout: RunLayout) -> list[dict[str, Any]]:
    history = read_json(layout.history, [])
    return [e for e in history if isinstance(e, dict)] if isinstance(history, list) else []


def append(layout: RunLayout, stage: str, record: dict[str, Any], reasons: list[str]) -> None:
    """Keep `record` (a stage's completion record) as a replaced attempt (once, even when a replacement
    was interrupted and is started again)."""
    if any(e.get("stage") == stage and e.get("fingerprint") == record.get("fingerprint")
           and e.get("finished_at") == record.get("finished_at") for e in read(layout)):
        return
    entry = {"stage": stage, "finished_at": record.get("finished_at"),
             "replaced_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "replaced_because": reasons,
             "fingerprint": record.get("fingerprint"), "settings": record.get("inputs", {}).get("keys", {}),
             "git_commit": record.get("git_commit"), "result": record.get("result", {})}
    if stage == "deploy":
        deployed = read_json(layout.deploy, {})
        entry["deploy"] = deployed if isinstance(deployed, dict) else {}
        entry["live"] = bool(entry["deploy"].get("model_arn"))  # imported models stay until cleanup
    write_json(layout.history, read(layout) + [entry])


def forget(layout: RunLayout, stage: str, record: dict[str, Any]) -> None:
    """Drop the entry `append` made for `record`: the replacement failed and the result is current again."""
    history = read(layout)
    kept = [e for e in history if not (e.get("stage") == stage and e.get("fingerprint") == record.get("fingerprint")
                                       and e.get("finished_at") == record.get("finished_at"))]
    if len(kept) != len(history):
        write_json(layout.history, kept)


def live_imports(layout: RunLayout) -> list[dict[str, Any]]:
    """Deploy records of earlier attempts whose imported model has not been deleted."""
    return [e["deploy"] for e in read(layout) if e.get("stage") == "deploy" and e.get("live")]


def mark_deleted(layout: RunLayout, model_arns: set[str]) -> None:
    history = read(layout)
    for entry in history:
        if entry.get("stage") == "deploy" and entry.get("deploy", {}).get("model_arn") in model_arns:
            entry["live"] = False
    if history:
        write_json(layout.history, history)
