"""ppl_vae.model, guides, nets: the Pyro programs, their densities, and SVI on them."""
from __future__ import annotations

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine

from ppl_vae import guides, likelihoods, nets, priors
from ppl_vae.batching import Batch
from ppl_vae.errors import UserError
from ppl_vae.model import VAEModel

from conftest import tiny_binary_data


def _bernoulli_model(L=3, D=12, hidden=(16,)):
    return VAEModel(nets.Decoder(L, hidden, D), likelihoods.Bernoulli(), priors.StandardNormal(L))


@pytest.mark.parametrize("subsample", [False, True])
def test_model_log_joint_matches_hand_computation(subsample):
    torch.manual_seed(0)
    N, L, D = 10, 3, 12
    model = _bernoulli_model(L, D)
    x_all = tiny_binary_data(N, D)
    idx = torch.tensor([1, 4, 7]) if subsample else torch.arange(N)
    batch = Batch(x_all[idx], idx, N)
    z = torch.randn(len(idx), L)
    tr = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(batch)
    with torch.no_grad():
        logits = model.decoder(z)
    hand = (torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
            + torch.distributions.Bernoulli(logits=logits).log_prob(batch.x).sum())
    scale = N / len(idx)
    torch.testing.assert_close(tr.log_prob_sum().detach(), scale * hand, rtol=1e-5, atol=1e-4)
    # the sites: z latent, x observed at the batch's pixels, both scaled by N/B
    assert torch.equal(tr.nodes["x"]["value"], batch.x) and tr.nodes["x"]["is_observed"]
    assert tr.nodes["z"]["scale"] == pytest.approx(scale)
    assert tr.nodes["x"]["scale"] == pytest.approx(scale)
    assert tr.nodes["data"]["value"].tolist() == idx.tolist()


def test_model_with_mixture_prior_log_joint():
    torch.manual_seed(0)
    N, L, D = 6, 2, 5
    prior = priors.MixtureOfGaussians(L, num_components=3, seed=4)
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([0.2, -1.0, 0.5]))
        prior.raw_scales.copy_(torch.randn(3, L))
    model = VAEModel(nets.Decoder(L, (8,), D), likelihoods.Bernoulli(), prior)
    x = tiny_binary_data(N, D)
    batch = Batch(x, torch.arange(N), N)
    z = torch.randn(N, L) * 2
    tr = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(batch)
    tr.compute_log_prob()
    pi = torch.softmax(prior.logits.detach(), 0)
    sd = F.softplus(prior.raw_scales.detach()) + 1e-4
    comp = torch.distributions.Normal(prior.locs.detach(), sd).log_prob(z[:, None, :]).sum(-1)  # [N, C]
    log_pz = torch.logsumexp(pi.log() + comp, -1)
    torch.testing.assert_close(tr.nodes["z"]["unscaled_log_prob"].detach(), log_pz, rtol=1e-5, atol=1e-5)


def test_nets_shapes_and_positive_scale():
    enc = nets.Encoder(12, (16, 8), 3)
    loc, scale = enc(torch.rand(5, 12))
    assert loc.shape == scale.shape == (5, 3)
    assert (scale > 0).all()
    dec = nets.Decoder(3, (8, 16), 12)
    assert dec(torch.randn(2, 4, 3)).shape == (2, 4, 12)
    # mlp: Linear, ReLU, Linear, ReLU, Linear (no activation after the last layer)
    kinds = [type(m).__name__ for m in nets.mlp([3, 8, 16, 12])]
    assert kinds == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]


# ---------------------------------------------------------------------------------------
# guides
# ---------------------------------------------------------------------------------------
def test_amortized_guide_density():
    torch.manual_seed(0)
    enc = nets.Encoder(12, (16,), 3)
    guide = guides.AmortizedNormal(enc)
    x = tiny_binary_data(10, 12)
    batch = Batch(x[[2, 5]], torch.tensor([2, 5]), 10)
    tr = poutine.trace(guide).get_trace(batch)
    tr.compute_log_prob()
    loc, scale = enc(batch.x)
    z = tr.nodes["z"]["value"]
    expected = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    torch.testing.assert_close(tr.nodes["z"]["unscaled_log_prob"], expected)
    assert tr.nodes["z"]["scale"] == pytest.approx(5.0)
    torch.testing.assert_close(tr.nodes["z"]["log_prob"], 5.0 * expected)
    torch.testing.assert_close(guide.loc_scale(batch)[0], loc)


