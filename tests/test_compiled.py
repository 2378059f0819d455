"""The compiled objective computes the eager objective's loss and gradients, and refuses what it
cannot trace."""
from __future__ import annotations

import warnings

import pyro
import pytest
import torch

from conftest import SEED, TableWithoutRows, make_linear_gaussian, tiny_binary_data
from ppl_vae import compiled, evaluate, guides, local_fit, nets, objectives, optim, step
from ppl_vae.protocol import as_guide
from ppl_vae.batching import Batch
from ppl_vae.compiled import Compiled
from ppl_vae.config import Config
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
        losses = [step.step(model, guide, objective, batch, opts).item() for _ in range(10)]
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (eager_losses, eager_params), (losses, params) = results
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    for a, b in zip(params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_a_compiled_loss_under_autograd_runs_a_table_eagerly():
    """A table's gradient is sparse: its compiled step returns the rows' gradients
    (``value_and_grad``); a compiled loss handed to autograd runs it eagerly, the same loss
    and the same sparse gradient, and compiles nothing."""
    model, _, batch = _setup()
    guide = guides.LocalNormal(N, L)
    compiled = Compiled(objectives.ELBO())
    pyro.set_rng_seed(SEED + 8)
    loss = compiled(model, guide, batch)
    (grad,) = torch.autograd.grad(loss, [guide.params])
    pyro.set_rng_seed(SEED + 8)
    eager = objectives.ELBO()(model, guide, batch)
    assert torch.equal(loss, eager) and grad.is_sparse and not compiled._graphs


@pytest.mark.parametrize("changes", [dict(guide="meanfield"), dict(guide="semiamortized"),
                                     dict(objective="iwae", dreg=True), dict(guide="iaf")],
                         ids=["meanfield", "semiamortized", "dreg", "iaf"])
def test_every_built_in_guide_and_objective_takes_compile_on(changes):
    assert Config(compile="on", **changes).validate().compile == "on"


def test_compile_takes_auto_on_or_off_and_old_configs_still_load():
    assert Config().compile == "auto"
    with pytest.raises(UserError, match="auto, on, off"):
        Config(compile="sometimes").validate()
    base = Config().to_dict()
    assert Config.from_dict({**base, "compile": True}).compile == "on"  # config.json before
    assert Config.from_dict({**base, "compile": False}).compile == "off"


def test_build_objective_compiles_as_the_mode_says():
    from ppl_vae.build import build_objective
    assert isinstance(build_objective(Config(compile="off")), objectives.ELBO)
    on = build_objective(Config(compile="on"))
    assert isinstance(on, Compiled) and on.chosen is True
    auto = build_objective(Config(epochs=7))
    assert isinstance(auto, Compiled) and auto.chosen is None and auto.auto.epochs == 7


def test_the_rule_of_compile_auto(monkeypatch):
    """auto compiles a compilable guide from PAYS_FROM_STEPS steps (and a budget from
    PAYS_FROM_SECONDS) when a compiler is present; without one it says so as a warning."""
    from ppl_vae import compiled as c
    encoder = guides.AmortizedNormal(nets.Encoder(D, [16], L))
    long = c.PAYS_FROM_STEPS
    monkeypatch.setattr(c, "has_compiler", lambda: True)
    assert c.choose("auto", encoder, long).compile
    assert c.choose("auto", guides.LocalNormal(N, L), long).compile
    assert not c.choose("auto", encoder, long - 1).compile
    assert not c.choose("auto", encoder, long, max_seconds=c.PAYS_FROM_SECONDS - 1).compile
    assert not c.choose("auto", as_guide(TableWithoutRows(guides.LocalNormal(N, L))), long).compile
    assert c.choose("on", encoder, 1).compile and not c.choose("off", encoder, long).compile
    monkeypatch.setattr(c, "has_compiler", lambda: False)
    none = c.choose("auto", encoder, long)
    assert not none.compile and none.warn and "no C++ compiler" in none.reason
    assert c.run_steps(3, 50_000, 128) == 3 * 391 and c.run_steps(3, 50_000, 128, 100) == 100


def test_compile_auto_compiles_a_long_runs_full_batches_only(monkeypatch, caplog):
    """A run long enough to repay the compile: its batches of the run's size run the graph;
    the short last batch of an epoch runs eagerly rather than pay a second compile."""
    from ppl_vae import compiled as c
    monkeypatch.setattr(c, "has_compiler", lambda: True)
    model, guide, batch = _setup()
    auto = Compiled(objectives.ELBO(), backend="eager", auto=c.Auto(epochs=1000, batch_size=B))
    params = _params(model, guide)
    with caplog.at_level("INFO", logger="ppl_vae"):
        assert auto.value_and_grad(model, guide, batch, params) is not None
    assert auto.chosen is True and "compile auto: the step is compiled" in caplog.text
    short = Batch(batch.x[:B - 3], batch.idx[:B - 3], N)
    assert auto.value_and_grad(model, guide, short, params) is None
    table = guides.LocalNormal(N, L)  # the step's eager fallback, through the same objective
    opts = optim.make_optimizers(model, table, 1e-2, 0.05, inner_steps=1)
    assert torch.isfinite(step.step(model, table, auto, short, opts))
    assert len(auto._graphs) == 1


def test_compile_auto_chooses_at_the_first_step_and_says_so(caplog):
    """A short run: auto chooses eager at its first step, logs one line, and the step is
    the eager step exactly (same draws, same numbers)."""
    from ppl_vae.compiled import Auto
    results = []
    for objective in (objectives.ELBO(), Compiled(objectives.ELBO(), auto=Auto(epochs=2))):
        model, guide, batch = _setup()
        opts = optim.make_optimizers(model, guide, 1e-2)
        pyro.set_rng_seed(SEED + 7)
        with caplog.at_level("INFO", logger="ppl_vae"):
            results.append([step.step(model, guide, objective, batch, opts).item()
                            for _ in range(3)])
    assert results[0] == results[1] and objective.chosen is False and not objective._graphs
    lines = [r.getMessage() for r in caplog.records if "compile auto" in r.getMessage()]
    assert lines == ["compile auto: eager, 10 steps would not repay the compile (it compiles "
                     "from 2000 steps and 120 s)"]


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
    assert Config(compile="on", warmup_epochs=2).validate().warmup_epochs == 2


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
    got, flag, grads, rows = compiled.value_and_grad(model, guide, batch, params, scale=scale,
                                                     **kwargs)
    torch.testing.assert_close(got, loss.detach(), rtol=1e-5, atol=1e-4)
    assert not got.requires_grad and flag.item() == 0.0 and rows == []
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert all(p.grad is None for p in params)
    assert len(compiled._graphs) == 1


def test_value_and_grad_flags_a_non_finite_loss_or_gradient():
    model, guide, batch = _setup()
    params = _params(model, guide)
    compiled = Compiled(objectives.ELBO())
    assert compiled.value_and_grad(model, guide, batch, params).flag.item() == 0.0
    compiled.value_and_grad(model, guide, batch, params, check=False)  # both graphs traced
    with torch.no_grad():
        params[0][0, 0] = float("inf")  # the decoder's first weight: loss and gradients blow up
    assert compiled.value_and_grad(model, guide, batch, params).flag.item() == 1.0
    unchecked = compiled.value_and_grad(model, guide, batch, params, check=False).flag
    assert unchecked.item() == 0.0  # no check asked, none made


def test_a_guarded_compiled_step_applies_nothing_from_a_non_finite_batch():
    """The training loop's step through the one-graph path: a batch that makes the loss NaN
    leaves every parameter and Adam's state as they were (fused Adam skips on the flag)."""
    model, guide, batch = _setup()
    opts = optim.make_optimizers(model, guide, 1e-2)
    compiled = Compiled(objectives.ELBO())
    step.step_on_device(model, guide, compiled, batch, opts)  # Adam's state exists
    before = [p.detach().clone() for p in _params(model, guide)]
    state = {k: v.clone() for p in _params(model, guide) for k, v in opts.global_.state[p].items()}
    x = batch.x.clone()
    x[0, 0] = float("nan")
    loss, bad = step.step_on_device(model, guide, compiled, Batch(x, batch.idx, N), opts)
    assert bad.item() == 1.0 and not torch.isfinite(loss)
    for a, b in zip(_params(model, guide), before):
        assert torch.equal(a, b)
    after = {k: v for p in _params(model, guide) for k, v in opts.global_.state[p].items()}
    assert all(torch.equal(state[k], after[k]) for k in state)
    with pytest.raises(step.DivergenceError):
        step.step(model, guide, compiled, Batch(x, batch.idx, N), opts)


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
    grads = compiled.value_and_grad(model, guide, batch, _params(model, guide)).grads
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in guide.named_parameters()]
    assert [n for n, g in zip(names, grads) if g is None] == ["unused"]
    opts = optim.make_optimizers(model, guide, 1e-2)
    step.step(model, guide, compiled, batch, opts)
    assert torch.equal(model.unused.detach(), torch.ones(3))
    assert model.unused not in opts.global_.state


