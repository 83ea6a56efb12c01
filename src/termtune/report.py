"""The run report: report.html (self-contained, images embedded) and report.md, in the run dir.

The runner refreshes it after every stage (termtune.pipeline), so it shows whatever the run
directory holds so far, together with the model card (termtune.modelcard). Every section is optional:

    result (headline)  termtune.headline: what was trained, base vs tuned, samples, artifact, deployed answer
    configuration      <run>/config.yaml, <run>/provenance/*.json
    attempts           <run>/history.json (results that re-runs replaced)
    data               <run>/data/stats.json
    training           <run>/train/metrics.jsonl (loss curves), <run>/train/result.json
    evaluation         <run>/eval/metrics.json (table + bar chart)
    samples            <run>/eval/predictions.jsonl
    artifact           <artifact>/manifest.json, <run>/validation.json
    deployment         <run>/deploy.json, <run>/invoke.json

The report never fails a stage: a file it cannot read or a shape it does not expect turns
into a visible note in that section ("could not read ...") instead of an exception. Tests
assert that no such note appears for well-formed run directories, so real bugs still show.

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch). In the
HTML they are base64 PNG data URIs; report.md links PNG copies in <run>/report_assets/.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from termtune import history
from termtune.config import Config
from termtune.errors import UserError
from termtune.layout import RunLayout
from termtune.results import is_number
from termtune.rundir import read_json
from termtune.stages import ORDER

PROBLEM_NOTE = "could not read"
"""Prefix of the note shown where a file could not be turned into a section."""

SAMPLE_CHARS = 400
"""Sample answers longer than this are cut in the report (the full text is in predictions.jsonl)."""

_METRIC_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "bleu": "BLEU", "chrf": "chrF",
                  "answer_loss": "answer loss (held-out, per token)",
                  "mean_length": "mean length (tokens)", "median_length": "median length (tokens)",
                  "empty_share": "empty outputs", "cut_share": "cut at max_new_tokens",
                  "most_common_answer_share": "most common answer (share)"}


@dataclass
class Image:
    name: str
    """File name stem in report_assets/."""
    png: bytes
    alt: str


@dataclass
class Section:
    """One report section, kept as simple blocks so HTML and Markdown come from the same data."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def text(self, value: str) -> "Section":
        self.blocks.append(("text", value))
        return self

    def table(self, header: list[str], rows: Iterable[Iterable[Any]], cls: str = "") -> "Section":
        self.blocks.append(("table", (header, [[_cell(c) for c in r] for r in rows], cls)))
        return self

    def image(self, image: Image) -> "Section":
        self.blocks.append(("image", image))
        return self

    def code(self, value: str, summary: str) -> "Section":
        self.blocks.append(("code", (summary, value)))
        return self

    def note(self, value: str) -> "Section":
        self.blocks.append(("note", value))
        return self


# ----------------------------------------------------------------------------- entry point


def write_report(cfg: Config) -> Path:
    """Write <run>/report.html and <run>/report.md from what the run directory holds; return the HTML path."""
    from termtune.modelcard import model_card
    from termtune.rundir import write_bytes, write_text

    layout = RunLayout.of(cfg)
    run = layout.root
    sections = []
    for build in (_headline_section, _config_section, _attempts_section, _data_section, _training_section, _plan_section, _evaluation_section, _samples_section,
                  _artifact_section, _validation_section, _deploy_section):
        try:
            section = build(cfg)
        except Exception as e:  # noqa: BLE001 - a report must never fail the stage that refreshes it
            section = Section(build.__doc__ or build.__name__).note(
                f"{PROBLEM_NOTE} this part of the run directory: {type(e).__name__}: {e}")
        if section is not None:
            sections.append(section)

    title = f"termtune run report: {run.name or run}"
    generated = time.strftime("%Y-%m-%d %H:%M:%S %z")
    for section in sections:
        for kind, value in section.blocks:
            if kind == "image":
                write_bytes(layout.report_assets / f"{value.name}.png", value.png)
    write_text(layout.report_md, _render_md(title, generated, run, sections))
    write_text(layout.report_html, _render_html(title, generated, run, sections))
    try:
        card = model_card(cfg)
    except UserError as e:  # a run file that is not what termtune wrote: the report notes it too
        card = f"# {run.name}\n\nThe model card could not be written: {e}\n"
    write_text(layout.model_card, card)
    return layout.report_html


