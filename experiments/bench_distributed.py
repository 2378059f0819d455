"""Benchmark: data-parallel training with 1 and 2 processes (torchrun, Gloo on the CPU).

Samples per second of the training loop (``train.fit`` with ``batching.Shards``, the divergence
guard on, read every 100 steps) at the same per-process batch, for the amortized guide and
the per-datapoint (mean-field) guide, on MNIST's 50,000 training rows; each process has one
thread. The rounds are interleaved (1, 2, 1, 2, ... processes) and the medians reported, with
the per-process memory of the per-datapoint table (its rows and their RowAdam state), the
all-reduce timed alone, and the time each process spent inside the step's all-reduce while
training (the all-reduce plus waiting for the slower process: the rest of the step is its
own work). "At most" is the speed-up W processes could reach if each process's own work
cost what one process's step costs and only the all-reduce were added: W t1 / (t1 +
t_allreduce), from the medians of the same run.

    uv run python experiments/bench_distributed.py            # full (about 5 min on 2 cores)
    uv run python experiments/bench_distributed.py --smoke    # seconds, for the tests
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ppl_vae import batching, callbacks, data, distributed, train
from ppl_vae.build import build_guide, build_model, build_objective
from ppl_vae.config import Config
from ppl_vae.optim import make_optimizers


class StopAfter(callbacks.Callback):
    def __init__(self, steps: int):
        self.steps = steps

    def after_step(self, loop) -> bool:
        return loop.step >= self.steps


def worker(guide_name: str, batch: int, steps: int, warmup: int, rows: int, out: Path) -> None:
    """One process of a measurement (under torchrun, or alone for one process)."""
    world = distributed.init("cpu")
    torch.set_num_threads(1)
    config = Config(guide=guide_name, batch_size=batch, seed=0)
    split = data.load("mnist").train.head(rows)
    n, dim = len(split), split.x.shape[1]
    model = build_model(config, dim, split.image_shape)
    guide = build_guide(config, dim, n, split.x, model=model, rank=world.rank,
                        world_size=world.size)  # a table: this process's rows only
    opts = make_optimizers(model, guide, config.lr, config.local_lr, config.inner_steps)
    if world.size > 1:
        opts = opts._replace(sync=distributed.GradSync(world))
    shards = batching.Shards(n, world.size, batch)
    binarize = data.Binarize("dynamic", torch.Generator().manual_seed(
        distributed.rank_seed(3, world)))
    torch.manual_seed(distributed.rank_seed(2, world))
    kw = dict(seed=0, progress=False, ctrl_c=False, shards=shards, rank=world.rank)
    objective = build_objective(config)
    train.fit(model, guide, objective, split, opts, 1, batch, binarize,
              callbacks=[StopAfter(warmup)], **kw)  # warm-up: allocations, first steps
    in_reduce = [0.0]  # seconds inside the step's all-reduce, waiting for the others included
    if world.size > 1:
        reduce = opts.sync.reduce

        def timed_reduce(*args):
            t = time.perf_counter()
            out = reduce(*args)
            in_reduce[0] += time.perf_counter() - t
            return out
        opts.sync.reduce = timed_reduce
    distributed.barrier(world)
    start = time.perf_counter()
    train.fit(model, guide, objective, split, opts, 2, batch, binarize, start_epoch=1,
              callbacks=[StopAfter(steps)], **kw)
    distributed.barrier(world)
    seconds = time.perf_counter() - start
    in_reduce_ms = None
    if world.size > 1:
        opts.sync.reduce = reduce
        in_reduce_ms = [1e3 * x / steps for x in
                        (distributed.gather_objects(in_reduce[0], world) or [])]
    allreduce_ms = None
    if world.size > 1:  # the communication alone: the step's all-reduce, 50 times
        for p in opts.networks():
            p.grad = torch.zeros_like(p)
        flag = torch.zeros(())
        t = time.perf_counter()
        for _ in range(50):
            opts.sync.reduce(opts.networks(), flag)
        allreduce_ms = 1e3 * (time.perf_counter() - t) / 50
    table = guide.local_parameters()
    table_bytes = sum(t.numel() * t.element_size() for t in table)
    state_bytes = sum(v.numel() * v.element_size() for t in table
                      for v in opts.local.state.get(t, {}).values()) if table else 0
    if world.main:
        out.write_text(json.dumps({
            "guide": guide_name, "processes": world.size, "batch_per_process": batch,
            "steps": steps, "seconds": seconds,
            "samples_per_second": world.size * batch * steps / seconds,
            "step_ms": 1e3 * seconds / steps, "allreduce_ms": allreduce_ms,
            "in_step_allreduce_ms": in_reduce_ms,  # per process
            "network_mb": sum(p.numel() * p.element_size() for p in opts.networks()) / 2 ** 20,
            "table_rows_per_process": table[0].shape[0] if table else 0,
            "table_mb_per_process": (table_bytes + state_bytes) / 2 ** 20}))
    distributed.shutdown()


def measure(guide_name: str, processes: int, args, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", guide_name, "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--rows", str(args.rows),
           "--result", str(out)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(processes), *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny settings, seconds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=128, help="per process")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--guides", default="amortized,meanfield")
    p.add_argument("--processes", default="1,2")
    p.add_argument("--out", type=Path, default=Path("runs/bench_distributed.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.batch, args.steps, args.warmup, args.rows, args.result)
        return {}
    if args.smoke:
        args.rounds, args.batch, args.steps, args.warmup, args.rows = 1, 16, 4, 2, 256
    args.out.parent.mkdir(parents=True, exist_ok=True)
    names = args.guides.split(",")
    sizes = [int(w) for w in args.processes.split(",")]
    runs = {(g, w): [] for g in names for w in sizes}
    for r in range(args.rounds):  # interleaved: every setting once per round
        for g in names:
            for w in sizes:
                res = measure(g, w, args, args.out.with_suffix(".part.json"))
                runs[(g, w)].append(res)
                print(f"round {r + 1}: {g:10s} {w} process(es): "
                      f"{res['samples_per_second']:8.0f} samples/s", flush=True)
    args.out.with_suffix(".part.json").unlink(missing_ok=True)
    summary = {}
    lines = ["| guide | processes | samples/s (median) | speed-up | at most | ms / step | "
             "all-reduce ms | in the step's all-reduce, ms / process | table rows / process | "
             "table + Adam state MB / process |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for g in names:
        base = base_ms = None
        for w in sizes:
            rs = runs[(g, w)]
            sps = statistics.median(x["samples_per_second"] for x in rs)
            base = base or sps
            step_ms = statistics.median(x["step_ms"] for x in rs)
            comm = [x["allreduce_ms"] for x in rs if x["allreduce_ms"] is not None]
            comm_ms = statistics.median(comm) if comm else None
            waits = [x["in_step_allreduce_ms"] for x in rs if x["in_step_allreduce_ms"]]
            wait_ms = [statistics.median(w_[r] for w_ in waits) for r in range(w)] if waits \
                else None
            base_ms = base_ms or step_ms
            # a W-process step is at least the 1-process step plus the all-reduce
            bound = None if comm_ms is None else w * base_ms / (base_ms + comm_ms)
            summary[f"{g}/{w}"] = {**rs[0], "samples_per_second": sps,
                                   "in_step_allreduce_ms": wait_ms,
                                   "all_samples_per_second": [x["samples_per_second"] for x in rs],
                                   "speedup": sps / base, "step_ms": step_ms,
                                   "allreduce_ms": comm_ms, "speedup_bound": bound}
            lines.append(f"| {g} | {w} | {sps:.0f} | {sps / base:.2f}x | "
                         f"{'-' if bound is None else f'{bound:.2f}x'} | {step_ms:.1f} | "
                         f"{'-' if comm_ms is None else f'{comm_ms:.1f}'} | "
                         f"{'-' if wait_ms is None else ' / '.join(f'{x:.1f}' for x in wait_ms)} | "
                         f"{rs[0]['table_rows_per_process']:,} | "
                         f"{rs[0]['table_mb_per_process']:.1f} |")
    doc = {"setting": {"batch_per_process": args.batch, "steps": args.steps,
                       "rows": args.rows, "rounds": args.rounds, "threads_per_process": 1,
                       "cpus": os.cpu_count(), "torch": torch.__version__},
           "results": summary}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print("\n".join(lines))
    return doc


if __name__ == "__main__":
    main()
