"""A trained run scored on its held-out split (``evaluate_trained``: what ``evaluate`` and
``compare`` score), and the ``evaluate`` command: a run folder reloaded, scored, and its files
(``eval.json``, ``arrays.npz``, the figures) written aside and put in place once complete.

Only a folder ppl_vae wrote is written into, and only while no other process writes it."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from . import distributed, guides, logs, plots
from .errors import UserError, setting
from .evaluate import Scores, evaluate_model, figure_arrays
from .heldout import EVAL_SEED, eval_pixels, read_gaps
from .rundir import (EVALUATION, MARKER, lock, read_json, refuse_writer, unlock,
                     write_json)
from .run import load_trained
from .tracking import open_tracker


class Evaluated(NamedTuple):
    scores: Optional[Scores]  # None on a torchrun process other than rank 0
    arrays: Optional[dict]  # what the figures show (``figure_arrays``), with the labels


def evaluate_trained(trained, num_particles: int, proposal: str = "auto", local: bool = True,
                     split: str = "test", progress: bool = True,
                     local_options: Optional[dict] = None) -> Evaluated:
    """``evaluate_model`` on a trained run's held-out split (its first ``test_size`` rows,
    under the fixed evaluation binarization), with the figures' arrays."""
    held_out = trained.splits.get(split).head(trained.config.test_size)
    x = eval_pixels(trained.config, held_out)
    scores = evaluate_model(trained.model, trained.guide, x, num_particles, local=local,
                            proposal=proposal, seed=EVAL_SEED, progress=progress,
                            local_options=local_options, split=split)
    if scores is None:  # another torchrun process: rank 0 has the scores
        return Evaluated(None, None)
    figs = figure_arrays(trained.model, x, scores.means)
    figs["labels"] = held_out.y.cpu().numpy()  # -1: unlabelled
    figs["shape"] = np.array(held_out.image_shape)  # (C, H, W), for the figures
    figs["classes"] = np.array(held_out.classes or (), dtype=str)
    return Evaluated(scores, figs)


def _check_gaps(run_dir: Path) -> None:
    """Refuse, before any work, a gaps.jsonl whose lines the gap figure could not read."""
    path = run_dir / "gaps.jsonl"
    if not path.is_file():
        return
    try:
        rows = read_gaps(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}); delete it to evaluate "
                        f"without the gap curves") from None
    if not all(isinstance(r, dict) and {"epoch", "split"} <= set(r) for r in rows):
        raise UserError(f"{path} is damaged (lines without epoch and split); delete it to "
                        f"evaluate without the gap curves")


