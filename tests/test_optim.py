"""ppl_vae.optim: RowAdam is Adam, row by row, on the rows of a sparse gradient only."""
from __future__ import annotations

import pytest
import torch

from ppl_vae import guides, likelihoods, nets, objectives, optim, priors, step
from ppl_vae.batching import Batch
from ppl_vae.errors import UserError
from ppl_vae.model import VAEModel

from conftest import tiny_binary_data


def _sparse_rows(rows, values, shape):
    return torch.sparse_coo_tensor(torch.as_tensor(rows)[None], values, shape,
                                   check_invariants=True)


# RowAdam computes the bias corrections 1 - beta^t in float32 (torch.optim.Adam in Python
# floats): 1 - 0.999 carries a relative error ~1e-4, hence rtol 1e-4 in float32 comparisons.
def test_rowadam_single_row_matches_torch_adam():
    torch.manual_seed(0)
    N, C, row = 6, 4, 2
    table = torch.nn.Parameter(torch.randn(N, C))
    reference = torch.nn.Parameter(table.detach()[row].clone())
    untouched = table.detach().clone()
    opt = optim.RowAdam([table], lr=0.03, betas=(0.8, 0.99), eps=1e-6)
    ref_opt = torch.optim.Adam([reference], lr=0.03, betas=(0.8, 0.99), eps=1e-6)
    for t in range(12):
        g = torch.randn(C) * (1 + t)
        table.grad = _sparse_rows([row], g[None], (N, C))
        reference.grad = g.clone()
        opt.step()
        ref_opt.step()
        torch.testing.assert_close(table.detach()[row], reference.detach(), rtol=1e-4, atol=1e-5)
    others = [r for r in range(N) if r != row]
    assert torch.equal(table.detach()[others], untouched[others])  # bitwise unchanged
    assert opt.state[table]["steps"].tolist() == [0, 0, 12, 0, 0, 0]


def test_rowadam_bias_correction_counts_each_rows_own_steps():
    """A row first updated at step 6 gets Adam's first step (bias-corrected), not step 6's."""
    torch.manual_seed(1)
    N, C = 4, 3
    table = torch.nn.Parameter(torch.zeros(N, C))
    opt = optim.RowAdam([table], lr=0.1)
    late_ref = torch.nn.Parameter(torch.zeros(C))
    late_opt = torch.optim.Adam([late_ref], lr=0.1)
    for t in range(10):
        rows = [0] if t < 5 else [0, 3]
        g = torch.randn(len(rows), C)
        table.grad = _sparse_rows(rows, g, (N, C))
        opt.step()
        if t >= 5:
            late_ref.grad = g[1].clone()
            late_opt.step()
    torch.testing.assert_close(table.detach()[3], late_ref.detach(), rtol=1e-4, atol=1e-5)
    assert opt.state[table]["steps"].tolist() == [10, 0, 0, 5]
    # Adam's first step moves every coordinate by lr * sign(g) (up to eps)
    fresh = torch.nn.Parameter(torch.zeros(N, C))
    opt2 = optim.RowAdam([fresh], lr=0.1)
    g = torch.tensor([[0.5, -2.0, 1e-3]])
    fresh.grad = _sparse_rows([1], g, (N, C))
    opt2.step()
    torch.testing.assert_close(fresh.detach()[1], -0.1 * g[0].sign(), rtol=1e-4, atol=1e-5)


def test_rowadam_sums_duplicate_rows_like_an_embedding_gradient():
    torch.manual_seed(2)
    N, C = 5, 2
    table = torch.nn.Parameter(torch.zeros(N, C))
    ref = torch.nn.Parameter(torch.zeros(C))
    opt, ref_opt = optim.RowAdam([table], lr=0.05), torch.optim.Adam([ref], lr=0.05)
    for _ in range(4):
        g1, g2 = torch.randn(C), torch.randn(C)
        table.grad = _sparse_rows([1, 1], torch.stack([g1, g2]), (N, C))  # uncoalesced
        ref.grad = g1 + g2
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(table.detach()[1], ref.detach(), rtol=1e-4, atol=1e-5)


