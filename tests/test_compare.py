"""ppl_vae.compare: guides compared on one decoder, data and budget; over seeds (a seed
changes the numbers, the same seed gives them again, intervals on matched seeds); --resume
of a comparison cut short at any moment; its records and plan; what the command refuses."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import pytest

from ppl_vae import cli, compare as compare_mod, data, heldout
from ppl_vae.compare import PLAN, RECORD, compare, parse_seeds
from ppl_vae.compute import Budget
from ppl_vae.errors import UserError
from ppl_vae.results import Comparison

import records
from conftest import TOY
from helpers import PNG_MAGIC, without_timings
from records import quiet, without_times


@pytest.mark.parametrize("guides", [
    ("amortized",),  # the test-time fit of q* per guide dominates: ~25 s per guide here
    pytest.param(("amortized", "semiamortized", "meanfield"), marks=pytest.mark.slow)])
def test_same_config_compare_twice_same_results(tmp_path, cached_mnist, guides):
    from ppl_vae.compare import compare

    config = TOY.replace(epochs=2)
    docs = []
    for name in ("one", "two"):
        compare(config, tmp_path / name, num_particles=10, progress=False, log=quiet,
                guides=guides)
        docs.append(json.loads((tmp_path / name / "results.json").read_text()))
    assert docs[0]["config"]["max_seconds"] is None  # an epoch budget, not a time budget
    assert without_timings(docs[0]) == without_timings(docs[1])
    assert docs[0]["amortized"]["test_log_px"] == docs[1]["amortized"]["test_log_px"]


RESUME_TOY = TOY.replace(train_size=300, test_size=40, epochs=2, batch_size=100, seed=0,
                         compile="off", track_gaps=True, gap_epochs=(1, 2), gap_rows=20,
                         gap_particles=10)
GUIDES = ("amortized", "meanfield")
SEEDS = (0, 1)
QUICK_FIT = {"max_steps": 30}


def run(out, **kw):
    kw = {"guides": GUIDES, "seeds": SEEDS, **kw}
    return compare(RESUME_TOY, out, num_particles=5, progress=False, log=quiet,
                   local_rows=20, local_options=QUICK_FIT, **kw)


def _short_gap_fits(mp):
    """The gap curves' local fits cut from 500 steps to 20 (the toy's seconds, not hours)."""
    record = heldout.GapTracker.record

    def short(self, metrics):
        self.local_options = {**self.local_options, "max_steps": 20}
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
MOMENTS = [("evaluate_trained", 2), ("local_budget", 2), ("write_record", 3),
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
        compare(RESUME_TOY.replace(epochs=3), out, num_particles=5, progress=False, log=quiet,
                guides=GUIDES, seeds=SEEDS, local_rows=20, local_options=QUICK_FIT,
                resume=True)
    with pytest.raises(UserError, match=r"changes --num-particles-eval \(was 5, now 6\)"):
        compare(RESUME_TOY, out, num_particles=6, progress=False, log=quiet, guides=GUIDES,
                seeds=SEEDS, local_rows=20, local_options=QUICK_FIT, resume=True)
    with pytest.raises(UserError, match="choose one"):
        run(out, resume=True, overwrite=True)
    run(out, resume=True)
    with pytest.raises(UserError, match="finished comparison: nothing to resume"):
        run(out, resume=True)


def test_a_resume_adds_guides_to_a_finished_comparison(tmp_path, mnist, monkeypatch,
                                                       baseline):
    """A finished comparison of one guide, resumed with two: the first guide's runs are kept
    (not trained again), the second's run, and results.json is the comparison of both asked
    at first. Dropping a guide is refused, and the extended comparison is finished."""
    monkeypatch.setattr(data, "load", lambda *a, **k: mnist)
    out = tmp_path / "c"
    run(out, guides=GUIDES[:1])
    first = {p.parent.name: p.read_text() for p in out.rglob(RECORD)}
    assert json.loads((out / "results.json").read_text())["guides"] == list(GUIDES[:1])
    trained = []
    real = compare_mod.fit_run
    monkeypatch.setattr(compare_mod, "fit_run",
                        lambda config, *a, **k: trained.append(config.guide) or
                        real(config, *a, **k))
    with monkeypatch.context() as mp:  # a kill in the extension keeps the old results
        _interrupt_at(mp, "evaluate_trained", 1)
        with pytest.raises(KeyboardInterrupt):
            run(out, resume=True)
    assert json.loads((out / "results.json").read_text())["guides"] == list(GUIDES[:1])
    with pytest.raises(UserError, match="unfinished comparison; pass resume"):
        run(out)  # the extension cut short is not called finished
    with pytest.raises(UserError, match=r"a resume may add guides, not drop them"):
        run(out, resume=True, guides=GUIDES[:1])  # the extension's plan is the one to finish
    extended = run(out, resume=True)
    assert set(trained) == {GUIDES[1]}  # the first guide's runs were read, not trained
    assert {p.parent.name: p.read_text() for p in out.rglob(RECORD)
            if p.parent.parent.name == GUIDES[0]} == first
    assert without_times(extended) == without_times(baseline)
    with pytest.raises(UserError, match="finished comparison: nothing to resume"):
        run(out, resume=True)


@pytest.mark.slow
def test_a_resume_adds_seeds_to_a_comparison_of_several(tmp_path, mnist, monkeypatch):
    """Seeds 0 and 1 of a finished comparison, resumed with 0, 1 and 2: the results are those
    of the three seeds asked at first; a one-seed comparison takes no seed added (its runs
    sit in out/<guide>)."""
    monkeypatch.setattr(data, "load", lambda *a, **k: mnist)
    whole = run(tmp_path / "whole", guides=GUIDES[:1], seeds=(0, 1, 2))
    out = tmp_path / "c"
    run(out, guides=GUIDES[:1], seeds=(0, 1))
    extended = run(out, guides=GUIDES[:1], seeds=(0, 1, 2), resume=True)
    assert extended["seeds"] == [0, 1, 2]
    assert without_times(extended) == without_times(whole)
    one = tmp_path / "one"
    run(one, guides=GUIDES[:1], seeds=(0,))
    with pytest.raises(UserError, match=r"changes --seeds \(was \[0\], now \[0, 1\]\)"):
        run(one, guides=GUIDES[:1], seeds=(0, 1), resume=True)


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
    shorter = RESUME_TOY.replace(epochs=1, gap_epochs=(1,))
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


def test_cli_passes_resume_and_quick_to_compare(tmp_path, monkeypatch, capsys):
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
    # --quick sizes only what nothing else sets: a flag, or the --config file, wins
    (tmp_path / "c.toml").write_text("test_size = 300\n")
    assert cli.main(["compare", "--quick", "--epochs", "5", "--num-particles-eval", "500",
                     "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "c")]) == 0
    c = seen["config"]
    assert (c.epochs, c.test_size, c.train_size, seen["num_particles"]) == (5, 300, 10_000, 500)
    # a record sets every size: --quick would change nothing yet call the run a smoke look
    (tmp_path / "r.json").write_text(json.dumps({"config": c.to_dict(), "guides": ["iaf"]}))
    assert cli.main(["compare", "--quick", "--config", str(tmp_path / "r.json"), "--out",
                     str(tmp_path / "c")]) == 2
    assert "the command line or --config sets all of them; drop --quick" in \
        capsys.readouterr().err


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
    doc = compare(RESUME_TOY.replace(track_gaps=False, epochs=1), tmp_path / "c", num_particles=5,
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


def test_compare_bounds_k_as_train_and_evaluate_do(tmp_path, capsys):
    """--num-particles-eval 10,000,000 is refused in one line before anything is written
    (it skipped the 10^6 bound that train and evaluate enforce)."""
    code = cli.main(["compare", "--num-particles-eval", "10000000", "--out",
                     str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "beyond 1,000,000" in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()


SEEDS_TOY = TOY.replace(train_size=300, test_size=40, batch_size=100, seed=0)


def without_times_or_folder(doc):
    return records.without_times(doc, also=("folder",))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist):
    """Two comparisons on the shipped MNIST: seeds 0 and 1, then seed 1 alone (amortized)."""
    out = tmp_path_factory.mktemp("seeds")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "load", lambda *a, **k: mnist)
        both = compare(SEEDS_TOY, out / "both", num_particles=5, progress=False, log=quiet,
                       guides=GUIDES, seeds=(0, 1), local_rows=20, local_options=QUICK_FIT)
        one = compare(SEEDS_TOY, out / "one", num_particles=5, progress=False, log=quiet,
                      guides=GUIDES[:1], seeds=parse_seeds("1,"), local_rows=20,
                      local_options=QUICK_FIT)
    return out, both, one


def test_parse_seeds():
    assert parse_seeds("3", 5) == (5, 6, 7) and parse_seeds("1") == (0,)
    assert parse_seeds("0,1,2", 9) == (0, 1, 2) and parse_seeds("4,") == (4,)


@pytest.mark.parametrize("text", ["0", "-2", "x", "1,1", "0,-1", "101", ",", "4294967296,"])
def test_bad_seeds_are_one_line(text, tmp_path, capsys, cached_mnist):
    with pytest.raises(UserError, match="seeds"):
        parse_seeds(text)
    code = cli.main(["compare", "--seeds", text, "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --seeds") and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_a_seed_changes_the_numbers(runs):
    out, both, _ = runs
    saved = json.loads((out / "both" / "results.json").read_text())
    assert saved["seeds"] == [0, 1] and saved == json.loads(json.dumps(both))
    for guide in GUIDES:
        per_seed = saved[guide]["per_seed"]
        assert per_seed["0"]["test_log_px"] != per_seed["1"]["test_log_px"], guide
        for seed in (0, 1):  # each seed has its own run folder
            assert (out / "both" / guide / f"seed{seed}" / "summary.json").is_file()
            assert per_seed[str(seed)]["folder"] == f"{guide}/seed{seed}"
        # the top-level number is the mean over seeds, with the sd and values beside it
        values = [per_seed[s]["test_log_px"] for s in ("0", "1")]
        spread = saved[guide]["over_seeds"]["test_log_px"]
        assert spread["values"] == values and spread["seeds"] == [0, 1]
        assert saved[guide]["test_log_px"] == pytest.approx(statistics.mean(values))
        assert spread["sd"] == pytest.approx(statistics.stdev(values))


def test_the_same_seed_gives_the_same_numbers_again(runs):
    """Seed 1 alone (the list form, one seed) gives seed 1's numbers of the two-seed
    comparison: a run depends on its seed only, not on the others; and one seed is written in
    the layout of many (a mean over one seed, its spread, its per-seed record)."""
    out, both, one = runs
    assert one["seeds"] == [1]
    guide = GUIDES[0]
    assert (out / "one" / guide / "summary.json").is_file()  # out/<guide>, as before seeds
    assert not (out / "one" / guide / "seed1").exists()
    assert set(one[guide]) == set(both[guide])  # one layout for one seed and for many
    mine, theirs = one[guide]["per_seed"]["1"], both[guide]["per_seed"]["1"]
    assert without_times_or_folder(mine) == without_times_or_folder({**theirs, "folder": guide})
    assert one[guide]["test_log_px"] == theirs["test_log_px"] == mine["test_log_px"]
    assert "test_log_px_stderr" not in one[guide]  # a seed's error is in its own record
    assert one[guide]["over_seeds"]["test_log_px"]["sd"] is None
    assert one["ran"] == {guide: {"1": {"epochs": 1, "steps": 3}}}


def test_standard_errors_over_seeds_are_not_averaged(runs):
    """Every seed scores the same test rows, so their standard errors are correlated: the
    mean over seeds carries none (the sd over seeds is its spread); each seed's own error
    stays in its record; and each guide's epochs and steps are recorded as they ran."""
    _, both, _ = runs
    for guide in GUIDES:
        assert not [k for k in both[guide] if k.endswith("_stderr")]
        assert both[guide]["per_seed"]["0"]["test_log_px_stderr"] > 0
        assert both[guide]["over_seeds"]["test_log_px"]["sd"] is not None
        assert both["ran"][guide] == {"0": {"epochs": 1, "steps": 3},
                                      "1": {"epochs": 1, "steps": 3}}


