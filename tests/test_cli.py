"""ppl_vae.cli end to end on small slices of MNIST, plus compare() on a tiny config."""
from __future__ import annotations

import dataclasses
import json
import re
import math
import shutil

import pytest
import torch

from ppl_vae import checkpoint, cli
from ppl_vae.compare import compare
from ppl_vae.config import Config
from ppl_vae.errors import UserError

SMALL = ["--train-size", "500", "--valid-size", "200", "--test-size", "200", "--epochs", "2",
         "--hidden", "32", "--latent-dim", "4", "--device", "cpu"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


# ---------------------------------------------------------------------------------------
# compare (called directly: --quick overrides the sizes)
# ---------------------------------------------------------------------------------------
def test_compare_tiny(tmp_path, cached_mnist):
    config = Config(train_size=300, valid_size=50, test_size=40, epochs=1, hidden=(16,),
                    latent_dim=3, batch_size=100, device="cpu")
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
    for name in ("curves.png", "gaps.png", "reconstructions.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(UserError, match="--overwrite"):
        compare(config, tmp_path, num_particles=20, progress=False, log=lambda _m: None)


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
