"""ppl_vae.train: the loop, the KL weight and its warm-up, lower_lr on a divergence, Ctrl-C
mid-epoch and resume."""
from __future__ import annotations

import dataclasses
import json
import math

import pyro.infer
import pytest
import torch

from ppl_vae import (callbacks, checkpoint, data, loopstate, objectives, optim, run, run_setup,
                     step, train)
from ppl_vae.build import build_guide, build_model
from ppl_vae.config import Config
from ppl_vae.errors import UserError

from conftest import TOY, NaNLoss, fit_setup, quiet
from helpers import assert_same_tensors, config_json, final_state, metrics, train_cli


TINY = TOY.replace(train_size=200, valid_size=40, test_size=30, epochs=4, batch_size=64)


# ---------------------------------------------------------------------------------------
# beta schedule and fit
# ---------------------------------------------------------------------------------------
def test_beta_warmup_is_linear():
    assert train.beta_at(0, 0, 10, 0, 0.7) == 0.7  # no warm-up
    assert train.beta_at(0, 0, 10, 2, 1.0) == 0.0
    assert train.beta_at(0, 5, 10, 2, 1.0) == pytest.approx(0.25)
    assert train.beta_at(1, 0, 10, 2, 1.0) == pytest.approx(0.5)
    assert train.beta_at(1, 5, 10, 2, 0.5) == pytest.approx(0.375)
    assert train.beta_at(2, 0, 10, 2, 1.0) == 1.0
    assert train.beta_at(7, 3, 10, 2, 1.0) == 1.0


@pytest.mark.parametrize("local", [False, True])
def test_fit_improves_the_elbo_and_reports_metrics(local):
    model, guide, split, opts = fit_setup(local)
    seen = []
    history = train.fit(model, guide, objectives.ELBO(), split, opts, epochs=6, batch_size=32,
                        binarize=data.Binarize("none"), seed=1, validate=lambda: -1.5,
                        on_epoch=seen.append, progress=False)
    assert [m.epoch for m in history] == [1, 2, 3, 4, 5, 6] and seen == history
    assert [m.steps for m in history] == [3, 6, 9, 12, 15, 18]  # ceil(96 / 32) per epoch
    assert all(m.valid_elbo == -1.5 and m.beta == 1.0 for m in history)
    assert all(m.seconds > 0 for m in history)
    walls = [m.wall for m in history]
    assert walls == sorted(walls)
    assert history[-1].wall == pytest.approx(sum(m.seconds for m in history))
    assert history[-1].train_elbo > history[0].train_elbo + 0.5
    assert history[-1].train_elbo < 0  # nats per image of binary data


def test_fit_train_elbo_is_the_mean_per_image_objective():
    """train_elbo = -(sum of the epoch's losses) / (N * steps): loss is N/B * batch sum."""
    model, guide, split, opts = fit_setup(False)
    losses = []

    class Recording:
        beta = 1.0

        def __call__(self, m, g, b):
            loss = objectives.ELBO()(m, g, b)
            losses.append(float(loss.detach()))
            return loss

    (metrics,) = train.fit(model, guide, Recording(), split, opts, epochs=1, batch_size=40,
                           binarize=data.Binarize("none"), progress=False)
    assert len(losses) == 3
    assert metrics.train_elbo == pytest.approx(-sum(losses) / (96 * 3), rel=1e-5)
    assert math.isnan(metrics.valid_elbo)


def test_fit_warmup_passes_beta_to_the_objective():
    model, guide, split, opts = fit_setup(False)
    betas = []

    @dataclasses.dataclass(frozen=True)
    class Recording:  # the warm-up hands beta to the objective on every call
        beta: float = 1.0

        def __call__(self, m, g, b, beta=1.0):
            betas.append(beta)
            return objectives.ELBO(beta=beta)(m, g, b)

    history = train.fit(model, guide, Recording(), split, opts, epochs=3, batch_size=48,
                        binarize=data.Binarize("none"), warmup_epochs=2, progress=False)
    assert betas == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    assert [m.beta for m in history] == pytest.approx([0.25, 0.75, 1.0])


def test_fit_same_seed_same_result_and_max_seconds_stops():
    out = []
    for _ in range(2):
        model, guide, split, opts = fit_setup(False)
        torch.manual_seed(5)
        h = train.fit(model, guide, objectives.ELBO(), split, opts, epochs=2, batch_size=32,
                      binarize=data.Binarize("dynamic"), seed=4, progress=False)
        out.append(([m.train_elbo for m in h], [p.detach().clone() for p in model.parameters()]))
    assert out[0][0] == out[1][0]
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))
    model, guide, split, opts = fit_setup(False)
    h = train.fit(model, guide, objectives.ELBO(), split, opts, epochs=50, batch_size=32,
                  binarize=data.Binarize("none"), max_seconds=1e-9, progress=False)
    assert len(h) == 1


