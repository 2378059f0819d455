"""Run folders: which folders may be written, replaced or resumed.

A folder this package writes holds a marker file (``.ppl_vae``) naming its kind, ``run``
(``train``) or ``comparison`` (``compare``); only such a folder is ever replaced or written
into, and a command refuses a folder of the other kind (``claim``; an older, empty marker is
judged by what the folder holds: ``kind_of``). One process writes a folder at a time (its
lock: ``writelock``).

``--overwrite`` trains the new run in a staging folder beside ``out``
(``.<name>.staging-<pid>``, one per attempt) and replaces the old run only once the new one
has finished its first epoch (``RunDir.commit``), in one step: the two folders are exchanged
with one ``renameat2(RENAME_EXCHANGE)`` call where the file system has it (else two renames,
which ``recover`` undoes when it finds the old run parked). Ctrl-C, a kill or an error before
that leave the old run as it was. ``evaluate`` replaces an evaluation the same way
(``stage_copy``, ``replace_folder``): a copy of the run folder made of hard links gets the
new files, and is exchanged with the run folder, so the evaluation changes as one set.

Layering: above ``runfiles`` (the names of a run folder's files, read and written safely)
and ``writelock`` (the one-writer lock); below the commands that write folders (``run``,
``evaluation``, ``compare``).
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
from pathlib import Path
from typing import Callable, Optional

from . import logs
from .errors import UserError, setting
from .runfiles import (CHECKPOINTS, LOCK, MARKER, SWEPT, check_files, describe, read_bytes,
                       set_aside_evaluation, write_text)
from .writelock import PID_MAX, alive, lock, refuse_writer, unlock

KINDS = ("run", "comparison")
# names that show what a folder holds when its marker does not say (a marker of before kinds)
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.prev.pt")
COMPARISON_FILES = ("results.json", "comparison.json", "report.md")


# ---------------------------------------------------------------------------------------
# which folders may be written
# ---------------------------------------------------------------------------------------
def check_out(out) -> Path:
    if out is None or str(out).strip() == "":
        raise UserError(f"{setting('out')} must name a folder, got an empty path")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{setting('out')} {out} exists and is not a folder; choose another path")
    return out


def resolve_link(out) -> Path:
    """``out`` itself, or where it leads if it is a symbolic link: a folder is replaced
    (``--overwrite``, ``evaluate``) where it lies, and a link to it stays a link."""
    out = Path(out)
    if out.is_symlink():
        target = Path(os.path.realpath(out))
        if not target.exists():
            raise UserError(f"{out} is a symbolic link to {target}, which does not exist; "
                            f"make the folder or choose another path")
        return target
    if out.name in ("", ".", ".."):  # a folder is replaced beside itself: it needs a name
        return Path(os.path.realpath(out))
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


def _marked(folder: Path) -> Optional[str]:
    """The kind the marker names; None for no marker or an empty one (written before kinds)."""
    path = Path(folder) / MARKER
    try:
        text = read_bytes(path, 4096).decode("utf-8", "replace").strip()
    except FileNotFoundError:
        return None
    if text in KINDS or text == "":
        return text or None
    raise UserError(f"{path} holds {describe(text)}; it should hold {' or '.join(KINDS)} "
                    f"(the kind of folder ppl_vae wrote there) or nothing")


def kind_of(folder) -> Optional[str]:
    """``run``, ``comparison`` or None (empty, absent or not telling) for ``folder``: what
    its marker says, else (a marker written before kinds) what it holds: a run's config,
    metrics or checkpoint; a comparison's results, plan or report, or guide run folders."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    marked = _marked(folder)
    if marked is not None:
        return marked
    names = set(os.listdir(folder))
    if names & set(RUN_FILES):
        return "run"
    if names & set(COMPARISON_FILES):
        return "comparison"
    for name in names:
        if (folder / name).is_dir() and not (folder / name).is_symlink() and \
                os.path.lexists(folder / name / MARKER):
            return "comparison"
    return None


