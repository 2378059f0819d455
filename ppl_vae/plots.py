"""Figures, drawn from saved results only (metrics.jsonl, eval.json, results.json, arrays.npz)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .guides import PerDatapoint
from .registry import GUIDES


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_metrics(run_dir: Path, name: str = "metrics.jsonl") -> List[dict]:
    """The rows of a JSON-lines file (``metrics.jsonl``, ``gaps.jsonl``) that can be read: a
    line cut off by a kill, or garbage, is skipped."""
    path = Path(run_dir) / name
    needed = ({"epoch", "train_elbo", "valid_elbo", "wall"} if name == "metrics.jsonl"
              else {"epoch", "split"})
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and needed <= set(row):
            rows.append(row)
    return rows


X_UNITS = {"epoch": "epoch",
           "steps": "optimizer steps",
           "passes": "network passes (forward + backward, encoder and decoder)"}
VALID_FIT_STEPS = 30  # ``heldout.Validator``'s refit of a table's validation rows per epoch


def _wrap(text: str, width: int = 120) -> str:
    import textwrap
    return "\n".join(textwrap.fill(p, width) for p in text.split("\n"))


def _note(fig, lines: Sequence[str], width: int = 150) -> None:
    """Notes under the figure's axes (``_save`` keeps them: its bounding box is tight)."""
    if lines:
        fig.text(0.01, 0.0, _wrap("\n".join(lines), width), ha="left", va="top", fontsize=8)


def steps_per_epoch(history: List[dict]) -> Optional[int]:
    """The steps of a whole epoch, as the history shows them: the largest step count of one
    epoch (a budget's last epoch may be partial, never an earlier one); None with fewer than
    two epochs or without step counts."""
    rows = sorted(history, key=lambda m: m["epoch"])
    if len(rows) < 2 or any(m.get("steps") is None for m in rows):
        return None
    counts = np.diff([0] + [int(m["steps"]) for m in rows])
    return int(counts.max()) if counts.max() > 0 else None


def curve_x(history: List[dict], x: str = "epoch", per_epoch: Optional[int] = None,
            passes_per_step: Optional[float] = None) -> tuple:
    """(positions, notes) of a history's rows along ``x``: ``epoch`` (a partial last epoch at
    its fraction: 4 of 10 steps after epoch 2 is 2.4), ``steps`` or ``passes`` (steps x
    ``passes_per_step``)."""
    rows = sorted(history, key=lambda m: m["epoch"])
    has_steps = rows and all(m.get("steps") is not None for m in rows)
    if x in ("steps", "passes"):
        if not has_steps:
            raise ValueError(f"the history has no step counts to draw against {x}")
        scale = 1.0 if x == "steps" else passes_per_step
        if scale is None:
            raise ValueError("x='passes' needs passes_per_step")
        return [int(m["steps"]) * scale if x == "passes" else int(m["steps"]) for m in rows], []
    xs = [float(m["epoch"]) for m in rows]
    per_epoch = per_epoch or (steps_per_epoch(rows) if has_steps else None)
    notes = []
    if has_steps and per_epoch:
        done = int(rows[-1]["steps"]) - (int(rows[-2]["steps"]) if len(rows) > 1 else 0)
        if 0 < done < per_epoch:
            xs[-1] = rows[-1]["epoch"] - 1 + done / per_epoch
            notes.append(f"its last epoch ({rows[-1]['epoch']}) is partial, {done} of "
                         f"{per_epoch} steps: drawn at {xs[-1]:.2f}")
    return xs, notes


