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
from dataclasses import dataclass, field
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from . import distributed, families, local_fit, protocol
from .batching import Batch, batches_of
from .compiled import PAYS_FROM_LOG_PX_ROWS, Compiled, compiles
from .objectives import log_weights
from .rng import own_rng

Progress = Optional[Callable[[int], None]]  # called with the number of rows (or steps) done


class Estimate(NamedTuple):
    """A per-datapoint quantity summarized: mean over data and its standard error."""

    mean: float
    stderr: float

    @classmethod
    def of(cls, values: torch.Tensor) -> "Estimate":
        v = values.double()
        return cls(float(v.mean()), float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0)




@own_rng
@torch.no_grad()
def log_px(model, guide, x: torch.Tensor, num_particles: int = 5000, seed: int = 0,
           max_rows: Optional[int] = None, progress: Progress = None,
           compile=None) -> torch.Tensor:
    """Importance-sampled log p(x) per datapoint [N]: logsumexp_k lw_k - log K (IWAE_K).

    Vectorized over particles and data and chunked so that at most ``max_rows`` decoder rows
    are alive at once, whatever K (None: ``chunk_rows``). Unbiased for p(x), so a stochastic
    lower bound on log p(x).
    ``compile`` runs each chunk as a compiled graph (``compiled.Compiled``): the same estimate
    up to float rounding, with the elementwise work fused (about twice as fast on a CPU, after
    a compile of seconds): the ``--compile`` setting (``compiled.compiles``; True/False/None
    mean on/off/auto), ``auto`` from K x N = ``compiled.PAYS_FROM_LOG_PX_ROWS`` decoder rows.
    """
    compile = compiles(compile, num_particles * len(x), PAYS_FROM_LOG_PX_ROWS)
    max_rows = max_rows or chunk_rows(compile)
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


def chunk_rows(compiled: bool) -> int:
    """Decoder rows per chunk of ``log_px``: 2 ** 13 for a compiled chunk, whose fused kernels
    then work on logits that stay in the CPU's cache (1.17x the decoder's matrix-product
    floor against 1.47x at 2 ** 15, ``experiments/bench.py --part eval``, one thread); 2 **
    15 eagerly, where each chunk's Python and dispatch overhead dominates (0.63x the time of
    2 ** 13, issue 23)."""
    return 2 ** 13 if compiled else 2 ** 15


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
    """E_q[z | x] for every row [N, L]: what the guide offers as its loc (``loc_scale``)."""
    guide = protocol.as_guide(guide)
    return torch.cat([guide.loc_scale(b)[0] for b in batches_of(x, batch_size)])


def active_units(means: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies over the data: Var_x E_q[z_d] > threshold."""
    return int((means.var(0) > threshold).sum())


def _paired(a: torch.Tensor, b: torch.Tensor) -> Estimate:
    """mean(a - b) with the standard error of the paired differences."""
    return Estimate.of(a - b)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    # disable=None: tqdm draws only on a terminal (a log file gets no bar updates)
    return tqdm(total=total, desc=desc, disable=None if enabled is True else True, leave=False,
                dynamic_ncols=True)


UNIT_ROWS = 5000  # rows evaluated as one unit, with its own seed (local_inference's chunk)
SPLITS = ("test", "valid", "train")


@dataclass(frozen=True)
class View:
    """A guide's other view scored on the same rows (a semi-amortized guide's bare encoder):
    its ELBO and, when it is in q*'s family, its amortization gap L[q*] - L[view]."""

    name: str
    elbo: Estimate
    amortization_gap: Optional[Estimate] = None


