"""Reading words out of prompts and captions, the same way everywhere."""
from __future__ import annotations

import re


def named_class(text: str, classes: tuple[str, ...] | list[str]) -> int | None:
    """The index of the longest class name `text` names as a word ('t-shirt' before 'shirt',
    'trousers' for 'trouser'), or None."""
    lowered = text.lower()
    for name in sorted(classes, key=len, reverse=True):
        if re.search(rf"(?<![\w-]){re.escape(name.lower())}s?\b", lowered):
            return list(classes).index(name)
    return None


CLAUSE_BREAK = re.compile(r"\s*(?:[,;]|\band\b)\s*", re.IGNORECASE)


def split_clauses(text: str) -> list[str]:
    """The clauses of a prompt or caption as written, split at commas, semicolons and 'and'
    ('' gives ['']): the one splitter, for encoding clause by clause and for comparing captions."""
    parts = [p for p in CLAUSE_BREAK.split(text.strip()) if p]
    return parts or [text.strip()]


def clauses(text: str) -> list[str]:
    """A caption's clauses ('a red circle at the top and a blue square' -> two), each with
    its words lower-cased and single-spaced: what caption comparisons compare."""
    return [" ".join(part.lower().split()) for part in split_clauses(text) if part.strip()]
