"""Write docs/api.md from the Python API's docstrings (tests/test_api.py checks it is current).

    python scripts/api_reference.py
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any, Callable

from termtune.config import attribute_docs

OUT = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def signature(fn: Callable[..., Any], name: str) -> str:
    """`name(param: type = default, ...) -> type`, annotations as written in the source."""
    sig = inspect.signature(fn)
    params = []
    star_done = False
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star_done:
            params.append("*")
            star_done = True
        text = ("**" if p.kind is p.VAR_KEYWORD else "") + p.name
        if p.annotation is not p.empty:
            text += f": {p.annotation}"
        if p.default is not p.empty:
            text += f" = {p.default!r}"
        params.append(text)
    returns = f" -> {sig.return_annotation}" if sig.return_annotation is not sig.empty else ""
    return f"{name}({', '.join(params)}){returns}"


def doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__ or "")


def function_section(fn: Callable[..., Any], qualified: str) -> list[str]:
    return [f"### `{qualified.rpartition('.')[2]}`", "", "```python", signature(fn, qualified), "```", "",
            _prose(doc(fn)), ""]


def class_section(cls: type, qualified: str) -> list[str]:
    lines = [f"### `{qualified}`", "", _prose(doc(cls)), ""]
    if dataclasses.is_dataclass(cls):
        notes = attribute_docs(cls)
        lines += ["| field | type | what it is |", "| --- | --- | --- |"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in (f"`{f.name}`", f"`{f.type}`",
                                                                             _escape(notes.get(f.name, ""))))
                  + " |" for f in dataclasses.fields(cls)]
        lines.append("")
    return lines


def _prose(text: str) -> str:
    """Docstring text as Markdown: an indented block after a blank line or "Example:" is a code
    block, one after "Raises:" a paragraph; `<run>` outside code stays visible (escaped)."""
    out: list[str] = []
    block: list[str] = []
    kind = ""

    def flush() -> None:
        if not block:
            return
        body = textwrap.dedent("\n".join(block)).strip("\n")
        if kind == "code":
            out.extend(["", "```", body, "```", ""])
        else:
            out.append(_escape(" ".join(body.split())))
        block.clear()

    for line in text.splitlines():
        if block and (line.startswith("    ") or not line.strip()):
            block.append(line)
            continue
        if line.startswith("    ") and (not out or out[-1] == "" or out[-1].endswith(":")):
            kind = "text" if out and out[-1] in ("Raises:", "Returns:") else "code"
            block.append(line)
            continue
        flush()
        out.append(_escape(line))
    flush()
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _escape(line: str) -> str:
    parts = line.split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;") for i, part in enumerate(parts))


def render() -> str:
    import termtune
    from termtune import api, local
    from termtune.aws.stage import DeployResult
    from termtune.data import PreparedData
    from termtune.evaluate import EvalReport
    from termtune.export import Artifact
    from termtune.train import TrainResult
    from termtune.validate import Check, Validation

    lines = [
        "# Python API",
        "",
        "Generated from the docstrings by `python scripts/api_reference.py`; a test fails when this page",
        "and the code differ. For a worked example, open `notebooks/walkthrough.ipynb`.",
        "",
        _prose(doc(api)),
        "",
        "## Functions",
        "",
    ]
    for name in termtune.API:
        lines += function_section(getattr(api, name), f"termtune.{name}")
    lines += ["## Results", "",
              "Each is a dataclass; `repr()` gives the lines the CLI prints (`summary()`), and `up_to_date` is",
              "True when the stage was up to date and the result was read back from the run directory.", ""]
    for cls in (PreparedData, api.DataPreview, TrainResult, EvalReport, Artifact, Validation, Check, DeployResult,
                api.Invocation, api.Cleanup, api.RunResult):
        lines += class_section(cls, f"{cls.__module__}.{cls.__qualname__}")
    lines += ["## Local stand-ins for AWS: `termtune.local`", "", _prose(doc(local)), ""]
    for fn in (local.local_aws, local.aws_variables, local.environment):
        lines += function_section(fn, f"termtune.local.{fn.__name__}")
    lines += class_section(local.LocalAWS, "termtune.local.LocalAWS")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT}")
