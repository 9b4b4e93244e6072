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


_said: set[str] = set()


def notice(message: str, key: str | None = None) -> None:
    """Say `message` on stderr once per process (per `key`, default the message): what limner
    changed or left out on the user's behalf (a prompt cut to the encoder's length, a setting
    that does not apply here) is never silent, and never repeated for every batch."""
    import sys

    key = message if key is None else key
    if key not in _said:
        _said.add(key)
        print(f"note: {message}", file=sys.stderr, flush=True)


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The choices nearest to `word`, best first (may be empty)."""
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """', did you mean x?' or '.' when nothing is close: ends a sentence either way."""
    near = closest(word, choices)
    return f", did you mean {' or '.join(near)}?" if near else "."
