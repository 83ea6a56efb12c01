"""Decoder training data: chat, prompt/completion and term rows rendered through the real chat templates of the
four decoder families in ../shared/models, with the loss mask checked token by token."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from conftest import SHARED, TOKENIZER_DIR, medquad_rows, write_jsonl
from termtune import conversations as cv
from termtune import data
from termtune.errors import UserError

MODELS = SHARED / "models"
# Each family's end-of-turn token, and what its template writes between the generation prompt and the answer.
FAMILIES = {
    "llama-3.2-1b-instruct": ("<|eot_id|>", ""),
    "qwen2.5-0.5b-instruct": ("<|im_end|>", ""),
    # Qwen3's template opens the final answer with an empty thinking block when the server renders it with its
    # defaults (thinking on): the model has to write it itself, so it is part of what is trained.
    "qwen3-0.6b": ("<|im_end|>", "<think>\n\n</think>\n\n"),
    "mistral-7b-instruct-v0.3": ("</s>", ""),
}
_tokenizers: dict[str, object] = {}


def tokenizer(name: str):
    from transformers import AutoTokenizer

    if name not in _tokenizers:
        _tokenizers[name] = AutoTokenizer.from_pretrained(MODELS / name)
    return _tokenizers[name]


def fresh_tokenizer(name: str):
    """A tokenizer of its own, for a test that changes its chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODELS / name)


def turn(role: str, content) -> dict:
    return {"role": role, "content": content}


