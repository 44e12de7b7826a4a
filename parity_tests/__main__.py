"""``python -m parity_tests``: the parity report (see ``parity_tests.report``)."""

import argparse
import sys

from parity_tests._env import simulate_cpu_devices


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity_tests", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="one config, causal only, small timing sweep")
    ap.add_argument("--json", default="report.json", help="where to write the results (default: %(default)s)")
    ap.add_argument("--png", default="report.png", help="where to write the plot (default: %(default)s)")
    args = ap.parse_args(argv)
    simulate_cpu_devices(8)  # the JAX ring runs on simulated CPU devices when no accelerators are present
    import jax

    jax.config.update("jax_enable_x64", True)  # the oracle comparisons run in float64 too
    from parity_tests.report import run

    return 0 if run(quick=args.quick, out_json=args.json, out_png=args.png) else 1


if __name__ == "__main__":
    sys.exit(main())