def test_value_and_grad_answers_none_where_the_step_must_use_autograd():
    """A parameter that is not the program's (or no longer is), a table asked for as a
    parameter, or a guide with a table it cannot hand over as rows: None, and the step
    differentiates the objective instead, with the same result."""
    model, guide, batch = _setup()
    compiled = Compiled(objectives.ELBO())
    stray = torch.nn.Parameter(torch.zeros(2))
    assert compiled.value_and_grad(model, guide, batch, _params(model, guide) + [stray]) is None
    table = guides.LocalNormal(N, L)
    assert compiled.value_and_grad(model, table, batch, [table.params]) is None
    assert compiled.value_and_grad(model, as_guide(TableWithoutRows(table)), batch, []) is None
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
            losses = [step.step(model, guide, objective, batch, opts).item() for _ in range(3)]
        results.append((losses, [str(w.message) for w in caught if w.category is RuntimeWarning]))
    (eager, none), (fallen_back, warned) = results
    assert fallen_back == eager and none == []
    assert len(warned) == 1 and "eagerly" in warned[0]


# ---------------------------------------------------------------------------------------
# per-datapoint tables: the batch's rows are inputs of the graph, their gradients outputs
# ---------------------------------------------------------------------------------------
ROWS = torch.tensor([3, 5, 7, 5, 1, 9, 11, 2])  # row 5 drawn twice: its gradients add up


