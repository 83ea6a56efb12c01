"""The result of a run in a few lines: what the report opens with and what `termtune run` ends with.

    facts = headline(cfg)          # from the run directory's files; any part may be missing
    print(terminal_block(facts))

One reader of the run directory for both, so the terminal and the report never tell two stories.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from termtune.config import Config
from termtune.errors import UserError
from termtune.evaluate import same_answer_note
from termtune.families import family_of
from termtune.layout import RunLayout
from termtune.modelcard import bedrock_check_message
from termtune.results import is_number
from termtune.rundir import read_json

MAIN_METRICS = (("rougeL", "ROUGE-L"), ("rouge1", "ROUGE-1"), ("bleu", "BLEU"), ("chrf", "chrF"),
                ("answer_loss", "answer loss"))
"""The scores the headline compares, base vs tuned (ROUGE 0-1, BLEU and chrF 0-100; the held-out answer loss is
the mean cross-entropy per reference answer token, lower is better)."""

RANDOM_INIT_NOTE = ("A randomly initialised model (no pretrained weights offline) learns in CPU minutes the form of "
                    "a definition, not medical facts nor even to repeat the asked term; real answers need the "
                    "pretrained base (configs/flan-t5-large-medical.yaml, on a GPU).")


@dataclass
class Headline:
    model: str = ""
    random_init: bool = False
    data: str = ""
    train_rows: int | None = None
    test_rows: int | None = None
    train_seconds: float | None = None
    steps: int | None = None
    eval_loss: float | None = None
    scores: list[tuple[str, str, float | None, float | None]] = field(default_factory=list)
    """(key, label, base, tuned) for the main metrics present."""
    scored_on: int | None = None
    same_answer: str | None = None
    """evaluate.same_answer_note for the tuned model: set when most of its answers are one text."""
    samples: list[dict[str, str]] = field(default_factory=list)
    """Up to three held-out {term, reference, tuned}."""
    improved: dict[str, Any] | None = None
    """The held-out answer whose ROUGE-L rose most from base to tuned: {term, reference, base, tuned, base_rougeL,
    tuned_rougeL}; None when no answer rose (or the predictions hold no per-answer ROUGE-L)."""
    artifact: str | None = None
    artifact_bytes: int | None = None
    bedrock_check: str | None = None
    """What the export recorded about loading the artifact under transformers 4.51.3 (ran or not, and the result)."""
    checks: int | None = None
    checks_failed: int | None = None
    model_arn: str | None = None
    stand_in: str | None = None
    """What the local stand-in (termtune serve) said of itself, when it imported the model instead of AWS."""
    asked: str | None = None
    """The term (or prompt) the deployed model was asked."""
    asked_through: str | None = None
    """The request's schema, when it was a chat (`messages`) request."""
    answer: str | None = None
    reference: str | None = None
    """The dataset's definition of the asked term, when it has one."""
    reference_split: str | None = None
    """'held-out' or 'training' for that reference."""


def headline(cfg: Config, samples: int = 3) -> Headline:
    """Gather the headline from what the run directory holds (missing parts stay None/empty)."""
    layout = RunLayout.of(cfg)
    h = Headline(model=cfg.model.source, random_init=cfg.model.init == "random", data=cfg.data.source)
    if h.random_init:
        shape = _object(layout.base_model / "config.json")
        family = family_of(shape)
        model = family.describe_config(shape) if family else f"{shape.get('model_type', '?')} model"
        h.model = f"A random-init {model} with the {Path(cfg.tokenizer_source).name} tokenizer"
    stats = _object(layout.stats)
    h.train_rows, h.test_rows = stats.get("train_rows"), stats.get("test_rows")
    result = _object(layout.train_result)
    h.train_seconds, h.steps, h.eval_loss = result.get("train_seconds"), result.get("global_step"), result.get("eval_loss")
    metrics = _object(layout.eval_metrics)
    base, tuned = metrics.get("base") or {}, metrics.get("tuned") or {}
    h.scores = [(key, label, base.get(key), tuned.get(key)) for key, label in MAIN_METRICS if key in tuned or key in base]
    h.scored_on = metrics.get("n")
    h.same_answer = same_answer_note(metrics)
    predictions = _rows(layout.predictions)
    h.samples = [{k: str(row.get(k) or "") for k in ("term", "reference", "tuned")} for row in predictions[:samples]]
    h.improved = most_improved(predictions)
    manifest = _object(layout.manifest)
    if manifest:
        h.artifact = str(layout.artifact)
        h.artifact_bytes = sum(f.get("size", 0) for f in manifest.get("files", []) if isinstance(f, dict))
        h.bedrock_check = bedrock_check_message(manifest)
    validation = _object(layout.validation)
    if isinstance(validation.get("checks"), list):
        h.checks = len(validation["checks"])
        h.checks_failed = sum(1 for c in validation["checks"] if isinstance(c, dict)
                              and c.get("failed", not c.get("ok") and not c.get("warning")))
    deployed, invoked = _object(layout.deploy), _object(layout.invoke)
    h.model_arn = deployed.get("model_arn") or invoked.get("model_arn")
    h.stand_in = (deployed.get("imported_model") or {}).get("localStandIn") or invoked.get("local_stand_in")
    if invoked and invoked.get("model_arn") in (None, h.model_arn):  # not an answer from another model (--model)
        h.answer = str(invoked.get("text", "")).strip()
        h.asked = _term_of(cfg, str(invoked.get("prompt") or invoked.get("term") or ""))
        if isinstance(invoked.get("request"), dict) and "messages" in invoked["request"]:
            h.asked_through = "messages"
        h.reference, h.reference_split = _reference(layout, h.asked)
    return h


