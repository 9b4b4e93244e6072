"""Errors a user can act on. The CLI prints them as one paragraph and exits non-zero."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class LimnerError(Exception):
    """A user-facing error: bad name, bad config, bad input, missing file."""


class UnknownComponentError(LimnerError, KeyError):
    """A component name that no installed plugin provides."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PluginConflictError(LimnerError):
    """Two plugins register the same name (or alias) for one kind."""


class ConfigError(LimnerError):
    """A config file with a bad key, value or component."""


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The choices nearest to `word`, best first (may be empty)."""
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """', did you mean x?' or '.' when nothing is close: ends a sentence either way."""
    near = closest(word, choices)
    return f", did you mean {' or '.join(near)}?" if near else "."
