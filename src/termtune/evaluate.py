"""Evaluate: generate on the held-out split with the base and the tuned model, and score both.

The seed recipe never measured whether fine-tuning helped; it printed one answer. Here the
base model and base + adapter answer the same held-out prompts with the same explicit
decoding settings (cfg.eval), and both are scored against the reference definitions:

    ROUGE-1/2/L (rouge-score, F-measure, 0..1), BLEU and chrF (sacrebleu, 0..100),
    the held-out answer loss: the mean cross-entropy over the reference answers' tokens under teacher
    forcing (the same rows and labels for both models, batched through the family's collator, so exactly
    the tokens training puts its loss on: the answer and its end token, never the prompt or padding),
    mean/median generated length (tokens), share of empty outputs, share cut at max_new_tokens,
    and the most common answer with its count and share: a model that answers most held-out terms
    with the same sentence is degenerate whatever its ROUGE (same_answer_note says so).

Generation is batched over length-sorted prompts (little padding, few forward passes),
which is what makes it several times faster than a one-prompt-at-a-time `generate` loop
(benchmarks/bench_evaluate.py).

Outputs (the folder is written atomically: all of it or nothing):
    <run>/eval/predictions.jsonl   one row per example: term, prompt, reference, base, tuned and each
                                   answer's ROUGE-L (base_rougeL, tuned_rougeL)
    <run>/eval/metrics.json        {"base": {...}, "tuned": {...}, "n": N, "decoding": {...}}
"""

from __future__ import annotations

import collections
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from termtune.config import Config, EvalConfig
from termtune.errors import UserError
from termtune.families import family_of_model
from termtune.layout import RunLayout
from termtune.results import StageResult, html_table, is_number

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

METRIC_NAMES = ("rouge1", "rouge2", "rougeL", "bleu", "chrf")
"""Quality metrics, in report order. ROUGE is 0..1, BLEU and chrF are 0..100 (each library's own scale)."""

SAME_ANSWER_SHARE = 0.25
"""Above this share of held-out answers being one identical text, every place that shows ROUGE says so.
Held-out terms are distinct, so a working model repeats an answer rarely; a quarter of them answered
word for word alike means the model learned one sentence, and its ROUGE measures that sentence's
overlap with the references, not definitions (the random-init demo: 58-100 %)."""


# ----------------------------------------------------------------------------- result


@dataclass
class Generation:
    """One decoded output and the facts about how generation ended."""

    text: str
    n_tokens: int
    """New tokens before the end-of-sequence token (padding not counted)."""
    cut: bool
    """True when generation stopped at max_new_tokens without an end-of-sequence token."""


@dataclass(repr=False)
class EvalReport(StageResult):
    """What `termtune evaluate` produced; `metrics` is the content of metrics.json."""

    directory: Path
    metrics: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def predictions_path(self) -> Path:
        return self.directory / "predictions.jsonl"

    def summary(self) -> str:
        m = self.metrics
        models = [name for name in ("base", "tuned") if isinstance(m.get(name), dict)]
        lines = [f"evaluation: {m.get('n', '?')} held-out examples, {_describe_decoding(m.get('decoding', {}))}"]
        lines.append(f"  {'metric':<16}" + "".join(f"{name:>10}" for name in models))
        for key, label in _SUMMARY_ROWS:
            cells = [format_metric(key, m[name].get(key)) for name in models]
            lines.append(f"  {label:<16}" + "".join(f"{c:>10}" for c in cells))
        lines += [f"  {note}" for note in self.notes]
        lines += [f"  {note}" for note in (same_answer_note(m, name) for name in models) if note]
        lines.append(f"  predictions: {self.predictions_path}")
        lines.append(f"  metrics:     {self.directory / 'metrics.json'}")
        return "\n".join(lines)

    def answers(self, n: int = 3) -> list[dict[str, Any]]:
        """The first `n` held-out rows of predictions.jsonl: term, prompt, reference, base and tuned answers."""
        with self.predictions_path.open(encoding="utf-8") as f:
            return [json.loads(line) for line, _ in zip(f, range(n))]

    def _repr_html_(self) -> str:
        m = self.metrics
        models = [name for name in ("base", "tuned") if isinstance(m.get(name), dict)]
        table = html_table(["metric", *models], [[label, *(format_metric(key, m[name].get(key)) for name in models)]
                                                  for key, label in _SUMMARY_ROWS],
                           caption=f"{m.get('n', '?')} held-out examples, {_describe_decoding(m.get('decoding', {}))}")
        answers = self.answers() if self.predictions_path.is_file() else []
        shown = html_table(["term", "reference", *models], [[a["term"], a["reference"], *(a[name] for name in models)]
                                                           for a in answers], caption="a few answers")
        return table + (shown if answers else "")


