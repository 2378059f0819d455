"""The files of a run folder: their names, how they are read, and how they are written.

Files of a run folder are read only if they are regular files (a named pipe would block the
reader: ``require_regular``, ``check_files``), and what they hold is checked field by field
(``read_mapping``, ``expect``): a damaged or hostile file is one line naming the file, the
field, what it holds and what it should hold. Files are written whole (``write_new``,
``write_text``, ``write_json``); ``write_config`` writes config.json with the provenance
(``versions``: library versions, git state). What an evaluation wrote is kept aside in
``evaluated-epoch<N>/`` when it no longer describes the run (``set_aside_evaluation``: a
resume, or an evaluation of a run cut short), never deleted.

Layering: the lowest of the run-folder modules; ``writelock`` (the one-writer lock) and
``rundir`` (which folders may be written, replaced or resumed) build on it. It imports only
``errors`` and ``logs`` of the package.
"""
from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from . import logs
from .errors import UserError

# the marker naming the folder's kind (``rundir``) and the folder's lock (``writelock``)
MARKER, LOCK = ".ppl_vae", ".running"
CHECKPOINTS = ("checkpoint.pt", "checkpoint.prev.pt", "checkpoint.pt.tmp")
RESULTS = ("summary.json", "eval.json", "eval_valid.json", "arrays.npz", "gaps.jsonl",
           "curves.png", "reconstructions.png", "samples.png", "latent.png", "gaps.png")
# what an evaluation writes, replaced as one set; the gap curves belong to the training (like
# metrics.jsonl) and stay when a run resumes or is evaluated again
EVALUATION = tuple(n for n in RESULTS[1:] if n not in ("gaps.jsonl", "gaps.png"))
# the files of a run folder; a run folder may also hold folders: ``tensorboard/`` and the
# evaluations a resume kept (``evaluated-epoch<N>/``, ``EVALUATED``)
OUTPUTS = ("config.json", "metrics.jsonl") + RESULTS + CHECKPOINTS
EVALUATED = "evaluated-epoch"  # evaluated-epoch<N>[-<k>]: an evaluation of epoch N, kept
# files that a command reads or writes in place: each must be a regular file where present
SWEPT = OUTPUTS + (MARKER, LOCK, "config.json.tmp")
JSON_LIMIT = 64 * 2 ** 20  # bytes: no JSON file of a run comes near


# ---------------------------------------------------------------------------------------
# reading a run folder's files
# ---------------------------------------------------------------------------------------
def describe_mode(mode: int) -> str:
    """What a file that is no regular file is, in words (its ``st_mode``)."""
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def require_regular(path) -> bool:
    """Whether ``path`` is a regular file (a link to one counts); False when absent (or a
    dangling link). Anything else (a named pipe, a folder, a device) is refused in one line
    without being opened: reading a named pipe would block."""
    path = Path(path)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e}); move it away or delete "
                        f"it") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path} is {describe_mode(st.st_mode)}, not a file: ppl_vae writes only "
                        f"files under that name, so it is not read; move it away or delete it")
    return True


