"""Amortized, semi-amortized and mean-field inference on the same decoder, data and budget.

``compare(config, out)`` trains one model per guide and seed with identical decoder
architecture, initialization seed, data order and budget (equal epochs, or equal network
passes: ``compute.Budget``; a time budget only when asked for), evaluates each on the same
test rows with the same seeds, and writes ``results.json``, ``report.md`` and figures
(``report.py``). With several seeds every quantity is given as mean and standard deviation
over seeds, and each pair of guides as a paired difference with a 95% interval over seeds
(``seeds.py``). The seeds run one after another in this process: on a 2-core CPU a second
process would share the cores that one training run already uses (torch's two threads).

Reference: Cremer, Li & Duvenaud (2018), Inference Suboptimality in Variational Autoencoders.
"""
from __future__ import annotations

import datetime
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import budget_curves, distributed, guides as guide_lib, logs, memory, plots, report
from .compute import Budget, Compute, LocalBudget, local_budget, step_cost, steps_per_epoch
from .config import (GUIDES, SEED_LIMIT, Config, check_particles, guide_settings,
                     resolve_device)
from .data import Batch
from .errors import UserError, setting
from .evaluate import Scores
from .evaluation import evaluate_trained
from .heldout import read_gaps
from .rundir import (CHECKPOINTS, MARKER, RunDir, check_out, refuse_foreign, versions,
                     write_json)
from .run import Summary, finish, fit_run, load_splits, load_trained
from .seeds import Difference, Spread, differences

DEFAULT_GUIDES = ("amortized", "semiamortized", "meanfield")
# the quantities whose paired differences between guides the report gives (``Scores`` names)
PAIRED = ("log_px", "elbo_local", "elbo", "approximation_gap", "amortization_gap")
PAIRED_KEYS = tuple(Scores.json_key(q, "test") for q in PAIRED)  # as results.json names them
LOCAL_ROWS = 500  # training rows of a per-datapoint table scored for its local budget
MAX_SEEDS = 100
SCHEDULE = "one after another in one process"


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


