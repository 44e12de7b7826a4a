"""Process set-up shared by the test suite and the parity report (before jax is imported)."""

import os


def simulate_cpu_devices(count: int = 8, fast_compile: bool = False) -> None:
    """``count`` simulated CPU devices for shard_map rings when no accelerator is present.

    ``fast_compile`` (tests) sets XLA's backend optimisation level to 0: the suite compiles hundreds
    of small programs and runs each once, so compile time dominates; numerics are the same IEEE
    operations. Must run before jax is first imported.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags += f" --xla_force_host_platform_device_count={count}"
    if fast_compile and "xla_backend_optimization_level" not in flags:
        flags += " --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = flags.strip()
