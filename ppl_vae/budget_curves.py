"""Curves over budget across seeds: where each guide stands at every tracked budget point.

From the gap curves of a comparison's runs (``--track-gaps``: L[q], L[q*], log p(x) and both
gaps on held-out rows at ``--gap-epochs``), for every guide and budget point the mean and
standard deviation over seeds of each quantity, the budget at that point in epochs,
optimizer steps and compute (network passes, and FLOPs where the step's cost has them),
the paired difference of every two guides over seeds at every epoch both reached, and the
budgets between which a ranking crosses: in epochs (the same points for every guide) and in
compute (each guide's mean curve interpolated linearly in log compute, so two guides whose
steps cost differently are compared at equal compute).

Statements this lets one check in one run: Cremer, Li & Duvenaud (2018) measure the gaps as
training goes on; Margossian & Blei (2024) show that, with the model fixed, the per-datapoint
optimum bounds the amortized one, and that amortized inference often gets there faster.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .seeds import Difference, Spread, paired
from . import plots

QUANTITIES = ("log_px", "elbo", "elbo_local", "approximation_gap", "amortization_gap")
NAMES = {"log_px": "log p(x)", "elbo": "L[q]", "elbo_local": "L[q*]",
         "approximation_gap": "approximation gap", "amortization_gap": "amortization gap"}
CROSSED = QUANTITIES  # the rankings whose crossings are found (and tabled in the report)
DRAWN = ("log_px", "elbo", "approximation_gap", "amortization_gap")  # the figure's panels
HIGHER_IS_BETTER = {"log_px": True, "elbo": True, "elbo_local": True,
                    "approximation_gap": False, "amortization_gap": False}


def key(quantity: str, split: str) -> str:
    """The name a line of gaps.jsonl gives ``quantity`` on ``split`` (``Scores.json_key``)."""
    return quantity if quantity.endswith("_gap") else f"{split}_{quantity}"


@dataclass(frozen=True)
class Point:
    """One guide at one budget point: the budget, and each quantity over seeds."""

    epoch: int
    steps: Optional[float]  # mean over seeds (equal under an epochs budget)
    passes: Optional[float]  # network passes spent (steps x passes per step)
    flops: Optional[float]  # FLOPs spent, when the step's cost counts them
    values: Dict[str, Spread] = field(default_factory=dict)

    def budget(self, unit: str) -> Optional[float]:
        return {"epochs": self.epoch, "steps": self.steps, "passes": self.passes,
                "flops": self.flops}[unit]

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "steps": self.steps, "passes": self.passes,
                "flops": self.flops, **{q: s.to_json() for q, s in self.values.items()}}


@dataclass(frozen=True)
class Crossing:
    """Guide ``a`` ranks above ``b`` in ``quantity`` on one side of the budget interval
    (``low``, ``high``) in ``unit`` and below on the other."""

    quantity: str
    a: str
    b: str
    unit: str
    low: float
    high: float
    before: str  # the guide ranked first below ``low``

    def to_json(self) -> dict:
        return {"quantity": self.quantity, "a": self.a, "b": self.b, "unit": self.unit,
                "between": [self.low, self.high], "first_before": self.before}


@dataclass
class Curves:
    """Every guide's points (in epoch order) on ``split``, the paired differences and the
    crossings."""

    split: str
    seeds: Tuple[int, ...]
    points: Dict[str, List[Point]]
    differences: List[Tuple[int, Difference]] = field(default_factory=list)
    crossings: List[Crossing] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"split": self.split, "seeds": list(self.seeds),
                "error_bars": "standard deviation over seeds",
                "guides": {g: [p.to_json() for p in pts] for g, pts in self.points.items()},
                "differences": [{"epoch": e, **d.to_json()} for e, d in self.differences],
                "crossings": [c.to_json() for c in self.crossings]}


def _steps_at(history: Sequence[dict], epoch: int) -> Optional[float]:
    for row in history:
        if row.get("epoch") == epoch and row.get("steps") is not None:
            return float(row["steps"])
    return None


def collect(runs: Dict[str, Dict[int, Tuple[List[dict], List[dict], float, Optional[float]]]],
            seeds: Sequence[int], split: str = "test") -> Curves:
    """``runs[guide][seed] = (gap rows, metrics rows, passes per step, FLOPs per step)``
    (gaps.jsonl's and metrics.jsonl's lines) as curves over budget."""
    points: Dict[str, List[Point]] = {}
    per_seed: Dict[str, Dict[int, Dict[str, Dict[int, float]]]] = {}
    for guide, by_seed in runs.items():
        table: Dict[int, Dict[str, Dict[int, float]]] = {}
        budget: Dict[int, Dict[str, list]] = {}
        for seed, (gap_rows, history, passes, flops) in by_seed.items():
            for row in gap_rows:
                if row.get("split") != split:
                    continue
                epoch = int(row["epoch"])
                steps = _steps_at(history, epoch)
                b = budget.setdefault(epoch, {"steps": [], "passes": [], "flops": []})
                if steps is not None:
                    b["steps"].append(steps)
                    b["passes"].append(steps * passes)
                    if flops:
                        b["flops"].append(steps * flops)
                for q in QUANTITIES:
                    v = row.get(key(q, split))
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        table.setdefault(epoch, {}).setdefault(q, {})[seed] = float(v)
        per_seed[guide] = table
        mean = (lambda xs: sum(xs) / len(xs) if xs else None)
        points[guide] = [
            Point(epoch, mean(budget[epoch]["steps"]), mean(budget[epoch]["passes"]),
                  mean(budget[epoch]["flops"]),
                  {q: Spread(tuple(sorted(v)), tuple(v[s] for s in sorted(v)))
                   for q, v in table.get(epoch, {}).items()})
            for epoch in sorted(budget)]
    curves = Curves(split, tuple(seeds), points)
    guides = list(points)
    for i, a in enumerate(guides):
        for b in guides[i + 1:]:
            for epoch in sorted(set(per_seed[a]) & set(per_seed[b])):
                for q in QUANTITIES:
                    va, vb = per_seed[a][epoch].get(q), per_seed[b][epoch].get(q)
                    if va and vb and set(va) & set(vb):
                        curves.differences.append((epoch, paired(q, a, b, va, vb)))
            for unit in ("epochs", "passes", "flops"):
                for q in CROSSED:
                    curves.crossings.extend(crossings(points[a], points[b], a, b, q, unit))
    return curves


def _curve(pts: List[Point], quantity: str, unit: str) -> List[Tuple[float, float]]:
    return [(p.budget(unit), p.values[quantity].mean) for p in pts
            if quantity in p.values and p.budget(unit)]


def _at(curve: List[Tuple[float, float]], x: float) -> float:
    """The curve linearly interpolated in log budget at ``x`` (within its range)."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            t = 0.0 if x1 == x0 else (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return curve[-1][1]


