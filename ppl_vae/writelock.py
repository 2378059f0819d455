"""The one-writer lock of a folder: one process writes a run or comparison folder at a time.

``train``, ``--resume``, ``--overwrite`` and ``evaluate`` hold the run folder's lock
(``.running``: the pid and the command, put in place whole by one ``link``; a dead process's
lock is taken over, the taking serialized by ``flock`` on the folder) and refuse a live
writer (``refuse_writer``, before any work). A process may take a lock it holds again
(``train --evaluate``); it goes with the last ``unlock``.

Layering: above ``runfiles`` (the lock file is read and written as a run folder's files
are), below ``rundir`` (``RunDir`` takes the lock; ``recover`` asks ``alive`` whether the
process of a parked attempt is gone).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Optional

from .errors import UserError
from .runfiles import LOCK, describe, read_bytes, write_new

PID_MAX = 2 ** 31 - 1  # a pid is a C int; larger numbers are no process
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
                if holder is not None and holder[0] != pid and alive(holder[0]):
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


def alive(pid: int) -> bool:
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
    if holder is not None and holder[0] != os.getpid() and alive(holder[0]):
        raise UserError(_busy(folder, holder))


def training_pid(folder: Path) -> Optional[int]:
    """The pid of a live process writing into ``folder``, if any."""
    try:
        holder = _holder(Path(folder) / LOCK)
    except UserError:
        return None
    if holder is None or holder[0] == os.getpid() or not alive(holder[0]):
        return None
    return holder[0]
