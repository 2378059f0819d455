"""The test-time fitter of q*: per-datapoint tables fitted to rows with the decoder frozen.

``local_inference`` fits q*(z_n) in a per-datapoint family (``families.py``) for every row
of ``x`` by maximizing its ELBO, each chunk of rows by Adam under a plateau rule
(``_fit_rows``), eagerly or as one compiled graph a step (``_CompiledFit``). ``held_out``
asks any guide for its held-out answer (``protocol.py``) and hands it this fitter: a
per-datapoint table (``guides.PerDatapoint``) answers with a fresh fit, and a program
without ``held_out`` whose z depends on its rows' indices is fitted afresh (the probe that
``protocol.as_guide`` gives it).

Layering: above ``guides.py`` (q* is a ``LocalNormal`` or a ``LocalTable``),
``protocol.py`` (it asks ``init`` for its ``loc_scale`` and, through ``family_of``, its
``local_family``) and
``compiled.py`` (``Program``); the guides do not import it: the fitter reaches a table's
``held_out`` as an argument. ``evaluate``, ``heldout`` and ``compute`` use it.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, NamedTuple, Optional

import pyro
import torch

from . import compiled, families as fam_lib
from .batching import Batch, batches_of
from .errors import UserError
from .guides import LocalNormal, LocalTable, PerDatapoint
from .protocol import as_guide, family_of
from .rng import forked, seeded
from .objectives import AnalyticKLELBO

Progress = Optional[Callable[[int], None]]  # called with the number of steps done


class LocalFit(NamedTuple):
    """A per-datapoint q* fitted to held-out rows with the decoder frozen: a ``LocalNormal``
    (the diagonal family) or a ``LocalTable`` (any other); its family is
    ``local_family(fit.guide)``."""

    guide: PerDatapoint
    steps: int  # optimizer steps, summed over chunks
    seconds: float




def local_inference(model, x: torch.Tensor, init=None, lr: float = 0.05, objective=None,
                    max_steps: int = 3000, window: int = 30, tol: float = 0.01,
                    decays: int = 6, chunk_size: int = 5000, seed: int = 0,
                    progress: Progress = None, compile=None,
                    family: Optional[fam_lib.Spec] = None) -> LocalFit:
    """Fit q*(z_n) in a per-datapoint ``family`` for every row of ``x`` by maximizing its ELBO.

    ``family`` (``families.resolve``: ``diagonal``, N(m_n, diag s_n^2); ``full``;
    ``lowrank:R``; or a family object); None asks ``init`` (``protocol.family_of(init)``) and
    falls back to ``diagonal`` where it states none (or there is no ``init``). The diagonal
    family's q* is a ``LocalNormal`` fitted exactly as before families existed (the same
    draws and steps); any other is a ``LocalTable``, started from ``init``'s (loc, scale)
    (``families.LocalFamily.init``) and always fitted eagerly (``compile`` is ignored).

    Adam on the table's rows from ``init`` (any guide with ``loc_scale(batch)`` over these rows:
    an amortized guide, or an earlier fit to warm-start; ``None`` starts at N(0, I)), with the
    decoder frozen; a family that states a share of ``lr`` per column
    (``families.step_scale``: a flow's network weights) gets it.
    The objective defaults to the ELBO with the KL in closed form (one sample for the
    reconstruction term): its gradient has less variance than the all-Monte-Carlo ELBO's,
    and it falls back to Monte Carlo where no closed form exists.
    Stopping rule: every ``window`` steps compare the mean per-datapoint loss with the previous
    window's; when it improved by less than ``tol`` nats, halve the learning rate; stop after
    the ``decays``-th halving or at ``max_steps``. experiments/local_inference.py checks it
    against a fit four times longer (numbers in experiments/README.md).

    ``compile`` runs each step (the loss, the rows' gradients and Adam's update) as one
    compiled graph (``_CompiledFit``): the same draws, the same fit up to float rounding,
    without Pyro's and autograd's per-step overhead and with the elementwise work fused.
    ``compile`` is the ``--compile`` setting (``compiled.compiles``; True/False/None mean
    on/off/auto): ``auto`` compiles chunks of at least ``compiled.PAYS_FROM_LOCAL_ROWS`` rows
    where a C++ compiler is present; ``off`` is the plain eager loop. A compile that fails
    warns and
    runs the plain loop.

    Why so many parameters: each is an option of the fit a user may set (the start, rate,
    objective, stopping rule, chunking, seed, progress, compilation, family); the pipeline
    passes them from one record (``config.local_fit_options``).
    """

    start_time = time.perf_counter()
    n, device = len(x), x.device
    init = as_guide(init) if init is not None else None
    q_family = _q_family(family, init, x)
    diagonal = q_family.name == fam_lib.DIAGONAL.name

    def table(rows: int) -> PerDatapoint:
        if diagonal:
            return LocalNormal(rows, model.latent_dim, sparse=False).to(device)
        return LocalTable(rows, model.latent_dim, q_family, sparse=False).to(device)

    guide = table(n)
    step_scale = fam_lib.step_scale(q_family, model.latent_dim)  # per column, or None
    if step_scale is not None:
        step_scale = step_scale.to(device)
    if not diagonal:
        compile = False
    compile = compiled.compiles(compile, min(n, chunk_size), compiled.PAYS_FROM_LOCAL_ROWS)
    with seeded(seed, device):
        if init is not None:
            for batch in batches_of(x, chunk_size):
                with torch.no_grad():
                    loc, scale = init.loc_scale(batch)
                guide.set_rows(batch.idx, loc, scale)
        objective = objective or AnalyticKLELBO()
        total_steps = 0
        for batch in batches_of(x, chunk_size):
            chunk = table(len(batch.idx))
            with torch.no_grad():
                chunk.params.copy_(guide.params[batch.idx])
            local_batch = Batch(batch.x, torch.arange(len(batch.idx), device=device),
                                len(batch.idx))
            total_steps += _fit_rows(model, chunk, local_batch, objective, lr, max_steps,
                                     window, tol, decays, progress, compile, step_scale)
            with torch.no_grad():
                guide.params[batch.idx] = chunk.params
    return LocalFit(guide, total_steps, time.perf_counter() - start_time)


def _q_family(family, init, x: torch.Tensor) -> fam_lib.LocalFamily:
    """q*'s family: the one asked for, else ``init``'s (probed on two rows, on a forked
    random stream), else the diagonal one. A family asked for by the name of ``init``'s own
    is ``init``'s own (a flow guide's: its flows' masks and weights, not a fresh order)."""
    asked = fam_lib.resolve(family) if family is not None else None
    if init is None:
        return asked or fam_lib.DIAGONAL
    m = min(2, len(x))
    probe = Batch(x[:m], torch.arange(m, device=x.device), len(x)) if m else None
    with forked(x.device):
        try:
            found = family_of(init, probe)
        except UserError:
            if asked is not None:
                return asked
            raise  # a family it names that is none of ours
        except Exception:  # noqa: BLE001 - a probe that fails states nothing
            found = None
    if asked is not None:
        return found if fam_lib.same(found, asked) else asked
    return found or fam_lib.DIAGONAL


def _fit_rows(model, chunk: PerDatapoint, batch: Batch, objective, lr, max_steps, window, tol,
              decays, progress, compile: bool = False,
              step_scale: Optional[torch.Tensor] = None) -> int:
    """Adam on one chunk's rows under the plateau rule of ``local_inference``; returns steps.
    ``step_scale`` (the family's, per column) scales each column's Adam step: a learning rate
    per column (eager steps only: the compiled step is the diagonal family's, which has none).

    The losses of a window are read from the device once per window (``tolist``), summed in
    the same order as one read per step would: the same rule, one host sync per window.

    Why so many parameters: ``local_inference``'s options for one chunk, passed on
    unchanged."""
    fit = _CompiledFit.get(model, chunk, batch, objective) \
        if compile and step_scale is None else None
    opt = None if fit is not None else torch.optim.Adam([chunk.params], lr=lr)
    state = fit.start(chunk, lr) if fit is not None else None
    previous, halvings, losses = math.inf, 0, []
    before = torch.empty_like(chunk.params) if step_scale is not None else None
    for step in range(1, max_steps + 1):
        if fit is not None:
            loss, state = fit.step(state, batch)
        else:  # the batch is the whole chunk in order: its rows are the table itself (no
            # gather, and no row-sized scatter of the gradient back)
            with torch.enable_grad(), chunk.given_rows([chunk.params]):
                loss = -objective.per_datapoint(model, chunk, batch).sum()
                (grad,) = torch.autograd.grad(loss, [chunk.params])
            chunk.params.grad = grad
            if before is not None:
                before.copy_(chunk.params.detach())
            opt.step()
            if before is not None:  # Adam's step times each column's share of the rate
                with torch.no_grad():
                    chunk.params.sub_(before).mul_(step_scale).add_(before)
        losses.append(loss.detach())
        if progress:
            progress(1)
        if step % window == 0:
            running = 0.0
            for value in torch.stack(losses).tolist():
                running += value / len(batch.idx)
            mean, losses = running / window, []
            if previous - mean < tol:
                halvings += 1
                if halvings >= decays:
                    break
                if fit is not None:
                    state = fit.halve(state)
                else:
                    for group in opt.param_groups:
                        group["lr"] *= 0.5
            previous = mean
    else:
        step = max_steps
    if fit is not None:
        fit.finish(chunk, state)
    return step


class _CompiledFit:
    """One step of ``_fit_rows`` as one compiled graph: q*'s loss (the objective's per-row
    bound, summed and negated), the gradient of the rows and ``torch.optim.Adam``'s update of
    them (its single-tensor formula: the same moments, bias corrections and step), traced at
    the dispatcher level (``make_fx``, as ``compiled.Compiled.value_and_grad``) with the
    decoder's tensors as inputs and compiled with Inductor (``fallback_random``: the noise
    is torch's, drawn in eager order). The rows, Adam's moments, its step count and learning
    rate are the graph's inputs and outputs, so the loop runs no autograd and no optimizer.
    Graphs are kept per (model, rows, width, objective) and shared by every fit that asks."""

    _cache: Dict[tuple, "_CompiledFit"] = {}
    _failed: set = set()

    def __init__(self, graph, program, betas, eps):
        self.graph, self.program, self.betas, self.eps = graph, program, betas, eps

    @classmethod
    def get(cls, model, chunk: "LocalNormal", batch: Batch, objective) -> Optional["_CompiledFit"]:
        key = (id(model), tuple(batch.x.shape), batch.x.dtype, str(batch.x.device),
               tuple(chunk.params.shape), id(objective) if not _hashable(objective) else objective)
        if key in cls._failed:
            return None
        fit = cls._cache.get(key)
        if fit is not None and fit.program.model is model:
            return fit
        try:
            fit = cls._build(model, chunk, batch, objective)
            state = fit.start(chunk, 0.0)
            with forked(batch.x.device):
                fit.step(state, batch)  # torch.compile compiles on its first call
        except Exception as e:  # noqa: BLE001 - whatever failed, the eager loop still works
            import warnings
            text = str(e).strip().splitlines()
            warnings.warn(f"compiling q*'s step failed ({type(e).__name__}: "
                          f"{text[0][:200] if text else ''}); fitting eagerly",
                          RuntimeWarning, stacklevel=3)
            cls._failed.add(key)
            return None
        if len(cls._cache) >= 8:
            cls._cache.clear()
        cls._cache[key] = fit
        return fit

    @classmethod
    def _build(cls, model, chunk: "LocalNormal", batch: Batch, objective) -> "_CompiledFit":
        from torch.func import functional_call
        from torch.fx.experimental.proxy_tensor import make_fx

        def loss_fn(model, guide, batch):
            return -objective.per_datapoint(model, guide, batch).sum()

        program = compiled.Program(loss_fn, model, chunk, len(batch.idx), ())
        betas, eps = (0.9, 0.999), 1e-8
        beta1, beta2 = betas

        def pure(tensors, rows, exp_avg, exp_avg_sq, t, lr, x, idx):
            rows_ = rows.detach().requires_grad_()
            with chunk.given_rows([rows_]):
                loss = functional_call(program, tensors, (x, idx))
            (grad,) = torch.autograd.grad(loss, [rows_])
            # torch.optim.Adam, single tensor, not capturable
            exp_avg = exp_avg.lerp(grad, 1 - beta1)
            exp_avg_sq = exp_avg_sq.mul(beta2).addcmul(grad, grad, value=1 - beta2)
            t = t + 1
            step_size = lr / (1 - beta1 ** t)
            denom = exp_avg_sq.sqrt() / (1 - beta2 ** t).sqrt() + eps
            rows = rows - step_size * exp_avg / denom
            return loss.detach(), rows.detach(), exp_avg, exp_avg_sq, t, lr

        with forked(batch.x.device), pyro.validation_enabled(False), torch.enable_grad():
            # checked eagerly once (Pyro validates every site), then traced
            with torch.no_grad():
                loss_fn(model, chunk, batch)
            state = cls._fresh(chunk.params.detach(), 0.0)
            graph = make_fx(pure)(cls._tensors(program), *state, batch.x, batch.idx)
        graph = torch.compile(graph, backend="inductor", dynamic=False, fullgraph=True,
                              options={"fallback_random": True})
        return cls(graph, program, betas, eps)

    @staticmethod
    def _tensors(program) -> dict:
        """The decoder's (and prior's, likelihood's) tensors; the rows are the graph's own."""
        return {n: t for n, t in program.tensors().items() if not n.startswith("guide.")}

    @staticmethod
    def _fresh(rows: torch.Tensor, lr: float) -> tuple:
        # step count and learning rate in double, as torch.optim.Adam's Python floats
        return (rows, torch.zeros_like(rows), torch.zeros_like(rows),
                torch.zeros((), dtype=torch.float64, device=rows.device),
                torch.tensor(float(lr), dtype=torch.float64, device=rows.device))

    def start(self, chunk: "LocalNormal", lr: float) -> tuple:
        return self._fresh(chunk.params.detach().clone(), lr)

    def step(self, state: tuple, batch: Batch):
        with torch.no_grad():
            loss, *state = self.graph(self._tensors(self.program), *state, batch.x, batch.idx)
        return loss, tuple(state)

    @staticmethod
    def halve(state: tuple) -> tuple:
        return (*state[:-1], state[-1] * 0.5)

    @staticmethod
    def finish(chunk: "LocalNormal", state: tuple) -> None:
        with torch.no_grad():
            chunk.params.copy_(state[0])


def _hashable(obj) -> bool:
    try:
        hash(obj)
        return True
    except TypeError:
        return False


def held_out(guide, model, x: torch.Tensor, warm=None, **options):
    """A guide for the held-out rows ``x`` (``protocol.HeldOut``): the guide's own
    ``held_out`` (the protocol, ``protocol.py``), handed this module's fitter as ``fitter``
    beside ``options``. A guide that does not say is probed (``protocol.as_guide``): if what
    it samples depends on the rows' indices rather than on ``x`` (an autoguide with a
    parameter per training row), q is fitted afresh like a per-datapoint guide's."""
    return as_guide(guide).held_out(model, x, warm=warm, fitter=local_inference, **options)
