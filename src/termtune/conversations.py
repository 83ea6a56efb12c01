"""Training data for models that train on their chat template: conversations in, prompt and answer token ids out.

Three sources become one shape, a conversation that ends with the assistant's answer:

- chat data: a `messages` column in the OpenAI shape, `[{"role": "system" | "user" | "assistant", "content": ...}]`,
  an optional system turn first, as many turns as wanted, the last one the assistant's;
- prompt/completion data: `prompt` and `completion` columns, each text (one user turn, one assistant turn) or, as
  TRL writes conversational prompt/completion data, a list of messages;
- the data stage's term → definition rows: the user asks data.prompt_template filled with the term (the prompt the
  data stage already made), the assistant answers with the shaped definition.

Each conversation is rendered through the model's own chat template. The prompt is everything up to and including
the generation prompt of the last assistant turn: exactly what Bedrock's server renders for a `messages` request
before the model answers. The answer is what follows, up to and including the template's end-of-turn token. Earlier
assistant turns are part of the prompt; the loss is on the last answer only (a conversation that should teach every
answer is written as several rows, one ending at each answer; they share the first user turn and so one side of the
data stage's split). The prompt's token ids must be the start of the whole conversation's ids, or training would
see other ids than the server sends; a row where they are not (the template joins prompt and answer inside one
token) is skipped and counted, and a template that does it to every conversation is an error before any row is
rendered.

A bad row is skipped and counted by reason, or with data.strict an error naming the file and line, as the data
stage does for term rows. termtune.data opens the source, splits the rendered rows and writes them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from termtune.chat_template import PROBLEMS, TEMPLATE_VARIABLES, ChatTemplate, check_template  # noqa: F401
from termtune.errors import UserError
from termtune.rowcheck import Findings, has_control_chars, text_key

ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    """One usable row as a conversation that ends with the assistant's answer."""

    where: str
    """The row, for messages: `file:line` for JSON Lines."""
    term: str
    """What the split keeps on one side: the term of a term row, the first user turn of a conversation."""
    messages: list[dict[str, str]]
    """role and content (trimmed) of each turn; other keys of the source messages are not kept."""

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]

    @property
    def question(self) -> str:
        """The last user turn: what a prepared row and the evaluation show as its prompt."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


@dataclass
class Conversations:
    """The usable conversations of a chat or prompt/completion source."""

    label: str
    kind: str
    """"messages" or "prompt_completion"."""
    rows_read: int
    items: list[Conversation]
    skipped: Counter
    """Rows skipped, by reason."""
    skip_examples: dict[str, str]


# ----------------------------------------------------------------------------- reading


def source_kind(columns: Iterable[str]) -> str | None:
    """"messages", "prompt_completion", or None for anything else (term rows: the data stage's own reader)."""
    columns = set(columns)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    return None


def read_conversations(opened: tuple[str, list[str], Iterator[Any]], *, strict: bool = False,
                       max_chars: int = 100_000, max_rows: int | None = None,
                       duplicates: str = "keep_first") -> Conversations:
    """Read a chat (`messages`) or prompt/completion source as termtune.data.open_source opened it (label, columns,
    rows); the keyword arguments are the data settings of the same names. Each turn is checked (max_chars applies
    to each turn's text); a bad row is skipped and counted, or with `strict` an error naming the row. A
    conversation repeated turn for turn (by text_key) is dropped and counted, or with duplicates="error" an error.
    At most max_rows conversations are kept."""
    label, columns, rows = opened
    kind = source_kind(columns)
    if kind is None:
        raise UserError(f"{label}: neither a messages column nor prompt and completion columns "
                        f"(columns: {', '.join(columns) or 'none'})")
    findings = Findings(strict=strict)
    items: list[Conversation] = []
    seen: dict[tuple, str] = {}  # the turns' keys -> where the conversation was first
    rows_read = 0
    for row in rows:
        rows_read += 1
        if row.problem:
            reason, _, detail = row.problem.partition(":")
            findings.add(reason, row.where, detail)
            continue
        assert row.values is not None
        if kind == "messages":
            messages = _check_messages(row.values.get("messages"), "messages", row.where, max_chars, findings)
        else:
            messages = _prompt_completion_messages(row.values, row.where, max_chars, findings)
        if messages is None:
            continue
        key = tuple((m["role"], text_key(m["content"])) for m in messages)
        if key in seen:
            duplicate = f"duplicate conversation (first at {seen[key]})"
            if duplicates == "error":
                raise UserError(f"{row.where}: {duplicate}; remove it or set data.duplicates=keep_first")
            findings.add("duplicate_conversation", row.where, duplicate)
            continue
        seen[key] = row.where
        first_user = next(m["content"] for m in messages if m["role"] == "user")
        items.append(Conversation(row.where, first_user, messages))
        if max_rows and len(items) >= max_rows:
            break
    if not items:
        reasons = ", ".join(f"{k}: {v}" for k, v in findings.skipped.items()) or "no rows"
        raise UserError(f"{label}: no usable rows ({reasons})")
    return Conversations(label, kind, rows_read, items, findings.skipped, findings.examples)


def term_conversations(examples: list[dict[str, str]], label: str) -> list[Conversation]:
    """The data stage's usable term rows (term, prompt, target) as one-question conversations. The question is the
    row's prompt, made by the data stage from data.prompt_template; the answer is the shaped definition."""
    return [Conversation(f"{label}: term {ex['term']!r}", ex["term"],
                         [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["target"]}])
            for ex in examples]


