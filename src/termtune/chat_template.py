"""A model's chat template as termtune trains on it: a conversation rendered and tokenized, split into the prompt
(everything up to and including the generation prompt of the last assistant turn: what Bedrock's server renders for
a `messages` request) and the answer (up to the template's end-of-turn token).

Used by termtune.conversations (every row the data stage prepares for a family with chat_data) and by the
decoder families' `encode` (what `termtune plan` estimates lengths with).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from termtune.errors import UserError

# Llama 3.x templates write "Today Date: <the day it was rendered>" into every system header. A fixed day keeps
# prepared data (and so every fingerprint after it) the same tomorrow; it is the template's own fallback date.
TEMPLATE_VARIABLES = {"date_string": "26 Jul 2024"}
# What a rendered conversation can lack, by bad-row reason.
PROBLEMS = {"token_boundary": "the chat template joins the prompt and the answer inside one token",
            "no_end_of_turn": "no special token ends the assistant's answer"}
PROBE = [{"role": "user", "content": "What is asthma?"}, {"role": "assistant", "content": "A disease of the airways."}]


@dataclass
class Rendered:
    problem: str
    """"" when usable, else the bad-row reason: token_boundary or no_end_of_turn."""
    prompt: str
    """The rendered prompt, up to and including the generation prompt."""
    whole: str
    """The rendered conversation."""
    ids: list[int]
    start: int
    """Where the completion starts in ids."""
    end: int
    """Where the completion's end-of-turn token ends in ids."""


@dataclass
class ChatTemplate:
    """The model's chat template and the special tokens that matter to the boundary between prompt and answer."""

    tokenizer: Any
    name: str
    special_ids: set[int]
    special_text: re.Pattern | None
    """Any special token's text, to find it inside a turn."""

    @classmethod
    def of(cls, tokenizer: Any) -> "ChatTemplate":
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{name}: the tokenizer has no chat template; conversations cannot be rendered "
                            "(use an instruct model, or add chat_template to its tokenizer_config.json)")
        special = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        special.update(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids))
        text = re.compile("|".join(map(re.escape, sorted(special, key=len, reverse=True)))) if special else None
        return cls(tokenizer, name, set(special.values()), text)

    def render(self, messages: list[dict[str, str]]) -> "Rendered":
        """The conversation rendered and tokenized. Raises ValueError with the template's own message when the
        template refuses the turns (a Mistral template, for one, wants user and assistant to alternate)."""
        from jinja2 import TemplateError

        try:
            prompt = self.tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False,
                                                        **TEMPLATE_VARIABLES)
            whole = self.tokenizer.apply_chat_template(messages, tokenize=False, **TEMPLATE_VARIABLES)
        except TemplateError as e:
            raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = self.tokenizer(whole, add_special_tokens=False)["input_ids"]
        start = len(prompt_ids)
        if not whole.startswith(prompt) or ids[:start] != prompt_ids:
            return Rendered("token_boundary", prompt, whole, ids, start, len(ids))
        # The answer ends at the last special token the template writes after it (<|eot_id|>, <|im_end|>, </s>);
        # what follows it (Qwen's newline) stays in the ids as the template wrote them, but carries no loss.
        end = next((i + 1 for i in range(len(ids) - 1, start - 1, -1) if ids[i] in self.special_ids), None)
        if end is None:
            return Rendered("no_end_of_turn", prompt, whole, ids, start, len(ids))
        return Rendered("", prompt, whole, ids, start, end)

    def check(self) -> None:
        """An error when this template cannot give a clean prompt/answer boundary for any conversation."""
        try:
            problem = self.render(PROBE).problem
        except ValueError as e:
            raise UserError(f"{self.name}: the chat template refuses a plain user/assistant exchange ({e})") from e
        if problem:
            raise UserError(f"{self.name}: {PROBLEMS[problem]} even for a plain user/assistant exchange, so it "
                            "cannot be trained on as prompt and completion")


def check_template(tokenizer: Any) -> None:
    """Refuse a tokenizer whose chat template cannot be trained on as prompt/completion (one-line UserError)."""
    ChatTemplate.of(tokenizer).check()
