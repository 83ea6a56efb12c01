"""The run report: built from whatever the run directory holds, escaped, and rendered by a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from termtune.config import load_config
from termtune.report import PROBLEM_NOTE, write_report

CHECKS = [
    {"number": 1, "name": "architecture", "ok": True, "message": "T5ForConditionalGeneration", "warning": False},
    {"number": 2, "name": "num_heads", "ok": False, "message": "6 is not a multiple of 4", "warning": False},
    {"number": 3, "name": "size", "ok": False, "message": "close to the limit", "warning": True}]
HOSTILE = '<script>alert("x")</script> & <b>bold</b>'


def make_cfg(run_dir: Path):
    return load_config(None, [f"run.dir={run_dir}"])


def populate_run(run: Path, n_predictions: int = 12) -> None:
    """A run directory as the stages leave it after export, validate, deploy and invoke."""
    from termtune.config import dump_config

    cfg = make_cfg(run)
    (run / "provenance").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    for stage, t in (("data", "10:00"), ("train", "10:05"), ("evaluate", "10:07")):
        (run / "provenance" / f"{stage}.json").write_text(json.dumps(
            {"stage": stage, "finished_at": f"2026-01-01T{t}:00", "git_commit": "abc123"}))
    (run / "data").mkdir()
    (run / "data" / "stats.json").write_text(json.dumps({
        "source": "terms.jsonl", "rows_read": 100, "rows_used": 90,
        "rows_skipped": {"empty_definition": 6, "duplicate_term": 4}, "train_rows": 80, "test_rows": 10,
        "seed": 42,
        "source_tokens": {"limit": 128, "mean": 8.5, "p50": 8, "p90": 11, "p95": 12, "p99": 14, "max": 15},
        "target_tokens": {"limit": 64, "mean": 40.2, "p50": 39, "p90": 60, "p95": 64, "p99": 64, "max": 64},
    }))
    (run / "train").mkdir()
    events = [{"step": s, "epoch": s / 10, "loss": 5.0 / (1 + s / 5), "learning_rate": 1e-3} for s in range(2, 41, 2)]
    events += [{"step": s, "eval_loss": 5.5 / (1 + s / 6)} for s in (10, 20, 30, 40)]
    (run / "train" / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"step": 4')
    (run / "train" / "result.json").write_text(json.dumps({"steps": 40, "train_loss": 0.55, "eval_loss": 0.71}))
    (run / "eval").mkdir()
    metric = {"rouge1": 0.41, "rouge2": 0.2, "rougeL": 0.35, "bleu": 12.3, "chrf": 38.0, "mean_length": 40.1,
              "median_length": 39.0, "empty_share": 0.0, "cut_share": 0.1}
    base = {k: v / 4 for k, v in metric.items()}
    (run / "eval" / "metrics.json").write_text(json.dumps(
        {"base": base, "tuned": metric, "n": 10, "decoding": {"max_new_tokens": 64, "num_beams": 1}}))
    rows = [{"term": f"Term {i}" if i else HOSTILE, "prompt": f"What is Term {i}?",
             "reference": f"Term {i} is a condition of the body. " * 3, "base": "a a a", "tuned": f"Term {i} is a."}
            for i in range(n_predictions)]
    rows[1]["reference"] = "long " * 200
    (run / "eval" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "artifact").mkdir()
    (run / "artifact" / "manifest.json").write_text(json.dumps({"dtype": "bfloat16", "files": [
        {"path": "model.safetensors", "size": 123456789, "sha256": "f" * 64},
        {"path": "config.json", "size": 812, "sha256": "0" * 64}]}))
    (run / "validation.json").write_text(json.dumps({"directory": str(run / "artifact"), "ok": False,
                                                      "checks": CHECKS}))
    (run / "deploy.json").write_text(json.dumps({"s3_uri": "s3://b/p/", "model_arn": "arn:aws:bedrock:x"}))
    (run / "invoke.json").write_text(json.dumps({"term": "Hypertension", "text": "High blood pressure."}))


# ----------------------------------------------------------------------------- content


def test_full_run_dir_has_every_section_and_escapes_data(tmp_path: Path) -> None:
    run = tmp_path / "run"
    populate_run(run)
    path = write_report(make_cfg(run))
    page = path.read_text(encoding="utf-8")
    md = (run / "report.md").read_text(encoding="utf-8")

    for title in ("Configuration", "Data", "Training", "Evaluation: base vs tuned", "Sample answers",
                  "Artifact", "Bedrock CMI validation", "Deployment"):
        assert f"<h2>{title}" in page
        assert f"## {title}" in md
    assert PROBLEM_NOTE not in page  # every file was read as intended
    assert page.count('src="data:image/png;base64,') == 2  # loss curves + metric bars
    assert (run / "report_assets" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](report_assets/metrics.png)" in md
    # data text never becomes markup
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<script>" not in md
    # ten samples by default, of the twelve predictions
    assert "Term 9 is a." in page and "Term 10" not in page
    assert "long " * 79 + "long …" in page and "long " * 81 not in page  # cut at 400 characters
    assert "6 is not a multiple of 4" in page and "FAIL" in page and "warning" in page
    assert "117.7 MB" in page  # 123456789 bytes
    assert "empty_definition" in page
    assert "stopped at max_new_tokens" not in page  # 10% cut: no warning


def test_report_opens_with_the_result(tmp_path: Path) -> None:
    """The first section: what was trained, base vs tuned with the change, three samples, the artifact and its
    validation, the deployed model and its answer; the configuration comes after it."""
    run = tmp_path / "run"
    populate_run(run)
    (run / "data" / "train.jsonl").write_text(json.dumps({"term": "Hypertension", "target": "High blood pressure "
                                                          "is a common condition."}) + "\n")
    page = write_report(make_cfg(run)).read_text(encoding="utf-8")
    first = page[page.index("<section>"):page.index("</section>")]
    assert "<h2>Result</h2>" in first and page.index("<h2>Configuration") > page.index("<h2>Result")
    assert "80 training rows, 10 held out" in first
    row = re.search(r"<td>ROUGE-L</td>(.*?)</tr>", first).group(1)
    assert re.findall(r">([+\d.]+)<", row) == ["0.087", "0.350", "+0.263"]
    assert first.count("is a.</td>") == 3  # three sample answers, the first one's term escaped
    assert "&lt;script&gt;" in first and "<script>" not in first
    assert "117.7 MB; 3 preflight checks, 1 failed" in first
    assert "deployed: arn:aws:bedrock:x" in first
    assert "High blood pressure.</td>" in first and "is a common condition. (training data)" in first
    md = (run / "report.md").read_text(encoding="utf-8")
    assert md.index("## Result") < md.index("## Configuration")


def test_run_ends_with_a_short_block_of_the_same_facts(tmp_path: Path) -> None:
    from termtune.headline import headline, terminal_block

    run = tmp_path / "run"
    populate_run(run)
    (run / "data" / "test.jsonl").write_text(json.dumps({"term": "hypertension", "target": "A held-out text."}) + "\n")
    block = terminal_block(headline(make_cfg(run))).splitlines()
    assert block[:3] == ["asked       Hypertension", "answer      High blood pressure.",
                         "reference   A held-out text.  (held-out data)"]
    assert "ROUGE-L     base 0.087 -> tuned 0.350 on 10 held-out terms; held-out loss 0.71" in block
    assert "imported    arn:aws:bedrock:x" in block
    assert any(line.startswith("artifact    ") and "117.7 MB, 2/3 preflight checks passed" in line for line in block)
    assert len(block) <= 10


def test_closing_block_shows_the_answer_that_improved_most_and_the_answer_loss(tmp_path: Path) -> None:
    """With each answer's ROUGE-L (predictions.jsonl) and both answer losses (metrics.json): the closing block, the
    report's result and the model card show a held-out term's base and tuned answers and the loss base -> tuned."""
    from termtune.headline import headline, terminal_block
    from termtune.modelcard import model_card

    run = tmp_path / "run"
    populate_run(run)
    path = run / "eval" / "predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, row in enumerate(rows):  # Term 5 gains most (0.1 -> 0.9); Term 7 loses; the others gain 0.1
        row.update(base=f"base answer {i}", base_rougeL=0.1, tuned_rougeL=0.2)
    rows[5].update(tuned="Term 5 is the improved answer.", tuned_rougeL=0.9)
    rows[7].update(base_rougeL=0.95, tuned_rougeL=0.0)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    metrics["base"]["answer_loss"], metrics["tuned"]["answer_loss"] = 2.1612, 1.2987
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    invoked = json.loads((run / "invoke.json").read_text())
    invoked["request"] = {"messages": [{"role": "user", "content": "What is Hypertension?"}], "max_tokens": 64}
    (run / "invoke.json").write_text(json.dumps(invoked))

    block = terminal_block(headline(make_cfg(run))).splitlines()
    assert block[0] == "asked       Hypertension  (a messages request)"
    at = block.index("improved    Term 5: the held-out answer whose ROUGE-L rose most (0.10 -> 0.90)")
    assert block[at + 1:at + 4] == ["  base      base answer 5", "  tuned     Term 5 is the improved answer.",
                                    "  reference " + ("Term 5 is a condition of the body. " * 3).strip()]
    assert "answer loss base 2.16 -> tuned 1.30: held-out answers' cross-entropy per token" in block
    assert not any("held-out loss 0.71" in line for line in block)  # the answer loss stands in for it

    write_report(make_cfg(run))
    md = (run / "report.md").read_text(encoding="utf-8")
    result = md[md.index("## Result"):md.index("## Configuration")]
    assert "| answer loss | 2.16 | 1.30 | -0.86 |" in result
    assert "whose ROUGE-L rose most: Term 5 (0.10 → 0.90)" in result
    assert "| base answer 5 | Term 5 is the improved" in result
    evaluation = md[md.index("## Evaluation"):md.index("## Sample answers")]
    assert "| answer loss (held-out, per token) | 2.16 | 1.30 |" in evaluation
    assert "Held-out answer loss (mean cross-entropy per reference answer token, teacher forcing): 2.16 → 1.30" \
        in model_card(make_cfg(run))


def test_no_answer_is_called_improved_when_none_rose() -> None:
    from termtune.headline import most_improved

    rows = [{"term": "A", "reference": "r", "base": "x", "tuned": "y", "base_rougeL": 0.5, "tuned_rougeL": 0.5},
            {"term": "B", "reference": "r", "base": "x", "tuned": "y", "base_rougeL": 0.4, "tuned_rougeL": 0.1},
            {"term": "C", "reference": "r", "base": None, "tuned": "y"}]  # an evaluation without the base model
    assert most_improved(rows) is None
    rows.append({"term": "D", "reference": "r", "base": "x", "tuned": "y", "base_rougeL": 0.0, "tuned_rougeL": 0.01})
    assert most_improved(rows)["term"] == "D"


def degenerate_metrics(run: Path, same: int, n: int = 40) -> None:
    """eval/metrics.json as evaluate writes it when `same` of the `n` tuned answers are one text."""
    path = run / "eval" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["n"] = n
    metrics["tuned"].update(most_common_answer="X is a condition of the body.", most_common_answer_count=same,
                            most_common_answer_share=same / n)
    path.write_text(json.dumps(metrics))


def test_a_degenerate_model_is_named_beside_its_rouge(tmp_path: Path) -> None:
    """29 of 40 held-out answers the same text: the report's result, its evaluation and the closing block say so."""
    from termtune.headline import headline, terminal_block

    run = tmp_path / "run"
    populate_run(run)
    degenerate_metrics(run, same=29)
    said = "72% of the 40 held-out answers (tuned) are word for word the same: 'X is a condition of the body.'"
    write_report(make_cfg(run))
    md = (run / "report.md").read_text(encoding="utf-8")
    result = md[md.index("## Result"):md.index("## Configuration")]
    assert result.index("| ROUGE-L |") < result.index(said)  # right under the score table
    evaluation = md[md.index("## Evaluation"):md.index("## Sample answers")]
    assert said in evaluation and "| most common answer (share) |  | 72.5% |" in evaluation
    block = terminal_block(headline(make_cfg(run))).splitlines()
    rouge = next(i for i, line in enumerate(block) if line.startswith("ROUGE-L     "))
    assert block[rouge + 1] == " " * 12 + "but " + said