# ----------------------------------------------------------------------------- sections


def _headline_section(cfg: Config) -> Section | None:
    """Result"""
    from termtune.evaluate import format_metric
    from termtune.headline import RANDOM_INIT_NOTE, change, headline, human_size

    h = headline(cfg)
    if h.train_seconds is None and h.eval_loss is None and not h.scores and not h.artifact and not h.model_arn:
        return None  # nothing has resulted yet
    section = Section("Result")
    trained = f"{h.model}, trained on {h.data}"
    if h.train_rows is not None:
        trained += f": {h.train_rows} training rows, {h.test_rows} held out"
    if h.train_seconds is not None:
        trained += f"; {h.steps} steps in {h.train_seconds:.0f} s"
    if h.eval_loss is not None:
        trained += f"; held-out loss {h.eval_loss:.2f}"
    section.text(trained)
    if h.scores:
        section.table([f"on {h.scored_on} held-out terms", "base", "tuned", "change"],
                      [(label, format_metric(key, base), format_metric(key, tuned), change(base, tuned))
                       for key, label, base, tuned in h.scores], cls="metrics")
        if h.same_answer:
            section.note(f"Beside these scores: {h.same_answer}.")
    if h.improved:
        i = h.improved
        section.text(f"The held-out answer whose ROUGE-L rose most: {i['term']} "
                     f"({i['base_rougeL']:.2f} → {i['tuned_rougeL']:.2f})")
        section.table(["base model", "tuned model", "reference"],
                      [(_clip(i["base"], 200), _clip(i["tuned"], 200), _clip(i["reference"], 200))], cls="samples")
    if h.samples:
        section.table(["term", "reference", "tuned model"],
                      [(s["term"], _clip(s["reference"], 200), _clip(s["tuned"], 200)) for s in h.samples],
                      cls="samples")
    if h.artifact:
        status = "not validated yet" if h.checks is None else (
            f"{h.checks} preflight checks, {h.checks_failed} failed")
        section.text(f"artifact: {h.artifact} ({human_size(h.artifact_bytes or 0)}; {status})")
        section.text(f"Bedrock's transformers: {h.bedrock_check}")
    if h.model_arn:
        section.text(f"deployed: {h.model_arn}")
    if h.answer is not None:
        section.table(["asked", "the deployed model answered", "reference"],
                      [(h.asked, _clip(h.answer, 200), _clip(h.reference or "", 200)
                        + (f" ({h.reference_split} data)" if h.reference else ""))], cls="samples")
    if h.random_init:
        section.note(RANDOM_INIT_NOTE)
    return section


def _config_section(cfg: Config) -> Section | None:
    """Configuration"""
    layout = RunLayout.of(cfg)
    path = layout.config
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    section = Section("Configuration")
    if isinstance(data, dict):
        keys = ("run.seed", "model.source", "model.init", "model.quantization", "data.source", "data.target",
                "data.test_size", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "train.epochs",
                "train.max_steps", "train.batch_size", "train.learning_rate", "train.precision",
                "eval.max_new_tokens", "eval.num_beams", "eval.no_repeat_ngram_size", "export.dtype",
                "aws.region")
        flat = dict(_flatten(data))
        section.table(["setting", "value"], [(k, flat[k]) for k in keys if k in flat])
    stages = _stages_done(layout)
    if stages:
        section.table(["stage", "finished", "git commit"], stages)
    section.code(text, "full resolved config (config.yaml)")
    return section


def _stages_done(layout: RunLayout) -> list[tuple[str, str, str]]:
    rows = []
    folder = layout.provenance
    if not folder.is_dir():
        return rows
    found = {p.stem: p for p in folder.glob("*.json")}
    for stage in sorted(found, key=lambda s: (ORDER.index(s) if s in ORDER else len(ORDER), s)):
        record = read_json(found[stage])
        if isinstance(record, dict):
            rows.append((stage, str(record.get("finished_at", "")), str(record.get("git_commit") or "")))
    return rows


