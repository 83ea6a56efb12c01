"""The evaluate stage: metric values on known strings, batched generation, base vs tuned on a memorised set."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import medquad_rows, tiny_overrides, write_jsonl
from termtune.config import EvalConfig, load_config
from termtune.errors import UserError
from termtune.evaluate import Generation, evaluate, generate, quality_metrics, score


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: thread hand-offs cost more than the math (50x here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- metrics on known strings


def test_identical_strings_score_perfectly() -> None:
    texts = ["Hypertension is high blood pressure.", "Anemia is a lack of healthy red blood cells."]
    m = quality_metrics(texts, texts)
    assert m["rouge1"] == m["rouge2"] == m["rougeL"] == pytest.approx(1.0)
    assert m["bleu"] == pytest.approx(100.0)
    assert m["chrf"] == pytest.approx(100.0)


def test_disjoint_strings_score_zero() -> None:
    m = quality_metrics(["qqq zzz xxx"], ["apple banana cherry"])
    assert m == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "bleu": 0.0, "chrf": 0.0}


def test_partial_overlap_matches_hand_computation() -> None:
    # "a b c d e" vs "a b c d f": n-gram precisions 4/5, 3/4, 2/3, 1/2; same length, so no brevity penalty.
    m = quality_metrics(["a b c d e"], ["a b c d f"])
    assert m["bleu"] == pytest.approx(100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-6)
    assert m["rouge1"] == pytest.approx(4 / 5)
    assert m["rouge2"] == pytest.approx(3 / 4)
    assert m["rougeL"] == pytest.approx(4 / 5)
    # ROUGE is the mean over examples: one perfect answer and one with half the unigrams right.
    m = quality_metrics(["the cat sat", "red green"], ["the cat sat", "red blue"])
    assert m["rouge1"] == pytest.approx((1 + 1 / 2) / 2)
    assert m["rouge2"] == pytest.approx((1 + 0) / 2)


def test_score_counts_lengths_empty_and_cut_outputs() -> None:
    outputs = [Generation("a b", 2, False), Generation("", 0, False), Generation("x y z w", 8, True),
               Generation("c", 1, False)]
    s = score(outputs, ["a b", "q", "x y", "c"])
    assert s["mean_length"] == pytest.approx(11 / 4)
    assert s["median_length"] == pytest.approx(1.5)
    assert s["empty_share"] == pytest.approx(1 / 4)
    assert s["cut_share"] == pytest.approx(1 / 4)


def test_score_counts_the_most_common_answer() -> None:
    outputs = [Generation(text, 3, False) for text in ("X is a.", "Y is b.", "X is a.", "X is a.", "Z.")]
    s = score(outputs, ["r"] * 5)
    assert (s["most_common_answer"], s["most_common_answer_count"]) == ("X is a.", 3)
    assert s["most_common_answer_share"] == pytest.approx(0.6)


@pytest.mark.parametrize("answers,note", [
    (["X is a disease."] * 29 + [f"answer {i}" for i in range(11)],
     "72% of the 40 held-out answers (tuned) are word for word the same: 'X is a disease.'"),
    ([f"answer {i}" for i in range(38)] + ["answer 0", "answer 1"], None),  # a few repeats among 40: not degenerate
    (["same"] + [f"answer {i}" for i in range(2)], None),  # one of three is no repetition at all
    ([""] * 3 + ["a"], "75% of the 4 held-out answers (tuned) are word for word the same: (empty)"),
])
def test_same_answer_note_above_a_quarter_of_the_answers(answers, note) -> None:
    from termtune.evaluate import same_answer_note

    metrics = {"n": len(answers), "tuned": score([Generation(a, 3, False) for a in answers], ["r"] * len(answers))}
    assert same_answer_note(metrics) == note


# ----------------------------------------------------------------------------- a memorised run


def _train_adapter_until_memorised(cfg, rows: list[dict], max_steps: int = 300) -> float:
    """Full-batch LoRA training on `rows` until every target token is the argmax; saves <run>/train/adapter.

    Returns the teacher-forced token accuracy of the saved adapter. (The loss cannot go near 0:
    the frozen random lm_head at d_model^-0.5 scale caps the logits, but the argmax, which is
    what greedy decoding follows, can be made right for every token.)
    """
    import torch

    from termtune.modeling import attach_lora, load_base

    def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
        width = max(map(len, seqs))
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs])

    model = attach_lora(cfg, load_base(cfg))
    ids = pad([r["input_ids"] for r in rows], 0)
    mask = pad([[1] * len(r["input_ids"]) for r in rows], 0)
    labels = pad([r["labels"] for r in rows], -100)
    scored = labels != -100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    perfect_in_a_row = 0
    for _ in range(max_steps):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        accuracy = (out.logits.argmax(-1)[scored] == labels[scored]).float().mean().item()
        perfect_in_a_row = perfect_in_a_row + 1 if accuracy == 1.0 else 0
        if perfect_in_a_row == 5:  # a margin, so merging the adapter cannot flip a near-tie
            break
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(cfg.run_dir / "train" / "adapter")
    return accuracy


@pytest.fixture(scope="module")
def memorised_cfg(tmp_path_factory):
    """A tiny run whose adapter has memorised its 20 training rows, and whose test split IS those rows."""
    from termtune import data

    tmp = tmp_path_factory.mktemp("memorised")
    # Short targets (the first six words) that fit max_target_length untruncated, so the
    # reference text is exactly what the model learned to produce.
    rows = [{"term": r["term"], "definition": " ".join(r["definition"].split()[:6]) + "."}
            for r in medquad_rows(28, seed=3)]
    source = write_jsonl(tmp / "terms.jsonl", rows)
    cfg = load_config(None, tiny_overrides(tmp / "run", source) + [
        "data.test_size=8", "data.max_target_length=32", "lora.r=16", "lora.alpha=32",
        "eval.max_new_tokens=32", "eval.batch_size=8"])
    data.prepare(cfg)
    train_file = cfg.run_dir / "data" / "train.jsonl"
    (cfg.run_dir / "data" / "test.jsonl").write_text(train_file.read_text(encoding="utf-8"), encoding="utf-8")
    rows = data.load_split(cfg, "train").to_list()
    assert len(rows) == 20
    assert all(len(r["labels"]) < 32 for r in rows)  # nothing truncated
    assert _train_adapter_until_memorised(cfg, rows) == 1.0
    return cfg


def test_tuned_model_beats_base_on_memorised_rows(memorised_cfg) -> None:
    report = evaluate(memorised_cfg)
    m = report.metrics
    assert m["n"] == 20
    assert m["tuned"]["rougeL"] > 0.9
    assert m["base"]["rougeL"] < 0.2
    assert m["tuned"]["bleu"] > m["base"]["bleu"] + 50
    assert m["decoding"]["max_new_tokens"] == 32 and m["decoding"]["num_beams"] == 1

    predictions = [json.loads(line) for line in report.predictions_path.read_text().splitlines()]
    assert len(predictions) == 20
    assert set(predictions[0]) == {"term", "prompt", "reference", "base", "tuned", "base_rougeL", "tuned_rougeL"}
    for model in ("base", "tuned"):  # each answer's own ROUGE-L; metrics.json's is their mean
        assert sum(p[f"{model}_rougeL"] for p in predictions) / 20 == pytest.approx(m[model]["rougeL"])
        assert all(p[f"{model}_rougeL"] == pytest.approx(quality_metrics([p[model]], [p["reference"]])["rougeL"])
                   for p in predictions)
    exact = sum(p["tuned"] == p["reference"] for p in predictions)
    assert exact >= 16, [(p["tuned"], p["reference"]) for p in predictions]
    assert not any("<pad>" in p["tuned"] or "</s>" in p["tuned"] for p in predictions)
    assert "ROUGE-L" in report.summary()
    for model in ("base", "tuned"):  # metrics.json counts the answers predictions.jsonl holds
        answer, count = collections.Counter(p[model] for p in predictions).most_common(1)[0]
        assert m[model]["most_common_answer_count"] == count and m[model]["most_common_answer"] == answer
    assert "(tuned) are word for word the same" not in report.summary()  # 20 distinct memorised answers

    # the report shows the metric table and the sample answers
    from termtune import pipeline

    page = pipeline.write_report(memorised_cfg).read_text(encoding="utf-8")
    assert "Evaluation: base vs tuned" in page and "Sample answers (10 held-out terms)" in page


def test_evaluation_is_deterministic_and_replaces_the_last(memorised_cfg) -> None:
    first = evaluate(memorised_cfg)
    metrics_file = memorised_cfg.run_dir / "eval" / "metrics.json"
    stamp = metrics_file.stat().st_mtime_ns
    again = evaluate(memorised_cfg)
    assert metrics_file.stat().st_mtime_ns != stamp
    assert again.metrics == json.loads(metrics_file.read_text())
    assert again.metrics["tuned"] == pytest.approx(first.metrics["tuned"])  # greedy decoding is deterministic


def test_batched_generation_equals_one_prompt_at_a_time(memorised_cfg) -> None:
    """Padding and length sorting change nothing: each prompt gets what it gets alone."""
    from termtune import data
    from termtune.modeling import load_base, load_tokenizer

    rows = data.load_split(memorised_cfg, "test").to_list()[:12]
    ids = [r["input_ids"] for r in rows]
    assert len({len(x) for x in ids}) > 1  # prompts of different lengths, so padding is exercised
    model, tokenizer = load_base(memorised_cfg), load_tokenizer(memorised_cfg)
    ecfg = EvalConfig(max_new_tokens=10, batch_size=5)
    batched = generate(model, tokenizer, ids, ecfg)
    single = [generate(model, tokenizer, [x], ecfg.model_copy(update={"batch_size": 1}))[0] for x in ids]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.n_tokens for g in batched] == [g.n_tokens for g in single]
    assert all(g.n_tokens <= 10 for g in batched)


def test_missing_adapter_asks_for_train(tmp_path: Path) -> None:
    from termtune import pipeline

    source = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(16))
    cfg = load_config(None, tiny_overrides(tmp_path / "run", source))
    pipeline.run_stage(cfg, "data")
    with pytest.raises(UserError, match="run termtune train first"):
        evaluate(cfg)
    assert not (cfg.run_dir / "eval").exists()

    # the command line says it in one line, exit 2, no traceback
    done = subprocess.run([sys.executable, "-m", "termtune.cli", "evaluate",
                           *tiny_overrides(tmp_path / "run", source)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "run `termtune train`" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- the held-out answer loss


def hand_answer_loss(model, rows, encoder_decoder: bool) -> float:
    """The mean cross-entropy over every answer token of `rows`, one row at a time, from the logits themselves:
    the independent computation evaluate's batched answer loss must equal."""
    import torch

    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt, answer = list(row["input_ids"]), list(row["labels"])
            if encoder_decoder:  # the decoder reads the start token and the answer so far; position i predicts token i
                start = model.config.decoder_start_token_id
                logits = model(input_ids=torch.tensor([prompt]),
                               decoder_input_ids=torch.tensor([[start] + answer[:-1]])).logits[0]
            else:  # one stream, prompt then answer; position i predicts token i + 1
                logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
            assert logits.shape[0] == len(answer)
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            total -= float(log_probs[torch.arange(len(answer)), torch.tensor(answer)].sum())
            tokens += len(answer)
    return total / tokens


