"""The compiled objective computes the eager objective's loss and gradients, and refuses what it
cannot trace."""
from __future__ import annotations

import pyro
import pytest
import torch

from conftest import SEED, tiny_binary_data
from ppl_vae import data, guides, nets, objectives, optim, train
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
