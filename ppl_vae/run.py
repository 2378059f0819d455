"""A whole run in one call: ``train_run(config, out)`` trains, checkpoints, scores and writes files.

Files written into ``out``: ``config.json`` (settings, the data's split sizes and image shape,
library versions, git revision and whether the working tree had uncommitted changes, the
command line),
``metrics.jsonl`` (one object per epoch), ``checkpoint.pt`` (every epoch, atomically) and
``summary.json`` (``test_elbo`` and timings) once the run has finished.
"""
from __future__ import annotations

import json
import math
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from . import checkpoint, data
from .config import Config, build_guide, build_model, build_objective, resolve_device
from .errors import UserError
from .evaluate import Estimate, elbo_parts, local_inference
from .guides import LocalNormal
from .optim import make_optimizers
from .tracking import open_tracker
from .train import EpochMetrics, Interrupted, Position, fit

EVAL_SEED = 1234  # the test/validation binarization and every estimate's noise
# settings a resumed run must share with its checkpoint (epochs, lr, max_seconds may change)
RESUME_FIXED = ("dataset", "valid_fraction", "test_fraction", "net", "latent_dim", "hidden", "likelihood", "prior", "guide", "train_size",
                "valid_size", "binarize", "batch_size", "seed", "objective", "num_particles",
                "dreg", "local_init")
OUTPUTS = ("summary.json", "metrics.jsonl", "eval.json", "arrays.npz", "curves.png",
           "reconstructions.png", "samples.png", "latent.png")


class Trained(NamedTuple):
    """A trained model with what it was trained on."""

    config: Config
    model: torch.nn.Module
    guide: torch.nn.Module
    splits: data.Splits  # on the device, grayscale
    history: list
    device: torch.device


def versions() -> dict:
    import numpy
    import pyro
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__,
            "pyro": pyro.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "git": git_revision(), "git_dirty": git_dirty()}


def git_revision() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_dirty() -> Optional[bool]:
    """Whether the package's git working tree has uncommitted changes (None: not a checkout)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def load_splits(config: Config, device: torch.device) -> data.Splits:
    """The dataset's splits on ``device``, cut to ``train_size``/``test_size`` when set."""
    splits = data.load(config.dataset, config.data_dir, config.valid_fraction,
                       config.test_fraction)
    splits = data.Splits(splits.train.head(config.train_size).to(device),
                         splits.valid.to(device), splits.test.head(config.test_size).to(device))
    check_sizes(config, splits)
    return splits


def check_sizes(config: Config, splits: data.Splits) -> None:
    """Refuse data too small for the run's batch size or (per-datapoint PCA start) latent size."""
    n, dim = len(splits.train), splits.train.x.shape[1]
    if n < config.batch_size:
        raise UserError(f"{n} training rows are fewer than --batch-size {config.batch_size}; "
                        f"use --batch-size {max(1, n // 4)} or give more rows")
    if config.guide == "meanfield" and config.local_init == "pca" and \
            min(n, dim) < config.latent_dim + 10:
        raise UserError(f"--local-init pca needs at least latent-dim + 10 = "
                        f"{config.latent_dim + 10} training rows and pixels, the data have {n} "
                        f"rows of {dim}; use a smaller --latent-dim or --local-init prior")


def run_record(config: Config, splits: data.Splits, device: torch.device) -> dict:
    """What config.json holds: settings, data, command line, versions (git state), device."""
    return {"config": config.to_dict(), "data": splits.describe(), "command": list(sys.argv),
            "versions": versions(), "device": str(device)}


def eval_pixels(config: Config, split: data.Split, rows: Optional[int] = None) -> torch.Tensor:
    """Held-out pixels as every model sees them: one fixed binarization (seed ``EVAL_SEED``)."""
    split = split.head(rows)
    if config.binarize == "none":
        return split.x
    return data.static_binarize(split, EVAL_SEED).x


def held_out_elbo(model, guide, x: torch.Tensor, warm: Optional[LocalNormal] = None,
                  **local) -> tuple:
    """(per-datapoint ELBO [N], fitted local guide or None) of ``guide`` on held-out ``x``.

    An amortized guide is scored as it is; a per-datapoint guide has no rows for held-out
    data, so a fresh q* is fitted with the decoder frozen (warm-started from ``warm``).
    """
    if not getattr(guide, "is_local", False):
        return elbo_parts(model, guide, x, num_particles=10, seed=EVAL_SEED).elbo, None
    fit_ = local_inference(model, x, init=warm, seed=EVAL_SEED, **local)
    return elbo_parts(model, fit_.guide, x, num_particles=10, seed=EVAL_SEED).elbo, fit_.guide


