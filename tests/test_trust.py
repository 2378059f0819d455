"""Issue 11: can a user trust what a run records, and are runs safe from mistakes?

Every option of ``train`` changes what the run does; the same seed gives the same numbers;
a crafted checkpoint cannot run code; mistakes (overwrite, resume, foreign folders) lose
no run; bad input is one line and exit code 2, never a traceback; a checkpoint written on
a GPU resumes on a CPU.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil

import pytest
import numpy as np
import torch

from ppl_vae import checkpoint, cli, data, run, run_setup, train
from ppl_vae.config import Config
from ppl_vae.errors import UserError

from conftest import TOY
from helpers import (FIGURES, TINY, assert_one_error_line, assert_same_tensors, call, config_json,
                     error_segments, files, final_state, metrics, numbers, summary, train_cli,
                     trained_copy)
from records import quiet


# ---------------------------------------------------------------------------------------
# 1. --beta, and every option of `train` changes what the run does
# ---------------------------------------------------------------------------------------
def test_beta_changes_the_objective_and_is_recorded(tmp_path, cached_mnist, capsys):
    one, half = tmp_path / "beta1", tmp_path / "beta05"
    assert train_cli(capsys, one, "--beta", "1")[0] == 0
    assert train_cli(capsys, half, "--beta", "0.5")[0] == 0
    assert [m["beta"] for m in metrics(half)] == [0.5]
    assert [m["beta"] for m in metrics(one)] == [1.0]
    assert config_json(half)["config"]["beta"] == 0.5
    # a smaller KL weight gives a larger (less negative) objective, not the same one
    assert metrics(half)[0]["train_elbo"] > metrics(one)[0]["train_elbo"]


def test_warmup_ramps_beta_toward_its_target(tmp_path, cached_mnist, capsys):
    out = tmp_path / "warm"
    assert train_cli(capsys, out, "--warmup-epochs", "2", "--beta", "0.2", "--epochs", "3")[0] == 0
    recorded = [m["beta"] for m in metrics(out)]
    steps = 2  # per epoch: 100 rows in batches of 50; each epoch records its last step's beta
    expected = [train.beta_at(e, steps - 1, steps, 2, 0.2) for e in range(3)]
    assert expected == pytest.approx([0.05, 0.15, 0.2])
    assert recorded == pytest.approx(expected)
    assert config_json(out)["config"]["warmup_epochs"] == 2


class NaNSometimes:
    """Wraps the run's objective: the 2nd call returns a NaN loss (a divergence)."""

    def __init__(self, objective):
        self.objective, self.calls = objective, 0

    @property
    def beta(self):
        return self.objective.beta

    def __call__(self, model, guide, batch, **kwargs):
        self.calls += 1
        loss = self.objective(model, guide, batch, **kwargs)
        return loss * float("nan") if self.calls == 2 else loss


def _params(folder):
    state = checkpoint.load(folder)
    return {k: v for part in ("model", "guide") for k, v in state[part].items()}


def _differs(base, alt):
    assert numbers(alt) != numbers(base)


def _same_data_other_folder(base, alt, tmp_path, capsys):
    # the same MNIST read from the given folder: the same numbers
    assert numbers(alt) == numbers(base)
    code, _, err = train_cli(capsys, tmp_path / "empty-data", "--data-dir", tmp_path / "nothing")
    assert_one_error_line(code, err)
    assert "nothing" in err  # the folder given is the folder read


def _shapes(base, alt, key, shape):
    assert _params(alt)[key].shape == shape and _params(base)[key].shape != shape


def _latent(base, alt):
    dec = [v for k, v in _params(alt).items() if k.startswith("decoder") and v.dim() == 2][0]
    dec_base = [v for k, v in _params(base).items() if k.startswith("decoder") and v.dim() == 2][0]
    assert dec.shape[1] == 4 and dec_base.shape[1] == 3
    _differs(base, alt)


