"""Which likelihood for grayscale MNIST? Continuous Bernoulli vs Normal (per-pixel / shared scale).

All on grayscale pixels in [0, 1] (``--binarize none``), amortized guide, same budget. A
Bernoulli is refused on grayscale data (it does not normalize over [0, 1]). Densities of
different likelihood families are on different scales, so compare ELBO and log p(x) within
a family and read the figures for quality.

    uv run python experiments/likelihoods.py --epochs 5 --test-size 2000 --num-particles 1000
        # the table in experiments/README.md, section 7
    uv run python experiments/likelihoods.py --smoke
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _table import SMOKE, train_and_score, write
from ppl_vae.config import Config

LIKELIHOODS = ["continuous_bernoulli", "normal", "normal_shared"]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--num-particles", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path("runs/likelihoods"))
    p.add_argument("--test-size", type=int, default=None, help="score the first N test rows")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    base = Config(binarize="none", epochs=args.epochs, test_size=args.test_size)
    if args.smoke:
        base = base.replace(**SMOKE)
        args.num_particles = 10
    rows = []
    for name in LIKELIHOODS:
        r = train_and_score(base.replace(likelihood=name), args.out / name, args.num_particles,
                            progress=not args.smoke)
        rows.append({"likelihood": name, **r})
    write(rows, ["likelihood", "epochs", "test_elbo", "test_log_px", "test_log_px_stderr",
               "rate", "distortion", "active_units", "seconds_per_epoch"], args.out)
    return rows


if __name__ == "__main__":
    main()
