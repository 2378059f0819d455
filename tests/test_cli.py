"""ppl_vae.cli: the command line end to end on small slices of MNIST; every option of ``train``
changes what the run does; --help and usage errors answered without importing torch; paths
the console cannot encode printed escaped."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ppl_vae import checkpoint, cli, data, distributed, loopstate, run_setup, step
from ppl_vae.config import Config

from helpers import (GAPS, PNG_MAGIC, assert_one_error_line, config_json, metrics, numbers,
                     params, summary, train_cli)


SMALL = ["--train-size", "500", "--valid-size", "200", "--test-size", "200", "--epochs", "2",
         "--hidden", "32", "--latent-dim", "4", "--device", "cpu"]


def _train(out, *extra):
    return cli.main(["train", *SMALL, "--out", str(out), *extra])


def _files(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def amortized_run(tmp_path_factory):
    """One `ppl-vae train` run (real data loading, no caching), shared read-only."""
    out = tmp_path_factory.mktemp("runs") / "amortized"
    assert _train(out) == 0
    return out


def _check_run_folder(out, guide):
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["guide"] == guide and cfg["config"]["hidden"] == [32]
    assert cfg["config"]["latent_dim"] == 4 and cfg["config"]["train_size"] == 500
    assert Config.from_dict(cfg["config"]).validate() == Config.from_dict(cfg["config"])
    assert {"torch", "pyro", "python"} <= set(cfg["versions"])
    metrics = _metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"epoch", "train_elbo", "valid_elbo", "seconds"} <= set(m)
        assert m["seconds"] > 0
        # per-image ELBO of 784 binary pixels: negative, and not absurd
        assert -784 * 2 < m["train_elbo"] < 0 and -784 * 2 < m["valid_elbo"] < 0
    assert metrics[1]["steps"] == 2 * math.ceil(500 / 128)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_elbo"] < 0 and summary["test_rows"] == 200
    assert summary["epochs"] == 2 and summary["seconds_per_epoch"] > 0
    assert summary["seconds_per_epoch"] == pytest.approx(sum(m["seconds"] for m in metrics) / 2)
    assert summary["final_valid_elbo"] == metrics[-1]["valid_elbo"]
    state = checkpoint.load(out)
    assert state["config"] == cfg["config"] and len(state["history"]) == 2
    return summary


def test_train_amortized_writes_the_run_files(amortized_run):
    _check_run_folder(amortized_run, "amortized")


def test_train_meanfield_writes_the_run_files(tmp_path, cached_mnist):
    out = tmp_path / "mf"
    assert _train(out, "--guide", "meanfield") == 0
    _check_run_folder(out, "meanfield")
    state = checkpoint.load(out)
    assert state["guide"]["params"].shape == (500, 2 * 4)  # one row per training image
    assert state["valid_guide"]["params"].shape == (200, 2 * 4)


def test_rerun_without_overwrite_refuses_and_leaves_files_untouched(tmp_path, amortized_run, capsys):
    out = tmp_path / "run"
    shutil.copytree(amortized_run, out)
    before = _files(out)
    capsys.readouterr()
    assert _train(out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    assert "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert _files(out) == before


def test_overwrite_replaces_the_run(tmp_path, amortized_run, cached_mnist):
    out = tmp_path / "run"
    shutil.copytree(amortized_run, out)
    assert _train(out, "--overwrite", "--epochs", "1") == 0
    assert [m["epoch"] for m in _metrics(out)] == [1]
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
    assert not (out / checkpoint.PREVIOUS).exists()  # the old run's checkpoints are gone


def test_resume_continues_a_finished_run(tmp_path, amortized_run, cached_mnist):
    out = tmp_path / "run"
    shutil.copytree(amortized_run, out)
    old = _metrics(out)
    assert _train(out, "--resume", "--epochs", "3") == 0
    new = _metrics(out)
    assert [m["epoch"] for m in new] == [1, 2, 3]
    assert new[:2] == old  # the first two epochs are kept as they were
    assert new[2]["steps"] == 3 * math.ceil(500 / 128)
    assert json.loads((out / "summary.json").read_text())["epochs"] == 3


def test_a_run_does_not_write_into_the_loaded_splits(tmp_path, cached_mnist):
    fingerprint = [(s.x.sum().item(), s.x[:50].clone()) for s in cached_mnist]
    assert _train(tmp_path / "run", "--epochs", "1", "--binarize", "static") == 0
    for (total, head), s in zip(fingerprint, cached_mnist):
        assert s.x.sum().item() == total and torch.equal(s.x[:50], head)


BAD_INPUTS = {
    "unknown guide": ["train", "--guide", "bogus"],
    "zero lr": ["train", "--lr", "0"],
    "negative batch": ["train", "--batch-size", "-1"],
    "zero hidden": ["train", "--hidden", "0"],
    "unknown dataset": ["train", "--dataset", "cifar10"],
    "non-numeric lr": ["train", "--lr", "fast"],
    "unknown flag": ["train", "--no-such-flag"],
    "no command": [],
    "zero particles": ["train", "--num-particles", "0"],
    "zero train size": ["train", "--train-size", "0"],
    "dreg without iwae": ["train", "--dreg"],
    "unknown objective": ["train", "--objective", "kl"],
    "zero eval particles": ["train", "--num-particles-eval", "0"],
}


@pytest.mark.parametrize("argv", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_code_2(argv, tmp_path, capsys):
    out = tmp_path / "out"
    if argv:
        argv = argv + ["--out", str(out)]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("error:") and err.count("\n") == 1, err
    assert "Traceback" not in err + captured.out
    assert not out.exists()  # refused before anything was written


def test_evaluate_missing_folder(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "does not exist" in err


def test_evaluate_folder_without_checkpoint(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path, capsys):
    assert cli.main(["train", "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cpu" in err


def test_evaluate_bad_options(amortized_run, capsys):
    for extra in (["--num-particles-eval", "0"], ["--split", "train"], ["--proposal", "prior"],
                  ["--rows", "0"], ["--local-family", "banana"]):
        assert cli.main(["evaluate", str(amortized_run), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1, extra
    assert not (amortized_run / "eval.json").exists()


def test_evaluate_writes_eval_json_and_figures(tmp_path, amortized_run, cached_mnist):
    run = tmp_path / "run"
    shutil.copytree(amortized_run, run)
    assert cli.main(["evaluate", str(run), "--num-particles-eval", "50", "--rows", "100"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    for key in ("test_elbo", "test_log_px", "test_log_px_stderr", "num_particles", "rate",
                "distortion", "active_units", "seconds"):
        assert key in ev, key
    assert ev["num_particles"] == 50 and ev["num_rows"] == 100 and ev["proposal"] == "guide"
    assert ev["test_elbo"] == pytest.approx(-(ev["rate"] + ev["distortion"]), abs=1e-3)
    assert ev["rate"] > 0 and ev["distortion"] > 0
    assert ev["test_log_px"] < 0 and ev["test_log_px_stderr"] > 0
    # IWAE_50 with the encoder as proposal is a tighter bound than its ELBO
    assert ev["test_log_px"] > ev["test_elbo"] - 0.5
    assert 0 <= ev["active_units"] <= 4
    for name in ("curves.png", "reconstructions.png", "samples.png", "latent.png"):
        blob = (run / name).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 1000, name


def test_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in text, f.name


def test_options_map_onto_config():
    args = cli.build_parser().parse_args(
        ["train", "--latent-dim", "7", "--hidden", "10", "20", "--objective", "iwae", "--dreg",
         "--num-particles", "3", "--lr", "0.01", "--train-size", "100", "--max-seconds", "2.5",
         "--device", "cpu"])
    config = cli._config(args)
    assert config == Config(latent_dim=7, hidden=(10, 20), objective="iwae", dreg=True,
                            num_particles=3, lr=0.01, train_size=100, max_seconds=2.5,
                            device="cpu")


def test_meanfield_run_refuses_the_guide_proposal(tmp_path, cached_mnist, capsys):
    out = tmp_path / "mf"
    assert _train(out, "--guide", "meanfield", "--epochs", "1") == 0
    capsys.readouterr()
    assert cli.main(["evaluate", str(out), "--proposal", "guide"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--proposal local" in err
    assert not (out / "eval.json").exists()


def test_dreg_with_the_flow_guide_is_refused_up_front(tmp_path, cached_mnist, capsys):
    out = tmp_path / "iaf"
    code = cli.main(["train", *SMALL, "--epochs", "1", "--guide", "iaf", "--objective", "iwae",
                     "--dreg", "--num-particles", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1
    assert not out.exists()


def test_evaluate_valid_split_honours_test_size(tmp_path, amortized_run, cached_mnist):
    from ppl_vae.evaluation import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(amortized_run, run)
    before = (run / "eval.json").read_bytes() if (run / "eval.json").exists() else None
    results = evaluate_run(run, num_particles=2, split="valid", test_size=30, progress=False,
                           log=lambda _m: None)
    assert results["split"] == "valid"
    assert results["num_rows"] == 30
    # under its own names and file: the test evaluation is left alone
    saved = json.loads((run / "eval_valid.json").read_text())
    assert "valid_log_px" in saved and not any(k.startswith("test_") for k in saved)
    after = (run / "eval.json").read_bytes() if (run / "eval.json").exists() else None
    assert after == before


def test_bernoulli_on_grayscale_is_refused(tmp_path, cached_mnist, capsys):
    assert _train(tmp_path / "gray", "--binarize", "none") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "--binarize" in err
    assert not (tmp_path / "gray" / checkpoint.NAME).exists()


def test_evaluate_a_one_dimensional_latent(tmp_path, cached_mnist, capsys):
    out = tmp_path / "l1"
    assert cli.main(["train", *SMALL[:-4], "--latent-dim", "1", "--device", "cpu",
                     "--epochs", "1", "--out", str(out)]) == 0
    assert cli.main(["evaluate", str(out), "--num-particles", "5", "--test-size", "50"]) == 0
    assert (out / "latent.png").read_bytes().startswith(PNG_MAGIC)


def test_evaluate_names_k_and_rows_by_what_they_mean(tmp_path, amortized_run, cached_mnist,
                                                      capsys):
    """evaluate's K is --num-particles-eval (as in train and compare; train's --num-particles
    is the objective's particles) and its rows --rows (any split); the old names still work,
    with a warning naming the new ones, and both at once are refused."""
    run = tmp_path / "run"
    shutil.copytree(amortized_run, run)
    assert cli.main(["evaluate", str(run), "--num-particles-eval", "3", "--rows", "20",
                     "--split", "valid", "--no-progress"]) == 0
    saved = json.loads((run / "eval_valid.json").read_text())
    assert saved["num_particles"] == 3 and saved["num_rows"] == 20
    capsys.readouterr()
    assert cli.main(["evaluate", str(run), "--num-particles", "4", "--test-size", "10",
                     "--split", "valid", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "--num-particles is now --num-particles-eval" in err
    assert "--test-size is now --rows" in err
    saved = json.loads((run / "eval_valid.json").read_text())
    assert saved["num_particles"] == 4 and saved["num_rows"] == 10
    assert cli.main(["evaluate", str(run), "--num-particles", "4",
                     "--num-particles-eval", "5"]) == 2
    assert "give --num-particles-eval alone" in capsys.readouterr().err
    assert cli.main(["evaluate", str(run), "--rows", "0"]) == 2
    assert "--rows must be a positive number of rows" in capsys.readouterr().err


def test_help_shows_every_default_once(capsys):
    for command in ("train", "compare", "evaluate"):
        text = " ".join(cli.build_parser().commands[command].format_help().split())
        assert not re.search(r"\(default:[^)]*\) \(default", text), command
        assert "(default: None)" not in text  # a default the reader can act on
        if command != "evaluate":
            assert f"(default: runs/{command})" in text  # where the run goes
            assert "--config FILE" in text
    text = " ".join(cli.build_parser().commands["train"].format_help().split())
    assert "K of log p(x) with --evaluate (default 5000)" in text


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


def _differs(base, alt):
    assert numbers(alt) != numbers(base)


def _same_data_other_folder(base, alt, tmp_path, capsys):
    # the same MNIST read from the given folder: the same numbers
    assert numbers(alt) == numbers(base)
    code, _, err = train_cli(capsys, tmp_path / "empty-data", "--data-dir", tmp_path / "nothing")
    assert_one_error_line(code, err)
    assert "nothing" in err  # the folder given is the folder read


def _latent(base, alt):
    dec = [v for k, v in params(alt).items() if k.startswith("decoder") and v.dim() == 2][0]
    dec_base = [v for k, v in params(base).items() if k.startswith("decoder") and v.dim() == 2][0]
    assert dec.shape[1] == 4 and dec_base.shape[1] == 3
    _differs(base, alt)


def _hidden(base, alt):
    dec = [v.shape for k, v in params(alt).items() if k.startswith("decoder") and v.dim() == 2]
    dec_base = [v.shape for k, v in params(base).items()
                if k.startswith("decoder") and v.dim() == 2]
    assert dec[0][0] == 8 and dec_base[0][0] == 16
    _differs(base, alt)


def _prior(base, alt):
    assert set(params(alt)) - set(params(base))  # the mixture's parameters
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


def test_a_path_the_console_cannot_encode_is_printed_escaped(finished_run):
    """A folder name that is not UTF-8, under a console that encodes strictly: the path is
    printed escaped, not a UnicodeEncodeError after the files were written."""
    import subprocess
    odd = finished_run.parent / os.fsdecode(b"run-\xff")
    finished_run.rename(odd)
    code = "import sys; from ppl_vae.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "evaluate", os.fsencode(odd),
                           "--num-particles-eval", "2", "--rows", "10", "--no-progress"],
                          capture_output=True, env={**os.environ, "PYTHONIOENCODING": "ascii:strict"})
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert b"UnicodeEncodeError" not in proc.stderr and (odd / "eval.json").exists()


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_help_of_every_command_imports_no_torch():
    run = _python("""
        import contextlib, io, sys
        from ppl_vae import cli
        parser = cli.build_parser()
        for argv in ([], ["train"], ["evaluate"], ["compare"]):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    parser.parse_args(argv + ["--help"])
                except SystemExit as e:
                    assert e.code == 0, (argv, e.code)
            assert "usage: ppl-vae" in out.getvalue(), argv
        loaded = sorted(m for m in ("torch", "pyro", "numpy") if m in sys.modules)
        print("loaded:", loaded)
    """)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "loaded: []", run.stdout


@pytest.mark.parametrize("argv", [["train", "--epochs", "abc"], ["bogus"], [],
                                  ["compare", "--guides", ","], ["evaluate"],
                                  ["train", "--out", ""], ["train", "--max-steps", "x"]])
def test_a_usage_error_exits_2_on_one_line_without_torch(argv):
    run = _python(f"""
        import sys
        from ppl_vae import cli
        code = cli.main({argv!r})
        print(code, "torch" in sys.modules, "pyro" in sys.modules)
    """)
    assert run.stdout.strip() == "2 False False", (run.stdout, run.stderr)
    assert run.stderr.startswith("error: ppl-vae") and run.stderr.count("\n") == 1, run.stderr


def test_the_command_itself_answers_help_and_usage_errors():
    help_ = subprocess.run([sys.executable, "-m", "ppl_vae", "train", "--help"],
                           capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "--epochs" in help_.stdout
    bad = subprocess.run([sys.executable, "-m", "ppl_vae", "train", "--epochs", "abc"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr == "error: ppl-vae train: argument --epochs: invalid int value: 'abc'\n"


def test_compare_help_hides_guide_and_still_refuses_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    text = capsys.readouterr().out
    assert "--guide " not in text and "--guide\n" not in text and "--guides" in text
    assert cli.main(["compare", "--guide", "meanfield", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--guides meanfield" in err
    assert not (tmp_path / "c").exists()


def test_compare_defaults_to_the_default_guides():
    from ppl_vae.compare import DEFAULT_GUIDES
    args = cli.build_parser().parse_args(["compare", "--guide", "iaf"])
    assert args.guides is None  # filled in by the command from compare.DEFAULT_GUIDES
    assert list(DEFAULT_GUIDES) == ["amortized", "semiamortized", "meanfield"]


@pytest.mark.parametrize("error, code, message", [
    (distributed.RefusedElsewhere("elsewhere"), 2, ""),
    (step.DivergenceError("epoch 3"), 1, "error: training diverged at epoch 3"),
    (loopstate.Interrupted(loopstate.Position(0, 5, 0.0, 0.0, 0.0, 5, 5)), 130,
     "interrupted at epoch 1, step 5"),
])
def test_main_maps_the_errors_of_modules_imported_later(monkeypatch, capsys, error, code,
                                                        message):
    def fail(args):
        raise error
    monkeypatch.setattr(cli, "_command", fail)
    assert cli.main(["evaluate", "somewhere"]) == code
    assert capsys.readouterr().err.startswith(message)
