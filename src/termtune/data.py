"""The data stage: term/definition rows (or, for a model that trains on its chat template, conversations) in,
a seeded tokenized train/test split out.

    termtune data prepare configs/demo.yaml          # writes <run>/data/{train,test}.jsonl, stats.json
    termtune data inspect configs/demo.yaml --rows 5

Sources are a Hub dataset id (the seed recipe's `gamino/wiki_medical_terms`), a local folder
laid out like a Hub dataset, or a local .jsonl/.json/.csv/.parquet file. Its columns say what it
holds: term rows, chat data (`messages`) or prompt/completion data (termtune.conversations reads
the last two, which only a family with `chat_data` trains on). Each row is checked; a bad row is
skipped and counted by reason (or, with data.strict, is an error naming file and row). The output
is written to a temporary folder and renamed into place only when complete, so a failed run leaves
nothing behind.

Every prepared row is {term, prompt, target, input_ids, labels}: the term (for a conversation, its
first user turn: what the split keeps on one side), the question asked (the last user turn), the
answer, and the token ids the model reads and learns. For a chat-template family input_ids is the
rendered conversation up to the assistant's generation prompt and labels the answer with the
template's end-of-turn token; otherwise they are the family's `encode` of prompt and answer.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import random
import re
import unicodedata
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from termtune import conversations
from termtune.config import Config
from termtune.errors import UserError
from termtune.layout import RunLayout
from termtune.oserrors import probe_writable
from termtune.results import StageResult
from termtune.rowcheck import Findings, has_control_chars, text_key
from termtune.rundir import atomic_dir, read_json, write_json

# (term column, definition column) pairs recognised without any mapping.
KNOWN_SCHEMAS = (("term", "definition"), ("page_title", "page_text"))
LOCAL_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MAX_TERM_CHARS = 300  # longer "terms" are almost always a shifted column or a pasted paragraph
TERMS = "terms"
"""stats.json's source_kind for term/definition rows; conversations.source_kind names the others."""
KIND_WORDS = {"messages": ("chat data", "a messages column"),
              "prompt_completion": ("prompt/completion data", "prompt and completion columns")}
"""source_kind -> (what users call it, the columns that told)."""


@dataclass
class Row:
    """One source row as read, before validation. `where` names it for messages."""

    where: str
    values: dict[str, Any] | None = None
    problem: str | None = None  # a reading error (unparsable line, invalid UTF-8)


@dataclass(repr=False)
class PreparedData(StageResult):
    """What `termtune data prepare` wrote: the two splits and their stats."""

    train_path: Path
    test_path: Path
    stats: dict[str, Any]
    """The content of <run>/data/stats.json: the source and its kind (source_kind: terms, messages or
    prompt_completion), rows read/used/skipped, split sizes, near-duplicates kept on one side of the split
    (`split_merged`: by term, by definition), token lengths of each side before truncation (source_tokens: the
    prompts, target_tokens: the answers)."""

    def summary(self) -> str:
        return summary(self.stats)


# ----------------------------------------------------------------------------- entry points