def base_and_tuned(cfg):
    """(base model, base + adapter), loaded here, apart from evaluate; the adapter merged as evaluate merges it (an
    unmerged adapter sums in another order: logits equal to ~1e-6, not to the last bits)."""
    from peft import PeftModel

    from termtune.modeling import load_base

    tuned = PeftModel.from_pretrained(load_base(cfg), str(cfg.run_dir / "train" / "adapter")).merge_and_unload()
    return load_base(cfg).eval(), tuned.eval()


def test_answer_loss_is_the_cross_entropy_over_exactly_the_answer_tokens_t5(memorised_cfg) -> None:
    """evaluate records, for base and tuned, the mean cross-entropy of the held-out answers' tokens under teacher
    forcing: the value recomputed by hand from the logits, row by row (so batching and padding change nothing)."""
    from termtune import data

    rows = data.load_split(memorised_cfg, "test").to_list()
    assert len({len(r["labels"]) for r in rows}) > 1  # answers of different lengths: padding is exercised
    metrics = evaluate(memorised_cfg).metrics
    base, tuned = base_and_tuned(memorised_cfg)
    assert metrics["base"]["answer_loss"] == pytest.approx(hand_answer_loss(base, rows, True), rel=1e-5)
    # The memorised answers' loss is near 0 (~0.01), where batched (padded) and one-row float32 sums differ by
    # ~1e-5 nats: an absolute tolerance far below what a wrong token set or an unweighted mean of batches would move.
    assert metrics["tuned"]["answer_loss"] == pytest.approx(hand_answer_loss(tuned, rows, True), rel=1e-5, abs=3e-5)
    assert "answer loss" in evaluate(memorised_cfg).summary()


