"""The comparison report: a Markdown table per guide, the gaps, the settings, the figures.

``evaluate_run`` and ``load_trained`` are re-exported from ``heldout`` and ``run``, where
they live.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from . import plots
from .heldout import evaluate_run  # noqa: F401
from .run import load_trained  # noqa: F401

ROWS = [
    ("test ELBO of its own guide, L[q] (nats)", "test_elbo", "test_elbo_stderr"),
    ("test ELBO of the bare encoder (semi-amortized)", "test_elbo_encoder",
     "test_elbo_encoder_stderr"),
    ("test ELBO after local optimization, L[q*]", "test_elbo_local", "test_elbo_local_stderr"),
    ("importance-sampled log p(x)", "test_log_px", "log_px_stderr"),
    ("approximation gap log p(x) - L[q*]", "approximation_gap", "approximation_gap_stderr"),
    ("amortization gap L[q*] - L[q]", "amortization_gap", "amortization_gap_stderr"),
    ("amortization gap of the bare encoder", "amortization_gap_encoder",
     "amortization_gap_encoder_stderr"),
    ("rate KL(q‖p) of its own guide", "rate", None),
    ("distortion -E_q log p(x|z)", "distortion", None),
    ("active units", "active_units", None),
    ("epochs", "epochs", None),
    ("optimizer steps", "steps", None),
    ("training time (s)", "train_seconds", None),
    ("steps per second", "steps_per_second", None),
    ("gap curves: seconds", "gap_tracking_seconds", None),
    ("peak RSS of the process so far (MiB)", "peak_rss_mb", None),
    ("parameters (MiB)", "param_mb", None),
    ("test-time local inference: steps", "local_steps", None),
    ("test-time local inference: seconds", "local_seconds", None),
    ("log p(x) estimate: seconds", "log_px_seconds", None),
]


def line(guide: str, r: dict) -> str:
    amort = r.get("amortization_gap")
    return (f"{guide}: ELBO {r['test_elbo']:.2f}  L[q*] {r['test_elbo_local']:.2f}  "
            f"log p(x) {r['test_log_px']:.2f}  approx gap {r['approximation_gap']:.2f}  "
            f"amort gap {'n/a' if amort is None else f'{amort:.2f}'}")


def gap_curves(gaps: Dict[str, List[dict]], path: Path) -> Path:
    return plots.gap_curves(gaps, path)


def write_figures(out: Path, histories, results, arrays, gaps=None) -> None:
    plots.curves(histories, out / "curves.png", "ELBO per image, per guide")
    plots.gaps(results, out / "gaps.png")
    if gaps:
        plots.gap_curves(gaps, out / "gap_curves.png")
    first = next(iter(arrays.values()))
    rows = {"input": first["inputs"]}
    rows.update({f"{g} recon.": a["reconstructions"] for g, a in arrays.items()})
    plots.image_rows(rows, out / "reconstructions.png",
                     "test images and reconstructions at the posterior mean", first.get("shape"))
    np.savez_compressed(out / "arrays.npz", **{f"{g}_{k}": v for g, a in arrays.items()
                                               for k, v in a.items()})


def _fmt(v, stderr=None) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return str(v)
    return f"{v:.2f} ± {stderr:.2f}" if stderr is not None else f"{v:.2f}"


def markdown(doc: dict, with_gap_curves: bool = False) -> str:
    """The comparison as Markdown."""
    c = doc["config"]
    names = doc["guides"]
    head = "| quantity | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    body = ""
    for label, key, err in ROWS:
        if all(doc[g].get(key) is None for g in names):
            continue
        cells = [_fmt(doc[g].get(key), doc[g].get(err) if err else None) for g in names]
        body += f"| {label} | " + " | ".join(cells) + " |\n"
    a = doc[names[0]]
    budget = f"{c['epochs']} epochs" + ("" if c["max_seconds"] is None else
                                        f" or {c['max_seconds']:.0f} s of training, whichever first")
    tracked = sorted({e for e in c["gap_epochs"] if e <= c["epochs"]} | {c["epochs"]})
    curves = ("\n![gap curves](gap_curves.png)\n\nGap curves: L[q], L[q*] and log p(x) "
              f"(K = {c['gap_particles']}) on the first {c['gap_rows']} training and test rows "
              f"at epochs {', '.join(map(str, tracked))}; each guide's `gaps.jsonl` has the "
              f"numbers.\n" if with_gap_curves else "")
    return f"""# Amortized, semi-amortized and mean-field inference

Date {doc['date']}, device `{doc['device']}`, torch {doc['versions']['torch']}, pyro {doc['versions']['pyro']}, git `{doc['versions']['git']}`.

Data: {c['dataset']}, {c['binarize']} binarization for training; the test set ({a['num_rows']} rows) is scored
under one fixed binarization. Model: {c['latent_dim']}-dimensional latent, {c['net']} networks, hidden {c['hidden']} ({c['activation']}),
{c['likelihood']} likelihood, {c['prior']} prior. Every guide: same decoder initialization (seed {c['seed']}),
same data order, the same budget of {budget}, batch {c['batch_size']}, Adam lr {c['lr']}; the per-datapoint table:
RowAdam lr {c['local_lr']}, {c["inner_steps"]} local-only step(s) per minibatch before each joint step; the
semi-amortized guide: {c['refine_steps']} refinement steps of size {c['refine_lr']} from the encoder's output.
Wall time and steps per second are reported beside the numbers; they are not the budget.

log p(x) is importance-sampled with K = {a['num_particles']} particles from the locally optimized q*
(proposal `{a['proposal']}`). Errors are ± one standard error over test images (paired for the gaps).

{head}{body}
Curves: "train" is the training objective over the epoch's minibatches (for the per-datapoint
guide, the ELBO of its table rows as they were when visited); "valid" is the ELBO on
{c['valid_size']} validation rows of the guide as it answers for new rows (the encoder; the
refined encoder; a per-datapoint fit warm-started from the previous epoch, 30 steps with the
decoder frozen).

![ELBO curves](curves.png)

![gaps](gaps.png)
{curves}
![reconstructions](reconstructions.png)

For reference, Cremer, Li & Duvenaud (2018) report for MNIST with a factorized Gaussian
about 1.4 nats of approximation gap and 1.3 nats of amortization gap (a larger model, 3,280
epochs); `experiments/README.md` compares.
"""