def chat(*pairs: str, system: str | None = None) -> list[dict]:
    """user, assistant, user, assistant, ... turns (with a system turn first when given)."""
    turns = [turn("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(pairs)]
    return ([turn("system", system)] if system else []) + turns


def prepare(convs, tok, **kw):
    options = dict(test_size=1, seed=0, max_prompt_tokens=1024, max_completion_tokens=256)
    return cv.prepare_conversations(convs, tok, **{**options, **kw})


def conversation(messages: list[dict], where: str = "t:1") -> cv.Conversation:
    return cv.Conversation(where, next(m["content"] for m in messages if m["role"] == "user"), messages)


def only_row(prepared: cv.PreparedConversations) -> dict:
    (row,) = prepared.train + prepared.test
    return row


def masked(row: dict) -> list[int]:
    return [i for i, m in zip(row["input_ids"], row["completion_mask"]) if m]


# ----------------------------------------------------------------------------- reading and bad rows

GOOD = {"messages": chat("What is gout?", "A disease of the joints.")}
GOOD_TOO = {"messages": chat("What is asthma?", "A disease of the airways.", system="Answer briefly.")}
# reason -> a bad messages row (or raw line) of that kind
BAD_ROWS = {
    "messages_not_list": [{"messages": "What is gout?"}, {"messages": None}, {"text": "no messages key"},
                          {"messages": ["What is gout?", "A disease."]}],
    "unknown_role": [{"messages": [turn("human", "What is gout?"), turn("assistant", "A disease.")]},
                     {"messages": [turn("user", "Q?"), turn("tool", "{}"), turn("assistant", "A.")]},
                     {"messages": [{"content": "no role"}, turn("assistant", "A.")]}],
    "empty_content": [{"messages": chat("What is gout?", "")}, {"messages": chat("   \n", "A disease.")},
                      {"messages": [{"role": "user"}, turn("assistant", "A.")]},
                      {"messages": chat("Q?", None)}],
    "wrong_type": [{"messages": chat("What is gout?", 42)},
                   {"messages": [turn("user", [{"type": "text", "text": "Q?"}]), turn("assistant", "A.")]}],
    "control_characters": [{"messages": chat("What is \x00gout?", "A disease.")}],
    "overlong": [{"messages": chat("What is gout?", "A disease. " * 10)}],
    "misplaced_system": [{"messages": [turn("user", "Q?"), turn("system", "Be brief."), turn("assistant", "A.")]}],
    "no_assistant_turn": [{"messages": [turn("system", "Be brief."), turn("user", "What is gout?")]},
                          {"messages": []}],
    "last_turn_not_assistant": [{"messages": chat("What is gout?", "A disease.", "And asthma?")}],
    "no_user_turn": [{"messages": [turn("system", "Be brief."), turn("assistant", "A disease.")]}],
    "unparsable": ['{"messages": [', "[1, 2]"],
}


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_each_bad_row_is_counted_by_reason(tmp_path):
    rows = [GOOD] + [bad for bad_rows in BAD_ROWS.values() for bad in bad_rows]
    path = write_lines(tmp_path / "chat.jsonl", rows + [GOOD_TOO])
    path.write_bytes(path.read_bytes() + b'{"messages": "\xff"}\n')
    read = cv.read_conversations(str(path), max_chars=60)
    expected = {reason: len(bad) for reason, bad in BAD_ROWS.items()} | {"invalid_utf8": 1}
    assert dict(read.skipped) == expected
    assert read.kind == "messages"
    assert read.rows_read == len(rows) + 2
    assert [c.where for c in read.items] == [f"{path}:1", f"{path}:{len(rows) + 1}"]
    first_unknown_role = 2 + len(BAD_ROWS["messages_not_list"])  # after GOOD and the rows listed before it
    assert read.skip_examples["unknown_role"] == f"{path}:{first_unknown_role}: messages item 1 has role " \
                                                 "'human'; expected system, user or assistant"


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_strict_names_file_and_line_of_each_bad_row(tmp_path, reason):
    for bad in BAD_ROWS[reason]:
        path = write_lines(tmp_path / "chat.jsonl", [GOOD, GOOD_TOO, bad, {"messages": chat("Q?", "A.")}])
        with pytest.raises(UserError) as e:
            cv.read_conversations(str(path), strict=True, max_chars=60)
        message = str(e.value)
        assert message.startswith(f"{path}:3: ") and "\n" not in message
        # without strict the same file is read, the row counted
        assert cv.read_conversations(str(path), max_chars=60).skipped == {reason: 1}


def test_prompt_completion_rows_text_and_conversational(tmp_path):
    path = write_lines(tmp_path / "pc.jsonl", [
        {"prompt": " What is gout? ", "completion": "A disease of the joints.\n"},
        {"prompt": [turn("system", "Be brief."), turn("user", "What is asthma?")],
         "completion": [turn("assistant", "A disease of the airways.")]},
        {"prompt": "", "completion": "A."},                                      # empty_content
        {"prompt": "Q?", "completion": 5},                                      # wrong_type
        {"prompt": "Q?"},                                                       # empty_content: no completion
        {"prompt": [turn("user", "Q?")], "completion": "A."},                   # wrong_type: list and text
        {"prompt": [turn("user", "Q?")], "completion": chat("A.", "B?", "C.")[:2]},  # wrong_type: two turns
        {"prompt": [turn("user", "Q?")], "completion": [turn("user", "A.")]},   # no_assistant_turn
    ])
    read = cv.read_conversations(str(path))
    assert read.kind == "prompt_completion"
    assert [c.messages for c in read.items] == [
        chat("What is gout?", "A disease of the joints."),
        [turn("system", "Be brief."), turn("user", "What is asthma?"), turn("assistant", "A disease of the airways.")],
    ]
    assert [c.term for c in read.items] == ["What is gout?", "What is asthma?"]
    assert read.skipped == {"empty_content": 2, "wrong_type": 3, "no_assistant_turn": 1}
    with pytest.raises(UserError, match=rf"^{path}:3: prompt is empty or whitespace only"):
        cv.read_conversations(str(path), strict=True)


def test_a_repeated_conversation_is_dropped_or_refused(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [
        GOOD, {"messages": chat("What is asthma?", "A disease of the airways.")},
        {"messages": chat("  what is GOUT?", "A disease of the joints. ")},  # GOOD again, spelled differently
        {"messages": chat("What is gout?", "A disease of the joints.", "Is it common?", "Yes.")}])  # continued
    read = cv.read_conversations(str(path))
    assert read.skipped == {"duplicate_conversation": 1}
    assert [c.where for c in read.items] == [f"{path}:1", f"{path}:2", f"{path}:4"]
    assert read.skip_examples["duplicate_conversation"] == f"{path}:3: duplicate conversation (first at {path}:1)"
    with pytest.raises(UserError, match=rf"^{path}:3: duplicate conversation \(first at {path}:1\); remove it"):
        cv.read_conversations(str(path), duplicates="error")


def test_a_source_of_term_rows_is_not_read_as_conversations(tmp_path):
    path = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(3))
    with pytest.raises(UserError, match="neither a messages column nor prompt and completion columns "
                                        r"\(columns: term, definition\)"):
        cv.read_conversations(str(path))
    assert cv.source_kind(["term", "definition"]) is None


def test_nothing_usable_is_an_error(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", BAD_ROWS["no_assistant_turn"])
    with pytest.raises(UserError, match=r"no usable rows \(no_assistant_turn: 2\)"):
        cv.read_conversations(str(path))


# ----------------------------------------------------------------------------- rendering and the loss mask


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_mask_covers_exactly_the_answer_and_end_of_turn(name):
    tok = tokenizer(name)
    eot, opening = FAMILIES[name]
    single = chat("What is gout?", "A disease of the joints, caused by uric acid crystals.")
    multi = chat("What is gout?", "A joint disease.", "And what is asthma?", "A disease of the airways.",
                 system="Answer in one sentence.")
    prepared = prepare([conversation(single, "t:1"), conversation(multi, "t:2")], tok)
    rows = {r["messages"][-1]["content"]: r for r in prepared.train + prepared.test}
    for messages in (single, multi):
        row = rows[messages[-1]["content"]]
        rendered = tok.apply_chat_template(messages, **cv.TEMPLATE_VARIABLES)["input_ids"]
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                         **cv.TEMPLATE_VARIABLES)["input_ids"]
        # the ids are the template's own tokenization of the whole conversation; the prompt is its start
        assert row["input_ids"] == rendered
        assert row["input_ids"][:len(prompt)] == prompt
        assert row["completion_mask"][:len(prompt)] == [0] * len(prompt)
        # the loss is on the (last) answer and the end-of-turn token, nothing else
        answer = tok(opening + messages[-1]["content"], add_special_tokens=False)["input_ids"]
        assert masked(row) == answer + [tok.convert_tokens_to_ids(eot)]
        first_masked = row["completion_mask"].index(1)
        assert first_masked == len(prompt)
        assert row["completion_mask"][first_masked:first_masked + len(answer) + 1] == [1] * (len(answer) + 1)
        assert tok.decode(row["input_ids"][:len(prompt)]) == row["prompt"]
        assert row["prompt"] + row["completion"] == tok.apply_chat_template(messages, tokenize=False,
                                                                            **cv.TEMPLATE_VARIABLES)
    # an earlier answer is in the prompt and carries no loss
    row = rows[multi[-1]["content"]]
    earlier = tok("A joint disease.", add_special_tokens=False)["input_ids"]
    at = next(i for i in range(len(row["input_ids"])) if row["input_ids"][i:i + len(earlier)] == earlier)
    assert row["completion_mask"][at:at + len(earlier)] == [0] * len(earlier)
    assert "A joint disease." in row["prompt"]


def test_llama_system_header_does_not_change_with_the_day():
    tok = tokenizer("llama-3.2-1b-instruct")
    row = only_row(prepare([conversation(chat("What is gout?", "A joint disease."))], tok))
    assert "Today Date: 26 Jul 2024" in row["prompt"]


def test_truncation_keeps_the_prompt_end_and_the_end_of_turn():
    tok = tokenizer("qwen2.5-0.5b-instruct")
    messages = chat("What is gout?", "Gout is a form of arthritis caused by uric acid crystals in the joints.")
    full = only_row(prepare([conversation(messages)], tok))
    cut = prepare([conversation(messages)], tok, max_prompt_tokens=8, max_completion_tokens=5)
    row = only_row(cut)
    start = full["completion_mask"].index(1)
    answer = masked(full)
    assert row["input_ids"][:8] == full["input_ids"][start - 8:start]  # the prompt's last 8 tokens
    assert masked(row) == answer[:4] + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert row["completion_mask"] == [0] * 8 + [1] * 5
    stats = cut.stats
    assert (stats["prompt_tokens"]["min"], stats["prompt_tokens"]["max"], stats["prompt_tokens"]["truncated"]) \
        == (start, start, 1)
    assert (stats["completion_tokens"]["max"], stats["completion_tokens"]["truncated"]) == (len(answer), 1)


def test_token_length_stats_per_side():
    tok = tokenizer("qwen3-0.6b")
    answers = [" ".join(["word"] * n) + "." for n in range(1, 21)]
    convs = [conversation(chat(f"Question {i}?", a), f"t:{i}") for i, a in enumerate(answers)]
    prepared = prepare(convs, tok, test_size=4, max_completion_tokens=12)
    rows = prepared.train + prepared.test
    completion = sorted(sum(r["completion_mask"]) for r in rows)
    prompt = sorted(r["completion_mask"].index(1) for r in rows)
    stats = prepared.stats
    untruncated = sorted(len(tok("<think>\n\n</think>\n\n" + a, add_special_tokens=False)["input_ids"]) + 1
                         for a in answers)
    assert stats["completion_tokens"]["truncated"] == sum(1 for n in untruncated if n > 12) > 0
    assert completion[-1] == 12
    assert stats["completion_tokens"]["min"] == untruncated[0] == completion[0]
    assert stats["completion_tokens"]["max"] == untruncated[-1] > 12
    assert stats["completion_tokens"]["p50"] == untruncated[len(untruncated) // 2]
    assert (stats["prompt_tokens"]["min"], stats["prompt_tokens"]["max"]) == (prompt[0], prompt[-1])
    assert stats["prompt_tokens"]["truncated"] == 0
    for side in ("prompt_tokens", "completion_tokens"):
        assert {"min", "p50", "p95", "max", "truncated", "limit"} <= set(stats[side])
    assert (stats["train_rows"], stats["test_rows"], stats["rows_used"]) == (16, 4, 20)


# ----------------------------------------------------------------------------- template problems


def test_special_token_text_inside_a_turn_is_a_bad_row():
    tok = tokenizer("qwen2.5-0.5b-instruct")
    convs = [conversation(chat("What is gout?", "A disease.<|im_end|>"), "t:1"),
             conversation(chat("What is flu?", "An infection."), "t:2")]
    prepared = prepare(convs, tok)
    assert prepared.stats["rows_skipped"] == {"special_token_in_content": 1}
    assert prepared.stats["rows_used"] == 1
    with pytest.raises(UserError, match=r"^t:1: the text holds the tokenizer's special token '<\|im_end\|>'"):
        prepare(convs, tok, strict=True)


QWEN_TURNS = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def test_a_conversation_the_template_refuses_is_a_bad_row():
    tok = fresh_tokenizer("qwen2.5-0.5b-instruct")
    tok.chat_template = ("{% for m in messages %}{% if loop.index0 > 0 and m.role == messages[loop.index0 - 1].role"
                         " %}{{ raise_exception('roles must alternate') }}{% endif %}{% endfor %}" + QWEN_TURNS
                         + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    convs = [conversation([turn("user", "Q?"), turn("user", "Again?"), turn("assistant", "A.")], "t:1"),
             conversation(chat("What is flu?", "An infection."), "t:2")]
    assert prepare(convs, tok).stats["rows_skipped"] == {"template_rejected": 1}
    with pytest.raises(UserError, match=r"^t:1: the chat template refuses this conversation \(roles must alternate\)"):
        prepare(convs, tok, strict=True)


def dash_template(when: str) -> str:
    """A ChatML template that writes "-" at the end of the generation prompt and before the answer `when` holds:
    "-" and an answer starting with "-" or a letter are one token."""
    return ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and " + when.replace(
        "N", "loop.index0") + " %}-{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% if " + when.replace("N", "messages|length")
            + " %}-{% endif %}{% endif %}")


def test_a_prompt_that_ends_inside_the_answers_first_token_is_detected():
    tok = fresh_tokenizer("qwen2.5-0.5b-instruct")
    tok.chat_template = dash_template("N > 1")  # only after a multi-turn prompt
    convs = [conversation(chat("What is flu?", "An infection."), "t:1"),
             conversation(chat("Q?", "A.", "And?", "-- dash"), "t:2")]
    prepared = prepare(convs, tok)
    assert prepared.stats["rows_skipped"] == {"token_boundary": 1}
    assert [r["messages"] for r in prepared.train + prepared.test] == [convs[0].messages]
    with pytest.raises(UserError, match="^t:2: the chat template joins the prompt and the answer inside one token"):
        prepare(convs, tok, strict=True)
    # a template that does it to every conversation is refused before any row
    tok.chat_template = dash_template("true")
    with pytest.raises(UserError, match="joins the prompt and the answer inside one token even for a plain"):
        cv.check_template(tok)
    with pytest.raises(UserError, match="joins the prompt and the answer inside one token even for a plain"):
        prepare(convs[:1], tok)


def test_a_template_without_an_end_of_turn_token_is_refused():
    tok = fresh_tokenizer("qwen2.5-0.5b-instruct")
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}assistant:{% endif %}"
    with pytest.raises(UserError, match="no special token ends the assistant's answer even for a plain"):
        cv.check_template(tok)


