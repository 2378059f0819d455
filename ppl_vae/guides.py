"""Guides q(z | x) and the protocol the pipeline asks them.

A guide is a Pyro program with the model's signature ``(batch: Batch) -> None`` that samples
the site ``"z"`` inside the model's subsampled ``"data"`` plate. Beyond that, the pipeline
asks a guide, never its kind:

- ``local_parameters()``: per-datapoint tables that an optimizer updates row by row
  (``RowAdam``); an encoder has none.
- ``given_rows(rows)`` (a guide with tables): a context in which the batch's table rows are
  read from the tensors ``rows`` instead of the tables, so a compiled step differentiates
  those dense [B, width] rows rather than a table whose gradient is sparse.
- ``held_out(model, x, warm=None, **options) -> HeldOut``: a guide over new rows ``x``
  (an encoder answers itself; a table fits fresh rows with the decoder frozen; a
  semi-amortized guide refines its encoder's output by itself).
- ``loc_scale(batch)``: the Normal it offers as a warm start and for the 2-D view.
- ``family``: the variational family it searches, in words ("diagonal normal").
- ``local_family()``: the per-datapoint family (``families.py``: ``diagonal``, ``full``,
  ``lowrank:R``, or a family object) its q belongs to for each datapoint: q* is fitted in it
  (``local_inference``), and the amortization gap L[q*] - L[q] is reported when q*'s family
  is this one. Default: ``diagonal`` for a diagonal-Normal guide, None (unstated: q* is
  diagonal and no amortization gap) otherwise, e.g. the IAF guide.
- ``views()``: other guides worth scoring beside it (a semi-amortized guide's bare encoder).
- ``compilable``: whether its step may be traced once and replayed (``compiled.py``); a
  guide with tables must also answer ``given_rows``.
- ``training_loss(objective, model, batch, **kw)`` (optional): the loss a step minimizes
  when it is not just ``objective(model, guide, batch)`` (a stopped-gradient refinement).
- ``divergence_cause(model, batch)`` (optional): the setting of its own that made training
  diverge, with why in words (a refinement step too large: ``refine_lr``), or None.

``Guide`` gives the defaults of an amortized guide. Guides that do not derive from it (a
hand-written function, Pyro's autoguides) are asked through the module-level functions of
the same names, which probe what the object cannot say (``reads_rows``).

Built-ins: ``AmortizedNormal`` (encoder), ``AmortizedIAF`` (encoder + flows) and
``SemiAmortizedNormal`` (encoder + gradient refinement, Kim et al. 2018), on the base
``Encoded`` that owns the encoder; ``LocalNormal`` (per-datapoint table, no encoder; base
``PerDatapoint`` owns the table) and ``LocalTable`` (a table in any per-datapoint family of
``families.py``). Scales come from ``nets.to_scale`` everywhere.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import families as fam_lib
from .batching import Batch, shard_rows
from .errors import UserError, setting
from .model import data_plate, register
from .nets import from_scale, softplus_inv, to_scale

Progress = Optional[Callable[[int], None]]  # called with the number of steps done


class HeldOut(NamedTuple):
    """A guide for held-out rows, and what fitting it cost (zero for an encoder)."""

    guide: object
    steps: int = 0
    seconds: float = 0.0


class Guide(nn.Module):
    """The protocol with an amortized guide's answers; subclasses override what differs."""

    family: Optional[str] = None
    compilable = True
    settings: Tuple[str, ...] = ()  # the Config settings of this kind of guide (report, checks)

    def local_parameters(self) -> List[torch.Tensor]:
        return []

    def held_out(self, model, x: torch.Tensor, warm=None, **options) -> HeldOut:
        return HeldOut(self)

    def loc_scale(self, batch: Batch):
        raise NotImplementedError(f"{type(self).__name__} offers no loc/scale")

    def views(self) -> Dict[str, object]:
        return {}

    def local_family(self):
        """The per-datapoint family its q is in (q*'s): ``diagonal`` for a diagonal Normal,
        None (unstated) for any other ``family``."""
        found = fam_lib.of_title(self.family)
        return found.name if found is fam_lib.DIAGONAL else None

    def shard(self, rank: int, world_size: int) -> "Guide":
        """Keep only what process ``rank`` of ``world_size`` needs (networks: everything)."""
        return self

    def table_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Where dataset rows ``idx`` sit in this process's tables (``local_parameters``)."""
        return idx