def test_the_paired_interval_is_on_matched_seeds(runs):
    out, both, _ = runs
    saved = json.loads((out / "both" / "results.json").read_text())
    (d,) = [d for d in saved["differences"] if d["quantity"] == "test_log_px"]
    assert (d["a"], d["b"], d["seeds"]) == ("amortized", "meanfield", [0, 1])
    a = [saved["amortized"]["per_seed"][s]["test_log_px"] for s in ("0", "1")]
    m = [saved["meanfield"]["per_seed"][s]["test_log_px"] for s in ("0", "1")]
    diffs = [x - y for x, y in zip(a, m)]
    assert d["values"] == pytest.approx(diffs)
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = 12.7062 * sd / math.sqrt(2)
    assert (d["mean"], d["sd"]) == (pytest.approx(mean), pytest.approx(sd))
    assert (d["low"], d["high"]) == (pytest.approx(mean - half, abs=1e-3),
                                     pytest.approx(mean + half, abs=1e-3))
    assert d["excludes_zero"] == (not d["low"] <= 0 <= d["high"])
    assert d["settled"] is None  # two seeds judge nothing


def test_the_report_gives_spread_compute_differences_and_local_budget(runs):
    out, both, one = runs
    report = (out / "both" / "report.md").read_text()
    assert "mean ± the standard deviation over the 2 seeds" in report
    assert "## Paired differences between guides over 2 seeds" in report
    assert "Settled" in report and "Not settled" in report
    assert "| log p(x) | amortized − meanfield |" in report
    assert "network passes per optimizer step" in report
    assert re.search(r"amortized: 4 per step \(decoder 1 forward \+ 1 backward, encoder 1 "
                     r"forward \+ 1 backward\), [\d,]+ FLOPs; meanfield: 4 per step \(decoder "
                     r"2 forward \+ 2 backward\), [\d,]+ FLOPs", " ".join(report.split()))
    assert "The meanfield guide's local budget" in report
    for guide in GUIDES:  # compute beside epochs, steps and wall time in results.json
        compute = both[guide]["per_seed"]["0"]["compute"]
        assert compute["steps"] == 3 and compute["epochs"] == 1 and compute["train_seconds"] > 0
        assert compute["total_passes"] == 3 * compute["per_step"]["passes"]
    local = both["meanfield"]["per_seed"]["0"]["local_budget"]
    assert local["rows"] == 20 and local["fitted"] > local["stored"]
    assert both["amortized"]["per_seed"]["0"]["local_budget"] is None
    single = (out / "one" / "report.md").read_text()  # one seed: errors over test rows
    assert "one standard error over test images" in single and "Paired" not in single
    assert "network passes per optimizer step" in single and "local budget" not in single


