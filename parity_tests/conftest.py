"""Test set-up: 8 simulated CPU devices for shard_map rings, fast compiles, float64 in JAX;
Triton kernels in Triton's interpreter where no NVIDIA device exists (before triton is imported)."""

import glob
import os

from parity_tests._env import simulate_cpu_devices

simulate_cpu_devices(8, fast_compile=True)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:  # the torch-only half of the suite still runs
    pass


def pytest_collection_modifyitems(config, items):
    """Every test skipped for want of a GPU belongs to the GPU set (``-m cuda``)."""
    import pytest

    for item in items:
        gpu = any(m.kwargs.get("reason", "").startswith(("needs CUDA", "needs cuDNN"))
                  for m in item.iter_markers("skipif"))
        if gpu and item.get_closest_marker("cuda") is None:
            raise pytest.UsageError(f"{item.nodeid} needs a GPU but is not marked cuda")
