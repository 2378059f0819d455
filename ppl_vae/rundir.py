"""Run folders: which folders may be written, replaced or resumed, and what they record.

A folder this package writes holds a marker file (``.ppl_vae``); only such a folder is ever
replaced or written into. One process writes a folder at a time: ``train``, ``--resume``,
``--overwrite`` and ``evaluate`` hold its lock (``.running``: the pid and the command,
created exclusively; a dead process's lock is taken over) and refuse a live writer.

``--overwrite`` trains the new run in a staging folder beside ``out``
(``.<name>.staging-<pid>``, one per attempt) and replaces the old run only once the new one
has finished its first epoch (``RunDir.commit``), in one step: the two folders are exchanged
with one ``renameat2(RENAME_EXCHANGE)`` call where the file system has it (else two renames,
which ``RunDir`` undoes when it finds the old run parked). Ctrl-C, a kill or an error before
that leave the old run as it was.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError, setting

MARKER, LOCK = ".ppl_vae", ".running"
CHECKPOINTS = ("checkpoint.pt", "checkpoint.prev.pt", "checkpoint.pt.tmp")
RESULTS = ("summary.json", "eval.json", "eval_valid.json", "arrays.npz", "gaps.jsonl",
           "curves.png", "reconstructions.png", "samples.png", "latent.png", "gaps.png")
# what an evaluation writes, replaced as one set; the gap curves belong to the training (like
# metrics.jsonl) and stay when a run resumes or is evaluated again
EVALUATION = tuple(n for n in RESULTS[1:] if n not in ("gaps.jsonl", "gaps.png"))
OUTPUTS = ("config.json", "metrics.jsonl") + RESULTS + CHECKPOINTS


def check_out(out) -> Path:
    if out is None or str(out).strip() == "":
        raise UserError(f"{setting('out')} must name a folder, got an empty path")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{setting('out')} {out} exists and is not a folder; choose another path")
    return out


def ours(out: Path) -> bool:
    """Whether ``out`` is empty, absent or was written by this package."""
    if not out.exists():
        return True
    names = {p.name for p in out.iterdir()}
    return not names or MARKER in names


def refuse_foreign(out: Path) -> None:
    if not ours(out):
        raise UserError(f"{out} holds files that ppl_vae did not write; choose an empty or new "
                        f"{setting('out')} (nothing there was touched)")


def _aside(out: Path, kind: str, pid=None) -> Path:
    """A hidden sibling of ``out`` for one attempt (``kind``: staging or old)."""
    return out.parent / f".{out.name}.{kind}-{os.getpid() if pid is None else pid}"


def _leftovers(out: Path, kind: str):
    """Siblings of ``out`` parked by attempts whose process is gone, with their pids."""
    prefix = f".{out.name}.{kind}-"
    if not out.parent.is_dir():
        return []
    found = []
    for p in out.parent.iterdir():
        if p.name.startswith(prefix) and p.is_dir():
            try:
                pid = int(p.name[len(prefix):])
            except ValueError:
                continue
            if not _alive(pid) or pid == os.getpid():
                found.append(p)
    return found


def recover(out: Path) -> None:
    """Undo what a killed attempt left beside ``out``: a parked old run comes back when
    ``out`` is gone (a kill between the two renames of a swap), a dead attempt's staging
    folder is removed."""
    for old in _leftovers(out, "old"):
        if not out.exists():
            os.replace(old, out)
        elif (old / MARKER).exists():
            shutil.rmtree(old, ignore_errors=True)
    for staging in _leftovers(out, "staging"):
        if (staging / MARKER).exists():
            shutil.rmtree(staging, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


class RunDir:
    """The folder of one training run; ``path`` is where files go now (staging until commit)."""

    def __init__(self, out, overwrite: bool = False, resume: bool = False,
                 resumable: bool = True):
        out = check_out(out)
        if overwrite and resume:
            raise UserError(f"{setting('resume')} continues the run in the folder and "
                            f"{setting('overwrite')} replaces it; choose one")
        recover(out)
        refuse_foreign(out)
        refuse_writer(out)
        finished = (out / "summary.json").exists()
        started = any((out / name).exists() for name in CHECKPOINTS[:2])
        if resume and not started:
            raise UserError(f"{setting('resume')}: no checkpoint in {out}; start a new run "
                            f"without resume")
        if not resume and (finished or started) and not overwrite:
            what = "a finished run" if finished else "an unfinished run"
            how = (f"pass {setting('resume')} to continue it, {setting('overwrite')} to"
                   if resumable else f"pass {setting('overwrite')} to")
            raise UserError(f"{out} holds {what}; {how} replace it, or choose another "
                            f"{setting('out')}")
        self.final, self.resume = out, resume
        self.staged = overwrite and (finished or started)
        self.path = _aside(out, "staging") if self.staged else out
        self.locked = False

    def create(self) -> "RunDir":
        """Take the folder's lock, then make the folder (and its marker)."""
        self.final.mkdir(parents=True, exist_ok=True)
        lock(self.final, "train")
        self.locked = True
        if self.staged:
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir()
            (self.path / LOCK).write_text(f"{os.getpid()}\ntrain\n")
        for folder in {self.final, self.path}:
            (folder / MARKER).touch()
        return self

    def file(self, name: str) -> Path:
        return self.path / name

    def commit(self) -> None:
        """Replace the old run with the staged one, in one step (see the module's text)."""
        if not self.staged:
            return
        if exchange(self.path, self.final):
            old = self.path  # the old run now lies where the staging folder was
        else:
            old = _aside(self.final, "old")
            os.replace(self.final, old)
            os.replace(self.path, self.final)  # a kill in between: ``recover`` undoes it
        self.path, self.staged = self.final, False
        shutil.rmtree(old, ignore_errors=True)

    def clear_results(self) -> None:
        """Results of the run as it was (a resumed run's summary, evaluation and figures; its
        gap curves go on)."""
        for name in ("summary.json",) + EVALUATION:
            (self.path / name).unlink(missing_ok=True)

    def close(self) -> None:
        """Release the lock; a staged run that never committed is dropped (the old run
        stays as it was)."""
        if self.staged and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        if self.locked:
            unlock(self.final)
            self.locked = False

    def has_checkpoint(self) -> bool:
        return any((self.path / name).exists() for name in CHECKPOINTS[:2])


