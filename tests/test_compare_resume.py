"""compare --resume: a comparison cut short at any moment (during a guide's training, while
scoring, between runs, while writing a record) and then resumed writes the results of an
uninterrupted comparison; a resume with other settings, of a finished comparison or of a
folder without one is refused in one line; a new comparison refuses an unfinished one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ppl_vae import cli, compare as compare_mod, data, heldout
from records import quiet, without_times
from ppl_vae.compare import PLAN, RECORD, compare
from ppl_vae.config import Config
from ppl_vae.errors import UserError

TINY = Config(train_size=300, valid_size=20, test_size=40, epochs=2, hidden=(16,),
              latent_dim=3, batch_size=100, device="cpu", compile="off", track_gaps=True,
              gap_epochs=(1, 2), gap_rows=20, gap_particles=10)
GUIDES = ("amortized", "meanfield")
SEEDS = (0, 1)
QUICK_FIT = {"max_steps": 30}


def run(out, **kw):
    return compare(TINY, out, num_particles=5, progress=False, log=quiet, guides=GUIDES,
                   seeds=SEEDS, local_rows=20, local_options=QUICK_FIT, **kw)


def _short_gap_fits(mp):
    """The gap curves' local fits cut from 500 steps to 20 (the toy's seconds, not hours)."""
    record = heldout.GapTracker.record

    def short(self, metrics):
        self.local_steps = 20
        return record(self, metrics)
    mp.setattr(heldout.GapTracker, "record", short)


@pytest.fixture(autouse=True)
def _short_gaps(monkeypatch):
    _short_gap_fits(monkeypatch)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, mnist):
    out = tmp_path_factory.mktemp("base") / "c"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "load", lambda *a, **k: mnist)
        _short_gap_fits(mp)
        return run(out)


def _interrupt_at(monkeypatch, name: str, call: int):
    """Raise KeyboardInterrupt (Ctrl-C) at the ``call``-th call of compare's ``name``."""
    real, calls = getattr(compare_mod, name), []

    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(compare_mod, name, wrapped)


# the moments: scoring the 2nd run, the local fit of the 2nd (a table), writing the 3rd's
# record, the start of the 4th run's training, writing the results
MOMENTS = [("evaluate_trained", 2), ("local_budget", 2), ("_write_record", 3),
           ("fit_run", 4), ("_write_results", 1)]


@pytest.mark.parametrize("name,call", MOMENTS[:1] + [pytest.param(*m, marks=pytest.mark.slow)
                                                     for m in MOMENTS[1:]])
def test_a_resumed_comparison_gives_the_uninterrupted_results(tmp_path, mnist, monkeypatch,
                                                              baseline, name, call):
    monkeypatch.setattr(data, "load", lambda *a, **k: mnist)
    out = tmp_path / "c"
    with monkeypatch.context() as mp:
        _interrupt_at(mp, name, call)
        with pytest.raises(KeyboardInterrupt):
            run(out)
    assert (out / PLAN).exists() and not (out / "results.json").exists()
    with pytest.raises(UserError, match="unfinished comparison; pass resume"):
        run(out)  # a new comparison does not take the unfinished one's place silently
    finished = sorted(p.parent.relative_to(out).as_posix() for p in out.rglob(RECORD))
    resumed = run(out, resume=True)
    assert without_times(resumed) == without_times(baseline)
    for folder in finished:  # what was scored before the interruption was kept, not redone
        assert json.loads((out / folder / RECORD).read_text())["seed"] in SEEDS
    assert json.loads((out / "results.json").read_text())["guides"] == list(GUIDES)