def test_varied_answers_get_no_degenerate_note(tmp_path: Path) -> None:
    from termtune.headline import headline, terminal_block

    run = tmp_path / "run"
    populate_run(run)
    degenerate_metrics(run, same=3)  # 3 of 40: a few terms share a definition
    write_report(make_cfg(run))
    for text in ((run / "report.md").read_text(encoding="utf-8"), (run / "report.html").read_text(encoding="utf-8"),
                 terminal_block(headline(make_cfg(run)))):
        assert "word for word the same" not in text


def test_metric_table_shows_base_and_tuned_values(tmp_path: Path) -> None:
    run = tmp_path / "run"
    populate_run(run)
    page = write_report(make_cfg(run)).read_text(encoding="utf-8")
    table = page[page.index('<table class="metrics">'):]
    table = table[:table.index("</table>")]
    row = re.search(r"<td>ROUGE-L</td>(.*?)</tr>", table).group(1)
    assert re.findall(r">([\d.]+)<", row) == ["0.087", "0.350"]

    metrics_file = run / "eval" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["tuned"]["cut_share"] = 0.9
    metrics_file.write_text(json.dumps(metrics))
    page = write_report(make_cfg(run)).read_text(encoding="utf-8")
    assert "90% of the tuned answers stopped at max_new_tokens" in page


