"""Amortized versus mean-field (per-datapoint) inference on the same decoder, data and budget.

``compare(config, out)`` trains one model per guide with identical decoder architecture,
initialization seed, data order and epochs (or training-time budget), evaluates both on the
same test rows with the same seeds, and writes ``results.json``, ``report.md`` and figures.

Reference: Cremer, Li & Duvenaud (2018), Inference Suboptimality in Variational Autoencoders.
"""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import plots
from .errors import UserError
from .config import Config
from .evaluate import Estimate, evaluate_model, figure_arrays
from .run import EVAL_SEED, eval_pixels, finish, fit_run, load_splits, prepare_out, versions

GUIDES = ("amortized", "meanfield")


def evaluate_trained(trained, num_particles: int, proposal: str = "auto", local: bool = True,
                     split: str = "test", progress: bool = True,
                     local_options: Optional[dict] = None):
    """``evaluate_model`` on a trained run's held-out split; returns (results, arrays)."""
    # load_splits cut the test split to test_size; cut a validation split the same way
    held_out = trained.splits.get(split).head(trained.config.test_size)
    x = eval_pixels(trained.config, held_out)
    results, arrays = evaluate_model(trained.model, trained.guide, x, num_particles, local=local,
                                     proposal=proposal, seed=EVAL_SEED, progress=progress,
                                     local_options=local_options)
    results["split"] = split
    figs = figure_arrays(trained.model, x, arrays["posterior_means"])
    figs["labels"] = held_out.y.cpu().numpy()  # -1: unlabelled
    figs["shape"] = np.array(held_out.image_shape)  # (C, H, W), for the figures
    figs["classes"] = np.array(held_out.classes or (), dtype=str)
    return results, figs


