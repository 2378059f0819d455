"""Held-out evaluation: ELBO, IWAE bounds, importance-sampled log p(x), rate/distortion, active
units, and test-time (local) inference of a per-datapoint q* with the decoder frozen.

Every quantity comes from ``objectives.log_weights``. Each estimate reseeds the RNG with
``seed`` so numbers are comparable between runs and between models.

References:
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders.
    Cremer, Li & Duvenaud (2018), Inference Suboptimality in Variational Autoencoders.
"""
from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple, Optional

import torch

from .data import Batch
from .guides import LocalNormal
from .objectives import ELBO, log_weights

Progress = Optional[Callable[[int], None]]  # called with the number of rows (or steps) done


class Estimate(NamedTuple):
    """A per-datapoint quantity summarized: mean over data and its standard error."""

    mean: float
    stderr: float

    @classmethod
    def of(cls, values: torch.Tensor) -> "Estimate":
        v = values.double()
        return cls(float(v.mean()), float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0)


def batches_of(x: torch.Tensor, batch_size: int):
    """Fixed-order minibatches over held-out rows; ``idx`` indexes ``x`` (and a local guide)."""
    n = len(x)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n), device=x.device)
        yield Batch(x[idx], idx, n)


@torch.no_grad()
def log_px(model, guide, x: torch.Tensor, num_particles: int = 5000, seed: int = 0,
           max_rows: int = 2 ** 16, progress: Progress = None) -> torch.Tensor:
    """Importance-sampled log p(x) per datapoint [N]: logsumexp_k lw_k - log K (IWAE_K).

    Vectorized over particles and data and chunked so that at most ``max_rows`` decoder rows
    are alive at once, whatever K. Unbiased for p(x), so a stochastic lower bound on log p(x).
    """
    torch.manual_seed(seed)
    batch_size = max(1, min(len(x), max_rows // min(num_particles, max_rows)))
    k_chunk = max(1, min(num_particles, max_rows // batch_size))
    out = []
    for batch in batches_of(x, batch_size):
        acc = torch.full((len(batch.idx),), -math.inf, device=x.device)
        for start in range(0, num_particles, k_chunk):
            k = min(k_chunk, num_particles - start)
            lw = log_weights(model, guide, batch, k).total  # [k, B]
            acc = torch.logaddexp(acc, torch.logsumexp(lw, 0))
        out.append(acc - math.log(num_particles))
        if progress:
            progress(len(batch.idx))
    return torch.cat(out)


class ELBOParts(NamedTuple):
    """Per-datapoint ELBO = -(distortion + rate), each [N]."""

    elbo: torch.Tensor  # [N]
    rate: torch.Tensor  # [N] KL(q || p), Monte Carlo: E_q[log q - log p(z)]
    distortion: torch.Tensor  # [N] -E_q[log p(x | z)]


@torch.no_grad()
def elbo_parts(model, guide, x: torch.Tensor, num_particles: int = 1, seed: int = 0,
               batch_size: int = 1000) -> ELBOParts:
    """The ELBO of ``guide`` on ``x`` split into rate and distortion, per datapoint."""
    torch.manual_seed(seed)
    rate, distortion = [], []
    for batch in batches_of(x, batch_size):
        lw = log_weights(model, guide, batch, num_particles)
        rate.append((lw.log_q - lw.log_prior).mean(0))
        distortion.append(-lw.log_lik.mean(0))
    rate, distortion = torch.cat(rate), torch.cat(distortion)
    return ELBOParts(-(rate + distortion), rate, distortion)


@torch.no_grad()
def posterior_means(guide, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """E_q[z | x] for every row [N, L]: the encoder's loc, or the local table's loc."""
    return torch.cat([guide.loc_scale(b)[0] for b in batches_of(x, batch_size)])


def active_units(means: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies over the data: Var_x E_q[z_d] > threshold."""
    return int((means.var(0) > threshold).sum())


class LocalFit(NamedTuple):
    """A per-datapoint Normal q* fitted to held-out rows with the decoder frozen."""

    guide: LocalNormal
    steps: int  # optimizer steps, summed over chunks
    seconds: float


def local_inference(model, x: torch.Tensor, init=None, lr: float = 0.05,
                    max_steps: int = 3000, window: int = 50, tol: float = 0.01,
                    decays: int = 4, num_particles: int = 1, chunk_size: int = 5000,
                    seed: int = 0, progress: Progress = None) -> LocalFit:
    """Fit q*(z_n) = N(m_n, diag s_n^2) for every row of ``x`` by maximizing its ELBO.

    Adam on the table's rows from ``init`` (any guide with ``loc_scale(batch)`` over these rows:
    an amortized guide, or an earlier fit to warm-start; ``None`` starts at N(0, I)), with the
    decoder frozen.
    Stopping rule: every ``window`` steps compare the mean per-datapoint loss with the previous
    window's; when it improved by less than ``tol`` nats, halve the learning rate; stop after
    the ``decays``-th halving or at ``max_steps``.
    """
    torch.manual_seed(seed)
    start_time = time.perf_counter()
    n, device = len(x), x.device
    guide = LocalNormal(n, model.latent_dim, sparse=False).to(device)
    if init is not None:
        for batch in batches_of(x, chunk_size):
            with torch.no_grad():
                loc, scale = init.loc_scale(batch)
            guide.set_rows(batch.idx, loc, scale)
    objective = ELBO(num_particles)
    total_steps = 0
    for batch in batches_of(x, chunk_size):
        chunk = LocalNormal(len(batch.idx), model.latent_dim, sparse=False).to(device)
        with torch.no_grad():
            chunk.params.copy_(guide.params[batch.idx])
        local_batch = Batch(batch.x, torch.arange(len(batch.idx), device=device), len(batch.idx))
        total_steps += _fit_rows(model, chunk, local_batch, objective, lr, max_steps, window,
                                 tol, decays, progress)
        with torch.no_grad():
            guide.params[batch.idx] = chunk.params
    return LocalFit(guide, total_steps, time.perf_counter() - start_time)


def _fit_rows(model, chunk: LocalNormal, batch: Batch, objective, lr, max_steps, window, tol,
              decays, progress) -> int:
    """Adam on one chunk's rows under the plateau rule of ``local_inference``; returns steps."""
    opt = torch.optim.Adam([chunk.params], lr=lr)
    previous, running, halvings = math.inf, 0.0, 0
    for step in range(1, max_steps + 1):
        loss = -objective.per_datapoint(model, chunk, batch).sum()
        (grad,) = torch.autograd.grad(loss, [chunk.params])
        chunk.params.grad = grad
        opt.step()
        running += float(loss.detach()) / len(batch.idx)
        if progress:
            progress(1)
        if step % window == 0:
            mean, running = running / window, 0.0
            if previous - mean < tol:
                halvings += 1
                if halvings >= decays:
                    return step
                for group in opt.param_groups:
                    group["lr"] *= 0.5
            previous = mean
    return max_steps