def test_a_tokenizer_without_a_chat_template_is_refused():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)  # Flan-T5: no chat template
    with pytest.raises(UserError, match="the tokenizer has no chat template"):
        prepare([conversation(chat("Q?", "A."))], tok)


# ----------------------------------------------------------------------------- the split


def same_key(text: str) -> str:
    """What the split must treat as one first user turn, written out independently of termtune's rule."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split()).rstrip(".?! ")


def test_split_keeps_each_conversation_on_one_side(tmp_path):
    rows = []
    for i, name in enumerate(["gout", "asthma", "flu", "mumps", "rabies", "anemia", "acne", "lupus", "polio"]):
        question = f"What is {name}?"
        rows += [{"messages": chat(question, f"{name} is disease number {i}.")},
                 # the same conversation continued: another row ending at its second answer
                 {"messages": chat(question, f"{name} is disease number {i}.", "Is it common?", f"Yes, {i}.")},
                 # a near-copy of the first user turn, spelled differently
                 {"messages": chat(f"  WHAT IS {name.upper()}", f"A disease (number {i}).")}]
    read = cv.read_conversations(str(write_jsonl(tmp_path / "chat.jsonl", rows)))
    tok = tokenizer("qwen2.5-0.5b-instruct")
    test_sides = set()
    for seed in range(6):
        prepared = prepare(read.items, tok, test_size=0.3, seed=seed)
        train = {same_key(r["messages"][0]["content"]) for r in prepared.train}
        test = {same_key(r["messages"][0]["content"]) for r in prepared.test}
        assert train and test and train.isdisjoint(test)
        assert len(prepared.test) % 3 == 0  # whole conversations, all three rows of one
        assert prepared.stats["split_merged"]["term"] == 18
        test_sides.add(frozenset(test))
    assert len(test_sides) > 1  # the seed decides


def test_term_rows_become_one_question_conversations_split_by_term():
    tok = tokenizer("llama-3.2-1b-instruct")
    examples = []
    for r in [{"term": "Asthma", "definition": "A lung disease."}] + medquad_rows(40, seed=3) + \
            [{"term": "asthma.", "definition": "Another text about asthma."}]:  # one term, far apart
        examples.append({"term": r["term"], "target": data.shape_target(r["definition"], "first_n_sentences", 1),
                         "prompt": f"What is {r['term']}?"})  # as the data stage fills data.prompt_template
    convs = cv.term_conversations(examples, "medquad.jsonl")
    assert convs[0].messages == [turn("user", examples[0]["prompt"]), turn("assistant", examples[0]["target"])]
    assert convs[0].where == f"medquad.jsonl: term {examples[0]['term']!r}"
    for seed in range(5):
        prepared = prepare(convs, tok, test_size=0.25, seed=seed)
        train, test = prepared.train, prepared.test
        assert {same_key(r["term"]) for r in train}.isdisjoint({same_key(r["term"]) for r in test})
        assert {r["term"] for r in train + test} == {ex["term"] for ex in examples}
        assert all("<|start_header_id|>user<|end_header_id|>\n\nWhat is " in r["prompt"] for r in train + test)
