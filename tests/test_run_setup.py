"""ppl_vae.run_setup: what is refused before anything is written (odd data, sizes, pieces)
and how a resume takes up its checkpoint: its own settings, changes recorded, mistakes
refused without deleting anything, one read of the checkpoint."""
from __future__ import annotations

import math
import os

import pytest

from ppl_vae import checkpoint

from helpers import (FIGURES, TINY, assert_one_error_line, call, config_json, files, metrics,
                     summary, train_cli)


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


def test_a_resume_needs_only_what_it_changes(tmp_path, capsys, cached_mnist):
    out = tmp_path / "run"
    assert train_cli(capsys, out, "--lr", "0.002")[0] == 0
    code, _, err = call(capsys, "train", "--out", out, "--resume", "--epochs", "2",
                        "--no-progress")
    assert code == 0, err
    doc = config_json(out)
    assert doc["config"]["train_size"] == 100 and doc["config"]["lr"] == 0.002
    assert doc["resumes"] == [{"after_epoch": 1, "changed": {"epochs": [1, 2]}}]
    assert summary(out)["epochs"] == 2
    # a setting that defines the run, given anew, is still refused
    code, _, err = call(capsys, "train", "--out", out, "--resume", "--epochs", "3",
                        "--hidden", "32")
    assert code == 2 and "hidden" in err


def test_a_resume_reads_its_checkpoint_once(tmp_path, capsys, cached_mnist, monkeypatch):
    """The settings and the state of a resume come from one read of the checkpoint (it can
    hold a 50,000-row table), handed from ``resumed_config`` to ``train_run``."""
    from ppl_vae import checkpoint
    out = tmp_path / "run"
    assert train_cli(capsys, out)[0] == 0
    reads, load = [], checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: reads.append(a[0]) or load(*a, **k))
    code, _, err = call(capsys, "train", "--out", out, "--resume", "--epochs", "2",
                        "--no-progress")
    assert code == 0, err
    assert len(reads) == 1 and summary(out)["epochs"] == 2


def _odd_files(folder):
    import numpy as np
    np.savez(folder / "objects.npz", x=np.array([{"a": 1}, 2], dtype=object))
    (folder / "corrupt.npz").write_bytes(b"PK\x03\x04garbage" * 10)
    with open(folder / "huge.npy", "wb") as f:  # a 4 KB file whose header claims 2.85 TiB
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (1_000_000, 784_000)})
        f.write(b"\0" * 4000)
    np.savez(folder / "labels.npz", x=np.zeros((300, 8, 8), np.uint8),
             y=np.full(300, 2 ** 40))
    os.mkfifo(folder / "pipe.npy")


ODD = [
    (["--dataset", "objects.npz"], "Python objects"),
    (["--dataset", "corrupt.npz"], "not a zip"),
    (["--dataset", "huge.npy"], "header says"),
    (["--dataset", "labels.npz"], "class indices"),
    (["--dataset", "pipe.npy"], "not a regular file"),
    (["--dataset", "torchvision:__class__"], "no class"),
    (["--dataset", "torchvision:VisionDataset"], "no class"),
    (["--guide", "meanfield", "--inner-steps", "100000"], "at most 1000"),
    (["--refine-steps", "5000", "--guide", "semiamortized"], "at most 1000"),
    (["--gap-particles", "1000000000"], "beyond"),
    (["--num-particles", "1000000"], "GiB"),
    (["--hidden", "65536", "65536"], "GiB"),
    (["--num-particles-eval", "100000000000000000000", "--evaluate"], "beyond"),
    (["--lr-schedule", "builtins:int"], "epoch -> learning-rate factor"),
    (["--guide", "builtins:object"], "Pyro program guide(batch)"),
    (["--likelihood", "builtins:int"], "likelihood(decoder output)"),
    (["--likelihood", "ppl_vae.guides:AmortizedNormal"], "from_config"),
    (["--guide", "ppl_vae.likelihoods:Bernoulli"], "Pyro program guide(batch)"),
]


@pytest.mark.parametrize("argv, words", ODD, ids=[" ".join(a)[:40] for a, _ in ODD])
def test_odd_input_is_one_line_before_any_folder(tmp_path, capsys, cached_mnist, monkeypatch,
                                                  argv, words):
    _odd_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out, err = call(capsys, "train", *TINY, *argv, "--out", tmp_path / "r")
    assert_one_error_line(code, err, out)
    assert words in err
    assert not (tmp_path / "r").exists()


def test_a_damaged_config_json_keeps_the_record_of_resumes(finished_run, capsys):
    assert train_cli(capsys, finished_run, "--epochs", "3", "--resume", "--lr", "2e-3")[0] == 0
    (finished_run / "config.json").write_text("{ damaged")
    assert train_cli(capsys, finished_run, "--epochs", "4", "--resume")[0] == 0
    resumes = config_json(finished_run)["resumes"]
    assert [r["after_epoch"] for r in resumes] == [2, 3]
