"""A trained run scored on its held-out split (``evaluate_trained``: what ``evaluate`` and
``compare`` score), and the ``evaluate`` command: a run folder reloaded, scored, and its files
(``eval.json``, ``arrays.npz``, the figures) written aside and put in place once complete.

Only a folder ppl_vae wrote is written into, and only while no other process writes it."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence

import numpy as np

from . import distributed, gap_plots, logs, plots, protocol
from .config import local_fit_options
from .errors import UserError, setting
from .evaluate import Scores, evaluate_model, figure_arrays, why_no_amortization_gap
from .heldout import EVAL_SEED, eval_pixels
from .rundir import check_kind, recover, replace_folder, resolve_link, stage_copy
from .runfiles import (EVALUATION, MARKER, check_files, check_gaps, expect, is_regular,
                       read_mapping, whole, write_json)
from .writelock import lock, refuse_writer, unlock
from .run_setup import load_trained
from .loopstate import Interrupted
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
    local_options = local_fit_options(trained.config, local_options)
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


class EvaluationInterrupted(Interrupted, KeyboardInterrupt):
    """Ctrl-C during ``evaluate``: a ``KeyboardInterrupt`` (what a caller catches), and an
    ``Interrupted`` whose message and ``kept`` say what the evaluation left (the CLI prints
    them in one line and exits with 130)."""

    def __init__(self, run_dir: Path, kept: str):
        Exception.__init__(self, f"evaluation of {run_dir} interrupted")
        self.position = None
        self.kept = kept


def _check_gaps(run_dir: Path) -> None:
    """Refuse, before any work, a gaps.jsonl whose lines the gap figure could not read."""
    check_gaps(run_dir / "gaps.jsonl")


def evaluate_run(run_dir: Path, num_particles: int = 5000, split: str = "test",
                 proposal: str = "auto", local: Optional[bool] = None,
                 test_size: Optional[int] = None, device: Optional[str] = None,
                 progress: bool = True, log=logs.info, warn=logs.warning,
                 trust_code: bool = False, given=None,
                 local_family: Optional[str] = None) -> dict:
    """Evaluate the run in ``run_dir``; writes eval.json, arrays.npz and four PNG figures
    (``split="valid"``: ``eval_valid.json`` under ``valid_*`` names, beside the test's).

    Only a folder ppl_vae wrote (its marker) holding a run (not a comparison) is written
    into, and only while no other process writes it: its lock is taken before the
    checkpoint is read and held to the last file (a run still training is refused: evaluate
    a copy; a process that holds the lock itself, ``train --evaluate``, goes on). The new
    files are made in a copy of the folder and replace the previous evaluation as one set
    (``rundir.stage_copy``). Files of the folder that are no regular files, or hold fields
    of the wrong kind, are refused in one line. An unfinished run (killed, or interrupted
    during its final scoring) is evaluated at its newest checkpoint with a warning
    (``eval.json`` says which epoch). A finished run whose newest checkpoint is unreadable
    is refused rather than scored at an older epoch than its summary. Code that the
    checkpoint names is imported only with ``trust_code`` or when ``given`` names it.
    ``local_family``: q*'s family (``Config.local_family``; None: the run's own setting);
    naming one fits q* (``local`` None becomes True).

    Why so many parameters: it is the ``evaluate`` command's Python API; each keyword is one
    of its flags.
    """
    if proposal not in ("auto", "guide", "local"):
        raise UserError(f"unknown proposal {proposal!r}; choose one of auto, guide, local")
    if split not in ("test", "valid"):
        raise UserError(f"unknown split {split!r}; choose test or valid")
    if test_size is not None and test_size <= 0:
        raise UserError(f"{setting('test_size')} must be positive")
    if local_family is not None and local is False:
        raise UserError(f"{setting('local_family')} {local_family} names the family of the local "
                        f"fit; do not turn {setting('local')} off")
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run folder; pass the out folder of a "
                        f"`ppl-vae train` run")
    if run_dir.is_dir() and not distributed.launched():  # a killed swap is undone first
        recover(resolve_link(run_dir))
    check_files(run_dir)
    check_kind(run_dir, "run", advice=f"evaluate a run folder (a guide's folder inside a "
                                      f"comparison's, such as {run_dir / 'amortized'})")
    _check_gaps(run_dir)
    refuse_writer(run_dir)
    main = distributed.current().main
    locked = main and (run_dir / MARKER).exists()
    if locked:  # one writer, from before the checkpoint is read to the last file
        lock(run_dir, "evaluate")
    try:
        return _evaluate_locked(run_dir, num_particles, split, proposal, local, test_size,
                                device, progress, log, warn, trust_code, given, local_family)
    except KeyboardInterrupt:
        kept = ("the previous evaluation is kept as it was" if (run_dir / "eval.json").exists()
                else "no evaluation was written")
        raise EvaluationInterrupted(run_dir, kept) from None
    except OSError as e:  # a full disk, a folder that cannot be written
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        raise UserError(f"could not evaluate {run_dir} ({e.strerror or e}{where}); the "
                        f"previous evaluation is kept as it was: free space (or make the "
                        f"folder writable) and evaluate again") from None
    finally:
        if locked:
            unlock(run_dir)


def _evaluate_locked(run_dir: Path, num_particles, split, proposal, local, test_size, device,
                     progress, log, warn, trust_code, given, local_family=None) -> dict:
    """Why so many parameters: ``evaluate_run``'s flags, passed on unchanged once the folder is
    locked."""
    finished = (run_dir / "summary.json").exists()
    trained = load_trained(run_dir, device, test_size, fallback=not finished, warn=warn,
                           trust_code=trust_code, given=given)
    if local_family is not None:  # q* in another family than the run's setting
        trained = trained._replace(config=trained.config.replace(
            local_family=local_family).validate())
    if not (run_dir / MARKER).exists():
        raise UserError(f"{run_dir} lacks the {MARKER} marker of a folder that ppl_vae wrote, so "
                        f"evaluate will not write its files there; evaluate a ppl_vae run folder "
                        f"(or `touch {run_dir / MARKER}` if it is one whose marker was lost)")
    if not finished:
        warn(f"warning: {run_dir} has not finished training; evaluating its checkpoint after "
             f"epoch {len(trained.history)}")
    if finished:
        path = run_dir / "summary.json"
        summary = read_mapping(path, "finish the run again with `ppl-vae train --resume`")
        epochs = expect(path, "epochs", summary.get("epochs"), whole(summary.get("epochs")),
                        "the run's number of epochs (a whole number)")
        if epochs != len(trained.history):
            raise UserError(f"{run_dir}: summary.json is for epoch {epochs} but "
                            f"the readable checkpoint is after epoch {len(trained.history)}")
    fitted = list(trained.guide.local_parameters())
    if local is None:  # a family named for q* asks for q*
        local = bool(fitted) or proposal == "local" or local_family is not None
    if proposal == "local" and not local:
        raise UserError(f"{setting('proposal')} local needs the local fit; do not turn "
                        f"{setting('local')} off")
    if proposal == "guide" and fitted:
        raise UserError(f"the {trained.config.guide} guide has no parameters for held-out "
                        f"rows; use {setting('proposal')} local")
    s, results, figs = _evaluate_into(run_dir, trained, num_particles, proposal, local,
                                      split, progress, finished)
    if results is None:  # another torchrun process: rank 0 writes the files
        return {}
    log(f"log p(x) {s.log_px.mean:.2f} ± {s.log_px.stderr:.2f} (K={num_particles}, "
        f"{s.rows} {split} rows), ELBO {s.elbo.mean:.2f}, rate {s.rate:.2f}, distortion "
        f"{s.distortion:.2f}, active units {s.active_units}, {s.seconds:.0f} s")
    name = "eval.json" if split == "test" else f"eval_{split}.json"
    log("wrote " + ", ".join(str(p) for p in [run_dir / name, *figs]))
    return results


# what a test evaluation writes (eval_valid.json, another split's, stays); gaps.png is drawn
# again from gaps.jsonl
SET = tuple(n for n in EVALUATION if n != "eval_valid.json") + ("gaps.png",)


def _write_set(folder: Path, trained, arrays, results) -> list:
    """The evaluation's files, written into ``folder``: arrays.npz, the figures, eval.json."""
    np.savez_compressed(folder / "arrays.npz", **arrays)
    history = [m._asdict() for m in trained.history]
    made = run_figures(folder, folder / "arrays.npz", arrays["labels"],
                             trained.config.guide, history, split=results["split"],
                             per_datapoint=bool(list(trained.guide.local_parameters())))
    write_json(folder / "eval.json", results)
    return [p.name for p in made]


