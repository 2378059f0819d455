"""Helpers for tests that compare records: a log that prints nothing, a record without
what differs from run to run (wall times, dates, memory, the command line), and made-up
records of a guide run (its scores, its summary) for the comparison's tables."""
from __future__ import annotations

from ppl_vae.compute import Compute, StepCost
from ppl_vae.evaluate import Estimate, Scores
from ppl_vae.results import GuideRun
from ppl_vae.run import Summary

TIMES = ("seconds", "per_second", "peak_rss", "date", "wall", "command")


def quiet(_message):
    pass


def without_times(doc, also=()):
    """``doc`` without keys naming a time (or any of ``also``), at every depth."""
    drop = TIMES + tuple(also)
    if isinstance(doc, dict):
        return {k: without_times(v, also) for k, v in doc.items()
                if not any(t in k for t in drop)}
    if isinstance(doc, list):
        return [without_times(v, also) for v in doc]
    return doc


def scores(log_px=-97.0, elbo=-100.0, elbo_local=-99.0, approximation_gap=2.0,
           amortization_gap=None):
    def est(v):
        return None if v is None else Estimate(v, 0.1)
    return Scores(split="test", rows=40, num_particles=5, proposal="local", elbo=est(elbo),
                  log_px=est(log_px), rate=1.0, distortion=99.0, active_units=2, seconds=1.0,
                  log_px_seconds=0.5, elbo_local=est(elbo_local),
                  approximation_gap=est(approximation_gap),
                  amortization_gap=est(amortization_gap))


SUMMARY = Summary(test_elbo=-100.0, test_elbo_stderr=0.1, test_rows=40, epochs=1, steps=10,
                  seconds_per_epoch=1.0, train_seconds=1.0, steps_per_second=10.0,
                  eval_seconds=None, final_train_elbo=-101.0, final_valid_elbo=-100.5,
                  guide="g", dataset="mnist", binarize="dynamic")


def guide_run(guide, seed, log_px, family="diagonal normal", per_datapoint=False, **kwargs):
    """A made-up ``GuideRun`` of ``guide`` from ``seed`` scoring ``log_px``."""
    return GuideRun(guide, seed, f"{guide}/seed{seed}", scores(log_px=log_px, **kwargs),
                    SUMMARY, Compute(StepCost({"decoder": 1.0}, {"decoder": 1.0}), 10, 1, 1.0),
                    family, per_datapoint)
