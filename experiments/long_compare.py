"""The amortized-versus-mean-field table at a budget where the amortized model's test log p(x)
reaches -90 nats or better (200 epochs each: about an hour on a 2-core CPU, with evaluation).

Same as ``ppl-vae compare`` with a budget in epochs instead of seconds, the whole test set
and K = 5000.

    uv run python experiments/long_compare.py                 # 200 epochs, writes runs/long_compare
    uv run python experiments/long_compare.py --smoke
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _table import SMOKE
from ppl_vae.compare import compare
from ppl_vae.config import Config


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--num-particles", type=int, default=5000)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("runs/long_compare"))
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    config = Config(epochs=args.epochs, max_seconds=args.max_seconds, device=args.device)
    if args.smoke:
        config = config.replace(**SMOKE)
        args.num_particles = 10
    return compare(config, args.out, num_particles=args.num_particles, overwrite=True,
                   progress=not args.smoke)


if __name__ == "__main__":
    main()