def prepare(cfg: Config, force: bool = False) -> PreparedData:
    """Read, validate, clean, tokenize and split `cfg.data.source` into <run>/data.

    An existing data folder is replaced only with `force` (the runner passes it: it knows
    whether the folder is complete and made from these settings).
    """
    d = cfg.data
    layout = RunLayout.of(cfg)
    out_dir = layout.data
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists; pass --force to prepare the data again")
    probe_writable(layout.root)

    from termtune.families import family_for
    from termtune.modeling import load_tokenizer

    # --- read and validate
    family = family_for(cfg)
    source = read_source(cfg, family)
    label, kind, read = source.label, source.kind, source.read

    # --- tokenize: through the chat template, or as the family encodes a row
    tokenizer = load_tokenizer(cfg)
    lengths: dict[str, list[int]] = {"source": [], "target": []}
    rendering = Findings(strict=d.strict)
    if family.chat_data:
        rows = conversations.render_conversations(source.conversations, tokenizer, d.max_source_length,
                                                  d.max_target_length, rendering, lengths)
    else:
        rows = read.rows
        _tokenize(family, tokenizer, rows, d.max_source_length, d.max_target_length, lengths)

    # --- split by term (a conversation's first user turn), seeded
    split = split_rows(rows, d.test_size, cfg.run.seed)
    if not split.train or not split.test:
        raise UserError(f"{label}: {len(rows)} usable rows cannot be split with data.test_size={d.test_size}")

    # --- save
    stats = {
        "source": label,
        "source_kind": kind,
        **({"columns": {"term": read.columns[0], "definition": read.columns[1]}} if kind == TERMS else {}),
        "rows_read": read.rows_read,
        "rows_used": len(rows),
        "rows_skipped": dict(read.skipped + rendering.skipped),
        "skip_examples": {**read.skip_examples, **rendering.examples},
        "train_rows": len(split.train),
        "test_rows": len(split.test),
        "split_merged": {"term": split.merged["term"], "definition": split.merged["definition"]},
        "seed": cfg.run.seed,
        **({"target": d.target, "prompt_template": d.prompt_template} if kind == TERMS else {}),
        **({"chat_template": cfg.tokenizer_source, "template_variables": conversations.TEMPLATE_VARIABLES}
           if family.chat_data else {}),
        "max_source_length": d.max_source_length,
        "max_target_length": d.max_target_length,
        "source_tokens": length_stats(lengths["source"], d.max_source_length),
        "target_tokens": length_stats(lengths["target"], d.max_target_length),
    }
    with atomic_dir(out_dir, force=force) as tmp:
        _write_jsonl(tmp / layout.split("train").name, split.train)
        _write_jsonl(tmp / layout.split("test").name, split.test)
        write_json(tmp / layout.stats.name, stats)
    return PreparedData(layout.split("train"), layout.split("test"), stats)


@dataclass
class Source:
    """A source read and checked as the data stage reads it, before tokenizing."""

    label: str
    kind: str
    """TERMS, or conversations.source_kind's name for a chat or prompt/completion source."""
    read: Any
    """The reader's result: Examples (term rows) or conversations.Conversations."""
    conversations: list[Any]
    """For a family that trains on chat data: every usable row as a conversation (term rows as one question)."""


def read_source(cfg: Config, family: Any, lenient: bool = False) -> Source:
    """Open `data.source`, tell its kind from its columns (columns named in the config are term rows whatever else
    the source holds), refuse a chat source for a family that trains on term rows only, and read it. `lenient`
    (the plan's estimate) counts every finding and raises none."""
    d = cfg.data
    opened = open_source(d.source, d.hub_split, d.revision)
    label, columns, _ = opened
    kind = TERMS if d.term_column or d.definition_column else conversations.source_kind(columns) or TERMS
    if kind != TERMS and not family.chat_data:
        what, columns_that_told = KIND_WORDS[kind]
        raise UserError(f"{label}: {what} ({columns_that_told}) needs a model that trains on its chat template "
                        f"(Llama, Qwen, Mistral); {family.display_name} trains on term/definition rows only")
    if kind == TERMS:
        read = read_examples(cfg, lenient=lenient, opened=opened)
        items = conversations.term_conversations(read.rows, label) if family.chat_data else []
    else:
        read = conversations.read_conversations(opened, strict=d.strict and not lenient, max_chars=d.max_chars,
                                                max_rows=d.max_rows, duplicates="keep_first" if lenient
                                                else d.duplicates)
        items = read.items
    return Source(label, kind, read, items)


@dataclass
class Examples:
    """The usable rows of a source, as the data stage splits them."""

    label: str
    """The source as messages name it."""
    columns: tuple[str, str]
    """The term and definition columns used."""
    rows_read: int
    rows: list[dict[str, str]]
    """term, target (the shaped definition) and prompt of each usable row, in source order."""
    skipped: Counter
    """Rows skipped, by reason."""
    skip_examples: dict[str, str]
    """The first skipped row of each reason: where it is and why."""


