"""The stages by name, in the order they run: the one table the runner (termtune.pipeline), the Python API
(termtune.api) and the report read. What each stage does, reads and writes is in termtune.pipeline.

    data -> train -> evaluate -> export -> validate -> deploy -> invoke
"""

from __future__ import annotations

ORDER = ("data", "train", "evaluate", "export", "validate", "deploy", "invoke")

IN_AWS = ("deploy", "invoke")
"""The stages that reach AWS: `termtune run` runs them only when aws.deploy is true."""

LOCAL_ONLY = ORDER[ORDER.index("train") + 1:ORDER.index("deploy")]
"""The stages between train and deploy (evaluate, export, validate) need the adapter here: with
train.on=sagemaker the job exports and validates the artifact itself, and `termtune run` goes from
train to deploy."""


def command_of(stage: str) -> str:
    """The termtune command that runs `stage` alone: `data prepare`, `train`, ..."""
    return "data prepare" if stage == "data" else stage