@dataclass(frozen=True)
class Scores:
    """Every held-out number of one model on the rows of one split (``evaluate_model``).

    Estimates carry their standard error over rows (``Estimate``); a quantity that was not
    computed is None. ``to_json`` is the one place the keys of ``eval.json`` (and of a
    comparison's ``results.json`` entries and the gap curves' lines) are spelled:
    ``json_key``. The posterior means go to the figures and are never written as numbers.
    """

    split: str  # test, valid or train: the rows that were scored
    rows: int
    num_particles: int  # K of the log p(x) estimate
    proposal: str  # of log p(x): guide (the own guide) or local (q*)
    elbo: Estimate  # L[q] of the model's own guide, as it answers for these rows
    log_px: Estimate
    rate: float  # KL(q || p) of the own guide, Monte Carlo
    distortion: float  # -E_q log p(x | z)
    active_units: int
    seconds: float  # of the whole evaluation
    log_px_seconds: float
    elbo_local: Optional[Estimate] = None  # L[q*]
    approximation_gap: Optional[Estimate] = None  # log p(x) - L[q*], paired
    amortization_gap: Optional[Estimate] = None  # L[q*] - L[q], paired; None off q*'s family
    views: Tuple[View, ...] = ()
    local_steps: Optional[int] = None  # of the q* fit
    local_seconds: Optional[float] = None
    local_family: Optional[str] = None  # q*'s family (``families``' name: diagonal, full, ...)
    means: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)  # [N, L]

    @staticmethod
    def json_key(quantity: str, split: str) -> str:
        """The file name of a quantity scored on ``split``: the estimates of the rows are
        named by it (``test_elbo``, ``valid_log_px``, ``train_elbo_local``,
        ``test_elbo_encoder``, each with ``..._stderr``); the gaps, rate, distortion and
        active units keep their own names, of the same rows (the file's ``split``)."""
        if quantity.endswith("_stderr"):
            return Scores.json_key(quantity[:-len("_stderr")], split) + "_stderr"
        if quantity in ("elbo", "log_px") or quantity.startswith("elbo_"):
            return f"{split}_{quantity}"
        return quantity

    def estimates(self) -> Dict[str, Optional[Estimate]]:
        """Every estimate by quantity name, views included (``elbo_<view>``,
        ``amortization_gap_<view>``)."""
        out = {"elbo": self.elbo, "elbo_local": self.elbo_local, "log_px": self.log_px,
               "approximation_gap": self.approximation_gap,
               "amortization_gap": self.amortization_gap}
        for v in self.views:
            out[f"elbo_{v.name}"] = v.elbo
            out[f"amortization_gap_{v.name}"] = v.amortization_gap
        return out

    def by_quantity(self) -> dict:
        """Every number under its quantity's own name, the split left out (``elbo``,
        ``elbo_stderr``, ``log_px``, ..., ``rate``, ``seconds``): for tables and figures that
        put rows of several splits side by side. A quantity not computed is None; a view's
        gap outside q*'s family is left out."""
        doc = {"split": self.split, "num_rows": self.rows, "num_particles": self.num_particles,
               "proposal": self.proposal}
        if self.local_family is not None:
            doc["local_family"] = self.local_family
        if self.local_steps is not None:
            doc.update(local_steps=self.local_steps, local_seconds=self.local_seconds)
        for name, est in self.estimates().items():
            if est is None and name not in ("amortization_gap", "approximation_gap",
                                            "elbo_local"):
                continue
            doc[name], doc[name + "_stderr"] = (est.mean, est.stderr) if est else (None, None)
        doc.update(rate=self.rate, distortion=self.distortion, active_units=self.active_units,
                   log_px_seconds=self.log_px_seconds, seconds=self.seconds)
        return doc

    def to_json(self) -> dict:
        """``by_quantity`` under the files' names (``json_key``)."""
        return {self.json_key(k, self.split): v for k, v in self.by_quantity().items()}

    @classmethod
    def from_json(cls, doc: dict) -> "Scores":
        """Read ``to_json``'s layout, and the older ones: files written before the keys named
        their split (``test_*`` names whatever the split, ``log_px_stderr``), and before q*'s
        family was recorded (``local_family``: then diagonal wherever q* was fitted)."""
        split = doc.get("split", "test")

        def get(quantity):
            for key in (cls.json_key(quantity, split), cls.json_key(quantity, "test"),
                        quantity):
                if key in doc:
                    return doc[key]
            return None

        def est(quantity) -> Optional[Estimate]:
            mean, err = get(quantity), get(quantity + "_stderr")
            if mean is None:
                return None
            return Estimate(float(mean), float(err) if err is not None else math.nan)

        prefixes = {f"{split}_elbo_", "test_elbo_"}
        names = sorted({k[len(p):] for k in doc for p in prefixes
                        if k.startswith(p) and not k.endswith("_stderr")} - {"local"})
        views = tuple(View(n, est(f"elbo_{n}"), est(f"amortization_gap_{n}")) for n in names)
        elbo_local = est("elbo_local")
        local_family = doc.get("local_family", families.DIAGONAL.name if elbo_local else None)
        return cls(split=split, rows=int(doc.get("num_rows", doc.get("rows", 0))),
                   num_particles=int(doc.get("num_particles", 0)),
                   proposal=str(doc.get("proposal", "")), elbo=est("elbo"),
                   log_px=est("log_px"), rate=doc.get("rate"),
                   distortion=doc.get("distortion"), active_units=doc.get("active_units"),
                   seconds=doc.get("seconds"), log_px_seconds=doc.get("log_px_seconds"),
                   elbo_local=elbo_local, approximation_gap=est("approximation_gap"),
                   amortization_gap=est("amortization_gap"), views=views,
                   local_steps=doc.get("local_steps"), local_seconds=doc.get("local_seconds"),
                   local_family=local_family)