_SUMMARY_ROWS = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("bleu", "BLEU"),
                 ("chrf", "chrF"), ("answer_loss", "answer loss"), ("mean_length", "mean length"),
                 ("median_length", "median length"), ("empty_share", "empty"), ("cut_share", "cut at limit"))


def format_metric(key: str, value: Any, missing: str = "-") -> str:
    """One metric as shown in summaries and the report: ROUGE 0.123, shares 12.5%, others 12.34."""
    if not is_number(value):
        return missing
    if key.startswith("rouge"):
        return f"{value:.3f}"
    if key.endswith("_share"):
        return f"{value:.1%}"
    return f"{value:.2f}"


def same_answer_note(metrics: dict[str, Any], model: str = "tuned") -> str | None:
    """"71% of the 40 held-out answers (tuned) are word for word the same: '...'" when one answer covers more than
    SAME_ANSWER_SHARE of them (and at least two), else None. `metrics` is the content of metrics.json."""
    scores = metrics.get(model)
    if not isinstance(scores, dict):
        return None
    count, n = scores.get("most_common_answer_count"), metrics.get("n")
    if not isinstance(count, int) or not isinstance(n, int) or n <= 0 or count < 2 or count / n <= SAME_ANSWER_SHARE:
        return None
    text = " ".join(str(scores.get("most_common_answer", "")).split())
    shown = "(empty)" if not text else f"'{text if len(text) <= 90 else text[:89].rstrip() + '…'}'"
    return f"{count / n:.0%} of the {n} held-out answers ({model}) are word for word the same: {shown}"


def _describe_decoding(d: dict[str, Any]) -> str:
    if not d:
        return "decoding unknown"
    mode = "greedy" if d.get("num_beams", 1) == 1 else f"beam search ({d['num_beams']} beams)"
    text = f"{mode}, max_new_tokens={d.get('max_new_tokens')}"
    if d.get("no_repeat_ngram_size"):
        text += f", no_repeat_ngram_size={d['no_repeat_ngram_size']}"
    return text


# ----------------------------------------------------------------------------- the stage


