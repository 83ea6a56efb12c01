"""Execute a notebook top to bottom in a fresh kernel; a failing cell stops it and fails (exit 1).

    python scripts/run_notebook.py notebooks/walkthrough.ipynb --output runs/walkthrough.ipynb

The kernel starts in the notebook's folder, as Jupyter and VS Code start it. The notebook in the
repository stays without outputs (tests/test_notebook.py checks it); the executed copy, with every
table and plot, goes to --output. tests/test_notebook.py runs the same `execute` in CI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CELL_TIMEOUT_S = 900


def execute(notebook: Path, cwd: Path | None = None, output: Path | None = None, cells: int | None = None) -> object:
    """Run every cell (or the first `cells`) in a python3 kernel started in `cwd` (default: the notebook's
    folder, as Jupyter starts it); raises nbclient's CellExecutionError (with the cell and its traceback)
    at the first cell that fails."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    nb.cells = nb.cells[:cells]
    cwd = notebook.resolve().parent if cwd is None else cwd
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute()
    finally:
        if output is not None:  # also after a failure: the executed copy shows where it stopped
            output.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, output)
    return nb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--output", type=Path, help="where to write the executed copy")
    args = parser.parse_args()
    from nbclient.exceptions import CellExecutionError

    try:
        execute(args.notebook, output=args.output)
    except CellExecutionError as e:
        print(f"{args.notebook}: a cell failed:\n{e}", file=sys.stderr)
        return 1
    print(f"{args.notebook}: every cell ran" + (f"; executed copy: {args.output}" if args.output else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
