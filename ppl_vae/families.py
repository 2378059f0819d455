"""Per-datapoint variational families: the family q*(z_n) is fitted in
(``local_fit.local_inference``).

A family says how one row of a per-datapoint table [N, width] is a distribution over z:

- ``name``: its canonical name (``diagonal``, ``full``, ``lowrank:R``), what ``Scores``
  records as q*'s family and what a guide's ``local_family()`` is compared with;
- ``title``: its name in words (a guide's ``family``; the diagonal one's is "diagonal normal");
- ``width(latent_dim)``: parameters per row;
- ``init(loc, scale)``: rows [B, width] whose distribution has mean ``loc`` and marginal
  standard deviations ``scale`` (a warm start from any guide's ``loc_scale``; a flow family
  of a guide's own flows reads them as its base Normal's, which the IAF guide's are);
- ``dist(rows)``: the distribution over z per row (batch [B], event [L]);
- ``loc_scale(rows)``: its mean and marginal standard deviations.

Built-ins: ``Diagonal`` (N(m, diag s^2), the rows [m, softplus^-1 s] of ``LocalNormal``),
``Full`` (N(m, L L^T), L lower triangular with a positive diagonal: rows [m, softplus^-1
diag L, the strictly lower entries row by row]) and ``LowRank`` (N(m, W W^T + diag d^2), W
[L, R]: rows [m, softplus^-1 d, W row by row]) and ``Flow`` (a Normal through inverse
autoregressive flows whose networks have their own weights per row: Cremer et al.'s
per-datapoint flow; ``Flow.like`` is the IAF guide's own). ``resolve`` turns a name
(``"lowrank:3"``; ``"lowrank"`` is rank ``LowRank.DEFAULT_RANK``; ``"flow"``, ``"flow:T"``,
``"flow:TxH"``) or a family object into a family.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple, Optional, Protocol, Tuple, Union, runtime_checkable

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch.distributions import constraints

from .config import DIAGONAL_TITLE
from .errors import UserError
from .nets import from_scale, to_scale


@runtime_checkable
class LocalFamily(Protocol):
    name: str
    title: str

    def width(self, latent_dim: int) -> int: ...

    def init(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor: ...

    def dist(self, rows: torch.Tensor): ...

    def loc_scale(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]: ...

    # optional: step_scale(latent_dim) -> a tensor [width], each column's share of q*'s
    # learning rate (``step_scale`` below; ``Flow`` steps its networks' weights less)


def _latent(rows: torch.Tensor, width_of) -> int:
    """The latent size L whose width is ``rows.shape[-1]``."""
    width = rows.shape[-1]
    for L in range(1, width + 1):
        if width_of(L) == width:
            return L
    raise ValueError(f"no latent size has rows of width {width}")


class Diagonal:
    """q(z) = N(m, diag s^2): rows [m, softplus^-1(s - 1e-5)] (``LocalNormal``'s)."""

    name, title = "diagonal", DIAGONAL_TITLE

    def width(self, latent_dim: int) -> int:
        return 2 * latent_dim

    def init(self, loc, scale):
        return torch.cat([loc, from_scale(scale)], dim=-1)

    def loc_scale(self, rows):
        loc, raw = rows.chunk(2, dim=-1)
        return loc, to_scale(raw)

    def dist(self, rows):
        return dist.Normal(*self.loc_scale(rows)).to_event(1)


class Full:
    """q(z) = N(m, L L^T) with L lower triangular, diag L = softplus(raw) + 1e-5: rows
    [m (L), raw (L), the strictly lower entries of L (L (L - 1) / 2), row by row]."""

    name, title = "full", "full-covariance normal"

    def width(self, latent_dim: int) -> int:
        return 2 * latent_dim + latent_dim * (latent_dim - 1) // 2

    def init(self, loc, scale):
        L = loc.shape[-1]
        off = loc.new_zeros(*loc.shape[:-1], L * (L - 1) // 2)
        return torch.cat([loc, from_scale(scale), off], dim=-1)

    def scale_tril(self, rows) -> torch.Tensor:
        L = _latent(rows, self.width)
        raw, off = rows[..., L:2 * L], rows[..., 2 * L:]
        tril = torch.diag_embed(to_scale(raw))
        if L > 1:
            i, j = torch.tril_indices(L, L, offset=-1, device=rows.device)
            tril = _put_lower(tril, off, i, j)
        return tril

    def loc_scale(self, rows):
        L = _latent(rows, self.width)
        return rows[..., :L], self.scale_tril(rows).pow(2).sum(-1).sqrt()

    def dist(self, rows):
        L = _latent(rows, self.width)
        return dist.MultivariateNormal(rows[..., :L], scale_tril=self.scale_tril(rows))


def _put_lower(tril: torch.Tensor, off: torch.Tensor, i: torch.Tensor, j: torch.Tensor):
    """``tril`` with its strictly lower entries (i, j) set from ``off`` [..., len(i)]
    (out of place, so gradients reach ``off``)."""
    L = tril.shape[-1]
    flat = off.new_zeros(*off.shape[:-1], L * L)
    flat = flat.index_copy(-1, i * L + j, off)
    return tril + flat.reshape(*off.shape[:-1], L, L)


class LowRank:
    """q(z) = N(m, W W^T + diag d^2), W [L, rank], d = softplus(raw) + 1e-5: rows
    [m (L), raw (L), W (L x rank, row by row)]. ``init`` starts W at ``c`` times the start's
    scale on its first ``rank`` axes (``c`` = 0.5) and d at the rest of each axis's
    variance, so its marginal scales are the start's: W = 0 would be a stationary point of
    the expected ELBO, from which only noise moves it."""

    DEFAULT_RANK = 2
    START = 0.5  # W's share of the start's scale on its first ``rank`` axes

    def __init__(self, rank: int = DEFAULT_RANK):
        if not (isinstance(rank, int) and rank >= 1):
            raise UserError(f"a low-rank family needs a rank >= 1, got {rank!r}")
        self.rank = rank
        self.name, self.title = f"lowrank:{rank}", f"low-rank normal (rank {rank})"

    def width(self, latent_dim: int) -> int:
        return (2 + self.rank) * latent_dim

    def init(self, loc, scale):
        L, r = loc.shape[-1], self.rank
        c = torch.zeros(L, r, dtype=loc.dtype, device=loc.device)
        k = min(L, r)
        c[torch.arange(k), torch.arange(k)] = self.START
        factor = scale.unsqueeze(-1) * c  # [B, L, r]
        diag = scale * (1 - c.pow(2).sum(-1)).sqrt()
        return torch.cat([loc, from_scale(diag), factor.flatten(-2)], dim=-1)

    def parts(self, rows):
        L = _latent(rows, self.width)
        factor = rows[..., 2 * L:].reshape(*rows.shape[:-1], L, self.rank)
        return rows[..., :L], factor, to_scale(rows[..., L:2 * L])

    def loc_scale(self, rows):
        loc, factor, d = self.parts(rows)
        return loc, (d.pow(2) + factor.pow(2).sum(-1)).sqrt()

    def dist(self, rows):
        loc, factor, d = self.parts(rows)
        return dist.LowRankMultivariateNormal(loc, factor, d.pow(2))


class _Made(NamedTuple):
    """One flow's autoregressive network as plain tensors: masks and start weights
    (``pyro.nn.AutoRegressiveNN`` with one hidden layer of ReLUs, outputs [mean, logit])."""
    mask1: torch.Tensor  # [H, L]
    mask2: torch.Tensor  # [2L, H]
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    @classmethod
    def of(cls, transform) -> "_Made":
        """The network of a Pyro ``AffineAutoregressive(stable=True)`` transform; a
        UserError for any other (more hidden layers, skip connections, the unstable form)."""
        arn = getattr(transform, "arn", None)
        layers = getattr(arn, "layers", ())
        if not (getattr(transform, "stable", False) and len(layers) == 2
                and getattr(arn, "skip_layer", None) is None
                and getattr(transform, "sigmoid_bias", None) == Flow.SIGMOID_BIAS
                and isinstance(getattr(arn, "f", None), torch.nn.ReLU)
                and getattr(arn, "output_multiplier", None) == 2):
            raise UserError(f"{type(transform).__name__} is not a flow the per-datapoint flow "
                            f"family holds (a stable affine autoregressive transform with one "
                            f"hidden layer of ReLUs, sigmoid bias {Flow.SIGMOID_BIAS})")
        first, last = layers
        return cls(*(t.detach().clone() for t in (first.mask, last.mask, first.weight,
                                                   first.bias, last.weight, last.bias)))


class _RowIAF(torch.distributions.Transform):
    """A stable affine autoregressive transform (Pyro's ``AffineAutoregressive(stable=True)``:
    y = s x + (1 - s) mean, s = sigmoid(logit + 2)) whose network has its own weights for
    each of B rows: w1 [B, H, L], b1 [B, H], w2 [B, 2L, H], b2 [B, 2L], masks shared.
    Inputs [..., B, L]. Its inverse is the cached one (values it drew), as for a sample."""

    domain = codomain = constraints.real_vector
    bijective, sign = True, +1

    def __init__(self, w1, b1, w2, b2):
        super().__init__(cache_size=1)
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2
        self._log_scale = None

    def _net(self, x):
        h = torch.relu(torch.einsum("...bl,bhl->...bh", x, self.w1) + self.b1)
        out = torch.einsum("...bh,boh->...bo", h, self.w2) + self.b2
        mean, logit = out.chunk(2, dim=-1)
        return mean, logit + Flow.SIGMOID_BIAS

    def _call(self, x):
        mean, logit = self._net(x)
        scale = torch.sigmoid(logit)
        self._log_scale = F.logsigmoid(logit)
        return scale * x + (1 - scale) * mean

    def _inverse(self, y):
        raise NotImplementedError("a per-datapoint flow inverts only the values it drew")

    def log_abs_det_jacobian(self, x, y):
        x_old, y_old = self._cached_x_y
        if x is not x_old or y is not y_old or self._log_scale is None:
            self(x)
        return self._log_scale.sum(-1)


class Flow:
    """q(z) = the law of f_T o ... o f_1 (eps), eps ~ N(m, diag s^2), each f_t a stable
    affine autoregressive transform (Kingma et al. 2016, Pyro's ``AffineAutoregressive``)
    whose network (one hidden layer of H ReLUs, H = 2L by default) has its own weights for
    each datapoint: Cremer et al.'s per-datapoint flow. Rows [m (L), softplus^-1 s (L), then
    per flow its network's w1 (H x L), b1 (H), w2 (2L x H), b2 (2L)].

    ``Flow.like(transforms)`` is the family of a guide's own flows (``AmortizedIAF``): their
    masks, and their weights as every row's start, so ``init(loc, scale)`` with the guide's
    base Normal is exactly the guide's q for that row and q* starts at q. ``Flow(T, H)`` (by
    name: ``flow``, ``flow:T``, ``flow:TxH``) has masks of a seeded order and starts with
    the output weights at zero (each f_t scales by sigmoid(2)), the base scaled to match:
    ``init(loc, scale)`` is then exactly N(loc, diag scale^2). ``loc_scale`` is a Monte
    Carlo estimate (``MOMENT_DRAWS`` draws of a fixed stream)."""

    DEFAULT_FLOWS = 2
    SIGMOID_BIAS = 2.0  # Pyro's AffineAutoregressive(stable=True) default
    # q*'s step on the networks' weights, against its step on the base loc and scale: Adam at
    # the local fit's rate (0.05) on every weight of a trained flow tore it apart (L[q*] 18
    # nats under its start L[q] at epoch 1,000 of the Cremer run; experiments/README section 11)
    WEIGHT_STEP = 0.01
    MOMENT_DRAWS = 256
    SEED = 0  # the order of the masks of a family made by name

    def __init__(self, num_flows: int = DEFAULT_FLOWS, hidden: int = 0, template=None):
        if not (isinstance(num_flows, int) and num_flows >= 1):
            raise UserError(f"a flow family needs at least one flow, got {num_flows!r}")
        self.num_flows, self.hidden = num_flows, hidden
        self._template = tuple(template) if template is not None else None
        self.name = "flow" + (f":{num_flows}" if num_flows != self.DEFAULT_FLOWS or hidden else "") \
            + (f"x{hidden}" if hidden else "")
        self.title = f"per-datapoint IAF ({num_flows} flow{'s' if num_flows > 1 else ''})"
        self._made = {}  # latent size -> the flows' networks (a family made by name)

    @classmethod
    def like(cls, transforms) -> "Flow":
        """The per-datapoint family of these flows (Pyro stable affine autoregressive
        transforms): their masks, their weights as the start."""
        made = [_Made.of(t) for t in transforms]
        L = made[0].mask1.shape[1]
        H = made[0].mask1.shape[0]
        return cls(len(made), 0 if H == 2 * L else H, template=made)

    def hidden_of(self, L: int) -> int:
        return self.hidden or 2 * L

    def width(self, latent_dim: int) -> int:
        L, H = latent_dim, self.hidden_of(latent_dim)
        return 2 * L + self.num_flows * (H * L + H + 2 * L * H + 2 * L)

    def networks(self, L: int):
        """The flows' networks for latent size L: the template's, or seeded ones."""
        if self._template is not None:
            return self._template
        if L not in self._made:
            from pyro.distributions.transforms import affine_autoregressive
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.SEED)
                self._made[L] = tuple(
                    _Made.of(affine_autoregressive(L, [self.hidden_of(L)], stable=True))
                    for _ in range(self.num_flows))
        return self._made[L]

    def init(self, loc, scale):
        L, B = loc.shape[-1], loc.shape[:-1]
        parts = []
        if self._template is None:  # zero outputs: each flow scales by sigmoid(2)
            shrink = torch.sigmoid(torch.tensor(self.SIGMOID_BIAS)).item() ** self.num_flows
            loc, scale = loc / shrink, scale / shrink
        for made in self.networks(L):
            w2, b2 = made.w2, made.b2
            if self._template is None:
                w2, b2 = torch.zeros_like(w2), torch.zeros_like(b2)
            for t in (made.w1, made.b1, w2, b2):
                parts.append(t.to(loc).flatten().expand(*B, t.numel()))
        return torch.cat([loc, from_scale(scale), *parts], dim=-1)

    def step_scale(self, latent_dim: int) -> torch.Tensor:
        """Each column's share of q*'s learning rate: 1 for the base's loc and scale,
        ``WEIGHT_STEP`` for the networks' weights."""
        scale = torch.full((self.width(latent_dim),), self.WEIGHT_STEP)
        scale[:2 * latent_dim] = 1.0
        return scale

    def parts(self, rows):
        """(base loc, base scale, [(w1, b1, w2, b2) per flow]) of rows [B, width]."""
        L = _latent(rows, self.width)
        H = self.hidden_of(L)
        shapes = ((H, L), (H,), (2 * L, H), (2 * L,))
        made = self.networks(L)
        # one split, not a slice per tensor: a slice's backward fills a whole row-sized
        # gradient each, 4 T + 2 of them a step
        loc, raw, *flat = rows.split([L, L] + [math.prod(s) for s in shapes] * len(made), -1)
        flows = []
        for t, net in enumerate(made):
            w1, b1, w2, b2 = (f.reshape(*rows.shape[:-1], *s)
                              for f, s in zip(flat[4 * t:4 * t + 4], shapes))
            flows.append((w1 * net.mask1.to(rows), b1, w2 * net.mask2.to(rows), b2))
        return loc, to_scale(raw), flows

    def dist(self, rows):
        loc, scale, flows = self.parts(rows)
        return dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1),
                                            [_RowIAF(*f) for f in flows])

    @torch.no_grad()
    def loc_scale(self, rows):
        loc, scale, flows = self.parts(rows.detach())
        g = torch.Generator(device=rows.device).manual_seed(self.SEED)
        eps = torch.randn((self.MOMENT_DRAWS, *loc.shape), generator=g, device=rows.device,
                          dtype=rows.dtype)
        z = loc + scale * eps
        for f in flows:
            z = _RowIAF(*f)(z)
        return z.mean(0), z.std(0).clamp_min(1e-5)


