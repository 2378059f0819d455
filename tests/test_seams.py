"""Issue 22: one home for each decision, and the defects that hid in the seams."""
from __future__ import annotations

import dataclasses
import json

import pyro.infer
import pytest
import torch

from ppl_vae import config as c
from ppl_vae import data, objectives, optim, run_setup, train
from ppl_vae.build import build_guide, build_model
from ppl_vae.config import Config
from ppl_vae.errors import UserError
from helpers import call, config_json, summary, train_cli

SMALL = Config(latent_dim=3, hidden=(8,), batch_size=16)


def _pieces(config=SMALL, n=64, d=12):
    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.rand(n, d, generator=g), generator=g)
    model = build_model(config, d)
    guide = build_guide(config, d, n)
    split = data.Split(x, torch.full((n,), -1))
    return model, guide, split, optim.make_optimizers(model, guide, 1e-3)


# ---------------------------------------------------------------------------------------
# beta is decided once: by fit's beta and warm-up, never read back from the objective
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", [objectives.IWAE(5),
                                       pyro.infer.Trace_ELBO().differentiable_loss],
                         ids=["iwae", "pyro"])
def test_a_warm_up_of_an_objective_without_kl_weight_is_one_line(objective):
    model, guide, split, opts = _pieces()
    with pytest.raises(UserError, match="no KL weight"):
        train.fit(model, guide, objective, split, opts, epochs=1, batch_size=16,
                  binarize=data.Binarize("none"), warmup_epochs=1, progress=False)


def test_the_weight_fit_is_given_is_the_weight_every_objective_gets():
    """An ELBO built with beta=0.5 and a plain one train the same under fit(beta=0.3): the
    objective's field no longer competes with the run's setting."""
    ends = []
    for objective in (objectives.ELBO(beta=0.5), objectives.ELBO()):
        model, guide, split, opts = _pieces()
        history = train.fit(model, guide, objective, split, opts, epochs=2, batch_size=16,
                            binarize=data.Binarize("none"), beta=0.3, warmup_epochs=1,
                            progress=False, seed=1)
        ends.append((history[-1].beta, history[-1].train_elbo))
    assert ends[0] == ends[1] and ends[0][0] == pytest.approx(0.3)


def test_resumable_settings_are_settings():
    names = {f.name for f in dataclasses.fields(Config)}
    assert c.RESUMABLE <= names
    assert set(run_setup.RESUME_FIXED) | c.RESUMABLE == names


# ---------------------------------------------------------------------------------------
# --resume takes the run's own settings: it needs only what it changes
# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# what a user sees of the seams
# ---------------------------------------------------------------------------------------
def test_track_gaps_draws_its_figure_at_the_end_of_training(tmp_path, capsys, cached_mnist):
    out = tmp_path / "run"
    assert train_cli(capsys, out, "--track-gaps")[0] == 0
    assert (out / "gaps.jsonl").exists() and (out / "gaps.png").stat().st_size > 0