def _attempts_section(cfg: Config) -> Section | None:
    """Attempts"""
    entries = history.read(RunLayout.of(cfg))
    if not entries:
        return None
    section = Section("Attempts: results that re-runs replaced")
    rows = []
    for e in entries:
        result = e.get("result") if isinstance(e.get("result"), dict) else {}
        rows.append((e.get("stage", ""), e.get("finished_at", ""), e.get("replaced_at", ""),
                     ", ".join(e.get("replaced_because") or []), _attempt_figures(e.get("stage"), result, e),
                     str(e.get("fingerprint", ""))[:12]))
    section.table(["stage", "finished", "replaced", "replaced because", "result", "fingerprint"], rows)
    live = [e["deploy"].get("model_arn") for e in entries if e.get("stage") == "deploy" and e.get("live")]
    if live:
        section.note(f"still imported in Bedrock (termtune cleanup deletes them): {', '.join(live)}")
    return section


def _attempt_figures(stage: Any, result: dict[str, Any], entry: dict[str, Any]) -> str:
    """The figures that tell attempts apart: losses, scores, the artifact digest, the imported model."""
    if stage == "train" and isinstance(result.get("result"), dict):
        r = result["result"]
        return f"train loss {_num(r.get('train_loss'))}, held-out loss {_num(r.get('eval_loss'))}"
    if stage == "evaluate" and isinstance(result.get("metrics"), dict):
        tuned = result["metrics"].get("tuned", {})
        return f"tuned ROUGE-L {_num(tuned.get('rougeL'))}" if isinstance(tuned, dict) else ""
    if stage == "export":
        return f"artifact sha256 {str(result.get('artifact_sha256', ''))[:16]}"
    if stage == "deploy":
        deployed = entry.get("deploy", {})
        return f"{deployed.get('model_arn') or deployed.get('model_name', '')} ({'live' if entry.get('live') else 'deleted'})"
    return ", ".join(f"{k} {v}" for k, v in result.items() if not isinstance(v, (dict, list)))


def _num(value: Any) -> str:
    return f"{value:.4f}" if is_number(value) else "n/a"


def _data_section(cfg: Config) -> Section | None:
    """Data"""
    stats = read_json(RunLayout.of(cfg).stats)
    if stats is None:
        return None
    section = Section("Data")
    if not isinstance(stats, dict):
        return section.note(f"{PROBLEM_NOTE} stats.json: expected an object, found {type(stats).__name__}")
    scalars = [(k, v) for k, v in stats.items() if not isinstance(v, (dict, list))]
    if scalars:
        section.table(["", "value"], scalars)
    skipped = stats.get("rows_skipped")
    if isinstance(skipped, dict):
        section.text("rows skipped, by reason" if skipped else "rows skipped: none")
        if skipped:
            section.table(["reason", "rows"], skipped.items())
    # Objects of numbers (token length stats per side) share one table, one row each; other
    # objects of plain values (the column mapping) get a small table of their own.
    numeric = {k: v for k, v in stats.items()
               if k != "rows_skipped" and isinstance(v, dict) and v and all(is_number(x) for x in v.values())}
    if numeric:
        columns: list[str] = []
        for value in numeric.values():
            columns += [c for c in value if c not in columns]
        section.text("token lengths" if all("token" in k for k in numeric) else "figures")
        section.table([""] + columns, [[k] + [v.get(c, "") for c in columns] for k, v in numeric.items()])
    for key, value in stats.items():
        if key != "rows_skipped" and key not in numeric and isinstance(value, dict) and value:
            section.text(key.replace("_", " "))
            section.table(["", "value"], value.items())
    return section


def _training_section(cfg: Config) -> Section | None:
    """Training"""
    layout = RunLayout.of(cfg)
    metrics_path = layout.train_metrics
    result = read_json(layout.train_result)
    if not metrics_path.is_file() and result is None:
        return None
    section = Section("Training")
    if isinstance(result, dict):
        section.table(["", "value"], [(k, v) for k, v in result.items() if not isinstance(v, (dict, list))])
    if metrics_path.is_file():
        train, held_out = [], []
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if not isinstance(event, dict) or not is_number(event.get("step")):
                continue
            if is_number(event.get("loss")):
                train.append((event["step"], event["loss"]))
            if is_number(event.get("eval_loss")):
                held_out.append((event["step"], event["eval_loss"]))
        if train or held_out:
            section.image(_loss_plot(train, held_out))
            last = [("last training loss", f"{train[-1][1]:.4f} (step {train[-1][0]})")] if train else []
            last += [("last held-out loss", f"{held_out[-1][1]:.4f} (step {held_out[-1][0]})")] if held_out else []
            section.table(["", "value"], last)
        else:
            section.note("metrics.jsonl holds no loss values yet")
    return section


