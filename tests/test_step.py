"""ppl_vae.step: one training step and its divergence guard, inner steps included."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ppl_vae import data, objectives, optim, step, train
from ppl_vae.batching import Batch

from conftest import NaNLoss, fit_setup, quiet


class NaNGradient:
    """A finite loss whose gradient is NaN: 0 * sqrt(p - p) has value 0 and gradient 0 * inf."""

    beta = 1.0

    def __call__(self, model, guide, batch):
        loss = objectives.ELBO()(model, guide, batch)
        w = next(model.parameters())
        return loss + 0.0 * torch.sqrt(w - w).sum()


def _snapshot(model, guide, opts):
    params = [p.detach().clone() for m in (model, guide) for p in m.parameters()]
    states = [json.dumps({k: str(v) for k, v in o.state_dict()["state"].items()}) for o in opts.all()]
    return params, states


def _assert_unchanged(before, after):
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1] == after[1]


@pytest.mark.parametrize("objective,local,inner", [
    (NaNLoss(), False, 0), (NaNGradient(), False, 0),
    (NaNLoss(), True, 0), (NaNGradient(), True, 0),
    (NaNLoss(), True, 3), (NaNGradient(), True, 3),
], ids=["amortized-nan-loss", "amortized-nan-grad", "local-nan-loss", "local-nan-grad",
        "local-inner-nan-loss", "local-inner-nan-grad"])
def test_divergence_raises_and_leaves_parameters_unchanged(objective, local, inner):
    model, guide, split, _ = fit_setup(local)
    opts = optim.make_optimizers(model, guide, lr=0.01, local_lr=0.05, inner_steps=inner)
    # a few healthy steps first, so the optimizers have state to protect
    train.fit(model, guide, objectives.ELBO(), split, opts, epochs=1, batch_size=32,
              binarize=data.Binarize("none"), progress=False)
    before = _snapshot(model, guide, opts)
    idx = torch.arange(10)
    with pytest.raises(step.DivergenceError):
        step.step(model, guide, objective, Batch(split.x[idx], idx, len(split)), opts)
    _assert_unchanged(before, _snapshot(model, guide, opts))
    with pytest.raises(step.DivergenceError, match="epoch 2, step 1"):
        train.fit(model, guide, objective, split, opts, epochs=2, batch_size=32,
                  binarize=data.Binarize("none"), start_epoch=1, progress=False)
    _assert_unchanged(before, _snapshot(model, guide, opts))


def test_divergence_in_an_inner_step_leaves_the_table_unchanged():
    """The per-datapoint guide's local-only steps are guarded too (no NaN rows)."""
    model, guide, split, _ = fit_setup(True)
    opts = optim.make_optimizers(model, guide, lr=0.01, local_lr=0.05, inner_steps=3)
    before = _snapshot(model, guide, opts)
    idx = torch.arange(10)
    with pytest.raises(step.DivergenceError):
        step.step(model, guide, NaNLoss(), Batch(split.x[idx], idx, len(split)), opts)
    assert torch.isfinite(guide.params).all()
    _assert_unchanged(before, _snapshot(model, guide, opts))


def test_check_finite_reads_sparse_gradients():
    model, guide, split, opts = fit_setup(True)
    guide.params.grad = torch.sparse_coo_tensor(torch.tensor([[2]]), torch.full((1, 4), math.inf),
                                                guide.params.shape, check_invariants=True)
    assert not step.check_finite(torch.tensor(1.0), opts)
    guide.params.grad = torch.sparse_coo_tensor(torch.tensor([[2]]), torch.ones(1, 4),
                                                guide.params.shape, check_invariants=True)
    assert step.check_finite(torch.tensor(1.0), opts)
    assert not step.check_finite(torch.tensor(math.nan), opts)


class _RecordingSync:
    """torchrun's ``GradSync`` for one process: records the flag it was handed."""

    size = 1

    def __init__(self):
        self.flags = []

    def reduce(self, params, flag):
        self.flags.append(flag.clone())
        return flag


@pytest.mark.parametrize("guard", [True, False])
def test_a_step_under_a_sync_all_reduces_the_flag_with_the_gradients(guard):
    """The guard's flag rides the all-reduce (a zero when unguarded, and then no flag comes
    back); the step is applied either way."""
    model, guide, split, opts = fit_setup(False)
    sync = _RecordingSync()
    before = [p.detach().clone() for p in model.parameters()]
    idx = torch.arange(10)
    loss, bad = step.step_on_device(model, guide, objectives.ELBO(),
                                     Batch(split.x[idx], idx, len(split)),
                                     opts._replace(sync=sync), guard=guard)
    assert torch.isfinite(loss) and len(sync.flags) == 1 and float(sync.flags[0]) == 0.0
    assert (bad is None) if not guard else float(bad) == 0.0
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_a_divergence_names_the_learning_rate_unless_the_guide_names_its_own_setting():
    model, guide, split, opts = fit_setup(False)
    with pytest.raises(step.DivergenceError) as e:
        train.fit(model, guide, NaNLoss(), split, opts, epochs=1, batch_size=32,
                  binarize=data.Binarize("none"), progress=False, log=quiet)
    assert e.value.setting == "lr" and e.value.cause is None
    assert e.value.advice(cli=True) == "Try a smaller --lr or --on-divergence lower_lr"


class _NaNDecoder:
    """The ELBO, except that at its ``at``-th call the decoder's output is NaN: Pyro's
    validation refuses the Bernoulli's logits with a ValueError before the loss is NaN."""

    beta = 1.0

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self, model, guide, batch):
        self.calls += 1
        if self.calls != self.at:
            return objectives.ELBO()(model, guide, batch)
        w = model.decoder.net[-1].bias
        with torch.no_grad():
            saved = w.clone()
            w.fill_(float("nan"))
        try:
            return objectives.ELBO()(model, guide, batch)
        finally:
            with torch.no_grad():
                w.copy_(saved)


@pytest.mark.parametrize("local", [False, True])
def test_a_nan_that_a_distribution_refuses_is_a_divergence(local):
    """Pyro validates every site, so a NaN parameter raised a ValueError (a long traceback)
    before the guard could see a NaN loss: it is a divergence like any other, the step is
    not applied (the table's rows its inner updates moved are put back)."""
    model, guide, split, opts = fit_setup(local)
    before = _snapshot(model, guide, opts)
    # a table's step: an inner update (call 1) moves the rows, the joint pass (call 2) fails
    with pytest.raises(step.DivergenceError, match="epoch 1, step 1: NaN reached parameter "
                                                    "logits of a Bernoulli"):
        train.fit(model, guide, _NaNDecoder(2 if local else 1), split, opts, epochs=1,
                  batch_size=32,
                  binarize=data.Binarize("none"), progress=False, log=quiet)
    after = _snapshot(model, guide, opts)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert after[1][0] == before[1][0] == "{}"  # Adam never stepped
    if local:  # RowAdam's state, made by the inner update, is put back to its start: zeros
        assert all(not v.any() for st in opts.local.state.values() for v in st.values())