def prepare_out(out: Path, overwrite: bool, resume: bool, resumable: bool = True) -> None:
    """Refuse to clobber a run unless asked; clear what a new or resumed run will rewrite."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose another path")
    finished = (out / "summary.json").exists()
    started = (out / checkpoint.NAME).exists() or (out / checkpoint.PREVIOUS).exists()
    if resume:
        if not started:
            raise UserError(f"--resume: no checkpoint in {out}; start a new run without --resume")
        for name in OUTPUTS[:1] + OUTPUTS[2:]:  # results of the run as it was: stale now
            (out / name).unlink(missing_ok=True)
        return
    if (finished or started) and not overwrite:
        what = "a finished run" if finished else "an unfinished run"
        how = "pass --resume to continue it, --overwrite to" if resumable else "pass --overwrite to"
        raise UserError(f"{out} holds {what}; {how} replace it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in OUTPUTS + (checkpoint.NAME, checkpoint.PREVIOUS, checkpoint.NAME + ".tmp"):
            (out / name).unlink(missing_ok=True)


def check_compatible(saved: Config, config: Config) -> None:
    for name in RESUME_FIXED:
        a, b = getattr(saved, name), getattr(config, name)
        if a != b:
            raise UserError(f"checkpoint was trained with {name}={a!r} but this run asks for "
                            f"{name}={b!r}; use the same setting or a new --out")


def train_run(config: Config, out: Optional[Path] = None, overwrite: bool = False,
              resume: bool = False, progress: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Train per ``config``, write the run's files into ``out`` and return the summary."""
    return finish(fit_run(config, out, overwrite, resume, progress, log), out, log)


def fit_run(config: Config, out: Optional[Path] = None, overwrite: bool = False,
            resume: bool = False, progress: bool = True,
            log: Callable[[str], None] = print) -> Trained:
    """Train per ``config`` (writing config, metrics and checkpoints when ``out`` is given)."""
    config.validate()
    device = resolve_device(config.device)
    out = Path(out) if out is not None else None
    splits = load_splits(config, device)  # bad data fails before a run folder exists
    if out is not None:
        prepare_out(out, overwrite, resume)
    # binarization noise has its own stream: every guide sees the same pixels
    binarize = data.Binarize(config.binarize,
                             torch.Generator(device=device).manual_seed(config.seed + 3))
    train_split = binarize.prepare(splits.train, config.seed)
    model = build_model(config, train_split.x.shape[1], splits.shape).to(device)
    guide = build_guide(config, train_split.x.shape[1], len(train_split),
                        None if resume else splits.train.x, splits.shape).to(device)
    if config.binarize == "none":
        model.likelihood.check(train_split.x)
    else:
        model.likelihood.check(torch.bernoulli(train_split.x[:100]))
    optimizers = make_optimizers(model, guide, config.lr, config.local_lr, config.inner_steps)
    x_valid = eval_pixels(config, splits.valid, config.valid_size)
    valid_state = {"guide": None}

    def validate() -> float:
        # a per-datapoint model's validation rows get a warm-started local fit each epoch
        elbo, valid_state["guide"] = held_out_elbo(model, guide, x_valid, valid_state["guide"],
                                                   max_steps=30)
        return float(elbo.mean())

    history, position = [], None
    torch.manual_seed(config.seed + 2)
    if resume:
        state = checkpoint.load(out, warn=log)
        check_compatible(Config.from_dict(state["config"]), config)
        model.load_state_dict(state["model"])
        guide.load_state_dict(state["guide"])
        for opt, opt_state in zip(optimizers.all(), state["optimizers"]):
            opt.load_state_dict(opt_state)
        for opt, lr in zip(optimizers.all(), (config.lr, config.local_lr)):
            for group in opt.param_groups:  # a resumed run may ask for another rate
                group["lr"] = lr
        if state.get("valid_guide") is not None:
            valid_state["guide"] = LocalNormal(len(x_valid), config.latent_dim,
                                               sparse=False).to(device)
            valid_state["guide"].load_state_dict(state["valid_guide"])
        history = [EpochMetrics(**m) for m in state["history"]]
        if state.get("position") is not None:
            position = Position(**state["position"])
        checkpoint.set_rng_state(state["rng"])
        binarize.generator.set_state(state["binarize_rng"])
        log(f"resuming {out} after epoch {len(history)}"
            + (f", step {position.step} of epoch {position.epoch + 1}" if position else ""))
    if out is not None:
        (out / "config.json").write_text(json.dumps(run_record(config, splits, device),
                                                    indent=2) + "\n")
        _write_metrics(out, history)
    tracker = open_tracker(out, config.tensorboard)

    def save(done: list, position: Optional[Position] = None) -> None:
        if out is None:
            return
        valid_guide = valid_state["guide"]
        checkpoint.save({
            "config": config.to_dict(), "model": model.state_dict(), "guide": guide.state_dict(),
            "optimizers": [o.state_dict() for o in optimizers.all()],
            "valid_guide": valid_guide.state_dict() if valid_guide is not None else None,
            "history": [m._asdict() for m in done],
            "position": position._asdict() if position is not None else None,
            "rng": checkpoint.rng_state(), "binarize_rng": binarize.generator.get_state()}, out)

    def on_epoch(metrics: EpochMetrics) -> None:
        done.append(metrics)
        if out is not None:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics._asdict()) + "\n")
        if tracker is not None:
            tracker.epoch(metrics)
        save(done)

    done = list(history)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        history = fit(model, guide, build_objective(config), train_split, optimizers,
                      config.epochs, config.batch_size, binarize, seed=config.seed,
                      start_epoch=len(history), warmup_epochs=config.warmup_epochs,
                      max_seconds=config.max_seconds, validate=validate, on_epoch=on_epoch,
                      progress=progress, history=history, position=position,
                      on_divergence=config.on_divergence, log=log)
    except Interrupted as e:
        save(done, e.position)
        raise
    finally:
        if tracker is not None:
            tracker.close()
    return Trained(config, model, guide, splits, history, device)


