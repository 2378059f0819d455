"""Amortized, semi-amortized and mean-field inference on the same decoder, data and budget.

``compare(config, out)`` trains one model per guide and seed with identical decoder
architecture, initialization seed, data order and budget (equal epochs, equal network passes
or equal FLOPs: ``compute.Budget``; a time budget only when asked for), evaluates each on
the same test rows with the same seeds, and writes ``results.json``, ``report.md`` and
figures (``report.py``). With several seeds every quantity is given as mean and standard
deviation over seeds, and each pair of guides as a paired difference with a 95% interval
over seeds (``seeds.py``). The seeds run one after another in this process: on a 2-core CPU
a second process would share the cores that one training run already uses (torch's two
threads).

Reference: Cremer, Li & Duvenaud (2018), Inference Suboptimality in Variational Autoencoders.
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch

from . import (budget_curves, distributed, logs, memory, plots, protocol, report,
               report_tables, rundir, writelock)
from .batching import Batch
from .compute import Budget, Compute, local_budget, step_cost, steps_per_epoch
from .config import SEED_LIMIT, Config, check_particles, guide_settings, local_fit_options
from .distributed import resolve_device
from .errors import UserError, setting
from .evaluation import evaluate_trained
from .heldout import read_gaps
from .compare_plan import (PLAN, RECORD, check_resume, extending, has_checkpoint, plan_of,
                           read_arrays, read_record, same_run, saved_config, write_record)
from .registry import GUIDES
from .rundir import RunDir
from .runfiles import versions, write_json
from .run import finish, fit_run, holding
from .run_setup import load_splits, load_trained
from .results import SCHEDULE, Comparison, GuideRun

DEFAULT_GUIDES = ("amortized", "semiamortized", "meanfield")
LOCAL_ROWS = 500  # training rows of a per-datapoint table scored for its local budget
MAX_SEEDS = 100


def parse_seeds(text: str, first: int = 0) -> Tuple[int, ...]:
    """``--seeds``: a count K (seeds ``first`` .. ``first`` + K - 1, ``first`` being
    ``--seed``) or a comma-separated list of seeds (``0,1,2``; ``5,`` is the one seed 5)."""
    text = str(text).strip()
    try:
        if "," in text:
            seeds = tuple(int(part) for part in text.split(",") if part.strip())
        else:
            count = int(text)
            if not 1 <= count <= MAX_SEEDS:
                raise ValueError
            seeds = tuple(range(first, first + count))
    except ValueError:
        raise UserError(f"{setting('seeds')} takes a number of seeds from 1 to {MAX_SEEDS} or "
                        f"a comma-separated list of seeds such as 0,1,2; got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or len(seeds) > MAX_SEEDS:
        raise UserError(f"{setting('seeds')} needs 1 to {MAX_SEEDS} distinct seeds, got {text!r}")
    bad = [s for s in seeds if not 0 <= s <= SEED_LIMIT]
    if bad:
        raise UserError(f"{setting('seeds')} has seed {bad[0]} outside 0 .. {SEED_LIMIT:,}; "
                        f"give seeds in that range")
    return seeds


def folder_name(guide: str) -> str:
    """A safe folder name for a guide: ``mymod.sub:A`` -> ``mymod_sub_A`` (no colon, which
    some file systems and tools refuse; results.json keeps the guide's real name)."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in guide)


def run_folder(out: Path, guide: str, seed: int, several: bool) -> Path:
    """``out/<guide>`` for one seed (as before seeds existed), ``out/<guide>/seed<S>`` for
    several; ``<guide>`` is ``folder_name(guide)``."""
    name = folder_name(guide)
    return out / name / f"seed{seed}" if several else out / name


def _check(config: Config, out: Path, overwrite: bool, guides: Sequence[str],
           seeds: Sequence[int], budget: Budget, local_rows: int, resume: bool = False,
           plan: Optional[dict] = None):
    """Refuse, before any training, what the comparison cannot do; returns (out, splits,
    {guide: (its config under the budget, its step cost)}).

    Why so many parameters: they are ``compare``'s own arguments, all checked together
    before anything is written."""
    out = rundir.claim(out, "comparison")  # not a run's folder, nor inside one
    config.validate()
    if overwrite and resume:
        raise UserError(f"{setting('resume')} continues the comparison in the folder and "
                        f"{setting('overwrite')} replaces it; choose one")
    if not guides or len(set(guides)) != len(guides):
        raise UserError(f"{setting('guides')} needs distinct guide names, got {list(guides)}")
    if len({folder_name(g) for g in guides}) != len(guides):
        raise UserError(f"{setting('guides')} names guides that would share a run folder "
                        f"({', '.join(folder_name(g) for g in guides)}); rename one")
    if local_rows < 1:
        raise UserError(f"{setting('local_rows')} must be a positive number of rows, got "
                        f"{local_rows}")
    if plan is not None:  # the 10^6 bound of train and evaluate holds here too
        if plan["num_particles"] < 1:
            raise UserError(f"{setting('num_particles_eval')} must be positive, got "
                            f"{plan['num_particles']}")
        check_particles(plan["num_particles"], "num_particles_eval")
    if resume:
        check_resume(out, plan)
    elif (out / "results.json").exists() and not overwrite and not extending(out):
        raise UserError(f"{out} holds a finished comparison; pass {setting('overwrite')} or "
                        f"choose another {setting('out')}")
    elif (out / PLAN).exists() and not overwrite:
        raise UserError(f"{out} holds an unfinished comparison; pass {setting('resume')} to "
                        f"continue it, {setting('overwrite')} to replace it, or choose "
                        f"another {setting('out')}")
    for guide in guides:  # refuse before spending any time on training
        if guide not in GUIDES and ":" not in guide:
            raise UserError(f"unknown guide {guide!r} in {setting('guides')}; choose among "
                            f"{', '.join(GUIDES.names())} or module:Class, comma-separated")
        for seed in seeds:
            config.replace(guide=guide, seed=seed).validate()
            folder = run_folder(out, guide, seed, len(seeds) > 1)
            if resume and (folder / RECORD).exists():
                continue
            found = resume and has_checkpoint(folder)
            started = found and same_run(saved_config(folder), config.replace(
                guide=guide, seed=seed))
            RunDir(folder, (overwrite or found) and not started, resume=started,
                   resumable=False)
    splits = load_splits(config, torch.device("cpu"))  # bad data: refused before any folder
    per_epoch = steps_per_epoch(config, splits)
    plans = {}
    for guide in guides:
        cost = step_cost(config.replace(guide=guide), splits)
        plans[guide] = (budget.apply(config.replace(guide=guide), cost, per_epoch), cost)
    return out, splits, plans


def _family(trained) -> Optional[str]:
    """The trained guide's variational family in words (``protocol.family_words``): what the report needs to
    say why an amortization gap is n/a."""
    x = trained.splits.test.x[:2] if hasattr(trained.splits.test, "x") else None
    probe = None
    if x is not None:
        x = x.to(trained.device).float()
        probe = Batch(x, torch.arange(len(x), device=x.device), len(x))
    try:
        fam = protocol.family_words(trained.guide, probe)
    except Exception:  # noqa: BLE001 - a guide whose probe fails has no family to report
        fam = None
    return fam


# ---------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------
def compare(config: Config, out: Path, num_particles: int = 1000, overwrite: bool = False,
            progress: bool = True, log: Callable[[str], None] = logs.info,
            guides: Sequence[str] = DEFAULT_GUIDES, seeds: Optional[Sequence[int]] = None,
            budget: Budget = Budget(), local_rows: int = LOCAL_ROWS,
            local_options: Optional[dict] = None, resume: bool = False,
            quick: bool = False) -> dict:
    """Train and evaluate each guide from each seed; write results.json, report.md and
    figures into ``out``; returns what results.json holds.

    ``config.guide`` is ignored: every entry of ``guides`` gets the same config otherwise.
    ``seeds`` (default: ``config.seed`` alone) replace ``config.seed`` one at a time; with
    one seed each guide's run is ``out/<guide>``, with several ``out/<guide>/seed<S>``.
    ``budget``: equal epochs (``config.epochs``), network passes or FLOPs (``compute``).
    ``local_rows`` training rows of a per-datapoint table are refitted to show its local
    budget; ``local_options`` go to every local fit (``local_fit.local_inference``: q* on the
    test rows and that refit), e.g. a smaller ``max_steps`` for a toy run.
    A finished comparison is replaced only with ``overwrite`` (which first removes its
    results, so a comparison cut short is never beside results that no longer hold).
    ``resume`` continues a comparison cut short (a kill, Ctrl-C, a full disk) with the same
    settings: every scored guide run is kept as it is, the one in progress continues from
    its last checkpoint (or is scored, if its training had finished), the rest are run; the
    numbers are those of an uninterrupted comparison (wall times aside). A resume may also
    add guides, or seeds to a comparison of several, to a comparison cut short or finished:
    its runs are kept and the new ones run, as if all had been asked at first. ``quick``: the
    settings are ``--quick``'s first look, and the report says it is no verdict.

    Why so many parameters: it is the comparison's Python API; each keyword is a setting of
    the experiment that the command line exposes too.
    """
    seeds = tuple(seeds) if seeds is not None else (config.seed,)
    world = distributed.current()
    budget = budget.resolve(config)  # an epochs budget records its epochs
    plan = plan_of(config, guides, seeds, budget, num_particles, local_rows, local_options)
    error, splits, plans = None, None, {}
    try:
        out, splits, plans = _check(config, out, overwrite, guides, seeds, budget, local_rows,
                                    resume, plan)
    except UserError as e:
        error = e
    distributed.refuse_unless_all(error, world)
    if world.main:
        rundir.mark(out, "comparison")
        writelock.lock(out, "compare")  # one comparison writes the folder, to its results
    try:
        return _run_comparison(config, out, num_particles, overwrite, progress, log, guides,
                               seeds, budget, local_rows, local_options, resume, quick,
                               splits, plans, plan)
    finally:
        if world.main:
            writelock.unlock(out)


def _run_comparison(config, out, num_particles, overwrite, progress, log, guides, seeds,
                    budget, local_rows, local_options, resume, quick, splits, plans,
                    plan) -> dict:
    """``compare``'s work once its folder is checked, marked and locked.

    Why so many parameters: ``compare``'s settings passed on unchanged once its folder is
    locked (``plan_of`` records them for ``--resume``)."""
    world = distributed.current()
    several = len(seeds) > 1
    if world.main:
        if not resume:  # an overwrite's old results go first; the plan makes it resumable
            for name in ("results.json", "report.md"):
                (out / name).unlink(missing_ok=True)
        write_json(out / PLAN, plan)  # a resume's may add guides or seeds
    doc = Comparison(datetime.date.today().isoformat(), config.to_dict(), versions(), "",
                     list(guides), splits.describe(), list(sys.argv), list(seeds), budget,
                     local_rows, settings={g: list(guide_settings(plans[g][0])) for g in guides},
                     num_particles=num_particles, quick=quick)
    if several:
        log(f"== {len(seeds)} seeds ({', '.join(map(str, seeds))}), {SCHEDULE}")
    for seed in seeds:
        for guide in guides:
            folder = run_folder(out, guide, seed, several)
            who = f"{guide} guide, seed {seed}" if several else f"{guide} guide"
            run = (read_record(folder, plans[guide][0].replace(seed=seed), plans[guide][1])
                   if resume else None)
            if run is not None:
                log(f"== the {who} is finished: kept as it is")
            else:
                run = _train_and_score(plans[guide], seed, folder, out, who, overwrite,
                                       resume, num_particles, local_rows, local_options,
                                       progress, log, several)
            if run is None:  # another torchrun process: rank 0 scores and writes
                continue
            doc.runs.append(run)
    if not world.main:
        return {}
    doc.device = str(resolve_device(config.device))
    return _write_results(out, doc, log)


def _train_and_score(plan, seed: int, folder: Path, out: Path, who: str, overwrite: bool,
                     resume: bool, num_particles: int, local_rows: int,
                     local_options: Optional[dict], progress, log, several: bool
                     ) -> Optional[GuideRun]:
    """One guide from one seed: trained (or continued from its checkpoint), scored on the
    test rows, its local budget measured, its record written; None on a torchrun process
    other than rank 0.

    Why so many parameters: ``compare``'s settings for one guide and seed, passed on
    unchanged."""
    world = distributed.current()
    run_config, cost = plan
    run_config = run_config.replace(seed=seed)
    if several and world.main:
        rundir.mark(folder.parent, "comparison")
    memory.reset_peak()  # the peak RSS of this run, not of the runs before it in this process
    trained = _trained(run_config, cost, folder, who, overwrite, resume, progress, log)
    with holding(trained):  # one writer from the first checkpoint to the record
        if world.size > 1:  # every process evaluates its share of the test rows with
            distributed.barrier(world)  # the whole table, as rank 0 checkpointed it
            trained = load_trained(folder, device=run_config.device,
                                   given=run_config)._replace(folder=trained.folder)
        log(f"== evaluating the {who}")
        local_options = local_fit_options(run_config, local_options)  # q*'s family too
        scores, figs = evaluate_trained(trained, num_particles, progress=progress,
                                        local_options=local_options)
        if not world.main:
            return None
        summary = finish(trained, folder, log=log, test=scores.elbo, release=False)
        local = local_budget(trained, local_rows, **local_options)
        per_datapoint = bool(list(trained.guide.local_parameters()))
        run = GuideRun(run_config.guide, seed, folder.relative_to(out).as_posix(), scores,
                       summary, Compute(cost, summary.steps, summary.epochs,
                                        summary.train_seconds),
                       _family(trained), per_datapoint, local)
        write_record(folder, run, figs, run_config)
    log(report.line(who, run))
    return run


def _trained(run_config: Config, cost, folder: Path, who: str, overwrite: bool, resume: bool,
             progress, log):
    """The guide's run, its folder locked: trained, continued from its checkpoint, or (a
    run trained and summarised whose record a kill prevented) loaded to be scored again."""
    found = resume and has_checkpoint(folder)
    started = found and same_run(saved_config(folder), run_config)
    overwrite = overwrite or (found and not started)  # another comparison's run: replaced
    if started and (folder / "summary.json").exists():
        log(f"== the {who} was trained: scoring it again")
        held = RunDir(folder, resume=True, resumable=False).create()  # its lock, kept
        try:
            return load_trained(folder, device=run_config.device,
                                given=run_config)._replace(folder=held)
        except BaseException:
            held.close()
            raise
    steps = f", {report_tables.plural(run_config.max_steps, 'step')}" if run_config.max_steps else ""
    log(f"== {'continuing' if started else 'training'} the {who} ({cost.passes:g} network "
        f"passes, {cost.flops_per_step:,} FLOPs per step{steps})")
    return fit_run(run_config, folder, overwrite=overwrite and not started, resume=started,
                   progress=progress, log=log)


def over_budget(out: Path, doc: Comparison) -> Optional[budget_curves.Curves]:
    """Every guide's gap curves (``--track-gaps``) over seeds, as curves over budget (None:
    no run tracked them)."""
    runs = {}
    for run in doc.runs:
        folder = out / run.folder
        if not (folder / "gaps.jsonl").exists():
            continue
        step = run.compute.step
        runs.setdefault(run.guide, {})[run.seed] = (
            read_gaps(folder / "gaps.jsonl"), plots.read_metrics(folder), step.passes,
            step.flops_per_step or None)
    return budget_curves.collect(runs, doc.seeds) if runs else None


def _write_results(out: Path, doc: Comparison, log) -> dict:
    """results.json, report.md and the figures, from the guide runs' folders (the same
    whether a run was scored in this process or by an earlier one that a resume continues):
    curves and images show the first seed."""
    first = doc.seeds[0]
    arrays, histories, gaps = {}, {}, {}
    for run in doc.runs:
        folder = out / run.folder
        if (folder / "gaps.jsonl").exists():
            run_gaps = read_gaps(folder / "gaps.jsonl")
            report.gap_curves({run.guide: run_gaps}, folder / "gaps.png",
                              tables=[run.guide] if run.per_datapoint else [])
            if run.seed == first:
                gaps[run.guide] = run_gaps
        if run.seed == first:
            arrays[run.guide] = read_arrays(folder)
            histories[run.guide] = plots.read_metrics(folder)
    arrays = {g: a for g, a in arrays.items() if a is not None}
    result = doc.to_json()
    curves = over_budget(out, doc)
    if curves is not None:  # the gap curves of every seed, as curves over budget
        result["curves"] = curves.to_json()
        budget_curves.figure(curves, out / "budget_curves.png")
    report.write_figures(out, histories, doc, arrays, gaps)
    (out / "report.md").write_text(report.markdown(doc, gaps, curves))
    write_json(out / "results.json", result)
    log(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return result
