"""Helpers for tests that compare records: a log that prints nothing, and a record without
what differs from run to run (wall times, dates, memory, the command line)."""
from __future__ import annotations

TIMES = ("seconds", "per_second", "peak_rss", "date", "wall", "command")


def quiet(_message):
    pass


def without_times(doc, also=()):
    """``doc`` without keys naming a time (or any of ``also``), at every depth."""
    drop = TIMES + tuple(also)
    if isinstance(doc, dict):
        return {k: without_times(v, also) for k, v in doc.items()
                if not any(t in k for t in drop)}
    if isinstance(doc, list):
        return [without_times(v, also) for v in doc]
    return doc