def test_fit_callbacks_come_in_the_order_they_must_run():
    """Validation before the bar's line and the checkpoint (``on_epoch``), Ctrl-C after the
    checkpoint, the time budget last; what is not asked for is left out."""
    pieces = train._fit_callbacks(3, validate=lambda: 0.0, on_epoch=print, progress=False,
                                  max_seconds=5.0, ctrl_c=True, log=quiet)
    assert [type(p) for p in pieces] == [callbacks.Validate, callbacks.ProgressBar, callbacks.OnEpoch,
                                         callbacks.StopOnCtrlC, callbacks.TimeBudget]
    pieces = train._fit_callbacks(3, validate=None, on_epoch=None, progress=False,
                                  max_seconds=None, ctrl_c=False, log=quiet)
    assert [type(p) for p in pieces] == [callbacks.ProgressBar]


def test_beta_schedule_only_when_beta_or_warmup_is_set():
    class NoBeta:
        weights_kl = False

    assert train._beta_schedule(NoBeta(), 1.0, 0, 10) is None  # defaults: the objective's own
    schedule = train._beta_schedule(objectives.ELBO(), 1.0, 2, 10)
    assert schedule(0, 5) == pytest.approx(0.25) and schedule(2, 0) == 1.0
    assert train._beta_schedule(objectives.ELBO(), 0.5, 0, 10)(0, 0) == 0.5
    with pytest.raises(UserError, match="no KL weight"):
        train._beta_schedule(NoBeta(), 0.5, 0, 10)


# ---------------------------------------------------------------------------------------
# on a divergence: lower the learning rates and go on
# ---------------------------------------------------------------------------------------
def test_on_divergence_lower_lr_skips_the_batch_and_halves_the_rates():
    model, guide, split, opts = fit_setup(False)
    calls = []

    class NaNEveryOther:
        beta = 1.0

        def __call__(self, m, g, b):
            calls.append(1)
            loss = objectives.ELBO()(m, g, b)
            return loss * float("nan") if len(calls) % 2 == 1 else loss

    messages = []
    history = train.fit(model, guide, NaNEveryOther(), split, opts, epochs=1, batch_size=24,
                        binarize=data.Binarize("none"), on_divergence="lower_lr",
                        progress=False, log=messages.append)
    assert history[0].steps == 2  # 4 batches, 2 of them skipped
    assert len(messages) == 2 and all("halved" in m for m in messages)
    assert opts.global_.param_groups[0]["lr"] == pytest.approx(0.01 / 4)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # at most 10 halvings, then it stops
    with pytest.raises(step.DivergenceError):
        train.fit(model, guide, NaNLoss(), split, opts, epochs=5, batch_size=8,
                  binarize=data.Binarize("none"), on_divergence="lower_lr", progress=False,
                  log=messages.append)


# ---------------------------------------------------------------------------------------
# resume: 2 + 2 epochs == 4 epochs, bitwise
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("guide", ["amortized", "meanfield", "compiled"])
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, cached_mnist, guide):
    config = TINY.replace(guide=guide) if guide != "compiled" else TINY.replace(compile="on")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    s4 = run.train_run(config, straight, progress=False, log=quiet)
    run.train_run(config.replace(epochs=2), resumed, progress=False, log=quiet)
    s22 = run.train_run(config, resumed, resume=True, progress=False, log=quiet)
    (a, ma), (b, mb) = final_state(straight), final_state(resumed)
    assert ma == mb and len(ma) == 4
    for key in ("model", "guide", "optimizers", "valid_guide"):
        assert_same_tensors(a[key], b[key], key)
    assert s4.test_elbo == s22.test_elbo and s4.epochs == s22.epochs == 4


def test_resume_refuses_a_different_architecture(tmp_path, cached_mnist):
    out = tmp_path / "run"
    run.train_run(TINY.replace(epochs=1), out, progress=False, log=quiet)
    with pytest.raises(UserError, match="latent_dim"):
        run.train_run(TINY.replace(latent_dim=4), out, resume=True, progress=False, log=quiet)
    with pytest.raises(UserError, match="--resume"):
        run.train_run(TINY, tmp_path / "empty", resume=True, progress=False, log=quiet)