def _prompt_completion_messages(values: dict[str, Any], where: str, max_chars: int,
                                findings: Findings) -> list[dict[str, str]] | None:
    prompt, completion = values.get("prompt"), values.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational prompt/completion
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, list):
                findings.add("wrong_type", where, f"{name} is a {type(value).__name__} and the other side a list "
                             "of messages; give both as text or both as lists")
                return None
        if len(completion) != 1:
            findings.add("wrong_type", where, f"completion holds {len(completion)} messages, expected the one "
                         "assistant answer (earlier turns belong in prompt)")
            return None
        return _check_messages(prompt + completion, "prompt + completion", where, max_chars, findings)
    texts = []
    for name, value in (("prompt", prompt), ("completion", completion)):
        text = _check_text(value, name, where, max_chars, findings)
        if text is None:
            return None
        texts.append(text)
    return [{"role": "user", "content": texts[0]}, {"role": "assistant", "content": texts[1]}]


def _check_messages(messages: Any, name: str, where: str, max_chars: int,
                    findings: Findings) -> list[dict[str, str]] | None:
    """The conversation with each turn checked and trimmed, or None (the finding is counted or raised)."""
    if not isinstance(messages, list):
        what = "missing or null" if messages is None else f"a {type(messages).__name__}"
        findings.add("messages_not_list", where, f"{name} is {what}, expected a list of {{role, content}} objects")
        return None
    out = []
    for n, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            findings.add("messages_not_list", where, f"{name} item {n} is a {type(message).__name__}, "
                         "expected a {role, content} object")
            return None
        role = message.get("role")
        if role not in ROLES:
            findings.add("unknown_role", where, f"{name} item {n} has role {role!r}; expected system, user or "
                         "assistant")
            return None
        if role == "system" and n > 1:
            findings.add("misplaced_system", where, f"{name} item {n} is a system turn; only the first turn may be")
            return None
        content = _check_text(message.get("content"), f"{name} item {n} content", where, max_chars, findings)
        if content is None:
            return None
        out.append({"role": role, "content": content})
    roles = [m["role"] for m in out]
    if "assistant" not in roles:
        findings.add("no_assistant_turn", where, f"{name} has no assistant turn" + ("" if out else " (it is empty)"))
        return None
    if roles[-1] != "assistant":
        findings.add("last_turn_not_assistant", where, f"the last turn of {name} is the {roles[-1]}'s; "
                     "the last turn is the answer trained on and must be the assistant's")
        return None
    if "user" not in roles:
        findings.add("no_user_turn", where, f"{name} has no user turn")
        return None
    return out