@dataclass
class GuideRun:
    """One guide trained from one seed: its test scores, its training summary, its compute,
    its variational family and, for a guide with tables, its local budget."""

    guide: str
    seed: int
    folder: str  # relative to the comparison's folder
    scores: Scores
    summary: Summary
    compute: Compute
    family: Optional[str] = None  # ``guides.family`` of the trained guide (None: unstated)
    per_datapoint: bool = False  # a per-datapoint table (its held-out q is a local fit)
    local: Optional[LocalBudget] = None

    def numbers(self) -> Dict[str, float]:
        """Every number of the run under the name results.json gives it (what the report's
        rows and the spreads over seeds read)."""
        out = {k: v for k, v in {**self.summary.costs(), **self.scores.to_json()}.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out.update(passes_per_step=self.compute.step.passes, total_passes=self.compute.total,
                   flops_per_step=self.compute.step.flops_per_step,
                   total_flops=self.compute.total_flops)
        if self.local is not None:
            out.update(local_stored=self.local.stored, local_fitted=self.local.fitted,
                       local_gap=self.local.gap, local_gap_stderr=self.local.gap_stderr,
                       local_visits=self.local.visits)
        return out

    def to_json(self) -> dict:
        return {**self.summary.costs(), **self.scores.to_json(), "family": self.family,
                "per_datapoint": self.per_datapoint, "seed": self.seed, "folder": self.folder,
                "compute": self.compute.to_json(),
                "local_budget": self.local.to_json() if self.local is not None else None}


@dataclass
class Comparison:
    """What ``results.json`` holds: the settings and every guide's runs, one per seed."""

    date: str
    config: dict
    versions: dict
    device: str
    guides: List[str]
    data: dict
    command: List[str]
    seeds: List[int]
    budget: Budget
    local_rows: int
    runs: List[GuideRun] = field(default_factory=list)
    settings: Dict[str, List[str]] = field(default_factory=dict)  # guide -> its own settings
    num_particles: Optional[int] = None  # K of log p(x) on the test rows
    quick: bool = False  # ``--quick``: a smoke look, not a verdict

    def runs_of(self, guide: str) -> List[GuideRun]:
        return sorted((r for r in self.runs if r.guide == guide),
                      key=lambda r: self.seeds.index(r.seed))

    def spread(self, guide: str, key: str) -> Optional[Spread]:
        """``key`` of ``guide`` over the seeds where it has a value (None: nowhere)."""
        pairs = [(r.seed, r.numbers().get(key)) for r in self.runs_of(guide)]
        pairs = [(s, float(v)) for s, v in pairs if v is not None]
        if not pairs:
            return None
        return Spread(tuple(s for s, _ in pairs), tuple(v for _, v in pairs))

    def differences(self) -> List[Difference]:
        """The paired differences of ``PAIRED`` between guides, named as results.json names
        them (``Scores.json_key``)."""
        values = {g: {k: {r.seed: r.numbers().get(k) for r in self.runs_of(g)}
                      for k in PAIRED_KEYS} for g in self.guides}
        return differences(values, PAIRED_KEYS, self.guides)

    @property
    def several(self) -> bool:
        return len(self.seeds) > 1

    def to_json(self) -> dict:
        """One layout for one seed or many: every guide's entry holds the means over seeds of
        its numbers at the top (a ``*_stderr`` there is the Monte Carlo standard error of that
        mean, sqrt(sum of the seeds' squared errors) / seeds, not an average of errors), the
        spread of each over seeds (``over_seeds``; its ``sd`` is None for one seed) and every
        seed's own record (``per_seed``, keyed by the seed)."""
        doc = {"date": self.date, "config": self.config, "versions": self.versions,
               "device": self.device, "guides": self.guides, "data": self.data,
               "command": self.command, "seeds": self.seeds, "seed_schedule": SCHEDULE,
               "budget": self.budget.to_json(), "local_rows": self.local_rows,
               "num_particles": self.num_particles, "quick": self.quick,
               "guide_settings": {g: list(v) for g, v in self.settings.items()},
               "ran": {g: self.ran(g) for g in self.guides}}
        for guide in self.guides:  # one entry per guide at the top level
            runs = self.runs_of(guide)
            keys = sorted({k for r in runs for k in r.numbers()})
            spreads = {k: self.spread(guide, k) for k in keys}
            entry = {k: s.mean for k, s in spreads.items()
                     if s is not None and not k.endswith("_stderr")}
            for k, s in spreads.items():
                if s is not None and k.endswith("_stderr"):
                    entry[k] = math.sqrt(sum(v * v for v in s.values)) / len(s.values)
            entry.update({k: None for r in runs for k, v in r.scores.to_json().items()
                          if v is None and k not in entry})  # n/a (e.g. a table's amortization gap)
            entry["over_seeds"] = {k: s.to_json() for k, s in spreads.items() if s is not None}
            if runs:
                entry.update(family=runs[0].family, per_datapoint=runs[0].per_datapoint,
                             compute={"per_step": runs[0].compute.step.to_json()})
            entry["per_seed"] = {str(r.seed): r.to_json() for r in runs}
            doc[guide] = entry
        doc["differences"] = [d.to_json() for d in self.differences()]
        return doc

    def ran(self, guide: str) -> dict:
        """What ``guide`` ran, per seed: its epochs and optimizer steps (under an evaluations
        or a FLOPs budget they differ from guide to guide and from ``config.epochs``)."""
        return {str(r.seed): {"epochs": r.summary.epochs, "steps": r.summary.steps}
                for r in self.runs_of(guide)}


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
    {guide: (its config under the budget, its step cost)})."""
    out = check_out(out)
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
    refuse_foreign(out)
    if resume:
        check_resume(out, plan)
    elif (out / "results.json").exists() and not overwrite:
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
            started = resume and any((folder / n).exists() for n in CHECKPOINTS[:2])
            RunDir(folder, overwrite and not started, resume=started, resumable=False)
    splits = load_splits(config, torch.device("cpu"))  # bad data: refused before any folder
    per_epoch = steps_per_epoch(config, splits)
    plans = {}
    for guide in guides:
        cost = step_cost(config.replace(guide=guide), splits)
        plans[guide] = (budget.apply(config.replace(guide=guide), cost, per_epoch), cost)
    return out, splits, plans


def _family(trained) -> Optional[str]:
    """The trained guide's variational family (``guides.family``): what the report needs to
    say why an amortization gap is n/a."""
    x = trained.splits.test.x[:2] if hasattr(trained.splits.test, "x") else None
    probe = None
    if x is not None:
        x = x.to(trained.device).float()
        probe = Batch(x, torch.arange(len(x), device=x.device), len(x))
    try:
        fam = guide_lib.family(trained.guide, probe)
    except Exception:  # noqa: BLE001 - a guide whose probe fails has no family to report
        fam = None
    return fam


# ---------------------------------------------------------------------------------------
# what a comparison is (its plan), and what each finished guide run left (its record):
# together they let ``--resume`` continue a comparison where it stopped
# ---------------------------------------------------------------------------------------
PLAN = "comparison.json"  # in the comparison's folder, written before the first run
RECORD = "comparison_run.json"  # in a guide run's folder, once the run is scored
FIGURE_ARRAYS = "comparison_arrays.npz"  # beside it: what the comparison's figures show
PLAN_MAY_CHANGE = ("device", "compile")  # a resume may move devices or compile differently


def plan_of(config: Config, guides, seeds, budget: Budget, num_particles: int,
            local_rows: int, local_options: Optional[dict]) -> dict:
    """Everything that decides a comparison's numbers (what ``--resume`` must find again)."""
    return {"config": config.to_dict(), "guides": list(guides), "seeds": list(seeds),
            "budget": budget.to_json(), "num_particles": int(num_particles),
            "local_rows": int(local_rows), "local_options": dict(local_options or {})}


