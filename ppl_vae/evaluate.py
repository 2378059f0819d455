"""Held-out evaluation: ELBO, IWAE bounds, importance-sampled log p(x), rate/distortion, active
units, and test-time (local) inference of a per-datapoint q* with the decoder frozen.

Every quantity comes from ``objectives.log_weights``. Each estimate reseeds the RNG with
``seed`` so numbers are comparable between runs and between models.

References:
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders.
    Cremer, Li & Duvenaud (2018), Inference Suboptimality in Variational Autoencoders.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import time
from typing import Callable, NamedTuple, Optional

import torch

from .compiled import Compiled
from .data import Batch
from .guides import AmortizedNormal, LocalNormal
from .objectives import AnalyticKLELBO, log_weights

Progress = Optional[Callable[[int], None]]  # called with the number of rows (or steps) done


@contextlib.contextmanager
def seeded(seed: int, device: Optional[torch.device] = None):
    """Run a block with its own seeded RNG stream, leaving the caller's RNG state untouched.

    Evaluation inside training (validation every epoch) must not reset the training noise.
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def own_rng(fn):
    """Decorator: run ``fn`` under ``seeded(seed, x.device)`` from its ``seed`` and ``x`` arguments."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with seeded(bound.arguments["seed"], bound.arguments["x"].device):
            return fn(*args, **kwargs)
    return wrapper


class Estimate(NamedTuple):
    """A per-datapoint quantity summarized: mean over data and its standard error."""

    mean: float
    stderr: float

    @classmethod
    def of(cls, values: torch.Tensor) -> "Estimate":
        v = values.double()
        return cls(float(v.mean()), float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0)


def batches_of(x: torch.Tensor, batch_size: int):
    """Fixed-order minibatches over held-out rows; ``idx`` indexes ``x`` (and a local guide).

    Loops over them write their per-row results into one tensor allocated up front. Keeping
    a small new tensor per batch alive between the batches' large temporaries fragments the
    C heap: log p(x) on 1,000 rows with K = 1000 grew the process by 2.6 MB per batch (3.6
    compiled), and a 10,000-row, K = 5000 estimate runs 10,000 batches. Filled in place, the
    process stays flat.
    """
    n = len(x)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n), device=x.device)
        yield Batch(x[idx], idx, n)


COMPILE_LOG_PX_ROWS = 2_000_000  # decoder rows (K x N) from which log_px compiles by default


@own_rng
@torch.no_grad()
def log_px(model, guide, x: torch.Tensor, num_particles: int = 5000, seed: int = 0,
           max_rows: int = 2 ** 13, progress: Progress = None,
           compile: Optional[bool] = None) -> torch.Tensor:
    """Importance-sampled log p(x) per datapoint [N]: logsumexp_k lw_k - log K (IWAE_K).

    Vectorized over particles and data and chunked so that at most ``max_rows`` decoder rows
    are alive at once, whatever K. Unbiased for p(x), so a stochastic lower bound on log p(x).
    ``compile`` runs each chunk as a compiled graph (``compiled.Compiled``): the same estimate
    up to float rounding, with the elementwise work fused (about twice as fast on a CPU, after
    a compile of seconds). ``None`` compiles when K x N reaches ``COMPILE_LOG_PX_ROWS``.
    """
    if compile is None:
        compile = num_particles * len(x) >= COMPILE_LOG_PX_ROWS
    batch_size = max(1, min(len(x), max_rows // min(num_particles, max_rows)))
    k_chunk = max(1, min(num_particles, max_rows // batch_size))
    chunks = {}  # particles per chunk -> (model, guide, batch) -> logsumexp_k lw [B]
    out = x.new_empty(len(x))  # filled in place: see ``batches_of``
    for batch in batches_of(x, batch_size):
        acc = torch.full((len(batch.idx),), -math.inf, device=x.device)
        for start in range(0, num_particles, k_chunk):
            k = min(k_chunk, num_particles - start)
            if k not in chunks:
                chunks[k] = _logsumexp_weights(k, compile)
            acc = torch.logaddexp(acc, chunks[k](model, guide, batch))
        out[batch.idx] = acc - math.log(num_particles)
        if progress:
            progress(len(batch.idx))
    return out


def _logsumexp_weights(k: int, compile: bool):
    def lse(model, guide, batch):
        return torch.logsumexp(log_weights(model, guide, batch, k).total, 0)  # [B]
    return Compiled(lse) if compile else lse


class ELBOParts(NamedTuple):
    """Per-datapoint ELBO = -(distortion + rate), each [N]."""

    elbo: torch.Tensor  # [N]
    rate: torch.Tensor  # [N] KL(q || p), Monte Carlo: E_q[log q - log p(z)]
    distortion: torch.Tensor  # [N] -E_q[log p(x | z)]


@own_rng
@torch.no_grad()
def elbo_parts(model, guide, x: torch.Tensor, num_particles: int = 1, seed: int = 0,
               batch_size: int = 1000) -> ELBOParts:
    """The ELBO of ``guide`` on ``x`` split into rate and distortion, per datapoint."""
    rate, distortion = x.new_empty(len(x)), x.new_empty(len(x))  # filled in place
    for batch in batches_of(x, batch_size):
        lw = log_weights(model, guide, batch, num_particles)
        rate[batch.idx] = (lw.log_q - lw.log_prior).mean(0)
        distortion[batch.idx] = -lw.log_lik.mean(0)
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


@own_rng
def local_inference(model, x: torch.Tensor, init=None, lr: float = 0.05, objective=None,
                    max_steps: int = 3000, window: int = 30, tol: float = 0.01,
                    decays: int = 6, chunk_size: int = 5000, seed: int = 0,
                    progress: Progress = None) -> LocalFit:
    """Fit q*(z_n) = N(m_n, diag s_n^2) for every row of ``x`` by maximizing its ELBO.

    Adam on the table's rows from ``init`` (any guide with ``loc_scale(batch)`` over these rows:
    an amortized guide, or an earlier fit to warm-start; ``None`` starts at N(0, I)), with the
    decoder frozen.
    The objective defaults to the ELBO with the KL in closed form (one sample for the
    reconstruction term): its gradient has less variance than the all-Monte-Carlo ELBO's,
    and it falls back to Monte Carlo where no closed form exists.
    Stopping rule: every ``window`` steps compare the mean per-datapoint loss with the previous
    window's; when it improved by less than ``tol`` nats, halve the learning rate; stop after
    the ``decays``-th halving or at ``max_steps``. experiments/local_inference.py checks it
    against a fit four times longer (numbers in experiments/README.md).
    """
    start_time = time.perf_counter()
    n, device = len(x), x.device
    guide = LocalNormal(n, model.latent_dim, sparse=False).to(device)
    if init is not None:
        for batch in batches_of(x, chunk_size):
            with torch.no_grad():
                loc, scale = init.loc_scale(batch)
            guide.set_rows(batch.idx, loc, scale)
    objective = objective or AnalyticKLELBO()
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


def _paired(a: torch.Tensor, b: torch.Tensor) -> Estimate:
    """mean(a - b) with the standard error of the paired differences."""
    return Estimate.of(a - b)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    # disable=None: tqdm draws only on a terminal (a log file gets no bar updates)
    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False,
                dynamic_ncols=True)


def evaluate_model(model, guide, x: torch.Tensor, num_particles: int = 5000,
                   local: bool = True, proposal: str = "auto", seed: int = 0,
                   local_options: Optional[dict] = None, progress: bool = True):
    """Every held-out number of one model on rows ``x``; returns (results dict, arrays dict).

    - ``test_elbo``: the ELBO of the model's own guide (for a per-datapoint guide, that guide
      fitted to the held-out rows from N(0, I), which is how such a model is used).
    - ``test_elbo_local`` = L[q*]: a per-datapoint Normal fitted by ``local_inference``,
      warm-started from the guide when it is amortized.
    - ``test_log_px``: importance-sampled log p(x) with ``num_particles`` samples from
      ``proposal``: ``"guide"`` (the encoder), ``"local"`` (q*), or ``"auto"`` (q* when fitted).
    - ``approximation_gap`` = log p(x) - L[q*]; ``amortization_gap`` = L[q*] - L[q]
      (the amortized Normal guide only: for a flow guide q is not in q*'s family; None
      otherwise), with standard errors of the paired differences.
    - ``rate``/``distortion`` of the own guide; ``active_units`` of its posterior means.
    """
    start = time.perf_counter()
    amortized = not getattr(guide, "is_local", False)
    local_options = dict(local_options or {})
    results: dict = {"num_rows": len(x), "num_particles": num_particles}
    q_star = None
    if local or not amortized:
        with _bar(0, "local inference (steps)", progress) as bar:
            fit_ = local_inference(model, x, init=guide if amortized else None, seed=seed,
                                   progress=bar.update, **local_options)
        q_star = fit_.guide
        results.update(local_steps=fit_.steps, local_seconds=fit_.seconds)
    own = guide if amortized else q_star
    parts = elbo_parts(model, own, x, num_particles=10, seed=seed)
    elbo = Estimate.of(parts.elbo)
    results.update(test_elbo=elbo.mean, test_elbo_stderr=elbo.stderr,
                   rate=float(parts.rate.mean()), distortion=float(parts.distortion.mean()))
    if proposal == "auto":
        proposal = "local" if q_star is not None else "guide"
    if proposal == "local" and q_star is None:
        raise ValueError("proposal 'local' needs local=True")
    t0 = time.perf_counter()
    with _bar(len(x), f"log p(x), K={num_particles}", progress) as bar:
        lpx = log_px(model, q_star if proposal == "local" else own, x, num_particles,
                     seed=seed, progress=bar.update)
    est = Estimate.of(lpx)
    results.update(test_log_px=est.mean, log_px_stderr=est.stderr, proposal=proposal,
                   log_px_seconds=time.perf_counter() - t0)
    if q_star is not None:
        local_elbo = parts.elbo if own is q_star else elbo_parts(model, q_star, x,
                                                                 num_particles=10, seed=seed).elbo
        approx = _paired(lpx, local_elbo)
        results.update(test_elbo_local=float(local_elbo.mean()),
                       test_elbo_local_stderr=Estimate.of(local_elbo).stderr,
                       approximation_gap=approx.mean, approximation_gap_stderr=approx.stderr)
        if isinstance(guide, AmortizedNormal):  # Cremer et al.'s gap compares like with like
            amort = _paired(local_elbo, parts.elbo)
            results.update(amortization_gap=amort.mean, amortization_gap_stderr=amort.stderr)
        else:
            results.update(amortization_gap=None, amortization_gap_stderr=None)
    means = posterior_means(own, x)
    results["active_units"] = active_units(means)
    results["seconds"] = time.perf_counter() - start
    return results, {"posterior_means": means}


@own_rng
@torch.no_grad()
def figure_arrays(model, x: torch.Tensor, means: torch.Tensor, num_images: int = 16,
                  seed: int = 0) -> dict:
    """What the figures show, as arrays: inputs and reconstructions, prior samples, 2-D means.

    Reconstructions and samples are the likelihood's mean image at the posterior mean and at
    z ~ p(z). The 2-D view projects the posterior means on their first two principal axes.
    """
    recon = model.likelihood(model.decoder(means[:num_images])).mean
    z = model.prior().sample((num_images * 4,))
    samples = model.likelihood(model.decoder(z)).mean
    centred = means - means.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    pca = centred @ v[:2].T  # [N, min(2, L)]
    if pca.shape[1] < 2:  # a one-dimensional latent space: plot it against zero
        pca = torch.cat([pca, torch.zeros_like(pca)], dim=1)
    return {"inputs": x[:num_images].cpu().numpy(), "reconstructions": recon.cpu().numpy(),
            "samples": samples.cpu().numpy(), "pca": pca.cpu().numpy()}
