"""Objectives, all built on one primitive: per-datapoint log importance weights.

``log_weights(model, guide, batch, K)`` runs the guide under a vectorized particle plate,
replays the model against it, and returns log p(x, z_k) - log q(z_k | x) for every particle
and datapoint, shape [K, B], *unscaled* by the subsample factor N / B. From it:

    ELBO    = mean_k lw                          (Monte Carlo; ``ELBO``)
    ELBO    = mean_k log p(x|z_k) - KL(q || p)   (analytic KL; ``AnalyticKLELBO``)
    IWAE_K  = logsumexp_k lw - log K             (Burda et al. 2016; ``IWAE``)
    log p(x) ~ IWAE_K for large K                (``evaluate.log_px``)

An objective is a callable ``(model, guide, batch) -> loss``: a scalar to minimize, scaled to
the whole dataset (N / B times the batch sum), like Pyro's ``Trace_ELBO().differentiable_loss``.
One whose ``weights_kl`` is True (our ELBOs) also takes ``beta=`` (a number or a 0-d tensor),
the KL weight of that step: ``train.fit`` hands it every step when a run sets ``beta`` or a
warm-up, and refuses both for an objective without it (``config.takes_beta``; IWAE, Pyro's
ELBOs).
An objective may also answer ``value_and_grad(model, guide, batch, params, scale, check)``
with the loss, its gradients and a non-finite flag computed its own way (``Compiled`` does, as
one graph); the training step asks for it and otherwise calls ``loss.backward()``.
The importance-weighted bound takes its logsumexp over the unscaled weights and scales after,
so it stays a correct bound under subsampling (Pyro's ``RenyiELBO`` scales first).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .batching import Batch
from .config import refuse_beta
from .errors import UserError, setting

Objective = Callable[..., torch.Tensor]  # (model, guide, batch[, beta=]) -> loss, see above


class _ModuleParams(Messenger):
    """Serve ``pyro.param``/``pyro.module`` statements from the tensors they pass in.

    Training with our own ``torch.optim`` optimizers needs no global param store; this keeps
    models out of it (two models in one process cannot collide) and skips its bookkeeping.
    """

    def _pyro_param(self, msg):
        # ``pyro.module`` names its parameters "module$$$name"; a plain ``pyro.param`` with a
        # fresh initial tensor (a hand-written guide) is left to Pyro's param store
        args = msg["args"]
        if len(args) > 1 and isinstance(args[1], torch.Tensor) and (
                "$$$" in msg["name"] or args[1].requires_grad):
            msg["value"] = args[1]
            msg["done"] = True


class LogWeights(NamedTuple):
    """Per-particle, per-datapoint log-densities, each [K, B]; lw = log_lik + log_prior - log_q."""

    log_lik: torch.Tensor  # [K, B] observed sites of the model
    log_prior: torch.Tensor  # [K, B] latent sites of the model
    log_q: torch.Tensor  # [K, B] sites of the guide

    @property
    def total(self) -> torch.Tensor:
        return self.log_lik + self.log_prior - self.log_q  # [K, B]


@contextlib.contextmanager
def isolated():
    """Run a Pyro program as if no handler were active: a program evaluated *inside* another
    one (the semi-amortized guide refines q with the model's ELBO while the objective traces
    the guide). Pyro's plates are global (one dimension allocator), so a nested "particles"
    or "data" plate would collide with the caller's; this sets the handler stack and the
    allocator aside and puts them back."""
    from pyro.poutine import runtime
    stack, dims = runtime._PYRO_STACK[:], runtime._DIM_ALLOCATOR._stack[:]
    runtime._PYRO_STACK.clear()
    runtime._DIM_ALLOCATOR._stack.clear()
    try:
        yield
    finally:
        runtime._PYRO_STACK[:] = stack
        runtime._DIM_ALLOCATOR._stack[:] = dims


def traces(model, guide, batch: Batch, num_particles: int) -> Tuple[poutine.Trace, poutine.Trace]:
    """(model trace, guide trace) with ``num_particles`` vectorized particles at dim -2."""
    with _ModuleParams(), pyro.plate("particles", num_particles, dim=-2):
        guide_tr = poutine.trace(guide).get_trace(batch)
        _check_plate(guide_tr, batch, "guide")  # before the model runs on its draws
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(batch)
    return model_tr, guide_tr


def _is_sample(site) -> bool:
    return site["type"] == "sample" and not site_is_subsample(site)


def _latent_sites(trace: poutine.Trace):
    """(name, site) of every non-observed sample site."""
    return ((name, site) for name, site in trace.nodes.items()
            if _is_sample(site) and not site["is_observed"])


def _user_scale(site):
    """The site's scale without the plates' subsample factors N / B: what ``poutine.scale``
    (or a user's ``scale`` argument) asked for, 1.0 when nothing did."""
    scale = site["scale"]
    for frame in site["cond_indep_stack"]:
        if frame.full_size is not None and frame.full_size != frame.size:
            scale = scale / (frame.full_size / frame.size)
    return scale


def _site_sum(trace: poutine.Trace, keep):
    """Sum of the log-densities of the sample sites that ``keep`` accepts, [K, B]: unscaled by
    the subsample factor, scaled as ``poutine.scale`` asks (as Pyro's objectives do)."""
    total = 0.0
    for site in trace.nodes.values():
        if _is_sample(site) and keep(site):
            log_prob, scale = site["unscaled_log_prob"], _user_scale(site)
            if not (isinstance(scale, float) and scale == 1.0):
                log_prob = log_prob * scale
            total = total + log_prob
    return total


def _check_plate(trace: poutine.Trace, batch: Batch, who: str) -> None:
    plate = trace.nodes.get("data")
    # the same tensor (no comparison of values, which a compiled trace could not make), or
    # equal values
    if plate is not None and site_is_subsample(plate) and plate["value"] is not batch.idx \
            and not (plate["value"].shape == batch.idx.shape
                     and torch.equal(plate["value"], batch.idx)):
        raise UserError(
            f"the {who}'s 'data' plate drew its own subsample instead of the batch's rows; "
            f"declare it as the model does (ppl_vae.model.data_plate: size N, subsample "
            f"batch.idx); for Pyro's autoguides pass create_plates=ppl_vae.model.data_plate")


def _check_sites(trace: poutine.Trace, shape, who: str) -> None:
    for name, site in trace.nodes.items():
        if _is_sample(site) and site["unscaled_log_prob"].shape != shape:
            raise UserError(
                f"{who} site {name!r} has per-datapoint log-density of shape "
                f"{tuple(site['unscaled_log_prob'].shape)}, expected {tuple(shape)} (particles, "
                f"rows): every sample site must sit inside the 'data' plate. Pyro's AutoNormal "
                f"with create_plates=ppl_vae.model.data_plate does; guides with one joint latent "
                f"vector (AutoDiagonalNormal, AutoMultivariateNormal) do not")


def unguided_sites(model, guide, batch: Batch) -> list:
    """Latent sites of the model that the guide does not sample (the model would draw them
    from the prior: an ELBO of the wrong program, silently)."""
    model_tr, guide_tr = traces(model, guide, batch, 1)
    return [name for name, _ in _latent_sites(model_tr) if name not in guide_tr.nodes]


def log_weights(model, guide, batch: Batch, num_particles: int = 1) -> LogWeights:
    """log p(x, z_k) - log q(z_k | x) as its parts, each [K, B], from the traces themselves."""
    model_tr, guide_tr = traces(model, guide, batch, num_particles)
    return _log_weights(model_tr, guide_tr, batch, num_particles)


def _log_weights(model_tr, guide_tr, batch, num_particles) -> LogWeights:
    model_tr.compute_log_prob()
    guide_tr.compute_log_prob()
    shape = torch.Size([num_particles, len(batch.idx)])
    _check_plate(model_tr, batch, "model")  # (the guide's was checked when it was traced)
    _check_sites(model_tr, shape, "model")
    _check_sites(guide_tr, shape, "guide")
    zeros = batch.x.new_zeros(shape)
    log_lik = zeros + _site_sum(model_tr, lambda s: s["is_observed"])
    log_prior = zeros + _site_sum(model_tr, lambda s: not s["is_observed"])
    log_q = zeros + _site_sum(guide_tr, lambda s: not s["is_observed"])
    return LogWeights(log_lik, log_prior, log_q)


def _scale(batch: Batch) -> float:
    return batch.num_data / len(batch.idx)


class _Bound:
    """An objective from a per-datapoint bound: loss = -(N / B) * sum over the batch."""

    weights_kl = False  # whether a call takes ``beta=``, the KL weight (warm-up, beta-VAE)

    def per_datapoint(self, model, guide, batch: Batch, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, model, guide, batch: Batch, **kwargs) -> torch.Tensor:
        return -_scale(batch) * self.per_datapoint(model, guide, batch, **kwargs).sum()


@dataclass(frozen=True)
class ELBO(_Bound):
    """Monte Carlo ELBO with ``num_particles`` vectorized reparameterized samples.

    With ``beta`` != 1 it is the beta-weighted bound E_q[log p(x|z)] - beta KL(q || p)
    (Higgins et al. 2017). A call may pass ``beta=`` (a number or a 0-d tensor) to override
    the field for that step: KL warm-up is a schedule of beta given per step (``train.fit``).
    Equals Pyro's ``Trace_ELBO`` at beta = 1.
    """

    num_particles: int = 1
    beta: float = 1.0
    weights_kl = True

    def per_datapoint(self, model, guide, batch: Batch, beta=None) -> torch.Tensor:
        beta = self.beta if beta is None else beta
        lw = log_weights(model, guide, batch, self.num_particles)
        return (lw.log_lik + beta * (lw.log_prior - lw.log_q)).mean(0)  # [B]


@dataclass(frozen=True)
class AnalyticKLELBO(ELBO):
    """ELBO with the KL term in closed form where one is known (as ``TraceMeanField_ELBO``).

    E_q[log p(x|z)] is estimated by Monte Carlo; KL(q(z|x) || p(z)) is exact for a Normal guide
    and Normal prior. Sites without a registered KL fall back to the Monte Carlo difference.
    """

    def per_datapoint(self, model, guide, batch: Batch, beta=None) -> torch.Tensor:
        beta = self.beta if beta is None else beta
        model_tr, guide_tr = traces(model, guide, batch, self.num_particles)
        lw = _log_weights(model_tr, guide_tr, batch, self.num_particles)
        kl = 0.0
        for name, site in _latent_sites(guide_tr):
            prior_site = model_tr.nodes[name]
            try:
                kl = kl + kl_divergence(site["fn"], prior_site["fn"])  # [K, B] or [B]
            except NotImplementedError:
                kl = kl + site["unscaled_log_prob"] - prior_site["unscaled_log_prob"]
        kl = lw.log_q.new_zeros(lw.log_q.shape) + kl
        return (lw.log_lik - beta * kl).mean(0)  # [B]


@dataclass(frozen=True)
class IWAE(_Bound):
    """The importance-weighted bound of Burda et al. (2016) with K = ``num_particles``.

    IWAE_K = E[log (1/K) sum_k w_k] per datapoint, computed from unscaled log weights and
    scaled by N / B after the logsumexp. ``dreg=True`` uses the doubly reparameterized
    gradient of Tucker et al. (2019) for the guide's parameters: the same value, a gradient
    with lower variance. DReG needs a guide whose sites are reparameterized Normals.
    """

    num_particles: int = 5
    dreg: bool = False

    def per_datapoint(self, model, guide, batch: Batch) -> torch.Tensor:
        if self.dreg:
            return self._dreg(model, guide, batch)
        lw = log_weights(model, guide, batch, self.num_particles).total  # [K, B]
        return torch.logsumexp(lw, 0) - math.log(self.num_particles)  # [B]

    def _dreg(self, model, guide, batch: Batch) -> torch.Tensor:
        """Surrogate whose value is IWAE_K and whose guide gradient is DReG's.

        log q is evaluated with the guide's distribution parameters detached (z keeps its
        path to them), and a hook multiplies the gradient reaching z by the normalized weight,
        so the guide parameters receive sum_k w_k^2 d lw_k / d z_k dz_k / dphi while the
        model parameters receive the usual sum_k w_k d lw_k.
        """
        model_tr, guide_tr = traces(model, guide, batch, self.num_particles)
        lw_full = _log_weights(model_tr, guide_tr, batch, self.num_particles)
        log_q = 0.0
        for name, site in _latent_sites(guide_tr):
            log_q = log_q + _stop_params(site["fn"], name).log_prob(site["value"])
        lw = lw_full.log_lik + lw_full.log_prior - log_q  # [K, B]
        w = torch.softmax(lw.detach(), 0)  # [K, B]
        for _, site in _latent_sites(guide_tr):
            if site["value"].requires_grad:
                site["value"].register_hook(lambda g, w=w: g * w.unsqueeze(-1))
        bound = torch.logsumexp(lw.detach(), 0) - math.log(self.num_particles)  # [B]
        return bound + (w * lw).sum(0) - (w * lw).sum(0).detach()  # value = bound


def _stop_params(fn, name: str):
    """The same Normal family with its parameters detached (DReG's stop-gradient on log q)."""
    base, reinterpreted = fn, 0
    if isinstance(base, dist.Independent):
        base, reinterpreted = base.base_dist, base.reinterpreted_batch_ndims
    if not isinstance(base, (dist.Normal, torch.distributions.Normal)):
        raise UserError(f"DReG needs a reparameterized Normal guide site; site {name!r} "
                         f"is {type(base).__name__}: use {setting('objective')} iwae without "
                         f"{setting('dreg')}")
    out = dist.Normal(base.loc.detach(), base.scale.detach())
    return out.to_event(reinterpreted) if reinterpreted else out


class PyroObjective:
    """One of Pyro's ELBO classes as an objective: ``--objective Trace_ELBO``.

    The loss is Pyro's ``differentiable_loss(model, guide, batch)`` (``Trace_ELBO``,
    ``TraceMeanField_ELBO``, ``TraceEnum_ELBO``, ...) or, for ``TraceGraph_ELBO``, which has
    none, its surrogate loss with the value of -ELBO. Both are scaled to the whole dataset by
    the model's subsampled plate, as our objectives are, so the numbers are comparable. Pyro's
    classes have no KL weight: ``beta`` and warm-up are refused for them (``weights_kl``).
    ``RenyiELBO`` is refused: it takes its logsumexp over log-densities already scaled by
    N / B, which is not a bound of log p(x) under minibatches (``IWAE`` computes it right).
    """

    weights_kl = False

    def __init__(self, elbo):
        if not (hasattr(elbo, "differentiable_loss")
                or hasattr(elbo, "_loss_and_surrogate_loss")):
            name = type(elbo).__name__
            why = (" it takes its logsumexp over log-densities already scaled by the "
                   "subsample factor N / B, so under minibatches it bounds nothing; use "
                   f"{setting('objective')} iwae, the same bound computed on unscaled weights"
                   if name == "RenyiELBO" else "")
            raise UserError(f"Pyro's {name} gives no differentiable loss, so it cannot train "
                            f"here;{why or ' use Trace_ELBO, TraceMeanField_ELBO or elbo'}")
        self.elbo = elbo

    def __repr__(self) -> str:
        return f"PyroObjective({type(self.elbo).__name__}(num_particles={self.elbo.num_particles}))"

    def __call__(self, model, guide, batch: Batch, **kwargs) -> torch.Tensor:
        if kwargs:  # a KL weight handed by a schedule: refused as everywhere
            name = f"Pyro's {type(self.elbo).__name__}"
            refuse_beta(self, kwargs.get("beta", 1.0), name=name)
            raise UserError(f"{name} takes no {', '.join(kwargs)}; use {setting('objective')} "
                            f"elbo")
        with _ModuleParams():
            if hasattr(self.elbo, "differentiable_loss"):
                return self.elbo.differentiable_loss(model, guide, batch)
            elbo, surrogate = self.elbo._loss_and_surrogate_loss(model, guide, (batch,), {})
            return surrogate + (-elbo - surrogate).detach()  # value -ELBO, gradient Pyro's


def pyro_objective(piece):
    """``piece`` as an objective: Pyro's ELBO instances are wrapped, others pass."""
    from pyro.infer.elbo import ELBO as PyroELBO
    return PyroObjective(piece) if isinstance(piece, PyroELBO) else piece
