"""The protocol the pipeline asks a guide (``Answers``, with its defaults), and ``as_guide``,
the one adapter that makes any guide answer it.

A guide q(z | x) is a Pyro program with the model's signature ``(batch: Batch) -> None`` that
samples the site ``"z"`` inside the model's subsampled ``"data"`` plate. Beyond that, the
pipeline asks a guide, never its kind, through these members of ``Answers``:

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
- ``loc_scale(batch)``: the Normal it offers as a warm start and for the 2-D view (default:
  the moments of its ``z`` samples).
- ``family``: the variational family it searches, in words ("diagonal normal").
- ``local_family()``: the per-datapoint family (``families.py``: ``diagonal``, ``full``,
  ``lowrank:R``, or a family object) its q belongs to for each datapoint: q* is fitted in it
  (``local_fit.local_inference``), and the amortization gap L[q*] - L[q] is reported when
  q*'s family is this one. Default: the one its ``family`` names, None (unstated: q* is
  diagonal and no amortization gap) otherwise, e.g. the IAF guide. Read through
  ``family_of``, which also probes the ``z`` site of a guide that states no family at all.
- ``views()``: other guides worth scoring beside it (a semi-amortized guide's bare encoder).
- ``compilable``: whether its step may be traced once and replayed (``compiled.py``); a
  guide with tables must also answer ``given_rows`` (``traceable()`` says both).
- ``training_loss(objective, model, batch, **kw)``: the loss a step minimizes (default:
  ``objective(model, guide, batch)``; a stopped-gradient refinement differs).
- ``divergence_cause(model, batch)``: the setting of its own that made training diverge,
  with why in words (a refinement step too large: ``refine_lr``), or None.
- ``shard(rank, world_size)`` and ``table_index(idx)``: under torchrun, the guide as one
  process keeps it, and where dataset rows sit in its tables.

``guides.Guide`` (an ``nn.Module`` with these answers) is the base of the built-in guides.
Any other guide (a user's ``module:Class``, Pyro's autoguides) is adapted once where it is
built (``build.build_guide``) or handed to the Python API (``train.fit``,
``evaluate.evaluate_model``, ``local_fit``): ``as_guide`` gives its object the defaults of
what it does not answer itself, in place, as Pyro's ``to_pyro_module_`` does, so its
parameters' names, its state and its class's name stay its own; a guide without
``held_out`` is then probed (``reads_rows``) when asked for held-out rows.

Layering: this module knows no guide class; it imports ``families`` and ``data`` (and, where
it probes a program, ``objectives`` and ``rng``). ``guides.py``, ``local_fit.py``,
``compiled.py``, ``optim.py`` and the pipeline above them import it.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

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


class Answers:
    """The protocol with its defaults: an amortized guide's answers. ``guides.Guide`` derives
    from it; ``as_guide`` gives them to any other guide. Override what differs."""

    family: Optional[str] = None  # the family it searches, in words; None: unstated
    compilable = True
    _states_family = True  # False (``as_guide``): it names no family; ``family_of`` probes

    def local_parameters(self) -> List[torch.Tensor]:
        return []

    def held_out(self, model, x: torch.Tensor, warm=None, **options) -> HeldOut:
        return HeldOut(self)  # an encoder answers new rows itself

    @torch.no_grad()
    def loc_scale(self, batch: Batch, num_samples: int = 64):
        """(loc, scale) for the batch: by default the moments of its ``z`` samples."""
        _, guide_tr = traces(lambda b: None, self, batch, num_samples)
        z = guide_tr.nodes["z"]["value"]  # [S, B, L]
        return z.mean(0), z.std(0).clamp_min(1e-5)

    def views(self) -> Dict[str, object]:
        return {}

    def local_family(self):
        """The per-datapoint family its q is in (q*'s): the one its ``family`` names (a
        ``families.LocalFamily``), None where it names none of ``families.py``'s."""
        return fam_lib.of_title(self.family)

    def training_loss(self, objective, model, batch: Batch, **kwargs) -> torch.Tensor:
        """The loss a step minimizes: ``objective(model, guide, batch)``."""
        return objective(model, self, batch, **kwargs)

    def divergence_cause(self, model, batch: Batch) -> Optional[Tuple[str, str]]:
        """Why training diverged on ``batch``, when the guide can tell: (the setting that
        caused it, why in words); None: the learning rate."""
        return None

    def shard(self, rank: int, world_size: int):
        """Keep only what process ``rank`` of ``world_size`` needs (networks: everything)."""
        return self

    def table_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Where dataset rows ``idx`` sit in this process's tables (``local_parameters``)."""
        return idx

    def traceable(self) -> bool:
        """Whether a step with it may be traced once and replayed: it says so
        (``compilable``), and a guide with tables can hand the tracer their batch rows
        (``given_rows``)."""
        return bool(self.compilable) and (not list(self.local_parameters())
                                          or hasattr(self, "given_rows"))


