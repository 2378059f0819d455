"""Figures, drawn from saved results only (metrics.jsonl, eval.json, results.json, arrays.npz)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np


def _plt():
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


def curves(histories: Dict[str, List[dict]], path: Path, title: str = "") -> Path:
    """Train (dashed) and validation (solid) ELBO against epoch and against training time."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for (name, history), colour in zip(histories.items(), plt.rcParams["axes.prop_cycle"]):
        c = colour["color"]
        epochs = [m["epoch"] for m in history]
        wall = [m["wall"] for m in history]
        for ax, xs in zip(axes, (epochs, wall)):
            ax.plot(xs, [m["train_elbo"] for m in history], "--", color=c, label=f"{name} train")
            ax.plot(xs, [m["valid_elbo"] for m in history], "-", color=c, label=f"{name} valid")
    limits = curve_limits(histories)
    if limits is not None:
        axes[0].set_ylim(*limits)
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("training time (s)")
    axes[0].set_ylabel("ELBO per image (nats)")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title or "training curves")
    return _save(fig, path)


def curve_limits(histories: Dict[str, List[dict]], pad: float = 0.05) -> Optional[tuple]:
    """y-limits that show a point of every curve: the range of every curve's values after its
    first epoch when it has three or more (the first, often hundreds of nats lower, may fall
    below), all of them when it has fewer (a two-epoch line would shrink to its end), padded
    by ``pad`` of the range; None without values."""
    values = []
    for history in histories.values():
        rows = sorted(history, key=lambda m: m["epoch"])
        later = rows[1:] if len(rows) >= 3 else rows
        for key in ("train_elbo", "valid_elbo"):
            values += [float(m[key]) for m in later if m.get(key) is not None]
    values = np.array([v for v in values if np.isfinite(v)])
    if not len(values):
        return None
    lo, hi = float(values.min()), float(values.max())
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
    plt = _plt()
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
    return _save(fig, path)


