"""The stages by name, in the order they run: the one table the runner (termtune.pipeline), the Python API
(termtune.api) and the report read. What each stage does, reads and writes is in termtune.pipeline.

    data -> train -> evaluate -> export -> validate -> deploy -> invoke
"""

from __future__ import annotations

ORDER = ("data", "train", "evaluate", "export", "validate", "deploy", "invoke")

IN_AWS = ("deploy", "invoke")
"""The stages that reach AWS: `termtune run` runs them only when aws.deploy is true."""


def command_of(stage: str) -> str:
    """The termtune command that runs `stage` alone: `data prepare`, `train`, ..."""
    return "data prepare" if stage == "data" else stage
