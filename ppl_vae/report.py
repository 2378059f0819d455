"""``evaluate_run``: reload a finished run, evaluate it, write ``eval.json`` and its figures."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import checkpoint, plots
from .config import Config, build_guide, build_model, resolve_device
from .errors import UserError
from .run import Trained, load_splits
from .tracking import open_tracker


def load_trained(run_dir: Path, device: Optional[str] = None,
                 test_size: Optional[int] = None) -> Trained:
    """The model and guide of the newest checkpoint in ``run_dir``, with its data splits."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass the --out of a `ppl-vae train` run")
    state = checkpoint.load(run_dir)
    if state is None:
        raise UserError(f"{run_dir} has no checkpoint; train into it first with `ppl-vae train --out {run_dir}`")
    config = Config.from_dict(state["config"])
    if test_size is not None:
        config = config.replace(test_size=test_size)
    config = config.replace(device=device or config.device)
    dev = resolve_device(config.device)
    splits = load_splits(config, dev)
    dim = splits.train.x.shape[1]
    model = build_model(config, dim, splits.shape).to(dev)
    guide = build_guide(config, dim, len(splits.train), shape=splits.shape).to(dev)
    model.load_state_dict(state["model"])
    guide.load_state_dict(state["guide"])
    from .train import EpochMetrics
    history = [EpochMetrics(**m) for m in state["history"]]
    return Trained(config, model, guide, splits, history, dev)


def evaluate_run(run_dir: Path, num_particles: int = 5000, split: str = "test",
                 proposal: str = "auto", local: Optional[bool] = None,
                 test_size: Optional[int] = None, device: Optional[str] = None,
                 progress: bool = True, log=print) -> dict:
    """Evaluate the run in ``run_dir``; writes eval.json, arrays.npz and four PNG figures."""
    from .compare import evaluate_trained

    if proposal not in ("auto", "guide", "local"):
        raise UserError(f"unknown proposal {proposal!r}; choose one of auto, guide, local")
    if split not in ("test", "valid"):
        raise UserError(f"unknown split {split!r}; choose test or valid")
    if test_size is not None and test_size <= 0:
        raise UserError("--test-size must be positive")
    trained = load_trained(run_dir, device, test_size)
    is_local = getattr(trained.guide, "is_local", False)
    if local is None:
        local = is_local or proposal == "local"
    if proposal == "local" and not local:
        raise UserError("--proposal local needs the local fit; drop --no-local")
    if proposal == "guide" and is_local:
        raise UserError("a meanfield run has no guide for held-out data; use --proposal local")
    results, arrays = evaluate_trained(trained, num_particles, proposal=proposal, local=local,
                                       split=split, progress=progress)
    run_dir = Path(run_dir)
    results.update(guide=trained.config.guide, dataset=trained.config.dataset,
                   binarize=trained.config.binarize, epochs=len(trained.history),
                   device=str(trained.device))
    # the required key names say "test" whatever the split; eval.json's "split" says which
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    np.savez_compressed(run_dir / "arrays.npz", **arrays)
    labels = arrays["labels"]
    figs = plots.run_figures(run_dir, run_dir / "arrays.npz", labels, trained.config.guide)
    tracker = open_tracker(run_dir, trained.config.tensorboard)
    if tracker is not None:  # the figures and numbers as TensorBoard sees them
        tracker.figures(figs, step=len(trained.history))
        tracker.scalars(results, step=len(trained.history), prefix=f"eval_{split}/")
        tracker.close()
    log(f"log p(x) {results['test_log_px']:.2f} ± {results['log_px_stderr']:.2f} "
        f"(K={num_particles}, {results['num_rows']} {split} rows), ELBO {results['test_elbo']:.2f}, "
        f"rate {results['rate']:.2f}, distortion {results['distortion']:.2f}, "
        f"active units {results['active_units']}, {results['seconds']:.0f} s")
    log("wrote " + ", ".join(str(p) for p in [run_dir / "eval.json", *figs]))
    return results
