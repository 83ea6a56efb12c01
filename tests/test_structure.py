"""The shape of the code: no import cycles among termtune's modules; every run-directory path documented; every
test runs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

SRC = REPO / "src" / "termtune"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """termtune modules `path` imports, at the top or inside functions (a lazy import is still a dependency).
    `from pkg import name` depends on pkg.name when that is a module, else on pkg."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
    return {m for m in found if m in modules and m != module_name(path)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_among_termtune_modules():
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    modules = set(files)
    graph = {name: imports_of(path, modules) for name, path in files.items()}
    assert graph["termtune.pipeline"] >= {"termtune.rundir", "termtune.layout"}  # the scan sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_low_level_run_directory_modules_import_no_stage():
    for low in ("rundir.py", "layout.py"):
        names = {n.split(".")[1] for n in imports_of(SRC / low, {module_name(p) for p in SRC.rglob("*.py")})}
        assert names <= {"errors", "config"}, (low, names)


def test_run_directory_page_names_every_layout_path():
    from termtune.layout import RunLayout

    page = (REPO / "docs" / "run-directory.md").read_text(encoding="utf-8")
    layout = RunLayout(root=Path("/r"), artifact=Path("/r/artifact"))
    named = [name for name, value in vars(RunLayout).items() if isinstance(value, property)]
    assert len(named) > 20
    for name in named:
        path = getattr(layout, name)
        shown = str(path.relative_to("/r"))
        assert f"`{name}`" in page and shown.split("/")[-1] in page, name
    for stage in ("data", "train", "evaluate"):
        assert f"provenance/{stage}.json" in page or "provenance/<stage>.json" in page


def test_every_test_runs_and_a_hung_test_fails():
    """pyproject's pytest settings: no marker deselects tests by default, a marker must be registered and each
    registered one is carried by a test, and pytest-timeout ends a test that hangs."""
    import re
    import tomllib

    options = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["pytest"]["ini_options"]
    addopts = options["addopts"].split()
    assert "--strict-markers" in addopts and not any(o == "-m" or o.startswith("-m") for o in addopts)
    assert options["timeout"] > 0
    builtin = {"parametrize", "skipif", "skip", "xfail", "usefixtures", "filterwarnings", "timeout"}
    carried = {name for path in (REPO / "tests").glob("*.py")
               for name in re.findall(r"pytest\.mark\.(\w+)", path.read_text(encoding="utf-8"))} - builtin
    registered = {line.split(":")[0].strip() for line in options.get("markers", [])}
    assert carried == registered, f"markers carried by tests {carried}, registered {registered}"


# What names one model family: outside its module, only the registry and the config's defaults may.
FAMILY_WORDS = re.compile(r"(?<![A-Za-z0-9])t5(?![0-9])|seq2seq|spiece|decoder[_ ]start", re.IGNORECASE)
FAMILY_NAMES_ALLOWED = {
    "families/__init__.py": ["from termtune.families.t5 import", "FAMILIES: tuple"],  # the registry
    # The default base model, and the default family's fp16 refusal, checked when a config loads: config.py
    # sits below the registry (every family imports it), so it cannot ask the family.
    "config.py": ['source: str = "google/flan-t5-large"', "fp16"],
    # The Bedrock stand-in's copy of AWS's documented lists (architectures, tokenizers, tokenizer.model's names).
    "serve_rules.py": ['"T5ForConditionalGeneration": (', 'SERVED_HERE = ("T5ForConditionalGeneration"', '("T5Tokenizer", "LlamaTokenizer"', 'SENTENCEPIECE = ('],
}
SHIPPED_CONFIG = re.compile(r"configs/flan-t5-[\w-]+\.yaml")  # an example naming a config file in configs/


def family_names_outside_their_module(src: Path) -> list[str]:
    found = []
    for path in sorted(src.rglob("*.py")):
        relative = path.relative_to(src).as_posix()
        if relative.startswith("families/") and relative != "families/__init__.py":
            continue  # a family's own module (families/base.py names none: the test below shows it)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            text = SHIPPED_CONFIG.sub("", line)
            if FAMILY_WORDS.search(text) and not any(ok in line for ok in FAMILY_NAMES_ALLOWED.get(relative, [])):
                found.append(f"{relative}:{number}: {line.strip()}")
    return found


def test_no_stage_names_a_model_family():
    """Stages ask the family (termtune.families) for what differs between models; only families/t5.py names T5."""
    assert family_names_outside_their_module(SRC) == []
    assert not FAMILY_WORDS.search((SRC / "families" / "base.py").read_text(encoding="utf-8"))


def test_the_family_name_check_finds_a_mention(tmp_path):
    (tmp_path / "families").mkdir()
    (tmp_path / "families" / "t5.py").write_text("T5 = 1\n")
    (tmp_path / "stage.py").write_text("x = 1\nfrom transformers import AutoModelForSeq2SeqLM\n# a Flan-T5 note\n")
    (tmp_path / "cli.py").write_text('"""termtune plan configs/flan-t5-large-medical.yaml"""\n')
    assert family_names_outside_their_module(tmp_path) == [
        "stage.py:2: from transformers import AutoModelForSeq2SeqLM", "stage.py:3: # a Flan-T5 note"]


# ----------------------------------------------------------------------------- one place for each fact


def private_names_used_across_modules() -> list[str]:
    """`from termtune.x import _name` and `x._name` on an imported termtune module, where _name is not a module."""
    modules = {module_name(p) for p in SRC.rglob("*.py")}
    found = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("termtune"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    imported[alias.asname or alias.name] = target
                    if alias.name.startswith("_") and target not in modules:
                        found.append(f"{path.name}: {target}")
            elif isinstance(node, ast.Import):
                imported.update({a.asname or a.name: a.name for a in node.names if a.name.startswith("termtune")})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_") \
                    and not node.attr.startswith("__") and imported.get(node.value.id) in modules:
                found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_reads_another_modules_private_names():
    """The plan reads the data through the data stage's public functions (read_examples), not its internals."""
    assert private_names_used_across_modules() == []


def test_the_prompt_template_is_filled_in_one_place():
    """Training, the plan, the export's check and invoke all ask data.prompt_for for a term's prompt."""
    fills = [f"{path.relative_to(SRC)}:{node.lineno}" for path in SRC.rglob("*.py")
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "replace"
             and any(isinstance(a, ast.Constant) and a.value == "{term}" for a in node.args)]
    assert len(fills) == 1 and fills[0].startswith("data.py"), fills


def stage_name_lists() -> list[str]:
    """Tuples, lists, sets and dict keys in the source made of three or more stage names."""
    from termtune.stages import ORDER

    found = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None) \
                if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else None
            names = [i for i in items or [] if isinstance(i, ast.Constant) and i.value in ORDER]
            if len(names) >= 3 and len(names) == len(items):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    return found


def test_the_stages_are_named_in_one_table():
    """termtune.stages holds the stage order; the runner's stages follow it, and the report and the API's read-back
    use it (before: a copy of the order in report.py, a table of stage names in api.py)."""
    from termtune import pipeline
    from termtune.stages import ORDER

    assert tuple(s.name for s in pipeline.STAGES) == ORDER and set(pipeline.BY_NAME) == set(ORDER)
    assert stage_name_lists() == ["stages.py:9"]
    assert all(s.read_back is not None for s in pipeline.STAGES if not s.always)


# ----------------------------------------------------------------------------- who prints

SHOWS_OUTPUT = {"cli.py", "events.py", "entry.py"}
"""The command line, the event sink that shows what library code reports (termtune.events), and the program a
SageMaker training job runs (termtune.remote.entry), whose output is the job's log."""


def printing_calls(path: Path) -> list[str]:
    """Imports of typer/click, print() calls and writes to sys.stdout / sys.stderr in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("typer", "click") for a in node.names) \
                or isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("typer", "click"):
            found.append(f"{path.name}:{node.lineno}: imports typer/click")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            found.append(f"{path.name}:{node.lineno}: print()")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("write") \
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr in ("stdout", "stderr") \
                and isinstance(node.func.value.value, ast.Name) and node.func.value.value.id == "sys":
            found.append(f"{path.name}:{node.lineno}: sys.{node.func.value.attr}.{node.func.attr}()")
    return found


def test_only_the_command_line_and_the_event_sink_print():
    """Library code (the runner, the stages, the AWS code, serve) reports through termtune.events.emit, so a
    notebook can show it its own way; the scan sees a print written inside a function, not one in a docstring."""
    found = [hit for path in sorted(SRC.rglob("*.py")) if path.name not in SHOWS_OUTPUT for hit in printing_calls(path)]
    assert found == []
    assert printing_calls(SRC / "cli.py") and printing_calls(SRC / "events.py")  # the scan sees them


def test_the_scan_sees_each_way_of_printing(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""print(x) in a docstring."""\nimport sys\n\n\ndef f():\n    from typer import echo\n'
                      '    print(1)\n    sys.stderr.write("x")\n    s = "print(2)"\n')
    assert printing_calls(module) == ["m.py:6: imports typer/click", "m.py:7: print()", "m.py:8: sys.stderr.write()"]