def read_examples(cfg: Config, lenient: bool = False,
                  opened: tuple[str, list[str], Iterator[Row]] | None = None) -> Examples:
    """Read `data.source` (or the `open_source` of it already opened) and keep its usable rows, at most
    data.max_rows: each row checked, duplicate terms dropped (by text_key), the definition shaped into the
    target, the prompt made. A bad row is skipped and counted; with data.strict it is an error, as is a
    duplicate with data.duplicates=error. `lenient` (the plan's estimate) counts every finding and raises
    none. A source with no usable row is an error."""
    d = cfg.data
    label, columns, rows = opened or open_source(d.source, d.hub_split, d.revision)
    term_col, def_col = _pick_columns(label, columns, d.term_column, d.definition_column)
    findings = Findings(strict=d.strict and not lenient)
    examples: list[dict[str, str]] = []
    seen: dict[str, tuple[str, str]] = {}  # term key -> (where, term) of its first row
    rows_read = 0
    for row in rows:
        rows_read += 1
        example = _check_row(row, term_col, def_col, d.max_chars, findings)
        if example is None:
            continue
        key = text_key(example["term"])  # "Café" composed or decomposed, "ＡＩＤＳ" and "aids" are one term
        if key in seen:
            first_where, first_term = seen[key]
            duplicate = f"duplicate term {example['term']!r} (first at {first_where}" + \
                (f" as {first_term!r})" if first_term != example["term"] else ")")
            if d.duplicates == "error" and not lenient:
                raise UserError(f"{row.where}: {duplicate}; remove it or set data.duplicates=keep_first")
            findings.add("duplicate_term", row.where, duplicate)
            continue
        seen[key] = (row.where, example["term"])
        example["target"] = shape_target(example.pop("definition"), d.target, d.n_sentences)
        if not example["target"]:
            findings.add("empty_definition", row.where, "definition is empty after shaping")
            continue
        example["prompt"] = prompt_for(d.prompt_template, example["term"])
        examples.append(example)
        if d.max_rows and len(examples) >= d.max_rows:
            break
    if not examples:
        reasons = ", ".join(f"{k}: {v}" for k, v in findings.skipped.items()) or "no rows"
        raise UserError(f"{label}: no usable rows ({reasons})")
    return Examples(label, (term_col, def_col), rows_read, examples, findings.skipped, findings.examples)


def prompt_for(template: str, term: str) -> str:
    """What the model is asked about `term`: data.prompt_template with {term} filled in. Training, the plan,
    the export's Bedrock check and `termtune invoke` all ask through this one function."""
    return template.replace("{term}", term)


def load_split(cfg: Config, split: str) -> "Any":
    """The prepared `train` or `test` split as a `datasets.Dataset`."""
    from datasets import Dataset

    path = RunLayout.of(cfg).split(split)
    if not path.is_file():
        raise UserError(f"{path} not found: run `termtune data prepare` first")
    with path.open(encoding="utf-8") as f:
        return Dataset.from_list([json.loads(line) for line in f])


