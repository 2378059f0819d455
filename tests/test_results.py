"""ppl_vae.results: a comparison pairs its guides' runs by seed whatever their order."""
from __future__ import annotations

import pytest

from ppl_vae.compute import Budget
from ppl_vae.results import Comparison

import records


def test_a_comparison_pairs_runs_by_seed_whatever_their_order():
    comp = Comparison("d", {}, {}, "cpu", ["a", "b"], {}, [], [0, 1, 2], Budget(), 10)
    run = records.guide_run
    comp.runs = [run("a", 2, -90.0), run("b", 0, -95.0), run("a", 0, -94.0),
                 run("b", 2, -93.0), run("a", 1, -91.0), run("b", 1, -92.5)]
    (d,) = [d for d in comp.differences() if d.quantity == "test_log_px"]
    assert d.seeds == (0, 1, 2) and d.values == (1.0, 1.5, 3.0)
    doc = comp.to_json()
    assert doc["a"]["over_seeds"]["test_log_px"]["values"] == [-94.0, -91.0, -90.0]
    assert doc["a"]["test_log_px"] == pytest.approx(-275.0 / 3)
    assert doc["a"]["total_passes"] == 20 and doc["differences"][0]["a"] == "a"
