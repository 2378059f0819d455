"""Per-datapoint variational families: the family q*(z_n) is fitted in (``guides.local_inference``).

A family says how one row of a per-datapoint table [N, width] is a distribution over z:

- ``name``: its canonical name (``diagonal``, ``full``, ``lowrank:R``), what ``Scores``
  records as q*'s family and what a guide's ``local_family()`` is compared with;
- ``title``: its name in words (``guides.family``; the diagonal one's is "diagonal normal");
- ``width(latent_dim)``: parameters per row;
- ``init(loc, scale)``: rows [B, width] whose distribution has mean ``loc`` and marginal
  standard deviations ``scale`` (a warm start from any guide's ``loc_scale``);
- ``dist(rows)``: the distribution over z per row (batch [B], event [L]);
- ``loc_scale(rows)``: its mean and marginal standard deviations.

Built-ins: ``Diagonal`` (N(m, diag s^2), the rows [m, softplus^-1 s] of ``LocalNormal``),
``Full`` (N(m, L L^T), L lower triangular with a positive diagonal: rows [m, softplus^-1
diag L, the strictly lower entries row by row]) and ``LowRank`` (N(m, W W^T + diag d^2), W
[L, R]: rows [m, softplus^-1 d, W row by row]). ``resolve`` turns a name (``"lowrank:3"``;
``"lowrank"`` is rank ``LowRank.DEFAULT_RANK``) or a family object into a family.
"""
from __future__ import annotations

from typing import Optional, Protocol, Tuple, Union, runtime_checkable

import pyro.distributions as dist
import torch

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


def _latent(rows: torch.Tensor, width_of) -> int:
    """The latent size L whose width is ``rows.shape[-1]``."""
    width = rows.shape[-1]
    for L in range(1, width + 1):
        if width_of(L) == width:
            return L
    raise ValueError(f"no latent size has rows of width {width}")


class Diagonal:
    """q(z) = N(m, diag s^2): rows [m, softplus^-1(s - 1e-5)] (``LocalNormal``'s)."""

    name, title = "diagonal", "diagonal normal"

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


DIAGONAL, FULL = Diagonal(), Full()
NAMES = ("diagonal", "full", "lowrank")  # what ``resolve`` takes by name (lowrank[:R])

Spec = Union[str, LocalFamily]


def resolve(family: Spec) -> LocalFamily:
    """A family from its name (``diagonal``, ``full``, ``lowrank`` or ``lowrank:R``) or
    itself (any object with the ``LocalFamily`` members)."""
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
    raise UserError(f"unknown per-datapoint family {family!r}; one of diagonal, full, lowrank "
                    f"(lowrank:R for rank R)")


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


__all__ = ["LocalFamily", "Diagonal", "Full", "LowRank", "DIAGONAL", "FULL", "NAMES",
           "resolve", "of_distribution", "of_title", "same"]