def _plan_differs(saved: dict, plan: dict) -> Optional[str]:
    """The first setting in which ``plan`` differs from the ``saved`` one (None: the same)."""
    if not isinstance(saved, dict):
        return "the saved plan (not an object)"
    for key, value in plan.items():
        old = saved.get(key)
        if key == "config":
            old = old if isinstance(old, dict) else {}
            for name, v in value.items():
                if name not in PLAN_MAY_CHANGE and old.get(name) != v:
                    return f"--{name.replace('_', '-')} (was {old.get(name)!r}, now {v!r})"
        elif old != value:
            name = {"num_particles": "num-particles-eval"}.get(key, key.replace("_", "-"))
            return f"--{name} (was {old!r}, now {value!r})"
    return None


def check_resume(out: Path, plan: dict) -> None:
    """Refuse a ``--resume`` of a folder that holds no unfinished comparison, or that was
    started with other settings."""
    path = out / PLAN
    if (out / "results.json").exists():
        raise UserError(f"{out} holds a finished comparison: nothing to resume; pass "
                        f"{setting('overwrite')} to run it again or choose another "
                        f"{setting('out')}")
    if not path.is_file():
        raise UserError(f"{setting('resume')}: {out} holds no comparison to continue (no "
                        f"{PLAN}); run it without {setting('resume')}")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}); run the comparison again "
                        f"with {setting('overwrite')}") from None
    differs = _plan_differs(saved, plan)
    if differs:
        raise UserError(f"{setting('resume')} continues the comparison as it was started, but "
                        f"this command changes {differs}; give the same settings, or "
                        f"{setting('overwrite')} to start it again")