def _hidden(base, alt):
    dec = [v.shape for k, v in _params(alt).items() if k.startswith("decoder") and v.dim() == 2]
    dec_base = [v.shape for k, v in _params(base).items()
                if k.startswith("decoder") and v.dim() == 2]
    assert dec[0][0] == 8 and dec_base[0][0] == 16
    _differs(base, alt)


def _prior(base, alt):
    assert set(_params(alt)) - set(_params(base))  # the mixture's parameters
    _differs(base, alt)


def _guide(base, alt):
    assert set(checkpoint.load(alt)["guide"]) - set(checkpoint.load(base)["guide"])  # flows
    assert summary(alt)["guide"] == "iaf" and summary(base)["guide"] == "amortized"
    _differs(base, alt)


def _epochs(base, alt):
    assert [m["epoch"] for m in metrics(alt)] == [1, 2] and len(metrics(base)) == 1
    assert numbers(alt)[0] == numbers(base)[0]  # the first epoch is the same epoch


def _steps(n):
    def check(base, alt):
        assert metrics(alt)[-1]["steps"] == n and metrics(base)[-1]["steps"] == 2
        assert summary(alt)["steps"] == n
    return check


def _lr_schedule(base, alt):
    assert numbers(alt)[0] == numbers(base)[0]  # epoch 1 runs at lr * 1
    assert numbers(alt)[1] != numbers(base)[1]  # epoch 2 at lr * 10^(-1/7)


def _max_steps(base, alt):
    assert metrics(base)[-1]["steps"] == 4 and metrics(alt)[-1]["steps"] == 3  # 2 per epoch


def _max_seconds(base, alt):
    assert len(metrics(base)) == 2 and len(metrics(alt)) == 1  # stopped after one epoch


def _valid_size(base, alt):
    assert metrics(alt)[0]["train_elbo"] == metrics(base)[0]["train_elbo"]
    assert metrics(alt)[0]["valid_elbo"] != metrics(base)[0]["valid_elbo"]


def _test_size(base, alt):
    assert summary(alt)["test_rows"] == 10 and summary(base)["test_rows"] == 20
    assert numbers(alt) == numbers(base)


def _on_divergence(base, alt):
    assert base.code == 1 and alt.code == 0  # stop: exit 1; lower_lr: halve and go on
    assert "halved" in alt.out and metrics(alt)[-1]["steps"] == 3  # 4 batches, 1 skipped


def _compile(base, alt):
    for a, b in zip(numbers(alt), numbers(base)):
        assert a[0] == pytest.approx(b[0], rel=1e-4) and a[1] == pytest.approx(b[1], rel=1e-4)


def _gaps_written(base, alt):
    assert not (base / "gaps.jsonl").exists()
    lines = [json.loads(x) for x in (alt / "gaps.jsonl").read_text().splitlines()]
    assert [(g["epoch"], g["split"]) for g in lines] == [(1, "train"), (1, "test")]
    assert summary(alt)["gap_tracking_seconds"] > 0


def _gaps(key, value):
    def check(base, alt):
        a = [json.loads(x) for x in (alt / "gaps.jsonl").read_text().splitlines()]
        b = [json.loads(x) for x in (base / "gaps.jsonl").read_text().splitlines()]
        assert {g[key] for g in a} == {value} and {g[key] for g in b} != {value}
    return check


def _gap_epochs(base, alt):
    a = [json.loads(x)["epoch"] for x in (alt / "gaps.jsonl").read_text().splitlines()]
    b = [json.loads(x)["epoch"] for x in (base / "gaps.jsonl").read_text().splitlines()]
    assert a == [1, 1, 2, 2] and b == [2, 2]