def samples(images: np.ndarray, path: Path, title: str = "samples from the prior",
            shape=None) -> Path:
    plt = _plt()
    _, h, w = image_shape(images, shape)
    rows = -(-len(images) // 8)
    fig, ax = plt.subplots(figsize=(8, 8 * rows * (h + 1) / (8 * (w + 1)) + 0.5))
    _show(ax, _tile(images, 8, shape))
    ax.axis("off")
    ax.set_title(title)
    return _save(fig, path)


def latent(pca: np.ndarray, labels, path: Path,
           title: str = "posterior means, first two principal axes", classes=None) -> Path:
    """Posterior means in 2-D, coloured by class with the class names on the colour bar;
    one colour and no colour bar when the data have no labels (labels None or all -1)."""
    plt = _plt()
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
    ax.set_title(title)
    return _save(fig, path)


def gaps(results: Dict[str, dict], path: Path, error: str = "_stderr", times: float = 2.0,
         title: str = "inference gaps on the test set") -> Path:
    """Approximation and amortization gaps (nats) per guide, with error bars of ``times`` x
    the value under ``key + error`` (2 standard errors by default; ``"_sd"``, 1: a standard
    deviation over seeds); the bare encoder's amortization gap too when a guide has one
    (semi-amortized)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = list(results)
    kinds = [("approximation_gap", "approximation gap  log p(x) - L[q*]"),
             ("amortization_gap", "amortization gap  L[q*] - L[q]")]
    if any(results[n].get("amortization_gap_encoder") is not None for n in names):
        kinds.append(("amortization_gap_encoder", "amortization gap of the bare encoder"))
    width = 0.8 / len(kinds)
    for j, (key, label) in enumerate(kinds):
        xs = np.arange(len(names)) + (j - (len(kinds) - 1) / 2) * width
        values = [results[n].get(key) for n in names]
        errs = [times * (results[n].get(key + error) or 0.0) for n in names]
        ax.bar(xs, [v or 0.0 for v in values], width, yerr=errs, label=label, capsize=3)
        for x_, v, e in zip(xs, values, errs):
            ax.annotate("n/a" if v is None else f"{v:.2f}", (x_, (v or 0.0) + e),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                        fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel("nats per image")
    if error == "_stderr":  # say what the bars are: the table's ± is one standard error
        title += f"\n(error bars: ± {times:g} standard errors over test images, paired)"
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
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


def gap_curves(gaps: Dict[str, List[dict]], path: Path,
               references: Optional[Dict[str, Dict[str, float]]] = None,
               tables: Optional[Sequence[str]] = None) -> Path:
    """Amortization and approximation gap (nats; shaded: ± ``BAND`` standard error over the
    rows, as the report's tables give it) against epoch, training rows and test rows side by
    side, one colour per guide (from ``gaps.jsonl`` rows). A panel whose values span more
    than a factor of 20 gets a log axis (symmetric-log if a gap is negative), so the late,
    small gaps are not flattened by the first epochs' hundreds.
    ``tables``: the guides with a per-datapoint table (default: as their records show,
    ``table_guides``); on training rows their L[q*] - L[q] is the local gap of the table's
    rows, not an amortization gap, and is labelled so.
    ``references`` (guide name -> {"amortization_gap": nats, ..., "label": legend text})
    draws reference values as dashed lines in that guide's colour (``cremer.py``: the
    paper's, as recalled)."""
    plt = _plt()
    tables = set(table_guides(gaps) if tables is None else tables)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    kinds = [("amortization_gap", "amortization gap  L[q*] - L[q]"),
             ("approximation_gap", "approximation gap  log p(x) - L[q*]")]
    band = "± 1 s.e." if BAND == 1 else f"± {BAND:g} s.e."
    shown = {}  # (row, col) -> names of guides drawn there
    for (name, rows), colour in zip(gaps.items(), plt.rcParams["axes.prop_cycle"]):
        for col, split in enumerate(("train", "test")):
            these = sorted((r for r in rows if r["split"] == split), key=lambda r: r["epoch"])
            for row, (key, label) in enumerate(kinds):
                pts = [(r["epoch"], r[key], r.get(key + "_stderr") or 0.0) for r in these
                       if r.get(key) is not None]
                ax = axes[row, col]
                local = key == "amortization_gap" and split == "train" and name in tables
                if pts:
                    e, v, s_ = (np.array(t, dtype=float) for t in zip(*pts))
                    ax.plot(e, v, "o-", color=colour["color"],
                            label=f"{name}: local gap of the table rows" if local else name)
                    ax.fill_between(e, v - BAND * s_, v + BAND * s_, color=colour["color"],
                                    alpha=0.2)
                    shown.setdefault((row, col), []).append(name)
                refs = (references or {}).get(name, {})
                if refs.get(key) is not None:
                    ax.axhline(refs[key], color=colour["color"], linestyle="--", linewidth=1,
                               label=refs.get("label", f"{name}: reference"))
                ax.set_title(f"{label}, {split} rows", fontsize=9)
                ax.set_xscale("log")
                ax.grid(alpha=0.3)
    drawn = shown.get((0, 0), [])
    if drawn and all(n in tables for n in drawn):
        axes[0, 0].set_title("L[q*] - L[q], train rows: local gap of the table rows "
                             "(no amortization)", fontsize=9)
    elif any(n in tables for n in drawn):
        axes[0, 0].set_title("amortization gap  L[q*] - L[q], train rows (a per-datapoint "
                             "table: local gap of its rows)", fontsize=9)
    for ax in axes.flat:
        values = np.concatenate([line.get_ydata() for line in ax.get_lines()] or [[]])
        values = values[np.isfinite(values)]
        if len(values) and np.abs(values).max() > 20 * max(np.abs(values).min(), 0.1):
            if values.min() > 0:
                ax.set_yscale("log")
            else:  # a negative gap (q* worse than q): log-like on both sides of zero
                ax.set_yscale("symlog", linthresh=1.0)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("nats per image")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"inference gaps over training (shaded: {band} over the scored rows)")
    return _save(fig, path)


def run_figures(run_dir: Path, arrays: Path, labels: Sequence[int],
                name: str = "model", history: Optional[List[dict]] = None) -> List[Path]:
    """The figures of one evaluated run: curves, reconstructions, samples, latent view.

    The curves come from ``history`` (the checkpoint's) when given, else ``metrics.jsonl``.
    """
    run_dir = Path(run_dir)
    a = np.load(arrays)
    shape = a["shape"] if "shape" in a.files else None  # (C, H, W), saved by evaluate
    classes = a["classes"] if "classes" in a.files else None
    paths = [
        curves({name: history if history is not None else read_metrics(run_dir)},
               run_dir / "curves.png"),
        image_rows({"input": a["inputs"], "reconstruction": a["reconstructions"]},
                   run_dir / "reconstructions.png", "test images and their reconstructions",
                   shape),
        samples(a["samples"], run_dir / "samples.png", shape=shape),
        latent(a["pca"], np.asarray(labels), run_dir / "latent.png", classes=classes),
    ]
    gaps_file = run_dir / "gaps.jsonl"
    if gaps_file.exists():
        paths.append(gap_curves({name: read_metrics(run_dir, "gaps.jsonl")},
                                run_dir / "gaps.png"))
    return paths