def drop_stale_evaluation(folder: Path, epochs: int) -> bool:
    """Remove an evaluation (eval.json, arrays, figures) made at another epoch than ``epochs``
    (``evaluate`` run while the run was still training); returns whether it did."""
    try:
        evaluated = json.loads((Path(folder) / "eval.json").read_text()).get("epochs")
    except (OSError, ValueError, AttributeError):
        return False
    if evaluated == epochs:
        return False
    for name in EVALUATION:
        (Path(folder) / name).unlink(missing_ok=True)
    return True


def lock(folder: Path, command: str) -> None:
    """Take ``folder``'s lock for this process (``command`` names what it does); refuse a
    live writer; take over the lock of a process that is gone."""
    path = Path(folder) / LOCK
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is not None and holder[0] != os.getpid() and _alive(holder[0]):
                raise UserError(_busy(folder, holder)) from None
            path.unlink(missing_ok=True)  # a dead (or our own earlier) lock
            continue
        try:
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n{command}\n")
        except BaseException:
            path.unlink(missing_ok=True)  # no empty lock left (a full disk)
            raise
        return
    raise UserError(f"could not take the lock {path}: another process keeps taking it")


def unlock(folder: Path) -> None:
    path = Path(folder) / LOCK
    holder = _holder(path)
    if holder is not None and holder[0] == os.getpid():
        path.unlink(missing_ok=True)


def _holder(path: Path):
    """(pid, command) written in a lock file; None when absent or unreadable."""
    try:
        lines = path.read_text().split()
        return int(lines[0]), (lines[1] if len(lines) > 1 else "train")
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def _busy(folder: Path, holder) -> str:
    pid, command = holder
    return (f"{folder} is being written by another process (pid {pid}, {command}); wait for "
            f"it to finish or stop it, or use another folder (a copy: cp -r {folder} "
            f"{folder}-copy)")


def refuse_writer(folder: Path) -> None:
    """Refuse, before any work, a folder that a live process is writing."""
    holder = _holder(Path(folder) / LOCK)
    if holder is not None and holder[0] != os.getpid() and _alive(holder[0]):
        raise UserError(_busy(folder, holder))


def training_pid(folder: Path) -> Optional[int]:
    """The pid of a live process writing into ``folder``, if any."""
    holder = _holder(Path(folder) / LOCK)
    if holder is None or holder[0] == os.getpid() or not _alive(holder[0]):
        return None
    return holder[0]


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
                 world_size: int = 1) -> None:
    """config.json: settings, the data's splits, versions (git state, command line), device
    and the number of processes (torchrun's world size)."""
    doc = {"config": config_dict, "data": data, "command": list(sys.argv),
           "versions": versions(), "device": device, "world_size": world_size}
    if resumes:
        doc["resumes"] = list(resumes)
    write_json(path, doc)


def write_json(path: Path, doc) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    except BaseException:
        tmp.unlink(missing_ok=True)  # no partial file left (a full disk)
        raise
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {what}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}); {what}") from None