@pytest.mark.parametrize("sparse", [True, False])
def test_local_guide_reads_the_batch_rows(sparse):
    """Rows are indexed by dataset index (not by position in the batch: Pyro issue 238)."""
    N, L = 8, 2
    guide = guides.LocalNormal(N, L, sparse=sparse)
    loc = torch.arange(N * L, dtype=torch.float32).reshape(N, L)
    guide.set_rows(torch.arange(N), loc, torch.full((N, L), 1e-3))
    idx = torch.tensor([6, 1, 3])
    batch = Batch(torch.zeros(3, 4), idx, N)
    z = poutine.trace(guide).get_trace(batch).nodes["z"]["value"]
    torch.testing.assert_close(z, loc[idx], atol=0.01, rtol=0)
    got_loc, got_scale = guide.loc_scale(batch)
    torch.testing.assert_close(got_loc, loc[idx])
    torch.testing.assert_close(got_scale, torch.full((3, L), 1e-3), atol=1e-6, rtol=1e-4)


def test_local_guide_initial_scale_and_set_rows_roundtrip():
    guide = guides.LocalNormal(5, 3, init_scale=0.7)
    loc, scale = guide.rows(torch.arange(5))
    torch.testing.assert_close(loc, torch.zeros(5, 3))
    torch.testing.assert_close(scale, torch.full((5, 3), 0.7), atol=2e-5, rtol=0)
    new_scale = torch.tensor([[0.01, 0.5, 3.0], [1e-3, 1.0, 20.0]])
    guide.set_rows(torch.tensor([4, 0]), torch.ones(2, 3), new_scale)
    loc, scale = guide.rows(torch.tensor([4, 0]))
    torch.testing.assert_close(scale, new_scale, rtol=1e-4, atol=1e-6)
    assert torch.equal(guide.rows(torch.tensor([1]))[0], torch.zeros(1, 3))  # untouched row


def test_local_guide_refuses_batch_sized_plate():
    guide = guides.LocalNormal(10, 2)
    bad = Batch(torch.zeros(4, 3), torch.arange(4), 4)  # plate of the batch's size
    with pytest.raises(UserError, match="10 rows") as e:
        guide(bad)
    assert "\n" not in str(e.value)


def test_local_guide_sparse_gradient_touches_only_batch_rows():
    guide = guides.LocalNormal(20, 2, sparse=True)
    loc, scale = guide.rows(torch.tensor([3, 3, 9]))
    (loc.sum() + scale.sum()).backward()
    g = guide.params.grad
    assert g.is_sparse
    rows = g.coalesce().indices()[0].tolist()
    assert sorted(rows) == [3, 9]
    dense = g.to_dense()
    assert torch.allclose(dense[3, :2], torch.full((2,), 2.0))  # row 3 used twice
    assert torch.allclose(dense[9, :2], torch.ones(2))


def test_local_guide_init_pca_gives_unit_variance_principal_scores():
    torch.manual_seed(0)
    N, D, L = 200, 10, 3
    basis = torch.linalg.qr(torch.randn(D, D))[0]
    x = torch.randn(N, D) * torch.tensor([5.0, 3.0, 2.0] + [0.1] * 7) @ basis.T + 3.0
    guide = guides.LocalNormal(N, L).init_pca(x, scale=0.5)
    loc, scale = guide.rows(torch.arange(N))
    torch.testing.assert_close(loc.std(0), torch.ones(L), atol=1e-4, rtol=0)
    torch.testing.assert_close(loc.mean(0), torch.zeros(L), atol=1e-4, rtol=0)
    torch.testing.assert_close(scale, torch.full((N, L), 0.5), atol=1e-4, rtol=0)
    # the scores are uncorrelated and span the top principal directions
    corr = torch.corrcoef(loc.T)
    torch.testing.assert_close(corr, torch.eye(L), atol=1e-3, rtol=0)
    centred = x - x.mean(0)
    proj = torch.linalg.lstsq(loc, centred).solution  # reconstruct data from scores
    explained = 1 - ((centred - loc @ proj) ** 2).sum() / (centred ** 2).sum()
    assert explained > 0.99


# ---------------------------------------------------------------------------------------
# the canonical Pyro SVI loop on our programs
# ---------------------------------------------------------------------------------------
def _svi_losses(model, guide, x, steps=150, lr=0.03, batch_size=16, seed=0):
    pyro.set_rng_seed(seed)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": lr}), pyro.infer.Trace_ELBO())
    N = len(x)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randperm(N, generator=g)[:batch_size]
        losses.append(svi.step(Batch(x[idx], idx, N)))
    return torch.tensor(losses)


def test_svi_trains_amortized_guide():
    torch.manual_seed(0)
    x = tiny_binary_data(64, 12)
    model = _bernoulli_model(2, 12, (16,))
    guide = guides.AmortizedNormal(nets.Encoder(12, (16,), 2))
    losses = _svi_losses(model, guide, x)
    assert losses[-30:].mean() < 0.8 * losses[:10].mean()
    # SVI really trained our modules: their parameters are the param store's
    store = pyro.get_param_store()
    assert any(name.startswith("decoder$$$") for name in store.keys())
    assert any(name.startswith("encoder$$$") for name in store.keys())
    assert store["encoder$$$net.0.weight"] is guide.encoder.net[0].weight


