"""Run folders: which folders may be written, replaced or resumed, and what they record.

A folder this package writes holds a marker file (``.ppl_vae``); only such a folder is ever
replaced. ``--overwrite`` trains the new run in ``out/.staging`` and replaces the old run's
files only once the new one has its first checkpoint (``RunDir.commit``), so a crash before
that leaves the old run as it was. A folder holding files this package did not write is
refused. A running process keeps a lock (``.running``, its pid), which ``evaluate`` reads.
"""
from __future__ import annotations

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

MARKER, STAGING, LOCK = ".ppl_vae", ".staging", ".running"
CHECKPOINTS = ("checkpoint.pt", "checkpoint.prev.pt", "checkpoint.pt.tmp")
RESULTS = ("summary.json", "eval.json", "arrays.npz", "gaps.jsonl", "curves.png",
           "reconstructions.png", "samples.png", "latent.png", "gaps.png")
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
    names = {p.name for p in out.iterdir()} - {STAGING}
    return not names or MARKER in names


def refuse_foreign(out: Path) -> None:
    if not ours(out):
        raise UserError(f"{out} holds files that ppl_vae did not write; choose an empty or new "
                        f"{setting('out')} (nothing there was touched)")


class RunDir:
    """The folder of one training run; ``path`` is where files go now (staging until commit)."""

    def __init__(self, out, overwrite: bool = False, resume: bool = False,
                 resumable: bool = True):
        out = check_out(out)
        if overwrite and resume:
            raise UserError(f"{setting('resume')} continues the run in the folder and "
                            f"{setting('overwrite')} replaces it; choose one")
        refuse_foreign(out)
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
        self.path = out / STAGING if self.staged else out

    def create(self) -> "RunDir":
        """Make the folder (and its marker); take the lock."""
        if self.staged and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        for folder in {self.final, self.path}:
            (folder / MARKER).touch()
        lock(self.final)
        return self

    def file(self, name: str) -> Path:
        return self.path / name

    def commit(self) -> None:
        """Replace the old run with the staged one (once it has a checkpoint)."""
        if not self.staged:
            return
        for name in OUTPUTS:
            (self.final / name).unlink(missing_ok=True)
        for item in self.path.iterdir():
            if item.name != MARKER:
                os.replace(item, self.final / item.name)
        shutil.rmtree(self.path)
        self.path, self.staged = self.final, False

    def clear_results(self) -> None:
        """Results of the run as it was (a resumed run's summary, evaluation and figures; its
        gap curves go on)."""
        for name in ("summary.json",) + EVALUATION:
            (self.path / name).unlink(missing_ok=True)

    def close(self, failed: bool = False) -> None:
        if failed and self.staged and self.path.exists():
            shutil.rmtree(self.path)  # the old run stays as it was
        unlock(self.final)


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


def lock(folder: Path) -> None:
    (folder / LOCK).write_text(str(os.getpid()))


def unlock(folder: Path) -> None:
    path = folder / LOCK
    if path.exists() and path.read_text().strip() == str(os.getpid()):
        path.unlink()


def training_pid(folder: Path) -> Optional[int]:
    """The pid of a live process training into ``folder``, if any."""
    try:
        pid = int((Path(folder) / LOCK).read_text().strip())
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    return pid


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
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {what}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}); {what}") from None