def test_rowadam_dense_gradient_is_plain_adam():
    torch.manual_seed(3)
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(a.detach().clone())
    oa, ob = optim.RowAdam([a], lr=0.02), torch.optim.Adam([b], lr=0.02)
    for _ in range(8):
        g = torch.randn(4, 3)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_rowadam_float64_table_matches_adam_exactly():
    torch.manual_seed(3)
    a = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    oa, ob = optim.RowAdam([a], lr=0.02), torch.optim.Adam([b], lr=0.02)
    for _ in range(8):
        g = torch.randn(4, 3, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _local_setup(N=40, D=12, L=2):
    torch.manual_seed(0)
    model = VAEModel(nets.Decoder(L, (16,), D), likelihoods.Bernoulli(), priors.StandardNormal(L))
    guide = guides.LocalNormal(N, L, sparse=True)
    guide.set_rows(torch.arange(N), torch.randn(N, L), torch.rand(N, L) + 0.5)
    return model, guide, tiny_binary_data(N, D)


@pytest.mark.parametrize("inner_steps", [0, 3])
def test_train_step_updates_only_the_batch_rows(inner_steps):
    model, guide, x = _local_setup()
    opts = optim.make_optimizers(model, guide, lr=1e-2, local_lr=0.05, inner_steps=inner_steps)
    assert isinstance(opts.local, optim.RowAdam) and isinstance(opts.global_, torch.optim.Adam)
    assert opts.inner_steps == inner_steps
    # the table is not in the network optimizer; the decoder is
    global_params = [p for g in opts.global_.param_groups for p in g["params"]]
    assert all(p is not guide.params for p in global_params)
    assert len(global_params) == len(list(model.parameters()))
    before_table = guide.params.detach().clone()
    before_model = [p.detach().clone() for p in model.parameters()]
    idx = torch.tensor([3, 17, 8, 31, 0])
    loss = step.step(model, guide, objectives.ELBO(), Batch(x[idx], idx, len(x)), opts)
    assert torch.isfinite(loss)
    after = guide.params.detach()
    others = torch.ones(len(x), dtype=torch.bool)
    others[idx] = False
    assert torch.equal(after[others], before_table[others])  # bitwise unchanged
    assert (after[idx] != before_table[idx]).all()
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before_model, model.parameters()))
    steps = opts.local.state[guide.params]["steps"]
    assert steps[idx].tolist() == [inner_steps + 1] * len(idx)
    assert float(steps[others].sum()) == 0.0


def test_inner_steps_only_move_the_table():
    """With inner steps, the joint step's model update is still a single Adam step."""
    model, guide, x = _local_setup()
    opts = optim.make_optimizers(model, guide, lr=1e-2, local_lr=0.05, inner_steps=4)
    idx = torch.arange(10)
    step.step(model, guide, objectives.ELBO(), Batch(x[idx], idx, len(x)), opts)
    for p in model.parameters():
        assert int(opts.global_.state[p]["step"]) == 1


def test_rowadam_training_lowers_the_loss_of_the_batch_rows():
    model, guide, x = _local_setup()
    opts = optim.make_optimizers(model, guide, lr=1e-2, local_lr=0.1, inner_steps=0)
    idx = torch.arange(len(x))
    batch = Batch(x, idx, len(x))
    elbo = objectives.AnalyticKLELBO(32)
    with torch.no_grad():
        first = float(elbo(model, guide, batch))
    for _ in range(60):
        step.step(model, guide, objectives.ELBO(), batch, opts)
    with torch.no_grad():
        last = float(elbo(model, guide, batch))
    assert last < first - 0.1 * abs(first)


def test_make_optimizers_amortized_has_no_table_optimizer():
    torch.manual_seed(0)
    model = VAEModel(nets.Decoder(2, (8,), 5), likelihoods.Bernoulli(), priors.StandardNormal(2))
    guide = guides.AmortizedNormal(nets.Encoder(5, (8,), 2))
    opts = optim.make_optimizers(model, guide, lr=1e-3, local_lr=0.5, inner_steps=3)
    assert opts.local is None and opts.inner_steps == 0
    params = [p for g in opts.global_.param_groups for p in g["params"]]
    expected = list(model.parameters()) + list(guide.parameters())
    assert len(params) == len(expected) and all(any(p is q for q in params) for p in expected)
    assert opts.global_.param_groups[0]["lr"] == 1e-3


# ---------------------------------------------------------------------------------------
# Adam's epsilon
# ---------------------------------------------------------------------------------------
def test_an_adam_eps_that_float32_cannot_hold_is_one_line(tmp_path, capsys, cached_mnist):
    """``--adam-eps 1e-300`` rounds to 0 in float32: the first step divided 0 by 0 for every
    weight whose gradient is 0 and a 120-line Pyro traceback followed. Now: one line naming
    the setting and a value that works, exit code 2, nothing trained."""
    from helpers import TINY, assert_one_error_line, call
    code, out, err = call(capsys, "train", *TINY, "--adam-eps", "1e-300", "--out",
                          tmp_path / "r")
    assert_one_error_line(code, err, out)
    assert "--adam-eps 1e-300" in err and "1e-8" in err


def test_check_adam_eps_takes_the_smallest_normal_float():
    optim.check_adam_eps(1e-8)
    optim.check_adam_eps(float(torch.finfo(torch.float32).tiny))
    optim.check_adam_eps(1e-300, torch.float64)
    for eps in (1e-300, 1e-40, 0.0, -1.0, float("nan")):
        with pytest.raises(UserError, match="adam_eps"):
            optim.check_adam_eps(eps)
    with pytest.raises(UserError, match="adam_eps"):  # at the source, for library callers
        optim.adam([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, eps=1e-300)
