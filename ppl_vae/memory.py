"""What a run will ask of memory, checked before anything is allocated.

A run whose sizes (``--hidden``, ``--num-particles``, ``--batch-size``, a per-datapoint table)
need more memory than the device has would fail in the allocator after minutes, or be killed
by the system; ``check`` refuses it in one line naming the sizes to change. The estimate
counts float32 tensors: parameters with their gradient and Adam's two moments, the table
likewise, and the activations of one step (forward and backward) for every particle.
"""
from __future__ import annotations

from typing import Optional

import torch

from .errors import UserError, setting

FLOAT = 4  # bytes


def available(device: torch.device) -> Optional[int]:
    """Bytes free on ``device`` (CUDA: the allocator's view; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except RuntimeError:
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def estimate(config, data_dim: int, num_data: int) -> dict:
    """Bytes of a run's parameters, table and one step's activations (a rough upper bound)."""
    sizes = [config.latent_dim, *config.hidden, data_dim]
    dense = sum((a + 1) * b for a, b in zip(sizes, sizes[1:]))  # the decoder's layers
    params = 2 * dense  # and an encoder of the same widths
    table = 2 * num_data * config.latent_dim  # a per-datapoint guide's loc and scale
    rows = config.num_particles * config.batch_size * max(1, config.refine_steps + 1)
    activations = rows * (3 * data_dim + 2 * sum(config.hidden) + 6 * config.latent_dim)
    return {"parameters": 4 * params * FLOAT, "table": 4 * table * FLOAT,
            "activations": 3 * activations * FLOAT}


def check(config, data_dim: int, num_data: int, device: torch.device) -> None:
    """Refuse a run that cannot fit in the memory ``device`` has free."""
    free = available(device)
    if free is None:
        return
    need = estimate(config, data_dim, num_data)
    total = sum(need.values())
    if total <= 0.9 * free:
        return
    parts = ", ".join(f"{k} {v / 2 ** 30:.1f}" for k, v in need.items())
    raise UserError(f"this run needs about {total / 2 ** 30:.1f} GiB ({parts}) but "
                    f"{device.type} has {free / 2 ** 30:.1f} GiB free; use a smaller "
                    f"{setting('hidden')}, {setting('num_particles')} or "
                    f"{setting('batch_size')}")


def reset_peak() -> bool:
    """Start the process's peak resident memory afresh (Linux: ``/proc/self/clear_refs``,
    which resets both ``VmHWM`` and ``getrusage``'s ``ru_maxrss``), so that a reading after
    one run is that run's peak and not the process's so far (a comparison trains its guides
    one after another in one process); returns False where the system cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