def _write_record(folder: Path, run: GuideRun, arrays: Optional[dict]) -> None:
    """A scored guide run's record (and its figures' arrays) in its folder, the record last:
    a run with a record is finished and a resume takes it as it is."""
    if arrays is not None:
        tmp = folder / (FIGURE_ARRAYS + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(folder / FIGURE_ARRAYS)
    write_json(folder / RECORD, {
        "guide": run.guide, "seed": run.seed, "folder": run.folder, "family": run.family,
        "per_datapoint": run.per_datapoint, "scores": run.scores.to_json(),
        "summary": asdict(run.summary),
        "local": run.local.to_json() if run.local is not None else None})


def _read_record(folder: Path, guide: str, seed: int, cost) -> Optional[GuideRun]:
    """The record ``_write_record`` left (None: the run is not finished, or its record is
    unreadable, and is trained or scored again)."""
    try:
        doc = json.loads((folder / RECORD).read_text())
        if doc["guide"] != guide or doc["seed"] != seed:
            return None
        summary = Summary(**doc["summary"])
        local = LocalBudget(**doc["local"]) if doc["local"] is not None else None
        return GuideRun(guide, seed, doc["folder"], Scores.from_json(doc["scores"]), summary,
                        Compute(cost, summary.steps, summary.epochs, summary.train_seconds),
                        doc["family"], bool(doc["per_datapoint"]), local)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_arrays(folder: Path) -> Optional[dict]:
    try:
        with np.load(folder / FIGURE_ARRAYS, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError):
        return None


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
    ``budget``: equal epochs (``config.epochs``) or equal network passes (``compute``).
    ``local_rows`` training rows of a per-datapoint table are refitted to show its local
    budget; ``local_options`` go to every local fit (``guides.local_inference``: q* on the
    test rows and that refit), e.g. a smaller ``max_steps`` for a toy run.
    A finished comparison is replaced only with ``overwrite`` (which first removes its
    results, so a comparison cut short is never beside results that no longer hold).
    ``resume`` continues a comparison cut short (a kill, Ctrl-C, a full disk) with the same
    settings: every scored guide run is kept as it is, the one in progress continues from
    its last checkpoint (or is scored, if its training had finished), the rest are run; the
    numbers are those of an uninterrupted comparison (wall times aside). ``quick``: the
    settings are ``--quick``'s first look, and the report says it is no verdict.
    """
    seeds = tuple(seeds) if seeds is not None else (config.seed,)
    several = len(seeds) > 1
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
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).touch()
        if not resume:  # an overwrite's old results go first; the plan makes it resumable
            for name in ("results.json", "report.md"):
                (out / name).unlink(missing_ok=True)
            write_json(out / PLAN, plan)
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
            run = _read_record(folder, guide, seed, plans[guide][1]) if resume else None
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
    other than rank 0."""
    world = distributed.current()
    run_config, cost = plan
    run_config = run_config.replace(seed=seed)
    if several and world.main:
        folder.parent.mkdir(parents=True, exist_ok=True)
        (folder.parent / MARKER).touch()
    started = resume and any((folder / n).exists() for n in CHECKPOINTS[:2])
    memory.reset_peak()  # the peak RSS of this run, not of the runs before it in this process
    if started and (folder / "summary.json").exists():  # trained and summarised, not recorded
        log(f"== the {who} was trained: scoring it again")
        trained = load_trained(folder, device=run_config.device, given=run_config)
    else:
        log(f"== {'continuing' if started else 'training'} the {who} ({cost.passes:g} network "
            f"passes, {cost.flops_per_step:,} FLOPs per step" + (f", {report.plural(run_config.max_steps, 'step')}"
                                  if run_config.max_steps else "") + ")")
        trained = fit_run(run_config, folder, overwrite=overwrite and not started,
                          resume=started, progress=progress, log=log)
    if world.size > 1:  # every process evaluates its share of the test rows with
        distributed.barrier(world)  # the whole table, as rank 0 checkpointed it
        trained = load_trained(folder, device=run_config.device, given=run_config)
    log(f"== evaluating the {who}")
    scores, figs = evaluate_trained(trained, num_particles, progress=progress,
                                    local_options=local_options)
    if not world.main:
        return None
    summary = finish(trained, folder, log=log, test=scores.elbo)
    local = local_budget(trained, local_rows, **(local_options or {}))
    per_datapoint = bool(guide_lib.local_parameters(trained.guide))
    run = GuideRun(run_config.guide, seed, folder.relative_to(out).as_posix(), scores, summary,
                   Compute(cost, summary.steps, summary.epochs, summary.train_seconds),
                   _family(trained), per_datapoint, local)
    _write_record(folder, run, figs)
    log(report.line(who, run))
    return run


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
            arrays[run.guide] = _read_arrays(folder)
            histories[run.guide] = plots.read_metrics(folder)
    arrays = {g: a for g, a in arrays.items() if a is not None}
    result = doc.to_json()
    curves = over_budget(out, doc)
    if curves is not None:  # the gap curves of every seed, as curves over budget
        result["curves"] = curves.to_json()
        budget_curves.figure(curves, out / "budget_curves.png")
    report.write_figures(out, histories, doc, arrays, gaps)
    (out / "report.md").write_text(report.markdown(doc, bool(gaps), curves))
    write_json(out / "results.json", result)
    log(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return result
