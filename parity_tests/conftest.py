"""Test set-up: 8 simulated CPU devices for shard_map rings, fast compiles, float64 in JAX."""

import os

from parity_tests._env import simulate_cpu_devices

simulate_cpu_devices(8, fast_compile=True)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

try:
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:  # the torch-only half of the suite still runs
    pass
