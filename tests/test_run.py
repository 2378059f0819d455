"""ppl_vae.run: the training pipeline: the same seed gives the same numbers, its hold on its
folder, config.json after a full disk, metrics.jsonl and gaps.jsonl across a resume, the gap
figure, and the messages it gives (an absurd ELBO, a divergence, a cut-short scoring)."""
from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch

from ppl_vae import checkpoint, evaluation, run, rundir, runfiles, writelock
from ppl_vae.errors import UserError

from conftest import TOY
from helpers import (GAPS, TINY, assert_one_error_line, call, config_json, files, metrics,
                     numbers, params, summary, train_cli, without_timings)


def _refused_elsewhere(out) -> bool:
    """Whether another process is refused the folder now: as ``train --overwrite`` and
    ``evaluate`` would be (a forked child tries both)."""
    pid = os.fork()
    if pid == 0:
        refused = 0
        try:
            rundir.RunDir(out, overwrite=True)
        except UserError as e:
            refused += "being written" in str(e)
        try:
            writelock.lock(out, "evaluate")
        except UserError as e:
            refused += "being written" in str(e)
        os._exit(0 if refused == 2 else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


# ---------------------------------------------------------------------------------------
# B. the lock is held from the first write to the last
# ---------------------------------------------------------------------------------------
def test_the_lock_is_held_through_the_final_scoring(tmp_path, capsys, cached_mnist,
                                                    monkeypatch):
    """While the test set is scored (after the last epoch, before summary.json), another
    ``train --overwrite`` or ``evaluate`` is refused; the lock goes when the run is done."""
    out = tmp_path / "run"
    seen = []
    scoring = run.held_out_elbo

    def watched(*args, **kwargs):
        seen.append(_refused_elsewhere(out))
        return scoring(*args, **kwargs)
    monkeypatch.setattr(run, "held_out_elbo", watched)
    code, _, err = train_cli(capsys, out, "--compile", "off")
    assert code == 0, err
    assert seen == [True]
    assert not (out / runfiles.LOCK).exists() and not _refused_elsewhere(out)


def test_fit_run_holds_the_lock_until_finish(tmp_path, cached_mnist):
    """What ``compare`` does: fit_run, its own scoring, then finish (which releases)."""
    out = tmp_path / "run"
    config = TOY.replace(compile="off")
    trained = run.fit_run(config, out, progress=False, log=lambda _m: None)
    assert _refused_elsewhere(out)
    run.finish(trained, out, log=lambda _m: None)
    assert (out / "summary.json").exists()
    assert not (out / runfiles.LOCK).exists() and not _refused_elsewhere(out)


def test_train_run_holds_the_lock_through_what_follows(tmp_path, cached_mnist):
    """``train --evaluate``: the evaluation runs under the training's lock (``then``)."""
    out = tmp_path / "run"
    config = TOY.replace(compile="off")
    seen = []

    def then():
        seen.append(_refused_elsewhere(out))
        evaluation.evaluate_run(out, 2, test_size=5, progress=False, log=lambda _m: None,
                                given=config)
        seen.append(_refused_elsewhere(out))  # evaluate's own release keeps the outer hold
    run.train_run(config, out, progress=False, log=lambda _m: None, then=then)
    assert seen == [True, True]
    assert (out / "eval.json").exists() and not (out / runfiles.LOCK).exists()


# ---------------------------------------------------------------------------------------
# E. a full disk during --resume leaves config.json as consistent as the checkpoint
# ---------------------------------------------------------------------------------------
def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_during_resume_leaves_config_json_as_it_was(finished_run, capsys,
                                                               monkeypatch):
    before = files(finished_run)
    monkeypatch.setattr(checkpoint.torch, "save", _full)
    code, out, err = train_cli(capsys, finished_run, "--resume", "--epochs", "3",
                               "--lr", "0.002")
    assert_one_error_line(code, err, out)
    assert "--resume" in err  # the previous checkpoint is there to continue from
    after = files(finished_run)
    assert after["config.json"] == before["config.json"]
    assert "resumes" not in config_json(finished_run)
    assert after == before  # checkpoint, summary, metrics: all as they were
    monkeypatch.undo()
    code, _, err = train_cli(capsys, finished_run, "--resume", "--epochs", "3", "--lr", "0.002")
    assert code == 0, err
    doc = config_json(finished_run)
    assert doc["config"]["epochs"] == 3 and doc["resumes"][0]["after_epoch"] == 2
    assert summary(finished_run)["epochs"] == 3


def test_config_json_follows_the_checkpoint_it_describes(finished_run, capsys, monkeypatch):
    """On a resume config.json is put in place only once the checkpoint of the resumed run is
    written: a kill in between leaves the old config.json beside the old checkpoint."""
    order = []
    save, replace = checkpoint.save, os.replace
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: (order.append("checkpoint"),
                                                               save(*a, **k))[1])

    def replacing(src, dst, *a, **k):
        if os.path.basename(dst) == "config.json":
            order.append("config")
        return replace(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", replacing)
    assert train_cli(capsys, finished_run, "--resume", "--epochs", "3")[0] == 0
    assert order[:2] == ["checkpoint", "config"], order


# ---------------------------------------------------------------------------------------
# G. messages
# ---------------------------------------------------------------------------------------
def test_the_activation_role_gives_the_syntax_it_accepts(tmp_path, capsys, cached_mnist):
    code, out, err = train_cli(capsys, tmp_path / "o", "--activation", "builtins:object")
    assert_one_error_line(code, err, out)
    assert "torch.nn.ReLU" not in err and "torch.nn:ReLU" in err


def test_an_unknown_name_in_a_checkpoint_is_not_called_code(finished_run, capsys):
    for name in (checkpoint.NAME, checkpoint.PREVIOUS):
        state = torch.load(finished_run / name, weights_only=True)
        state["config"]["guide"] = "Amortized"
        torch.save(state, finished_run / name)
    for argv in (["evaluate", finished_run, "--num-particles-eval", "2"],
                 ["train", *TINY, "--out", finished_run, "--resume", "--epochs", "3"]):
        code, out, err = call(capsys, *argv)
        assert_one_error_line(code, err, out)
        assert "code" not in err and "import" not in err, err
        assert "'Amortized'" in err and "guide" in err and "amortized" in err, err


def test_a_full_disk_in_a_new_run_does_not_offer_a_resume(tmp_path, capsys, cached_mnist,
                                                          monkeypatch):
    monkeypatch.setattr(checkpoint.torch, "save", _full)
    out = tmp_path / "new"
    code, stdout, err = train_cli(capsys, out)
    assert_one_error_line(code, err, stdout)
    assert "disk" in err and "--resume" not in err and "previous checkpoint" not in err
    assert not (out / "checkpoint.pt").exists()


def test_a_full_disk_in_evaluate_names_no_out(finished_run, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "latent.png")
    monkeypatch.setattr(evaluation, "run_figures", full)
    code, out, err = call(capsys, "evaluate", finished_run, "--num-particles-eval", "2",
                          "--rows", "5")
    assert_one_error_line(code, err, out)
    assert "No space left" in err and "--out" not in err
    assert not (finished_run / "eval.json").exists()


def test_ctrl_c_in_evaluate_speaks_of_the_evaluation(finished_run, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        raise AssertionError("SIGINT did not interrupt")  # never reached with Python's handler
    monkeypatch.setattr(evaluation, "run_figures", interrupt)
    # Python's own Ctrl-C handler, whatever the test process was given (a test runner's
    # worker may start with another); conftest restores the previous one afterwards
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code, out, err = call(capsys, "evaluate", finished_run, "--num-particles-eval", "2",
                          "--rows", "5")
    assert code == 130
    assert "epochs keep their checkpoints" not in err and "evaluat" in err, err
    assert err.count("\n") == 1
    assert not (finished_run / "eval.json").exists()
    assert not (finished_run / runfiles.LOCK).exists()


def test_the_first_epoch_is_reported_apart_from_the_steady_state():
    """A compile in the first epoch does not inflate the steady-state rate: the summary gives
    the first epoch's seconds and the later epochs' median apart."""
    from ppl_vae.run import steady_state
    from ppl_vae.loopstate import EpochMetrics
    history = [EpochMetrics(1, -100.0, -99.0, 9.9, 9.9, 100, 1.0),
               EpochMetrics(2, -99.0, -98.0, 1.6, 11.5, 200, 1.0),
               EpochMetrics(3, -98.0, -97.0, 1.8, 13.3, 300, 1.0),
               EpochMetrics(4, -97.0, -96.0, 1.5, 14.8, 400, 1.0)]
    s = steady_state(history)
    assert s["first_epoch_seconds"] == 9.9 and s["steady_seconds_per_epoch"] == 1.6
    assert s["steady_steps_per_second"] == pytest.approx(100 / 1.6)
    assert steady_state(history[:1]) == {"first_epoch_seconds": 9.9} and steady_state([]) == {}


def test_a_pieces_failure_is_said_whole_not_cut_mid_word(tmp_path, cached_mnist, monkeypatch,
                                                         capsys):
    """A user's piece that fails on the probe batch: its whole first line is in the message
    (it was cut at 160 characters, mid-word)."""
    from ppl_vae import cli
    end = "and this is the end of a long message that names the cause"
    (tmp_path / "longfail.py").write_text(
        "class Fails:\n"
        "    def __call__(self, model, guide, batch):\n"
        f"        raise RuntimeError('x' * 200 + ' {end}')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = cli.main(["train", "--objective", "longfail:Fails", "--train-size", "300",
                     "--valid-size", "20", "--test-size", "30", "--epochs", "1",
                     "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and end in err and err.count("\n") == 1, err


def test_an_absurd_elbo_from_the_refinement_names_refine_lr(tmp_path, cached_mnist, capsys):
    """A semi-amortized run whose refinement step is far too large ends with an absurd but
    finite ELBO: the warning names --refine-lr, not --lr."""
    from ppl_vae import cli
    assert cli.main(["train", "--guide", "semiamortized", "--refine-lr", "1000",
                     "--train-size", "300", "--valid-size", "20", "--test-size", "40",
                     "--epochs", "1", "--hidden", "16", "--latent-dim", "3", "--batch-size",
                     "100", "--compile", "off", "--no-progress",
                     "--out", str(tmp_path / "r")]) == 0
    said = capsys.readouterr()
    err = " ".join((said.out + said.err).split())
    assert "is absurd" in err and "try a smaller --refine-lr (it was 1000)" in err, err
    assert "--refine-lr 1000" in err and "refine_lr" not in err


def test_same_seed_two_runs_same_numbers(tmp_path, cached_mnist, capsys):
    for name in ("a", "b"):
        assert train_cli(capsys, tmp_path / name, "--epochs", "2")[0] == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert numbers(a) == numbers(b)
    assert without_timings(summary(a)) == without_timings(summary(b))
    for key, tensor in params(a).items():
        assert torch.equal(tensor, params(b)[key]), key


def test_a_resume_keeps_the_gap_curves(tmp_path, cached_mnist, capsys):
    """The gap rows of the epochs before a resume stay (a resume once deleted gaps.jsonl)."""
    out = tmp_path / "gaps"
    assert train_cli(capsys, out, *GAPS, "--epochs", "1")[0] == 0
    lines = [json.loads(line) for line in (out / "gaps.jsonl").read_text().splitlines()]
    for line in lines:  # as if the first process had scored for 1,000 s
        line["tracking_seconds"] = 1000.0
    before = "".join(json.dumps(line) + "\n" for line in lines)
    (out / "gaps.jsonl").write_text(before)
    assert train_cli(capsys, out, "--track-gaps", "--gap-epochs", "1", "2", "--epochs", "2",
                     "--resume")[0] == 0
    after = (out / "gaps.jsonl").read_text()
    assert after.startswith(before)
    assert {json.loads(line)["epoch"] for line in after.splitlines()} == {1, 2}
    # the tracking seconds count both processes, as the training seconds do
    newest = json.loads(after.splitlines()[-1])["tracking_seconds"]
    assert newest > 1000.0 and summary(out)["gap_tracking_seconds"] == newest


def test_resume_repairs_a_truncated_metrics_jsonl(finished_run, capsys):
    path = finished_run / "metrics.jsonl"
    old = metrics(finished_run)
    path.write_bytes(path.read_bytes()[:-30])
    assert train_cli(capsys, finished_run, "--resume", "--epochs", "3")[0] == 0
    new = metrics(finished_run)
    assert [m["epoch"] for m in new] == [1, 2, 3] and new[:2] == old


def test_track_gaps_draws_its_figure_at_the_end_of_training(tmp_path, capsys, cached_mnist):
    out = tmp_path / "run"
    assert train_cli(capsys, out, "--track-gaps")[0] == 0
    assert (out / "gaps.jsonl").exists() and (out / "gaps.png").stat().st_size > 0


def test_an_absurd_elbo_warning_names_the_flag_without_control_bytes(tmp_path, capsys,
                                                                     cached_mnist):
    code, out, err = call(capsys, "train", *TINY, "--lr", "10", "--out", tmp_path / "r")
    assert "\x00" not in out + err
    if "absurd" in out + err:
        assert "--lr" in out + err


def test_a_divergence_before_any_checkpoint_says_so(tmp_path, capsys, cached_mnist):
    code, out, err = call(capsys, "train", *TINY, "--beta", "1e308", "--out", tmp_path / "r")
    assert code == 1
    assert "no checkpoint" in err and "is kept" not in err


def test_a_run_interrupted_in_its_final_scoring_can_be_finished(finished_run, capsys):
    """Ctrl-C while the test set is scored leaves all epochs and no summary: --resume
    finishes the scoring instead of refusing (it trains nothing more)."""
    (finished_run / "summary.json").unlink()
    before = checkpoint.load(finished_run)["model"]
    code, out, err = train_cli(capsys, finished_run, "--epochs", "2", "--resume")
    assert code == 0, err
    assert summary(finished_run)["epochs"] == 2
    after = checkpoint.load(finished_run)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
