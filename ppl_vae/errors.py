"""The one exception type for mistakes in a user's input.

The CLI prints a ``UserError`` as one line and exits with code 2; anything else is a bug
and keeps its traceback. Messages name settings with ``setting("lr")``: the library shows
that as ``lr (--lr)``, the CLI as its flag ``--lr``.
"""
from __future__ import annotations

import re

_TOKEN = re.compile(r"\x00([a-z_]+)\x00")


def setting(name: str) -> str:
    """A setting's name inside a message, rendered by ``UserError`` for its reader."""
    return f"\x00{name}\x00"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def for_library(text: str) -> str:
    """``text`` with every ``setting(name)`` shown as ``name (--flag)``."""
    return _TOKEN.sub(lambda m: f"{m.group(1)} ({flag(m.group(1))})", text)


def for_cli(text: str) -> str:
    """``text`` with every ``setting(name)`` shown as its command-line flag."""
    return _TOKEN.sub(lambda m: flag(m.group(1)), text)


class UserError(ValueError):
    """Bad input: the message names what was wrong and what would be right."""

    def __init__(self, message: str):
        super().__init__(message)
        self.raw = message

    def __str__(self) -> str:
        return for_library(self.raw)

    def for_cli(self) -> str:
        """The message with every setting shown as its command-line flag."""
        return for_cli(self.raw)
