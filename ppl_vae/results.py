"""What a comparison found, as typed records: one guide trained from one seed
(``GuideRun``) and the comparison of every guide over seeds (``Comparison``, whose
``to_json`` is ``results.json``). ``compare.py`` runs the comparison and fills them;
``report.py`` and ``budget_curves.py`` read them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from .compute import Budget, Compute, LocalBudget
from .evaluate import Scores
from .run import Summary
from .seeds import Difference, Spread, differences

# the quantities whose paired differences between guides the report gives (``Scores`` names)
PAIRED = ("log_px", "elbo_local", "elbo", "approximation_gap", "amortization_gap")
PAIRED_KEYS = tuple(Scores.json_key(q, "test") for q in PAIRED)  # as results.json names them
SCHEDULE = "one after another in one process"


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
    family: Optional[str] = None  # ``protocol.family_words`` of the trained guide (None: unstated)
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

    def to_record(self) -> dict:
        """Everything ``from_record`` needs to give this run back (a finished guide run's
        record, which ``compare --resume`` keeps)."""
        return {"guide": self.guide, "seed": self.seed, "folder": self.folder,
                "family": self.family, "per_datapoint": self.per_datapoint,
                "scores": self.scores.to_json(), "summary": asdict(self.summary),
                "local": self.local.to_json() if self.local is not None else None}

    @classmethod
    def from_record(cls, doc: dict, cost) -> "GuideRun":
        """The run ``to_record`` wrote; ``cost`` is its step's cost (``compute.StepCost``,
        measured again: a count, the same in every process)."""
        summary = Summary(**doc["summary"])
        local = LocalBudget(**doc["local"]) if doc["local"] is not None else None
        return cls(str(doc["guide"]), int(doc["seed"]), str(doc["folder"]),
                   Scores.from_json(doc["scores"]), summary,
                   Compute(cost, summary.steps, summary.epochs, summary.train_seconds),
                   doc["family"], bool(doc["per_datapoint"]), local)

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
        its numbers at the top, the spread of each over seeds (``over_seeds``; its ``sd`` is
        None for one seed) and every seed's own record (``per_seed``, keyed by the seed).
        A seed's standard errors (over the test rows) are in its record only: every seed
        scores the same rows, so their errors are correlated and no combination of them is
        the error of the mean over seeds; the sd over seeds is."""
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
            entry.update({k: None for r in runs for k, v in r.scores.to_json().items()
                          if v is None and k not in entry and not k.endswith("_stderr")})  # n/a (e.g. a table's amortization gap)
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