def why_no_amortization_gap(per_datapoint: bool, guide_family: Optional[str],
                            q_family: Optional[str]) -> str:
    """Why a guide scored with q* has no amortization gap, in words (what ``eval.json``'s
    ``amortization_gap_why`` and the report say)."""
    if per_datapoint:
        return "a per-datapoint table: its q on held-out rows is a local fit, q* itself"
    if q_family is None:
        return "q* was not fitted (--local)"
    return (f"q* was fitted in the {q_family} family and the guide's q is "
            f"{'in ' + guide_family if guide_family else 'in no family q* can take'}: the gap "
            f"compares q with the best member of its own family (--local-family names q*'s; "
            f"a guide says its own with local_family())")


def evaluate_model(model, guide, x: torch.Tensor, num_particles: int = 5000,
                   local: bool = True, proposal: str = "auto", seed: int = 0,
                   local_options: Optional[dict] = None, progress: bool = True,
                   unit_rows: int = UNIT_ROWS, split: str = "test",
                   local_family: Optional[families.Spec] = None) -> Optional[Scores]:
    """Every held-out number of one model on rows ``x`` of ``split``, as ``Scores``.

    - ``elbo``: the ELBO of the model's own guide on these rows, as the guide answers
      ``held_out`` (an encoder as it is; a per-datapoint guide fitted to the rows from
      N(0, I), which is how such a model is used; a semi-amortized guide after refinement).
    - ``elbo_local`` = L[q*]: q* fitted per datapoint by ``local_inference`` in
      ``local_family`` (``families.resolve``: diagonal, full, lowrank:R, flow, or a family object;
      None: the guide's own, ``protocol.family_of``, diagonal where it states none),
      warm-started from the guide (or the own guide itself when that already is such a fit
      in that family). ``Scores.local_family`` records which.
    - ``log_px``: importance-sampled log p(x) with ``num_particles`` samples from
      ``proposal``: ``"guide"`` (the own guide), ``"local"`` (q*), or ``"auto"`` (q* when fitted).
      ``local_options["compile"]`` (the run's ``--compile``, ``config.local_fit_options``)
      decides, by ``compiled.compiles``, whether q*'s fit and this estimate are compiled.
    - ``approximation_gap`` = log p(x) - L[q*] (of q*'s family); ``amortization_gap`` =
      L[q*] - L[q] when the guide's stated per-datapoint family (``protocol.family_of``) is
      q*'s (None otherwise, e.g. a diagonal guide scored with a full q*), with
      standard errors of the paired differences. Each of ``guide.views()`` (a
      semi-amortized guide's bare encoder) adds a ``View`` with its ELBO and amortization gap.
    - ``rate``/``distortion`` of the own guide; ``active_units`` and ``means`` (the
      posterior means, for the figures) of its posterior.

    The rows are evaluated in units of ``unit_rows`` (unit u seeded with ``seed + u``), so
    the numbers do not depend on how the units are shared out: under torchrun each process
    takes units u with u mod W = rank, and rank 0 gathers the per-row values and returns the
    same scores as one process (the other processes return None).

    Why so many parameters: each is an option of the evaluation a user may set from Python
    (K, q* or not, the proposal, the seed, q*'s options, progress, the units, the split,
    q*'s family); the pipeline fills them from one record (``config.local_fit_options``).
    """

    start = time.perf_counter()
    if proposal not in ("auto", "guide", "local"):
        raise ValueError(f"unknown proposal {proposal!r}")
    guide = protocol.as_guide(guide)  # a guide handed to the Python API: the defaults
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    local_options = dict(local_options or {})
    asked = local_options.pop("family", None)
    local_family = local_family if local_family is not None else asked
    if local_family is not None:
        local_family = families.resolve(local_family)
    world = distributed.current()
    units = list(enumerate(range(0, len(x), unit_rows)))  # (unit, its first row)
    mine = {u: _evaluate_rows(model, guide, x[first:first + unit_rows], num_particles, local,
                              proposal, seed + u, dict(local_options), progress, local_family)
            for u, first in units if u % world.size == world.rank}
    if world.size > 1:
        parts = distributed.gather_objects(
            {u: {k: v.cpu() if torch.is_tensor(v) else v for k, v in r.items()}
             for u, r in mine.items()}, world)
        if not world.main:
            return None
        mine = {u: r for part in parts for u, r in part.items()}
    rows = [mine[u] for u, _ in units]
    cat = {k: torch.cat([r[k].to(x.device) for r in rows]) for k, v in rows[0].items()
           if torch.is_tensor(v)}
    first = rows[0]
    fitted = first["fitted"]
    local_elbo = cat["local_elbo"] if fitted else None
    views = tuple(View(name, Estimate.of(cat[f"view_{name}"]),
                       _paired(local_elbo, cat[f"view_{name}"]) if comparable else None)
                  for name, comparable in first["views"].items())
    return Scores(
        split=split, rows=len(x), num_particles=num_particles, proposal=first["proposal"],
        elbo=Estimate.of(cat["elbo"]), log_px=Estimate.of(cat["log_px"]),
        rate=float(cat["rate"].mean()), distortion=float(cat["distortion"].mean()),
        active_units=active_units(cat["means"]),
        log_px_seconds=sum(r["log_px_seconds"] for r in rows),
        elbo_local=Estimate.of(local_elbo) if fitted else None,
        approximation_gap=_paired(cat["log_px"], local_elbo) if fitted else None,
        amortization_gap=(_paired(local_elbo, cat["elbo"])
                          if fitted and first["comparable"] else None),
        views=views,
        local_steps=sum(r["steps"] for r in rows) if fitted else None,
        local_seconds=sum(r["seconds"] for r in rows) if fitted else None,
        local_family=first["local_family"] if fitted else None,
        means=cat["means"], seconds=time.perf_counter() - start)