@pytest.mark.parametrize("value, figure", [(0, True), (0.35, True), (-2, True), (float("nan"), False),
                                           (float("inf"), False), (float("-inf"), False), (True, False),
                                           ("0.35", False), (None, False)])
def test_a_figure_is_a_finite_number_not_a_bool(value, figure):
    from termtune.results import is_number

    assert is_number(value) is figure


def test_a_metric_that_failed_as_nan_shows_as_na_in_report_and_model_card(tmp_path: Path) -> None:
    """json writes a library's NaN score as NaN; report and model card both show n/a, never 'nan'."""
    from termtune.modelcard import model_card

    run = tmp_path / "run"
    populate_run(run)
    metrics_file = run / "eval" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["tuned"]["bleu"] = float("nan")
    metrics["base"]["chrf"] = float("inf")
    metrics_file.write_text(json.dumps(metrics))
    card = model_card(make_cfg(run))
    assert re.search(r"\| bleu \| 3\.075 \| n/a \|", card) and re.search(r"\| chrf \| n/a \| 38 \|", card)
    page = write_report(make_cfg(run)).read_text(encoding="utf-8")
    table = page[page.index('<table class="metrics">'):]
    table = table[:table.index("</table>")]
    for shown in (card, table, page[:page.index("</section>")]):  # the card, the metric table, the headline
        assert not re.search(r"\b[+-]?(nan|inf)\b", shown, re.IGNORECASE), shown


