"""The compiled objective computes the eager objective's loss and gradients, and refuses what it
cannot trace."""
from __future__ import annotations

import warnings

import pyro
import pytest
import torch

from conftest import SEED, tiny_binary_data
from ppl_vae import guides, nets, objectives, optim, train
from ppl_vae.compiled import Compiled
from ppl_vae.config import Config
from ppl_vae.data import Batch
from ppl_vae.errors import UserError
from ppl_vae.likelihoods import Bernoulli
from ppl_vae.model import VAEModel
from ppl_vae.priors import StandardNormal

N, D, L, B = 40, 12, 3, 8


def _setup():
    torch.manual_seed(SEED)
    model = VAEModel(nets.Decoder(L, [16], D), Bernoulli(), StandardNormal(L))
    guide = guides.AmortizedNormal(nets.Encoder(D, [16], L))
    x = tiny_binary_data(N, D)
    idx = torch.arange(3, 3 + B)
    return model, guide, Batch(x[idx], idx, N)


def _loss_and_grads(objective, model, guide, batch, seed):
    params = list(model.parameters()) + list(guide.parameters())
    pyro.set_rng_seed(seed)
    loss = objective(model, guide, batch)
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("objective", [objectives.ELBO(), objectives.IWAE(4)],
                         ids=["elbo", "iwae4"])