def curves_figure(histories: Dict[str, List[dict]], title: str = "", x: str = "epoch",
                  tables: Sequence[str] = (), steps_per_epoch: Optional[int] = None,
                  passes_per_step: Optional[Dict[str, float]] = None):
    """Train (dashed) and validation (solid) ELBO against ``x`` (``X_UNITS``: epoch, steps or
    network passes, the unit of a run's budget) and against training time, as a Figure.

    The y axis leaves out the first epoch of a run of three or more (``curve_limits``); a
    point it leaves out is marked at the axis' edge and named, with its value and how far
    below it lies, under the figure. The legend stands outside the axes; whole epochs only
    on an epoch axis. ``tables``: the guides with per-datapoint tables, whose train curve
    scores rows as stored when visited while their valid curve is a refit: said under the
    figure."""
    from matplotlib.ticker import MaxNLocator
    if x not in X_UNITS:
        raise ValueError(f"x is one of {', '.join(X_UNITS)}, got {x!r}")
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    limits = curve_limits(histories)
    lo, hi = limits if limits is not None else (None, None)
    notes, cut = [], []
    for (name, history), colour in zip(histories.items(), plt.rcParams["axes.prop_cycle"]):
        c = colour["color"]
        rows = sorted(history, key=lambda m: m["epoch"])
        xs, said = curve_x(rows, x, steps_per_epoch, (passes_per_step or {}).get(name))
        notes += [f"{name}: {n}" for n in said]
        wall = [m["wall"] for m in rows]
        for kind, style in (("train", "--"), ("valid", "-")):
            ys = [np.nan if m.get(f"{kind}_elbo") is None else float(m[f"{kind}_elbo"])
                  for m in rows]  # nan: not scored that epoch
            for ax, at in zip(axes, (xs, wall)):  # a dot at each scored epoch when few
                ax.plot(at, ys, style, color=c, label=f"{name} {kind}",
                        marker="o" if len(rows) <= 30 else None, markersize=3)
            if lo is None:
                continue
            out = [(e, a, b, y) for e, a, b, y in zip((m["epoch"] for m in rows), xs, wall, ys)
                   if np.isfinite(y) and not lo <= y <= hi]
            for ax, i in zip(axes, (1, 2)):
                for below in (True, False):
                    these = [t[i] for t in out if (t[3] < lo) == below]
                    if these:
                        ax.scatter(these, [lo if below else hi] * len(these),
                                   marker="v" if below else "^", color=c, s=36,
                                   clip_on=False, zorder=5, label="_cut")
            cut += [f"{name} {kind} at epoch {e}: {y:.1f}, "
                    + (f"{lo - y:.1f} nats below the axis" if y < lo
                       else f"{y - hi:.1f} nats above the axis") for e, _, _, y in out]
    if limits is not None:
        axes[0].set_ylim(*limits)
    if cut:
        marks = " or ".join(m for m, w in (("\u25bc", "below"), ("\u25b2", "above"))
                            if any(w in t for t in cut))
        notes.insert(0, f"Outside the y axis (marked {marks} at its edge): " + "; ".join(cut)
                     + ".")
    notes.append("train: the training objective averaged over the epoch's steps, as the model "
                 "changed during the epoch; valid: scored once the epoch ended, on held-out "
                 "rows.")
    for name in histories:
        if name in tables:
            notes.append(
                f"{name} is a per-datapoint table: its train curve scores each training row's q "
                f"as stored when its minibatch is visited (a row is updated only when visited), "
                f"while its valid curve refits q for the validation rows every epoch "
                f"(decoder frozen, up to {VALID_FIT_STEPS} Adam steps, warm-started from the "
                f"previous epoch's fit). The distance between its two curves is the table's "
                f"unfinished fit of its rows, not overfitting.")
    partial = any("is partial" in n for n in notes)
    axes[0].set_xlabel(X_UNITS[x] + (" (a partial last epoch at its fraction)" if partial else ""))
    if x == "epoch":
        axes[0].xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    else:
        axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set_xlabel("training time (s)")
    axes[0].set_ylabel("ELBO per image (nats)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle((title or "training curves") + "  (dashed: train, solid: valid)")
    fig.tight_layout()
    handles = [h for h in axes[0].get_lines()]
    fig.legend(handles, [h.get_label() for h in handles], loc="upper left",
               bbox_to_anchor=(1.0, 0.95), fontsize=8, frameon=False)
    _note(fig, notes)
    return fig


def curves(histories: Dict[str, List[dict]], path: Path, title: str = "", x: str = "epoch",
           tables: Sequence[str] = (), steps_per_epoch: Optional[int] = None,
           passes_per_step: Optional[Dict[str, float]] = None) -> Path:
    """``curves_figure`` saved to ``path``."""
    return save_figure(curves_figure(histories, title, x, tables, steps_per_epoch, passes_per_step),
                 path)


def curve_limits(histories: Dict[str, List[dict]], pad: float = 0.05,
                 reach: float = 0.5) -> Optional[tuple]:
    """y-limits that show a point of every curve: the range of every curve's values after its
    first epoch when it has three or more (the first, often hundreds of nats lower, may fall
    outside; ``curves`` names what does), all of them when it has fewer (a two-epoch line
    would shrink to its end), widened to take in a first-epoch value that lies within
    ``reach`` of that range beyond it (cutting a point a nat off the axis hides it for
    nothing), padded by ``pad`` of the range; None without values."""
    values, first = [], []
    for history in histories.values():
        rows = sorted(history, key=lambda m: m["epoch"])
        later = rows[1:] if len(rows) >= 3 else rows
        for key in ("train_elbo", "valid_elbo"):
            values += [float(m[key]) for m in later if m.get(key) is not None]
            first += [float(m[key]) for m in rows[:len(rows) - len(later)]
                      if m.get(key) is not None]
    values = np.array([v for v in values if np.isfinite(v)])
    if not len(values):
        return None
    lo, hi = float(values.min()), float(values.max())
    for v in sorted((v for v in first if np.isfinite(v) and v < lo), reverse=True):
        if lo - v > reach * max(hi - lo, 1.0):
            break
        lo = v
    for v in sorted(v for v in first if np.isfinite(v) and v > hi):
        if v - hi > reach * max(hi - lo, 1.0):
            break
        hi = v
    margin = max(pad * (hi - lo), 0.5)
    return lo - margin, hi + margin


def image_shape(images: np.ndarray, shape=None) -> tuple:
    """(C, H, W) of flattened images: ``shape`` when given, else square grayscale; a vector
    (a shape of one row or column, or a non-square length) is drawn as a near-square
    rectangle of its values (``rectangle``), not as a one-pixel strip."""
    if shape is not None and len(shape) == 3:
        c, h, w = (int(v) for v in shape)
        if min(h, w) > 1:
            return c, h, w
        if c != 1:
            return c, h, w
    d = images.shape[-1]
    s = int(round(d ** 0.5))
    return (1, s, s) if s * s == d else (1,) + rectangle(d)


def rectangle(d: int) -> tuple:
    """(H, W), H <= W, to show a vector of length ``d`` row by row: the factor pair nearest a
    square when W <= 2 H (700 -> 25 x 28), else ceil(sqrt(d)) columns, the last row padded."""
    for h in range(int(d ** 0.5), 0, -1):
        if d % h == 0:
            if d // h <= 2 * h:
                return h, d // h
            break
    w = int(np.ceil(d ** 0.5))
    return -(-d // w), w


def _tile(images: np.ndarray, cols: int, shape=None, gap: int = 1) -> np.ndarray:
    """[N, C*H*W] images -> one mosaic with ``cols`` columns, 1-pixel white gaps:
    [rows*(H+gap), cols*(W+gap)] for grayscale, [..., 3] for colour (C = 3; other C: channel 0)."""
    c, h, w = image_shape(images, shape)
    flat = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    if flat.shape[1] < c * h * w:  # a vector in a padded rectangle: white after its end
        flat = np.concatenate([flat, np.ones((len(flat), c * h * w - flat.shape[1]))], 1)
    imgs = np.clip(flat.reshape(len(images), c, h, w), 0, 1)
    imgs = imgs.transpose(0, 2, 3, 1) if c == 3 else imgs[:, 0]
    rows = -(-len(imgs) // cols)
    out = np.ones((rows * (h + gap) - gap, cols * (w + gap) - gap) + imgs.shape[3:])
    for i, img in enumerate(imgs):
        r, k = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, k * (w + gap):k * (w + gap) + w] = img
    return out


def _show(ax, mosaic: np.ndarray) -> None:
    if mosaic.ndim == 3:
        ax.imshow(mosaic, interpolation="nearest")
    else:
        ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")


def image_rows(rows: Dict[str, np.ndarray], path: Path, title: str, shape=None) -> Path:
    """One labelled row of images per entry (inputs, then reconstructions, ...)."""
    plt = pyplot()
    first = next(iter(rows.values()))
    _, h, w = image_shape(first, shape)
    n = max(len(images) for images in rows.values())
    row_height = 12 * (h + 1) / (n * (w + 1))
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, row_height * len(rows) + 0.8),
                             squeeze=False)
    for ax, (name, images) in zip(axes[:, 0], rows.items()):
        _show(ax, _tile(images, len(images), shape))
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    return save_figure(fig, path)


