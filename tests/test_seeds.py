"""ppl_vae.seeds: Student-t quantiles, spreads over seeds and paired differences of guides
trained from the same seeds."""
from __future__ import annotations

import math
import statistics

import pytest

from ppl_vae.seeds import Spread, differences, paired, t975


def test_t_quantiles():
    assert t975(1) == pytest.approx(12.7062, abs=1e-4)
    assert t975(2) == pytest.approx(4.3027, abs=1e-4)
    assert t975(40) == pytest.approx(2.0211, abs=2e-4)
    assert t975(120) == pytest.approx(1.9799, abs=2e-4)
    with pytest.raises(ValueError):
        t975(0)


def test_the_paired_interval_takes_matched_seeds():
    a = {0: 1.0, 1: 2.0, 2: 4.0}
    b = {2: 1.0, 0: 0.5, 3: 9.0, 1: 1.0}  # another order, and a seed a does not have
    d = paired("test_log_px", "a", "b", a, b)
    assert d.seeds == (0, 1, 2) and d.values == (0.5, 1.0, 3.0)
    mean = 1.5
    sd = math.sqrt(((0.5 - mean) ** 2 + (1.0 - mean) ** 2 + (3.0 - mean) ** 2) / 2)
    half = 4.3027 * sd / math.sqrt(3)
    assert d.mean == pytest.approx(mean) and d.sd == pytest.approx(sd)
    assert (d.low, d.high) == (pytest.approx(mean - half, abs=1e-3),
                               pytest.approx(mean + half, abs=1e-3))
    assert d.settled is False  # [-1.79, 4.79] holds 0
    # seeds far apart, guides close within each seed: settled only when paired by seed
    # (paired by position, 10 - 29.1, 20 - 9, 30 - 19.05 would hold 0)
    d = paired("q", "a", "b", {0: 10.0, 1: 20.0, 2: 30.0}, {2: 29.1, 0: 9.0, 1: 19.05})
    assert d.values == pytest.approx((1.0, 0.95, 0.9)) and d.settled
    assert paired("q", "a", "b", {0: 1.0}, {0: 0.5}).low is None  # one seed: no interval
    assert paired("q", "a", "b", {0: 1.0}, {1: 0.5}) is None  # no seed in common


def test_differences_take_every_pair_in_order():
    values = {g: {"q": {0: v, 1: v + 1}} for g, v in (("x", 1.0), ("y", 3.0), ("z", 0.0))}
    diffs = differences(values, ["q"], ["x", "y", "z"])
    assert [(d.a, d.b, d.mean) for d in diffs] == [("x", "y", -2.0), ("x", "z", 1.0),
                                                   ("y", "z", 3.0)]
    assert all(d.sd == 0 and d.excludes_zero for d in diffs)
    assert all(d.settled is None for d in diffs)  # 2 seeds: 1 degree of freedom, not judged


def test_settled_needs_three_seeds_and_an_interval_without_zero():
    two = paired("q", "a", "b", {0: 2.0, 1: 2.1}, {0: 1.0, 1: 1.05})
    assert two.excludes_zero and two.settled is None and two.to_json()["settled"] is None
    three = paired("q", "a", "b", {0: 2.0, 1: 2.1, 2: 2.05}, {0: 1.0, 1: 1.05, 2: 1.0})
    assert three.excludes_zero and three.settled is True


def test_spread_is_mean_and_sample_sd():
    s = Spread((0, 1, 2), (1.0, 2.0, 6.0))
    assert s.mean == 3.0 and s.sd == pytest.approx(statistics.stdev([1.0, 2.0, 6.0]))
    assert Spread((0,), (1.0,)).sd is None