def _check_text(value: Any, name: str, where: str, max_chars: int, findings: Findings) -> str | None:
    """`value` trimmed, or None when it is missing, not text, empty, too long or has control characters.

    Trimmed because the Llama 3 and Qwen3 templates trim turns themselves: the ids must not depend on whether a
    row's text ends in a newline."""
    if value is None:
        findings.add("empty_content", where, f"{name} is missing or null")
        return None
    if not isinstance(value, str):
        findings.add("wrong_type", where, f"{name} is a {type(value).__name__}, expected text")
        return None
    if has_control_chars(value):
        findings.add("control_characters", where, f"{name} contains control characters")
        return None
    text = value.strip()
    if not text:
        findings.add("empty_content", where, f"{name} is empty or whitespace only")
        return None
    if len(text) > max_chars:
        findings.add("overlong", where, f"{name} has {len(text)} characters (limit {max_chars})")
        return None
    return text


def render_conversations(conversations: list[Conversation], tokenizer: Any, max_prompt_tokens: int,
                         max_answer_tokens: int, findings: Findings,
                         lengths: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Each conversation rendered through the tokenizer's chat template as the data stage writes a row: term, prompt
    (the last user turn's text), target (the answer), input_ids (the rendered prompt up to and including the
    generation prompt) and labels (the answer's ids and the template's end-of-turn token). What a template writes
    after the end-of-turn token (Qwen's newline) is not part of the row: it carries no loss, and generation stops
    before it. A conversation that cannot be rendered is a finding. The untruncated lengths are appended to
    lengths["source"] (prompt) and lengths["target"] (answer).

    A prompt over max_prompt_tokens keeps its last tokens, the latest turns and the generation prompt (after the
    bos token, where the template starts with one), so the model still answers the last question; an answer over
    max_answer_tokens is cut and ends with its end-of-turn token, so the model still learns to stop."""
    template = ChatTemplate.of(tokenizer)
    template.check()
    bos = tokenizer.bos_token_id
    rows: list[dict[str, Any]] = []
    for conv in conversations:
        found = template.special_text and next(
            (m for m in map(template.special_text.search, (t["content"] for t in conv.messages)) if m), None)
        if found:
            findings.add("special_token_in_content", conv.where, f"the text holds the tokenizer's special token "
                         f"{found.group()!r}, which would end or open a turn inside it")
            continue
        try:
            rendered = template.render(conv.messages)
        except ValueError as e:
            findings.add("template_rejected", conv.where, f"the chat template refuses this conversation ({e})")
            continue
        if rendered.problem:
            findings.add(rendered.problem, conv.where, PROBLEMS[rendered.problem])
            continue
        prompt, answer = rendered.ids[:rendered.start], rendered.ids[rendered.start:rendered.end]
        lengths["source"].append(len(prompt))
        lengths["target"].append(len(answer))
        if len(prompt) > max_prompt_tokens:
            kept = prompt[:1] if bos is not None and prompt[0] == bos else []
            prompt = kept + prompt[len(prompt) - (max_prompt_tokens - len(kept)):]
        if len(answer) > max_answer_tokens:
            answer = answer[:max_answer_tokens - 1] + answer[-1:]
        rows.append({"term": conv.term, "prompt": conv.question, "target": conv.answer,
                     "input_ids": prompt, "labels": answer})
    if not rows:
        reasons = ", ".join(f"{k}: {v}" for k, v in findings.skipped.items())
        raise UserError(f"{template.name}: no conversation could be rendered ({reasons})")
    return rows
