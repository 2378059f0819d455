"""The gap figures, drawn from saved results: the gaps of a comparison (``gaps``) and the gap
curves over training (``gap_curves``), with which guides are per-datapoint tables."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import plots


GAP_KINDS = [("approximation_gap", "approximation gap", "log p(x) - L[q*]"),
             ("amortization_gap", "amortization gap", "L[q*] - L[q]"),
             ("amortization_gap_encoder", "amortization gap of the bare encoder",
              "L[q*] - L[encoder]")]


def gaps_figure(results: Dict[str, dict], error: str = "_stderr", times: float = 1.0,
                title: str = "inference gaps on the test set", na: Optional[Dict] = None):
    """Approximation and amortization gaps (nats) per guide, one panel per gap on its own y
    scale, each value written on its bar, with error bars of ``times`` x the value under
    ``key + error`` (1 standard error by default, as the report's table; ``"_sd"``: a
    standard deviation over seeds); the bare encoder's amortization gap too when a guide has
    one (semi-amortized). A gap that is None is written "n/a" where its bar would stand
    (``na``: {guide: why}, shown beside it), never drawn as a bar of height 0."""
    plt = plots.pyplot()
    names = list(results)
    colours = {n: c["color"] for n, c in zip(names, plt.rcParams["axes.prop_cycle"])}
    panels = [(kind, names) for kind in GAP_KINDS[:2]]
    viewed = [n for n in names if results[n].get("amortization_gap_encoder") is not None]
    if viewed:  # only the guides that have a bare encoder beside their q
        panels.append((GAP_KINDS[2], viewed))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 1.3 * sum(len(n) for _, n in panels),
                                                      4.2), squeeze=False,
                             gridspec_kw={"width_ratios": [len(n) + 0.6 for _, n in panels]})
    for ax, ((key, label, formula), those) in zip(axes[0], panels):
        values = [results[n].get(key) for n in those]
        errs = [times * (results[n].get(key + error) or 0.0) for n in those]
        drawn = [i for i, v in enumerate(values) if v is not None]
        ax.bar([float(i) for i in drawn], [values[i] for i in drawn], 0.6,
               yerr=[errs[i] for i in drawn], capsize=3,
               color=[colours[those[i]] for i in drawn], label=label)
        top = max([values[i] + errs[i] for i in drawn] + [0.0])
        bottom = min([values[i] - errs[i] for i in drawn] + [0.0])
        span = (top - bottom) or 1.0
        for i in drawn:
            v, e = values[i], errs[i]
            ax.annotate(f"{v:.2f}", (i, v + e if v >= 0 else v - e),
                        xytext=(0, 2 if v >= 0 else -2), textcoords="offset points",
                        ha="center", va="bottom" if v >= 0 else "top", fontsize=8)
        for i, v in enumerate(values):
            if v is None:
                why = (na or {}).get(those[i])
                ax.text(i, bottom + 0.04 * span,
                        "n/a" + (f"\n({plots.wrap(why, 16)})" if why else ""),
                        ha="center", va="bottom", fontsize=7, color="0.3")
        ax.set_xticks(range(len(those)))
        ax.set_xticklabels(those, rotation=20 if len(names) > 3 else 0)
        ax.set_xlim(-0.6, len(those) - 0.4)
        ax.set_ylim(min(bottom, 0.0) - 0.08 * span, top + 0.18 * span)
        ax.axhline(0.0, color="0.5", linewidth=0.8)
        ax.set_title(f"{label}\n{formula}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].set_ylabel("nats per image")
    what = ("standard error over test images (paired), as in the report's table"
            if error == "_stderr" else "standard deviation over seeds, as in the report's table")
    unit = what.split(" over")[0]
    bars_are = f"± {times:g} {unit}" + ("s" if times != 1 else "")
    fig.suptitle(f"{title}\n(each panel on its own scale; error bars: {bars_are}"
                 f"{what[len(unit):]})", fontsize=10)
    fig.tight_layout()
    return fig


def gaps(results: Dict[str, dict], path: Path, error: str = "_stderr", times: float = 1.0,
         title: str = "inference gaps on the test set", na: Optional[Dict] = None) -> Path:
    """``gaps_figure`` saved to ``path``."""
    return plots.save_figure(gaps_figure(results, error, times, title, na), path)


def table_guides(gaps: Dict[str, List[dict]]) -> List[str]:
    """The guides whose records show a per-datapoint table: L[q*] - L[q] on their training
    rows but none on test rows (there the guide's q already is a local fit, so the
    evaluation gives no amortization gap)."""
    out = []
    for name, rows in gaps.items():
        train = [r for r in rows if r.get("split") == "train"]
        test = [r for r in rows if r.get("split") == "test"]
        if (test and any(r.get("amortization_gap") is not None for r in train)
                and all(r.get("amortization_gap") is None for r in test)
                and any(r.get("approximation_gap") is not None for r in test)):
            out.append(name)
    return out


BAND = 1.0  # the shaded band: this many standard errors over rows, as in the report's tables


def _epoch_axis(ax, epochs: Sequence[float]) -> None:
    """A log epoch axis labelled with plain whole numbers: the tracked epochs when they are
    few, else 1, 3, 10, 30, ...; no labels on minor ticks (no 2x10^0)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    ax.set_xscale("log")
    epochs = sorted({int(round(e)) for e in epochs if e > 0})
    if len(epochs) > 10:
        top = max(epochs)
        epochs = [m * 10 ** k for k in range(len(str(top)) + 1) for m in (1, 3)
                  if min(epochs) <= m * 10 ** k <= top]
    ax.xaxis.set_major_locator(FixedLocator(epochs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(round(v))}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _plain_log_labels(axis) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def gap_curves_figure(gaps: Dict[str, List[dict]],
                      references: Optional[Dict[str, Dict[str, float]]] = None,
                      tables: Optional[Sequence[str]] = None):
    """Inference gaps (nats; shaded: ± ``BAND`` standard error over the rows, as the report's
    tables give them) against epoch, training rows and test rows side by side, one colour per
    guide (from ``gaps.jsonl`` rows), as a Figure.

    Rows of panels: the amortization gap L[q*] - L[q] of the guides with an encoder; the local
    gap of the guides with a per-datapoint table (``tables``; default: as their records show,
    ``table_guides``): their L[q*] - L[q] on training rows is how far the table's rows are
    from a local optimum, not an amortization gap, and gets its own panel and scale; the
    approximation gap log p(x) - L[q*] of every guide. A panel with nothing to draw is not
    drawn: a note in its place says what is absent and why. A panel whose values span more
    than a factor of 20 gets a log axis (symmetric-log if a gap is negative), so the late,
    small gaps are not flattened by the first epochs' hundreds. The epoch axis is
    logarithmic with whole-number labels.
    ``references`` (guide name -> {"amortization_gap": nats, ..., "label": legend text})
    draws reference values as dashed lines in that guide's colour (``cremer.py``: the
    paper's, as recalled).

    Why so long: the figure's grid (gap kind x split), each panel's curves, bands,
    references, axis scale and notes are drawn in one pass over the records, so every panel
    follows one convention (tested in tests/test_plots.py)."""
    plt = plots.pyplot()
    tables = set(table_guides(gaps) if tables is None else tables)
    references = references or {}
    colours = {name: c["color"] for name, c in zip(gaps, plt.rcParams["axes.prop_cycle"])}
    band = "± 1 s.e." if BAND == 1 else f"± {BAND:g} s.e."
    kinds = [("amortization_gap", "amortization gap", "L[q*] - L[q]",
              [n for n in gaps if n not in tables]),
             ("local_gap", "local gap of the table rows",
              "L[q*] - L[q] of a per-datapoint table (no encoder: not an amortization gap)",
              [n for n in gaps if n in tables]),
             ("approximation_gap", "approximation gap", "log p(x) - L[q*]", list(gaps))]
    splits = ("train", "test")

    def series(kind, names, split):
        key = "amortization_gap" if kind == "local_gap" else kind
        out = []
        for name in names:
            rows = sorted((r for r in gaps[name] if r.get("split") == split),
                          key=lambda r: r["epoch"])
            pts = [(r["epoch"], r[key], r.get(key + "_stderr") or 0.0) for r in rows
                   if r.get(key) is not None]
            if pts:
                out.append((name, pts))
        return out

    def refs(kind, names):
        key = "amortization_gap" if kind == "local_gap" else kind
        return [(n, references[n]) for n in names
                if n in references and references[n].get(key) is not None]

    ks = {r.get("num_particles") for rows in gaps.values() for r in rows}
    if len(ks) == 1 and None not in ks:  # log p(x) is the IWAE bound with this K
        kinds[2] = kinds[2][:2] + (f"log p(x) - L[q*] (IWAE bound, K = {ks.pop()})",) + kinds[2][3:]
    grid = []  # (kind, label, formula, names, [series of train, of test])
    for kind, label, formula, names in kinds:
        drawn = [series(kind, names, split) for split in splits]
        if any(drawn) or refs(kind, names):
            grid.append((kind, label, formula, names, drawn))
    fig = plt.figure(figsize=(11, 3.4 * max(len(grid), 1) + 0.4))
    notes, first, epochs = [], None, set()
    for i, (kind, label, formula, names, drawn) in enumerate(grid):
        for j, split in enumerate(splits):
            those_refs = refs(kind, names)
            if not drawn[j] and not those_refs:
                why = {"local_gap": (f"no local gap on {split} rows: a per-datapoint table "
                                     f"answers {split} rows with a fresh local fit, which is "
                                     f"q* itself, so L[q*] - L[q] would be 0 by construction"
                                     if split != "train" else
                                     f"no local gap on {split} rows in the records")
                       }.get(kind, f"no {label} on {split} rows in the records")
                fig.text((j + 0.5) / 2, 1 - (i + 0.5) / len(grid), plots.wrap(why, 50),
                         ha="center", va="center", fontsize=9, color="0.3",
                         transform=fig.transFigure)
                continue
            ax = fig.add_subplot(len(grid), 2, 2 * i + j + 1, sharex=first)
            first = first or ax
            for name, pts in drawn[j]:
                e, v, s_ = (np.array(t, dtype=float) for t in zip(*pts))
                epochs.update(e.tolist())
                ax.plot(e, v, "o-", color=colours[name], label=name)
                ax.fill_between(e, v - BAND * s_, v + BAND * s_, color=colours[name], alpha=0.2)
            key = "amortization_gap" if kind == "local_gap" else kind
            for name, ref in those_refs:
                ax.axhline(ref[key], color=colours.get(name, "0.3"), linestyle="--",
                           linewidth=1, label=ref.get("label", f"{name}: reference"))
            ax.set_title(f"{label}  {formula}, {split} rows" if kind != "local_gap" else
                         f"{label}, {split} rows\n{formula}", fontsize=9)
            ax.set_ylabel(f"{label} (nats)" if j == 0 else "", fontsize=8)
            ax.grid(alpha=0.3)
            if i == len(grid) - 1 or not any(grid[k][4][j] for k in range(i + 1, len(grid))):
                ax.set_xlabel("epoch")
        drawn_names = {n for part in drawn for n, _ in part}
        missing = [n for n in names if n not in drawn_names]
        if missing and kind == "amortization_gap":
            notes.append(f"No amortization gap in the records of {', '.join(missing)} (n/a where "
                         f"q* was fitted in another family than the guide's q): not drawn.")
    if not grid:
        fig.text(0.5, 0.5, "no gaps in the records", ha="center", va="center")
    for ax in fig.axes:
        _epoch_axis(ax, epochs or [1])
        values = np.concatenate([line.get_ydata() for line in ax.get_lines()
                                 if line.get_linestyle() != "--"] or [[]])
        values = values[np.isfinite(values)]
        if len(values) and np.abs(values).max() > 20 * max(np.abs(values).min(), 0.1):
            if values.min() > 0:
                ax.set_yscale("log")
            else:  # a negative gap (q* worse than q): log-like on both sides of zero
                ax.set_yscale("symlog", linthresh=1.0)
            _plain_log_labels(ax.yaxis)
    fig.suptitle(f"inference gaps over training (shaded: {band} over the scored rows; "
                 f"each panel on its own scale)")
    fig.tight_layout()
    handles = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            handles.setdefault(line.get_label(), line)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="upper left",
                   bbox_to_anchor=(1.0, 0.95), fontsize=8, frameon=False)
    plots.note(fig, notes)
    return fig


def gap_curves(gaps: Dict[str, List[dict]], path: Path,
               references: Optional[Dict[str, Dict[str, float]]] = None,
               tables: Optional[Sequence[str]] = None) -> Path:
    """``gap_curves_figure`` saved to ``path``."""
    return plots.save_figure(gap_curves_figure(gaps, references, tables), path)
