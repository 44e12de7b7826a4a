"""The floor a dilated layer is measured against, in the same process as the layer: JAX's cuDNN
kernel alone on pre-gathered segments (every unit's q, k, v rows already contiguous,
``[b * S, m, H, d]``), forward and forward+backward (gradient of the summed outputs with respect
to those rows), beside ``ring_jax.dilated_attention`` on the same pattern.

bf16, b=1, h=8, d=64, causal, w=(2K, 4K, 8K, 16K), r=(1, 2, 4, 8), head groups.

    python -m benchmarks.floor --out floor.json [--n 262144,1048576,2097152] [--implementation cudnn]
"""

from __future__ import annotations

import argparse

from benchmarks.long_context import D, H, W, R, inputs, programs
from benchmarks.timing import Sweep, time_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", default="262144,1048576,2097152")
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--implementation", default="cudnn", help="of jax.nn.dot_product_attention (xla: a CPU check)")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    import ring_jax

    sweep = Sweep(args.out, args.budget_s, {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                                            "heads": H, "head_dim": D, "segment_lengths": W, "dilation_rates": R})
    impl = None if args.implementation == "none" else args.implementation
    attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)  # noqa: E731
    for n in (int(x) for x in args.n.split(",")):
        if not sweep.left():
            return
        plan = ring_jax.get_plan(ring_jax.DilatedConfig(W, R, "head_groups", True), n, H, H)
        keys = jax.random.split(jax.random.PRNGKey(1), 3 * len(plan.units))
        rows = [tuple(jax.random.normal(keys[3 * i + j], (n // u.w, u.m, len(u.heads), D), jnp.bfloat16)
                      for j in range(3)) for i, u in enumerate(plan.units)]  # [S, m, H, d] each
        floor_fwd = jax.jit(lambda rows: [attend(*x) for x in rows])
        floor_both = jax.jit(jax.grad(lambda rows: sum(attend(*x).astype(jnp.float32).sum() for x in rows)))
        fwd, both = programs(ring_jax, "head_groups", None)
        q, k, v = inputs(n)
        row = {"n": n, "floor_fwd_ms": time_ms(floor_fwd, rows, repeats=10),
               "floor_fwdbwd_ms": time_ms(floor_both, rows, repeats=10),
               "ours_fwd_ms": time_ms(fwd, q, k, v, repeats=10), "ours_fwdbwd_ms": time_ms(both, q, k, v, repeats=10)}
        row.update(ratio_fwd=row["ours_fwd_ms"] / row["floor_fwd_ms"],
                   ratio_fwdbwd=row["ours_fwdbwd_ms"] / row["floor_fwdbwd_ms"])
        sweep.add(**row)
        del rows, q, k, v


if __name__ == "__main__":
    main()