def evaluate(cfg: Config) -> EvalReport:
    """Generate on the held-out split with the base and the tuned model and score both.

    Reads <run>/data/test.jsonl and <run>/train/adapter; writes <run>/eval/{predictions.jsonl,
    metrics.json}, replacing an earlier evaluation (the runner decides when one is due).

    Raises:
        UserError: no adapter (train has not run), or no held-out rows.
    """
    from termtune.oserrors import probe_writable
    from termtune.rundir import atomic_dir, write_json

    # validate inputs
    layout = RunLayout.of(cfg)
    out_dir = layout.eval
    adapter_dir = layout.adapter
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir}: no trained adapter (adapter_config.json missing); run termtune train first")
    rows = _held_out_rows(cfg)
    probe_writable(layout.root)

    # set up
    import torch

    from termtune.modeling import load_base, load_tokenizer

    tokenizer = load_tokenizer(cfg)
    model = load_base(cfg)
    device = _device_of(model)
    input_ids = [list(r["input_ids"]) for r in rows]
    collator = family_of_model(model).collator(tokenizer, model)

    # do: the base first, because loading the adapter modifies the base model in place
    base_out: list[Generation] | None = None
    base_loss: float | None = None
    if cfg.eval.compare_base:
        base_out = generate(model, tokenizer, input_ids, cfg.eval, device=device)
        base_loss = answer_loss(model, collator, rows, cfg.eval.batch_size, device=device)
    tuned_model = _with_adapter(model, adapter_dir)
    tuned_out = generate(tuned_model, tokenizer, input_ids, cfg.eval, device=device)
    tuned_loss = answer_loss(tuned_model, collator, rows, cfg.eval.batch_size, device=device)
    del model, tuned_model, collator
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    references = [r["target"] for r in rows]
    metrics: dict[str, Any] = {}
    if base_out is not None:
        metrics["base"] = score(base_out, references, base_loss)
    metrics["tuned"] = score(tuned_out, references, tuned_loss)
    metrics["n"] = len(rows)
    metrics["decoding"] = decoding_settings(cfg.eval)
    metrics["adapter"] = str(adapter_dir)

    # save: the whole folder appears at once; an interrupted evaluation leaves nothing
    with atomic_dir(out_dir, force=True) as tmp:
        # each answer's own ROUGE-L, so a reader (the closing block) can show an answer that improved
        base_rouge = rouge_l_per_answer([g.text for g in base_out], references) if base_out is not None else None
        tuned_rouge = rouge_l_per_answer([g.text for g in tuned_out], references)
        lines = []
        for i, r in enumerate(rows):
            lines.append(json.dumps({
                "term": r["term"], "prompt": r["prompt"], "reference": r["target"],
                "base": base_out[i].text if base_out is not None else None, "tuned": tuned_out[i].text,
                "base_rougeL": base_rouge[i] if base_rouge is not None else None, "tuned_rougeL": tuned_rouge[i],
            }, ensure_ascii=False))
        (tmp / layout.predictions.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        write_json(tmp / layout.eval_metrics.name, metrics)
    return EvalReport(out_dir, metrics)


def _held_out_rows(cfg: Config) -> list[dict[str, Any]]:
    from termtune.data import load_split

    split = load_split(cfg, "test")
    n = len(split)
    if cfg.eval.max_examples is not None:
        n = min(n, cfg.eval.max_examples)
    if n == 0:
        raise UserError(f"{RunLayout.of(cfg).data}: the held-out split is empty; raise data.test_size and "
                        "run termtune data prepare --force")
    # The split is already shuffled with the run seed, so its first rows are a fair sample.
    return split.select(range(n)).to_list()


def _device_of(model: "PreTrainedModel") -> "torch.device":
    import torch

    if getattr(model, "hf_device_map", None) is None and torch.cuda.is_available():
        model.to("cuda")
    return next(model.parameters()).device


def _with_adapter(model: "PreTrainedModel", adapter_dir: Path) -> "PreTrainedModel":
    """The base plus the trained LoRA adapter; merged in memory unless the base is quantized.

    Merging removes the per-layer LoRA detour, so generation runs at the speed of the plain
    model. A 4/8-bit base cannot be merged exactly (rounding), so it keeps the adapter attached.
    """
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return tuned
    return tuned.merge_and_unload()


# ----------------------------------------------------------------------------- answer loss


def answer_loss(model: "PreTrainedModel", collator: Any, rows: Sequence[dict[str, Any]], batch_size: int,
                device: "torch.device | str | None" = None) -> float:
    """The mean cross-entropy per answer token of `rows` (each {input_ids, labels} as a data split holds them)
    under teacher forcing: every reference answer token predicted from the prompt and the answer tokens before it.

    Batches are made by the family's collator, which labels exactly the answer tokens (labels -100 on the
    prompt and on padding), and the model's own loss averages over the labelled tokens of a batch; each batch's
    mean is weighted by its count of answer tokens, so the result is the mean over all of them, whatever the
    batching. (A decoder's loss shifts its labels by one; that drops no answer token, because every row starts
    with its prompt.)
    """
    import torch

    device = torch.device(device) if device is not None else next(model.parameters()).device
    total, tokens = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = collator([{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])}
                              for r in rows[start:start + batch_size]])
            n = int((batch["labels"] != -100).sum())
            loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
            total += float(loss) * n
            tokens += n
    return total / tokens if tokens else float("nan")


# ----------------------------------------------------------------------------- generation


def decoding_settings(ecfg: EvalConfig) -> dict[str, Any]:
    """The decoding settings that produced the outputs, as recorded in metrics.json."""
    return {"max_new_tokens": ecfg.max_new_tokens, "num_beams": ecfg.num_beams,
            "do_sample": False, "no_repeat_ngram_size": ecfg.no_repeat_ngram_size,
            "batch_size": ecfg.batch_size, "skip_special_tokens": True}