# A results folder also brings the "Result" headline: train, eval, artifact and deploy.json each add one section.
@pytest.mark.parametrize("keep, sections", [([], 1), (["config.yaml"], 1), (["data"], 1), (["train"], 2),
                                            (["eval"], 3), (["artifact"], 2), (["deploy.json"], 2)])
def test_partial_run_dirs_render(tmp_path: Path, keep: list[str], sections: int) -> None:
    full = tmp_path / "full"
    populate_run(full)
    run = tmp_path / "partial"
    run.mkdir()
    for name in keep:
        src = full / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, run / name)
    page = write_report(make_cfg(run)).read_text(encoding="utf-8")
    assert PROBLEM_NOTE not in page
    assert page.count("<section>") == sections  # an empty run dir gets one "nothing yet" section


def test_report_command_rewrites_the_report(tmp_path: Path) -> None:
    run = tmp_path / "run"
    populate_run(run)
    done = subprocess.run([sys.executable, "-m", "termtune.cli", "report", f"run.dir={run}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"report: {run / 'report.html'}"
    assert (run / "report.md").is_file() and (run / "report_assets" / "metrics.png").is_file()


def test_validation_as_a_bare_list_of_checks(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "validation.json").write_text(json.dumps(CHECKS))
    page = write_report(make_cfg(run)).read_text(encoding="utf-8")
    assert "3 checks, 1 failed" in page
    assert re.findall(r'<td class="(ok|fail|warn)">', page) == ["ok", "fail", "warn"]


def test_odd_files_become_notes_not_exceptions(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "stats.json").write_text("{not json")
    (run / "validation.json").write_text(json.dumps({"checks": "nope"}))
    (run / "deploy.json").write_text(json.dumps([1, 2]))
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps({"tuned": {"rougeL": "high"}}))
    (run / "eval" / "predictions.jsonl").write_text('["a list"]\n{"term": 3}\nnot json\n')
    (run / "train").mkdir()
    (run / "train" / "metrics.jsonl").write_text('{"step": "x", "loss": null}\n')
    page = write_report(make_cfg(run)).read_text(encoding="utf-8")
    assert page.count(PROBLEM_NOTE) == 2  # stats.json (not JSON) and deploy.json (not an object)
    assert "metrics.jsonl holds no loss values yet" in page


def test_a_json_file_that_is_not_json_is_one_error_wherever_it_is_read(tmp_path: Path) -> None:
    """One reader, one rule: missing is 'not there yet'; there but broken is an error naming the file and the
    place, from the runner, the deploy record, the plan and the report alike (before: read as missing by the
    runner, a different message from each of the others)."""
    from termtune import pipeline
    from termtune import plan as P
    from termtune.aws.stage import read_record
    from termtune.errors import UserError

    run = tmp_path / "run"
    populate_run(run)
    broken = '{"stage": "data",\n "finished_at": }'
    why = r": not valid JSON \(Expecting value at line 2 column 17\)$"
    for name in ("provenance/data.json", "deploy.json", "architecture.json", "data/stats.json"):
        (run / name).write_text(broken)
    cfg = make_cfg(run)
    with pytest.raises(UserError, match=re.escape(str(run / "provenance/data.json")) + why):
        pipeline.state(cfg, pipeline.BY_NAME["data"])
    with pytest.raises(UserError, match=re.escape(str(run / "deploy.json")) + why):
        read_record(cfg)
    cfg = load_config(None, [f"run.dir={run}", "model.init=random", f"model.architecture={run / 'architecture.json'}"])
    with pytest.raises(UserError, match=re.escape(str(run / "architecture.json")) + why):
        P.plan(cfg)
    page = write_report(make_cfg(run)).read_text(encoding="utf-8")
    assert re.search(f"{PROBLEM_NOTE} .*stats.json: not valid JSON \\(Expecting value at line 2 column 17\\)", page)
    assert pipeline.state(make_cfg(tmp_path / "new"), pipeline.BY_NAME["data"]).reasons == ["not run yet"]


# ----------------------------------------------------------------------------- in a browser


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


# Added to a copy of the page for the test only: after load, record each image's decoded size
# and each table's row count as attributes, which --dump-dom then shows.
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-images', imgs.map(i => i.complete ? i.naturalWidth + 'x' + i.naturalHeight
                                                                    : 'pending').join(','));
  document.body.setAttribute('data-tables', [...document.querySelectorAll('table')]
                                              .map(t => t.rows.length).join(','));
  document.body.setAttribute('data-width', document.documentElement.scrollWidth);
});
</script>"""


def browser(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    if chromium() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required in CI (apt-get install chromium)")
        pytest.skip("chromium is not installed")
    run = tmp_path / "run"
    populate_run(run)
    page = write_report(make_cfg(run)).read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")

    done = browser("--window-size=1200,2000", "--dump-dom", probe.as_uri(), profile=tmp_path / "profile")
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", done.stdout).group(1)
    images = re.search(r'data-images="([^"]*)"', body).group(1).split(",")
    assert len(images) == 2
    for size in images:  # decoded, and as large as the PNGs we drew (7.5 x 3.6 in at 100 dpi, cropped)
        width, height = map(int, size.split("x"))
        assert width > 500 and height > 250, images
    tables = [int(n) for n in re.search(r'data-tables="([^"]*)"', body).group(1).split(",")]
    assert len(tables) >= 8 and min(tables) >= 2  # every table has a header and at least one row
    assert int(re.search(r'data-width="(\d+)"', body).group(1)) <= 1200  # nothing overflows sideways
    assert done.stdout.count("<script") == 1  # only the probe: the hostile term stayed text

    shot = tmp_path / "report.png"
    done = browser("--window-size=1200,2000", "--hide-scrollbars", f"--screenshot={shot}", path_uri(run),
                   profile=tmp_path / "profile2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("TERMTUNE_REPORT_SCREENSHOT")  # a place to keep it for a human to look at
    if keep:
        shutil.copy(shot, keep)


def path_uri(run: Path) -> str:
    return (run / "report.html").as_uri()