DIAGONAL, FULL = Diagonal(), Full()
NAMES = ("diagonal", "full", "lowrank", "flow")  # what ``resolve`` takes by name (lowrank[:R], flow[:T[xH]])

Spec = Union[str, LocalFamily]


def resolve(family: Spec) -> LocalFamily:
    """A family from its name (``diagonal``, ``full``, ``lowrank``, ``lowrank:R``, ``flow``,
    ``flow:T`` or ``flow:TxH``) or itself (any object with the ``LocalFamily`` members)."""
    if not isinstance(family, str):
        if isinstance(family, LocalFamily):
            return family
        raise UserError(f"{family!r} is not a per-datapoint family (one of {', '.join(NAMES)}, "
                        f"or an object with name, title, width, init, dist and loc_scale)")
    name = family.strip().lower()
    if name == "diagonal":
        return DIAGONAL
    if name == "full":
        return FULL
    if name == "lowrank" or name.startswith("lowrank:"):
        rank = name.partition(":")[2]
        if rank and not rank.isdigit():
            raise UserError(f"unknown per-datapoint family {family!r}: the rank of lowrank:R "
                            f"is a whole number")
        return LowRank(int(rank)) if rank else LowRank()
    if name == "flow" or name.startswith("flow:"):
        match = re.fullmatch(r"flow(?::([1-9][0-9]*)(?:x([1-9][0-9]*))?)?", name)
        if match is None:
            raise UserError(f"unknown per-datapoint family {family!r}: flow, flow:T (T flows) "
                            f"or flow:TxH (H hidden units)")
        flows, hidden = match.groups()
        return Flow(int(flows) if flows else Flow.DEFAULT_FLOWS, int(hidden or 0))
    raise UserError(f"unknown per-datapoint family {family!r}; one of diagonal, full, lowrank "
                    f"(lowrank:R for rank R), flow (flow:T, flow:TxH)")


