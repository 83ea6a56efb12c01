"""The data stage on real MedQuAD rows and on crafted bad files."""

from __future__ import annotations

import csv
import json
import re
import unicodedata
from pathlib import Path

import pytest

from conftest import MEDQUAD, medquad_rows, tiny_overrides, write_jsonl
from termtune import data, pipeline
from termtune.config import load_config
from termtune.errors import UserError


def cfg_for(tmp_path: Path, source: Path | str, *extra: str):
    return load_config(None, tiny_overrides(tmp_path / "run", source) + list(extra))


def read_split(cfg, split):
    return _rows(cfg.run_dir / "data" / f"{split}.jsonl")


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- real data


def test_medquad_prepares_split_and_stats(tmp_path):
    cfg = cfg_for(tmp_path, MEDQUAD, "data.max_rows=300", "data.test_size=0.1")
    prepared = pipeline.run_stage(cfg, "data").result
    stats = json.loads((cfg.run_dir / "data" / "stats.json").read_text())
    for key in ("rows_read", "rows_used", "rows_skipped", "train_rows", "test_rows"):
        assert key in stats
    assert stats["rows_used"] == 300
    assert stats["train_rows"] + stats["test_rows"] == 300
    assert stats["test_rows"] == 30
    # MedQuAD repeats some terms across sites: they are counted, not silently dropped.
    assert stats["rows_read"] - stats["rows_used"] == stats["rows_skipped"]["duplicate_term"] > 0

    train, test = read_split(cfg, "train"), read_split(cfg, "test")
    assert {r["term"].casefold() for r in train}.isdisjoint({r["term"].casefold() for r in test})
    row = train[0]
    assert row["prompt"] == f"What is {row['term']}?"
    assert row["input_ids"][-1] == 1 and row["labels"][-1] == 1  # eos kept after truncation
    assert max(len(r["labels"]) for r in train + test) <= cfg.data.max_target_length
    assert 0 < stats["target_tokens"]["truncated_fraction"] < 1
    assert prepared.stats == stats
    assert (cfg.run_dir / "provenance" / "data.json").is_file()


def test_split_is_seeded_and_deterministic(tmp_path):
    a = cfg_for(tmp_path / "a", MEDQUAD, "data.max_rows=200")
    b = cfg_for(tmp_path / "b", MEDQUAD, "data.max_rows=200")
    c = cfg_for(tmp_path / "c", MEDQUAD, "data.max_rows=200", "run.seed=7")
    for cfg in (a, b, c):
        data.prepare(cfg)
    terms = lambda cfg: [r["term"] for r in read_split(cfg, "test")]  # noqa: E731
    assert terms(a) == terms(b)
    assert terms(a) != terms(c)


def test_split_keeps_a_term_on_one_side():
    examples = [{"term": t, "target": f"{t} defined, row {i}."}
                for i, t in enumerate(["Asthma", "asthma", "Gout", "Flu", "Mumps", "Rabies"] * 2)]
    for seed in range(10):
        train, test = data.split_by_term(examples, 2, seed)
        assert {e["term"].casefold() for e in train}.isdisjoint({e["term"].casefold() for e in test})
        assert 2 <= len(test) <= 4  # two rows, or the one group of four "asthma" rows


