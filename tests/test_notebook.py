"""notebooks/walkthrough.ipynb runs top to bottom (offline, local stand-ins for AWS) and is committed
without outputs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from conftest import REPO, SHARED

NOTEBOOK = REPO / "notebooks" / "walkthrough.ipynb"


def test_the_walkthrough_is_committed_without_outputs():
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert len(code) > 10
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code), \
        "clear the notebook's outputs before committing (the executed copy belongs in runs/)"


def _execute():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from run_notebook import execute
    finally:
        sys.path.pop(0)
    return execute


def _checkout(tmp_path: Path) -> Path:
    """A copy of the repository's layout (the notebook in notebooks/, configs/ and ../shared linked), so the
    walkthrough's run directory is fresh."""
    checkout = tmp_path / "repo"
    (checkout / "notebooks").mkdir(parents=True)
    shutil.copy(NOTEBOOK, checkout / "notebooks" / NOTEBOOK.name)
    (checkout / "configs").symlink_to(REPO / "configs")
    (tmp_path / "shared").symlink_to(SHARED)
    return checkout


def test_the_config_is_found_where_jupyter_starts_the_kernel_and_from_the_root(tmp_path):
    """Jupyter and VS Code start the kernel in the notebook's folder; `make notebook` in the repository root."""
    checkout = _checkout(tmp_path)
    notebook = checkout / "notebooks" / NOTEBOOK.name
    for cwd in (checkout / "notebooks", checkout):
        nb = _execute()(notebook, cwd=cwd, cells=4)  # the introduction, finding the root, loading the config
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"]
        assert repr(checkout) in outputs[0]["data"]["text/plain"]  # the root it moved to
        assert "ModelConfig" in outputs[1]["data"]["text/plain"]  # the config it loaded


def test_the_walkthrough_runs_top_to_bottom(tmp_path):
    """Started as Jupyter starts it: the kernel in the notebook's folder."""
    checkout = _checkout(tmp_path)
    executed = _execute()(checkout / "notebooks" / NOTEBOOK.name, output=tmp_path / "executed.ipynb")  # a failing cell raises

    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # token lengths, loss curve
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "ROUGE-L" in html and "✓" in html  # the metrics table and the check list
    assert (checkout / "runs" / "walkthrough" / "invoke.json").is_file()
    assert not (checkout / "notebooks" / "runs").exists()  # the run directory is where the config says, at the root
    deploy = json.loads((checkout / "runs" / "walkthrough" / "deploy.json").read_text())
    assert deploy["status"] == "deleted"  # cleanup ran against the stand-ins