def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, cached_mnist):
    config = TINY.replace(epochs=2)
    run.train_run(config, tmp_path, progress=False, log=quiet)
    blob = (tmp_path / checkpoint.NAME).read_bytes()
    (tmp_path / checkpoint.NAME).write_bytes(blob[:200])
    messages = []
    summary = run.train_run(config.replace(epochs=3), tmp_path, resume=True, progress=False,
                            log=messages.append)
    assert any("checkpoint.prev.pt" in m for m in messages)
    assert any("after epoch 1" in m for m in messages)  # the previous checkpoint is epoch 1
    assert summary.epochs == 3
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]


class _InterruptAt:
    """The run's objective, sending this process SIGINT during its ``at``-th call."""

    def __init__(self, objective, at):
        self.objective, self.at, self.calls = objective, at, 0

    @property
    def beta(self):
        return self.objective.beta

    def __call__(self, model, guide, batch):
        self.calls += 1
        if self.calls == self.at:
            import os
            import signal
            os.kill(os.getpid(), signal.SIGINT)
        return self.objective(model, guide, batch)


@pytest.mark.parametrize("guide", ["amortized", "meanfield"])
def test_ctrl_c_mid_epoch_then_resume_is_bitwise_equal(tmp_path, cached_mnist, monkeypatch, guide):
    """Ctrl-C finishes the step, checkpoints the position inside the epoch; --resume goes on
    from that step, with the same result as a run that was never interrupted."""
    config = TINY.replace(guide=guide, epochs=3, inner_steps=0)
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    run.fit_run(config, straight, progress=False, log=quiet)
    build = run_setup.build_objective
    monkeypatch.setattr(run_setup, "build_objective", lambda c: _InterruptAt(build(c), at=6))
    with pytest.raises(loopstate.Interrupted) as e:
        run.fit_run(config, cut, progress=False, log=quiet)
    assert (e.value.position.epoch, e.value.position.step) == (1, 2)  # 4 steps per epoch
    state = checkpoint.load(cut)
    assert state["position"]["step"] == 2 and len(state["history"]) == 1
    monkeypatch.setattr(run_setup, "build_objective", build)
    messages = []
    run.fit_run(config, cut, resume=True, progress=False, log=messages.append)
    assert any("step 2 of epoch 2" in m for m in messages)
    (a, ma), (b, mb) = final_state(straight), final_state(cut)
    assert len(ma) == len(mb) == 3
    # train_elbo of the interrupted epoch sums its losses in two parts (a Python float saved
    # in the checkpoint + the float32 sum after resuming): equal up to float32 rounding only
    for u, v in zip(ma, mb):
        assert u.pop("train_elbo") == pytest.approx(v.pop("train_elbo"), rel=1e-6, abs=0)
    assert ma == mb
    for key in ("model", "guide", "optimizers", "valid_guide"):
        assert_same_tensors(a[key], b[key], key)


def test_train_elbo_averages_the_applied_steps_only():
    model, guide, split, opts = fit_setup(False)
    applied = []

    class NaNEveryOther:
        beta = 1.0
        calls = 0

        def __call__(self, m, g, b):
            NaNEveryOther.calls += 1
            loss = objectives.ELBO()(m, g, b)
            if NaNEveryOther.calls % 2 == 1:
                return loss * float("nan")
            applied.append(float(loss.detach()))
            return loss

    (metrics,) = train.fit(model, guide, NaNEveryOther(), split, opts, epochs=1, batch_size=24,
                           binarize=data.Binarize("none"), on_divergence="lower_lr",
                           progress=False, log=quiet)
    assert len(applied) == 2 and metrics.steps == 2
    assert metrics.train_elbo == pytest.approx(-sum(applied) / (96 * len(applied)), rel=1e-5)


def test_warmup_ramps_beta_toward_its_target(tmp_path, cached_mnist, capsys):
    out = tmp_path / "warm"
    assert train_cli(capsys, out, "--warmup-epochs", "2", "--beta", "0.2", "--epochs", "3")[0] == 0
    recorded = [m["beta"] for m in metrics(out)]
    steps = 2  # per epoch: 100 rows in batches of 50; each epoch records its last step's beta
    expected = [train.beta_at(e, steps - 1, steps, 2, 0.2) for e in range(3)]
    assert expected == pytest.approx([0.05, 0.15, 0.2])
    assert recorded == pytest.approx(expected)
    assert config_json(out)["config"]["warmup_epochs"] == 2


SMALL = Config(latent_dim=3, hidden=(8,), batch_size=16)


def _pieces(config=SMALL, n=64, d=12):
    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.rand(n, d, generator=g), generator=g)
    model = build_model(config, d)
    guide = build_guide(config, d, n)
    split = data.Split(x, torch.full((n,), -1))
    return model, guide, split, optim.make_optimizers(model, guide, 1e-3)


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