def test_compiled_loss_and_gradients_equal_the_eager_ones(objective):
    model, guide, batch = _setup()
    compiled = Compiled(objective)
    first = _loss_and_grads(compiled, model, guide, batch, SEED + 1)  # traces and compiles
    assert len(compiled._graphs) == 1
    eager = _loss_and_grads(objective, model, guide, batch, SEED + 2)
    replay = _loss_and_grads(compiled, model, guide, batch, SEED + 2)  # the compiled graph
    assert replay[0].item() != first[0].item()  # fresh noise each call
    torch.testing.assert_close(replay[0], eager[0], rtol=1e-5, atol=1e-4)
    for a, b in zip(replay[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # after an update the graph reads the new parameter values, not the ones it was traced with
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    moved_eager = _loss_and_grads(objective, model, guide, batch, SEED + 3)
    moved = _loss_and_grads(compiled, model, guide, batch, SEED + 3)
    torch.testing.assert_close(moved[0], moved_eager[0], rtol=1e-5, atol=1e-4)
    # a parameter replaced by another object (load code, a user's surgery) is the one read
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 2)
    swapped_eager = _loss_and_grads(objective, model, guide, batch, SEED + 4)
    swapped = _loss_and_grads(compiled, model, guide, batch, SEED + 4)
    torch.testing.assert_close(swapped[0], swapped_eager[0], rtol=1e-5, atol=1e-4)
    assert swapped[0].item() != pytest.approx(moved[0].item(), abs=1e-3)
    assert len(compiled._graphs) == 1


def test_compiled_training_steps_follow_the_eager_ones():
    """Ten Adam steps, compiled and eager from the same start and seed, end at the same place."""
    results = []
    for make in (lambda o: o, Compiled):
        model, guide, batch = _setup()
        opts = optim.make_optimizers(model, guide, 1e-2)
        objective = make(objectives.ELBO())
        pyro.set_rng_seed(SEED + 4)
        losses = [train.step(model, guide, objective, batch, opts).item() for _ in range(10)]
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (eager_losses, eager_params), (losses, params) = results
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    for a, b in zip(params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_compiled_refuses_a_per_datapoint_guide():
    model, _, batch = _setup()
    guide = guides.LocalNormal(N, L)
    with pytest.raises(ValueError, match="amortized guides only"):
        Compiled(objectives.ELBO())(model, guide, batch)


@pytest.mark.parametrize("changes, words", [
    (dict(guide="meanfield"), "meanfield"),
    (dict(guide="semiamortized"), "semiamortized"),
    (dict(objective="iwae", dreg=True), "DReG"),
])
def test_config_refuses_what_cannot_be_compiled(changes, words):
    with pytest.raises(UserError, match=words):
        Config(compile=True, **changes).validate()


def test_build_objective_wraps_only_when_asked():
    from ppl_vae.config import build_objective
    assert isinstance(build_objective(Config(compile=True)), Compiled)
    assert isinstance(build_objective(Config()), objectives.ELBO)


@pytest.mark.parametrize("local", [False, True], ids=["encoder", "local"])
def test_compiled_log_px_equals_the_eager_estimate(local):
    """Same seed, same noise (``fallback_random``): the compiled estimate is the eager one,
    with the encoder or a per-datapoint q* (as after test-time inference) as proposal."""
    from ppl_vae.evaluate import log_px
    model, guide, _ = _setup()
    x = tiny_binary_data(5, D, seed=1)
    if local:
        guide = guides.LocalNormal(len(x), L)
        guide.set_rows(torch.arange(len(x)), torch.randn(len(x), L), torch.rand(len(x), L) + 0.5)
    eager = log_px(model, guide, x, 64, max_rows=128, compile=False)  # 3 chunks of <= 2 rows
    compiled = log_px(model, guide, x, 64, max_rows=128, compile=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)


def test_a_failing_compiler_falls_back_to_eager_with_a_warning():
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    model, guide, batch = _setup()
    compiled = Compiled(objectives.ELBO(), backend=no_compiler)
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        loss = compiled(model, guide, batch)
    assert torch.isfinite(loss)
    pyro.set_rng_seed(SEED + 5)
    again = compiled(model, guide, batch)  # eager from now on, without another warning
    pyro.set_rng_seed(SEED + 5)
    torch.testing.assert_close(again, objectives.ELBO()(model, guide, batch))


def test_a_program_that_branches_on_data_runs_eagerly_with_a_warning():
    """make_fx cannot trace ``if tensor:``; the objective still works, eagerly."""
    def branching(model, guide, batch):
        loss = objectives.ELBO()(model, guide, batch)
        return loss if bool(batch.x.sum() > 0) else -loss

    model, guide, batch = _setup()
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        loss = Compiled(branching)(model, guide, batch)
    assert torch.isfinite(loss)


def test_compiled_takes_beta_as_a_graph_input():
    """KL warm-up compiles: beta is an input of the graph, so one graph serves every beta and
    each call's loss and gradients equal the eager objective's at that beta."""
    model, guide, batch = _setup()
    objective = objectives.ELBO()
    compiled = Compiled(objective)
    for i, beta in enumerate([0.0, 0.3, 1.0]):
        eager = _loss_and_grads(lambda m, g, b: objective(m, g, b, beta=beta), model, guide,
                                batch, SEED + 10 + i)
        graph = _loss_and_grads(lambda m, g, b: compiled(m, g, b, beta=beta), model, guide,
                                batch, SEED + 10 + i)
        torch.testing.assert_close(graph[0], eager[0], rtol=1e-5, atol=1e-4)
        for a, b in zip(graph[1], eager[1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert len(compiled._graphs) == 1
    assert Config(compile=True, warmup_epochs=2).validate().warmup_epochs == 2


def _params(model, guide):
    return list(model.parameters()) + list(guide.parameters())


@pytest.mark.parametrize("objective, kwargs, scale", [
    (objectives.ELBO(), {}, 1.0), (objectives.IWAE(4), {}, 1.0),
    (objectives.ELBO(), {"beta": 0.3}, 0.5)], ids=["elbo", "iwae4", "elbo-beta-scaled"])
def test_value_and_grad_equals_the_eager_loss_and_its_backward(objective, kwargs, scale):
    """The step's graph (forward and backward traced together) returns the eager loss, the
    gradients of scale * loss and a clear flag, on the same draws; nothing in .grad."""
    model, guide, batch = _setup()
    params = _params(model, guide)
    compiled = Compiled(objective)
    compiled.value_and_grad(model, guide, batch, params, scale=scale, **kwargs)  # compiles
    pyro.set_rng_seed(SEED + 20)
    loss = objective(model, guide, batch, **kwargs)
    eager = torch.autograd.grad(loss * scale, params)
    pyro.set_rng_seed(SEED + 20)
    got, flag, grads = compiled.value_and_grad(model, guide, batch, params, scale=scale, **kwargs)
    torch.testing.assert_close(got, loss.detach(), rtol=1e-5, atol=1e-4)
    assert not got.requires_grad and flag.item() == 0.0
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert all(p.grad is None for p in params)
    assert len(compiled._graphs) == 1


def test_value_and_grad_flags_a_non_finite_loss_or_gradient():
    model, guide, batch = _setup()
    params = _params(model, guide)
    compiled = Compiled(objectives.ELBO())
    _, flag, _ = compiled.value_and_grad(model, guide, batch, params)
    assert flag.item() == 0.0
    compiled.value_and_grad(model, guide, batch, params, check=False)  # both graphs traced
    with torch.no_grad():
        params[0][0, 0] = float("inf")  # the decoder's first weight: loss and gradients blow up
    _, flag, _ = compiled.value_and_grad(model, guide, batch, params)
    assert flag.item() == 1.0
    _, unchecked, _ = compiled.value_and_grad(model, guide, batch, params, check=False)
    assert unchecked.item() == 0.0  # no check asked, none made


def test_a_guarded_compiled_step_applies_nothing_from_a_non_finite_batch():
    """The training loop's step through the one-graph path: a batch that makes the loss NaN
    leaves every parameter and Adam's state as they were (fused Adam skips on the flag)."""
    model, guide, batch = _setup()
    opts = optim.make_optimizers(model, guide, 1e-2)
    compiled = Compiled(objectives.ELBO())
    train.step_on_device(model, guide, compiled, batch, opts)  # Adam's state exists
    before = [p.detach().clone() for p in _params(model, guide)]
    state = {k: v.clone() for p in _params(model, guide) for k, v in opts.global_.state[p].items()}
    x = batch.x.clone()
    x[0, 0] = float("nan")
    loss, bad = train.step_on_device(model, guide, compiled, Batch(x, batch.idx, N), opts)
    assert bad.item() == 1.0 and not torch.isfinite(loss)
    for a, b in zip(_params(model, guide), before):
        assert torch.equal(a, b)
    after = {k: v for p in _params(model, guide) for k, v in opts.global_.state[p].items()}
    assert all(torch.equal(state[k], after[k]) for k in state)
    with pytest.raises(train.DivergenceError):
        train.step(model, guide, compiled, Batch(x, batch.idx, N), opts)


class _WithUnused(VAEModel):
    """A model with a parameter its program never reads."""

    def __init__(self):
        super().__init__(nets.Decoder(L, [16], D), Bernoulli(), StandardNormal(L))
        self.unused = torch.nn.Parameter(torch.ones(3))


def test_a_parameter_the_loss_does_not_use_gets_no_gradient_as_in_eager():
    """loss.backward() leaves an unused parameter's .grad None, so Adam neither moves it nor
    counts a step for it; the graph's gradient for it is None too, not zeros."""
    torch.manual_seed(SEED)
    model = _WithUnused()
    guide = guides.AmortizedNormal(nets.Encoder(D, [16], L))
    x = tiny_binary_data(N, D)
    batch = Batch(x[:B], torch.arange(B), N)
    compiled = Compiled(objectives.ELBO())
    _, _, grads = compiled.value_and_grad(model, guide, batch, _params(model, guide))
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in guide.named_parameters()]
    assert [n for n, g in zip(names, grads) if g is None] == ["unused"]
    opts = optim.make_optimizers(model, guide, 1e-2)
    train.step(model, guide, compiled, batch, opts)
    assert torch.equal(model.unused.detach(), torch.ones(3))
    assert model.unused not in opts.global_.state


def test_value_and_grad_answers_none_where_the_step_must_use_autograd():
    """A parameter that is not the program's (or no longer is), or a per-datapoint guide:
    None, and the step differentiates the objective instead, with the same result."""
    model, guide, batch = _setup()
    compiled = Compiled(objectives.ELBO())
    stray = torch.nn.Parameter(torch.zeros(2))
    assert compiled.value_and_grad(model, guide, batch, _params(model, guide) + [stray]) is None
    assert compiled.value_and_grad(model, guides.LocalNormal(N, L), batch, []) is None
    params = _params(model, guide)
    assert compiled.value_and_grad(model, guide, batch, params) is not None
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 2)  # params[0] is not read now
    assert compiled.value_and_grad(model, guide, batch, params) is None
    opts = optim.make_optimizers(model, guide, 1e-2)  # holds the new parameter: a new graph
    assert compiled.value_and_grad(model, guide, batch, opts.networks()) is not None


def test_a_failing_compiler_in_the_step_warns_once_and_trains_eagerly():
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    results = []
    for objective in (objectives.ELBO(), Compiled(objectives.ELBO(), backend=no_compiler)):
        model, guide, batch = _setup()
        opts = optim.make_optimizers(model, guide, 1e-2)
        pyro.set_rng_seed(SEED + 6)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = [train.step(model, guide, objective, batch, opts).item() for _ in range(3)]
        results.append((losses, [str(w.message) for w in caught if w.category is RuntimeWarning]))
    (eager, none), (fallen_back, warned) = results
    assert fallen_back == eager and none == []
    assert len(warned) == 1 and "eagerly" in warned[0]