def test_answer_loss_of_a_decoder_counts_the_answer_and_its_end_of_turn_token_only(tmp_path: Path) -> None:
    """A tiny random-init Llama with the real Llama 3.2 chat template, and an adapter with random weights (tuned
    differs from base): the recorded losses are the hand computation over the answer tokens, not the prompt's."""
    import torch

    from conftest import SHARED
    from termtune import data
    from termtune.modeling import attach_lora, load_base

    llama = SHARED / "models" / "llama-3.2-1b-instruct"
    tiny = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16}
    source = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(24))
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", f"model.source={llama}", "model.init=random",
                             f"model.architecture={llama / 'config.json'}",
                             f"model.architecture_overrides={json.dumps(tiny)}",
                             f"data.source={source}", "data.target=first_n_sentences", "data.n_sentences=1",
                             "data.test_size=6", "lora.r=4", "eval.max_new_tokens=4", "eval.batch_size=4"])
    data.prepare(cfg)
    peft_model = attach_lora(cfg, load_base(cfg))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:  # LoRA starts as a no-op (B = 0); a random B makes tuned differ from base
                weight.normal_(std=0.5)
    peft_model.save_pretrained(cfg.run_dir / "train" / "adapter")

    rows = data.load_split(cfg, "test").to_list()
    assert len({len(r["input_ids"]) + len(r["labels"]) for r in rows}) > 1  # padding is exercised
    metrics = evaluate(cfg).metrics
    base, tuned = base_and_tuned(cfg)
    expected = hand_answer_loss(base, rows, False), hand_answer_loss(tuned, rows, False)
    assert abs(expected[0] - expected[1]) > 0.01  # the two models differ, so each value is checked on its own
    assert metrics["base"]["answer_loss"] == pytest.approx(expected[0], rel=1e-5)
    assert metrics["tuned"]["answer_loss"] == pytest.approx(expected[1], rel=1e-5)
    # The checks above can tell the prompt's tokens apart: scored over prompt and answer, the same model's loss
    # moves by far more than their tolerance (a random model is near ln(vocabulary) everywhere, but not equal).
    with torch.no_grad():
        whole = [(base(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item(), len(ids) - 1)
                 for ids in (list(r["input_ids"]) + list(r["labels"]) for r in rows)]
    whole_mean = sum(loss * n for loss, n in whole) / sum(n for _, n in whole)
    assert abs(whole_mean - metrics["base"]["answer_loss"]) > 1e-4 * metrics["base"]["answer_loss"]