def _local_setup(inner_steps=2):
    torch.manual_seed(SEED)
    model = VAEModel(nets.Decoder(L, [16], D), Bernoulli(), StandardNormal(L))
    guide = guides.LocalNormal(N, L)
    guide.set_rows(torch.arange(N), torch.randn(N, L), torch.rand(N, L) + 0.5)
    opts = optim.make_optimizers(model, guide, 1e-2, 0.05, inner_steps=inner_steps)
    return model, guide, opts, tiny_binary_data(N, D)


def test_value_and_grad_gives_a_tables_batch_rows_their_eager_gradients():
    """The graph reads the batch's rows as an input and returns their gradients: summed over
    repeated rows they are the eager sparse gradient of the table, and the networks' are
    the eager ones; the table's .grad stays untouched."""
    model, guide, _, x = _local_setup()
    batch = Batch(x[ROWS], ROWS, N)
    params = list(model.parameters())
    compiled = Compiled(objectives.ELBO())
    compiled.value_and_grad(model, guide, batch, params)  # compiles
    pyro.set_rng_seed(SEED + 30)
    loss = objectives.ELBO()(model, guide, batch)
    *eager, table = torch.autograd.grad(loss, params + [guide.params])
    pyro.set_rng_seed(SEED + 30)
    out = compiled.value_and_grad(model, guide, batch, params)
    torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-5, atol=1e-4)
    for a, b in zip(out.grads, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    (rows,) = out.rows
    assert rows.shape == (len(ROWS), 2 * L) and out.flag.item() == 0.0
    summed = torch.zeros_like(guide.params).index_add_(0, ROWS, rows)
    torch.testing.assert_close(summed, table.to_dense(), rtol=1e-4, atol=1e-4)
    assert guide.params.grad is None


def test_compiled_per_datapoint_steps_follow_the_eager_ones():
    """Three steps of two local-only updates and a joint update each (both compiled), from
    the same start and seed: same losses, networks, table and RowAdam state as eager, and
    the rows no batch drew bitwise as they started."""
    results = []
    for make in (lambda o: o, Compiled):
        model, guide, opts, x = _local_setup(inner_steps=2)
        start = guide.params.detach().clone()
        objective = make(objectives.ELBO())
        pyro.set_rng_seed(SEED + 31)
        losses = [step.step(model, guide, objective, Batch(x[ROWS + i], ROWS + i, N),
                             opts).item() for i in range(3)]
        drawn = torch.zeros(N, dtype=torch.bool)
        drawn[torch.cat([ROWS + i for i in range(3)])] = True
        assert torch.equal(guide.params.detach()[~drawn], start[~drawn])
        state = opts.local.state[guide.params]
        assert float(state["steps"][~drawn].abs().sum()) == 0.0
        results.append((losses, guide.params.detach().clone(),
                        [p.detach().clone() for p in model.parameters()],
                        {k: v.clone() for k, v in state.items()}))
    (eager_losses, eager_table, eager_nets, eager_state), (losses, table, nets_, state) = results
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    torch.testing.assert_close(table, eager_table, rtol=1e-4, atol=1e-5)
    for a, b in zip(nets_, eager_nets):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for k in state:
        torch.testing.assert_close(state[k], eager_state[k], rtol=1e-4, atol=1e-6)


def test_a_guarded_compiled_per_datapoint_step_applies_nothing_from_a_non_finite_batch():
    """A NaN pixel makes the rows' gradients NaN in the first local-only update: the flag
    comes from the graph, RowAdam and fused Adam skip on it, and the rows the local-only
    updates moved are put back, so table, networks and every optimizer state stay bitwise
    as they were; the host-read step raises and leaves them as they were too."""
    model, guide, opts, x = _local_setup(inner_steps=2)
    compiled = Compiled(objectives.ELBO())
    step.step_on_device(model, guide, compiled, Batch(x[ROWS], ROWS, N), opts)  # states exist

    def snapshot():
        tensors = [guide.params, *model.parameters()]
        tensors += [v for p in tensors for v in opts.local.state.get(p, {}).values()]
        tensors += [v for p in model.parameters() for v in opts.global_.state[p].values()]
        return [t.detach().clone() for t in tensors]

    before = snapshot()
    bad_x = x[ROWS].clone()
    bad_x[2, 0] = float("nan")
    loss, bad = step.step_on_device(model, guide, compiled, Batch(bad_x, ROWS, N), opts)
    assert bad.item() == 1.0 and not torch.isfinite(loss)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(), before))
    with pytest.raises(step.DivergenceError):
        step.step(model, guide, compiled, Batch(bad_x, ROWS, N), opts)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(), before))