def evaluate_run(run_dir: Path, num_particles: int = 5000, split: str = "test",
                 proposal: str = "auto", local: Optional[bool] = None,
                 test_size: Optional[int] = None, device: Optional[str] = None,
                 progress: bool = True, log=logs.info, warn=logs.warning,
                 trust_code: bool = False, given=None) -> dict:
    """Evaluate the run in ``run_dir``; writes eval.json, arrays.npz and four PNG figures
    (``split="valid"``: ``eval_valid.json`` under ``valid_*`` names, beside the test's).

    Only a folder ppl_vae wrote (its marker) is written into, and only while no other process
    writes it (its lock; a run still training is refused: evaluate a copy). The new files are
    made aside and replace the previous evaluation once complete. An unfinished run (killed,
    or interrupted during its final scoring) is evaluated at its newest checkpoint with a
    warning (``eval.json`` says which epoch). A finished run whose newest checkpoint is
    unreadable is refused rather than scored at an older epoch than its summary. Code that
    the checkpoint names is imported only with ``trust_code`` or when ``given`` names it.
    """
    if proposal not in ("auto", "guide", "local"):
        raise UserError(f"unknown proposal {proposal!r}; choose one of auto, guide, local")
    if split not in ("test", "valid"):
        raise UserError(f"unknown split {split!r}; choose test or valid")
    if test_size is not None and test_size <= 0:
        raise UserError(f"{setting('test_size')} must be positive")
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run folder; pass the out folder of a "
                        f"`ppl-vae train` run")
    _check_gaps(run_dir)
    refuse_writer(run_dir)
    finished = (run_dir / "summary.json").exists()
    trained = load_trained(run_dir, device, test_size, fallback=not finished, warn=warn,
                           trust_code=trust_code, given=given)
    if not (run_dir / MARKER).exists():
        raise UserError(f"{run_dir} lacks the {MARKER} marker of a folder that ppl_vae wrote, so "
                        f"evaluate will not write its files there; evaluate a ppl_vae run folder "
                        f"(or `touch {run_dir / MARKER}` if it is one whose marker was lost)")
    if not finished:
        warn(f"warning: {run_dir} has not finished training; evaluating its checkpoint after "
             f"epoch {len(trained.history)}")
    if finished:
        summary = read_json(run_dir / "summary.json", "train the run again")
        if summary.get("epochs") != len(trained.history):
            raise UserError(f"{run_dir}: summary.json is for epoch {summary.get('epochs')} but "
                            f"the readable checkpoint is after epoch {len(trained.history)}")
    fitted = guides.local_parameters(trained.guide)
    if local is None:
        local = bool(fitted) or proposal == "local"
    if proposal == "local" and not local:
        raise UserError(f"{setting('proposal')} local needs the local fit; drop the no_ "
                        f"form of {setting('local')}")
    if proposal == "guide" and fitted:
        raise UserError(f"the {trained.config.guide} guide has no parameters for held-out "
                        f"rows; use {setting('proposal')} local")
    main = distributed.current().main
    if main:  # one writer: a train or evaluate started now is refused
        lock(run_dir, "evaluate")
    try:
        s, results, figs = _evaluate_into(run_dir, trained, num_particles, proposal, local,
                                          split, progress, finished)
    finally:
        if main:
            unlock(run_dir)
    if results is None:  # another torchrun process: rank 0 writes the files
        return {}
    log(f"log p(x) {s.log_px.mean:.2f} ± {s.log_px.stderr:.2f} (K={num_particles}, "
        f"{s.rows} {split} rows), ELBO {s.elbo.mean:.2f}, rate {s.rate:.2f}, distortion "
        f"{s.distortion:.2f}, active units {s.active_units}, {s.seconds:.0f} s")
    name = "eval.json" if split == "test" else f"eval_{split}.json"
    log("wrote " + ", ".join(str(p) for p in [run_dir / name, *figs]))
    return results


def _evaluate_into(run_dir: Path, trained, num_particles, proposal, local, split, progress,
                   finished):
    """Evaluate and write the files aside (``.evaluating-<pid>``); the previous evaluation is
    replaced only once the new one is complete (each file by a rename, eval.json last)."""
    scores, arrays = evaluate_trained(trained, num_particles, proposal=proposal, local=local,
                                      split=split, progress=progress)
    if scores is None:
        return None, None, None
    results = {**scores.to_json(), "guide": trained.config.guide,
               "dataset": trained.config.dataset, "binarize": trained.config.binarize,
               "epochs": len(trained.history), "finished": finished,
               "checkpoint": trained.checkpoint, "device": str(trained.device)}
    if split != "test":  # another split's numbers, under its own names, beside the test's
        write_json(run_dir / f"eval_{split}.json", results)
        return scores, results, []
    aside = run_dir / f".evaluating-{os.getpid()}"
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    try:
        if (run_dir / "gaps.jsonl").exists():  # the figure of the run's gap curves
            shutil.copy2(run_dir / "gaps.jsonl", aside / "gaps.jsonl")
        np.savez_compressed(aside / "arrays.npz", **arrays)
        history = [m._asdict() for m in trained.history]
        made = plots.run_figures(aside, aside / "arrays.npz", arrays["labels"],
                                 trained.config.guide, history)
        write_json(aside / "eval.json", results)
        names = [p.name for p in made] + ["arrays.npz", "eval.json"]
        for name in EVALUATION:  # files of the previous evaluation that this one lacks
            if name not in names and not name.startswith("eval_"):  # (other splits stay)
                (run_dir / name).unlink(missing_ok=True)
        for name in names:
            os.replace(aside / name, run_dir / name)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    figs = [run_dir / p.name for p in made]
    tracker = open_tracker(run_dir, trained.config.tensorboard)
    if tracker is not None:  # the figures and numbers as TensorBoard sees them
        tracker.figures(figs, step=len(trained.history))
        tracker.scalars(results, step=len(trained.history), prefix=f"eval_{split}/")
        tracker.close()
    return scores, results, figs