def test_resume_refuses_other_settings_a_finished_comparison_and_an_empty_folder(
        tmp_path, mnist, monkeypatch, baseline):
    monkeypatch.setattr(data, "load", lambda *a, **k: mnist)
    out = tmp_path / "c"
    with pytest.raises(UserError, match="holds no comparison to continue"):
        run(out, resume=True)
    with monkeypatch.context() as mp:
        _interrupt_at(mp, "fit_run", 2)
        with pytest.raises(KeyboardInterrupt):
            run(out)
    with pytest.raises(UserError, match=r"changes --epochs \(was 2, now 3\)"):
        compare(TINY.replace(epochs=3), out, num_particles=5, progress=False, log=quiet,
                guides=GUIDES, seeds=SEEDS, local_rows=20, local_options=QUICK_FIT,
                resume=True)
    with pytest.raises(UserError, match=r"changes --num-particles-eval \(was 5, now 6\)"):
        compare(TINY, out, num_particles=6, progress=False, log=quiet, guides=GUIDES,
                seeds=SEEDS, local_rows=20, local_options=QUICK_FIT, resume=True)
    with pytest.raises(UserError, match="choose one"):
        run(out, resume=True, overwrite=True)
    run(out, resume=True)
    with pytest.raises(UserError, match="finished comparison: nothing to resume"):
        run(out, resume=True)


def test_an_overwrite_removes_the_old_results_first(tmp_path, mnist, monkeypatch, baseline):
    """A comparison replaced with --overwrite and cut short leaves no results.json beside
    runs that no longer match it; it is resumable instead."""
    monkeypatch.setattr(data, "load", lambda *a, **k: mnist)
    out = tmp_path / "c"
    with monkeypatch.context() as mp:
        _interrupt_at(mp, "evaluate_trained", 4)
        with pytest.raises(KeyboardInterrupt):
            run(out)
    run(out, resume=True)
    assert (out / "results.json").exists()
    with monkeypatch.context() as mp:
        _interrupt_at(mp, "evaluate_trained", 1)
        with pytest.raises(KeyboardInterrupt):
            run(out, overwrite=True)
    assert not (out / "results.json").exists() and not (out / "report.md").exists()
    assert without_times(run(out, resume=True)) == without_times(baseline)
    # an overwrite with other settings, cut short: its resume keeps none of the old runs
    shorter = TINY.replace(epochs=1, gap_epochs=(1,))
    with monkeypatch.context() as mp:
        _interrupt_at(mp, "evaluate_trained", 1)
        with pytest.raises(KeyboardInterrupt):
            compare(shorter, out, num_particles=5, progress=False, log=quiet, guides=GUIDES,
                    seeds=SEEDS, local_rows=20, local_options=QUICK_FIT, overwrite=True)
    doc = compare(shorter, out, num_particles=5, progress=False, log=quiet, guides=GUIDES,
                  seeds=SEEDS, local_rows=20, local_options=QUICK_FIT, resume=True)
    assert all(r["epochs"] == 1 for g in GUIDES for r in doc["ran"][g].values())


SMALL = ["--guides", "amortized,meanfield", "--seeds", "2", "--train-size", "300",
         "--valid-size", "20", "--test-size", "40", "--epochs", "3", "--hidden", "16",
         "--latent-dim", "3", "--batch-size", "100", "--compile", "off", "--local-rows", "20",
         "--num-particles-eval", "5", "--no-progress", "--device", "cpu"]


