"""Numbers over training seeds: a quantity's spread over seeds, and the paired difference of
two guides trained from the same seeds and scored on the same test rows, with a 95%
Student-t interval over seeds.

A seed changes the decoder's and encoder's initialization, the data order and the training
binarization noise; the test rows, their binarization and the estimators' noise stay fixed
(``heldout.EVAL_SEED``). Pairing by seed removes what two guides share under one seed (the
initialization of the decoder, the minibatches), so the interval is about the guides.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

# t_{0.975, df} for df = 1 .. 30 (two-sided 95%)
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (a table to 30, then
    the Cornish-Fisher expansion about the normal quantile, within 1e-4 there)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


@dataclass(frozen=True)
class Spread:
    """One quantity over seeds: its values (in seed order), mean and sample standard
    deviation (None for one seed)."""

    seeds: Tuple[int, ...]
    values: Tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def sd(self) -> Optional[float]:
        n = len(self.values)
        if n < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (n - 1))

    def to_json(self) -> dict:
        return {"mean": self.mean, "sd": self.sd, "seeds": list(self.seeds),
                "values": list(self.values)}


MIN_SEEDS = 3  # the fewest seeds from which a difference is called settled


@dataclass(frozen=True)
class Difference:
    """``a - b`` in ``quantity``, paired by seed: the mean over seeds of the per-seed
    differences and its 95% t-interval (``low``, ``high``; None for one seed). Settled when
    the interval excludes 0 and rests on ``MIN_SEEDS`` seeds or more."""

    quantity: str
    a: str
    b: str
    seeds: Tuple[int, ...]
    values: Tuple[float, ...]  # a - b for each seed
    mean: float
    sd: Optional[float]
    low: Optional[float]
    high: Optional[float]

    @property
    def excludes_zero(self) -> Optional[bool]:
        """Whether the 95% interval excludes 0 (None: one seed, no interval)."""
        if self.low is None:
            return None
        return self.low > 0 or self.high < 0

    @property
    def settled(self) -> Optional[bool]:
        """The interval excludes 0 and rests on ``MIN_SEEDS`` seeds or more (None: fewer
        seeds, whose interval is too wide to judge by: 2 seeds give 1 degree of freedom)."""
        if len(self.seeds) < MIN_SEEDS:
            return None
        return self.excludes_zero

    def to_json(self) -> dict:
        d = asdict(self)
        d["seeds"], d["values"] = list(self.seeds), list(self.values)
        d["excludes_zero"], d["settled"] = self.excludes_zero, self.settled
        return d


def paired(quantity: str, a: str, b: str, values_a: Dict[int, float],
           values_b: Dict[int, float]) -> Optional[Difference]:
    """The paired difference of two guides' values, keyed by seed, on the seeds both have
    (None when they share none)."""
    seeds = tuple(s for s in values_a if s in values_b
                  and values_a[s] is not None and values_b[s] is not None)
    if not seeds:
        return None
    diffs = Spread(seeds, tuple(float(values_a[s]) - float(values_b[s]) for s in seeds))
    n, sd = len(seeds), diffs.sd
    low = high = None
    if sd is not None:
        half = t975(n - 1) * sd / math.sqrt(n)
        low, high = diffs.mean - half, diffs.mean + half
    return Difference(quantity, a, b, seeds, diffs.values, diffs.mean, sd, low, high)


def differences(values: Dict[str, Dict[str, Dict[int, float]]], quantities: Sequence[str],
                guides: Sequence[str]) -> List[Difference]:
    """Every pair of guides (in the given order, earlier minus later) in every quantity;
    ``values[guide][quantity][seed]``."""
    out = []
    for q in quantities:
        for i, a in enumerate(guides):
            for b in guides[i + 1:]:
                d = paired(q, a, b, values[a].get(q, {}), values[b].get(q, {}))
                if d is not None:
                    out.append(d)
    return out
