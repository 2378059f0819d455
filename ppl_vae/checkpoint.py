"""Atomic checkpoints: write a temporary file, flush and fsync it, then rename it into place.

The previous checkpoint is kept as ``checkpoint.prev.pt``; a process killed at any moment
leaves at least one complete file, and ``load`` falls back to the previous one when the
newest is missing or unreadable.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import random
import stat
import typing
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import logs
from .errors import UserError, setting
from .runfiles import describe, describe_mode, whole
from .loopstate import EpochMetrics, Position
from .config import Config
from .registry import REGISTRIES

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
    had = path.exists() or (folder / PREVIOUS).exists()
    try:
        tmp.unlink(missing_ok=True)  # whatever lies there is not opened (a named pipe blocks)
        with open(tmp, "xb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # a full disk is torch's RuntimeError, not OSError
        tmp.unlink(missing_ok=True)
        first = (getattr(e, "strerror", None) or str(e).strip().splitlines()[-1])[:100]
        then = (f"free space and continue with {setting('resume')} (the previous checkpoint "
                f"is kept)" if had else "no checkpoint was written: free space and run the "
                "command again")
        raise UserError(f"could not write the checkpoint in {folder} ({first}); the disk may "
                        f"be full: {then}") from None
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
    mapped from the file (copy on write) instead of read into this process's memory. Only
    a regular file is opened (a named pipe would block), and every field is checked for
    the kind of value it should hold before any is used."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise UserError(f"checkpoint {path} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"checkpoint {path} is {describe_mode(mode)}, not a file; it was not read: "
                        f"move it away or delete it")
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


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _holds(name: str, value, should: str) -> str:
    return f"its {name} holds {describe(value)}; it should hold {should}"


def _shape_problem(state: dict) -> Optional[str]:
    """What is wrong with the plain-data entries of a checkpoint, if anything: each field
    named with what it holds and what it should hold."""

    if not isinstance(state["config"], dict):
        return f"its config is a {type(state['config']).__name__}, not a mapping"
    problem = config_problem(state["config"])
    if problem:
        return problem
    history = state.get("history", [])
    if not isinstance(history, list):
        return _holds("history", history, "a list of epochs")
    for i, m in enumerate(history):
        if not isinstance(m, dict) or set(m) != set(EpochMetrics._fields):
            return f"epoch {i + 1} of its history lacks the fields of an epoch"
        for key, value in m.items():
            ok = whole(value, 0) if key in ("epoch", "steps") else _number(value)
            if not ok:
                return _holds(f"history's epoch {i + 1} field {key!r}", value,
                              "a whole number" if key in ("epoch", "steps") else "a number")
    for key in ("model", "guide", "rng"):
        if key in state and not isinstance(state[key], dict):
            return _holds(key, state[key], "a mapping")
    for key in ("model", "guide"):
        for name, value in (state.get(key) or {}).items():
            if not isinstance(name, str) or not torch.is_tensor(value):
                return _holds(f"{key} entry {str(name)[:40]!r}", value, "a tensor")
    position = state.get("position")
    if position is not None:
        if not isinstance(position, dict) or set(position) != set(Position._fields):
            return _holds("position", position,
                          f"null or a mapping of {', '.join(Position._fields)}")
        for key, value in position.items():
            ok = whole(value, 0) if key in ("epoch", "step", "steps") else _number(value)
            if not ok:
                return _holds(f"position's {key!r}", value, "a whole number"
                              if key in ("epoch", "step", "steps") else "a number")
    if "world_size" in state and not whole(state["world_size"], 1):
        return _holds("world_size", state["world_size"], "a whole number of processes, 1 or more")
    resumes = state.get("resumes")
    if resumes is not None and not (isinstance(resumes, list)
                                    and all(isinstance(r, dict) for r in resumes)):
        return _holds("resumes", resumes, "a list of mappings (one per resume)")
    optimizers = state.get("optimizers")
    if optimizers is not None and not (isinstance(optimizers, list)
                                       and all(isinstance(o, dict) for o in optimizers)):
        return _holds("optimizers", optimizers, "a list of optimizer states (mappings)")
    valid_guide = state.get("valid_guide")
    if valid_guide is not None and not isinstance(valid_guide, dict):
        return _holds("valid_guide", valid_guide, "null or a mapping")
    if "binarize_rng" in state and not _generator_state(state["binarize_rng"]):
        return _holds("binarize_rng", state["binarize_rng"], "a generator state (a uint8 tensor)")
    for key, ok in (("rng_ranks", lambda r: isinstance(r, dict)),
                    ("binarize_rng_ranks", _generator_state)):
        ranks = state.get(key)
        if ranks is not None and not (isinstance(ranks, list) and ranks
                                      and all(ok(r) for r in ranks)):
            return _holds(key, ranks, "a list with one state per process")
    return None


def _generator_state(value) -> bool:
    return torch.is_tensor(value) and value.dtype == torch.uint8 and value.dim() == 1


_KINDS = {str: "a string", int: "a whole number", float: "a number", bool: "true or false"}


def _should(hint, value) -> Optional[str]:
    """What a config field of type ``hint`` should hold, when ``value`` is not that."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        should = _should(inner[0], value)
        return f"{should} or null" if should else None
    if origin is tuple:  # Tuple[int, ...]
        if isinstance(value, (list, tuple)) and all(whole(v, -2 ** 63) for v in value):
            return None
        return "a list of whole numbers"
    if hint is bool:
        return None if isinstance(value, bool) else _KINDS[bool]
    if hint is int:
        return None if whole(value, -2 ** 63) else _KINDS[int]
    if hint is float:
        return None if _number(value) else _KINDS[float]
    if hint is str:
        return None if isinstance(value, str) else _KINDS[str]
    return None


def config_problem(config: dict) -> Optional[str]:
    """What is wrong with a checkpoint's config (a mapping of settings), if anything: a
    field this version does not know, a value of the wrong kind, or a name that is neither
    a built-in name nor ``module:Class`` (an unknown name is not code to import)."""

    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(str(k)[:40] for k in config if k not in fields)
    if unknown:
        return (f"its config has fields this version does not know ({', '.join(unknown[:5])}); "
                f"it was written by another program or version")
    hints = typing.get_type_hints(Config)
    registries = {r.field: r for r in REGISTRIES}
    for name, value in config.items():
        should = ("a string (auto, on or off)" if name == "compile" and
                  not isinstance(value, (str, bool)) else
                  None if name == "compile" else _should(hints[name], value))
        if should:
            return f"its config field {name!r} holds {describe(value)}; it should hold {should}"
        if isinstance(value, float) and not math.isfinite(value):
            return (f"its config field {name!r} holds {describe(value)}; it should hold a "
                    f"finite number")
        registry = registries.get(name)
        if registry is not None and value not in registry and ":" not in value:
            return (f"its config field {name!r} holds {value!r}, an unknown {registry.kind} "
                    f"name; it should hold one of {', '.join(registry.names())} or a "
                    f"module:Class name")
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