def looks_same(text: str) -> str:
    """What a reader would call the same text, written out independently of termtune's rule."""
    text = unicodedata.normalize("NFKC", text).translate(dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff")))
    return " ".join(text.casefold().split()).rstrip(".,;:!? ")


def fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def test_split_keeps_near_duplicate_terms_and_shared_definitions_on_one_side():
    pairs = [("Ménière disease", unicodedata.normalize("NFD", "Ménière disease")),  # composed / decomposed
             ("AIDS", fullwidth("AIDS")), ("Gout", "Go\u200but"), ("Asthma", "ASTHMA"), ("Rabies", "Rabies.")]
    examples = [{"term": t, "target": f"{t} is defined here ({i})."} for pair in pairs for i, t in enumerate(pair)]
    examples += [{"term": "Heart attack", "target": "Blood flow to the heart stops."},
                 {"term": "Myocardial infarction", "target": "Blood flow to the heart stops."}]
    examples += [{"term": f"Filler {i}", "target": f"Filler number {i}."} for i in range(20)]
    for seed in range(30):
        train, test = data.split_by_term(examples, 0.3, seed)
        for field in ("term", "target"):
            assert {looks_same(e[field]) for e in train}.isdisjoint({looks_same(e[field]) for e in test}), seed
    split = data.split_rows(examples, 0.3, 0)
    assert dict(split.merged) == {"term": 5, "definition": 1}
    assert len(split.test) == round(len(examples) * 0.3)


def _variants_of_real_rows(n: int) -> tuple[list[dict], list[dict]]:
    """n real rows with distinct terms and first sentences, and the ways users write the same term again."""
    base, terms, firsts = [], set(), set()
    for r in medquad_rows(200, seed=3):
        first = data.shape_target(data.normalize_whitespace(r["definition"]), "first_n_sentences", 1)
        if looks_same(r["term"]) not in terms and first not in firsts and r["term"].isascii():
            base.append(r)
            terms.add(looks_same(r["term"]))
            firsts.add(first)
    base = base[:n]
    variants = []
    for r in base:
        t = r["term"]
        variants += [{**r, "term": fullwidth(t)}, {**r, "term": t[0] + "\u200b" + t[1:]}, {**r, "term": t.upper()},
                     {**r, "term": t + "."}]
    return base, variants


def test_held_out_rows_are_unseen_in_training(tmp_path):
    base, variants = _variants_of_real_rows(30)
    synonyms = [{"term": "Heart attack", "definition": "Blood flow to the heart stops. More."},
                {"term": "Myocardial infarction", "definition": "Blood flow to the heart stops. Other text."},
                {"term": "Ménière disease", "definition": "An inner ear disorder."},
                {"term": unicodedata.normalize("NFD", "Ménière disease"), "definition": "An inner ear disorder."}]
    src = write_jsonl(tmp_path / "t.jsonl", base + variants + synonyms)
    prepared = data.prepare(cfg_for(tmp_path, src, "data.test_size=0.3"))
    stats = prepared.stats
    # Width, zero-width and case variants (and the decomposed é) are the same term: duplicates, skipped.
    assert stats["rows_skipped"] == {"duplicate_term": 3 * 30 + 1}
    assert stats["rows_used"] == 2 * 30 + 3
    # "Term." stays (a different string, maybe a different term) but on the side of "Term"; so do the synonyms.
    assert stats["split_merged"] == {"term": 30, "definition": 1}
    assert "31 near-duplicates kept on one side: 30 by term, 1 by definition" in prepared.summary()
    train, test = _rows(prepared.train_path), _rows(prepared.test_path)
    assert {r["target"] for r in train}.isdisjoint({r["target"] for r in test})
    assert {looks_same(r["term"]) for r in train}.isdisjoint({looks_same(r["term"]) for r in test})


def test_real_data_split_keeps_shared_definitions_on_one_side(tmp_path):
    # MedQuAD gives some related terms the same first sentence ("Hepatitis A", "Hepatitis B", ...).
    stats = data.prepare(cfg_for(tmp_path, MEDQUAD, "data.test_size=0.3")).stats
    assert stats["split_merged"]["definition"] > 50
    train, test = (_rows(tmp_path / "run" / "data" / f"{side}.jsonl") for side in ("train", "test"))
    assert {r["target"] for r in train}.isdisjoint({r["target"] for r in test})


def test_target_shaping_and_whitespace():
    text = "First   sentence here.  Second one!\n\n  Third\tpart? Fourth.\n"
    clean = data.normalize_whitespace(text)
    assert clean == "First sentence here. Second one!\nThird part? Fourth."
    assert data.shape_target(clean, "first_paragraph", 1) == "First sentence here. Second one!"
    assert data.shape_target(clean, "first_n_sentences", 3) == "First sentence here. Second one! Third part?"
    assert data.shape_target(clean, "full", 1) == "First sentence here. Second one! Third part? Fourth."


def test_target_starts_where_the_definition_does():
    # The shapes MedQuAD's source pages come in: a "Summary :" label, a "Key Points" list, a short heading line.
    assert data.shape_target("Summary : A1C is a blood test. It measures glucose.", "first_n_sentences", 1) == \
        "A1C is a blood test."
    key_points = data.normalize_whitespace("Key Points\n  - Hairy cell leukemia is a cancer of the blood (a type)\n"
                                           "  - Leukemia may affect red blood cells.\n\nHairy cell leukemia is …")
    first = "Hairy cell leukemia is a cancer of the blood (a type)"
    assert data.shape_target(key_points, "first_n_sentences", 1) == first
    assert data.shape_target(key_points, "first_n_sentences", 2) == \
        "Hairy cell leukemia is a cancer of the blood (a type) Leukemia may affect red blood cells."
    heading = data.normalize_whitespace("Espaol\n\n  Anemia is a condition. More text.")
    assert data.shape_target(heading, "first_paragraph", 1) == "Anemia is a condition. More text."
    assert data.shape_target(heading, "first_n_sentences", 1) == "Anemia is a condition."
    lower_case_line = data.normalize_whitespace("Inflammation of the joints\n\nCommon in older adults.")
    assert data.shape_target(lower_case_line, "first_paragraph", 1) == "Inflammation of the joints"
    # Only a heading: kept rather than emptied; an ordinary first sentence is untouched.
    assert data.shape_target("Frequently Asked Questions (FAQs)", "first_n_sentences", 1) == \
        "Frequently Asked Questions (FAQs)"
    assert data.shape_target("Gout is a form of arthritis - painful.", "first_n_sentences", 1) == \
        "Gout is a form of arthritis - painful."


def test_custom_prompt_template(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", medquad_rows(20))
    cfg = cfg_for(tmp_path, src, "data.prompt_template=Define the medical term: {term}", "data.test_size=2")
    data.prepare(cfg)
    assert read_split(cfg, "train")[0]["prompt"].startswith("Define the medical term: ")


# ----------------------------------------------------------------------------- formats and schemas


def _seed_schema(rows):
    return [{"page_title": r["term"], "page_text": r["definition"]} for r in rows]


def test_hub_layout_with_seed_schema_offline(tmp_path):
    """The Hub-id code path (datasets.load_dataset) on a local folder shaped like gamino/wiki_medical_terms."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "wiki_medical_terms"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(_seed_schema(medquad_rows(40))), repo / "data" / "train-00000-of-00001.parquet")
    cfg = cfg_for(tmp_path, repo, "data.test_size=4")
    prepared = data.prepare(cfg)
    assert prepared.stats["columns"] == {"term": "page_title", "definition": "page_text"}
    assert prepared.stats["train_rows"] + prepared.stats["test_rows"] == prepared.stats["rows_used"] > 30


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet", "jsonl"])
def test_local_formats_and_both_known_schemas(tmp_path, fmt):
    import pandas as pd

    rows = medquad_rows(30)
    for schema, frame in (("term", pd.DataFrame(rows)), ("page", pd.DataFrame(_seed_schema(rows)))):
        path = tmp_path / f"{schema}.{fmt}"
        {"csv": lambda p: frame.to_csv(p, index=False),
         "json": lambda p: frame.to_json(p, orient="records"),
         "jsonl": lambda p: frame.to_json(p, orient="records", lines=True),
         "parquet": lambda p: frame.to_parquet(p)}[fmt](path)
        cfg = cfg_for(tmp_path / schema, path, "data.test_size=3")
        stats = data.prepare(cfg).stats
        assert stats["rows_used"] == 30 - stats["rows_skipped"].get("duplicate_term", 0)
        assert stats["test_rows"] == 3


def test_explicit_column_mapping(tmp_path):
    rows = [{"name": r["term"], "text": r["definition"]} for r in medquad_rows(20)]
    src = write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(UserError, match="no term/definition columns found.*name, text"):
        data.prepare(cfg_for(tmp_path, src))
    cfg = cfg_for(tmp_path, src, "data.term_column=name", "data.definition_column=text", "data.test_size=2")
    assert data.prepare(cfg).stats["rows_used"] == 20
    with pytest.raises(UserError, match="missing column 'nope'"):
        data.prepare(cfg_for(tmp_path / "b", src, "data.term_column=nope", "data.definition_column=text"))


# ----------------------------------------------------------------------------- bad input


def _bad_jsonl(tmp_path: Path) -> Path:
    good = medquad_rows(12)
    lines = [json.dumps(r) for r in good]
    lines.insert(2, '{"term": "Broken", "definition": ')                       # line 3: unparsable
    lines.insert(4, json.dumps({"term": "   ", "definition": "x y"}))           # line 5: empty term
    lines.insert(6, json.dumps({"term": "Gout", "definition": "\t \n"}))        # line 7: empty definition
    lines.insert(8, json.dumps({"term": 42, "definition": "A number."}))        # line 9: wrong type
    lines.insert(10, json.dumps({"term": "Bell", "definition": "Ring\x07 bell"}))  # line 11: control char
    lines.append(json.dumps(good[0]))                                           # duplicate term
    lines.append(json.dumps({"term": "Long", "definition": "word " * 25_000}))  # overlong
    body = "\n".join(lines).encode() + b"\n" + b'{"term": "Caf\xe9", "definition": "bad bytes"}\n'
    path = tmp_path / "bad.jsonl"
    path.write_bytes(body)
    return path


def test_bad_rows_are_skipped_and_counted(tmp_path):
    src = _bad_jsonl(tmp_path)
    cfg = cfg_for(tmp_path, src, "data.test_size=2")
    stats = data.prepare(cfg).stats
    assert stats["rows_skipped"] == {
        "unparsable": 1, "empty_term": 1, "empty_definition": 1, "wrong_type": 1,
        "control_characters": 1, "duplicate_term": 1, "overlong": 1, "invalid_utf8": 1,
    }
    assert stats["rows_used"] == 12
    assert stats["skip_examples"]["unparsable"].startswith(f"{src}:3:")
    assert stats["skip_examples"]["invalid_utf8"].startswith(f"{src}:20:")


@pytest.mark.parametrize("line,reason", [(3, "not valid JSON"), (5, "empty or whitespace only")])
def test_strict_names_the_row_and_leaves_nothing(tmp_path, line, reason):
    src = _bad_jsonl(tmp_path)
    if line == 5:  # make line 3 good so the first finding is the empty term
        lines = src.read_bytes().split(b"\n")
        lines[2] = json.dumps({"term": "Fine", "definition": "Fine text."}).encode()
        src.write_bytes(b"\n".join(lines))
    cfg = cfg_for(tmp_path, src, "data.strict=true")
    with pytest.raises(UserError, match=f"^{src}:{line}: .*{reason}"):
        data.prepare(cfg)
    assert not cfg.run_dir.exists() or not any((cfg.run_dir).iterdir())


def test_duplicate_policy_error(tmp_path):
    rows = medquad_rows(10)
    src = write_jsonl(tmp_path / "d.jsonl", rows + [rows[3]])
    with pytest.raises(UserError, match=r"d.jsonl:11: duplicate term .* \(first at .*d.jsonl:4\)"):
        data.prepare(cfg_for(tmp_path, src, "data.duplicates=error"))


def test_csv_with_ragged_row_and_bad_utf8(tmp_path):
    rows = medquad_rows(8)
    text = "term,definition\n" + "".join(f'"{r["term"]}","{r["definition"][:80]}"\n' for r in rows)
    text += "only-one-field\n"
    src = tmp_path / "t.csv"
    src.write_text(text)
    stats = data.prepare(cfg_for(tmp_path, src, "data.test_size=2")).stats
    assert stats["rows_skipped"] == {"unparsable": 1}
    assert stats["skip_examples"]["unparsable"].startswith(f"{src}:10:")
    src.write_bytes(src.read_bytes() + b"\xff\xfe,x\n")
    with pytest.raises(UserError, match=r"t.csv:11: invalid UTF-8"):
        data.prepare(cfg_for(tmp_path / "b", src))


@pytest.mark.parametrize("content,message", [
    (None, "not found"),
    ("", "no usable rows"),
    ('{"term": "", "definition": ""}\n', r"no usable rows \(empty_term: 1\)"),
])
def test_unusable_sources(tmp_path, content, message):
    src = tmp_path / "in.jsonl"
    if content is not None:
        src.write_text(content)
    with pytest.raises(UserError, match=message):
        data.prepare(cfg_for(tmp_path, src))
    assert not (tmp_path / "run" / "data").exists()


def test_unsupported_extension_and_missing_hub_dataset(tmp_path):
    src = tmp_path / "terms.xlsx"
    src.write_text("x")
    with pytest.raises(UserError, match=r"unsupported file type '.xlsx'"):
        data.prepare(cfg_for(tmp_path, src))
    with pytest.raises(UserError, match="cannot load dataset 'nobody/no-such-dataset'"):
        data.prepare(cfg_for(tmp_path, "nobody/no-such-dataset"))


def test_existing_output_needs_force(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", medquad_rows(20))
    cfg = cfg_for(tmp_path, src, "data.test_size=2")
    data.prepare(cfg)
    before = (cfg.run_dir / "data" / "train.jsonl").read_text()
    with pytest.raises(UserError, match="already exists; pass --force"):
        data.prepare(cfg)
    cfg.run.seed = 1
    data.prepare(cfg, force=True)
    assert (cfg.run_dir / "data" / "train.jsonl").read_text() != before
    assert not [p for p in cfg.run_dir.iterdir() if p.name.startswith(".") and p.name != ".termtune.lock"]


def test_failed_force_keeps_old_output(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", medquad_rows(20))
    cfg = cfg_for(tmp_path, src, "data.test_size=2")
    data.prepare(cfg)
    before = (cfg.run_dir / "data" / "train.jsonl").read_text()
    cfg.data.source = str(tmp_path / "missing.jsonl")
    with pytest.raises(UserError):
        data.prepare(cfg, force=True)
    assert (cfg.run_dir / "data" / "train.jsonl").read_text() == before


# ----------------------------------------------------------------------------- readers that finish what they start


def _numbered_rows(n: int) -> list[dict]:
    return [{"term": f"Term {i}", "definition": f"Term {i} is thing number {i}."} for i in range(1, n + 1)]


def test_csv_field_over_the_csv_modules_limit_is_one_skipped_row(tmp_path):
    # The csv module's default limit is 131,072 characters a field; past it the read used to end as if the
    # file did. Here row 7's definition is 200,000 characters and row 9 has a long field nobody reads.
    rows = [{**r, "notes": ""} for r in _numbered_rows(61)]
    rows[6]["definition"] = "word " * 40_000
    rows[8]["notes"] = "n" * 150_000
    src = tmp_path / "t.csv"
    with src.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["term", "definition", "notes"])
        writer.writeheader()
        writer.writerows(rows)
    limit_before = csv.field_size_limit()
    stats = data.prepare(cfg_for(tmp_path, src)).stats
    assert (stats["rows_read"], stats["rows_used"], stats["rows_skipped"]) == (61, 60, {"overlong": 1})
    assert stats["skip_examples"]["overlong"].startswith(f"{src}:8: definition has 199999 characters")
    assert csv.field_size_limit() == limit_before  # the process-wide limit is put back


def test_parquet_is_read_only_as_far_as_max_rows_needs(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 200_000
    src = tmp_path / "many.parquet"
    pq.write_table(pa.table({"term": [f"Term {i}" for i in range(n)],
                             "definition": [f"Thing number {i}." for i in range(n)]}), src)
    decoded = []  # rows pyarrow turned into Python or Arrow memory, however the reader asked for them
    read_table, iter_batches = pq.read_table, pq.ParquetFile.iter_batches

    def counting_read_table(*args, **kwargs):
        table = read_table(*args, **kwargs)
        decoded.append(table.num_rows)
        return table

    def counting_iter_batches(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            decoded.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq, "read_table", counting_read_table)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting_iter_batches)
    stats = data.prepare(cfg_for(tmp_path, src, "data.max_rows=50")).stats
    assert stats["rows_used"] == 50
    assert 50 <= sum(decoded) <= n // 20  # a batch or two, not the file


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_a_utf8_bom_loses_no_row(tmp_path, fmt):
    import pandas as pd

    rows = _numbered_rows(20)
    frame = pd.DataFrame(rows)
    text = {"jsonl": lambda: "".join(json.dumps(r) + "\n" for r in rows),
            "json": lambda: json.dumps(rows),
            "csv": lambda: frame.to_csv(index=False)}[fmt]()
    src = tmp_path / f"bom.{fmt}"
    src.write_bytes(b"\xef\xbb\xbf" + text.encode())
    prepared = data.prepare(cfg_for(tmp_path, src))
    assert (prepared.stats["rows_used"], prepared.stats["rows_skipped"]) == (20, {})
    assert "Term 1" in {r["term"] for r in _rows(prepared.train_path) + _rows(prepared.test_path)}


NESTED = "[" * 100_000 + "]" * 100_000
HUGE_INT = "9" * 5000


@pytest.mark.parametrize("value,problem", [(NESTED, "nested too deeply"),
                                           (HUGE_INT, r"Exceeds the limit \(4300 digits\)")])
def test_json_python_cannot_hold_is_one_named_row_or_file(tmp_path, value, problem):
    lines = [json.dumps(r) for r in _numbered_rows(20)]
    lines.insert(2, '{"term": "Odd", "definition": ' + value + "}")
    src = tmp_path / "t.jsonl"
    src.write_text("\n".join(lines) + "\n")
    stats = data.prepare(cfg_for(tmp_path, src)).stats
    assert (stats["rows_used"], stats["rows_skipped"]) == (20, {"unparsable": 1})
    assert re.match(f"{re.escape(str(src))}:3: not valid JSON \\({problem}", stats["skip_examples"]["unparsable"])
    whole = tmp_path / "t.json"
    whole.write_text("[" + ",".join(lines) + "]")
    with pytest.raises(UserError, match=f"^{re.escape(str(whole))}: not valid JSON \\({problem}"):
        data.prepare(cfg_for(tmp_path / "b", whole))


@pytest.mark.parametrize("key", ["data.source", "run.dir"])
def test_a_nul_in_a_path_is_refused_by_name(tmp_path, key):
    section, name = key.split(".")
    config = tmp_path / "c.yaml"
    config.write_text(f'{section}:\n  {name}: "{tmp_path}/t\\0.jsonl"\n')
    with pytest.raises(UserError, match=f"^{re.escape(str(config))}: {key}: contains a NUL character$"):
        load_config(config)