def test_svi_trains_local_guide_dense():
    torch.manual_seed(0)
    x = tiny_binary_data(64, 12)
    model = _bernoulli_model(2, 12, (16,))
    guide = guides.LocalNormal(64, 2, sparse=False)
    before = guide.params.detach().clone()
    losses = _svi_losses(model, guide, x, lr=0.05)
    assert losses[-30:].mean() < 0.8 * losses[:10].mean()
    assert not torch.equal(before, guide.params.detach())


# ---------------------------------------------------------------------------------------
# the inverse-autoregressive-flow guide
# ---------------------------------------------------------------------------------------
def _iaf(D=3, L=2, seed=0):
    torch.manual_seed(seed)
    guide = guides.AmortizedIAF(nets.Encoder(D, (8,), L), num_flows=2)
    with torch.no_grad():  # make the flows visibly non-trivial
        for p in guide.flows.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return guide


def test_iaf_log_density_is_the_change_of_variables():
    guide = _iaf()
    x = torch.randn(5, 3)
    with torch.no_grad():
        loc, scale = guide.encoder(x)
        base = torch.distributions.Normal(loc, scale)
        eps = base.sample()
        y, log_det = eps, torch.zeros(5)
        for f in guide.flows:
            y_next = f(y)
            log_det = log_det + f.log_abs_det_jacobian(y, y_next)
            y = y_next
        hand = base.log_prob(eps).sum(-1) - log_det
        # a fresh tensor: the distribution must invert the flows, not read a cache
        got = guide.distribution(x).log_prob(y.clone())
    torch.testing.assert_close(got, hand, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(hand, base.log_prob(y).sum(-1), atol=1e-2)  # the flows matter


def test_iaf_guide_is_a_normalized_density():
    """E_q[p(x, z) / q(z | x)] = p(x): importance sampling with the IAF guide recovers the
    exact log p(x) of a linear-Gaussian model (a wrong log q would shift it)."""
    from ppl_vae import objectives
    from conftest import full_batch, make_linear_gaussian

    from conftest import LinearGaussian

    base = make_linear_gaussian(L=2, D=3, seed=6)
    lg = LinearGaussian(0.4 * base.W.float(), base.b.float(), 0.5)  # a broad posterior
    x = lg.sample(4, seed=6)
    guide = _iaf()
    with torch.no_grad():  # base Normal N(0, 1.2^2) for every x: wider than the posterior
        last = guide.encoder.net[-1]
        last.weight.zero_()
        last.bias[:2] = 0.0
        last.bias[2:] = math.log(math.expm1(1.2))
    K = 20000
    lw = objectives.log_weights(lg.model, guide, full_batch(x), K).total.detach().double()
    w = (lw - lw.max(0).values).exp()
    se = (w.var(0) / (K * w.mean(0) ** 2)).sqrt()
    est = torch.logsumexp(lw, 0) - math.log(K)
    assert ((est - lg.log_px(x)).abs() < 5 * se + 0.01).all(), (est, lg.log_px(x), se)
    assert (lw.mean(0) < lg.log_px(x)).all()  # and its ELBO is below log p(x)
    # the guide's loc_scale is its base Normal
    loc, _ = guide.loc_scale(full_batch(x))
    torch.testing.assert_close(loc, guide.encoder(x)[0])


def test_pyro_predictive_gives_posterior_predictive_draws_not_the_data():
    """The model leaves x unobserved under posterior_predictive: x are draws from p(x | z) at
    the guide's z (they differ from the data and from draw to draw, and their mean matches
    the likelihood's mean at those z), where Predictive on the model itself hands back x."""
    import pyro
    from pyro.infer import Predictive

    from ppl_vae import guides, likelihoods, nets, priors
    from ppl_vae.batching import Batch
    from ppl_vae.model import VAEModel, posterior_predictive

    pyro.set_rng_seed(0)
    model = VAEModel(nets.Decoder(3, [16], 12), likelihoods.Bernoulli(), priors.StandardNormal(3))
    guide = guides.AmortizedNormal(nets.Encoder(12, [16], 3))
    x = torch.bernoulli(torch.full((5, 12), 0.5))
    batch = Batch(x, torch.arange(5), 5)
    observed = Predictive(model, guide=guide, num_samples=2, return_sites=("x",))(batch)["x"]
    assert torch.equal(observed[0], x)  # the trap: the observed site returns the data
    draws = posterior_predictive(model, guide, batch, num_samples=400)
    assert draws["x"].shape == (400, 5, 12) and draws["z"].shape == (400, 5, 3)
    assert not torch.equal(draws["x"][0], x) and not torch.equal(draws["x"][0], draws["x"][1])
    assert set(draws["x"].unique().tolist()) <= {0.0, 1.0}
    probs = model.likelihood(model.decoder(draws["z"])).mean
    assert (draws["x"].mean(0) - probs.mean(0)).abs().max() < 0.15  # x ~ p(x | z)
    mean_images = posterior_predictive(model, guide, batch, num_samples=3, means=True)["x"]
    assert ((mean_images > 0) & (mean_images < 1)).all()