def _write_metrics(out: Path, history) -> None:
    with open(out / "metrics.jsonl", "w") as f:
        for m in history:
            f.write(json.dumps(m._asdict()) + "\n")


def memory_summary(trained: Trained) -> dict:
    """Peak memory: process RSS (CPU) or allocator peak (CUDA), and parameter bytes."""
    params = sum(p.numel() * p.element_size()
                 for m in (trained.model, trained.guide) for p in m.parameters())
    out = {"param_mb": params / 2 ** 20,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if trained.device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(trained.device) / 2 ** 20
    return out


def finish(trained: Trained, out: Optional[Path], log: Callable[[str], None] = print,
           test: Optional[Estimate] = None) -> dict:
    """Score the trained model's own guide on the test set and write ``summary.json``.

    ``test`` passes a test ELBO already computed (by ``evaluate_model``) instead.
    """
    x_test = eval_pixels(trained.config, trained.splits.test)
    start, eval_seconds = time.perf_counter(), None
    if test is None:
        test = Estimate.of(held_out_elbo(trained.model, trained.guide, x_test)[0])
        eval_seconds = time.perf_counter() - start
    history = trained.history
    train_seconds = history[-1].wall if history else 0.0
    summary = {
        "test_elbo": test.mean, "test_elbo_stderr": test.stderr,
        "test_rows": len(x_test), "epochs": len(history),
        "seconds_per_epoch": train_seconds / max(1, len(history)),
        "train_seconds": train_seconds,
        "steps_per_second": (history[-1].steps / train_seconds) if train_seconds else math.nan,
        "eval_seconds": eval_seconds,  # None when the caller scored the test set
        "final_train_elbo": history[-1].train_elbo if history else math.nan,
        "final_valid_elbo": history[-1].valid_elbo if history else math.nan,
        "guide": trained.config.guide, "dataset": trained.config.dataset,
        "binarize": trained.config.binarize,
        **memory_summary(trained),
    }
    log(f"test ELBO {test.mean:.2f} +- {test.stderr:.2f} nats ({len(history)} epochs, "
        f"{summary['seconds_per_epoch']:.1f} s/epoch)")
    if out is not None:
        (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        tracker = open_tracker(out, trained.config.tensorboard)
        if tracker is not None:
            tracker.hparams(trained.config.to_dict(), {
                k: summary[k] for k in ("test_elbo", "final_valid_elbo", "final_train_elbo")})
            tracker.close()
    return summary
