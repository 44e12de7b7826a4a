"""The one timing helper: warm-up, device sync, median of repeats (milliseconds); and the row
writer every sweep uses (each finished row flushed to its JSON file at once, for short leases)."""

from __future__ import annotations

import json
import statistics
import time


def emit(row: dict, data, out: str) -> None:
    """Prints ``row`` as one JSON line and rewrites ``out`` with ``data`` (which holds it)."""
    print(json.dumps(row), flush=True)
    with open(out, "w") as f:
        json.dump(data, f, indent=1)


class Sweep:
    """Rows of one benchmark run in ``{"meta": ..., "rows": [...]}``, rewritten to ``out`` after
    every row; ``left()`` is False once ``budget_s`` seconds have passed."""

    def __init__(self, out: str, budget_s: float, meta: dict | None = None):
        self.out, self.deadline = out, time.time() + budget_s
        self.data = {"meta": dict(meta or {}), "rows": []}

    def left(self) -> bool:
        return time.time() < self.deadline

    def add(self, **row):
        self.data["rows"].append(row)
        emit(row, self.data, self.out)


def _sync(result):
    """Blocks until ``result`` (torch tensors, or a JAX pytree) is computed on its device."""
    first = result[0] if isinstance(result, (tuple, list)) else result
    if type(first).__module__.startswith("torch"):
        import torch

        if first.is_cuda:
            torch.cuda.synchronize(first.device)
    else:
        import jax

        jax.block_until_ready(result)
    return result


def time_ms(fn, *args, warmup: int = 2, repeats: int = 10) -> float:
    """Median wall-clock milliseconds of ``fn(*args)``, synchronised with the device."""
    for _ in range(warmup):
        _sync(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        _sync(fn(*args))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def first_call_ms(fn, *args) -> float:
    """Milliseconds of the first call (for jitted functions: trace + compile + run)."""
    start = time.perf_counter()
    _sync(fn(*args))
    return (time.perf_counter() - start) * 1e3