def crossings(pa: List[Point], pb: List[Point], a: str, b: str, quantity: str,
              unit: str) -> List[Crossing]:
    """Budget intervals in ``unit`` where the order of ``a`` and ``b`` in ``quantity``'s
    mean over seeds changes (both curves interpolated on the union of their points)."""
    ca, cb = _curve(pa, quantity, unit), _curve(pb, quantity, unit)
    if len(ca) < 2 or len(cb) < 2:
        return []
    lo, hi = max(ca[0][0], cb[0][0]), min(ca[-1][0], cb[-1][0])
    xs = sorted({x for x, _ in ca + cb if lo <= x <= hi})
    signs = [(x, _at(ca, x) - _at(cb, x)) for x in xs]
    signs = [(x, d) for x, d in signs if d != 0]
    out = []
    higher = HIGHER_IS_BETTER[quantity]
    for (x0, d0), (x1, d1) in zip(signs, signs[1:]):
        if (d0 > 0) != (d1 > 0):
            first = a if (d0 > 0) == higher else b
            out.append(Crossing(quantity, a, b, unit, x0, x1, first))
    return out


def figure(curves: Curves, path: Path, units: Sequence[str] = ("epochs", "flops"),
           quantities: Sequence[str] = DRAWN) -> Optional[Path]:
    """``build``'s figure saved to ``path`` (None: nothing to draw)."""
    fig = build(curves, units, quantities)
    if fig is None:
        return None
    return plots.save_figure(fig, path)


