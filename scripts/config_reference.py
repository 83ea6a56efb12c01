"""Write docs/config-reference.md from the typed config (tests/test_config.py checks it is current).

    python scripts/config_reference.py
"""

from pathlib import Path

from termtune.config import field_docs

OUT = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"


def render() -> str:
    lines = [
        "# Config reference",
        "",
        "Every key of the one typed config (`src/termtune/config.py`), generated from it by",
        "`python scripts/config_reference.py`. Set keys in a YAML file (see `configs/`) or on the",
        "command line as dotted overrides: `termtune train configs/demo.yaml train.learning_rate=3e-4`.",
        "Unknown keys are errors with a did-you-mean.",
        "",
        "| key | type | default | what it does |",
        "| --- | --- | --- | --- |",
    ]
    for key, type_name, default, doc in field_docs():
        cells = [f"`{key}`", type_name, f"`{default}`", doc]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT}")
