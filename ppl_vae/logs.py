"""The package's messages go through Python's ``logging`` (logger ``"ppl_vae"``): progress
lines at INFO, warnings at WARNING. Library functions take a ``log`` callable defaulting to
``info``; the CLI (and the experiment scripts) call ``to_console()`` to print them, INFO to
stdout and WARNING to stderr. In your own program, ``logging.basicConfig(level="INFO")``
shows them too."""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("ppl_vae")


def info(message: str) -> None:
    logger.info(message)


def warning(message: str) -> None:
    logger.warning(message)


class _Console(logging.Handler):
    """Writes to the *current* sys.stdout / sys.stderr (which tests and tools may swap)."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        print(self.format(record), file=stream, flush=True)


def to_console() -> None:
    """Print the package's messages: INFO to stdout, WARNING and above to stderr."""
    if not any(isinstance(h, _Console) for h in logger.handlers):
        logger.addHandler(_Console())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def quiet() -> None:
    """Errors only (the other processes of a torchrun run: rank 0 reports)."""
    logger.setLevel(logging.ERROR)
