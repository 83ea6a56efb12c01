"""Decoder training data: chat, prompt/completion and term rows rendered through the real chat templates of the
four decoder families in ../shared/models, the prompt and answer ids checked token by token, and the data stage
that writes them (with the real Llama 3.2 and Qwen2.5 tokenizers)."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import SHARED, TOKENIZER_DIR, medquad_rows, tiny_overrides, write_jsonl
from termtune import conversations as cv
from termtune import data
from termtune.config import load_config
from termtune.errors import UserError
from termtune.rowcheck import Findings

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


def render(convs, tok, strict: bool = False, max_prompt_tokens: int = 1024, max_answer_tokens: int = 256):
    """render_conversations' rows, with what it counted and the untruncated lengths."""
    findings = Findings(strict=strict)
    lengths: dict[str, list[int]] = {"source": [], "target": []}
    rows = cv.render_conversations(convs, tok, max_prompt_tokens, max_answer_tokens, findings, lengths)
    return SimpleNamespace(rows=rows, skipped=dict(findings.skipped), lengths=lengths)


def conversation(messages: list[dict], where: str = "t:1") -> cv.Conversation:
    return cv.Conversation(where, next(m["content"] for m in messages if m["role"] == "user"), messages)


def read_file(path: Path, **settings) -> cv.Conversations:
    return cv.read_conversations(data.open_source(str(path), "train", None), **settings)


def template_text(tok, messages: list[dict], **kw) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **cv.TEMPLATE_VARIABLES, **kw)


def template_ids(tok, messages: list[dict], **kw) -> list[int]:
    return tok.apply_chat_template(messages, **cv.TEMPLATE_VARIABLES, **kw)["input_ids"]


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
    read = read_file(path, max_chars=60)
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
            read_file(path, strict=True, max_chars=60)
        message = str(e.value)
        assert message.startswith(f"{path}:3: ") and "\n" not in message
        # without strict the same file is read, the row counted
        assert read_file(path, max_chars=60).skipped == {reason: 1}


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
    read = read_file(path)
    assert read.kind == "prompt_completion"
    assert [c.messages for c in read.items] == [
        chat("What is gout?", "A disease of the joints."),
        [turn("system", "Be brief."), turn("user", "What is asthma?"), turn("assistant", "A disease of the airways.")],
    ]
    assert [c.term for c in read.items] == ["What is gout?", "What is asthma?"]
    assert read.skipped == {"empty_content": 2, "wrong_type": 3, "no_assistant_turn": 1}
    with pytest.raises(UserError, match=rf"^{path}:3: prompt is empty or whitespace only"):
        read_file(path, strict=True)


def test_a_repeated_conversation_is_dropped_or_refused(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [
        GOOD, {"messages": chat("What is asthma?", "A disease of the airways.")},
        {"messages": chat("  what is GOUT?", "A disease of the joints. ")},  # GOOD again, spelled differently
        {"messages": chat("What is gout?", "A disease of the joints.", "Is it common?", "Yes.")}])  # continued
    read = read_file(path)
    assert read.skipped == {"duplicate_conversation": 1}
    assert [c.where for c in read.items] == [f"{path}:1", f"{path}:2", f"{path}:4"]
    assert read.skip_examples["duplicate_conversation"] == f"{path}:3: duplicate conversation (first at {path}:1)"
    with pytest.raises(UserError, match=rf"^{path}:3: duplicate conversation \(first at {path}:1\); remove it"):
        read_file(path, duplicates="error")


def test_a_source_of_term_rows_is_not_read_as_conversations(tmp_path):
    path = write_jsonl(tmp_path / "terms.jsonl", medquad_rows(3))
    with pytest.raises(UserError, match="neither a messages column nor prompt and completion columns "
                                        r"\(columns: term, definition\)"):
        read_file(path)
    assert cv.source_kind(["term", "definition"]) is None


