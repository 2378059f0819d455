"""ppl_vae.rundir: which folders may be written, replaced or resumed: a folder knows whether
it holds a run or a comparison, foreign folders and an empty --out are refused untouched,
``--overwrite`` (crashed, Ctrl-C'd, killed between its renames, through a symbolic link)
leaves the old run or the new one, never a mix."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from ppl_vae import checkpoint, run, run_setup, rundir, runfiles
from ppl_vae.errors import UserError

from conftest import TOY
from helpers import (TINY, assert_one_error_line, call, config_json, error_segments, files,
                     process_log, summary, train_cli, train_process)
from records import quiet


def tree(folder):
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


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


def test_overwrite_that_crashes_before_its_first_checkpoint_keeps_the_old_run(
        finished_run, monkeypatch):
    before = files(finished_run)
    assert {"checkpoint.pt", "metrics.jsonl", "summary.json", "config.json"} <= set(before)

    def crash(*args, **kwargs):
        raise RuntimeError("crash before the first checkpoint")

    monkeypatch.setattr(run, "fit", crash)
    with pytest.raises(RuntimeError, match="crash"):
        run.train_run(TOY.replace(epochs=3), finished_run, overwrite=True,
                      progress=False, log=quiet)
    assert files(finished_run) == before  # byte-identical, nothing added or left behind
    assert sorted(p.name for p in finished_run.iterdir()) == sorted(before)


def test_overwrite_crash_in_the_first_step_keeps_the_old_run(finished_run, monkeypatch,
                                                             capsys):
    before = files(finished_run)
    build = run_setup.build_objective

    class Boom:
        beta = 1.0

        def __call__(self, *args, **kwargs):
            raise UserError("stop in the first step")

    monkeypatch.setattr(run_setup, "build_objective", lambda c: Boom())
    code, out, err = train_cli(capsys, finished_run, "--overwrite", "--epochs", "3")
    assert code == 2 and error_segments(err) == ["error: stop in the first step"]
    assert files(finished_run) == before
    monkeypatch.setattr(run_setup, "build_objective", build)


FOREIGN = {"config.json": b'{"mine": 1}', "metrics.jsonl": b"my metrics\n",
           "eval.json": b"{}", "samples.png": b"not a png"}


@pytest.mark.parametrize("extra", [[], ["--overwrite"], ["--resume"]])
def test_a_folder_of_foreign_files_is_refused_and_untouched(tmp_path, capsys, extra,
                                                            cached_mnist):
    out = tmp_path / "mine"
    out.mkdir()
    for name, blob in FOREIGN.items():
        (out / name).write_bytes(blob)
    code, stdout, err = train_cli(capsys, out, *extra)
    assert_one_error_line(code, err, stdout)
    assert files(out) == FOREIGN and sorted(p.name for p in out.iterdir()) == sorted(FOREIGN)
    # evaluate refuses it too (no checkpoint), writing nothing
    code, stdout, err = call(capsys, "evaluate", out)
    assert_one_error_line(code, err, stdout)
    assert files(out) == FOREIGN


@pytest.mark.parametrize("argv", [
    ["train", *TINY, "--out", ""],
    ["train", *TINY, "--out", "  "],
    ["compare", "--out", "", "--train-size", "100", "--valid-size", "20",
     "--test-size", "20", "--epochs", "1", "--hidden", "16", "--latent-dim", "2",
     "--guides", "amortized", "--num-particles-eval", "2", "--device", "cpu"],
], ids=["train-empty", "train-blank", "compare-empty"])
def test_an_empty_out_is_refused(capsys, tmp_path, monkeypatch, argv, cached_mnist):
    monkeypatch.chdir(tmp_path)
    code, out, err = call(capsys, *argv)
    assert_one_error_line(code, err, out)
    assert "--out" in err
    assert list(tmp_path.iterdir()) == []


def test_a_resume_after_a_killed_swap_reads_the_run_it_resumes(tmp_path, capsys, cached_mnist):
    """A kill between the two renames of an ``--overwrite`` swap parks the run beside its
    folder; ``--resume`` puts it back before reading its settings (not the defaults)."""
    out = tmp_path / "run"
    assert train_cli(capsys, out, "--lr", "0.002")[0] == 0
    out.rename(tmp_path / ".run.old-999999999")  # a pid that is not alive
    code, _, err = call(capsys, "train", "--out", out, "--resume", "--epochs", "2",
                        "--no-progress")
    assert code == 0, err
    assert config_json(out)["config"]["lr"] == 0.002 and summary(out)["epochs"] == 2


def _sigint_on_call(monkeypatch, calls: int):
    """The training objective sends this process SIGINT on its ``calls``-th call."""
    import signal

    from ppl_vae import run_setup
    build = run_setup.build_objective
    count = [0]

    def patched(config):
        objective = build(config)

        def interrupting(*args, **kwargs):
            count[0] += 1
            if count[0] == calls:
                signal.raise_signal(signal.SIGINT)
            return objective(*args, **kwargs)
        return interrupting
    monkeypatch.setattr(run_setup, "build_objective", patched)


def test_ctrl_c_in_the_first_epoch_of_overwrite_keeps_the_old_run(finished_run, capsys,
                                                                  monkeypatch):
    before = files(finished_run)
    _sigint_on_call(monkeypatch, 1)
    code, out, err = train_cli(capsys, finished_run, "--overwrite", "--epochs", "3")
    assert code == 130
    assert "is left as it was" in err and "--resume" not in err
    assert files(finished_run) == before
    assert not [p for p in finished_run.parent.iterdir() if ".staging" in p.name]


def test_ctrl_c_after_the_first_epoch_of_overwrite_keeps_the_new_run(finished_run, capsys,
                                                                     monkeypatch):
    _sigint_on_call(monkeypatch, 3)  # 2 steps an epoch: the 3rd is in epoch 2
    code, out, err = train_cli(capsys, finished_run, "--overwrite", "--epochs", "3")
    assert code == 130 and "--resume" in err
    state = checkpoint.load(finished_run)
    assert len(state["history"]) == 1 and state["position"]["epoch"] == 1
    assert not (finished_run / "summary.json").exists()  # the old run's is gone with it


def test_overwrite_with_tensorboard_on_both_runs(tmp_path, capsys, cached_mnist):
    out = tmp_path / "run"
    assert train_cli(capsys, out, "--tensorboard")[0] == 0
    code, _, err = train_cli(capsys, out, "--tensorboard", "--overwrite", "--epochs", "2")
    assert code == 0, err
    assert summary(out)["epochs"] == 2 and (out / "tensorboard").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name != "run"]  # no staging left


def test_a_kill_between_the_renames_of_a_swap_is_undone(tmp_path):
    """Where the file system cannot exchange two folders, the swap is two renames; a kill
    between them leaves the old run parked, and the next command puts it back."""
    out = tmp_path / "run"
    parked = tmp_path / ".run.old-999999999"  # a process that is gone
    parked.mkdir()
    (parked / runfiles.MARKER).touch()
    (parked / "summary.json").write_text("{}")
    rundir.recover(out)
    assert (out / "summary.json").exists() and not parked.exists()


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    if not rundir.exchange(a, b):
        pytest.skip("this file system cannot exchange folders (two renames are used)")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


@pytest.mark.parametrize("moment", [pytest.param(0.0, marks=pytest.mark.slow), 0.5,
                                    pytest.param(1.5, marks=pytest.mark.slow)])
def test_sigint_during_overwrite_leaves_the_old_run_or_the_new_never_a_mix(tmp_path, moment):
    """Ctrl-C at several moments of ``--overwrite`` over a finished run (seed 1 over seed
    0): the folder then holds the old run, untouched, or the new one with a finished epoch,
    whose files all agree on the seed; never both, never nothing."""
    out = tmp_path / "run"
    assert train_process(out, "--epochs", "1", "--seed", "0").wait(timeout=120) == 0, process_log(out)
    old = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    proc = train_process(out, "--epochs", "100000", "--seed", "1", "--overwrite",
                  "--train-size", "2048")
    deadline = time.monotonic() + 60
    while not (tmp_path / f".run.staging-{proc.pid}").exists():  # the new run has begun
        assert proc.poll() is None, process_log(out)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(moment)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, process_log(out)
    now = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    state = checkpoint.load(out, warn=lambda _m: None)
    if now == old:
        assert state["config"]["seed"] == 0
    else:  # the new run: every file of it says seed 1, and it resumes
        assert state["config"]["seed"] == 1, sorted(
            n for n in set(now) | set(old) if now.get(n) != old.get(n))
        assert state["config"]["seed"] == 1 and len(state["history"]) >= 1
        assert json.loads((out / "config.json").read_text())["config"]["seed"] == 1
        assert not (out / "summary.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")] == []
    assert not (out / ".running").exists()
