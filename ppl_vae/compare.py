"""Amortized, semi-amortized and mean-field inference on the same decoder, data and budget.

``compare(config, out)`` trains one model per guide with identical decoder architecture,
initialization seed, data order and epochs (a time budget only when asked for), evaluates
each on the same test rows with the same seeds, and writes ``results.json``, ``report.md``
and figures (``report.py``).

Reference: Cremer, Li & Duvenaud (2018), Inference Suboptimality in Variational Autoencoders.
"""
from __future__ import annotations

import datetime
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

from . import distributed, logs, report
from .config import GUIDES, Config
from .errors import UserError, setting
from .evaluate import Estimate
from .heldout import evaluate_trained, read_gaps
from .rundir import MARKER, RunDir, check_out, refuse_foreign, versions, write_json
from .run import finish, fit_run, load_splits, load_trained

DEFAULT_GUIDES = ("amortized", "semiamortized", "meanfield")
FROM_SUMMARY = ("train_seconds", "epochs", "steps", "steps_per_second", "seconds_per_epoch",
                "param_mb", "peak_rss_mb", "peak_cuda_mb", "gap_tracking_seconds")


@dataclass
class Comparison:
    """What ``results.json`` holds: the settings and, per guide, every measured quantity."""

    date: str
    config: dict
    versions: dict
    device: str
    guides: List[str]
    data: dict
    command: List[str]
    results: Dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        doc = asdict(self)
        doc.update(doc.pop("results"))  # one entry per guide at the top level
        return doc


def _check(config: Config, out: Path, overwrite: bool, guides: Sequence[str]):
    """Refuse, before any training, what the comparison cannot do; returns (out, splits)."""
    out = check_out(out)
    config.validate()
    if not guides or len(set(guides)) != len(guides):
        raise UserError(f"{setting('guides')} needs distinct guide names, got {list(guides)}")
    refuse_foreign(out)
    if (out / "results.json").exists() and not overwrite:
        raise UserError(f"{out} holds a finished comparison; pass {setting('overwrite')} or "
                        f"choose another {setting('out')}")
    for guide in guides:  # refuse before spending any time on training
        if guide not in GUIDES and ":" not in guide:
            raise UserError(f"unknown guide {guide!r} in {setting('guides')}; choose among "
                            f"{', '.join(GUIDES.names())} or module:Class, comma-separated")
        config.replace(guide=guide).validate()
        RunDir(out / guide, overwrite, resume=False, resumable=False)
    return out, load_splits(config, torch.device("cpu"))  # bad data: refused before any folder


def compare(config: Config, out: Path, num_particles: int = 1000, overwrite: bool = False,
            progress: bool = True, log: Callable[[str], None] = logs.info,
            guides: Sequence[str] = DEFAULT_GUIDES) -> dict:
    """Train and evaluate each guide; write results.json, report.md and figures into ``out``.

    ``config.guide`` is ignored: every entry of ``guides`` gets the same config otherwise.
    A finished comparison is replaced only with ``overwrite``, and only once the new one has
    its results (each guide's run is replaced once it has its first checkpoint).
    """
    world = distributed.current()
    error, splits = None, None
    try:
        out, splits = _check(config, out, overwrite, guides)
    except UserError as e:
        error = e
    distributed.refuse_unless_all(error, world)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).touch()
    doc = Comparison(datetime.date.today().isoformat(), config.to_dict(), versions(), "",
                     list(guides), splits.describe(), list(sys.argv))
    arrays, histories, gaps = {}, {}, {}
    for guide in guides:
        log(f"== training the {guide} guide")
        trained = fit_run(config.replace(guide=guide), out / guide, overwrite=overwrite,
                          progress=progress, log=log)
        if world.size > 1:  # every process evaluates its share of the test rows with
            distributed.barrier(world)  # the whole table, as rank 0 checkpointed it
            trained = load_trained(out / guide, device=config.device)
        log(f"== evaluating the {guide} model")
        res, arrays[guide] = evaluate_trained(trained, num_particles, progress=progress)
        if not world.main:  # rank 0 scores and writes
            continue
        summary = finish(trained, out / guide, log=log,
                         test=Estimate(res["test_elbo"], res["test_elbo_stderr"]))
        res.update({k: summary[k] for k in FROM_SUMMARY if summary.get(k) is not None})
        doc.results[guide] = res
        doc.device = str(trained.device)
        histories[guide] = [m._asdict() for m in trained.history]
        if (out / guide / "gaps.jsonl").exists():
            gaps[guide] = read_gaps(out / guide / "gaps.jsonl")
            report.gap_curves({guide: gaps[guide]}, out / guide / "gaps.png")
        log(report.line(guide, res))
    if not world.main:
        return {}
    result = doc.to_json()
    report.write_figures(out, histories, doc.results, arrays, gaps)
    (out / "report.md").write_text(report.markdown(result, bool(gaps)))
    write_json(out / "results.json", result)
    log(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return result