def generate(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", input_ids: Sequence[Sequence[int]],
             ecfg: EvalConfig, device: "torch.device | str | None" = None,
             min_new_tokens: int | None = None) -> list[Generation]:
    """Generate for every tokenized prompt, in batches of similar length; results in input order.

    Every setting is explicit: the model's generation_config (whose max_length=20 default cut
    the seed recipe's answers short) is not consulted.

    Args:
        input_ids: token ids per prompt (unpadded, ending in eos), e.g. a data split's input_ids.
        min_new_tokens: force at least this many new tokens (benchmarks use it for equal work).
    """
    import torch
    from transformers import GenerationConfig

    device = torch.device(device) if device is not None else next(model.parameters()).device
    family = family_of_model(model)
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    gen_config = GenerationConfig(
        max_new_tokens=ecfg.max_new_tokens, min_new_tokens=min_new_tokens, num_beams=ecfg.num_beams,
        do_sample=False, no_repeat_ngram_size=ecfg.no_repeat_ngram_size,
        early_stopping=ecfg.num_beams > 1, pad_token_id=pad_id, eos_token_id=eos_id,
        **family.generation_settings(model),
    )
    # Longest first: the first batch shows at once whether memory suffices, and neighbours
    # in length share a batch, so padding stays small.
    order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]), reverse=True)
    results: list[Generation | None] = [None] * len(input_ids)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), ecfg.batch_size):
            batch = order[start:start + ecfg.batch_size]
            width = max(len(input_ids[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                # a decoder-only model continues its prompt: padded on the left, the answer follows the prompt
                at = slice(width - len(input_ids[i]), width) if family.generation_padding_side == "left" \
                    else slice(0, len(input_ids[i]))
                ids[row, at] = torch.tensor(input_ids[i], dtype=torch.long)
                mask[row, at] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=gen_config)
            new = family.answer_ids(out, width).tolist()
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            for row, i in enumerate(batch):
                n_tokens, ended = _count_new_tokens(new[row], eos_id, pad_id)
                results[i] = Generation(text=family.answer_text(texts[row]), n_tokens=n_tokens,
                                        cut=not ended and len(new[row]) >= ecfg.max_new_tokens)
    return results  # type: ignore[return-value]


def _count_new_tokens(ids: list[int], eos_id: int, pad_id: int) -> tuple[int, bool]:
    """(tokens before eos, whether eos was produced); padding after a finished sequence is not counted."""
    n = 0
    for token in ids:
        if token == eos_id:
            return n, True
        if token != pad_id:
            n += 1
    return n, False


# ----------------------------------------------------------------------------- metrics


def quality_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L (mean F-measure, 0..1, Porter stemming) and corpus BLEU / chrF (0..100)."""
    import sacrebleu

    if not predictions and not references:
        return {name: 0.0 for name in METRIC_NAMES}
    per_answer = _rouge_per_answer(predictions, references)
    out = {key: sum(scores[key] for scores in per_answer) / len(per_answer) for key in ("rouge1", "rouge2", "rougeL")}
    out["bleu"] = float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
    out["chrf"] = float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)
    return out


def rouge_l_per_answer(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Each answer's ROUGE-L F-measure against its reference (quality_metrics' ROUGE-L is their mean)."""
    return [scores["rougeL"] for scores in _rouge_per_answer(predictions, references)]


def _rouge_per_answer(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    # rouge-score takes (target, prediction)
    return [{key: s.fmeasure for key, s in scorer.score(ref, pred).items()}
            for pred, ref in zip(predictions, references)]


def score(outputs: Sequence[Generation], references: Sequence[str], answer_loss: float | None = None) -> dict[str, Any]:
    """Quality metrics (and the held-out answer loss, when given) plus length facts for one model's outputs."""
    lengths = [g.n_tokens for g in outputs]
    result: dict[str, Any] = quality_metrics([g.text for g in outputs], references)
    if answer_loss is not None:
        result["answer_loss"] = answer_loss
    result.update({
        "mean_length": statistics.fmean(lengths) if lengths else 0.0,
        "median_length": float(statistics.median(lengths)) if lengths else 0.0,
        "empty_share": sum(1 for g in outputs if not g.text) / len(outputs) if outputs else 0.0,
        "cut_share": sum(1 for g in outputs if g.cut) / len(outputs) if outputs else 0.0,
    })
    if outputs:
        answer, count = collections.Counter(g.text for g in outputs).most_common(1)[0]
        result.update({"most_common_answer": answer, "most_common_answer_count": count,
                       "most_common_answer_share": count / len(outputs)})
    return result