def compare(config: Config, out: Path, num_particles: int = 1000, overwrite: bool = False,
            progress: bool = True, log: Callable[[str], None] = print,
            guides: Sequence[str] = GUIDES) -> dict:
    """Train and evaluate each guide; write results.json, report.md and figures into ``out``.

    ``config.guide`` is ignored: every entry of ``guides`` gets the same config otherwise.
    """
    out = Path(out)
    config.validate()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose another path")
    if (out / "results.json").exists() and not overwrite:
        raise UserError(f"{out} holds a finished comparison; pass --overwrite or choose another --out")
    if overwrite:
        for name in ("results.json", "report.md", "curves.png", "gaps.png",
                     "reconstructions.png", "arrays.npz"):
            (out / name).unlink(missing_ok=True)
    load_splits(config, torch.device("cpu"))  # bad data: refused before any folder exists
    for guide in guides:  # refuse before spending any time on training
        config.replace(guide=guide).validate()
        prepare_out(out / guide, overwrite, resume=False, resumable=False)
    results, arrays, histories = {}, {}, {}
    for guide in guides:
        log(f"== training the {guide} guide")
        trained = fit_run(config.replace(guide=guide), out / guide, overwrite=overwrite,
                          progress=progress, log=log)
        log(f"== evaluating the {guide} model")
        res, arrays[guide] = evaluate_trained(trained, num_particles, progress=progress)
        summary = finish(trained, out / guide, log=log,
                         test=Estimate(res["test_elbo"], res["test_elbo_stderr"]))
        res.update({k: summary[k] for k in ("train_seconds", "epochs", "steps_per_second",
                                            "seconds_per_epoch", "param_mb", "peak_rss_mb")
                    + (("peak_cuda_mb",) if "peak_cuda_mb" in summary else ())})
        results[guide] = res
        histories[guide] = [m._asdict() for m in trained.history]
        log(_line(guide, res))
    doc = {"date": datetime.date.today().isoformat(), "config": config.to_dict(),
           "data": trained.splits.describe(), "command": list(sys.argv),
           "versions": versions(), "device": str(trained.device), "guides": list(guides),
           **results}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    write_figures(out, histories, results, arrays)
    (out / "report.md").write_text(report(doc))
    log(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return doc


def _line(guide: str, r: dict) -> str:
    amort = r["amortization_gap"]
    return (f"{guide}: ELBO {r['test_elbo']:.2f}  L[q*] {r['test_elbo_local']:.2f}  "
            f"log p(x) {r['test_log_px']:.2f}  approx gap {r['approximation_gap']:.2f}  "
            f"amort gap {'n/a' if amort is None else f'{amort:.2f}'}")


def write_figures(out: Path, histories, results, arrays) -> None:
    plots.curves(histories, out / "curves.png", "amortized vs mean-field: ELBO per image")
    plots.gaps(results, out / "gaps.png")
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
    return f"{v:.2f} ± {stderr:.2f}" if stderr is not None else f"{v:.2f}"


def report(doc: dict) -> str:
    """The comparison as Markdown: a table per model, the gaps, the settings, the figures."""
    c = doc["config"]
    rows = [
        ("test ELBO of its own guide, L[q] (nats)", "test_elbo", "test_elbo_stderr"),
        ("test ELBO after local optimization, L[q*]", "test_elbo_local", "test_elbo_local_stderr"),
        ("importance-sampled log p(x)", "test_log_px", "log_px_stderr"),
        ("approximation gap log p(x) - L[q*]", "approximation_gap", "approximation_gap_stderr"),
        ("amortization gap L[q*] - L[q]", "amortization_gap", "amortization_gap_stderr"),
        ("rate KL(q‖p) of its own guide", "rate", None),
        ("distortion -E_q log p(x|z)", "distortion", None),
        ("active units", "active_units", None),
        ("epochs", "epochs", None),
        ("training time (s)", "train_seconds", None),
        ("steps per second", "steps_per_second", None),
        ("peak RSS of the process so far (MiB)", "peak_rss_mb", None),
        ("parameters (MiB)", "param_mb", None),
        ("test-time local inference: steps", "local_steps", None),
        ("test-time local inference: seconds", "local_seconds", None),
        ("log p(x) estimate: seconds", "log_px_seconds", None),
    ]
    names = doc["guides"]
    head = "| quantity | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    body = ""
    for label, key, err in rows:
        cells = []
        for g in names:
            v = doc[g].get(key)
            cells.append(str(v) if isinstance(v, int) else _fmt(v, doc[g].get(err) if err else None))
        body += f"| {label} | " + " | ".join(cells) + " |\n"
    a = doc[names[0]]
    return f"""# Amortized versus mean-field inference

Date {doc['date']}, device `{doc['device']}`, torch {doc['versions']['torch']}, pyro {doc['versions']['pyro']}, git `{doc['versions']['git']}`.

Data: {c['dataset']}, {c['binarize']} binarization for training; the test set ({a['num_rows']} rows) is scored
under one fixed binarization. Model: {c['latent_dim']}-dimensional latent, {c.get('net', 'mlp')} networks, hidden {c['hidden']},
{c['likelihood']} likelihood, {c['prior']} prior. Both guides: same decoder initialization (seed {c['seed']}),
same data order, {c['epochs']} epochs{'' if c['max_seconds'] is None else f" or {c['max_seconds']:.0f} s of training"},
batch {c['batch_size']}, Adam lr {c['lr']}; the per-datapoint table: RowAdam lr {c['local_lr']},
{c["inner_steps"]} local-only step(s) per minibatch before each joint step.

log p(x) is importance-sampled with K = {a['num_particles']} particles from the locally optimized q*
(proposal `{a['proposal']}`). Errors are ± one standard error over test images (paired for the gaps).

{head}{body}
Curves: "train" is the training objective over the epoch's minibatches (for the per-datapoint
guide, the ELBO of its table rows as they were when visited); "valid" is the ELBO on
{c['valid_size']} validation rows, of the encoder for an amortized guide and of a per-datapoint
fit warm-started from the previous epoch (30 steps with the decoder frozen) for a mean-field one.

![ELBO curves](curves.png)

![gaps](gaps.png)

![reconstructions](reconstructions.png)

For reference, Cremer, Li & Duvenaud (2018) report for MNIST with a factorized Gaussian
about 1.4 nats of approximation gap and 1.4 nats of amortization gap (a larger model, 3,280 epochs).
"""
