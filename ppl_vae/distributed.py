"""Data-parallel training with ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc-per-node W -m ppl_vae train ...`` starts W processes; each calls ``init``,
which reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), joins the
process group (NCCL on CUDA, one GPU per process from ``LOCAL_RANK``; Gloo on the CPU) and
returns its ``World``. Without torchrun, ``init`` returns the one-process world and touches
nothing.

What each process does (``run.fit_run`` wires it up):

- **data**: rank r owns training rows i with i mod W = r (``batching.Shards``) and draws its
  minibatches from its own rows, with its own binarization noise; the global minibatch of a
  step is the union of the ranks' batches;
- **networks** are replicated; after each backward pass ``GradSync`` sums their gradients
  over ranks in one all-reduce of a flat buffer. Every rank's loss is an unbiased full-data
  estimate divided by W, so the sum is the average of the ranks' estimates, which with equal
  per-rank batches is the loss of the global minibatch. One flat all-reduce rather than
  ``DistributedDataParallel``: a Pyro program calls its networks from inside model and guide
  (and a semi-amortized guide differentiates inside the program), not through one
  ``forward`` that DDP could hook; for networks of this size overlapping communication with
  the backward pass buys little, and the flat buffer also carries the step's
  found-non-finite flag, so the divergence guard needs no extra collective;
- **per-datapoint tables** are sharded: the guide allocates only its rank's rows (built
  with ``rank``/``world_size``, or cut down by their ``shard``) and their optimizer state;
  their gradients are sparse, local and never communicated;
- **checkpoints**: the table rows and their optimizer state are gathered to rank 0 once per
  epoch, which writes one checkpoint in the single-process format (so ``evaluate`` and
  ``report`` read it unchanged) plus the world size and every rank's random state; resuming
  takes each rank's rows back. A different world size changes the data order and is refused.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from .batching import shard_rows
from .config import named_device
from .errors import UserError, setting


class RefusedElsewhere(UserError):
    """Another process refused the run; that process prints why."""


class World(NamedTuple):
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that writes files, logs and draws progress bars."""
        return self.rank == 0


SINGLE = World()


def launched() -> bool:
    """True inside a process started by torchrun (or another launcher setting WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def current() -> World:
    """The world of this process: from the process group once ``init`` ran, else one process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", "0")))
    return SINGLE


def resolve_device(name: str, world: Optional[World] = None) -> torch.device:
    """The device a setting names, decided here only: ``auto`` is CUDA when available, else
    the CPU (``config.named_device``); under torchrun (``world``, the ``World`` of a launched
    process) each process takes its own GPU, ``cuda:LOCAL_RANK``, unless the setting is
    ``cpu``."""
    if world is not None and (world.size > 1 or launched()):
        if name != "cpu" and torch.cuda.is_available():
            return torch.device("cuda", world.local_rank)
        if name.startswith("cuda"):
            raise UserError(f"device {name!r} ({setting('device')}) under torchrun, but CUDA "
                            f"is not available; use {setting('device')} cpu (Gloo)")
        return torch.device("cpu")
    return named_device(name)


def init(device: str = "auto", timeout_s: float = 1800.0) -> World:
    """Join torchrun's process group when launched by it; the one-process world otherwise.

    ``device`` is the run's setting: ``auto`` or ``cuda`` with CUDA present takes the GPU
    ``LOCAL_RANK`` and NCCL; otherwise the CPU and Gloo.
    """
    if not launched():
        return SINGLE
    if dist.is_initialized():
        return current()
    check_environment()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    own = resolve_device(device, World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                                       local_rank))
    cuda = own.type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return current()


RESOLVE_SECONDS = 10.0  # how long MASTER_ADDR may take to resolve before the run is refused


def check_environment() -> None:
    """Refuse, in one line, a launcher's environment that torch would fail on with a traceback
    (or wait on forever): RANK, WORLD_SIZE and LOCAL_RANK must be integers with
    0 <= RANK < WORLD_SIZE; torch's rendezvous (env://) needs MASTER_ADDR and MASTER_PORT,
    even for one process; MASTER_PORT must be a port number (1 to 65535) and MASTER_ADDR a
    host that resolves (within ``RESOLVE_SECONDS``), where torch would retry for minutes."""
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = os.environ.get(name, "0")
        try:
            values[name] = int(text)
        except ValueError:
            raise UserError(f"the environment variable {name}={text!r} is not an integer; "
                            f"start several processes with torchrun, which sets it") from None
    if not 0 <= values["RANK"] < max(values["WORLD_SIZE"], 1) or values["WORLD_SIZE"] < 1:
        raise UserError(f"RANK={values['RANK']} and WORLD_SIZE={values['WORLD_SIZE']} do not "
                        f"fit (0 <= RANK < WORLD_SIZE); start the processes with torchrun")
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
    if missing:
        raise UserError(f"WORLD_SIZE={values['WORLD_SIZE']} without {' and '.join(missing)}: "
                        f"the processes could not find each other; start them with torchrun "
                        f"(it sets these), or unset WORLD_SIZE and RANK for one process")
    text = os.environ["MASTER_PORT"]
    try:
        port = int(text)
    except ValueError:
        port = None
    if port is None or not 1 <= port <= 65535:
        raise UserError(f"the environment variable MASTER_PORT={text!r} is not a port number; "
                        f"give an integer from 1 to 65535 (a free port, such as 29500), or "
                        f"start the processes with torchrun")
    check_address(os.environ["MASTER_ADDR"], port)


