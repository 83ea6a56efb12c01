"""The model card (<run>/model-card.md): what the model is, what it learned from, how it scored, its limits.

Rendered with the report after every stage, from what the run directory holds, so it never
shows results of other settings than the ones recorded; deploy ships it beside the artifact.
"""

from __future__ import annotations

from typing import Any

from termtune.config import Config
from termtune.evaluate import same_answer_note
from termtune.families import family_for
from termtune.families.base import TORCH_DTYPE_NAMES
from termtune.layout import RunLayout
from termtune.results import is_number
from termtune.rundir import read_json

MEDQUAD_CITATION = ('Asma Ben Abacha and Dina Demner-Fushman. "A Question-Entailment Approach to Question '
                    'Answering". BMC Bioinformatics 20:511, 2019.')


def base_name(cfg: Config) -> str:
    if cfg.model.init == "random":
        return f"random init, shape of {cfg.model.architecture} (seed {cfg.run.seed})"
    return cfg.model.source


def _data_section(cfg: Config) -> str:
    source = cfg.data.source
    lines = [f"- Source: `{source}`", f"- Prompt: `{cfg.data.prompt_template}`; target: {cfg.data.target}"]
    if "medquad" in source.lower():
        lines += ["- MedQuAD (NIH-derived medical question-answer pairs; term -> definition rows), "
                  "repository abachaa/MedQuAD, license **CC BY 4.0**.",
                  f"- Citation: {MEDQUAD_CITATION}"]
    elif "wiki_medical_terms" in source:
        lines.append("- Wikipedia medical articles (gamino/wiki_medical_terms); Wikipedia text is CC BY-SA. "
                     "Check the dataset card for its terms.")
    else:
        lines.append("- Check the license of this data before sharing the model.")
    stats = read_json(RunLayout.of(cfg).stats)
    if stats:
        lines.append(f"- Rows: {stats.get('train_rows', '?')} train, {stats.get('test_rows', '?')} held out "
                     f"(seed {cfg.run.seed}, split by term)")
    return "\n".join(lines)


def _metrics_section(cfg: Config) -> str:
    metrics = read_json(RunLayout.of(cfg).eval_metrics)
    if not isinstance(metrics, dict):
        return "Not evaluated yet (run `termtune evaluate`)."
    models = [name for name in ("base", "tuned") if isinstance(metrics.get(name), dict)]
    if not models:
        return "See eval/metrics.json in the run directory."
    keys = [k for k in metrics[models[-1]] if any(is_number(metrics[m].get(k)) for m in models)]
    rows = [f"| {k} | " + " | ".join(_fmt(metrics[m].get(k)) for m in models) + " |" for k in keys]
    same_answer = same_answer_note(metrics)
    losses = [metrics[m].get("answer_loss") for m in ("base", "tuned") if m in models]
    loss_line = ""
    if len(losses) == 2 and all(map(is_number, losses)):
        loss_line = (f"\n\nHeld-out answer loss (mean cross-entropy per reference answer token, teacher forcing): "
                     f"{losses[0]:.2f} → {losses[1]:.2f} (base → tuned).")
    return (f"{metrics.get('n', '?')} held-out examples (`eval/metrics.json`; "
            f"base = the model before fine-tuning):\n\n| metric | {' | '.join(models)} |\n"
            f"|---|{'---|' * len(models)}\n" + "\n".join(rows) + loss_line
            + (f"\n\nWarning: {same_answer}; the scores above measure that text's overlap with the references."
               if same_answer else ""))


def _training_result(cfg: Config) -> str:
    result = read_json(RunLayout.of(cfg).train_result)
    if not isinstance(result, dict):
        return ""
    return (f"\n- Result: {result.get('global_step', '?')} optimizer steps, training loss "
            f"{_fmt(result.get('train_loss'))}, held-out loss {_fmt(result.get('eval_loss'))}")


def bedrock_check_message(manifest: dict[str, Any]) -> str:
    """What an artifact's manifest records about its load under transformers 4.51.3 (termtune.bedrock_check),
    and nothing more: a check that did not run, or that an older export did not record, is said not to have run."""
    check = manifest.get("bedrock_check")
    if isinstance(check, dict) and check.get("message"):
        return str(check["message"])
    return "not checked under transformers 4.51.3: the export recorded no such check"


def bedrock_check_line(cfg: Config) -> str:
    """The model card's sentence about the check under transformers 4.51.3, the version Bedrock serves with."""
    manifest = read_json(RunLayout.of(cfg).manifest)
    if not isinstance(manifest, dict):
        return "Not exported yet: no check under transformers 4.51.3 (the version Bedrock serves with) has run."
    message, check = bedrock_check_message(manifest), manifest.get("bedrock_check")
    if isinstance(check, dict) and check.get("status") == "passed":
        return f"Checked at export in the transformers version Bedrock serves with: {message}."
    return f"{message[0].upper()}{message[1:]}."


def _fmt(value: Any) -> str:
    if not is_number(value):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(cfg: Config) -> str:
    lora, train = cfg.lora, cfg.train
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    steps = f"max_steps {train.max_steps}" if train.max_steps > 0 else f"epochs: {train.epochs:g}"
    family = family_for(cfg, download=False)
    return f"""---
library_name: transformers
pipeline_tag: {family.pipeline_tag}
tags: [{", ".join(family.card_tags)}, lora, medical, bedrock-custom-model-import]
---

# {cfg.run_dir.name}: a {family.display_name} fine-tuned on medical terminology

Full (merged) weights of `{family.architectures[0]}`, written by `termtune export` for
Amazon Bedrock Custom Model Import.

{bedrock_check_line(cfg)}

## Base model

- {base_name(cfg)}
- Weights here: {TORCH_DTYPE_NAMES[cfg.export.dtype]} safetensors, LoRA merged into the unquantized base
  (training quantization: {cfg.model.quantization}).

## Data

{_data_section(cfg)}

## Training

- LoRA: r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, target modules: {targets}, bias: {lora.bias}
- {steps}, batch size {train.batch_size} x {train.gradient_accumulation_steps} accumulation,
  learning rate {train.learning_rate:g} ({train.lr_scheduler}, warmup {train.warmup_ratio:g}),
  weight decay {train.weight_decay:g}, precision {train.precision}, seed {cfg.run.seed}
- Source length {cfg.data.max_source_length}, target length {cfg.data.max_target_length} tokens{_training_result(cfg)}

## Evaluation

{_metrics_section(cfg)}

## Intended use

Explaining medical terms in plain language for education, study aids and drafting, where a
person reads and checks the output. Prompt: `{cfg.data.prompt_template}`.

## Limits

- Not medical advice, and not for diagnosis, treatment or triage decisions. Outputs can be
  fluent and wrong: the model can invent definitions, mix up similar terms and state
  outdated facts with confidence.
- It learned from a fixed set of English definitions; rare terms, other languages and
  recent findings are likely to be wrong or missing.
- Automatic scores (ROUGE, BLEU, chrF) measure overlap with reference text, not medical
  correctness. Have a qualified reviewer check anything used with patients.
"""