SAMPLES_TITLE = "means of p(x | z) for z ~ p(z): the decoder's mean images, not draws of x"


def samples_figure(images: np.ndarray, title: str = SAMPLES_TITLE, shape=None):
    """Images from the prior, 8 a row, as a Figure; ``evaluate`` draws the likelihood's mean
    at each z ~ p(z) (``figure_arrays``), which the default title says."""
    plt = pyplot()
    _, h, w = image_shape(images, shape)
    rows = -(-len(images) // 8)
    fig, ax = plt.subplots(figsize=(8, 8 * rows * (h + 1) / (8 * (w + 1)) + 0.5))
    _show(ax, _tile(images, 8, shape))
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    return fig


def samples(images: np.ndarray, path: Path, title: str = SAMPLES_TITLE, shape=None) -> Path:
    return save_figure(samples_figure(images, title, shape), path)


def latent_title(guide: Optional[str], split: str, rows: int,
                 per_datapoint: Optional[bool] = None) -> str:
    who = f"the {guide} guide" if guide else "the guide"
    fit = (f" (a per-datapoint table: a fresh local fit to the {split} rows)"
           if per_datapoint else "")
    return (f"posterior means E_q[z | x] of {who}{fit}\non {rows} {split} rows, projected on "
            f"their first two principal axes")


def latent_figure(pca: np.ndarray, labels, title: Optional[str] = None, classes=None,
                  guide: Optional[str] = None, split: str = "test",
                  per_datapoint: Optional[bool] = None):
    """Posterior means in 2-D, coloured by class with the class names on the colour bar;
    one colour and no colour bar when the data have no labels (labels None or all -1). The
    axes are the means' first two principal components; the title names ``guide`` and
    ``split`` (and how many rows) unless ``title`` is given."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    labels = None if labels is None else np.asarray(labels)
    if labels is None or len(labels) != len(pca) or not (labels >= 0).any():
        ax.scatter(pca[:, 0], pca[:, 1], s=2, alpha=0.6)
    else:
        classes = list(classes) if classes is not None and len(classes) else None
        k = len(classes) if classes else int(labels.max()) + 1
        cmap = plt.get_cmap("tab10" if k <= 10 else "tab20" if k <= 20 else "viridis", k)
        known = labels >= 0
        if not known.all():  # unlabelled rows in grey, underneath
            ax.scatter(pca[~known, 0], pca[~known, 1], s=2, alpha=0.4, color="0.6")
        points = ax.scatter(pca[known, 0], pca[known, 1], c=labels[known], cmap=cmap, s=2,
                            alpha=0.6, vmin=-0.5, vmax=k - 0.5)
        bar = fig.colorbar(points, ax=ax, label="class")
        if k <= 20:
            bar.set_ticks(range(k))
            bar.set_ticklabels(classes if classes else [str(i) for i in range(k)])
    ax.set_xlabel("PC 1 of the posterior means")
    ax.set_ylabel("PC 2 of the posterior means")
    ax.set_title(title or latent_title(guide, split, len(pca), per_datapoint), fontsize=10)
    fig.tight_layout()
    return fig


def latent(pca: np.ndarray, labels, path: Path, title: Optional[str] = None, classes=None,
           guide: Optional[str] = None, split: str = "test",
           per_datapoint: Optional[bool] = None) -> Path:
    """``latent_figure`` saved to ``path``."""
    return save_figure(latent_figure(pca, labels, title, classes, guide, split, per_datapoint), path)


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
    plt = pyplot()
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
                        "n/a" + (f"\n({_wrap(why, 16)})" if why else ""),
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
    return save_figure(gaps_figure(results, error, times, title, na), path)


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (notes and legend outside the axes included),
    close it."""
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # with the notes and legend outside
    pyplot().close(fig)
    return path


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
    paper's, as recalled)."""
    plt = pyplot()
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
                fig.text((j + 0.5) / 2, 1 - (i + 0.5) / len(grid), _wrap(why, 50),
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
    _note(fig, notes)
    return fig


def gap_curves(gaps: Dict[str, List[dict]], path: Path,
               references: Optional[Dict[str, Dict[str, float]]] = None,
               tables: Optional[Sequence[str]] = None) -> Path:
    """``gap_curves_figure`` saved to ``path``."""
    return save_figure(gap_curves_figure(gaps, references, tables), path)


def per_datapoint_guide(name: str) -> Optional[bool]:
    """Whether a built-in guide name is a per-datapoint table (its class keeps one row per
    training row); None for a name this cannot tell without importing a user's code."""
    try:
        if name not in GUIDES:
            return None
        piece = getattr(GUIDES.resolve(name), "piece", None)
        return isinstance(piece, type) and issubclass(piece, PerDatapoint)
    except Exception:  # noqa: BLE001 - a guide that cannot be looked up says nothing
        return None


def run_figures(run_dir: Path, arrays: Path, labels: Sequence[int],
                name: str = "model", history: Optional[List[dict]] = None,
                per_datapoint: Optional[bool] = None, split: str = "test",
                x: str = "epoch") -> List[Path]:
    """The figures of one evaluated run: curves, reconstructions, samples, latent view (and
    its gap curves when it tracked them).

    The curves come from ``history`` (the checkpoint's) when given, else ``metrics.jsonl``.
    ``name`` is the run's guide; ``per_datapoint`` whether it is a per-datapoint table (its
    curves and gap curves then say what its train curve and its L[q*] - L[q] are; None: as
    the gap records or the built-in guide's class show); ``split`` the rows the arrays are of;
    ``x`` what the curves are drawn against (``X_UNITS``: "steps" for a run under a step
    budget).
    """
    run_dir = Path(run_dir)
    a = np.load(arrays)
    shape = a["shape"] if "shape" in a.files else None  # (C, H, W), saved by evaluate
    classes = a["classes"] if "classes" in a.files else None
    gaps_file = run_dir / "gaps.jsonl"
    gap_rows = read_metrics(run_dir, "gaps.jsonl") if gaps_file.exists() else None
    if per_datapoint is None:
        per_datapoint = (name in table_guides({name: gap_rows}) if gap_rows
                         else per_datapoint_guide(name))
    history = history if history is not None else read_metrics(run_dir)
    paths = [
        curves({name: history}, run_dir / "curves.png", f"ELBO per image, the {name} guide",
               x=x, tables=[name] if per_datapoint else []),
        image_rows({"input": a["inputs"], "reconstruction" + (
                    "\n(q fitted to\neach image)" if per_datapoint else ""): a["reconstructions"]},
                   run_dir / "reconstructions.png",
                   f"{split} images and their reconstructions (the decoder's mean at the "
                   f"posterior mean) by the {name} guide", shape),
        samples(a["samples"], run_dir / "samples.png", shape=shape),
        latent(a["pca"], np.asarray(labels), run_dir / "latent.png", classes=classes,
               guide=name, split=split, per_datapoint=per_datapoint),
    ]
    if gap_rows is not None:
        paths.append(gap_curves({name: gap_rows}, run_dir / "gaps.png",
                                tables=[name] if per_datapoint else []))
    return paths
