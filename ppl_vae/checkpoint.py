"""Atomic checkpoints: write a temporary file, flush and fsync it, then rename it into place.

The previous checkpoint is kept as ``checkpoint.prev.pt``; a process killed at any moment
leaves at least one complete file, and ``load`` falls back to the previous one when the
newest is missing or unreadable.
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import logs
from .errors import UserError, setting

NAME, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"


def rng_state() -> dict:
    """Every global random stream as tensors and numbers (loadable with ``weights_only``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``; CUDA streams only where CUDA is (a run moved to a CPU goes on).

    A damaged state is refused with a ``UserError`` before any stream is changed."""
    try:
        n, p = state["numpy"], state["python"]
        numpy_state = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                       n["has_gauss"], n["cached"])
        python_state = (p["version"], tuple(int(v) for v in p["internal"].tolist()),
                        p["gauss_next"])
        old = torch.get_rng_state()
        torch.set_rng_state(state["torch"])
        try:
            np.random.set_state(numpy_state)
            random.setstate(python_state)
        except Exception:
            torch.set_rng_state(old)
            raise
    except Exception as e:
        raise UserError(f"the checkpoint's random-number state is damaged ({type(e).__name__}); "
                        f"it cannot be resumed: start again with {setting('overwrite')}") from None
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def save(state: dict, folder: Path) -> Path:
    """Write ``state`` to ``folder/checkpoint.pt`` atomically, keeping the previous one."""
    folder = Path(folder)
    path, tmp = folder / NAME, folder / (NAME + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # a full disk is torch's RuntimeError, not OSError
        tmp.unlink(missing_ok=True)
        first = (getattr(e, "strerror", None) or str(e).strip().splitlines()[-1])[:100]
        raise UserError(f"could not write the checkpoint in {folder} ({first}); the disk may "
                        f"be full: free space and continue with {setting('resume')} (the "
                        f"previous checkpoint is kept)") from None
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


def _read(path: Path, required=(), mmap: bool = False) -> dict:
    """Load with ``weights_only=True``: tensors, numbers, strings and containers only, so a
    crafted file cannot run code; anything else is refused. With ``mmap`` the tensors are
    mapped from the file (copy on write) instead of read into this process's memory."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise UserError(f"checkpoint {path} holds objects other than tensors and plain data "
                        f"({first}); it was not written by ppl_vae and was not loaded") from None
    except Exception as e:  # truncated zip, bad pickle, ...
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); "
                        f"delete it to use the previous one, or start again with "
                        f"{setting('overwrite')}") from None
    if not isinstance(state, dict) or "config" not in state:
        raise UserError(f"{path} is not a ppl_vae checkpoint")
    missing = [key for key in required if key not in state]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}; it is incomplete or "
                        f"from another program")
    problem = _shape_problem(state)
    if problem:
        raise UserError(f"checkpoint {path} is damaged: {problem}; it was not loaded")
    return state


def _shape_problem(state: dict) -> Optional[str]:
    """What is wrong with the shape of a checkpoint's plain-data entries, if anything."""
    from .train import EpochMetrics

    if not isinstance(state["config"], dict):
        return f"its config is a {type(state['config']).__name__}, not a mapping"
    history = state.get("history", [])
    if not isinstance(history, list):
        return "its history is not a list"
    for i, m in enumerate(history):
        if not isinstance(m, dict) or set(m) != set(EpochMetrics._fields):
            return f"epoch {i + 1} of its history lacks the fields of an epoch"
    for key in ("model", "guide", "rng"):
        if key in state and not isinstance(state[key], dict):
            return f"its {key} is not a mapping"
    return None


def load(folder: Path, warn=logs.warning, fallback: bool = True, required=(),
         mmap: bool = False) -> Optional[dict]:
    """The newest readable checkpoint in ``folder``; None when there is none at all.

    When the newest is unreadable, ``fallback`` takes the previous one (with a warning) and
    records which in ``state["file"]``; without it the error stands. A file lacking any key
    of ``required`` counts as unreadable. ``mmap`` maps the tensors from the file rather than
    reading them (a process of a torchrun resume copies only its own rows of the gathered
    per-datapoint table; the rest stays in the page cache, which the processes on one
    machine share). Files are replaced by renames, never rewritten in place, so a mapping
    stays valid while the run writes new checkpoints.
    """
    folder = Path(folder)
    path, previous = folder / NAME, folder / PREVIOUS
    if path.exists():
        try:
            return {**_read(path, required, mmap), "file": NAME}
        except UserError as e:
            if not previous.exists() or not fallback:
                raise
            warn(f"warning: {e}; using {previous.name}")
    if previous.exists():
        return {**_read(previous, required, mmap), "file": PREVIOUS}
    return None