def test_nothing_usable_is_an_error(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", BAD_ROWS["no_assistant_turn"])
    with pytest.raises(UserError, match=r"no usable rows \(no_assistant_turn: 2\)"):
        read_file(path)


# ----------------------------------------------------------------------------- rendering: prompt and answer ids


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_prompt_ids_end_at_the_generation_prompt_and_labels_are_the_answer_and_end_of_turn(name):
    tok = tokenizer(name)
    eot, opening = FAMILIES[name]
    single = chat("What is gout?", "A disease of the joints, caused by uric acid crystals.")
    multi = chat("What is gout?", "A joint disease.", "And what is asthma?", "A disease of the airways.",
                 system="Answer in one sentence.")
    rows = {r["target"]: r for r in render([conversation(single, "t:1"), conversation(multi, "t:2")], tok).rows}
    for messages in (single, multi):
        row = rows[messages[-1]["content"]]
        whole = template_ids(tok, messages)
        prompt = template_ids(tok, messages[:-1], add_generation_prompt=True)
        # input_ids: exactly what a `messages` request renders before the model answers
        assert row["input_ids"] == prompt
        assert tok.decode(row["input_ids"]) == template_text(tok, messages[:-1], add_generation_prompt=True)
        # labels: the (last) answer and the end-of-turn token, nothing else
        answer = tok(opening + messages[-1]["content"], add_special_tokens=False)["input_ids"]
        assert row["labels"] == answer + [tok.convert_tokens_to_ids(eot)]
        # together: the template's own tokenization of the whole conversation, up to the end-of-turn token
        n = len(row["input_ids"]) + len(row["labels"])
        assert row["input_ids"] + row["labels"] == whole[:n] and not tok.decode(whole[n:]).strip()
        assert (row["term"], row["prompt"], row["target"]) == \
            (messages[-4 if len(messages) > 2 else -2]["content"], messages[-2]["content"], messages[-1]["content"])
    # an earlier answer is in the prompt, so it carries no loss
    row = rows[multi[-1]["content"]]
    assert "A joint disease." in tok.decode(row["input_ids"]) and "A joint disease." not in tok.decode(row["labels"])


def test_llama_system_header_does_not_change_with_the_day():
    tok = tokenizer("llama-3.2-1b-instruct")
    (row,) = render([conversation(chat("What is gout?", "A joint disease."))], tok).rows
    assert "Today Date: 26 Jul 2024" in tok.decode(row["input_ids"])


def test_truncation_keeps_the_prompt_end_and_the_end_of_turn():
    tok = tokenizer("qwen2.5-0.5b-instruct")  # no bos token: the prompt's last tokens are all it keeps
    messages = chat("What is gout?", "Gout is a form of arthritis caused by uric acid crystals in the joints.")
    (full,) = render([conversation(messages)], tok).rows
    cut = render([conversation(messages)], tok, max_prompt_tokens=8, max_answer_tokens=5)
    (row,) = cut.rows
    assert row["input_ids"] == full["input_ids"][-8:]
    assert tok.decode(row["input_ids"]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert row["labels"] == full["labels"][:4] + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert cut.lengths == {"source": [len(full["input_ids"])], "target": [len(full["labels"])]}


def test_a_cut_prompt_keeps_its_bos_token():
    tok = tokenizer("llama-3.2-1b-instruct")
    messages = chat("What is gout?", "A joint disease.")
    (full,) = render([conversation(messages)], tok).rows
    (row,) = render([conversation(messages)], tok, max_prompt_tokens=10).rows
    assert full["input_ids"][0] == tok.bos_token_id and len(full["input_ids"]) > 10
    assert row["input_ids"] == [tok.bos_token_id] + full["input_ids"][-9:]


# ----------------------------------------------------------------------------- template problems


def test_special_token_text_inside_a_turn_is_a_bad_row():
    tok = tokenizer("qwen2.5-0.5b-instruct")
    convs = [conversation(chat("What is gout?", "A disease.<|im_end|>"), "t:1"),
             conversation(chat("What is flu?", "An infection."), "t:2")]
    rendered = render(convs, tok)
    assert rendered.skipped == {"special_token_in_content": 1}
    assert [r["target"] for r in rendered.rows] == ["An infection."]
    with pytest.raises(UserError, match=r"^t:1: the text holds the tokenizer's special token '<\|im_end\|>'"):
        render(convs, tok, strict=True)


QWEN_TURNS = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def test_a_conversation_the_template_refuses_is_a_bad_row():
    tok = fresh_tokenizer("qwen2.5-0.5b-instruct")
    tok.chat_template = ("{% for m in messages %}{% if loop.index0 > 0 and m.role == messages[loop.index0 - 1].role"
                         " %}{{ raise_exception('roles must alternate') }}{% endif %}{% endfor %}" + QWEN_TURNS
                         + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    convs = [conversation([turn("user", "Q?"), turn("user", "Again?"), turn("assistant", "A.")], "t:1"),
             conversation(chat("What is flu?", "An infection."), "t:2")]
    assert render(convs, tok).skipped == {"template_rejected": 1}
    with pytest.raises(UserError, match=r"^t:1: the chat template refuses this conversation \(roles must alternate\)"):
        render(convs, tok, strict=True)


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
    rendered = render(convs, tok)
    assert rendered.skipped == {"token_boundary": 1}
    assert [r["target"] for r in rendered.rows] == [convs[0].answer]
    with pytest.raises(UserError, match="^t:2: the chat template joins the prompt and the answer inside one token"):
        render(convs, tok, strict=True)
    # a template that does it to every conversation is refused before any row
    tok.chat_template = dash_template("true")
    with pytest.raises(UserError, match="joins the prompt and the answer inside one token even for a plain"):
        cv.check_template(tok)
    with pytest.raises(UserError, match="joins the prompt and the answer inside one token even for a plain"):
        render(convs[:1], tok)


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
        render([conversation(chat("Q?", "A."))], tok)


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
    read = read_file(write_jsonl(tmp_path / "chat.jsonl", rows))
    rendered = render(read.items, tokenizer("qwen2.5-0.5b-instruct")).rows
    assert [r["term"] for r in rendered[:3]] == ["What is gout?", "What is gout?", "WHAT IS GOUT"]
    test_sides = set()
    for seed in range(6):
        split = data.split_rows(rendered, 0.3, seed)  # as the data stage splits them
        train = {same_key(r["term"]) for r in split.train}
        test = {same_key(r["term"]) for r in split.test}
        assert train and test and train.isdisjoint(test)
        assert len(split.test) % 3 == 0  # whole conversations, all three rows of one
        assert split.merged["term"] == 18
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
    rendered = render(convs, tok).rows
    assert [(r["term"], r["prompt"], r["target"]) for r in rendered] == \
        [(ex["term"], ex["prompt"], ex["target"]) for ex in examples]
    assert all("<|start_header_id|>user<|end_header_id|>\n\nWhat is " in tok.decode(r["input_ids"]) for r in rendered)
    for seed in range(5):
        split = data.split_rows(rendered, 0.25, seed)
        assert {same_key(r["term"]) for r in split.train}.isdisjoint({same_key(r["term"]) for r in split.test})


# ----------------------------------------------------------------------------- the data stage


def decoder_cfg(tmp_path: Path, model: str, source: Path, *extra: str):
    """The data stage's settings for a decoder family: the real tokenizer and chat template of `model`."""
    folder = MODELS / model
    return load_config(None, [f"run.dir={tmp_path / 'run'}", f"model.source={folder}", "model.init=random",
                              f"model.architecture={folder / 'config.json'}", f"data.source={source}",
                              "data.test_size=2", *extra])


def prepared_rows(cfg) -> list[dict]:
    return [json.loads(line) for split in ("train", "test")
            for line in (cfg.run_dir / "data" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


CHAT_ROWS = [
    {"messages": chat("What is gout?", "A form of arthritis caused by uric acid crystals.",
                      system="Answer in one sentence.")},
    {"messages": chat("What is asthma?", "A disease of the airways.", "Is it common?", "Yes, very common.")},
    {"messages": chat("What is flu?", "An infection by the influenza virus.", "How does it spread?",
                      "By droplets when people cough.", system="You are a careful medical assistant.")},
    {"messages": chat("What is anemia?", "Too few red blood cells.")},
    {"messages": chat("What is acne?", "A skin condition of the hair follicles.")},
]


@pytest.mark.parametrize("model", ["llama-3.2-1b-instruct", "qwen2.5-0.5b-instruct"])
def test_chat_data_is_prepared_as_the_template_renders_it(tmp_path, model):
    source = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    cfg = decoder_cfg(tmp_path, model, source)
    prepared = data.prepare(cfg)
    tok, (eot, _) = tokenizer(model), FAMILIES[model]
    rows = prepared_rows(cfg)
    conversations = {r["messages"][-1]["content"]: r["messages"] for r in CHAT_ROWS}
    assert sorted(r["target"] for r in rows) == sorted(conversations)
    for row in rows:
        messages = conversations[row["target"]]
        assert set(row) == {"term", "prompt", "target", "input_ids", "labels"}
        assert tok.decode(row["input_ids"]) == template_text(tok, messages[:-1], add_generation_prompt=True)
        assert row["input_ids"] == template_ids(tok, messages[:-1], add_generation_prompt=True)
        assert tok.decode(row["labels"]) == messages[-1]["content"] + eot
        assert row["labels"] == tok(messages[-1]["content"], add_special_tokens=False)["input_ids"] + \
            [tok.convert_tokens_to_ids(eot)]
        users = [m["content"] for m in messages if m["role"] == "user"]
        assert (row["term"], row["prompt"]) == (users[0], users[-1])
    stats = prepared.stats
    assert (stats["source_kind"], stats["rows_read"], stats["rows_used"], stats["train_rows"], stats["test_rows"]) \
        == ("messages", 5, 5, 3, 2)
    assert "columns" not in stats and "prompt_template" not in stats and stats["chat_template"] == str(MODELS / model)
    prompt_lengths = sorted(len(template_ids(tok, m[:-1], add_generation_prompt=True)) for m in conversations.values())
    assert (stats["source_tokens"]["max"], stats["source_tokens"]["limit"]) == (prompt_lengths[-1], 128)
    assert stats["target_tokens"]["max"] == max(len(r["labels"]) for r in rows)
    assert json.loads((cfg.run_dir / "data" / "stats.json").read_text()) == stats
    summary = data.summary(stats)
    assert f"data: {source} (chat data)" in summary and "by first user turn" in summary
    assert "  prompt tokens: " in summary and "  answer tokens: " in summary


def test_prompt_completion_data_text_and_conversational(tmp_path):
    rows = [
        {"prompt": "What is gout?", "completion": "A form of arthritis."},
        {"prompt": [turn("system", "Be brief."), turn("user", "What is asthma?")],
         "completion": [turn("assistant", "A disease of the airways.")]},
        {"prompt": [turn("user", "What is flu?"), turn("assistant", "An infection."), turn("user", "Is it serious?")],
         "completion": [turn("assistant", "Sometimes, for the old and the very young.")]},
        {"prompt": "What is acne?", "completion": "A skin condition."},
    ]
    cfg = decoder_cfg(tmp_path, "qwen2.5-0.5b-instruct", write_jsonl(tmp_path / "pc.jsonl", rows))
    assert data.prepare(cfg).stats["source_kind"] == "prompt_completion"
    tok = tokenizer("qwen2.5-0.5b-instruct")
    expected = {}
    for r in rows:
        messages = r["prompt"] + r["completion"] if isinstance(r["prompt"], list) else \
            chat(r["prompt"], r["completion"])
        expected[messages[-1]["content"]] = messages
    written = prepared_rows(cfg)
    assert sorted(r["target"] for r in written) == sorted(expected)
    for row in written:
        messages = expected[row["target"]]
        assert row["input_ids"] == template_ids(tok, messages[:-1], add_generation_prompt=True)
        assert tok.decode(row["labels"]) == messages[-1]["content"] + "<|im_end|>"
    flu = next(r for r in written if r["term"] == "What is flu?")
    assert flu["prompt"] == "Is it serious?" and "An infection." in tok.decode(flu["input_ids"])


def test_the_data_stage_counts_each_bad_row_or_names_it_with_strict(tmp_path):
    good = [GOOD, GOOD_TOO, {"messages": chat("What is flu?", "An infection.")}]
    bad = {reason: rows[0] for reason, rows in BAD_ROWS.items()}
    path = write_lines(tmp_path / "chat.jsonl", good + list(bad.values()))
    stats = data.prepare(decoder_cfg(tmp_path, "qwen2.5-0.5b-instruct", path, "data.max_chars=60")).stats
    assert stats["rows_skipped"] == {reason: 1 for reason in bad}
    assert (stats["rows_read"], stats["rows_used"]) == (len(good) + len(bad), len(good))
    for reason in bad:
        path = write_lines(tmp_path / f"{reason}.jsonl", good + [bad[reason]])
        cfg = decoder_cfg(tmp_path / reason, "qwen2.5-0.5b-instruct", path, "data.max_chars=60", "data.strict=true")
        with pytest.raises(UserError) as e:
            data.prepare(cfg)
        assert str(e.value).startswith(f"{path}:{len(good) + 1}: ") and "\n" not in str(e.value), reason
        assert not (cfg.run_dir / "data").exists()


def test_a_row_the_template_cannot_render_is_counted_by_the_data_stage(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, GOOD_TOO, {"messages": chat("What is flu?", "An infection.")},
                                                 {"messages": chat("What is <|im_end|>?", "A special token.")}])
    stats = data.prepare(decoder_cfg(tmp_path, "qwen2.5-0.5b-instruct", path)).stats
    assert stats["rows_skipped"] == {"special_token_in_content": 1} and stats["rows_used"] == 3
    assert stats["skip_examples"]["special_token_in_content"].startswith(f"{path}:4: the text holds")
    with pytest.raises(UserError, match=rf"^{path}:4: the text holds the tokenizer's special token"):
        data.prepare(decoder_cfg(tmp_path / "strict", "qwen2.5-0.5b-instruct", path, "data.strict=true"))


def test_the_data_stage_keeps_conversations_sharing_a_first_user_turn_on_one_side(tmp_path):
    rows = []
    for i, name in enumerate(["gout", "asthma", "flu", "mumps", "rabies", "anemia", "acne", "lupus"]):
        rows += [{"messages": chat(f"What is {name}?", f"Disease {i}.")},
                 {"messages": chat(f"What is {name}?", f"Disease {i}.", "Is it common?", f"Yes, {i}.")},
                 {"messages": chat(f"what is {name.upper()}", f"Illness {i}.", system="Be brief.")}]
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    for seed in range(3):
        cfg = decoder_cfg(tmp_path / str(seed), "qwen2.5-0.5b-instruct", source, "data.test_size=0.25",
                          f"run.seed={seed}")
        data.prepare(cfg)
        train, test = (read_split(cfg, split) for split in ("train", "test"))
        assert len(test) == 6 and len(train) == 18
        assert {same_key(r["term"]) for r in train}.isdisjoint({same_key(r["term"]) for r in test})


def read_split(cfg, split: str) -> list[dict]:
    return [json.loads(line) for line in (cfg.run_dir / "data" / f"{split}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("rows", [[GOOD, GOOD_TOO], [{"prompt": "What is gout?", "completion": "A disease."}]])
def test_chat_data_for_a_model_without_a_chat_template_family_is_refused(tmp_path, rows):
    source = write_jsonl(tmp_path / "chat.jsonl", rows * 3)
    cfg = load_config(None, tiny_overrides(tmp_path / "run", source))  # Flan-T5
    with pytest.raises(UserError) as e:
        data.prepare(cfg)
    assert str(e.value).startswith(f"{source}: ") and "\n" not in str(e.value)
    assert "needs a model that trains on its chat template" in str(e.value)
    assert not (cfg.run_dir / "data").exists()


def test_columns_named_in_the_config_are_read_as_term_rows(tmp_path):
    rows = [{"prompt": r["term"], "completion": r["definition"]} for r in medquad_rows(12)]
    source = write_jsonl(tmp_path / "pc.jsonl", rows)
    cfg = load_config(None, tiny_overrides(tmp_path / "run", source) + ["data.term_column=prompt",
                                                                        "data.definition_column=completion"])
    stats = data.prepare(cfg).stats
    assert stats["source_kind"] == "terms" and stats["columns"] == {"term": "prompt", "definition": "completion"}
    assert stats["rows_used"] == 12
