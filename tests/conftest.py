"""Shared fixtures, the small models, guides and splits several test files use, and a
linear-Gaussian model whose every quantity has a closed form.

Linear-Gaussian model with prior N(0, I_L):

    z ~ N(0, I),   x | z ~ N(W z + b, sigma^2 I_D)
    => x ~ N(b, W W^T + sigma^2 I)                                   (exact marginal)
    => z | x ~ N(mu, Lambda^{-1}),  Lambda = I + W^T W / sigma^2,
                                    mu = Lambda^{-1} W^T (x - b) / sigma^2

The diagonal Gaussian q maximizing the ELBO (minimizing KL(q || p(z|x))) has the exact
posterior mean and variances 1 / diag(Lambda). For q = N(m, diag s^2) the ELBO is

    E_q log p(x|z) = -D/2 log(2 pi sigma^2)
                     - (||x - W m - b||^2 + sum_j s_j^2 ||W_:j||^2) / (2 sigma^2)
    KL(q || p)     = 1/2 sum_j (m_j^2 + s_j^2 - 1 - log s_j^2)
"""
from __future__ import annotations

import math
import os
import random

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn

from ppl_vae import data, families, guides, likelihoods, nets, objectives, optim, priors
from ppl_vae.batching import Batch
from ppl_vae.config import Config
from ppl_vae.guides import LocalNormal
from ppl_vae.likelihoods import Likelihood
from ppl_vae.model import VAEModel, data_plate
from ppl_vae.priors import StandardNormal

from helpers import trained_copy


if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each
    torch.set_num_threads(1)

