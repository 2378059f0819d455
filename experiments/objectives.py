"""ELBO vs IWAE-5 vs IWAE-50 training on binarized MNIST, scored by test log p(x).

Burda et al. (2016, Table 1, one stochastic layer, 3,280 passes) report test log p(x) of
-84.78 nats for IWAE training with k=50 against -86.76 for the VAE (ELBO, k=1).
Same epochs for every objective here.

    uv run python experiments/objectives.py --epochs 5 --test-size 2000 --num-particles 1000
        # the table in experiments/README.md, section 6
    uv run python experiments/objectives.py --smoke
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _table import SMOKE, train_and_score, write
from ppl_vae.config import Config

RUNS = [("elbo", "elbo", 1), ("iwae-5", "iwae", 5), ("iwae-50", "iwae", 50)]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--num-particles", type=int, default=5000)
    p.add_argument("--dreg", action="store_true", help="DReG gradients for the IWAE runs")
    p.add_argument("--out", type=Path, default=Path("runs/objectives"))
    p.add_argument("--test-size", type=int, default=None, help="score the first N test rows")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    base = Config(epochs=args.epochs, max_seconds=args.max_seconds, test_size=args.test_size)
    if args.smoke:
        base = base.replace(**SMOKE)
        args.num_particles = 10
    rows = []
    for label, objective, k in RUNS:
        config = base.replace(objective=objective, num_particles=k,
                              dreg=args.dreg and objective == "iwae")
        r = train_and_score(config, args.out / label, args.num_particles, progress=not args.smoke)
        rows.append({"objective": label, **r})
    write(rows, ["objective", "epochs", "train_seconds", "test_elbo", "test_log_px",
               "test_log_px_stderr", "active_units"], args.out)
    return rows


if __name__ == "__main__":
    main()