def check_address(host: str, port: int, timeout_s: float = RESOLVE_SECONDS) -> None:
    """Refuse a MASTER_ADDR that does not resolve (torch would retry it for minutes, warning
    every few seconds), or takes more than ``timeout_s`` to (a resolver that does not
    answer); the lookup runs in a thread so that a hung resolver cannot hold the run."""
    import socket
    import threading
    answer: list = []

    def lookup():
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            answer.append(None)
        except (OSError, UnicodeError) as e:
            answer.append(e)

    worker = threading.Thread(target=lookup, name="resolve MASTER_ADDR", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not answer:
        why = f"did not resolve within {timeout_s:g} s"
    elif answer[0] is not None:
        why = f"does not resolve ({getattr(answer[0], 'strerror', None) or answer[0]})"
    else:
        return
    raise UserError(f"the environment variable MASTER_ADDR={host!r} {why}; give the host "
                    f"name or IP address of the machine of rank 0 (127.0.0.1 on one machine), "
                    f"or start the processes with torchrun")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    """Where this process's collectives run: its GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(ok: bool, world: World) -> bool:
    """True when every rank says ``ok`` (one all-reduce); always ``ok`` for one process."""
    if world.size == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


class GradSync:
    """Sums the networks' gradients over ranks in one all-reduce of a flat buffer.

    ``reduce(params, flag)`` appends ``flag`` (the rank's found-non-finite indicator, a
    0-dim float tensor) to the buffer, so after the call every rank holds the summed
    gradients and a flag that is positive when any rank saw a non-finite loss or gradient.
    The number of calls and bytes sent are counted (``calls``, ``bytes``) for the tests.
    """

    def __init__(self, world: World):
        self.world = world
        self.calls = 0
        self.bytes = 0

    @property
    def size(self) -> int:
        return self.world.size

    def reduce(self, params: Sequence[torch.Tensor], flag: torch.Tensor) -> torch.Tensor:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [flag.reshape(1)])
        dist.all_reduce(flat)
        self.calls += 1
        self.bytes += flat.numel() * flat.element_size()
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p)
            offset += n
        return flat[-1]

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks (the epoch's loss total)."""
        t = t.clone()
        dist.all_reduce(t)
        return t


# ---------------------------------------------------------------------------------------
# the per-datapoint rows, gathered for a checkpoint and taken back on resume
# ---------------------------------------------------------------------------------------
def gather_rows(shard: torch.Tensor, num_data: int, world: World) -> Optional[torch.Tensor]:
    """The full [N, ...] tensor on rank 0 from every rank's rows (None on the others)."""
    width = -(-num_data // world.size)
    padded = shard.new_zeros((width,) + tuple(shard.shape[1:]))
    padded[:len(shard)] = shard
    parts: Optional[List[torch.Tensor]] = (
        [torch.empty_like(padded) for _ in range(world.size)] if world.main else None)
    dist.gather(padded, parts, dst=0)
    if not world.main:
        return None
    full = shard.new_empty((num_data,) + tuple(shard.shape[1:]))
    for r, part in enumerate(parts):
        rows = shard_rows(num_data, world.size, r)
        full[rows] = part[:len(rows)]
    return full


def gather_objects(obj, world: World) -> Optional[list]:
    """Every rank's small picklable ``obj`` (random states) on rank 0, in rank order."""
    out = [None] * world.size if world.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def check_world_size(saved: int, world: World, where) -> None:
    if saved != world.size:
        how = ("plain `ppl-vae train ... --resume`" if saved == 1 else
               f"`torchrun --nproc-per-node {saved} -m ppl_vae train ... --resume`")
        raise UserError(f"{where} was trained with {saved} process(es) and this run has "
                        f"{world.size}; the world size decides the data order and the table "
                        f"shards, so resume it with {how}")


def rank_seed(seed: int, world: World) -> int:
    """Rank r's seed for its own random streams (model noise, binarization): the
    single-process seed on rank 0, a distinct one on each other rank."""
    return seed + 7919 * world.rank


def _table_names(guide, optimizers) -> List[str]:
    tables = {id(t) for t in optimizers.tables()}
    return [name for name, p in guide.named_parameters() if id(p) in tables]


def full_state(guide, optimizers, world: World, num_data: int):
    """(guide state, optimizer states) as one process would hold them: the table rows and
    their optimizer state gathered to rank 0 in dataset order (None, None on other ranks)."""
    guide_state = guide.state_dict()
    opt_states = [o.state_dict() for o in optimizers.all()]
    if world.size == 1:
        return guide_state, opt_states
    for name in _table_names(guide, optimizers):
        guide_state[name] = gather_rows(guide_state[name], num_data, world)
    if optimizers.local is not None:
        local = opt_states[-1]
        local["state"] = {k: {key: gather_rows(v, num_data, world) for key, v in st.items()}
                          for k, st in local["state"].items()}
    return (guide_state, opt_states) if world.main else (None, None)


def local_optimizer_state(state: dict, world: World, num_data: int) -> dict:
    """A table optimizer's full state cut to this rank's rows (``full_state``'s inverse)."""
    if world.size == 1:
        return state
    rows = shard_rows(num_data, world.size, world.rank)
    return {**state, "state": {k: {key: v[rows] for key, v in st.items()}
                               for k, st in state["state"].items()}}


def refuse_unless_all(error: Optional[UserError], world: World) -> None:
    """Raise ``error`` on the process that has it and ``RefusedElsewhere`` on the others, so
    no process waits in a collective for one that has given up (one all-reduce)."""
    if not agree(error is None, world):
        raise error or RefusedElsewhere("another process refused the run; see rank 0's message")
