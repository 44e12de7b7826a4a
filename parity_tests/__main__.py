"""``python -m parity_tests``: the parity report (see ``parity_tests.report``).

Every implementation (jax, jax_ring, torch, torch_ring) against the float64 oracle, with each
row's error, bound and PASS/FAIL; the exit status is non-zero when any row fails. The default is a
covering subset (about a minute on a 2-core CPU); ``--full`` runs the whole matrix.
"""

import argparse
import os
import sys
import time

from parity_tests._env import simulate_cpu_devices


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m parity_tests", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help="the whole matrix: 2 configs x 3 dtypes x 2 mixes x causal/not x 4 implementations "
                           "(96 rows, several minutes on a CPU), compiled at XLA's default optimisation level")
    size.add_argument("--quick", action="store_true",
                      help="the default subset (the default run is the quick one; the flag is accepted for "
                           "scripts): one config, 24 rows in which every implementation runs every dtype, both "
                           "mixes, causal and not; JAX compiles at XLA backend optimisation level 0, as in the "
                           "test suite")
    ap.add_argument("--timing", action=argparse.BooleanOptionalAction, default=None,
                    help="measure forward times vs n (default: only when an accelerator is present; on a CPU "
                         "they run single-threaded)")
    ap.add_argument("--json", default="report.json", help="where to write the results (default: %(default)s)")
    ap.add_argument("--png", default="report.png", help="where to write the plot (default: %(default)s)")
    return ap.parse_args(argv)


def single_thread_cpu() -> None:
    """One XLA CPU thread per computation (for timings); must run before jax is first imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    # The JAX ring runs on simulated CPU devices when no accelerators are present.
    simulate_cpu_devices(8, fast_compile=not (args.full or args.timing))  # timings: optimised programs
    if args.timing:
        single_thread_cpu()
    import jax

    jax.config.update("jax_enable_x64", True)  # the oracle comparisons run in float64 too
    from parity_tests.report import run

    ok = run(full=args.full, timing=args.timing, out_json=args.json, out_png=args.png, started=started)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