@own_rng
def _evaluate_rows(model, guide, x: torch.Tensor, num_particles: int, local: bool,
                   proposal: str, seed: int, local_options: dict, progress: bool,
                   local_family: Optional[families.LocalFamily] = None) -> dict:
    """One unit of ``evaluate_model``: per-row values (tensors) and what was done (plain).

    Its own seeded stream: a guide that draws noise where nothing else seeds it (a
    semi-amortized guide's refinement in ``posterior_means``) neither takes the draws of the
    training run around it (gap curves, validation) nor depends on them.

    Why so many parameters: ``evaluate_model``'s options for one unit of rows, passed on
    unchanged."""
    with _bar(0, "held-out fit (steps)", progress) as bar:
        held = local_fit.held_out(guide, model, x, seed=seed, progress=bar.update, **local_options)
    own = held.guide
    # the own guide is already a local fit (a table's held-out rows): q* itself, when it is
    # in the family asked for
    q_star = own if own is not guide and (
        local_family is None or families.same(protocol.family_of(own), local_family)) else None
    if q_star is None and local:
        with _bar(0, "local inference (steps)", progress) as bar:
            held = local_fit.local_inference(model, x, init=own, seed=seed, progress=bar.update,
                                          family=local_family, **local_options)
        q_star = held.guide
    out = {"fitted": q_star is not None, "steps": held.steps, "seconds": held.seconds}
    fitted_family = protocol.family_of(q_star) if q_star is not None else None
    out["local_family"] = fitted_family.name if fitted_family is not None else None
    parts = elbo_parts(model, own, x, num_particles=10, seed=seed)
    out.update(elbo=parts.elbo, rate=parts.rate, distortion=parts.distortion)
    if proposal == "auto":
        proposal = "local" if q_star is not None else "guide"
    if proposal == "local" and q_star is None:
        raise ValueError("proposal 'local' needs local=True")
    t0 = time.perf_counter()
    with _bar(len(x), f"log p(x), K={num_particles}", progress) as bar:
        out["log_px"] = log_px(model, q_star if proposal == "local" else own, x, num_particles,
                               seed=seed, progress=bar.update,
                               compile=local_options.get("compile"))
    out.update(proposal=proposal, log_px_seconds=time.perf_counter() - t0)
    probe = Batch(x[:2], torch.arange(min(2, len(x)), device=x.device), len(x))
    out["comparable"] = False
    if q_star is not None:
        out["local_elbo"] = parts.elbo if own is q_star else elbo_parts(
            model, q_star, x, num_particles=10, seed=seed).elbo
        out["comparable"] = (own is not q_star
                             and families.same(protocol.family_of(own, probe), fitted_family))
    out["views"] = {}
    for name, view in own.views().items():
        out[f"view_{name}"] = elbo_parts(model, view, x, num_particles=10, seed=seed).elbo
        out["views"][name] = (q_star is not None
                              and families.same(protocol.family_of(protocol.as_guide(view), probe),
                                                fitted_family))
    out["means"] = posterior_means(own, x)
    return out


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