def inspect(cfg: Config, rows: int = 3) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Stats and the first `rows` training examples of a prepared run."""
    layout = RunLayout.of(cfg)
    stats = read_json(layout.stats)
    if not isinstance(stats, dict):
        raise UserError(f"{layout.stats} not found: run `termtune data prepare` first")
    examples = []
    with layout.split("train").open(encoding="utf-8") as f:
        for line, _ in zip(f, range(rows)):
            examples.append(json.loads(line))
    return stats, examples


def summary(stats: dict[str, Any]) -> str:
    skipped = stats["rows_skipped"]
    kind = stats.get("source_kind", TERMS)
    lines = [
        f"data: {stats['source']}" + (f" ({KIND_WORDS[kind][0]})" if kind in KIND_WORDS else ""),
        f"  rows read {stats['rows_read']}, used {stats['rows_used']}, skipped {sum(skipped.values())}"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))})" if skipped else ""),
        f"  split: {stats['train_rows']} train / {stats['test_rows']} test (seed {stats['seed']}, "
        + ("by first user turn" if kind in KIND_WORDS else "by term") + _merged_note(stats.get("split_merged", {}))
        + ")",
    ]
    # Through a chat template the source side is the rendered prompt, cut from its start, and the target side the
    # answer with its end-of-turn token.
    names = {"source": "prompt", "target": "answer"} if "chat_template" in stats else {}
    for side in ("source", "target"):
        t = stats[f"{side}_tokens"]
        lines.append(f"  {names.get(side, side)} tokens: p50 {t['p50']}, p95 {t['p95']}, max {t['max']}; "
                     f"{t['truncated_fraction']:.1%} truncated at {t['limit']}")
    for reason, example in stats.get("skip_examples", {}).items():
        lines.append(f"  first {reason}: {example}")
    return "\n".join(lines)


def _merged_note(merged: dict[str, int]) -> str:
    total = sum(merged.values())
    return f"; {total} near-duplicates kept on one side: {merged['term']} by term, " \
        f"{merged['definition']} by definition" if total else ""


# ----------------------------------------------------------------------------- reading


def open_source(source: str, hub_split: str, revision: str | None) -> tuple[str, list[str], Iterator[Row]]:
    """(label for messages, column names, row iterator) for a file, a folder or a Hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        fmt = LOCAL_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise UserError(f"{source}: unsupported file type {path.suffix!r} (use .jsonl, .json, .csv or .parquet)")
        return str(path), *_READERS[fmt](path)
    looks_local = source.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_FORMATS
    if looks_local and not path.exists():
        raise UserError(f"data.source: {source} not found")
    return _open_hub(source, hub_split, revision)


