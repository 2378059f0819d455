"""ppl_vae.writelock: one writer per folder: a live writer is refused in one line, a stale
lock is taken over, the lock admits one holder among processes and is reentrant within one."""
from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest

from ppl_vae import rundir, runfiles, writelock
from ppl_vae.errors import UserError

from helpers import assert_one_error_line, call, files, train_cli


def test_evaluate_refuses_a_run_that_is_still_being_written(finished_run, capsys):
    """One writer per folder: a live lock (training or evaluating) is refused in one line and
    nothing is written; a lock whose process is gone is stale and taken over."""
    (finished_run / ".running").write_text(f"{os.getppid()}\ntrain\n")
    code, out, err = call(capsys, "evaluate", finished_run, "--num-particles-eval", "2",
                          "--rows", "10")
    assert_one_error_line(code, err, out)
    assert f"pid {os.getppid()}" in err and "train" in err
    assert not (finished_run / "eval.json").exists()
    (finished_run / ".running").write_text("999999999")
    assert call(capsys, "evaluate", finished_run, "--num-particles-eval", "2",
                "--rows", "10")[0] == 0
    assert json.loads((finished_run / "eval.json").read_text())["finished"] is True
    assert not (finished_run / ".running").exists()  # released when done


def _live_lock(folder, command="train"):
    (folder / runfiles.LOCK).write_text(f"{os.getppid()}\n{command}\n")  # a live process


@pytest.mark.parametrize("extra", [["--overwrite"], ["--resume", "--epochs", "3"], []])
def test_a_live_writer_is_refused(finished_run, capsys, extra):
    _live_lock(finished_run)
    before = files(finished_run)
    code, out, err = train_cli(capsys, finished_run, *extra)
    assert_one_error_line(code, err, out)
    assert f"pid {os.getppid()}" in err
    assert files(finished_run) == before


def test_two_new_runs_into_one_folder(tmp_path, capsys, cached_mnist):
    """The second of two runs started together is refused when it takes the lock (a
    folder checked free before the first took it)."""
    out = tmp_path / "run"
    folder = rundir.RunDir(out)  # the second run checked the folder: free
    assert train_cli(capsys, out, "--epochs", "1")[0] == 0  # the first ran meanwhile
    _live_lock(out)  # ... and still holds it
    with pytest.raises(UserError, match="another process"):
        folder.create()


def test_a_stale_lock_is_taken_over(finished_run, capsys):
    (finished_run / runfiles.LOCK).write_text("999999999\ntrain\n")
    code, _, err = train_cli(capsys, finished_run, "--resume", "--epochs", "3")
    assert code == 0, err
    assert not (finished_run / runfiles.LOCK).exists()


def _hammer(folder, seconds, violations, takeovers, seed):
    """Take and release ``folder``'s lock for ``seconds``; count two holders at once. Now and
    then a child takes the lock and dies holding it (a lock to take over)."""
    import random

    real_fdopen, real_write = os.fdopen, os.write

    def slow_fdopen(*args, **kwargs):  # a loaded machine: a pause between creating a file
        time.sleep(0.001)              # and writing it
        return real_fdopen(*args, **kwargs)

    def slow_write(*args, **kwargs):
        time.sleep(0.001)
        return real_write(*args, **kwargs)
    os.fdopen, os.write = slow_fdopen, slow_write
    rng = random.Random(seed)
    inside = os.path.join(folder, "inside")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if rng.random() < 0.05:
            pid = os.fork()
            if pid == 0:  # dies holding the lock, if it got it
                try:
                    writelock.lock(folder, "dying")
                except UserError:
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            with takeovers.get_lock():
                takeovers.value += os.waitstatus_to_exitcode(status) == 0
            continue
        try:
            writelock.lock(folder, "hammer")
        except UserError:
            continue
        try:
            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with violations.get_lock():
                violations.value += 1
        else:
            time.sleep(0.0005)
            os.close(fd)
            os.unlink(inside)
        writelock.unlock(folder)


def test_the_lock_admits_one_holder_among_processes(tmp_path):
    folder = str(tmp_path)
    ctx = multiprocessing.get_context("fork")
    violations, takeovers = ctx.Value("i", 0), ctx.Value("i", 0)
    procs = [ctx.Process(target=_hammer, args=(folder, 5.0, violations, takeovers, i))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert takeovers.value > 0  # dead locks were taken over meanwhile
    assert violations.value == 0
    leftovers = [n for n in os.listdir(folder) if n not in (runfiles.LOCK,)]
    assert leftovers == []  # no temporary file of the lock is left


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    writelock.lock(tmp_path, "train")
    writelock.lock(tmp_path, "evaluate")  # a train --evaluate: one process, one lock
    writelock.unlock(tmp_path)
    assert (tmp_path / runfiles.LOCK).exists()  # the outer holder still holds it
    writelock.unlock(tmp_path)
    assert not (tmp_path / runfiles.LOCK).exists()