def _device(base, alt):
    assert config_json(alt)["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert numbers(alt) == numbers(base)


def _dataset(base, alt):
    assert summary(alt)["dataset"] == "fashion_mnist"
    _differs(base, alt)


def _data_entry(base, alt):
    """Other splits, recorded under config.json's data, and other numbers."""
    assert config_json(alt)["data"] != config_json(base)["data"]
    _differs(base, alt)


def _tensorboard(base, alt):
    assert not (base / "tensorboard").exists()
    assert list((alt / "tensorboard").glob("events.out.tfevents.*"))


MF, SEMI = ["--guide", "meanfield"], ["--guide", "semiamortized"]
IWAE = ["--objective", "iwae", "--num-particles", "2"]
GAPS = ["--track-gaps", "--gap-epochs", "1"]
# field: (base options, the alternative's options, recorded value, check(base, alt))
EFFECTS = {
    "dataset": ([], ["--dataset", "fashion_mnist"], "fashion_mnist", _dataset),
    "data_dir": ([], ["--data-dir", "@MNIST"], "@MNIST", None),
    "binarize": ([], ["--binarize", "static"], "static", _differs),
    "latent_dim": ([], ["--latent-dim", "4"], 4, _latent),
    "hidden": ([], ["--hidden", "8"], [8], _hidden),
    "activation": ([], ["--activation", "tanh"], "tanh", _differs),
    "likelihood": ([], ["--likelihood", "continuous_bernoulli"], "continuous_bernoulli",
                   _differs),
    "prior": ([], ["--prior", "mog"], "mog", _prior),
    "guide": ([], ["--guide", "iaf"], "iaf", _guide),
    "objective": ([], ["--objective", "analytic_kl"], "analytic_kl", _differs),
    "num_particles": ([], ["--num-particles", "3"], 3, _differs),
    "dreg": (IWAE, ["--dreg"], True, _differs),
    "beta": ([], ["--beta", "0.5"], 0.5, _differs),
    "warmup_epochs": ([], ["--warmup-epochs", "1"], 1, _differs),
    "epochs": ([], ["--epochs", "2"], 2, _epochs),
    "batch_size": ([], ["--batch-size", "25"], 25, _steps(4)),
    "lr": ([], ["--lr", "0.01"], 0.01, _differs),
    "adam_eps": ([], ["--adam-eps", "0.1"], 0.1, _differs),
    "lr_schedule": (["--epochs", "2"], ["--lr-schedule", "burda"], "burda", _lr_schedule),
    "local_lr": (MF, ["--local-lr", "0.05"], 0.05, _differs),
    "inner_steps": (MF, ["--inner-steps", "0"], 0, _differs),
    "local_init": (MF, ["--local-init", "prior"], "prior", _differs),
    "refine_steps": (SEMI, ["--refine-steps", "1"], 1, _differs),
    "refine_lr": (SEMI, ["--refine-lr", "0.2"], 0.2, _differs),
    "refine_stop_gradient": (SEMI, ["--refine-stop-gradient"], True, _differs),  # see below
    "max_seconds": (["--epochs", "2"], ["--max-seconds", "1e-9"], 1e-9, _max_seconds),
    "max_steps": (["--epochs", "2"], ["--max-steps", "3"], 3, _max_steps),
    "train_size": ([], ["--train-size", "150"], 150, _steps(3)),
    "valid_size": ([], ["--valid-size", "10"], 10, _valid_size),
    "test_size": ([], ["--test-size", "10"], 10, _test_size),
    "on_divergence": (["--epochs", "2", "NAN"], ["--on-divergence", "lower_lr"], "lower_lr",
                      _on_divergence),
    "compile": ([], ["--compile", "on"], "on", _compile),
    "track_gaps": ([], GAPS, True, _gaps_written),
    "gap_epochs": (GAPS[:1] + ["--epochs", "2", "--gap-epochs", "3"], ["--gap-epochs", "1"],
                   [1], _gap_epochs),
    "gap_rows": (GAPS, ["--gap-rows", "7"], 7, _gaps("num_rows", 7)),
    "gap_particles": (GAPS, ["--gap-particles", "3"], 3, _gaps("num_particles", 3)),
    "local_family": (GAPS, ["--local-family", "full"], "full", _gaps("local_family", "full")),
    "seed": ([], ["--seed", "4"], 4, _differs),
    "device": ([], ["--device", "auto"], "auto", _device),
    "valid_fraction": ([], ["--valid-fraction", "0.5"], 0.5, _data_entry),
    "test_fraction": (["@NPZ"], ["--test-fraction", "0.3"], 0.3, _data_entry),
    "net": ([], ["--net", "conv"], "conv", _differs),
    "tensorboard": ([], ["--tensorboard"], True, _tensorboard),
}
# compile: a torch.compile; the per-datapoint guide: a test-time fit of q* (~10 s a run here)
# and the gap curves: a 500-step local fit per split and gap epoch
SLOW_EFFECTS = {"compile", "local_lr", "inner_steps", "local_init", "gap_epochs", "gap_rows",
                "gap_particles", "local_family"}
_BASES = {}  # base options -> the run, shared by the cases that start from the same base


class Ran(type(pathlib.Path())):
    """A run folder with the exit code and output of the command that wrote it."""


def _run(tmp_path, capsys, monkeypatch, name, options):
    options = list(options)
    if "NAN" in options:
        options.remove("NAN")
        build = run_setup.build_objective
        monkeypatch.setattr(run_setup, "build_objective", lambda c: NaNSometimes(build(c)))
    out = Ran(tmp_path / name)
    out.code, out.out, out.err = train_cli(capsys, out, *options)
    assert "Traceback" not in out.err
    return out


@pytest.mark.parametrize("name", [
    pytest.param(f.name, marks=pytest.mark.slow) if f.name in SLOW_EFFECTS else
    pytest.param(f.name, marks=pytest.mark.filterwarnings(
        "ignore:.*was not registered in the param store:UserWarning"))  # a known pyro warning
    if f.name == "refine_stop_gradient" else f.name
    for f in dataclasses.fields(Config)])
def test_every_train_option_changes_what_the_run_does(name, tmp_path, tmp_path_factory,
                                                      cached_mnist, capsys, monkeypatch):
    assert name in EFFECTS, f"add an entry for the new setting {name} to EFFECTS"
    base_options, alt_options, recorded, check = EFFECTS[name]
    if name == "dataset":  # not shipped: stands in for a download, with other images
        inverted = data.Splits(*(data.Split(1 - s.x, s.y, s.shape, s.classes)
                                 for s in (cached_mnist.train, cached_mnist.valid,
                                           cached_mnist.test)))
        mnist_load = data.load
        monkeypatch.setattr(data, "load", lambda name="mnist", *rest: (
            inverted if name == "fashion_mnist" else mnist_load(name, *rest)))
    if name == "data_dir":
        shutil.copytree(data.PACKAGE_DATA / "MNIST" / "raw", tmp_path / "mnist")
        alt_options = ["--data-dir", tmp_path / "mnist"]
        recorded = str(tmp_path / "mnist")
        check = lambda b, a: _same_data_other_folder(b, a, tmp_path, capsys)  # noqa: E731
    if "@NPZ" in base_options:  # data without a test split of its own: 400 MNIST images
        path = tmp_path_factory.getbasetemp() / "images.npz"
        if not path.exists():
            np.savez(path, x=(cached_mnist.train.x[:400].reshape(-1, 28, 28).numpy() * 255
                              ).astype(np.uint8))
        base_options = [str(path) if o == "@NPZ" else o for o in base_options]
        base_options = ["--dataset"] + base_options
    key = tuple(map(str, base_options))
    if key not in _BASES:
        _BASES[key] = _run(tmp_path_factory.mktemp("base"), capsys, monkeypatch, "base",
                           base_options)
    base = _BASES[key]
    alt = _run(tmp_path, capsys, monkeypatch, "alt", base_options + alt_options)
    assert alt.code == 0, alt.err
    assert config_json(alt)["config"][name] == recorded
    assert config_json(base)["config"][name] != recorded
    check(base, alt)


# ---------------------------------------------------------------------------------------
# 2. same seed, same numbers
# ---------------------------------------------------------------------------------------
def _without_times(doc):
    if isinstance(doc, dict):
        return {k: _without_times(v) for k, v in doc.items()
                if not any(t in k for t in ("seconds", "per_second", "peak_rss", "date",
                                            "wall"))}
    if isinstance(doc, list):
        return [_without_times(v) for v in doc]
    return doc


def test_same_seed_two_runs_same_numbers(tmp_path, cached_mnist, capsys):
    for name in ("a", "b"):
        assert train_cli(capsys, tmp_path / name, "--epochs", "2")[0] == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert numbers(a) == numbers(b)
    assert _without_times(summary(a)) == _without_times(summary(b))
    for key, tensor in _params(a).items():
        assert torch.equal(tensor, _params(b)[key]), key


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
    assert _without_times(docs[0]) == _without_times(docs[1])
    assert docs[0]["amortized"]["test_log_px"] == docs[1]["amortized"]["test_log_px"]


# ---------------------------------------------------------------------------------------
# 3. a crafted checkpoint cannot run code
# ---------------------------------------------------------------------------------------
class Evil:
    marker = None

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_a_malicious_checkpoint_does_not_run_code(finished_run, tmp_path, capsys, command):
    marker = tmp_path / "pwned"
    Evil.marker = marker
    state = checkpoint.load(finished_run)
    state["evil"] = Evil()
    (finished_run / checkpoint.PREVIOUS).unlink()
    torch.save(state, finished_run / checkpoint.NAME, _use_new_zipfile_serialization=True)
    # the file really would run the command if loaded without weights_only
    probe = tmp_path / "probe"
    Evil.marker = probe
    torch.save({"evil": Evil()}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()
    if command == "evaluate":
        code, out, err = call(capsys, "evaluate", finished_run, "--num-particles-eval", "2")
    else:
        code, out, err = train_cli(capsys, finished_run, "--epochs", "3", "--resume")
    assert_one_error_line(code, err, out)
    assert "not loaded" in err
    assert not marker.exists()
    assert not (finished_run / "eval.json").exists()


# ---------------------------------------------------------------------------------------
# 4. runs are not lost to mistakes
# ---------------------------------------------------------------------------------------
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


def test_a_resume_keeps_the_gap_curves(tmp_path, cached_mnist, capsys):
    """The gap rows of the epochs before a resume stay (a resume once deleted gaps.jsonl)."""
    out = tmp_path / "gaps"
    assert train_cli(capsys, out, *GAPS, "--epochs", "1")[0] == 0
    before = (out / "gaps.jsonl").read_text()
    assert before
    assert train_cli(capsys, out, "--track-gaps", "--gap-epochs", "1", "2", "--epochs", "2",
                     "--resume")[0] == 0
    after = (out / "gaps.jsonl").read_text()
    assert after.startswith(before)
    assert {json.loads(line)["epoch"] for line in after.splitlines()} == {1, 2}


def test_resume_mistakes_are_refused_and_delete_nothing(evaluated_run, capsys):
    before = files(evaluated_run)
    assert {"eval.json", *FIGURES} <= set(before)
    for extra in (["--resume", "--overwrite", "--epochs", "4"],
                  ["--resume", "--epochs", "1"],
                  ["--resume", "--epochs", "3"],
                  ["--resume", "--epochs", "4", "--beta", "0.5"],
                  ["--resume", "--epochs", "4", "--latent-dim", "4"]):
        code, out, err = train_cli(capsys, evaluated_run, *extra)
        assert_one_error_line(code, err, out)
        assert files(evaluated_run) == before, extra
    code, out, err = train_cli(capsys, evaluated_run, "--resume", "--epochs", "4", "--beta", "0.5")
    assert "beta" in err


def test_resume_records_what_it_changed(evaluated_run, capsys):
    old = config_json(evaluated_run)
    assert train_cli(capsys, evaluated_run, "--resume", "--epochs", "4", "--lr", "0.002")[0] == 0
    doc = config_json(evaluated_run)
    assert doc["config"]["epochs"] == 4 and doc["config"]["lr"] == 0.002
    assert doc["resumes"] == [{"after_epoch": 3, "changed": {"epochs": [3, 4],
                                                             "lr": [0.001, 0.002]}}]
    assert old["config"]["epochs"] == 3
    assert [m["epoch"] for m in metrics(evaluated_run)] == [1, 2, 3, 4]
    assert not (evaluated_run / "eval.json").exists()  # no longer the run's evaluation
    assert summary(evaluated_run)["epochs"] == 4
    # a second resume appends to the record
    assert train_cli(capsys, evaluated_run, "--resume", "--epochs", "5")[0] == 0
    resumes = config_json(evaluated_run)["resumes"]
    # the run's own settings carry over: --lr 0.002 stays without being given again
    assert len(resumes) == 2 and resumes[1] == {"after_epoch": 4,
                                                "changed": {"epochs": [4, 5]}}
    assert config_json(evaluated_run)["config"]["lr"] == 0.002


@pytest.mark.slow
def test_resume_with_compile_is_accepted_and_recorded(finished_run, capsys):
    assert train_cli(capsys, finished_run, "--resume", "--epochs", "3", "--compile", "on")[0] == 0
    doc = config_json(finished_run)
    assert doc["config"]["compile"] == "on"
    assert doc["resumes"][0]["changed"] == {"epochs": [2, 3], "compile": ["auto", "on"]}


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


def test_evaluate_refuses_a_finished_run_whose_newest_checkpoint_is_corrupt(finished_run,
                                                                            capsys):
    blob = (finished_run / checkpoint.NAME).read_bytes()
    (finished_run / checkpoint.NAME).write_bytes(blob[: len(blob) // 2])
    assert (finished_run / checkpoint.PREVIOUS).exists()  # epoch 1 would be readable
    code, out, err = call(capsys, "evaluate", finished_run, "--num-particles-eval", "2")
    assert_one_error_line(code, err, out)
    assert "corrupt" in err
    assert not (finished_run / "eval.json").exists()


# ---------------------------------------------------------------------------------------
# 5. tracebacks become one line and exit code 2
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,flag", [
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "1e6"], "--lr"),
    (["--latent-dim", "100000000"], "--latent-dim"), (["--hidden", "1000000000"], "--hidden"),
    (["--beta", "-1"], "--beta"), (["--beta", "inf"], "--beta"),
    (["--max-seconds", "nan"], "--max-seconds"), (["--adam-eps", "-1"], "--adam-eps"),
    (["--seed", "99999999999999999999"], "--seed"), (["--seed", "4294967296"], "--seed"),
    (["--seed", "-1"], "--seed"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_numbers_are_one_line(extra, flag, tmp_path, capsys):
    code, out, err = train_cli(capsys, tmp_path / "o", *extra)
    assert_one_error_line(code, err, out)
    assert flag in err
    assert not (tmp_path / "o").exists()


def test_meanfield_with_fewer_rows_than_latent_dims_is_one_line(tmp_path, cached_mnist, capsys):
    """The PCA start needs latent_dim + 10 rows: refused up front (it was a shape traceback);
    with the N(0, I) start the same run trains."""
    out = tmp_path / "few"
    code, stdout, err = train_cli(capsys, out, "--guide", "meanfield", "--train-size", "3",
                                  "--latent-dim", "10", "--batch-size", "3")
    assert_one_error_line(code, err, stdout)
    assert "--latent-dim" in err and "--local-init" in err and not out.exists()
    code, stdout, err = train_cli(capsys, out, "--guide", "meanfield", "--train-size", "3",
                                  "--latent-dim", "10", "--batch-size", "3",
                                  "--local-init", "prior")
    assert code == 0, err
    assert math.isfinite(summary(out)["test_elbo"])
    assert checkpoint.load(out)["guide"]["params"].shape == (3, 20)


def _rewrite_checkpoint(folder, change):
    for name in (checkpoint.NAME, checkpoint.PREVIOUS):
        state = torch.load(folder / name, weights_only=True)
        change(state)
        torch.save(state, folder / name)


def _drop(key):
    return lambda s: s.pop(key)


@pytest.mark.parametrize("change", [
    lambda s: s.__setitem__("config", "not a dict"),
    lambda s: s["config"].__setitem__("colour", "blue"),
    lambda s: s["config"].__setitem__("latent_dim", "three"),
    lambda s: s["config"].__setitem__("hidden", 16),
    lambda s: s["config"].__setitem__("guide", "bogus"),
    lambda s: s["config"].__setitem__("latent_dim", 5),
    _drop("model"), _drop("history"), _drop("rng"),
    lambda s: s.__setitem__("history", [{"epoch": 1}]),
    lambda s: s["model"].popitem(),
], ids=["config-str", "unknown-key", "latent-str", "hidden-int", "unknown-guide",
        "wrong-shape", "no-model", "no-history", "no-rng", "bad-history", "missing-tensor"])
@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_a_damaged_checkpoint_is_one_line(finished_run, capsys, change, command):
    _rewrite_checkpoint(finished_run, change)
    before = files(finished_run)
    if command == "evaluate":
        code, out, err = call(capsys, "evaluate", finished_run, "--num-particles-eval", "2")
    else:
        code, out, err = train_cli(capsys, finished_run, "--resume", "--epochs", "3")
    assert_one_error_line(code, err, out)
    assert files(finished_run) == before


@pytest.mark.parametrize("damage", ["truncated", "missing", "garbage"])
def test_evaluate_does_not_need_metrics_jsonl(finished_run, capsys, damage):
    path = finished_run / "metrics.jsonl"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-30])
    elif damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"\x00\xff{not json\n")
    code, out, err = call(capsys, "evaluate", finished_run, "--num-particles-eval", "2",
                          "--rows", "10")
    assert code == 0, err
    assert (finished_run / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((finished_run / "eval.json").read_text())["epochs"] == 2


def test_resume_repairs_a_truncated_metrics_jsonl(finished_run, capsys):
    path = finished_run / "metrics.jsonl"
    old = metrics(finished_run)
    path.write_bytes(path.read_bytes()[:-30])
    assert train_cli(capsys, finished_run, "--resume", "--epochs", "3")[0] == 0
    new = metrics(finished_run)
    assert [m["epoch"] for m in new] == [1, 2, 3] and new[:2] == old


def test_evaluate_a_damaged_gaps_jsonl(tmp_path, cached_mnist, capsys):
    out = tmp_path / "gaps"
    assert train_cli(capsys, out, "--track-gaps", "--gap-epochs", "1")[0] == 0
    path = out / "gaps.jsonl"
    path.write_bytes(path.read_bytes()[:-20])
    code, stdout, err = call(capsys, "evaluate", out, "--num-particles-eval", "2", "--rows", "10")
    assert "Traceback" not in err
    assert code == 0 or (code == 2 and err.count("\n") == 1), err


def test_evaluate_a_file_says_it_is_a_file(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"x")
    code, out, err = call(capsys, "evaluate", path)
    assert_one_error_line(code, err, out)
    assert "is a file" in err


def test_evaluate_bad_summary_json(finished_run, capsys):
    (finished_run / "summary.json").write_text("{truncated")
    code, out, err = call(capsys, "evaluate", finished_run, "--num-particles-eval", "2",
                          "--rows", "10")
    assert "Traceback" not in err
    assert code == 2 and error_segments(err) and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------
# 6. a checkpoint written on a GPU resumes on a CPU
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("guide", ["amortized", pytest.param("meanfield", marks=pytest.mark.slow)])
@pytest.mark.parametrize("device", [
    "auto", "cuda"])
def test_a_gpu_checkpoint_resumes_on_the_cpu_bitwise(tmp_path, cached_mnist, guide, device):
    config = TOY.replace(guide=guide, epochs=3)
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    s3 = run.train_run(config, straight, progress=False, log=quiet)
    run.train_run(config.replace(epochs=2), moved, progress=False, log=quiet)
    # as a CUDA machine writes it: CUDA generator states and a cuda device in the config
    for name in (checkpoint.NAME, checkpoint.PREVIOUS):
        state = torch.load(moved / name, weights_only=True)
        state["rng"]["cuda"] = [torch.randint(0, 255, (16,), dtype=torch.uint8)
                                for _ in range(2)]
        state["config"]["device"] = device
        torch.save(state, moved / name)
    messages = []
    s21 = run.train_run(config, moved, resume=True, progress=False, log=messages.append)
    assert any("after epoch 2" in m for m in messages)
    (a, ma), (b, mb) = final_state(straight), final_state(moved)
    assert ma == mb and len(ma) == 3
    for key in ("model", "guide", "optimizers", "valid_guide"):
        assert_same_tensors(a[key], b[key], key)
    assert s3.test_elbo == s21.test_elbo
    assert config_json(moved)["resumes"][0]["changed"]["device"] == [device, "cpu"]


def test_a_finished_run_keeps_aside_an_evaluation_of_an_earlier_epoch(tmp_path, cached_mnist):
    """evaluate during training wrote eval.json at epoch 1; the run ends at epoch 2: the stale
    evaluation moves to evaluated-epoch1/ (issue 32.A: it was deleted), the summary stays
    alone beside the run."""
    out = tmp_path / "run"
    trained = run.fit_run(TOY.replace(epochs=2), out, progress=False, log=lambda m: None)
    (out / "eval.json").write_text(json.dumps({"epochs": 1}))
    (out / "latent.png").write_bytes(b"old")
    messages = []
    run.finish(trained, out, log=messages.append)
    assert not (out / "eval.json").exists() and not (out / "latent.png").exists()
    assert (out / "evaluated-epoch1" / "latent.png").read_bytes() == b"old"
    assert json.loads((out / "evaluated-epoch1" / "eval.json").read_text()) == {"epochs": 1}
    assert sum("evaluated-epoch1" in m for m in messages) == 1
    assert (out / "summary.json").exists()
    (out / "eval.json").write_text(json.dumps({"epochs": 2}))  # a current one stays
    run.finish(trained, out, log=messages.append)
    assert (out / "eval.json").exists()


@pytest.mark.parametrize("guide", [pytest.param("amortized", marks=pytest.mark.slow),
                                   "semiamortized",
                                   pytest.param("meanfield", marks=pytest.mark.slow)])
def test_tracking_the_gaps_does_not_change_the_training(tmp_path, cached_mnist, capsys, guide):
    """The gap curves score the model between epochs on their own random stream: the run's
    numbers are those of the same run without them (a semi-amortized guide's refinement in
    the tracker once took draws from the training stream)."""
    runs = []
    for extra in ([], GAPS):
        out = tmp_path / f"{guide}{len(extra)}"
        assert train_cli(capsys, out, "--guide", guide, "--epochs", "2", *extra)[0] == 0
        runs.append([(m["train_elbo"], m["valid_elbo"]) for m in metrics(out)])
    assert (tmp_path / f"{guide}{len(GAPS)}" / "gaps.jsonl").exists()
    assert runs[0] == runs[1]


def test_the_seed_range_is_where_seeds_do_not_alias():
    """torch's CPU generator keeps 32 bits of a seed, so --seed 2**32 would silently repeat
    --seed 0: the range --seed accepts is exactly the range of distinct streams."""
    draws = {s: torch.rand(3, generator=torch.Generator().manual_seed(s)) for s in (0, 2 ** 32)}
    assert torch.equal(draws[0], draws[2 ** 32])  # the aliasing the range check avoids
    assert Config(seed=2 ** 32 - 1).validate().seed == 2 ** 32 - 1
    with pytest.raises(UserError, match="--seed"):
        Config(seed=2 ** 32).validate()
