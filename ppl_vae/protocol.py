"""The protocol the pipeline asks a guide, and the functions that ask it.

A guide q(z | x) is a Pyro program with the model's signature ``(batch: Batch) -> None`` that
samples the site ``"z"`` inside the model's subsampled ``"data"`` plate. Beyond that, the
pipeline asks a guide, never its kind:

- ``local_parameters()``: per-datapoint tables that an optimizer updates row by row
  (``RowAdam``); an encoder has none.
- ``given_rows(rows)`` (a guide with tables): a context in which the batch's table rows are
  read from the tensors ``rows`` instead of the tables, so a compiled step differentiates
  those dense [B, width] rows rather than a table whose gradient is sparse.
- ``held_out(model, x, warm=None, fitter=..., **options) -> HeldOut``: a guide over new rows
  ``x`` (an encoder answers itself; a table fits fresh rows with the decoder frozen, with
  the test-time fitter ``fitter`` it is handed; a semi-amortized guide refines its encoder's
  output by itself). It is asked through ``local_fit.held_out``, which hands it the fitter
  (``local_fit.local_inference``) among the fitter's ``options``.
- ``loc_scale(batch)``: the Normal it offers as a warm start and for the 2-D view.
- ``family``: the variational family it searches, in words ("diagonal normal").
- ``local_family()``: the per-datapoint family (``families.py``: ``diagonal``, ``full``,
  ``lowrank:R``, or a family object) its q belongs to for each datapoint: q* is fitted in it
  (``local_fit.local_inference``), and the amortization gap L[q*] - L[q] is reported when
  q*'s family is this one. Default: ``diagonal`` for a diagonal-Normal guide, None
  (unstated: q* is diagonal and no amortization gap) otherwise, e.g. the IAF guide.
- ``views()``: other guides worth scoring beside it (a semi-amortized guide's bare encoder).
- ``compilable``: whether its step may be traced once and replayed (``compiled.py``); a
  guide with tables must also answer ``given_rows``.
- ``training_loss(objective, model, batch, **kw)`` (optional): the loss a step minimizes
  when it is not just ``objective(model, guide, batch)`` (a stopped-gradient refinement).
- ``divergence_cause(model, batch)`` (optional): the setting of its own that made training
  diverge, with why in words (a refinement step too large: ``refine_lr``), or None.

``guides.Guide`` gives the defaults of an amortized guide, and ``guides.py`` the built-in
guides. Guides that do not derive from it (a hand-written function, Pyro's autoguides) are
asked through the functions of this module of the same names (``held_out``: through
``local_fit.held_out``), which probe what the object cannot say (``reads_rows``).

Layering: this module knows no guide class; it imports ``families`` and ``data`` (and, where
it probes a program, ``objectives`` and ``rng``). ``guides.py``, ``local_fit.py``,
``compiled.py``, ``optim.py`` and the pipeline above them import it.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import families as fam_lib
from .batching import Batch
from .objectives import traces
from .rng import seeded


class HeldOut(NamedTuple):
    """A guide for held-out rows, and what fitting it cost (zero for an encoder)."""

    guide: object
    steps: int = 0
    seconds: float = 0.0


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
    _, guide_tr = traces(lambda b: None, guide, batch, num_samples)
    z = guide_tr.nodes["z"]["value"]  # [S, B, L]
    return z.mean(0), z.std(0).clamp_min(1e-5)


def _trace(guide, batch: Batch):
    with torch.no_grad():
        return traces(lambda b: None, guide, batch, 1)[1]


def reads_rows(guide, x: torch.Tensor, probe: int = 8) -> bool:
    """Whether the guide's ``z`` depends on the batch's row indices given the same pixels.

    The same rows are offered twice, once under their indices and once under the indices
    reversed, with the same noise; an encoder gives the same z, a table of rows does not.
    """

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