_KIND_WORDS = {"run": "a training run (ppl-vae train)",
               "comparison": "a comparison (ppl-vae compare)"}


def check_kind(out, kind: str, advice: Optional[str] = None) -> None:
    """Refuse ``out`` if it holds a folder of another kind than ``kind``, or lies inside a
    run folder; ``advice`` ends the message (default: choose another ``--out``)."""
    assert kind in KINDS, kind
    out = Path(out)
    advice = advice or (f"choose another {setting('out')} (nothing there was touched)")
    found = kind_of(out)
    if found is not None and found != kind:
        raise UserError(f"{out} holds {_KIND_WORDS[found]}, not {_KIND_WORDS[kind]}; {advice}")
    here = Path(os.path.abspath(out))
    for above in list(here.parents)[:2]:
        if os.path.lexists(above / MARKER) and kind_of(above) == "run":
            raise UserError(f"{out} lies inside {above}, which holds {_KIND_WORDS['run']}; "
                            f"{advice}")


def claim(out, kind: str) -> Path:
    """Check, before any work, that a command writing a folder of ``kind`` (``run`` or
    ``comparison``) may write ``out``: a path, not a file, empty or ppl_vae's, not of the
    other kind, not inside a run folder. Writes nothing; returns the folder to write (a
    symbolic link resolved). ``mark`` then records the kind when the folder is made."""
    out = resolve_link(check_out(out))
    refuse_foreign(out)
    check_files(out, (MARKER, LOCK))
    check_kind(out, kind)
    return out


def mark(folder, kind: str) -> None:
    """Make ``folder`` (and its parents) and record in its marker that it holds ``kind``."""
    assert kind in KINDS, kind
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if _marked(folder) != kind:
        write_text(folder / MARKER, kind + "\n")


def _aside(out: Path, kind: str, pid=None) -> Path:
    """A hidden sibling of ``out`` for one attempt (``kind``: staging, old or evaluating)."""
    return out.parent / f".{out.name}.{kind}-{os.getpid() if pid is None else pid}"


def _leftovers(out: Path, kind: str):
    """Siblings of ``out`` parked by attempts whose process is gone, with their pids."""
    prefix = f".{out.name}.{kind}-"
    if not out.parent.is_dir():
        return []
    found = []
    for p in out.parent.iterdir():
        if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink():
            try:
                pid = int(p.name[len(prefix):])
            except ValueError:
                continue
            if not 1 <= pid <= PID_MAX:
                continue
            if not alive(pid) or pid == os.getpid():
                found.append(p)
    return found


