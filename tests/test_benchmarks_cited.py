"""What the code and docs cite from the benchmarks exists: every figure a plan constant attributes to BENCHMARKS.md
is in BENCHMARKS.md, and every `benchmarks/<script> --option` named anywhere is a script with that option."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
# A figure with its unit: "151.1 useful GFLOP/s", "46.6 s", "1.15x", "1.65×", "609 MiB", "84.6 %".
FIGURE = re.compile(r"(?<![\d.-])(\d+(?:\.\d+)?)\s*(?:useful\s+)?(GFLOP/s|GB/s|MiB|GiB|s\b|x\b|×|%)")
SCRIPT = re.compile(r"benchmarks/([a-z_]+\.(?:py|sh))((?:\s+--[a-z][a-z-]*)*)")


def cited_figures(text: str) -> list[str]:
    return [number for number, _unit in FIGURE.findall(text)]


def figure_in_benchmarks(number: str) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", BENCHMARKS) is not None


def plan_sources_citing_benchmarks() -> list[tuple[str, str]]:
    from termtune.plan import CONSTANTS

    return [(name, c.source) for name, c in CONSTANTS.items() if "BENCHMARKS.md" in c.source]


@pytest.mark.parametrize("name,source", plan_sources_citing_benchmarks())
def test_plan_constants_cite_figures_that_benchmarks_md_holds(name: str, source: str) -> None:
    cited = cited_figures(source.split("BENCHMARKS.md", 1)[1])
    assert cited, f"{name}: cites BENCHMARKS.md without a figure"
    missing = [n for n in cited if not figure_in_benchmarks(n)]
    assert not missing, f"{name} cites {missing} from BENCHMARKS.md, which does not hold them: {source}"


def test_the_checker_catches_a_figure_that_is_not_there() -> None:
    assert cited_figures("reached 144 useful GFLOP/s, 1.15x a plan, took 46.6 s") == ["144", "1.15", "46.6"]
    assert not figure_in_benchmarks("98765.4")


def named_scripts() -> list[tuple[str, str, str]]:
    """(where, script, options) for every `benchmarks/<script> [--option ...]` in the sources, docs and benchmarks."""
    files = [REPO / "BENCHMARKS.md", REPO / "README.md", *(REPO / "docs").glob("*.md"),
             *(REPO / "src").rglob("*.py"), *(REPO / "benchmarks").glob("*.*")]
    found = []
    for path in files:
        for script, options in SCRIPT.findall(path.read_text(encoding="utf-8")):
            found.append((str(path.relative_to(REPO)), script, options))
    return sorted(set(found))


def test_every_named_benchmark_script_and_option_exists() -> None:
    problems = []
    for where, script, options in named_scripts():
        path = REPO / "benchmarks" / script
        if not path.is_file():
            problems.append(f"{where}: benchmarks/{script} does not exist")
            continue
        text = path.read_text(encoding="utf-8")
        if script.endswith(".sh"):  # a wrapper: it tests some options itself and passes the rest to its scripts
            text += "".join((REPO / "benchmarks" / called).read_text(encoding="utf-8")
                            for called in set(re.findall(r"benchmarks/([a-z_]+\.py)", text)))
        for option in options.split():
            if f'"{option}"' not in text and f" {option} " not in text:  # argparse, or the wrapper's own test
                problems.append(f"{where}: benchmarks/{script} has no {option} option")
    assert named_scripts(), "no benchmark script is named anywhere: the pattern is wrong"
    assert not problems, "\n".join(problems)