# ---------------------------------------------------------------------------------------
# semi-amortized: the refinement and its second-order terms traced into the step's graph
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop_gradient", [False, True], ids=["end-to-end", "stop-gradient"])
def test_compiled_semi_amortized_step_equals_the_eager_one(stop_gradient):
    """K refinement steps differentiated inside the program (create_graph) and the step's
    backward pass through them, in one graph: the eager training loss and gradients; a
    non-finite batch is flagged and changes nothing."""
    model, _, batch = _setup()
    guide = guides.SemiAmortizedNormal(nets.Encoder(D, [16], L), model, steps=2,
                                       stop_gradient=stop_gradient)
    params = _params(model, guide)
    compiled = Compiled(objectives.ELBO())
    compiled.value_and_grad(model, guide, batch, params)  # compiles
    pyro.set_rng_seed(SEED + 40)
    loss = guide.training_loss(objectives.ELBO(), model, batch)
    eager = torch.autograd.grad(loss, params)
    pyro.set_rng_seed(SEED + 40)
    out = compiled.value_and_grad(model, guide, batch, params)
    torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-5, atol=1e-4)
    assert out.flag.item() == 0.0
    for a, b in zip(out.grads, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    opts = optim.make_optimizers(model, guide, 1e-2)
    assert [id(p) for p in opts.networks()] == [id(p) for p in params]  # the same graph
    step.step_on_device(model, guide, compiled, batch, opts)
    before = [p.detach().clone() for p in params]
    x = batch.x.clone()
    x[0, 0] = float("nan")
    loss, bad = step.step_on_device(model, guide, compiled, Batch(x, batch.idx, N), opts)
    assert bad.item() == 1.0
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, params))


