"""Issue 32: run folders. A resume keeps what an evaluation wrote (A), a folder knows whether
it holds a run or a comparison (C), an evaluation is replaced as one set and the lock is
taken atomically (F), and ``--overwrite`` through a symbolic link (G).

Each test here failed on the code before the fix it names.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from ppl_vae import rundir, runfiles, writelock
from ppl_vae.errors import UserError
from helpers import (FIGURES, TINY, assert_one_error_line, call, config_json, files, summary,
                     train_cli, trained_copy)

EVALUATED = ("eval.json", "arrays.npz", *FIGURES)


@pytest.fixture
def evaluated(tmp_path, tmp_path_factory, cached_mnist, capsys):
    """A finished 2-epoch run, evaluated (its own copy per test)."""
    return trained_copy(tmp_path_factory, capsys, tmp_path / "run", 2, evaluate=True)


def tree(folder):
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ---------------------------------------------------------------------------------------
# A. a resume keeps what an evaluation wrote, in a subfolder named by the epoch it scored
# ---------------------------------------------------------------------------------------
def test_a_resume_keeps_the_evaluation_in_a_subfolder(evaluated, capsys):
    before = files(evaluated)
    assert set(EVALUATED) <= set(before)
    code, out, err = train_cli(capsys, evaluated, "--resume", "--epochs", "3")
    assert code == 0, err
    kept = evaluated / "evaluated-epoch2"
    assert kept.is_dir()
    for name in EVALUATED:  # every file, byte for byte, and none left beside the new run
        assert (kept / name).read_bytes() == before[name], name
        assert not (evaluated / name).exists(), name
    assert json.loads((kept / "eval.json").read_text())["epochs"] == 2
    assert summary(evaluated)["epochs"] == 3
    said = [line for line in out.splitlines() if "evaluated-epoch2" in line]
    assert len(said) == 1, out  # one log line says where the evaluation went
    # the folder stays a run that the next commands take: evaluate, resume, overwrite
    assert rundir.kind_of(evaluated) == "run"
    assert call(capsys, "evaluate", evaluated, "--num-particles-eval", "2",
                "--rows", "10")[0] == 0
    assert (kept / "eval.json").read_bytes() == before["eval.json"]  # untouched by it
    assert json.loads((evaluated / "eval.json").read_text())["epochs"] == 3
    code, _, err = train_cli(capsys, evaluated, "--resume", "--epochs", "4")
    assert code == 0, err
    assert (evaluated / "evaluated-epoch3" / "eval.json").exists() and kept.is_dir()
    code, _, err = train_cli(capsys, evaluated, "--overwrite", "--epochs", "1")
    assert code == 0, err  # replaces the run with its kept evaluations, leaves nothing beside
    assert not (evaluated / "evaluated-epoch2").exists()
    assert [p.name for p in evaluated.parent.iterdir() if p.name.startswith(".")] == []


def test_a_stale_evaluation_is_kept_in_a_subfolder(evaluated, capsys):
    """An evaluation of another epoch than the run's last (made while the run was cut short)
    is kept aside by the scoring that finishes the run, not deleted."""
    doc = json.loads((evaluated / "eval.json").read_text())
    doc["epochs"] = 1
    (evaluated / "eval.json").write_text(json.dumps(doc))
    (evaluated / "summary.json").unlink()  # interrupted in its final scoring
    before = files(evaluated)
    code, out, err = train_cli(capsys, evaluated, "--resume", "--epochs", "2")
    assert code == 0, err
    kept = evaluated / "evaluated-epoch1"
    for name in EVALUATED:
        assert (kept / name).read_bytes() == before[name], name
    assert len([line for line in out.splitlines() if "evaluated-epoch1" in line]) == 1, out
    assert summary(evaluated)["epochs"] == 2


def test_setting_aside_never_overwrites_an_earlier_set(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / runfiles.MARKER).write_text("run")
    for text in ("first", "second"):
        (folder / "eval.json").write_text(json.dumps({"epochs": 2, "text": text}))
        (folder / "latent.png").write_text(text)
        assert runfiles.set_aside_evaluation(folder, 5, log=lambda _m: None) is not None
    kept = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert kept == ["evaluated-epoch2", "evaluated-epoch2-2"]
    assert (folder / "evaluated-epoch2" / "latent.png").read_text() == "first"
    assert (folder / "evaluated-epoch2-2" / "latent.png").read_text() == "second"


# ---------------------------------------------------------------------------------------
# C. a run folder and a comparison's folder are not taken for one another
# ---------------------------------------------------------------------------------------
def _comparison(folder, how):
    folder.mkdir()
    if how == "marked":
        (folder / runfiles.MARKER).write_text("comparison")
        return folder
    (folder / runfiles.MARKER).write_text("")  # a marker of before the kinds: judged by content
    if how == "results":
        (folder / "results.json").write_text("{}")
    else:  # a guide's run folder inside
        (folder / "amortized").mkdir()
        (folder / "amortized" / runfiles.MARKER).write_text("")
        (folder / "amortized" / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("how", ["marked", "results", "guide-folder"])
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_comparison_folder_is_refused_by_train_and_evaluate(tmp_path, capsys, cached_mnist,
                                                             how, command):
    folder = _comparison(tmp_path / "cmp", how)
    before = tree(folder)
    if command == "train":
        code, out, err = train_cli(capsys, folder)
    else:
        code, out, err = call(capsys, "evaluate", folder, "--num-particles-eval", "2")
    assert_one_error_line(code, err, out)
    assert "comparison" in err
    assert tree(folder) == before and not (folder / runfiles.LOCK).exists()


def test_compare_refuses_an_evaluated_run_folder(evaluated, capsys, cached_mnist):
    before = tree(evaluated)
    code, out, err = call(capsys, "compare", *TINY, "--guides", "amortized",
                          "--num-particles-eval", "2", "--out", evaluated)
    assert_one_error_line(code, err, out)
    assert "run" in err
    assert tree(evaluated) == before


def test_the_marker_records_the_kind(tmp_path, capsys, cached_mnist):
    out = tmp_path / "run"
    assert train_cli(capsys, out)[0] == 0
    assert (out / runfiles.MARKER).read_text().strip() == "run"
    assert rundir.kind_of(out) == "run"
    cmp = tmp_path / "cmp"
    assert rundir.claim(cmp, "comparison") == cmp and not cmp.exists()  # checks, writes nothing
    rundir.mark(cmp, "comparison")
    assert rundir.kind_of(cmp) == "comparison"
    with pytest.raises(UserError, match="comparison"):
        rundir.claim(cmp, "run")
    with pytest.raises(UserError, match="run"):
        rundir.claim(out, "comparison")
    with pytest.raises(UserError, match="inside"):  # a comparison inside a run folder
        rundir.claim(out / "sub", "comparison")
    old = tmp_path / "old"  # an old, empty marker: judged by what the folder holds
    old.mkdir()
    (old / runfiles.MARKER).write_text("")
    assert rundir.kind_of(old) is None
    (old / "checkpoint.pt").write_text("x")
    assert rundir.kind_of(old) == "run"


# ---------------------------------------------------------------------------------------
# F. an evaluation is replaced as one set; the lock is taken atomically
# ---------------------------------------------------------------------------------------
def _consistent(run):
    """The run's evaluation is one set: eval.json's rows are the rows arrays.npz holds."""
    if not run.exists():  # a kill between two renames: the next command puts the old back
        parked = [p for p in run.parent.iterdir() if p.name.startswith(f".{run.name}.old-")]
        assert len(parked) == 1, list(run.parent.iterdir())
        run = parked[0]
    rows = json.loads((run / "eval.json").read_text())["num_rows"]
    with np.load(run / "arrays.npz") as a:
        assert len(a["labels"]) == rows, (rows, len(a["labels"]))


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_an_evaluation_is_replaced_as_one_set(evaluated, capsys, monkeypatch, exchange):
    """Seen at every rename (or exchange) the evaluation makes, the run's evaluation is the
    old one or the new one, never eval.json of one beside arrays.npz of the other."""
    _consistent(evaluated)
    seen = []
    real_replace, real_rename, real_exchange = os.replace, os.rename, rundir.exchange

    def watched(real):
        def call_(*args, **kwargs):
            _consistent(evaluated)  # what a kill just before this call would leave
            result = real(*args, **kwargs)
            _consistent(evaluated)  # ... and just after it
            seen.append(args)
            return result
        return call_
    monkeypatch.setattr(os, "replace", watched(real_replace))
    monkeypatch.setattr(os, "rename", watched(real_rename))
    monkeypatch.setattr(rundir, "exchange", watched(
        real_exchange if exchange else (lambda a, b: False)))
    code, out, err = call(capsys, "evaluate", evaluated, "--num-particles-eval", "2",
                          "--rows", "5")
    assert code == 0, err
    assert seen
    assert json.loads((evaluated / "eval.json").read_text())["num_rows"] == 5
    _consistent(evaluated)
    assert [p.name for p in evaluated.parent.iterdir() if p.name.startswith(".")] == []


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


# ---------------------------------------------------------------------------------------
# G. --overwrite through a symbolic link replaces the folder it points to
# ---------------------------------------------------------------------------------------
def test_overwrite_through_a_symlink_replaces_its_target(finished_run, capsys):
    link = finished_run.parent / "latest"
    link.symlink_to(finished_run.name)
    code, out, err = train_cli(capsys, link, "--overwrite", "--epochs", "1")
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == finished_run.name
    assert summary(finished_run)["epochs"] == 1
    assert sorted(p.name for p in finished_run.parent.iterdir()) == ["latest", "run"]