def step_scale(family: LocalFamily, latent_dim: int) -> Optional[torch.Tensor]:
    """Each column's share of q*'s learning rate, as ``family`` states it
    (``step_scale(latent_dim)``, a tensor of its width); None: every column at the rate (a
    family that says nothing, such as the Gaussians', whose columns are all loc and scale)."""
    ask = getattr(family, "step_scale", None)
    return ask(latent_dim) if ask is not None else None


def of_distribution(fn) -> Optional[LocalFamily]:
    """The family a guide's ``z`` distribution belongs to, where it is one of ours: a Normal
    (independent over z's axes), a MultivariateNormal, a LowRankMultivariateNormal."""
    while isinstance(fn, (dist.Independent, torch.distributions.Independent)):
        fn = fn.base_dist
    if isinstance(fn, (dist.Normal, torch.distributions.Normal)):
        return DIAGONAL
    if isinstance(fn, (dist.LowRankMultivariateNormal,
                       torch.distributions.LowRankMultivariateNormal)):
        return LowRank(fn.cov_factor.shape[-1])
    if isinstance(fn, (dist.MultivariateNormal, torch.distributions.MultivariateNormal)):
        return FULL
    return None


def of_title(title: Optional[str]) -> Optional[LocalFamily]:
    """The family whose ``title`` is ``title`` (a guide's ``family``), if one of ours."""
    if title is None:
        return None
    if title == DIAGONAL.title:
        return DIAGONAL
    if title == FULL.title:
        return FULL
    if title.startswith("low-rank normal (rank ") and title.endswith(")"):
        rank = title[len("low-rank normal (rank "):-1]
        return LowRank(int(rank)) if rank.isdigit() else None
    return None


