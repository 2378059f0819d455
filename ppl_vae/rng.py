"""Seeded blocks that leave the caller's random stream untouched."""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Optional

import torch


@contextlib.contextmanager
def seeded(seed: int, device: Optional[torch.device] = None):
    """Run a block with its own seeded RNG stream, leaving the caller's RNG state untouched.

    Evaluation inside training (validation every epoch) must not reset the training noise.
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def forked(device: torch.device):
    """Keep the draws of the checking and tracing runs out of the caller's random stream."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def own_rng(fn):
    """Decorator: run ``fn`` under ``seeded(seed, x.device)`` from its ``seed`` and ``x`` arguments."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with seeded(bound.arguments["seed"], bound.arguments["x"].device):
            return fn(*args, **kwargs)
    return wrapper
