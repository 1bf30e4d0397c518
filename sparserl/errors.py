"""The user-mistake exception and its spelling hint, shared by every module without importing any.

Kept apart from :mod:`sparserl.config` so that the modules config consults (the env names of
:mod:`sparserl.envs`) can raise it without an import circle."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A user mistake in the configuration (reported as one line, exit code 2)."""


def suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(close)}?)" if close else ""