# PPL_VAE_TEST_SEED re-runs the suite under other seeds (to check that Monte Carlo
# tolerances are not passing by luck); the default suite uses 0.
SEED = int(os.environ.get("PPL_VAE_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _fresh_state():
    """Every test starts with an empty param store and seeded RNGs."""
    pyro.clear_param_store()
    pyro.set_rng_seed(SEED)  # torch, numpy and random
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    random.seed(SEED)
    yield
    pyro.clear_param_store()


# ----------------------------------------------------------------------------------------
# linear-Gaussian model
# ----------------------------------------------------------------------------------------
class FixedNormal(Likelihood):
    """p(x | out) = N(out, sigma^2 I) with a fixed, known sigma."""

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = float(sigma)

    def forward(self, out):
        return dist.Normal(out, self.sigma).to_event(1)


class LinearGaussian:
    """A ``VAEModel`` with a linear decoder and its closed forms (computed in float64)."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor, sigma: float):
        D, L = W.shape
        self.D, self.L, self.sigma = D, L, float(sigma)
        self.W, self.b = W.double(), b.double()
        decoder = nn.Linear(L, D)
        with torch.no_grad():
            decoder.weight.copy_(W)
            decoder.bias.copy_(b)
        decoder.latent_dim = L
        self.model = VAEModel(decoder, FixedNormal(sigma), StandardNormal(L))

    # data ---------------------------------------------------------------------------
    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.L, generator=g, dtype=torch.float64)
        eps = torch.randn(n, self.D, generator=g, dtype=torch.float64)
        return (z @ self.W.T + self.b + self.sigma * eps).float()

    # closed forms ------------------------------------------------------------------
    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + self.sigma ** 2 * torch.eye(self.D, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x.double())

    def precision(self) -> torch.Tensor:
        return torch.eye(self.L, dtype=torch.float64) + self.W.T @ self.W / self.sigma ** 2

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        rhs = (x.double() - self.b) @ self.W / self.sigma ** 2  # [N, L]
        return torch.linalg.solve(self.precision(), rhs.T).T

    def optimal_meanfield(self, x: torch.Tensor):
        """(loc [N, L], scale [N, L]) of the ELBO-optimal diagonal Gaussian."""
        loc = self.posterior_mean(x)
        scale = (1.0 / torch.diagonal(self.precision())).sqrt().expand_as(loc)
        return loc, scale

    def expected_log_lik(self, x, m, s) -> torch.Tensor:
        x, m, s = x.double(), m.double(), s.double()
        resid = x - m @ self.W.T - self.b
        col_sq = (self.W ** 2).sum(0)  # ||W_:j||^2
        quad = (resid ** 2).sum(-1) + (s ** 2 * col_sq).sum(-1)
        return -0.5 * self.D * math.log(2 * math.pi * self.sigma ** 2) - quad / (2 * self.sigma ** 2)

    @staticmethod
    def kl(m, s) -> torch.Tensor:
        m, s = m.double(), s.double()
        return 0.5 * (m ** 2 + s ** 2 - 1 - torch.log(s ** 2)).sum(-1)

    def elbo(self, x, m, s, beta: float = 1.0) -> torch.Tensor:
        """Closed-form per-datapoint ELBO of q = N(m, diag s^2) [N] (float64)."""
        return self.expected_log_lik(x, m, s) - beta * self.kl(m, s)


def make_linear_gaussian(L: int = 2, D: int = 3, sigma: float = 0.5, seed: int = 0,
                         orthogonal: bool = False) -> LinearGaussian:
    """A random linear-Gaussian model; ``orthogonal`` makes W's columns orthogonal, so the
    exact posterior is itself a diagonal Gaussian (the mean-field family contains it)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, L, generator=g)
    if orthogonal:
        q, _ = torch.linalg.qr(W)
        W = q[:, :L] * torch.linspace(0.8, 1.6, L)
    b = torch.randn(D, generator=g)
    return LinearGaussian(W, b, sigma)


def local_guide(loc: torch.Tensor, scale: torch.Tensor, sparse: bool = False) -> LocalNormal:
    """A per-datapoint guide whose rows are exactly N(loc_n, diag scale_n^2)."""
    guide = LocalNormal(loc.shape[0], loc.shape[1], sparse=sparse)
    guide.set_rows(torch.arange(loc.shape[0]), loc.float(), scale.float())
    return guide


def full_batch(x: torch.Tensor) -> Batch:
    return Batch(x, torch.arange(len(x)), len(x))


@pytest.fixture
def lingauss() -> LinearGaussian:
    return make_linear_gaussian()


# ----------------------------------------------------------------------------------------
# MNIST, loaded once per session
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mnist() -> data.Splits:
    return data.load("mnist")


@pytest.fixture
def cached_mnist(mnist, monkeypatch):
    """Make ``data.load('mnist')`` return the session's splits (saves ~1.5 s per run).

    Runs slice these tensors; ``test_a_run_does_not_write_into_the_loaded_splits`` in test_cli.py
    checks that nothing writes into them."""
    original = data.load

    def load(name="mnist", data_dir=None, valid_fraction=None, test_fraction=0.1):
        if name == "mnist" and data_dir is None and valid_fraction is None:
            return mnist
        return original(name, data_dir, valid_fraction, test_fraction)

    monkeypatch.setattr(data, "load", load)
    return mnist


def tiny_binary_data(n: int = 64, d: int = 12, seed: int = 0) -> torch.Tensor:
    """Binary data with structure: two prototype patterns with a few flipped bits."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(2, d, generator=g) < 0.5).float()
    which = torch.randint(0, 2, (n,), generator=g)
    flips = (torch.rand(n, d, generator=g) < 0.05).float()
    return (protos[which] + flips) % 2


class TableWithoutRows(torch.nn.Module):
    """A user's guide with a table it reads itself (no ``given_rows``): it cannot hand a
    tracer its rows, so its steps take autograd."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, batch):
        return self.table(batch)

    def local_parameters(self):
        return [self.table.params]


# ----------------------------------------------------------------------------------------
# a small model, guide and split for one step or a short fit (test_train, test_step,
# test_callbacks), a loss that is NaN, and a log that says nothing
# ----------------------------------------------------------------------------------------
def quiet(_msg):
    pass


def fit_setup(local: bool, n=96, d=12, L=2):
    torch.manual_seed(0)
    model = VAEModel(nets.Decoder(L, (16,), d), likelihoods.Bernoulli(), priors.StandardNormal(L))
    guide = guides.LocalNormal(n, L) if local else guides.AmortizedNormal(nets.Encoder(d, (16,), L))
    split = data.Split(tiny_binary_data(n, d), torch.zeros(n, dtype=torch.long))
    opts = optim.make_optimizers(model, guide, lr=0.01, local_lr=0.05, inner_steps=1)
    return model, guide, split, opts


class NaNLoss:
    beta = 1.0

    def __call__(self, model, guide, batch):
        return objectives.ELBO()(model, guide, batch) * float("nan")


# ----------------------------------------------------------------------------------------
# a user's own guides, not derived from the library's (test_guides, test_protocol,
# test_families)
# ----------------------------------------------------------------------------------------
USER_N, USER_D, USER_L = 96, 12, 2  # the rows, pixels and latent size of the guides below


def user_model():
    torch.manual_seed(SEED)
    return VAEModel(nets.Decoder(USER_L, (16,), USER_D), likelihoods.Bernoulli(),
                    priors.StandardNormal(USER_L))


def user_split():
    return data.Split(tiny_binary_data(USER_N, USER_D), torch.zeros(USER_N, dtype=torch.long))


class MyEncoderGuide(nn.Module):
    """A user's guide: an nn.Module with the model's signature, not derived from ours."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(USER_D, 2 * USER_L)

    def forward(self, batch):
        pyro.module("my_encoder", self)
        with data_plate(batch):
            loc, raw = self.net(batch.x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


def my_function_guide(batch):
    """A user's guide as a plain function keeping its parameters in Pyro's param store."""
    w = pyro.param("w", lambda: torch.zeros(USER_D, 2 * USER_L))
    with data_plate(batch):
        loc, raw = (batch.x @ w).chunk(2, -1)
        pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


class FullCovarianceGuide(nn.Module):
    """A user's amortized guide: q(z | x) = N(mu(x), L(x) L(x)^T), and it says so."""

    def __init__(self, D, L):
        super().__init__()
        self.L = L
        self.net = nn.Linear(D, families.FULL.width(L))

    def local_family(self):
        return "full"

    def forward(self, batch):
        pyro.module("full_encoder", self)
        with data_plate(batch):
            pyro.sample("z", families.FULL.dist(self.net(batch.x)))


# a split of uniform pixels with its row indices as labels (test_batching, test_data)
def random_split(n=103, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return data.Split(torch.rand(n, d, generator=g), torch.arange(n))


# ----------------------------------------------------------------------------------------
# the toy run: tiny networks, 2 steps per epoch on 100 MNIST rows (``helpers.TINY`` is the
# same run on the command line); a test that needs other sizes writes ``TOY.replace(...)``
# ----------------------------------------------------------------------------------------
TOY = Config(train_size=100, valid_size=20, test_size=20, epochs=1, hidden=(16,), latent_dim=3,
             batch_size=50, device="cpu", seed=3)


@pytest.fixture
def toy_config() -> Config:
    return TOY


@pytest.fixture
def finished_run(tmp_path, tmp_path_factory, cached_mnist, capsys):
    """A finished 2-epoch tiny run of the CLI (its own copy per test)."""
    return trained_copy(tmp_path_factory, capsys, tmp_path / "run", 2)


@pytest.fixture
def evaluated(tmp_path, tmp_path_factory, cached_mnist, capsys):
    """A finished 2-epoch run, evaluated (its own copy per test)."""
    return trained_copy(tmp_path_factory, capsys, tmp_path / "run", 2, evaluate=True)


@pytest.fixture
def evaluated_run(tmp_path, tmp_path_factory, cached_mnist, capsys):
    """A finished 3-epoch run, evaluated (eval.json and figures; its own copy per test)."""
    return trained_copy(tmp_path_factory, capsys, tmp_path / "run3", 3, evaluate=True)


@pytest.fixture(autouse=True)
def _sigint_handler_restored():
    """Every test leaves Ctrl-C's handler as it found it (a handler left behind would turn a
    later test's Ctrl-C into a flag instead of KeyboardInterrupt)."""
    import signal
    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        if after is not signal.default_int_handler:  # a test may ask for Python's own
            pytest.fail(f"the test left SIGINT's handler changed: {after!r}")
