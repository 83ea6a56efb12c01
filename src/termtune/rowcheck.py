"""What the data stage's row checks share, for term rows (termtune.data) and conversations (termtune.conversations):
a finding counted or raised, the test for control characters, and the key two spellings of one text share."""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from termtune.errors import UserError


@dataclass
class Findings:
    """Bad rows by reason, with the first of each; with `strict` the first bad row is an error instead."""

    strict: bool
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, where: str, detail: str) -> None:
        if self.strict:
            raise UserError(f"{where}: {detail} (data.strict is on; fix the row or drop --strict to skip it)")
        self.skipped[reason] += 1
        self.examples.setdefault(reason, f"{where}: {detail}")


def has_control_chars(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" and ch not in "\n\r\t" for ch in text)


def text_key(text: str) -> str:
    """The form two spellings of the same text share: Unicode form and width (NFKC), case, invisible
    format characters (zero-width spaces and joiners, soft hyphens, BOMs) and runs of spaces do not count."""
    text = "".join(ch for ch in unicodedata.normalize("NFKC", text) if unicodedata.category(ch) != "Cf")
    return " ".join(unicodedata.normalize("NFKC", text.casefold()).split())