# ---------------------------------------------------------------------------------------
# every built-in guide, network and objective traces
# ---------------------------------------------------------------------------------------
SHAPE = (1, 4, 4)  # D = 16 pixels as an image, for the conv nets


def _mlp_model():
    return VAEModel(nets.Decoder(L, [16], 16), Bernoulli(), StandardNormal(L))


def _conv_model():
    return VAEModel(nets.ConvDecoder(L, [16], SHAPE), Bernoulli(), StandardNormal(L))


BREADTH = {
    "iaf-elbo": (_mlp_model, lambda m: guides.AmortizedIAF(nets.Encoder(16, [16], L)),
                 objectives.ELBO()),
    "conv-analytic_kl": (_conv_model, lambda m: guides.AmortizedNormal(
        nets.ConvEncoder(SHAPE, [16], L)), objectives.AnalyticKLELBO()),
    "conv-semiamortized-iwae": (_conv_model, lambda m: guides.SemiAmortizedNormal(
        nets.ConvEncoder(SHAPE, [16], L), m, steps=2), objectives.IWAE(3)),
    "amortized-dreg": (_mlp_model, lambda m: guides.AmortizedNormal(nets.Encoder(16, [16], L)),
                       objectives.IWAE(3, dreg=True)),
    "meanfield-dreg": (_mlp_model, lambda m: guides.LocalNormal(N, L),
                       objectives.IWAE(3, dreg=True)),
}