@pytest.mark.slow
def test_a_killed_compare_command_resumes_to_the_same_results(tmp_path):
    """SIGKILL in the middle of a guide's training (its first checkpoint written), then the
    same command with --resume: the results of an uninterrupted command."""
    base, out = tmp_path / "base", tmp_path / "killed"
    cmd = [sys.executable, "-m", "ppl_vae", "compare", *SMALL]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + ["--out", str(base)], check=True, capture_output=True, env=env)
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    target = out / "meanfield" / "seed0" / "checkpoint.pt"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()
    done = subprocess.run(cmd + ["--out", str(out), "--resume"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "kept as it is" in done.stderr + done.stdout
    a = json.loads((base / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert without_times(a) == without_times(b)


def test_cli_passes_resume_and_quick_to_compare(tmp_path, monkeypatch):
    """compare's --resume and --quick reach the comparison (the report labels a --quick run a
    smoke look from this flag)."""
    seen = {}

    def fake(config, out, **kw):
        seen.update(kw, out=out, config=config)
        return {}
    monkeypatch.setattr(compare_mod, "compare", fake)
    assert cli.main(["compare", "--quick", "--resume", "--out", str(tmp_path / "c")]) == 0
    assert seen["resume"] is True and seen["quick"] is True
    assert seen["config"].epochs == 2 and seen["num_particles"] == 100  # --quick's settings
    assert cli.main(["compare", "--out", str(tmp_path / "c")]) == 0
    assert seen["resume"] is False and seen["quick"] is False


def test_cli_resume_and_ctrl_c_message(tmp_path, capsys):
    """--resume is compare's option (its help says what it keeps); Ctrl-C names the resume."""
    help_text = cli.build_parser().commands["compare"].format_help()
    assert "--resume" in help_text and "continues the one in progress" in " ".join(help_text.split())
    assert "ppl-vae compare" in cli.RESUME_COMPARE and "--resume" in cli.RESUME_COMPARE


def test_the_curves_over_budget_hold_every_seed(baseline, tmp_path):
    """results.json holds the gap curves of every seed as curves over budget (epochs,
    steps, passes), the paired differences at each epoch, and the figure is drawn."""
    curves = baseline["curves"]
    assert curves["seeds"] == list(SEEDS) and curves["split"] == "test"
    for guide in GUIDES:
        points = curves["guides"][guide]
        assert [p["epoch"] for p in points] == [1, 2]
        assert [p["steps"] for p in points] == [3.0, 6.0]  # 300 rows, batch 100
        log_px = points[-1]["log_px"]
        assert log_px["seeds"] == list(SEEDS) and len(log_px["values"]) == 2
        assert log_px["mean"] == pytest.approx(sum(log_px["values"]) / 2)
        assert points[-1]["passes"] == 6 * baseline[guide]["compute"]["per_step"]["passes"]
    assert {(d["epoch"], d["quantity"]) for d in curves["differences"]} >= {(1, "log_px"),
                                                                            (2, "log_px")}


def test_peak_memory_is_each_guides_own(tmp_path, mnist, monkeypatch):
    """A guide run after a big one reports its own peak RSS, not the process's so far."""
    from ppl_vae import memory
    monkeypatch.setattr(data, "load", lambda *a, **k: mnist)
    real = compare_mod.fit_run

    def fit_then_hog(config, *a, **k):
        trained = real(config, *a, **k)
        if config.guide == "amortized":  # the first guide touches 400 MiB more at its peak
            block = bytearray(400 * 2 ** 20)
            block[::4096] = b"\x01" * len(block[::4096])
            del block  # given back before the next guide starts
        return trained
    monkeypatch.setattr(compare_mod, "fit_run", fit_then_hog)
    doc = compare(TINY.replace(track_gaps=False, epochs=1), tmp_path / "c", num_particles=5,
                  progress=False, log=quiet, guides=GUIDES, seeds=(0,), local_rows=20,
                  local_options=QUICK_FIT)
    first, second = doc["amortized"]["peak_rss_mb"], doc["meanfield"]["peak_rss_mb"]
    assert first > 400
    if memory.reset_peak():  # Linux: the second guide's peak is its own
        assert second < first - 300, (first, second)


def test_a_guide_runs_record_gives_it_back():
    """GuideRun.to_record / from_record: what a resume reads is the run that was scored."""
    from ppl_vae.compute import StepCost
    from ppl_vae.evaluate import Estimate, Scores
    from ppl_vae.results import GuideRun
    from ppl_vae.run import Summary
    from ppl_vae.compute import Compute, LocalBudget
    cost = StepCost({"decoder": 1.0}, {"decoder": 1.0})
    summary = Summary(-90.0, 0.5, 40, 2, 6, 1.0, 2.0, 3.0, None, -91.0, -92.0, "meanfield",
                      "mnist", "dynamic", {"peak_rss_mb": 10.0}, None, False)
    scores = Scores(split="test", rows=40, num_particles=5, proposal="local",
                    elbo=Estimate(-95.0, 1.0), log_px=Estimate(-90.0, 0.9), rate=3.0,
                    distortion=92.0, active_units=3, seconds=1.0, log_px_seconds=0.5)
    run = GuideRun("meanfield", 1, "meanfield/seed1", scores, summary,
                   Compute(cost, 6, 2, 2.0), "diagonal normal", True,
                   LocalBudget(20, -100.0, -95.0, 5.0, 0.3, 30, 0.1, 2.0))
    back = GuideRun.from_record(json.loads(json.dumps(run.to_record())), cost)
    assert back.to_json() == run.to_json() and back.numbers() == run.numbers()


def test_a_plan_saved_by_an_older_version_still_matches():
    """A comparison started before a setting existed (its plan lacks it) or before an epochs
    budget recorded its amount resumes under today's code with the same settings."""
    from ppl_vae.compare import _plan_differs, plan_of
    from ppl_vae.compute import Budget
    plan = plan_of(TINY, GUIDES, SEEDS, Budget().resolve(TINY), 5, 20, None)
    old = json.loads(json.dumps(plan))
    old["budget"] = {"unit": "epochs", "amount": None}
    del old["config"]["gap_rows"]  # as if the setting came later (its default then holds)
    assert _plan_differs(old, plan) == "--gap-rows (was 1000, now 20)"
    old["config"]["gap_rows"] = 20
    assert _plan_differs(old, plan) is None
    old["config"]["device"] = "cuda"  # a resume may move to another device
    assert _plan_differs(old, plan) is None


def test_a_record_without_its_settings_is_read_by_its_runs_config(tmp_path):
    """A record written before records held their settings is taken when the run folder's
    config.json is this comparison's run (a setting newer than the run at its default), and
    refused when it is another's."""
    from ppl_vae.compare import RECORD, _read_record
    from ppl_vae.compute import StepCost
    from ppl_vae.evaluate import Estimate, Scores
    from ppl_vae.results import GuideRun
    from ppl_vae.run import Summary
    from ppl_vae.compute import Compute
    cost = StepCost({"decoder": 1.0}, {"decoder": 1.0})
    summary = Summary(-90.0, 0.5, 40, 2, 6, 1.0, 2.0, 3.0, None, -91.0, -92.0, "amortized",
                      "mnist", "dynamic")
    scores = Scores(split="test", rows=40, num_particles=5, proposal="guide",
                    elbo=Estimate(-95.0, 1.0), log_px=Estimate(-90.0, 0.9), rate=3.0,
                    distortion=92.0, active_units=3, seconds=1.0, log_px_seconds=0.5)
    run = GuideRun("amortized", 0, "amortized/seed0", scores, summary,
                   Compute(cost, 6, 2, 2.0), "diagonal normal", False, None)
    mine = TINY.replace(guide="amortized", seed=0)
    saved = mine.to_dict()
    del saved["local_family"]  # the run predates the setting
    (tmp_path / "config.json").write_text(json.dumps({"config": saved}))
    (tmp_path / RECORD).write_text(json.dumps(run.to_record()))  # no "config" in it
    assert _read_record(tmp_path, mine, cost).to_json() == run.to_json()
    assert _read_record(tmp_path, mine.replace(epochs=3), cost) is None  # another's run


def test_compare_bounds_k_as_train_and_evaluate_do(tmp_path, capsys):
    """--num-particles-eval 10,000,000 is refused in one line before anything is written
    (it skipped the 10^6 bound that train and evaluate enforce)."""
    code = cli.main(["compare", "--num-particles-eval", "10000000", "--out",
                     str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "beyond 1,000,000" in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()