def _evaluate_into(run_dir: Path, trained, num_particles, proposal, local, split, progress,
                   finished):
    """Evaluate and write the files into a copy of the run folder made of hard links
    (``rundir.stage_copy``), which then takes the run folder's place in one step: the
    previous evaluation is replaced as one set, and only once the new one is complete.
    Where the file system has no hard links, the files are written aside and renamed into
    place one by one, eval.json last."""
    scores, arrays = evaluate_trained(trained, num_particles, proposal=proposal, local=local,
                                      split=split, progress=progress)
    if scores is None:
        return None, None, None
    results = {**scores.to_json(), "guide": trained.config.guide,
               "dataset": trained.config.dataset, "binarize": trained.config.binarize,
               "epochs": len(trained.history), "finished": finished,
               "checkpoint": trained.checkpoint, "device": str(trained.device)}
    if scores.amortization_gap is None:  # said, not left a bare null
        own = protocol.family_of(trained.guide)
        results["amortization_gap_why"] = why_no_amortization_gap(
            bool(list(trained.guide.local_parameters())), own.name if own else None,
            scores.local_family)
    if split != "test":  # another split's numbers, under its own names, beside the test's
        write_json(run_dir / f"eval_{split}.json", results)
        return scores, results, []
    target = resolve_link(run_dir)
    staged = stage_copy(target, skip=SET)
    if staged is not None:
        try:
            made = _write_set(staged, trained, arrays, results)
            if "gaps.png" not in made and is_regular(target / "gaps.png"):
                os.link(target / "gaps.png", staged / "gaps.png")  # the training's, kept
            replace_folder(staged, target)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    else:
        made = _replace_one_by_one(run_dir, trained, arrays, results)
    figs = [run_dir / name for name in made]
    tracker = open_tracker(run_dir, trained.config.tensorboard)
    if tracker is not None:  # the figures and numbers as TensorBoard sees them
        tracker.figures(figs, step=len(trained.history))
        tracker.scalars(results, step=len(trained.history), prefix=f"eval_{split}/")
        tracker.close()
    return scores, results, figs


