"""Test set-up: 8 simulated CPU devices for shard_map rings and float64 in JAX.

XLA_FLAGS must be set before jax is first imported, so it is done here, at collection time.
"""

import os

# Optimisation level 0: the suite compiles hundreds of small programs and runs each once, so
# compile time dominates; numerics are the same IEEE operations.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

try:
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:  # the torch-only half of the suite still runs
    pass
