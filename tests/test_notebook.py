"""notebooks/walkthrough.ipynb runs top to bottom (offline, local stand-ins for AWS) and is committed
without outputs."""

from __future__ import annotations

import json
import sys

from conftest import REPO, SHARED

NOTEBOOK = REPO / "notebooks" / "walkthrough.ipynb"


def test_the_walkthrough_is_committed_without_outputs():
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert len(code) > 10
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code), \
        "clear the notebook's outputs before committing (the executed copy belongs in runs/)"


def test_the_walkthrough_runs_top_to_bottom(tmp_path):
    """In a copy of the repository's layout (configs/ and ../shared linked), so its run directory is fresh."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from run_notebook import execute
    finally:
        sys.path.pop(0)
    checkout = tmp_path / "repo"
    checkout.mkdir()
    (checkout / "configs").symlink_to(REPO / "configs")
    (tmp_path / "shared").symlink_to(SHARED)
    executed = execute(NOTEBOOK, cwd=checkout, output=tmp_path / "executed.ipynb")  # a failing cell raises

    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # token lengths, loss curve
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "ROUGE-L" in html and "✓" in html  # the metrics table and the check list
    assert (checkout / "runs" / "walkthrough" / "invoke.json").is_file()
    deploy = json.loads((checkout / "runs" / "walkthrough" / "deploy.json").read_text())
    assert deploy["status"] == "deleted"  # cleanup ran against the stand-ins
