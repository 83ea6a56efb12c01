"""Quiet stage output: known third-party notices go to <run>/library.log, termtune's own lines stay.

    with quiet(layout.library_log):
        ...                      # load models, train, export

What is listed here are notices the libraries print about each other or about optional extras,
none of which the user can act on. Each is matched narrowly, by category, module and message
(warnings) or by logger and message (log records), never "all warnings": anything not listed
still reaches the terminal. `termtune --verbose` shows the listed ones too (they are still
written to the log file). Notices termtune itself caused are fixed where they arise instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from termtune.rundir import open_plain

KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # peft reads transformers' deprecated `is_gradient_checkpointing` while wrapping the model
    (FutureWarning, "transformers/modeling_utils.py", r"`is_gradient_checkpointing` is deprecated"),
    # peft sees lm_head in modules_to_save and a config claiming tied embeddings (transformers 5.x's config for
    # the default base model always says tied); the loaded model is untied, which is what termtune wants
    (UserWarning, "peft/tuners/tuners_utils.py", r"Model has `tie_word_embeddings=True`"),
    # ... and, merging that head at export, that the (already untied) embeddings are untied
    (UserWarning, "peft/tuners/tuners_utils.py", r"Input and output embeddings are no longer tied after merging"),
)
"""(category, the module's file, message regex) of the Python warnings sent to the log file."""

KNOWN_LOGS: tuple[tuple[str, str], ...] = (
    # bitsandbytes' optional CPU kernel package ("pip install kernels") is absent: it uses its fallback
    ("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward"),
    # transformers 5.x's config for the default base model always claims tied embeddings, so loading an
    # untied one (the pretrained base and termtune's random-init base) announces it will not tie them. Setting
    # tie_word_embeddings=False instead would also untie the encoder's and decoder's embed_tokens from `shared`: wrong weights.
    ("transformers.modeling_utils", r"^The tied weights mapping and config for this model specifies to tie "
                                    r"shared\.weight to lm_head\.weight"),
)
"""(logger, message regex) of the log records sent to the log file."""

_verbose = False


def set_verbose(on: bool) -> None:
    """`termtune --verbose`: show the known notices on the terminal as well."""
    global _verbose
    _verbose = on


@contextlib.contextmanager
def quiet(log_file: Path) -> Iterator[None]:
    """Send the known third-party warnings and log records to `log_file` while the block runs (a link
    under its name is refused, never appended through)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fd = open_plain(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "a", encoding="utf-8") as sink, warnings.catch_warnings():
        shown = warnings.showwarning

        def showwarning(message: Any, category: type[Warning], filename: str, lineno: int,
                        file: Any = None, line: str | None = None) -> None:
            where = Path(filename).as_posix()
            if any(issubclass(category, known) and where.endswith(f"/{module}") and re.search(pattern, str(message))
                   for known, module, pattern in KNOWN_WARNINGS):
                sink.write(f"{_now()} {category.__name__} ({where}:{lineno}): {message}\n")
                sink.flush()
                if not _verbose:
                    return
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        filters = [(logging.getLogger(name), _ToFile(sink, pattern)) for name, pattern in KNOWN_LOGS]
        for logger, to_file in filters:
            logger.addFilter(to_file)
        try:
            yield
        finally:
            for logger, to_file in filters:
                logger.removeFilter(to_file)


class _ToFile(logging.Filter):
    """A logger filter: a matching record is copied to the file and let through only when verbose."""

    def __init__(self, sink: Any, pattern: str) -> None:
        super().__init__()
        self.sink, self.pattern = sink, pattern

    def filter(self, record: logging.LogRecord) -> bool:
        if not re.search(self.pattern, record.getMessage()):
            return True
        self.sink.write(f"{_now()} {record.levelname} ({record.name}): {record.getMessage()}\n")
        self.sink.flush()
        return _verbose


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