def _open_hub(source: str, hub_split: str, revision: str | None) -> tuple[str, list[str], Iterator[Row]]:
    """A Hub dataset id, or a local folder with the same layout (what the Hub would download)."""
    from datasets import load_dataset

    try:
        ds = load_dataset(source, split=hub_split, revision=revision)
    except Exception as e:  # datasets raises many types: missing repo, offline, bad split
        raise UserError(f"data.source: cannot load dataset {source!r} (split {hub_split!r}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    label = f"{source}[{hub_split}]"

    def rows() -> Iterator[Row]:
        for i, values in enumerate(ds, start=1):
            yield Row(f"{label} row {i}", values=values)

    return label, list(ds.column_names), rows()


def _loads(text: str | bytes) -> Any:
    """json.loads whose every failure is a ValueError with a one-line message."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{e.msg}, " + (f"line {e.lineno} " if e.lineno > 1 else "") + f"column {e.colno}") from None
    except RecursionError:  # e.g. 100,000 nested lists
        raise ValueError("nested too deeply") from None
    except ValueError as e:  # a number past Python's int-string conversion limit (4,300 digits)
        raise ValueError(str(e).split(";")[0]) from None


def _read_jsonl(path: Path) -> tuple[list[str], Iterator[Row]]:
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # a BOM (Windows editors) is not part of row 1
    lines = data.split(b"\n")
    columns: list[str] = []
    for raw in lines:  # columns come from the first parsable object
        try:
            obj = _loads(raw)
        except ValueError:
            continue
        if isinstance(obj, dict):
            columns = list(obj)
            break

    def rows() -> Iterator[Row]:
        for n, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Row(where, problem=f"invalid_utf8:invalid UTF-8 at byte {e.start}")
                continue
            try:
                obj = _loads(text)
            except ValueError as e:
                yield Row(where, problem=f"unparsable:not valid JSON ({e})")
                continue
            if not isinstance(obj, dict):
                yield Row(where, problem=f"unparsable:expected a JSON object, got {type(obj).__name__}")
                continue
            yield Row(where, values=obj)

    return columns, rows()


def _read_json(path: Path) -> tuple[list[str], Iterator[Row]]:
    try:
        data = _loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: invalid UTF-8 at byte {e.start}") from e
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, dict):  # {"data": [...]} or {"rows": [...]}: take the one list of objects
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects (or JSON Lines in a .jsonl file)")
    columns = list(next((x for x in data if isinstance(x, dict)), {}))

    def rows() -> Iterator[Row]:
        for n, obj in enumerate(data, start=1):
            where = f"{path} item {n}"
            if isinstance(obj, dict):
                yield Row(where, values=obj)
            else:
                yield Row(where, problem=f"unparsable:expected an object, got {type(obj).__name__}")

    return columns, rows()


@contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """Let the csv module read fields up to `limit` characters, for the duration (the limit is process-wide)."""
    before = csv.field_size_limit(max(limit, csv.field_size_limit()))
    try:
        yield
    finally:
        csv.field_size_limit(before)


def _read_csv(path: Path) -> tuple[list[str], Iterator[Row]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: invalid UTF-8 at byte {e.start}") from e
    # The csv module stops at a field over 131,072 characters (its default limit). The text is in memory
    # already, so no field can be longer than it: with that as the limit every row is read, and an
    # over-long value is found and skipped by the row checks (data.max_chars) like any other.
    field_limit = len(text) + 1
    with _csv_field_limit(field_limit):
        header = next(csv.reader(io.StringIO(text, newline="")), None)
    if not header:
        raise UserError(f"{path}: empty CSV file (a header row is needed)")

    def rows() -> Iterator[Row]:
        with _csv_field_limit(field_limit):
            reader = csv.reader(io.StringIO(text, newline=""))
            next(reader)
            line = reader.line_num
            try:
                for record in reader:
                    where, line = f"{path}:{line + 1}", reader.line_num
                    if not any(cell.strip() for cell in record):
                        continue
                    if len(record) != len(header):
                        yield Row(where, problem=f"unparsable:{len(record)} fields, the header has {len(header)}")
                        continue
                    yield Row(where, values=dict(zip(header, record)))
            except csv.Error as e:  # the reader cannot go on past this point: say so rather than stop short
                raise UserError(f"{path}:{reader.line_num}: cannot read on ({e})") from e

    return header, rows()


PARQUET_BATCH_ROWS = 1024


def _read_parquet(path: Path) -> tuple[list[str], Iterator[Row]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise UserError(f"{path}: not a readable parquet file ({e})") from e

    def rows() -> Iterator[Row]:
        # In batches: a small file can expand to millions of rows, and data.max_rows stops the reading early.
        n = 0
        try:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                for values in batch.to_pylist():
                    n += 1
                    yield Row(f"{path} row {n}", values=values)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: not a readable parquet file after row {n} ({e})") from e

    return parquet.schema_arrow.names, rows()


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}


def _pick_columns(label: str, columns: list[str], term_col: str | None, def_col: str | None) -> tuple[str, str]:
    if not columns:
        raise UserError(f"{label}: no usable rows (the source holds no records)")
    if term_col or def_col:
        pair = (term_col or "term", def_col or "definition")
        missing = [c for c in pair if c not in columns]
        if missing:
            raise UserError(f"{label}: missing column {missing[0]!r} (columns: {', '.join(columns) or 'none'})")
        return pair
    for pair in KNOWN_SCHEMAS:
        if all(c in columns for c in pair):
            return pair
    raise UserError(f"{label}: no term/definition columns found (columns: {', '.join(columns) or 'none'}); "
                    "set data.term_column and data.definition_column")


# ----------------------------------------------------------------------------- validation and cleaning


def _check_row(row: Row, term_col: str, def_col: str, max_chars: int, findings: Findings) -> dict[str, str] | None:
    """A clean {"term", "definition"} or None (the finding is counted or raised)."""
    if row.problem:
        reason, _, detail = row.problem.partition(":")
        findings.add(reason, row.where, detail)
        return None
    assert row.values is not None
    out = {}
    for name, column, limit in (("term", term_col, MAX_TERM_CHARS), ("definition", def_col, max_chars)):
        value = row.values.get(column)
        if value is None:
            findings.add(f"empty_{name}", row.where, f"{column} is missing or null")
            return None
        if not isinstance(value, str):
            findings.add("wrong_type", row.where, f"{column} is a {type(value).__name__}, expected text")
            return None
        if has_control_chars(value):
            findings.add("control_characters", row.where, f"{column} contains control characters")
            return None
        value = normalize_whitespace(value)
        if not value:
            findings.add(f"empty_{name}", row.where, f"{column} is empty or whitespace only")
            return None
        if len(value) > limit:
            findings.add("overlong", row.where, f"{column} has {len(value)} characters (limit {limit})")
            return None
        out[name] = value if name == "definition" else " ".join(value.split())
    return out


# Part of the data stage's inputs: a run whose data was shaped by an older rule shapes it again.
TARGET_SHAPING = 2  # 2: a leading heading is dropped and a bullet starts a sentence
# Also part of them: which rows are read and kept, and how they are split. 2: terms that differ only in Unicode
# form, width or zero-width characters are one term (for the split, trailing punctuation too); rows with one
# definition share a side; a BOM or a CSV field over 131,072 characters no longer loses rows. 3: rows rendered
# through a chat template are tokenized and cut by termtune.conversations (a long prompt keeps its end), and a
# row the template cannot render is a counted bad row.
ROWS_AND_SPLIT = 3
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
# Source pages open with a heading that is not part of the definition: a label ("Summary : Anemia is …" on
# MedlinePlus, "Key Points - Adult acute … - Leukemia may …" on NCI) or a short title-case line of its own
# ("Espaol", "Frequently Asked Questions (FAQs)"). A short first line in lower case ("Inflammation of the joints")
# is a definition and stays.
_LABEL = re.compile(r"^(?:Summary\s*:|Key Points\b)\s*")
_TITLE_LINE = re.compile(r"^([^\n.!?:]{1,60})\n\s*")
# A bullet ("- Leukemia may …") starts a sentence even when the previous item has no full stop.
_BULLET = re.compile(r"(?:^|\s+)-\s+(?=[\"'(\[]?[A-Z0-9])")


def normalize_whitespace(text: str) -> str:
    """Collapse runs of spaces/tabs/newlines inside paragraphs; keep paragraph breaks as one newline."""
    paragraphs = (" ".join(p.split()) for p in _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n")))
    return "\n".join(p for p in paragraphs if p)


def _drop_heading(definition: str) -> str:
    label = _LABEL.match(definition)
    if label:
        return definition[label.end():] or definition
    line = _TITLE_LINE.match(definition)
    title_case = line is not None and all(not w[0].islower() for w in line.group(1).split() if len(w) > 3)
    return definition[line.end():] if title_case else definition


def shape_target(definition: str, mode: str, n_sentences: int) -> str:
    """The training target: the whole definition, its first paragraph, or its first n sentences.

    A leading heading is dropped first, so the target starts where the definition does.
    """
    definition = _drop_heading(definition)
    if mode == "first_paragraph":
        return definition.split("\n", 1)[0]
    flat = " ".join(definition.split())
    if mode == "first_n_sentences":
        sentences = [s for part in _BULLET.split(flat) for s in _SENTENCE_END.split(part) if s]
        return " ".join(sentences[:n_sentences])
    return flat


# ----------------------------------------------------------------------------- split and tokenize


def split_key(text: str) -> str:
    """`text_key` without trailing punctuation: "Asthma." and "asthma" are one term to the split.

    Broader than the duplicate check on purpose ("C" and "C#" are two terms, yet share a side): keeping
    two rows on one side costs nothing, letting one row's text into the other side costs the held-out test.
    """
    key = text_key(text)
    end = len(key)
    while end and (unicodedata.category(key[end - 1]).startswith("P") or key[end - 1] == " "):
        end -= 1
    return key[:end] or key


def same_side_groups(examples: list[dict]) -> tuple[list[list[dict]], Counter]:
    """The examples in groups that must land on the same side of the split, and how many were merged.

    Rows share a group when their terms share a `split_key` or their targets do (synonyms often share a
    definition word for word, e.g. MedQuAD's "Hepatitis A" and "Hepatitis B"); a chain of such links joins
    groups too. The count says by which link: {"term": n, "definition": m}, each a row joined to another.
    """
    parent = list(range(len(examples)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[tuple[str, str], int] = {}
    merged: Counter = Counter()
    for i, ex in enumerate(examples):
        for link, text in (("term", ex["term"]), ("definition", ex["target"])):
            a, b = root(i), root(first_with.setdefault((link, split_key(text)), i))
            if a != b:
                parent[a] = b
                merged[link] += 1
    groups: dict[int, list[dict]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(root(i), []).append(ex)
    return list(groups.values()), merged


@dataclass
class Split:
    train: list[dict]
    test: list[dict]
    merged: Counter
    """Rows kept on one side with another row: {"term": n, "definition": m} (see `same_side_groups`)."""


def split_rows(examples: list[dict], test_size: float, seed: int) -> Split:
    """Seeded, deterministic split in which a term, its near-duplicates and its definition stay on one side.

    Groups are sorted (by their smallest term key) before shuffling so the split depends only on the rows
    and the seed, not on the order they arrived in. Groups are held out in shuffled order while they fit
    in the held-out share (a group too big to fit stays in training); each side keeps the rows' order.
    """
    groups, merged = same_side_groups(examples)
    n_test = int(test_size) if test_size >= 1 else max(1, round(len(examples) * test_size))
    groups.sort(key=lambda g: min(split_key(ex["term"]) for ex in g))
    random.Random(seed).shuffle(groups)
    held_out: set[int] = set()
    for group in groups:
        if len(held_out) >= n_test:
            break
        if len(held_out) + len(group) <= n_test or not held_out:
            held_out.update(id(ex) for ex in group)
    return Split([ex for ex in examples if id(ex) not in held_out], [ex for ex in examples if id(ex) in held_out],
                 merged)


def split_by_term(examples: list[dict], test_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test) of `split_rows`."""
    split = split_rows(examples, test_size, seed)
    return split.train, split.test


def _tokenize(family: Any, tokenizer: Any, rows: list[dict], max_source: int, max_target: int,
              lengths: dict[str, list[int]]) -> None:
    """Add input_ids / labels (as the model family encodes a row; truncated, eos kept) and record the
    untruncated lengths. For a family without chat_data (a chat template's rows: termtune.conversations)."""
    sources, targets = family.encode(tokenizer, [r["prompt"] for r in rows], [r["target"] for r in rows])
    for row, src, tgt in zip(rows, sources, targets):
        lengths["source"].append(len(src))
        lengths["target"].append(len(tgt))
        row["input_ids"] = _truncate(src, max_source, tokenizer.eos_token_id)
        row["labels"] = _truncate(tgt, max_target, tokenizer.eos_token_id)


def _truncate(ids: list[int], limit: int, eos: int) -> list[int]:
    # Same as the tokenizer's own truncation: cut, then end with eos so the model learns to stop.
    return ids if len(ids) <= limit else ids[: limit - 1] + [eos]


def length_stats(lengths: list[int], limit: int) -> dict[str, Any]:
    ordered = sorted(lengths)

    def pct(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    return {
        "limit": limit,
        "mean": round(sum(ordered) / len(ordered), 1),
        "p50": pct(50), "p90": pct(90), "p95": pct(95), "p99": pct(99), "max": ordered[-1],
        "truncated_fraction": round(sum(1 for n in ordered if n > limit) / len(ordered), 4),
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in ("term", "prompt", "target", "input_ids", "labels")},
                               ensure_ascii=False) + "\n")
