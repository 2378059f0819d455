"""Figures, drawn from saved results only (metrics.jsonl, eval.json, results.json, arrays.npz):
training curves, images, the latent view, and the drawing helpers every figure module uses
(``pyplot``, ``save_figure``, ``note``). The gap figures are ``gap_plots.py``; one run's set
of figures is ``evaluation.run_figures``."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .config import VALID_FIT_STEPS


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


def wrap(text: str, width: int = 120) -> str:
    """``text`` wrapped at ``width`` characters, each paragraph (line) on its own."""
    return "\n".join(textwrap.fill(p, width) for p in text.split("\n"))


def note(fig, lines: Sequence[str], width: int = 150) -> None:
    """Notes under the figure's axes (``save_figure`` keeps them: its bounding box is tight)."""
    if lines:
        fig.text(0.01, 0.0, wrap("\n".join(lines), width), ha="left", va="top", fontsize=8)


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
    figure.

    Why so long: one pass over the guides draws each one's train and validation curves,
    their axis unit and the notes that explain a table's curves, so the panels share one
    convention."""
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
    axes[0].set_ylabel("nats per image\n(valid: ELBO; train: the training objective)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle((title or "training curves") + "  (dashed: train, solid: valid)")
    fig.tight_layout()
    handles = [h for h in axes[0].get_lines()]
    fig.legend(handles, [h.get_label() for h in handles], loc="upper left",
               bbox_to_anchor=(1.0, 0.95), fontsize=8, frameon=False)
    note(fig, notes)
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


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (notes and legend outside the axes included),
    close it."""
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # with the notes and legend outside
    pyplot().close(fig)
    return path
