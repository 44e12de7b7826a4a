"""The one timing helper: warm-up, device sync, median of repeats (milliseconds)."""

from __future__ import annotations

import statistics
import time


def _sync(result):
    """Blocks until ``result`` (a JAX pytree or torch tensors) is computed."""
    try:
        import jax

        jax.block_until_ready(result)
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ImportError:
        pass
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