# KL(q || p) in closed form for a full or low-rank q against a diagonal Normal p (the
# standard Normal prior), so that ``objectives.AnalyticKLELBO`` fits these families' q* with
# the KL's noise gone, as it does the diagonal one's; any other p is left to Monte Carlo
def _kl_to_diagonal(q, p):
    base = p.base_dist
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    if not (isinstance(base, torch.distributions.Normal)
            and p.event_shape == q.event_shape and len(q.event_shape) == 1):
        raise NotImplementedError
    var = base.scale.pow(2)  # [..., L]
    if isinstance(q, torch.distributions.LowRankMultivariateNormal):
        cov = q.covariance_matrix
        q_var = torch.diagonal(cov, dim1=-2, dim2=-1)
        logdet = torch.logdet(cov)
    else:
        tril = q.scale_tril
        q_var = tril.pow(2).sum(-1)
        logdet = 2 * torch.diagonal(tril, dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * ((q_var / var).sum(-1) + ((q.loc - base.loc).pow(2) / var).sum(-1)
                  - q.event_shape[0] + var.log().sum(-1) - logdet)


torch.distributions.kl.register_kl(torch.distributions.MultivariateNormal,
                                   torch.distributions.Independent)(_kl_to_diagonal)
torch.distributions.kl.register_kl(torch.distributions.LowRankMultivariateNormal,
                                   torch.distributions.Independent)(_kl_to_diagonal)


def same(a: Optional[LocalFamily], b: Optional[LocalFamily]) -> bool:
    """Whether two families are one (by name); an unstated one matches none."""
    return a is not None and b is not None and a.name == b.name


__all__ = ["LocalFamily", "Diagonal", "Full", "LowRank", "Flow", "DIAGONAL", "FULL", "NAMES",
           "resolve", "of_distribution", "of_title", "same"]