# ---------------------------------------------------------------------------------------
# amortized guides
# ---------------------------------------------------------------------------------------
class Encoded(Guide):
    """Base of the guides built on an encoder ``encoder(x) -> (loc, scale)`` shared by all
    datapoints: it owns the encoder, the latent size and the encoder's (loc, scale)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    def loc_scale(self, batch: Batch):
        """(loc [B, L], scale [B, L]) of the encoder for the batch's rows."""
        return self.encoder(batch.x)


class AmortizedNormal(Encoded):
    """q(z | x) = N(mu(x), diag sigma(x)^2) from an encoder network shared by all datapoints."""

    family = "diagonal normal"

    def forward(self, batch: Batch) -> None:
        register("encoder", self.encoder)
        with data_plate(batch):
            loc, scale = self.encoder(batch.x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


class AmortizedIAF(Encoded):
    """q(z | x): the amortized Normal pushed through inverse autoregressive flows.

    z = f_T o ... o f_1 (eps), eps ~ N(mu(x), diag sigma(x)^2), each f_t an affine
    autoregressive transform (Kingma et al. 2016; Pyro's ``AffineAutoregressive``, the
    numerically stable variant), so q is no longer mean-field; log q(z | x) follows by the
    change of variables, exactly, for sampled z. ``loc_scale`` gives the base Normal's
    parameters (an approximation of q's mean for warm starts and the 2-D view). It states no
    per-datapoint family is a flow of the same shape with its own weights per datapoint
    (``local_family()``: ``families.Flow.like(self.flows)``, started at these flows), as
    Cremer et al. fit q* for their flow guide.
    """

    def __init__(self, encoder: nn.Module, num_flows: int = 2, hidden: int = 0):
        from pyro.distributions.transforms import affine_autoregressive
        super().__init__(encoder)
        dim = encoder.latent_dim
        self.flows = nn.ModuleList([affine_autoregressive(dim, [hidden or 2 * dim], stable=True)
                                    for _ in range(num_flows)])

    def distribution(self, x: torch.Tensor):
        loc, scale = self.encoder(x)
        return dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), list(self.flows))

    @property
    def family(self) -> str:
        return f"normal through {len(self.flows)} inverse autoregressive flows"

    def local_family(self):
        return fam_lib.Flow.like(self.flows)

    def forward(self, batch: Batch) -> None:
        register("encoder", self.encoder)
        register("flows", self.flows)
        with data_plate(batch):
            pyro.sample("z", self.distribution(batch.x))


