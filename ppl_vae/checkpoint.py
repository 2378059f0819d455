"""Atomic checkpoints: write a temporary file, flush and fsync it, then rename it into place.

The previous checkpoint is kept as ``checkpoint.prev.pt``; a process killed at any moment
leaves at least one complete file, and ``load`` falls back to the previous one when the
newest is missing or unreadable.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import UserError

NAME, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(state: dict, folder: Path) -> Path:
    """Write ``state`` to ``folder/checkpoint.pt`` atomically, keeping the previous one."""
    folder = Path(folder)
    path, tmp = folder / NAME, folder / (NAME + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, folder / PREVIOUS)
    os.replace(tmp, path)
    _fsync_dir(folder)
    return path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, ...
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); "
                        f"delete it to use the previous one, or start again with --overwrite") from None
    if not isinstance(state, dict) or "config" not in state:
        raise UserError(f"{path} is not a ppl_vae checkpoint")
    return state


def load(folder: Path, warn=print) -> Optional[dict]:
    """The newest readable checkpoint in ``folder``; None when there is none at all."""
    folder = Path(folder)
    path, previous = folder / NAME, folder / PREVIOUS
    if path.exists():
        try:
            return _read(path)
        except UserError as e:
            if not previous.exists():
                raise
            warn(f"warning: {e}; using {previous.name}")
    if previous.exists():
        return _read(previous)
    return None