def _replace_one_by_one(run_dir: Path, trained, arrays, results) -> list:
    """Where hard links are missing: the files written aside (``.evaluating-<pid>``), then
    renamed into place one by one, eval.json last."""
    aside = run_dir / f".evaluating-{os.getpid()}"
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    try:
        if is_regular(run_dir / "gaps.jsonl"):  # the figure of the run's gap curves
            shutil.copy2(run_dir / "gaps.jsonl", aside / "gaps.jsonl")
        made = _write_set(aside, trained, arrays, results)
        names = [n for n in made if n != "eval.json"] + ["arrays.npz", "eval.json"]
        for name in SET:  # files of the previous evaluation that this one lacks
            if name not in names and name != "gaps.png":
                (run_dir / name).unlink(missing_ok=True)
        for name in names:
            os.replace(aside / name, run_dir / name)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return made


def run_figures(run_dir: Path, arrays: Path, labels: Sequence[int],
                name: str = "model", history: Optional[List[dict]] = None,
                per_datapoint: Optional[bool] = None, split: str = "test",
                x: str = "epoch") -> List[Path]:
    """The figures of one evaluated run: curves, reconstructions, samples, latent view (and
    its gap curves when it tracked them).

    The curves come from ``history`` (the checkpoint's) when given, else ``metrics.jsonl``.
    ``name`` is the run's guide; ``per_datapoint`` whether it is a per-datapoint table (its
    curves and gap curves then say what its train curve and its L[q*] - L[q] are; None: as
    the gap records show, else not); ``split`` the rows the arrays are of;
    ``x`` what the curves are drawn against (``plots.X_UNITS``: "steps" for a run under a step
    budget).
    """
    run_dir = Path(run_dir)
    a = np.load(arrays)
    shape = a["shape"] if "shape" in a.files else None  # (C, H, W), saved by evaluate
    classes = a["classes"] if "classes" in a.files else None
    gaps_file = run_dir / "gaps.jsonl"
    gap_rows = plots.read_metrics(run_dir, "gaps.jsonl") if gaps_file.exists() else None
    if per_datapoint is None:  # the gap records say it (the guide, asked, wrote them)
        per_datapoint = bool(gap_rows) and name in gap_plots.table_guides({name: gap_rows})
    history = history if history is not None else plots.read_metrics(run_dir)
    paths = [
        plots.curves({name: history}, run_dir / "curves.png", f"training curves, the {name} guide",
               x=x, tables=[name] if per_datapoint else []),
        plots.image_rows({"input": a["inputs"], "reconstruction" + (
                    "\n(q fitted to\neach image)" if per_datapoint else ""): a["reconstructions"]},
                   run_dir / "reconstructions.png",
                   f"{split} images and their reconstructions (the decoder's mean at the "
                   f"posterior mean) by the {name} guide", shape),
        plots.samples(a["samples"], run_dir / "samples.png", shape=shape),
        plots.latent(a["pca"], np.asarray(labels), run_dir / "latent.png", classes=classes,
               guide=name, split=split, per_datapoint=per_datapoint),
    ]
    if gap_rows is not None:
        paths.append(gap_plots.gap_curves({name: gap_rows}, run_dir / "gaps.png",
                                tables=[name] if per_datapoint else []))
    return paths