def as_guide(obj):
    """``obj`` answering the protocol (``Answers``): a guide that derives from it as it is;
    any other ``nn.Module`` has its class extended in place by the defaults of what it does
    not answer itself (as Pyro's ``to_pyro_module_`` changes a module's class in place), so
    its state, its parameters' names and its class's name stay its own, and
    ``isinstance(obj, TheirClass)`` still holds. Applying it again changes nothing."""
    if isinstance(obj, Answers):
        return obj
    if not isinstance(obj, torch.nn.Module):
        if not callable(obj):
            raise TypeError(f"a guide is a Pyro program (a callable taking a Batch), got "
                            f"{type(obj).__name__}")
        return _Function(obj)  # a hand-written function: its parameters in Pyro's store
    obj.__class__ = _answering(type(obj))
    return obj


_ADAPTED: Dict[type, type] = {}


def _answering(cls: type) -> type:
    """``cls`` with ``Answers``' defaults behind its own answers (one class per ``cls``)."""
    made = _ADAPTED.get(cls)
    if made is None:
        space = {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                 "__doc__": cls.__doc__,
                 # it names no family at all: ``family_of`` probes its z site
                 "_states_family": hasattr(cls, "family") or hasattr(cls, "local_family")}
        if not hasattr(cls, "held_out"):
            space["held_out"] = _probed_held_out
        made = _ADAPTED[cls] = type(cls)(cls.__name__, (cls, Answers), space)
    return made


def _probed_held_out(self, model, x: torch.Tensor, warm=None, *, fitter, **options) -> HeldOut:
    """A guide that does not say how it answers new rows is probed: if what it samples
    depends on the rows' indices rather than on ``x`` (an autoguide with a parameter per
    training row), its parameters mean nothing for new rows, so q is fitted afresh like a
    per-datapoint guide's; else it answers them itself."""
    if reads_rows(self, x):
        fit = fitter(model, x, init=warm, **options)
        return HeldOut(fit.guide, fit.steps, fit.seconds)
    return HeldOut(self)


class _Function(Answers):
    """A guide written as a function (its parameters in Pyro's param store), answering the
    protocol with the defaults; it states no family (probed) and is probed for held-out
    rows."""

    _states_family = False

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    held_out = _probed_held_out


def family_of(guide, probe: Optional[Batch] = None) -> Optional[fam_lib.LocalFamily]:
    """The per-datapoint family (``families.LocalFamily``) the guide's q is in, as q*'s is:
    its ``local_family()`` (a name or a family; an attribute is read as well), resolved; a
    guide that states no family at all (``as_guide`` found neither ``family`` nor
    ``local_family``) is probed: the distribution of its ``z`` site on ``probe``. None where
    none of ``families.py`` is stated or found (then q* is diagonal and no amortization gap
    is reported)."""
    answer = guide.local_family
    answer = answer() if callable(answer) else answer
    if answer is not None:
        return fam_lib.resolve(answer)
    if guide._states_family or guide.family is not None:
        return None
    return _probe_family(guide, probe)


def family_words(guide, probe: Optional[Batch] = None) -> Optional[str]:
    """The guide's variational family in words: its ``family``, or the title of what
    ``family_of`` finds ("full-covariance normal", "low-rank normal (rank R)")."""
    if guide.family is not None:
        return guide.family
    found = family_of(guide, probe)
    return found.title if found is not None else None


def _probe_family(guide, batch: Optional[Batch]) -> Optional[fam_lib.LocalFamily]:
    if batch is None:
        return None
    site = _trace(guide, batch).nodes.get("z")
    return fam_lib.of_distribution(site["fn"]) if site is not None else None


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