def _plan_section(cfg: Config) -> Section | None:
    """Plan vs measured"""
    record = read_json(RunLayout.of(cfg).record("train"))
    rows = record.get("result", {}).get("plan_vs_measured") if isinstance(record, dict) else None
    if not rows:
        return None
    section = Section("Plan vs measured")
    section.table(["", "planned", "measured", "measured / planned"],
                  [(r["quantity"], r["planned"], r["measured"], r["measured_over_planned"]) for r in rows])
    section.text("The plan is what `termtune plan` predicts for this config (docs/plan.md).")
    return section


def _evaluation_section(cfg: Config) -> Section | None:
    """Evaluation"""
    from termtune.evaluate import format_metric, same_answer_note

    metrics = read_json(RunLayout.of(cfg).eval_metrics)
    if metrics is None:
        return None
    section = Section("Evaluation: base vs tuned")
    if not isinstance(metrics, dict):
        return section.note(f"{PROBLEM_NOTE} eval/metrics.json: expected an object")
    models = [m for m in ("base", "tuned") if isinstance(metrics.get(m), dict)]
    decoding = metrics.get("decoding")
    intro = f"{metrics.get('n', '?')} held-out examples"
    if isinstance(decoding, dict) and decoding:
        intro += "; decoding: " + ", ".join(f"{k}={v}" for k, v in decoding.items())
    section.text(intro)
    keys = [k for k in _METRIC_LABELS if any(k in metrics[m] for m in models)]
    rows = [[_METRIC_LABELS[k]] + [format_metric(k, metrics[m].get(k), missing="") for m in models] for k in keys]
    section.table(["metric"] + models, rows, cls="metrics")
    quality = [k for k in ("rouge1", "rouge2", "rougeL", "bleu", "chrf") if k in keys]
    if quality and models:
        section.image(_metric_plot(quality, {m: metrics[m] for m in models}))
    section.text("ROUGE is the mean F-measure (0-1); BLEU and chrF are corpus scores (0-100, sacrebleu). The answer "
                 "loss is the mean cross-entropy per token of the reference answers under teacher forcing (lower is "
                 "better), on the same rows and tokens for both models.")
    cut = metrics.get("tuned", {}).get("cut_share") if "tuned" in models else None
    for model in models:
        same_answer = same_answer_note(metrics, model)
        if same_answer:
            section.note(f"{same_answer}: ROUGE, BLEU and chrF then measure that text's overlap with the references.")
    if is_number(cut) and cut > 0.5:
        section.note(f"{cut:.0%} of the tuned answers stopped at max_new_tokens without ending: raise "
                     "eval.max_new_tokens, or train longer so the model learns where a definition ends.")
    return section


def _samples_section(cfg: Config) -> Section | None:
    """Samples"""
    path = RunLayout.of(cfg).predictions
    count = cfg.eval.samples_in_report
    if not path.is_file() or count == 0:
        return None
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if len(rows) >= count:
                break
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(item, dict):
                rows.append([_clip(item.get(k)) for k in ("term", "reference", "base", "tuned")])
    section = Section(f"Sample answers ({len(rows)} held-out terms)")
    section.table(["term", "reference", "base", "tuned"], rows, cls="samples")
    section.text(f"Texts longer than {SAMPLE_CHARS} characters are cut here; eval/predictions.jsonl has them whole.")
    return section