def recover(out: Path) -> None:
    """Undo what a killed attempt left beside ``out``: a parked old run comes back when
    ``out`` is gone (a kill between the two renames of a swap), a dead attempt's staging or
    evaluating folder is removed."""
    out = Path(out)
    if out.is_symlink():
        out = Path(os.path.realpath(out))
    for old in _leftovers(out, "old"):
        if not (old / MARKER).exists():
            continue
        if not os.path.lexists(out):
            os.replace(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for kind in ("staging", "evaluating"):
        for left in _leftovers(out, kind):
            if (left / MARKER).exists():
                shutil.rmtree(left, ignore_errors=True)


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


def replace_folder(new: Path, out: Path) -> None:
    """Put the folder ``new`` in the place of ``out`` in one step (``exchange``; else two
    renames that ``recover`` undoes if a kill falls between them); the old one is removed."""
    if exchange(new, out):
        old = new  # the old folder now lies where the new one was
    else:
        old = _aside(out, "old")
        os.replace(out, old)
        os.replace(new, out)  # a kill in between: ``recover`` undoes it
    shutil.rmtree(old, ignore_errors=True)


class CannotLink(OSError):
    """The file system has no hard links (``stage_copy``)."""


def _link_tree(src: Path, dst: Path, skip=()) -> None:
    os.mkdir(dst)
    os.chmod(dst, stat.S_IMODE(os.stat(src).st_mode))
    for entry in os.scandir(src):
        if entry.name in skip:
            continue
        if entry.is_dir(follow_symlinks=False):
            _link_tree(Path(entry.path), dst / entry.name)
            continue
        try:
            os.link(entry.path, dst / entry.name, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP,
                           errno.EMLINK, errno.ENOSYS, errno.EACCES):
                raise CannotLink(e.errno, e.strerror, entry.path) from None
            raise


def stage_copy(folder: Path, skip=()) -> Optional[Path]:
    """A copy of ``folder`` beside it (``.<name>.evaluating-<pid>``) made of hard links, less
    the names in ``skip`` (at its top), to be given new files and put in its place with
    ``replace_folder``; None where the file system cannot link (nothing is left then). Never
    write into a linked file of the copy: it is the same file as the original's."""
    folder = Path(folder)
    staged = _aside(folder, "evaluating")
    if os.path.lexists(staged):
        shutil.rmtree(staged)
    try:
        os.mkdir(staged)
    except OSError as e:  # a parent folder that this user may not write: no copy beside
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return None
        raise
    os.rmdir(staged)
    try:
        _link_tree(folder, staged, skip)
    except CannotLink:
        shutil.rmtree(staged, ignore_errors=True)
        return None
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


class RunDir:
    """The folder of one training run; ``path`` is where files go now (staging until commit).

    ``out`` may be a symbolic link: the folder it leads to is written (and, with
    ``overwrite``, replaced; the link stays)."""

    def __init__(self, out, overwrite: bool = False, resume: bool = False,
                 resumable: bool = True):
        out = resolve_link(check_out(out))
        if overwrite and resume:
            raise UserError(f"{setting('resume')} continues the run in the folder and "
                            f"{setting('overwrite')} replaces it; choose one")
        recover(out)
        refuse_foreign(out)
        check_files(out, (MARKER, LOCK) if overwrite else SWEPT)
        check_kind(out, "run")
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
            if os.path.lexists(self.path):
                shutil.rmtree(self.path)
            self.path.mkdir()
            write_text(self.path / LOCK, f"{os.getpid()}\ntrain\n")
        # the folder written now says it holds a run (a staged run's old folder has its
        # marker already, and stays byte for byte as it was until the commit)
        mark(self.path, "run")
        return self

    def file(self, name: str) -> Path:
        return self.path / name

    def commit(self) -> None:
        """Replace the old run with the staged one, in one step (see the module's text)."""
        if not self.staged:
            return
        replace_folder(self.path, self.final)
        self.path, self.staged = self.final, False

    def set_aside_results(self, epochs: int, log: Callable[[str], None]) -> None:
        """The results of the run as it was, when a resume has saved its first checkpoint:
        its summary goes (it no longer holds); what an evaluation wrote is kept in
        ``evaluated-epoch<N>`` (``set_aside_evaluation``; N: the epoch it scored, else
        ``epochs``, the run's before the resume); its gap curves go on."""
        (self.path / "summary.json").unlink(missing_ok=True)
        set_aside_evaluation(self.path, epochs, log)

    def clear_results(self, epochs: Optional[int] = None,
                      log: Callable[[str], None] = logs.info) -> None:
        """Formerly deleted the results; now ``set_aside_results`` (nothing is deleted but
        the summary)."""
        (self.path / "summary.json").unlink(missing_ok=True)
        set_aside_evaluation(self.path, epochs, log)

    def close(self) -> None:
        """Release the lock; a staged run that never committed is dropped (the old run
        stays as it was)."""
        if self.staged and os.path.lexists(self.path):
            shutil.rmtree(self.path, ignore_errors=True)
        if self.locked:
            self.locked = False
            unlock(self.final)

    def __del__(self):  # a run dropped unfinished (an error between fit_run and finish)
        try:
            if getattr(self, "locked", False):
                self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def has_checkpoint(self) -> bool:
        return any((self.path / name).exists() for name in CHECKPOINTS[:2])