def test_local_rows_must_be_positive(tmp_path, capsys, cached_mnist):
    code = cli.main(["compare", "--local-rows", "0", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "--local-rows" in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_a_module_class_guide_gets_a_folder_without_a_colon(tmp_path):
    from ppl_vae.compare import folder_name, run_folder
    assert run_folder(tmp_path, "mymod.sub:A", 0, False) == tmp_path / "mymod_sub_A"
    assert run_folder(tmp_path, "mymod:A", 3, True) == tmp_path / "mymod_A" / "seed3"
    assert folder_name("meanfield") == "meanfield"
    comp = Comparison("d", {}, {}, "cpu", ["mymod:A"], {}, [], [0], Budget(), 10)
    comp.runs = [records.guide_run("mymod:A", 0, -90.0)]
    assert "mymod:A" in comp.to_json()  # results.json keeps the guide's own name


def test_guides_sharing_a_folder_are_refused(tmp_path, capsys):
    code = cli.main(["compare", "--guides", "m:A_b,m:A.b", "--out", str(tmp_path / "c")])
    assert code == 2 and "share a run folder" in capsys.readouterr().err


def test_compare_refuses_guide_and_points_to_guides(tmp_path, capsys):
    for guide in ("meanfield", "amortized"):  # the default too, when given
        code = cli.main(["compare", "--guide", guide, "--out", str(tmp_path / "c")])
        err = capsys.readouterr().err
        assert code == 2 and f"--guides {guide}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_compare_tiny(tmp_path, cached_mnist, toy_config):
    config = toy_config.replace(train_size=300, valid_size=50, test_size=40, batch_size=100,
                                seed=0)
    doc = compare(config, tmp_path, num_particles=20, progress=False, log=lambda _m: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    for guide in ("amortized", "meanfield"):
        r = saved[guide]
        for key in ("test_elbo", "test_elbo_local", "test_log_px", "approximation_gap",
                    "amortization_gap", "train_seconds"):
            assert key in r, (guide, key)
        assert r["test_log_px"] < 0 and r["train_seconds"] > 0 and r["num_rows"] == 40
        # the gaps are the paired differences of the reported means
        assert r["approximation_gap"] == pytest.approx(r["test_log_px"] - r["test_elbo_local"],
                                                       abs=1e-4)
        assert (tmp_path / guide / "summary.json").is_file()
    a, m = saved["amortized"], saved["meanfield"]
    assert m["amortization_gap"] is None
    assert a["amortization_gap"] == pytest.approx(a["test_elbo_local"] - a["test_elbo"], abs=1e-4)
    # a per-datapoint model is scored with its fitted q*: its own ELBO is L[q*]
    assert m["test_elbo"] == pytest.approx(m["test_elbo_local"], abs=1e-4)
    assert saved["config"]["train_size"] == 300 and doc["amortized"] == saved["amortized"]
    report = (tmp_path / "report.md").read_text()
    assert "amortization gap" in report and "approximation gap" in report and "n/a" in report
    for name in ("curves.png", "gap_bars.png", "reconstructions.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
    assert not (tmp_path / "gaps.png").exists()  # a run's gap curves go by that name
    with pytest.raises(UserError, match="--overwrite"):
        compare(config, tmp_path, num_particles=20, progress=False, log=lambda _m: None)
