"""The built-in guides q(z | x): the protocol's defaults (``Guide``) and the guide families.

What the pipeline asks a guide, with its defaults (``protocol.Answers``, which ``Guide``
derives from), and the adapter that gives them to any other guide (``protocol.as_guide``)
are ``protocol.py``; fitting q* to new rows is ``local_fit.py``.

Built-ins: ``AmortizedNormal`` (encoder), ``AmortizedIAF`` (encoder + flows) and
``SemiAmortizedNormal`` (encoder + gradient refinement, Kim et al. 2018), on the base
``Encoded`` that owns the encoder; ``LocalNormal`` (per-datapoint table, no encoder; base
``PerDatapoint`` owns the table) and ``LocalTable`` (a table in any per-datapoint family of
``families.py``). Scales come from ``nets.to_scale`` everywhere.

Layering: above ``protocol.py`` (``Answers``, ``HeldOut``, ``family_of``), ``families``, ``nets`` and
``model``; below ``local_fit.py``, whose q* are this module's tables. A table's
``held_out`` gets the fitter as an argument (``fitter``), so this module never imports
``local_fit``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Sequence, Tuple

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
from .protocol import Answers, HeldOut, family_of
from .rng import forked
from .objectives import AnalyticKLELBO, isolated


class Guide(Answers, nn.Module):
    """A built-in guide: an ``nn.Module`` with the protocol's answers (``protocol.Answers``:
    an amortized guide's); subclasses override what differs."""

    settings: Tuple[str, ...] = ()  # the Config settings of this kind of guide (report, checks)
    described: Optional[str] = None  # its inference in words, for the report's title


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

    described = "amortized"

    family = fam_lib.DIAGONAL.title

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

    described = "flow (IAF)"

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
    frozen (``local_fit.local_inference``). Subclasses say what a row means.
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

    def held_out(self, model, x: torch.Tensor, warm=None, *, fitter, **options) -> HeldOut:
        """Fresh rows fitted by ``fitter`` (``local_fit.local_inference``, which
        ``local_fit.held_out`` hands over) in this table's family, warm-started at ``warm``."""
        options.setdefault("family", family_of(self) or fam_lib.DIAGONAL)
        fit = fitter(model, x, init=warm, **options)
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

    described = "mean-field"

    family = fam_lib.DIAGONAL.title

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

    What ``local_fit.local_inference`` fits for a family other than the diagonal one (whose
    table is ``LocalNormal``); also a guide to train, as ``LocalNormal`` is (its held-out
    rows are fitted afresh in its own family). Rows start at N(0, I).
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

    described = "semi-amortized"

    family = fam_lib.DIAGONAL.title
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
        elbo = AnalyticKLELBO()
        # NaNs are what is looked for: no validation; the draws stay out of the caller's stream
        with forked(batch.x.device), torch.no_grad(), pyro.validation_enabled(False):
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
