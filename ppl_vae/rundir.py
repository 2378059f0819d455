"""Run folders: which folders may be written, replaced or resumed, and what they record.

A folder this package writes holds a marker file (``.ppl_vae``) naming its kind, ``run``
(``train``) or ``comparison`` (``compare``); only such a folder is ever replaced or written
into, and a command refuses a folder of the other kind (``claim``; an older, empty marker is
judged by what the folder holds: ``kind_of``). One process writes a folder at a time:
``train``, ``--resume``, ``--overwrite`` and ``evaluate`` hold its lock (``.running``: the
pid and the command, put in place whole by one ``link``; a dead process's lock is taken over,
the taking serialized by ``flock`` on the folder) and refuse a live writer. A process may
take a lock it holds again (``train --evaluate``); it goes with the last ``unlock``.

``--overwrite`` trains the new run in a staging folder beside ``out``
(``.<name>.staging-<pid>``, one per attempt) and replaces the old run only once the new one
has finished its first epoch (``RunDir.commit``), in one step: the two folders are exchanged
with one ``renameat2(RENAME_EXCHANGE)`` call where the file system has it (else two renames,
which ``recover`` undoes when it finds the old run parked). Ctrl-C, a kill or an error before
that leave the old run as it was. ``evaluate`` replaces an evaluation the same way
(``stage_copy``, ``replace_folder``): a copy of the run folder made of hard links gets the
new files, and is exchanged with the run folder, so the evaluation changes as one set.

Files of a run folder are read only if they are regular files (a named pipe would block the
reader: ``require_regular``, ``check_files``), and what they hold is checked field by field
(``read_mapping``, ``expect``): a damaged or hostile file is one line naming the file, the
field, what it holds and what it should hold.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
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
from .errors import UserError, setting

MARKER, LOCK = ".ppl_vae", ".running"
KINDS = ("run", "comparison")
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
# names that show what a folder holds when its marker does not say (a marker of before kinds)
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.prev.pt")
COMPARISON_FILES = ("results.json", "comparison.json", "report.md")
PID_MAX = 2 ** 31 - 1  # a pid is a C int; larger numbers are no process
JSON_LIMIT = 64 * 2 ** 20  # bytes: no JSON file of a run comes near


# ---------------------------------------------------------------------------------------
# reading a run folder's files
# ---------------------------------------------------------------------------------------
def _what(mode: int) -> str:
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
        raise UserError(f"{path} is {_what(st.st_mode)}, not a file: ppl_vae writes only "
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
            raise UserError(f"{path} is {_what(st.st_mode)}, not a file; it is not read")
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
            if not _alive(pid) or pid == os.getpid():
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


# ---------------------------------------------------------------------------------------
# the lock
# ---------------------------------------------------------------------------------------
_HELD: dict = {}  # realpath of a folder -> how many times this process took its lock


def _key(folder: Path) -> str:
    return os.path.realpath(folder)


@contextlib.contextmanager
def _serialized(folder: Path):
    """Lock operations on ``folder`` one process at a time (``flock`` on the folder, which
    the system releases when a process dies); where there is none, the link alone."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _mine(path: Path) -> bool:
    try:
        holder = _holder(path)
    except UserError:
        return False
    return holder is not None and holder[0] == os.getpid()


def _place(tmp: Path, path: Path) -> bool:
    """Put the complete lock file ``tmp`` at ``path`` unless something is there (one
    ``link``; where the file system has none, an exclusive create and write)."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS,
                           errno.EMLINK):
            raise
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, tmp.read_bytes())
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


def lock(folder: Path, command: str) -> None:
    """Take ``folder``'s lock for this process (``command`` names what it does); refuse a
    live writer; take over the lock of a process that is gone. Taking a lock this process
    holds counts once more (``unlock`` releases it at the last count)."""
    folder = Path(folder)
    path, pid, key = folder / LOCK, os.getpid(), _key(folder)
    if _HELD.get(key, 0) > 0 and _mine(path):
        _HELD[key] += 1
        return
    with _serialized(folder):
        tmp = folder / f"{LOCK}.{pid}.tmp"
        try:
            write_new(tmp, f"{pid}\n{command}\n")
            for _ in range(3):
                if _place(tmp, path):
                    _HELD[key] = 1
                    return
                holder = _holder(path)
                if holder is not None and holder[0] != pid and _alive(holder[0]):
                    raise UserError(_busy(folder, holder))
                path.unlink(missing_ok=True)  # a dead (or our own earlier, or empty) lock
        finally:
            tmp.unlink(missing_ok=True)
    raise UserError(f"could not take the lock {path}: another process keeps taking it")


def unlock(folder: Path) -> None:
    folder = Path(folder)
    key = _key(folder)
    count = _HELD.get(key, 0)
    if count > 1:
        _HELD[key] = count - 1
        return
    _HELD.pop(key, None)
    path = folder / LOCK
    with _serialized(folder):
        if _mine(path):
            path.unlink(missing_ok=True)


def _holder(path: Path):
    """(pid, command) written in a lock file; None when there is none, or it is empty (a
    lock cut short while it was written by an older version: stale). Anything else that is
    no pid is refused in one line."""
    try:
        text = read_bytes(path, 4096).decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    parts = text.split()
    if not parts:
        return None
    try:
        pid = int(parts[0])
    except ValueError:
        pid = None
    if pid is None or not 1 <= pid <= PID_MAX:
        raise UserError(f"{path} (the folder's lock): its pid holds {describe(parts[0])}; it "
                        f"should hold a process id from 1 to {PID_MAX:,}: delete the file if "
                        f"no ppl_vae process is writing {path.parent}")
    return pid, (parts[1] if len(parts) > 1 else "train")


def _alive(pid: int) -> bool:
    if not 1 <= pid <= PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OSError, OverflowError, ValueError):
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
    try:
        holder = _holder(Path(folder) / LOCK)
    except UserError:
        return None
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