def _artifact_section(cfg: Config) -> Section | None:
    """Artifact"""
    from termtune.headline import human_size
    from termtune.modelcard import bedrock_check_line

    layout = RunLayout.of(cfg)
    manifest = read_json(layout.manifest)
    if manifest is None:
        return None
    section = Section("Artifact")
    section.text(f"folder: {layout.artifact}")
    section.text(bedrock_check_line(cfg))
    files = manifest.get("files") if isinstance(manifest, dict) else manifest
    if isinstance(manifest, dict):
        section.table(["", "value"], [(k, v) for k, v in manifest.items() if not isinstance(v, (dict, list))])
    if isinstance(files, dict):  # {"path": {"size":..., "sha256":...}} or {"path": sha}
        files = [{"path": k, **(v if isinstance(v, dict) else {"sha256": v})} for k, v in files.items()]
    if isinstance(files, list):
        rows = []
        for item in files:
            if isinstance(item, dict):
                size = item.get("size", item.get("bytes"))
                rows.append((item.get("path", item.get("name", "")), human_size(size) if is_number(size) else "",
                             str(item.get("sha256", ""))[:16]))
            else:
                rows.append((item, "", ""))
        section.table(["file", "size", "sha256 (first 16)"], rows, cls="files")
    return section


def _validation_section(cfg: Config) -> Section | None:
    """Validation"""
    checks = read_json(RunLayout.of(cfg).validation)
    if checks is None:
        return None
    section = Section("Bedrock CMI validation")
    if isinstance(checks, dict):
        if checks.get("directory"):
            section.text(f"folder: {checks['directory']}")
        checks = checks.get("checks", [])
    rows = []
    failed = 0
    for c in checks if isinstance(checks, list) else []:
        if not isinstance(c, dict):
            continue
        status = c.get("status")
        if status is None:
            ok = c.get("ok", c.get("passed"))
            # termtune.validate: a warning has ok=False and never fails the folder.
            status = "pass" if ok else ("warning" if c.get("warning") else "FAIL")
        failed += str(status).lower() in ("fail", "failed", "error")
        rows.append((c.get("number", ""), c.get("name", ""), str(status), c.get("message", "")))
    section.text(f"{len(rows)} checks, {failed} failed" if rows else "no checks recorded")
    if rows:
        section.table(["#", "check", "result", "message"], rows, cls="checks")
    return section


def _deploy_section(cfg: Config) -> Section | None:
    """Deployment"""
    deploy = read_json(RunLayout.of(cfg).deploy)
    invoke = read_json(RunLayout.of(cfg).invoke)
    if deploy is None and invoke is None:
        return None
    section = Section("Deployment")
    for name, data in (("deploy.json", deploy), ("invoke.json", invoke)):
        if isinstance(data, dict):
            section.text(name)
            section.table(["", "value"], [(k, v if not isinstance(v, (dict, list)) else json.dumps(v))
                                         for k, v in data.items()])
        elif data is not None:
            section.note(f"{PROBLEM_NOTE} {name}: expected an object")
    return section


# ----------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _loss_plot(train: list[tuple[float, float]], held_out: list[tuple[float, float]]) -> Image:
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="training loss", color="#1f77b4")
    if held_out:
        ax.plot([s for s, _ in held_out], [v for _, v in held_out], label="held-out loss", color="#d62728",
                marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return Image("loss", _png(fig), "training and held-out loss by step")


def _metric_plot(keys: list[str], by_model: dict[str, dict[str, Any]]) -> Image:
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    width = 0.8 / max(len(by_model), 1)
    colors = {"base": "#9e9e9e", "tuned": "#2ca02c"}
    for j, (name, values) in enumerate(by_model.items()):
        # ROUGE is 0..1; shown x100 so every bar shares the 0..100 axis of BLEU and chrF.
        heights = [_as_percent(k, values.get(k)) for k in keys]
        xs = [i + (j - (len(by_model) - 1) / 2) * width for i in range(len(keys))]
        bars = ax.bar(xs, heights, width=width, label=name, color=colors.get(name))
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(keys)), [_METRIC_LABELS[k] for k in keys])
    ax.set_ylabel("score (0-100; ROUGE x100)")
    ax.set_ylim(0, max(5.0, ax.get_ylim()[1] * 1.1))
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return Image("metrics", _png(fig), "quality metrics, base vs tuned")


def _as_percent(key: str, value: Any) -> float:
    if not is_number(value):
        return 0.0
    return float(value) * 100 if key.startswith("rouge") else float(value)