def build(curves: Curves, units: Sequence[str] = ("epochs", "flops"),
          quantities: Sequence[str] = DRAWN):
    """One panel per quantity and budget unit: each guide's mean over seeds with a band of
    ±1 standard deviation over seeds, on a log budget axis; the budget intervals where two
    guides' mean curves cross are shaded (overlapping ones as one) and name the pairs. Units
    that no guide has (FLOPs of a step that were not counted) are left out."""
    units = [u for u in units
             if any(p.budget(u) for pts in curves.points.values() for p in pts)]
    if not units or not curves.points:
        return None
    plt = plots.pyplot()
    from matplotlib.ticker import FuncFormatter
    fig, axes = plt.subplots(len(units), len(quantities), squeeze=False,
                             figsize=(4.2 * len(quantities), 3.4 * len(units)))
    seeds = len(curves.seeds)
    for r, unit in enumerate(units):
        for c, q in enumerate(quantities):
            _panel(axes[r][c], curves, unit, q, FuncFormatter)
    fig.suptitle(f"over budget: mean ± 1 sd over {seeds} seed{'s' if seeds != 1 else ''} "
                 f"({curves.split} rows; shaded: where two guides' means cross)", fontsize=10)
    fig.tight_layout()
    return fig


UNIT_LABELS = {"epochs": "epochs (log scale)", "flops": "training FLOPs (log scale)",
               "passes": "network passes (log scale)", "steps": "optimizer steps (log scale)"}


def _spans(crossings: Sequence[Crossing], q: str, unit: str
           ) -> List[Tuple[Tuple[float, float], List[str]]]:
    """The budget intervals where ``q``'s rankings cross in ``unit``, overlapping ones
    merged into one, each with the pairs that cross in it."""
    spans: List[Tuple[Tuple[float, float], List[str]]] = []
    for cr in sorted((c for c in crossings if c.quantity == q and c.unit == unit),
                     key=lambda c: (c.low, c.high)):
        pair = f"{cr.a} × {cr.b}"
        if spans and cr.low < spans[-1][0][1]:  # overlaps the last: one shade for both
            (low, high), pairs = spans[-1]
            spans[-1] = ((low, max(high, cr.high)), pairs + [pair])
        else:
            spans.append(((cr.low, cr.high), [pair]))
    return spans


def _panel(ax, curves: Curves, unit: str, q: str, formatter) -> None:
    drawn, absent = False, []
    for guide, pts in curves.points.items():
        rows = [(p.budget(unit), p.values[q]) for p in pts if q in p.values and p.budget(unit)]
        if not rows:
            absent.append(guide)
            continue
        xs, ys = [x for x, _ in rows], [s.mean for _, s in rows]
        sd = [s.sd or 0.0 for _, s in rows]
        line, = ax.plot(xs, ys, marker="o", label=guide)
        ax.fill_between(xs, [y - e for y, e in zip(ys, sd)], [y + e for y, e in zip(ys, sd)],
                        alpha=0.2, color=line.get_color())
        drawn = True
    if not drawn:
        ax.text(0.5, 0.5, f"{NAMES[q]}: n/a for every guide", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    if absent:  # said, not drawn (a table has no amortization gap: its q is q* itself)
        ax.text(0.02, 0.02, f"n/a: {', '.join(absent)}", transform=ax.transAxes, fontsize=7,
                va="bottom")
    for (low, high), pairs in _spans(curves.crossings, q, unit):
        ax.axvspan(low, high, color="0.5", alpha=0.15, lw=0)
        ax.text(math.sqrt(low * high), 0.98, "\n".join(pairs), rotation=90, ha="center",
                va="top", fontsize=6, color="0.3", transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    from matplotlib.ticker import EngFormatter, FixedLocator, NullFormatter
    if unit == "epochs":  # ticks at the tracked epochs, written as plain numbers
        epochs = sorted({p.epoch for pts in curves.points.values() for p in pts})
        ax.xaxis.set_major_locator(FixedLocator(epochs))
        ax.xaxis.set_major_formatter(formatter(lambda v, _p: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:  # 40M, 1.5G: engineering prefixes, on minor ticks too
        eng = EngFormatter(sep="")
        ax.xaxis.set_major_formatter(eng)
        xs = [p.budget(unit) for pts in curves.points.values() for p in pts if p.budget(unit)]
        if xs and max(xs) / min(xs) < 10:  # under a decade: label the minor ticks too
            ax.xaxis.set_minor_formatter(eng)
            ax.tick_params(axis="x", which="minor", labelsize=7)
        else:
            ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(UNIT_LABELS[unit])
    ax.set_ylabel(f"{NAMES[q]} (nats)")
    ax.set_title(f"{curves.split} {NAMES[q]}", fontsize=10)
    ax.legend(fontsize=7, loc="best")