# ---------------------------------------------------------------------------------------
# per-datapoint guides
# ---------------------------------------------------------------------------------------
class PerDatapoint(Guide):
    """Base of guides with a free table of parameters per datapoint and no encoder.

    Owns the table ``params`` [N, width], its reads by ``batch.idx`` (sparse gradients with
    ``sparse=True``, so ``RowAdam`` touches B rows, not N), the check that the data plate is
    the whole dataset, and the held-out answer: new rows get a fresh fit with the decoder
    frozen (``local_inference``). Subclasses say what a row means.
    """

    settings = ("local_lr", "inner_steps", "local_init")

    def __init__(self, num_data: int, width: int, sparse: bool = True, rank: int = 0,
                 world_size: int = 1):
        """A table for ``num_data`` rows; under torchrun only shard ``rank`` of ``world_size``
        (rows i with i mod W = rank) is ever allocated, as ``shard`` would leave it."""
        super().__init__()
        self.num_data, self.sparse = num_data, sparse
        self.rank, self.world_size = rank, world_size
        self.params = nn.Parameter(torch.zeros(len(self.owned_rows()), width))
        self._given: Optional[torch.Tensor] = None

    def owned_rows(self, device=None) -> torch.Tensor:
        """The dataset rows whose table rows this process holds, in table order."""
        return shard_rows(self.num_data, self.world_size, self.rank, device)

    def local_parameters(self) -> List[torch.Tensor]:
        return [self.params]

    def shard(self, rank: int, world_size: int) -> "PerDatapoint":
        """Keep only the rows of process ``rank``: dataset rows i with i mod W = rank, in
        order (``batching.Shards`` gives that process exactly these rows). The table becomes
        [ceil((N - rank) / W), width]; ``num_data`` stays N, the size of the data plate.
        A table built as that shard already is returned as it is."""
        if (rank, world_size) == (self.rank, self.world_size):
            return self
        if self.world_size > 1:
            raise ValueError(f"the table is shard {self.rank} of {self.world_size} already")
        with torch.no_grad():
            self.params = nn.Parameter(
                self.params[shard_rows(self.num_data, world_size, rank, self.params.device)]
                .clone())
        self.rank, self.world_size = rank, world_size
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint holds the whole table (gathered); a shard keeps its own rows of it."""
        full = state_dict.get(prefix + "params")
        if self.world_size > 1 and full is not None and len(full) == self.num_data:
            state_dict[prefix + "params"] = full[self.owned_rows(full.device)]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def table_index(self, idx: torch.Tensor) -> torch.Tensor:
        return idx // self.world_size if self.world_size > 1 else idx

    def table_rows(self, idx: torch.Tensor) -> torch.Tensor:
        if self._given is not None:  # a compiled step's gathered rows (``given_rows``)
            return self._given
        return F.embedding(self.table_index(idx), self.params, sparse=self.sparse)

    @contextlib.contextmanager
    def given_rows(self, rows: Sequence[torch.Tensor]):
        """Within: the batch's rows are ``rows[0]`` ([B, width], the table's rows at
        ``table_index(batch.idx)``), not reads of the table. A compiled step gathers them
        as an input of its graph and returns their gradient, which ``RowAdam`` applies to
        those rows alone, as it does the sparse gradient of ``F.embedding``."""
        (self._given,) = rows
        try:
            yield
        finally:
            self._given = None

    def check_plate(self, batch: Batch) -> None:
        if batch.num_data != self.num_data:
            raise UserError(
                f"{type(self).__name__} holds {self.num_data} rows but the data plate has size "
                f"{batch.num_data}; declare the plate with the full dataset size and the "
                f"batch's dataset indices as subsample (Batch(x, idx, num_data={self.num_data}))")

    def held_out(self, model, x: torch.Tensor, warm=None, **options) -> HeldOut:
        options.setdefault("family", local_family(self) or fam_lib.DIAGONAL)
        fit = local_inference(model, x, init=warm, **options)
        return HeldOut(fit.guide, fit.steps, fit.seconds)


class LocalNormal(PerDatapoint):
    """q(z_n) = N(m_n, diag s_n^2) with free parameters for each of N datapoints, no encoder.

    The table ``params`` is [N, 2L] (loc, then softplus^-1 of the scale). Rows are read with
    ``F.embedding``; with ``sparse=True`` its gradient is a sparse tensor holding only the
    batch's rows, so an optimizer for sparse rows (``RowAdam``) touches B rows, not N.
    Use ``sparse=False`` with dense optimizers such as ``pyro.optim.Adam`` inside ``SVI``.

    The table is indexed by ``batch.idx``: the data plate must be the full dataset
    (size N with the batch's indices as ``subsample``). A batch-sized plate would silently
    reuse the first B rows for every minibatch (Pyro issue 238) and is refused.
    """

    family = "diagonal normal"

    def __init__(self, num_data: int, latent_dim: int, sparse: bool = True,
                 init_scale: float = 1.0, rank: int = 0, world_size: int = 1):
        super().__init__(num_data, 2 * latent_dim, sparse, rank, world_size)
        self.latent_dim = latent_dim
        with torch.no_grad():
            self.params[:, latent_dim:] = softplus_inv(float(init_scale)).item()

    def loc_scale(self, batch: Batch):
        """(loc [B, L], scale [B, L]) of q(z_n) for the batch's rows."""
        return self.rows(batch.idx)

    def rows(self, idx: torch.Tensor):
        """(loc [B, L], scale [B, L]) of the rows ``idx``."""
        loc, raw = self.table_rows(idx).chunk(2, dim=-1)
        return loc, to_scale(raw)

    @torch.no_grad()
    def init_pca(self, x: torch.Tensor, scale: float = 0.5) -> "LocalNormal":
        """Start every row at its image's principal-component scores (unit variance per axis).

        A data-dependent start that involves no encoder: each datapoint gets a distinct,
        informative code from the first step, where N(0, I) rows give the decoder nothing
        to learn from until they have moved. ``x`` is every training row; a shard
        (``world_size`` > 1) computes the scores of its own rows only, with the axes and
        their scale taken from all rows, so it starts as the same rows of one process's
        table (up to float rounding).
        """
        if len(x) < 2:  # no principal axes to take: keep the N(0, I) start
            return self
        centred = x - x.mean(0)
        q = min(self.latent_dim + 10, *centred.shape)
        _, _, v = torch.svd_lowrank(centred, q=q, niter=4)
        v = v[:, :self.latent_dim]
        extra = self.latent_dim - v.shape[1]  # fewer rows or pixels than latent dimensions
        noise = torch.randn(len(x), extra, device=x.device) if extra > 0 else None
        rows = self.owned_rows(x.device)
        scores = (centred if self.world_size == 1 else centred[rows]) @ v
        if noise is not None:
            scores = torch.cat([scores, noise[rows]], dim=1)
        # a shard takes the scale of all rows' scores, a chunk at a time
        std = scores.std(0) if self.world_size == 1 else _column_std(centred, v, noise)
        loc = scores / std.clamp_min(1e-6)
        self.set_rows(rows, loc, torch.full_like(loc, scale))
        return self

    @torch.no_grad()
    def set_rows(self, idx: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Overwrite rows ``idx`` with N(loc, scale) (for instance an encoder's output)."""
        raw = from_scale(scale)
        self.params[self.table_index(idx)] = torch.cat([loc, raw], dim=-1)

    def forward(self, batch: Batch) -> None:
        self.check_plate(batch)
        register("local", self)
        with data_plate(batch):
            loc, scale = self.rows(batch.idx)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


class LocalTable(PerDatapoint):
    """q(z_n) in a per-datapoint ``family`` (``families.py``) with free parameters for each
    of N datapoints, no encoder: the table's row n is the family's parameters of q(z_n).

    What ``local_inference`` fits for a family other than the diagonal one (whose table is
    ``LocalNormal``); also a guide to train, as ``LocalNormal`` is (its held-out rows are
    fitted afresh in its own family). Rows start at N(0, I).
    """

    def __init__(self, num_data: int, latent_dim: int, family: fam_lib.Spec = "full",
                 sparse: bool = True, rank: int = 0, world_size: int = 1):
        q_family = fam_lib.resolve(family)
        super().__init__(num_data, q_family.width(latent_dim), sparse, rank, world_size)
        self.latent_dim, self.q_family = latent_dim, q_family
        n = len(self.params)
        with torch.no_grad():
            self.params.copy_(q_family.init(torch.zeros(n, latent_dim), torch.ones(n, latent_dim)))

    @property
    def family(self) -> str:
        return self.q_family.title

    def local_family(self):
        return self.q_family

    def rows(self, idx: torch.Tensor):
        """(loc [B, L], marginal scale [B, L]) of the rows ``idx``."""
        return self.q_family.loc_scale(self.table_rows(idx))

    def loc_scale(self, batch: Batch):
        return self.rows(batch.idx)

    def distribution(self, idx: torch.Tensor):
        """q(z_n) of the rows ``idx`` (batch [B], event [L])."""
        return self.q_family.dist(self.table_rows(idx))

    @torch.no_grad()
    def set_rows(self, idx: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Overwrite rows ``idx`` with the family's start at mean ``loc``, scales ``scale``."""
        self.params[self.table_index(idx)] = self.q_family.init(loc, scale).to(self.params)

    def forward(self, batch: Batch) -> None:
        self.check_plate(batch)
        register("local", self)
        with data_plate(batch):
            pyro.sample("z", self.distribution(batch.idx))


def _column_std(centred: torch.Tensor, v: torch.Tensor, noise=None,
                chunk: int = 8192) -> torch.Tensor:
    """``torch.cat([centred @ v, noise], 1).std(0)`` without holding the [N, L] scores."""
    def scores(i):
        s = centred[i:i + chunk] @ v
        return s if noise is None else torch.cat([s, noise[i:i + chunk]], dim=1)
    n = len(centred)
    mean = sum(scores(i).sum(0) for i in range(0, n, chunk)) / n
    return (sum(((scores(i) - mean) ** 2).sum(0) for i in range(0, n, chunk)) / (n - 1)).sqrt()


class LocalFit(NamedTuple):
    """A per-datapoint q* fitted to held-out rows with the decoder frozen: a ``LocalNormal``
    (the diagonal family) or a ``LocalTable`` (any other); its family is
    ``local_family(fit.guide)``."""

    guide: PerDatapoint
    steps: int  # optimizer steps, summed over chunks
    seconds: float


COMPILE_LOCAL_ROWS = 1000  # rows per chunk from which local_inference compiles its step (auto):
# the compile (seconds to a minute, once per process and shape) pays from about here on a CPU


def local_inference(model, x: torch.Tensor, init=None, lr: float = 0.05, objective=None,
                    max_steps: int = 3000, window: int = 30, tol: float = 0.01,
                    decays: int = 6, chunk_size: int = 5000, seed: int = 0,
                    progress: Progress = None, compile: Optional[bool] = None,
                    family: Optional[fam_lib.Spec] = None) -> LocalFit:
    """Fit q*(z_n) in a per-datapoint ``family`` for every row of ``x`` by maximizing its ELBO.

    ``family`` (``families.resolve``: ``diagonal``, N(m_n, diag s_n^2); ``full``;
    ``lowrank:R``; or a family object); None asks ``init`` (``local_family(init)``) and
    falls back to ``diagonal`` where it states none (or there is no ``init``). The diagonal
    family's q* is a ``LocalNormal`` fitted exactly as before families existed (the same
    draws and steps); any other is a ``LocalTable``, started from ``init``'s (loc, scale)
    (``families.LocalFamily.init``) and always fitted eagerly (``compile`` is ignored).

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

    ``compile`` runs each step (the loss, the rows' gradients and Adam's update) as one
    compiled graph (``_CompiledFit``): the same draws, the same fit up to float rounding,
    without Pyro's and autograd's per-step overhead and with the elementwise work fused.
    ``None`` (auto) compiles chunks of at least ``COMPILE_LOCAL_ROWS`` rows where a C++
    compiler is present; ``False`` is the plain eager loop. A compile that fails warns and
    runs the plain loop.
    """
    from .batching import batches_of
    from .objectives import AnalyticKLELBO
    from .rng import seeded

    start_time = time.perf_counter()
    n, device = len(x), x.device
    q_family = _q_family(family, init, x)
    diagonal = q_family.name == fam_lib.DIAGONAL.name

    def table(rows: int) -> PerDatapoint:
        if diagonal:
            return LocalNormal(rows, model.latent_dim, sparse=False).to(device)
        return LocalTable(rows, model.latent_dim, q_family, sparse=False).to(device)

    guide = table(n)
    if not diagonal:
        compile = False
    if compile is None:
        from .compiled import has_compiler
        compile = min(n, chunk_size) >= COMPILE_LOCAL_ROWS and has_compiler()
    with seeded(seed, device):
        if init is not None:
            for batch in batches_of(x, chunk_size):
                with torch.no_grad():
                    loc, scale = loc_scale(init, batch)
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
                                     window, tol, decays, progress, compile)
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
    with _fork(x.device):
        try:
            found = local_family(init, probe)
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
              decays, progress, compile: bool = False) -> int:
    """Adam on one chunk's rows under the plateau rule of ``local_inference``; returns steps.

    The losses of a window are read from the device once per window (``tolist``), summed in
    the same order as one read per step would: the same rule, one host sync per window."""
    fit = _CompiledFit.get(model, chunk, batch, objective) if compile else None
    opt = None if fit is not None else torch.optim.Adam([chunk.params], lr=lr)
    state = fit.start(chunk, lr) if fit is not None else None
    previous, halvings, losses = math.inf, 0, []
    for step in range(1, max_steps + 1):
        if fit is not None:
            loss, state = fit.step(state, batch)
        else:  # the batch is the whole chunk in order: its rows are the table itself (no
            # gather, and no row-sized scatter of the gradient back)
            with torch.enable_grad(), chunk.given_rows([chunk.params]):
                loss = -objective.per_datapoint(model, chunk, batch).sum()
                (grad,) = torch.autograd.grad(loss, [chunk.params])
            chunk.params.grad = grad
            opt.step()
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
            with _fork(batch.x.device):
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
        from .compiled import _Program

        def loss_fn(model, guide, batch):
            return -objective.per_datapoint(model, guide, batch).sum()

        program = _Program(loss_fn, model, chunk, len(batch.idx), ())
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

        with _fork(batch.x.device), pyro.validation_enabled(False), torch.enable_grad():
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


def _fork(device):
    """Keep the draws of the checking and tracing runs out of the caller's random stream."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


# ---------------------------------------------------------------------------------------
# semi-amortized
# ---------------------------------------------------------------------------------------
class _GivenNormal:
    """A guide sampling z ~ N(loc, softplus(raw)) inside the data plate (the rows' own q)."""

    def __init__(self, loc: torch.Tensor, raw: torch.Tensor):
        self.loc, self.raw = loc, raw

    def __call__(self, batch: Batch) -> None:
        with data_plate(batch):
            pyro.sample("z", dist.Normal(self.loc, to_scale(self.raw)).to_event(1))


class SemiAmortizedNormal(Encoded):
    """Semi-amortized inference (Kim, Wiseman, Miller, Sontag & Rush 2018, "SA-VAE").

    q(z | x) = N(loc_K, diag scale_K^2), where (loc_0, scale_0) is the encoder's output and each
    of ``steps`` refinement steps moves the datapoint's own parameters up the gradient of its
    ELBO (analytic KL, one reparameterized sample), step size ``step_size``, each row's
    gradient clipped to norm ``max_norm``. In training and at test time alike. The refined
    parameters stay differentiable, so encoder and decoder train end to end through the
    refinement (SAVI, second-order terms included); with ``stop_gradient`` the refinement
    starts from a detached encoder output: the decoder trains on the refined q and the encoder
    on its own ELBO (``training_loss``).

    The model is held by reference (not as a submodule: its parameters are the model's).
    ``views()`` offers the bare encoder, so both amortization gaps can be measured.
    """

    family = "diagonal normal"
    settings = ("refine_steps", "refine_lr", "refine_stop_gradient")

    def __init__(self, encoder: nn.Module, model: nn.Module, steps: int = 5,
                 step_size: float = 0.05, stop_gradient: bool = False, max_norm: float = 10.0):
        check_refine_lr(step_size, max_norm)
        super().__init__(encoder)
        self._model = [model]
        self.steps, self.step_size = steps, step_size
        self.stop_gradient, self.max_norm = stop_gradient, max_norm

    def _refine(self, batch: Batch):
        """(loc_K, raw_K) of the batch's rows."""
        from .objectives import AnalyticKLELBO, isolated

        loc, scale = self.encoder(batch.x)
        raw = from_scale(scale)
        through = torch.is_grad_enabled() and not self.stop_gradient
        if not through:
            loc, raw = loc.detach().requires_grad_(), raw.detach().requires_grad_()
        model, elbo = self._model[0], AnalyticKLELBO()
        # the inner traces stay out of the caller's; unvalidated: a step too large gives NaNs
        # that the caller's own (validated) pass meets and the divergence guard answers
        with torch.enable_grad(), isolated(), pyro.validation_enabled(False):
            for _ in range(self.steps):
                value = elbo.per_datapoint(model, _GivenNormal(loc, raw), batch).sum()
                g_loc, g_raw = torch.autograd.grad(value, [loc, raw], create_graph=through)
                norm = torch.cat([g_loc, g_raw], -1).norm(dim=-1, keepdim=True)
                clip = (self.max_norm / norm.clamp_min(1e-12)).clamp(max=1.0)
                loc = loc + self.step_size * clip * g_loc
                raw = raw + self.step_size * clip * g_raw
        if not torch.is_grad_enabled() or not through:
            loc, raw = loc.detach(), raw.detach()
        return loc, raw

    def loc_scale(self, batch: Batch):
        loc, raw = self._refine(batch)
        return loc, to_scale(raw)

    def forward(self, batch: Batch) -> None:
        register("encoder", self.encoder)
        loc, raw = self._refine(batch)
        _GivenNormal(loc, raw)(batch)

    def views(self) -> Dict[str, object]:
        return {"encoder": AmortizedNormal(self.encoder)}

    def divergence_cause(self, model, batch: Batch) -> Optional[Tuple[str, str]]:
        """("refine_lr", why) when the refinement is what goes wrong on ``batch``: its
        refined parameters are not finite, or it lowers the ELBO it climbs (by more than a
        tenth of it) instead of raising it, which a step this size on its clipped gradient
        cannot do unless the step is far too large. None otherwise."""
        from .objectives import AnalyticKLELBO
        elbo = AnalyticKLELBO()
        # NaNs are what is looked for: no validation; the draws stay out of the caller's stream
        with _fork(batch.x.device), torch.no_grad(), pyro.validation_enabled(False):
            encoder = elbo.per_datapoint(model, AmortizedNormal(self.encoder), batch).mean()
            loc, raw = self._refine(batch)
            refined = elbo.per_datapoint(model, _GivenNormal(loc, raw), batch).mean()
        what = f"{setting('refine_lr')} {self.step_size:g}, {self.steps} steps"
        if not (torch.isfinite(loc).all() and torch.isfinite(raw).all()):
            return "refine_lr", (f"the semi-amortized refinement diverged ({what}: its "
                                 f"parameters are no longer finite)")
        if not torch.isfinite(refined) and torch.isfinite(encoder):
            return "refine_lr", (f"the semi-amortized refinement diverged ({what}: the ELBO "
                                 f"it climbs went from {float(encoder):.4g} to "
                                 f"{float(refined)} nats per image)")
        if torch.isfinite(encoder) and refined < encoder - 0.1 * abs(encoder):
            return "refine_lr", (f"the semi-amortized refinement lowers the ELBO it should "
                                 f"raise ({float(encoder):.4g} -> {float(refined):.4g} nats "
                                 f"per image; {what}): its step is far too large")
        return None

    def training_loss(self, objective, model, batch: Batch, **kwargs) -> torch.Tensor:
        loss = objective(model, self, batch, **kwargs)
        if not self.stop_gradient:
            return loss
        # the encoder's own ELBO, with the decoder's parameters detached: its value is left
        # out of the reported loss, its gradient reaches the encoder only
        encoder_loss = objective(_Detached(model), AmortizedNormal(self.encoder), batch, **kwargs)
        return loss + encoder_loss - encoder_loss.detach()


def check_refine_lr(step_size: float, max_norm: float = 10.0) -> None:
    """Refuse a refinement step size whose first step can leave float32's range: a step
    moves a datapoint's parameters by up to ``step_size * max_norm`` (the clipped gradient),
    which must stay finite. ``Config.validate`` asks this of ``refine_lr``."""
    limit = float(torch.finfo(torch.float32).max) / max_norm
    if not (isinstance(step_size, (int, float)) and math.isfinite(step_size)
            and 0 < step_size <= limit):
        raise UserError(
            f"{setting('refine_lr')} {step_size:g} is outside (0, {limit:.3g}]: one refinement "
            f"step moves a code by up to {setting('refine_lr')} x {max_norm:g} (the clipped "
            f"gradient), beyond float32's range; use a step such as 0.05 (the default)")


class _Detached(nn.Module):
    """``model`` run on detached copies of its parameters: no gradient reaches them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._inner = [model]

    def forward(self, batch: Batch) -> None:
        import warnings
        from torch.func import functional_call
        model = self._inner[0]
        tensors = {n: t.detach() for n, t in model.named_parameters()}
        with warnings.catch_warnings():  # pyro.module notes that detached tensors are not params
            warnings.filterwarnings("ignore", message=".*not registered in the param store")
            return functional_call(model, tensors, (batch,))


# ---------------------------------------------------------------------------------------
# asking any guide: built-ins answer themselves, other programs are probed
# ---------------------------------------------------------------------------------------
def local_parameters(guide) -> List[torch.Tensor]:
    """The guide's per-datapoint tables (updated row by row); none for a guide without them."""
    fn = getattr(guide, "local_parameters", None)
    return list(fn()) if fn is not None else []


def shard(guide, rank: int, world_size: int):
    """The guide as process ``rank`` of ``world_size`` keeps it (its table rows only)."""
    fn = getattr(guide, "shard", None)
    return fn(rank, world_size) if fn is not None and world_size > 1 else guide


def table_index(guide, idx: torch.Tensor) -> torch.Tensor:
    """Where dataset rows ``idx`` sit in the guide's tables on this process."""
    fn = getattr(guide, "table_index", None)
    return fn(idx) if fn is not None else idx


def compilable(guide) -> bool:
    """Whether a step with ``guide`` may be traced once and replayed: it says so, and a guide
    with tables can hand the tracer their batch rows (``given_rows``)."""
    return bool(getattr(guide, "compilable", True)) and (
        not local_parameters(guide) or hasattr(guide, "given_rows"))


def given_rows(guide, rows: Sequence[torch.Tensor]):
    """The guide's ``given_rows(rows)`` context (a guide without tables: nothing to give)."""
    return guide.given_rows(rows) if rows else contextlib.nullcontext()


def training_loss(guide, objective, model, batch: Batch, **kwargs) -> torch.Tensor:
    """The loss a step minimizes: the guide's own recipe, or ``objective(model, guide, batch)``."""
    fn = getattr(guide, "training_loss", None)
    if fn is not None:
        return fn(objective, model, batch, **kwargs)
    return objective(model, guide, batch, **kwargs)


def held_out(guide, model, x: torch.Tensor, warm=None, **options) -> HeldOut:
    """A guide for the held-out rows ``x``.

    A guide without ``held_out`` is probed: if what it samples depends on the rows' indices
    rather than on ``x`` (an autoguide with a parameter per training row), its parameters
    mean nothing for new rows, so q is fitted afresh like a per-datapoint guide's.
    """
    fn = getattr(guide, "held_out", None)
    if fn is not None:
        return fn(model, x, warm=warm, **options)
    if reads_rows(guide, x):
        fit = local_inference(model, x, init=warm, **options)
        return HeldOut(fit.guide, fit.steps, fit.seconds)
    return HeldOut(guide)


def views(guide) -> Dict[str, object]:
    fn = getattr(guide, "views", None)
    return dict(fn()) if fn is not None else {}


def divergence_cause(guide, model, batch: Batch) -> Optional[Tuple[str, str]]:
    """Why training diverged on ``batch``, when the guide can tell: (the setting that caused
    it, why in words), e.g. a semi-amortized refinement whose step size is too large; None
    (a guide that cannot tell, or finds nothing wrong with its own part): the learning
    rate."""
    fn = getattr(guide, "divergence_cause", None)
    return fn(model, batch) if fn is not None else None


def family(guide, batch: Optional[Batch] = None) -> Optional[str]:
    """The guide's variational family in words: its own answer, or a probe of its ``z``
    site ("diagonal normal", "full-covariance normal", "low-rank normal (rank R)")."""
    if hasattr(guide, "family"):
        return guide.family
    found = _probe_family(guide, batch)
    return found.title if found is not None else None


def _probe_family(guide, batch: Optional[Batch]) -> Optional[fam_lib.LocalFamily]:
    if batch is None:
        return None
    site = _trace(guide, batch).nodes.get("z")
    return fam_lib.of_distribution(site["fn"]) if site is not None else None


def local_family(guide, batch: Optional[Batch] = None) -> Optional[fam_lib.LocalFamily]:
    """The per-datapoint family (``families.LocalFamily``) the guide's q is in, as q*'s is:
    its ``local_family()`` (a name or a family; an attribute is read as well), else the one
    its ``family`` names, else a probe of its ``z`` site on ``batch``; None where none of
    ``families.py`` is stated or found (then q* is diagonal and no amortization gap is
    reported)."""
    answer = getattr(guide, "local_family", None)
    if answer is not None or hasattr(guide, "local_family"):
        answer = answer() if callable(answer) else answer
        return None if answer is None else fam_lib.resolve(answer)
    if hasattr(guide, "family"):
        return fam_lib.of_title(guide.family)
    return _probe_family(guide, batch)


@torch.no_grad()
def loc_scale(guide, batch: Batch, num_samples: int = 64):
    """(loc, scale) the guide offers for the batch: its own, or moments of its ``z`` samples."""
    fn = getattr(guide, "loc_scale", None)
    if fn is not None:
        try:
            return fn(batch)
        except NotImplementedError:
            pass
    from .objectives import traces
    _, guide_tr = traces(lambda b: None, guide, batch, num_samples)
    z = guide_tr.nodes["z"]["value"]  # [S, B, L]
    return z.mean(0), z.std(0).clamp_min(1e-5)


def _trace(guide, batch: Batch):
    from .objectives import traces
    with torch.no_grad():
        return traces(lambda b: None, guide, batch, 1)[1]


def reads_rows(guide, x: torch.Tensor, probe: int = 8) -> bool:
    """Whether the guide's ``z`` depends on the batch's row indices given the same pixels.

    The same rows are offered twice, once under their indices and once under the indices
    reversed, with the same noise; an encoder gives the same z, a table of rows does not.
    """
    from .rng import seeded

    m = min(len(x), probe)
    if m < 2:
        return False
    idx = torch.arange(m, device=x.device)
    zs = []
    try:
        for order in (idx, idx.flip(0)):
            with seeded(0, x.device):
                zs.append(_trace(guide, Batch(x[:m], order, len(x))).nodes["z"]["value"])
    except (ValueError, IndexError, RuntimeError):
        return True  # it cannot even take these rows: its parameters belong to others
    return not torch.allclose(zs[0], zs[1])
