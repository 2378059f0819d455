"""Run by tests/test_distributed.py under torchrun: 20 data-parallel steps of each guide.

Each process writes ``<out>/<guide>.rank<r>.pt``: its losses, its networks, its table shard,
every collective it took part in while training (name and bytes) and, on rank 0, the
evaluation of held-out rows shared out over the processes, for the test to compare with one
process following the same sharded order.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from dist_setup import (BATCH, EVAL, N, SEED, STEPS, build, config, eval_rows,  # noqa: E402
                        noise, split)

from ppl_vae import batching, callbacks, distributed, train  # noqa: E402
from ppl_vae.build import build_objective  # noqa: E402
from ppl_vae.evaluate import evaluate_model  # noqa: E402
from ppl_vae.optim import make_optimizers  # noqa: E402

COLLECTIVES = ("all_reduce", "gather", "all_gather", "broadcast", "gather_object",
               "all_gather_object", "send", "recv", "isend", "irecv", "scatter", "reduce",
               "all_to_all", "reduce_scatter")


def count_collectives(log: list) -> None:
    """Record (name, bytes) of every torch.distributed call from here on."""
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def wrapped(obj, *args, _name=name, _original=original, **kwargs):
            size = obj.numel() * obj.element_size() if isinstance(obj, torch.Tensor) else -1
            log.append((_name, size))
            return _original(obj, *args, **kwargs)
        setattr(dist, name, wrapped)


class Record(callbacks.Callback):
    def __init__(self):
        self.losses = []

    def after_step(self, loop):
        self.losses.append(float(loop.last_loss))
        return len(self.losses) >= STEPS  # ends the (longer) epoch after STEPS steps


def main(out: Path) -> None:
    world = distributed.init("cpu")
    calls: list = []
    count_collectives(calls)
    for name in ("amortized", "meanfield"):
        model, guide = build(name)
        guide = guide.shard(world.rank, world.size)
        c = config(name)
        opts = make_optimizers(model, guide, c.lr, c.local_lr, c.inner_steps)._replace(
            sync=distributed.GradSync(world))
        table0 = guide.params.detach().clone() if name == "meanfield" else None
        torch.manual_seed(distributed.rank_seed(SEED + 2, world))
        record = Record()
        calls.clear()
        train.fit(model, guide, build_objective(c), split(), opts, 1, BATCH, noise(world.rank),
                  seed=SEED, progress=False, ctrl_c=False, callbacks=[record],
                  shards=batching.Shards(N, world.size, BATCH), rank=world.rank, read_every=7)
        trained_calls = list(calls)
        # evaluation: the held-out rows' units shared out over the processes
        scores = evaluate_model(model, guide, eval_rows(), **EVAL)
        results = scores.to_json() if scores is not None else None
        torch.save({"losses": record.losses, "model": model.state_dict(),
                    "guide": guide.state_dict(), "table0": table0, "calls": trained_calls,
                    "eval": results,
                    "sync_bytes": opts.sync.bytes, "sync_calls": opts.sync.calls,
                    "network_numel": sum(p.numel() for p in opts.networks())},
                   out / f"{name}.rank{world.rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