def terminal_block(h: Headline) -> str:
    """The last screen of `termtune run`: a short block, not a wall."""
    lines = []
    if h.asked is not None:
        lines.append(f"asked       {h.asked}" + (f"  (a {h.asked_through} request)" if h.asked_through else ""))
        lines.append(f"answer      {_clip(h.answer or '(empty)')}")
        if h.reference:
            lines.append(f"reference   {_clip(h.reference)}  ({h.reference_split} data)")
    if h.improved:
        i = h.improved
        lines.append(f"improved    {i['term']}: the held-out answer whose ROUGE-L rose most "
                     f"({i['base_rougeL']:.2f} -> {i['tuned_rougeL']:.2f})")
        lines.append(f"  base      {_clip(i['base'] or '(empty)')}")
        lines.append(f"  tuned     {_clip(i['tuned'] or '(empty)')}")
        lines.append(f"  reference {_clip(i['reference'])}")
    scores = {key: (b, t) for key, _, b, t in h.scores}
    rouge, loss = scores.get("rougeL"), scores.get("answer_loss")
    if rouge:
        lines.append(f"ROUGE-L     base {_score(rouge[0])} -> tuned {_score(rouge[1])} on {h.scored_on} held-out terms"
                     + (f"; held-out loss {h.eval_loss:.2f}" if h.eval_loss is not None and not loss else ""))
        if h.same_answer:
            lines.append(f"{'':12}but {h.same_answer}")
    if loss:
        lines.append(f"answer loss base {_loss(loss[0])} -> tuned {_loss(loss[1])}: held-out answers' cross-entropy "
                     "per token")
    if h.train_seconds is not None:
        lines.append(f"training    {h.train_seconds:.0f}s, {h.steps} steps on {h.train_rows} rows")
    if h.artifact:
        status = ("" if h.checks is None else
                  f", {h.checks - (h.checks_failed or 0)}/{h.checks} preflight checks passed")
        lines.append(f"artifact    {h.artifact} ({human_size(h.artifact_bytes or 0)}{status})")
        lines.append(f"{'':12}{h.bedrock_check}")
    if h.model_arn:
        lines.append(f"imported    {h.model_arn}" + (f" ({h.stand_in})" if h.stand_in else ""))
    if h.random_init:
        lines.append(RANDOM_INIT_NOTE)
    return "\n".join(lines)


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def change(base: Any, tuned: Any) -> str:
    """'+0.312' for two numbers, '' otherwise: the difference of the values as shown (ROUGE to 3 decimals,
    BLEU and chrF to 2), so the column adds up for the reader."""
    if is_number(base) and is_number(tuned):
        digits = 3 if max(abs(base), abs(tuned)) <= 1 else 2
        return f"{round(tuned, digits) - round(base, digits):+.{digits}f}"
    return ""


def most_improved(predictions: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The prediction row whose ROUGE-L rose most from base to tuned (the first of equals), or None when none rose."""
    scored = [row for row in predictions if is_number(row.get("base_rougeL")) and is_number(row.get("tuned_rougeL"))
              and isinstance(row.get("base"), str) and isinstance(row.get("tuned"), str)]
    best = max(scored, key=lambda row: row["tuned_rougeL"] - row["base_rougeL"], default=None)
    if best is None or best["tuned_rougeL"] <= best["base_rougeL"]:
        return None
    return {key: best.get(key) if key.endswith("rougeL") else str(best.get(key) or "")
            for key in ("term", "reference", "base", "tuned", "base_rougeL", "tuned_rougeL")}


def _score(value: Any) -> str:
    return f"{value:.3f}" if is_number(value) else "n/a"


def _loss(value: Any) -> str:
    return f"{value:.2f}" if is_number(value) else "n/a"


def _clip(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def _term_of(cfg: Config, prompt: str) -> str:
    """The term inside a prompt made from data.prompt_template (the prompt itself otherwise)."""
    before, _, after = cfg.data.prompt_template.partition("{term}")
    if prompt.startswith(before) and prompt.endswith(after) and len(prompt) >= len(before) + len(after):
        return prompt[len(before):len(prompt) - len(after)]
    return prompt


def _reference(layout: RunLayout, term: str | None) -> tuple[str | None, str | None]:
    for split, label in (("test", "held-out"), ("train", "training")):
        for row in _rows(layout.split(split)):
            if str(row.get("term", "")).casefold() == (term or "").casefold():
                return str(row.get("target", "")), label
    return None, None


def _object(path: Path) -> dict[str, Any]:
    """The file's object; {} when there is none, or when it is not JSON: the headline only gathers facts, and
    the report's section for that file names the problem."""
    try:
        value = read_json(path, {})
    except UserError:
        return {}
    return value if isinstance(value, dict) else {}


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