def is_regular(path) -> bool:
    """Whether ``path`` is a regular file; False for anything else or nothing (no error)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def check_files(folder, names: Iterable[str] = SWEPT) -> None:
    """Refuse a run folder in which a file ppl_vae reads or writes is not a regular file."""
    folder = Path(folder)
    if folder.is_dir():
        for name in names:
            require_regular(folder / name)


def read_bytes(path, limit: int = JSON_LIMIT) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (``FileNotFoundError`` when
    absent; a ``UserError`` for anything that is no regular file, or too large)."""
    path = Path(path)
    if not require_regular(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced since it was looked at
            raise UserError(f"{path} is {describe_mode(st.st_mode)}, not a file; it is not read")
        if st.st_size > limit:
            raise UserError(f"{path} holds {st.st_size:,} bytes, more than a file of its kind "
                            f"ever holds ({limit:,}); it is not read: move it away or delete it")
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise UserError(f"{path} holds more than {limit:,} bytes; it is not read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def describe(value) -> str:
    """A value as a message shows it: short, with its JSON kind."""
    kinds = {str: "a string", list: "a list", tuple: "a list", dict: "a mapping",
             bool: "true or false", int: "a whole number", float: "a number",
             type(None): "null"}
    text = repr(value)
    if len(text) > 48:
        text = text[:45] + "..."
    return f"{text} ({kinds.get(type(value), type(value).__name__)})"


def expect(path, name: str, value, ok: bool, should: str):
    """``value`` of the field ``name`` in ``path``, refused in one line unless ``ok``."""
    if not ok:
        raise UserError(f"{path}: field {name!r} holds {describe(value)}; it should hold "
                        f"{should}")
    return value


def whole(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def read_json(path: Path, what: str):
    """The JSON a run-folder file holds; one line (ending with ``what``: how to recover)
    when it is missing, no regular file, or no JSON."""
    try:
        return json.loads(read_bytes(path).decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {what}") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"{path} is unreadable ({type(e).__name__}); {what}") from None


def read_mapping(path: Path, what: str) -> dict:
    """``read_json`` of a file that must hold a JSON object."""
    doc = read_json(path, what)
    if not isinstance(doc, dict):
        raise UserError(f"{path} holds {describe(doc)}; it should hold a JSON object of "
                        f"named fields; {what}")
    return doc


def _epoch_of(path: Path) -> Optional[int]:
    """The ``epochs`` an evaluation file says it scored; None when it cannot tell."""
    try:
        epochs = read_mapping(path, "").get("epochs")
    except (UserError, OSError):
        return None
    return epochs if whole(epochs) else None


def check_gaps(path: Path) -> None:
    """Refuse, before any work, a gaps.jsonl whose lines the gap figure could not read."""
    path = Path(path)
    if not require_regular(path):
        return
    fix = "delete it to go on without the gap curves"
    try:
        lines = read_bytes(path).decode("utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}); {fix}") from None
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not {"epoch", "split"} <= set(row):
            raise UserError(f"{path} is damaged (line {i} is {describe(row)}, without epoch "
                            f"and split); {fix}")
        expect(f"{path} line {i}", "epoch", row["epoch"], whole(row["epoch"], 1),
               f"a whole number of epochs; {fix}")
        expect(f"{path} line {i}", "split", row["split"], isinstance(row["split"], str),
               f"train or test; {fix}")
        for key, value in row.items():
            if key not in ("epoch", "split") and not (
                    value is None or isinstance(value, (int, float, str))):
                expect(f"{path} line {i}", key, value, False, f"a number; {fix}")


# ---------------------------------------------------------------------------------------
# an evaluation that no longer describes the run, kept aside
# ---------------------------------------------------------------------------------------
def _unique(path: Path) -> Path:
    if not os.path.lexists(path):
        return path
    k = 2
    while os.path.lexists(path.with_name(f"{path.name}-{k}")):
        k += 1
    return path.with_name(f"{path.name}-{k}")


def _keep_aside(folder: Path, names, epoch: int) -> Path:
    """Move the files ``names`` of ``folder`` into a new ``evaluated-epoch<epoch>``
    subfolder, as one step: they are linked into a hidden folder that is renamed into place,
    and only then removed from ``folder`` (a kill leaves them in both places, never lost)."""
    dest = _unique(folder / f"{EVALUATED}{epoch}")
    tmp = folder / f".{dest.name}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    os.mkdir(tmp)
    try:
        for name in names:
            try:
                os.link(folder / name, tmp / name, follow_symlinks=False)
            except OSError:  # no hard links here: a copy
                shutil.copy2(folder / name, tmp / name, follow_symlinks=False)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name in names:
        (folder / name).unlink(missing_ok=True)
    return dest


def set_aside_evaluation(folder, default_epoch: Optional[int], log: Callable[[str], None],
                         stale_for: Optional[int] = None) -> list:
    """Keep what an evaluation wrote into ``folder`` (eval.json, eval_valid.json, arrays.npz,
    the figures) in subfolders ``evaluated-epoch<N>``, N the epoch each file says it scored
    (``default_epoch`` when it does not say), and say so in one line of ``log``. With
    ``stale_for`` only an evaluation of another epoch than ``stale_for`` moves. Returns the
    subfolders made."""
    folder = Path(folder)
    present = [n for n in EVALUATION if os.path.lexists(folder / n)]
    if not present:
        return []
    test = [n for n in present if n != "eval_valid.json"]
    groups = []
    if test:
        groups.append((test, _epoch_of(folder / "eval.json")))
    if "eval_valid.json" in present:
        groups.append((["eval_valid.json"], _epoch_of(folder / "eval_valid.json")))
    made = []
    for names, epoch in groups:
        if stale_for is not None and (epoch is None or epoch == stale_for):
            continue
        epoch = epoch if epoch is not None else default_epoch
        if epoch is None:
            continue
        made.append(_keep_aside(folder, names, epoch))
    if made:
        where = " and ".join(str(p) for p in made)
        epochs = sorted({p.name[len(EVALUATED):].split("-")[0] for p in made})
        log(f"kept the evaluation of epoch {', '.join(epochs)} in {where} (it scored the "
            f"run at that epoch; `ppl-vae evaluate {folder}` scores it as it is now)")
    return made


def set_aside_stale_evaluation(folder, epochs: int,
                               log: Callable[[str], None] = logs.info) -> bool:
    """Keep aside (``set_aside_evaluation``) an evaluation made at another epoch than
    ``epochs`` (an ``evaluate`` of a run cut short); returns whether there was one."""
    return bool(set_aside_evaluation(folder, None, log, stale_for=epochs))


def drop_stale_evaluation(folder: Path, epochs: int,
                          log: Callable[[str], None] = logs.info) -> bool:
    """Formerly removed a stale evaluation; it is now kept aside
    (``set_aside_stale_evaluation``)."""
    return set_aside_stale_evaluation(folder, epochs, log)


# ---------------------------------------------------------------------------------------
# writing a run folder's files, and the provenance config.json records
# ---------------------------------------------------------------------------------------
def versions() -> dict:
    import numpy
    import pyro
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__,
            "pyro": pyro.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "git": git_revision(), "git_dirty": git_dirty()}


def _git(*args) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_revision() -> Optional[str]:
    out = _git("rev-parse", "HEAD")
    return out.strip() or None if out is not None else None


def git_dirty() -> Optional[bool]:
    """Whether the working tree had uncommitted changes (None outside a git checkout)."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out.strip())


def write_config(path: Path, config_dict: dict, device: str, resumes=(), data=None,
                 world_size: int = 1, place: bool = True) -> Path:
    """config.json: settings, the data's splits, versions (git state, command line), device
    and the number of processes (torchrun's world size). With ``place`` False the file is
    written beside ``path`` (``config.json.tmp``) and returned, for ``os.replace`` to put it
    in place once what it describes exists (a resume's first checkpoint)."""
    doc = {"config": config_dict, "data": data, "command": list(sys.argv),
           "versions": versions(), "device": device, "world_size": world_size}
    if resumes:
        doc["resumes"] = list(resumes)
    if not place:
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        write_new(tmp, json.dumps(doc, indent=2) + "\n")
        return tmp
    write_json(path, doc)
    return Path(path)


def write_new(path: Path, text: str) -> None:
    """Write ``text`` into a new file ``path`` (what was there is removed first, never
    opened: a named pipe would block); no partial file is left on an error (a full disk)."""
    path = Path(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        path.unlink()
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0),
                 0o644)
    try:
        data = text.encode("utf-8")
        while data:
            data = data[os.write(fd, data):]
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write_new(tmp, text)
    os.replace(tmp, path)


def write_json(path: Path, doc) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    write_text(path, json.dumps(doc, indent=2) + "\n")