# ----------------------------------------------------------------------------- rendering

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2129}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px}
h2{font-size:1.25em;margin:0 0 12px;border-bottom:1px solid #e1e4e8;padding-bottom:6px}
section{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:16px 20px;margin:16px 0}
.meta{color:#586069;font-size:.9em}
table{border-collapse:collapse;margin:8px 0 12px;font-size:.92em}
th,td{border:1px solid #e1e4e8;padding:5px 9px;text-align:left;vertical-align:top}
th{background:#f1f3f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
table.samples{width:100%;table-layout:fixed}
table.samples td{white-space:pre-wrap;overflow-wrap:anywhere}
table.samples th:first-child{width:15%}
img{max-width:100%;height:auto;display:block;margin:8px 0}
pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:.85em}
.note{color:#b35900}
td.ok{color:#1a7f37;font-weight:600}
td.fail{color:#cf222e;font-weight:700}
td.warn{color:#9a6700;font-weight:600}
p{margin:6px 0}
"""


def _render_html(title: str, generated: str, run: Path, sections: list[Section]) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{e(title)}</title><style>{_CSS}</style></head><body><main>",
             f"<h1>{e(title)}</h1>", f'<p class="meta">run directory: {e(str(run))} &middot; generated {e(generated)}</p>']
    if not sections:
        parts.append("<section><p>Nothing in this run directory yet: run <code>termtune data prepare</code>.</p>"
                     "</section>")
    for section in sections:
        parts.append(f"<section><h2>{e(section.title)}</h2>")
        for kind, value in section.blocks:
            if kind == "text":
                parts.append(f"<p>{e(value)}</p>")
            elif kind == "note":
                parts.append(f'<p class="note">{e(value)}</p>')
            elif kind == "code":
                summary, body = value
                parts.append(f"<details><summary>{e(summary)}</summary><pre>{e(body)}</pre></details>")
            elif kind == "image":
                data = base64.b64encode(value.png).decode("ascii")
                parts.append(f'<img src="data:image/png;base64,{data}" alt="{e(value.alt)}">')
            elif kind == "table":
                header, rows, cls = value
                parts.append(f'<table class="{e(cls)}"><thead><tr>'
                             + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>")
                for row in rows:
                    parts.append("<tr>" + "".join(_td(c) for c in row)
                                 + "</tr>")
                parts.append("</tbody></table>")
        parts.append("</section>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _render_md(title: str, generated: str, run: Path, sections: list[Section]) -> str:
    lines = [f"# {_md_inline(title)}", "", f"run directory: `{run}` · generated {generated}", ""]
    if not sections:
        lines += ["Nothing in this run directory yet: run `termtune data prepare`.", ""]
    for section in sections:
        lines += [f"## {_md_inline(section.title)}", ""]
        for kind, value in section.blocks:
            if kind == "text":
                lines += [_md_inline(value), ""]
            elif kind == "note":
                lines += [f"> {_md_inline(value)}", ""]
            elif kind == "code":
                summary, body = value
                fence = "````" if "```" in body else "```"
                lines += [f"<details><summary>{html.escape(summary)}</summary>", "", f"{fence}yaml", body.rstrip(),
                          fence, "", "</details>", ""]
            elif kind == "image":
                lines += [f"![{_md_inline(value.alt)}](report_assets/{value.name}.png)", ""]
            elif kind == "table":
                header, rows, _ = value
                lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
                lines.append("|" + "---|" * len(header))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                lines.append("")
    return "\n".join(lines) + "\n"


def _md_inline(text: str) -> str:
    # HTML-escape so data text can never become markup in a Markdown viewer.
    return html.escape(str(text), quote=False)


def _md_cell(text: Any) -> str:
    return _md_inline(str(text)).replace("|", "\\|").replace("\r", " ").replace("\n", "<br>")


# ----------------------------------------------------------------------------- helpers


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _clip(value: Any, chars: int = SAMPLE_CHARS) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= chars else text[:chars].rstrip() + " …"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _td(text: str) -> str:
    cls = _STATUS_CLASSES.get(text) or ("num" if _looks_numeric(text) else "")
    return f'<td class="{cls}">{html.escape(text)}</td>' if cls else f"<td>{html.escape(text)}</td>"


_STATUS_CLASSES = {"pass": "ok", "FAIL": "fail", "warning": "warn"}


def _looks_numeric(text: str) -> bool:
    try:
        float(text.rstrip("%"))
    except ValueError:
        return False
    return True