@pytest.mark.parametrize("name", list(BREADTH))
def test_every_guide_net_and_objective_traces_to_its_eager_step(name):
    """The traced step of each combination (DReG's gradient hook, the flows, the conv nets,
    the analytic KL, a table's rows) gives the eager loss and gradients. The graph runs on
    torch.compile's ``eager`` backend: what is tested is the trace (Inductor's kernels are
    tested above), at a fraction of the compile time."""
    torch.manual_seed(SEED)
    make_model, make_guide, objective = BREADTH[name]
    model = make_model()
    guide = make_guide(model)
    x = tiny_binary_data(N, 16)
    batch = Batch(x[ROWS], ROWS, N)
    tables = guide.local_parameters()
    params = [p for p in _params(model, guide) if all(p is not t for t in tables)]
    compiled = Compiled(objective, backend="eager")
    assert compiled.value_and_grad(model, guide, batch, params) is not None  # traces
    pyro.set_rng_seed(SEED + 50)
    loss = guide.training_loss(objective, model, batch)
    eager = torch.autograd.grad(loss, params + tables)
    pyro.set_rng_seed(SEED + 50)
    out = compiled.value_and_grad(model, guide, batch, params)
    torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-5, atol=1e-4)
    for a, b in zip(out.grads, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for rows, table, grad in zip(out.rows, tables, eager[len(params):]):
        summed = torch.zeros_like(table).index_add_(0, ROWS, rows)
        torch.testing.assert_close(summed, grad.to_dense(), rtol=1e-4, atol=1e-4)


class _TwinSync:
    """torchrun's ``GradSync`` as two processes that drew the same batch would see it: the
    loss scaled by 1/2, every network gradient summed (doubled) with the flag."""

    size = 2

    def reduce(self, params, flag):
        for p in params:
            p.grad = p.grad * 2 if p.grad is not None else torch.zeros_like(p)
        return flag * 2


def test_compiled_per_datapoint_steps_under_a_gradient_sync_follow_the_eager_ones():
    """Under torchrun the step scales its loss by 1 / world size in both the local-only and
    the joint graph and all-reduces the networks' gradients with the flag: same numbers as
    the eager step through the same sync."""
    results = []
    for make in (lambda o: o, Compiled):
        model, guide, opts, x = _local_setup(inner_steps=1)
        opts = opts._replace(sync=_TwinSync())
        objective = make(objectives.ELBO())
        pyro.set_rng_seed(SEED + 60)
        losses = [step.step(model, guide, objective, Batch(x[ROWS], ROWS, N), opts).item()
                  for _ in range(2)]
        results.append((losses, guide.params.detach().clone(),
                        [p.detach().clone() for p in model.parameters()]))
    (eager_losses, eager_table, eager_nets), (losses, table, nets_) = results
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    torch.testing.assert_close(table, eager_table, rtol=1e-4, atol=1e-5)
    for a, b in zip(nets_, eager_nets):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_compile_on_a_cpu_prints_no_cuda_runtime_note(monkeypatch, capfd, tmp_path, request):
    """Inductor's C++ build imports ``torch.utils.cpp_extension``, which on a machine with a
    CUDA toolkit (CUDA_HOME) but no usable GPU logs "No CUDA runtime is found" at every
    compile; a CPU compile shows no such note, and the objective still compiles."""
    import logging
    import sys

    import torch.utils
    old = sys.modules.pop("torch.utils.cpp_extension", None)  # imported afresh: it speaks
    if old is not None:
        monkeypatch.setattr(torch.utils, "cpp_extension", old)
        monkeypatch.setitem(sys.modules, "torch.utils.cpp_extension", old)
        del sys.modules["torch.utils.cpp_extension"]
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import torch._inductor.config as inductor_config
    # a build, not a cache hit; config.patch, not monkeypatch: monkeypatch's undo deletes the
    # setting from torch's config module, and every later compile in the process fails
    no_cache = inductor_config.patch(fx_graph_cache=False)
    no_cache.__enter__()
    request.addfinalizer(lambda: no_cache.__exit__(None, None, None))
    torch.manual_seed(SEED)
    d = 11  # a shape of this test's own
    model = VAEModel(nets.Decoder(2, [5], d), Bernoulli(), StandardNormal(2))
    guide = guides.AmortizedNormal(nets.Encoder(d, [5], 2))
    x = tiny_binary_data(6, d)
    compiled = Compiled(objectives.ELBO())
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            compiled(model, guide, Batch(x, torch.arange(6), 6))
    out, err = capfd.readouterr()
    assert "torch.utils.cpp_extension" in sys.modules  # the build did import it
    assert compiled._graphs and all(e[1] is not None for e in compiled._graphs.values())
    assert "No CUDA runtime" not in out + err
    assert not [w for w in caught if "No CUDA runtime" in str(w.message)]
    # only that note is dropped: the logger's other warnings still pass
    assert logging.getLogger("torch.utils.cpp_extension").filter(
        logging.makeLogRecord({"msg": "something else", "levelno": logging.WARNING}))


def test_compiling_still_works_after_the_cuda_note_test():
    """The note test leaves torch's Inductor config whole (a monkeypatch of it deleted
    fx_graph_cache, and every later compile in the worker failed)."""
    import torch._inductor.config as inductor_config
    assert isinstance(inductor_config.fx_graph_cache, bool)


# ---------------------------------------------------------------------------------------
# one rule decides compilation (the step, q*'s fit, log p(x)) from the one --compile setting
# ---------------------------------------------------------------------------------------
def test_the_rule_compiles_on_always_off_never_auto_from_its_threshold(monkeypatch):
    monkeypatch.setattr(compiled, "has_compiler", lambda: True)
    assert compiled.compiles("on", 0, 10) and not compiled.compiles("off", 10 ** 9, 10)
    assert compiled.compiles("auto", 10, 10) and not compiled.compiles("auto", 9, 10)
    assert [compiled.mode_of(c) for c in (None, True, False, "off")] == ["auto", "on", "off",
                                                                        "off"]
    monkeypatch.setattr(compiled, "has_compiler", lambda: False)
    assert not compiled.compiles("auto", 10 ** 9, 10) and compiled.compiles("on", 0, 10)
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        compiled.compiles("sometimes", 1, 1)


def _spy(monkeypatch):
    """Record where q*'s fit and log p(x) would compile (and run them eagerly)."""
    seen = []
    monkeypatch.setattr(compiled, "has_compiler", lambda: True)
    monkeypatch.setattr(compiled, "PAYS_FROM_LOCAL_ROWS", 1)
    monkeypatch.setattr(compiled, "PAYS_FROM_LOG_PX_ROWS", 1)
    monkeypatch.setattr(evaluate, "PAYS_FROM_LOG_PX_ROWS", 1)
    monkeypatch.setattr(local_fit._CompiledFit, "get",
                        classmethod(lambda cls, *a: seen.append("q*") or None))
    monkeypatch.setattr(evaluate, "Compiled", lambda fn: seen.append("log p(x)") or fn)
    return seen


@pytest.mark.parametrize("mode, compiled_pieces", [("off", []), ("auto", ["q*", "log p(x)"]),
                                                   ("on", ["q*", "log p(x)"])])
def test_compile_off_reaches_q_star_and_log_px(monkeypatch, mode, compiled_pieces):
    seen = _spy(monkeypatch)
    lg = make_linear_gaussian(seed=3)
    x = lg.sample(6, seed=1)
    guide = guides.AmortizedNormal(nets.Encoder(lg.D, (8,), lg.L))
    evaluate.evaluate_model(lg.model, guide, x, num_particles=4, local=True, progress=False,
                            proposal="local", local_options={"compile": mode, "max_steps": 4})
    assert sorted(set(seen)) == sorted(compiled_pieces)


def test_train_compile_off_compiles_nothing_anywhere(monkeypatch, tmp_path, cached_mnist):
    """From the command line: a mean-field run (q* fitted for validation, the test ELBO and
    its evaluation) with --compile off compiles no step, no fit of q* and no log p(x);
    the same run with --compile on compiles all three."""
    from ppl_vae import cli
    seen = _spy(monkeypatch)
    steps = []
    original = compiled.Compiled.__init__

    def init(self, objective, *a, **k):
        steps.append(type(objective).__name__)
        original(self, objective, *a, **k)
    monkeypatch.setattr(compiled.Compiled, "__init__", init)
    monkeypatch.setattr(compiled.Compiled, "value_and_grad", lambda *a, **k: None)  # eager
    base = ["train", "--guide", "meanfield", "--train-size", "200", "--valid-size", "20",
            "--test-size", "20", "--epochs", "1", "--hidden", "16", "--latent-dim", "2",
            "--batch-size", "100", "--no-progress"]
    assert cli.main(base + ["--compile", "off", "--out", str(tmp_path / "off")]) == 0
    assert cli.main(["evaluate", str(tmp_path / "off"), "--num-particles-eval", "3",
                     "--no-progress"]) == 0
    assert (seen, steps) == ([], [])
    assert cli.main(base + ["--compile", "on", "--out", str(tmp_path / "on")]) == 0
    assert cli.main(["evaluate", str(tmp_path / "on"), "--num-particles-eval", "3",
                     "--no-progress"]) == 0
    assert {"q*", "log p(x)"} <= set(seen) and steps


def test_local_inference_takes_the_mode_as_the_setting_names_it(monkeypatch):
    seen = _spy(monkeypatch)
    lg = make_linear_gaussian(seed=3)
    x = lg.sample(4, seed=1)
    for mode in ("off", "on", None, False, True):
        local_fit.local_inference(lg.model, x, max_steps=2, compile=mode)
    assert seen == ["q*", "q*", "q*"]  # on, auto (None: from 1 row here), True
    assert torch.isfinite(local_fit.local_inference(lg.model, x, max_steps=2).guide.params).all()
