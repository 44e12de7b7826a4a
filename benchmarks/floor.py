"""The floor a dilated layer is measured against, in the same process as the layer: the fused
kernel alone on pre-gathered segments (every unit's q, k, v rows already contiguous), forward and
forward+backward (gradient of the summed outputs with respect to those rows), beside the layer
on the same pattern with the same loss. ``jax``: cuDNN (``jax.nn.dot_product_attention``) vs
``ring_jax.dilated_attention``; ``torch``: SDPA (flash on sm80+) vs ``ring_torch.dilated_attention``.

bf16, b=1, h=8, d=64, causal, w=(2K, 4K, 8K, 16K), r=(1, 2, 4, 8), head groups.

    python -m benchmarks.floor jax --out floor.json [--n 262144,1048576,2097152] [--implementation cudnn]
    python -m benchmarks.floor torch --out floor_torch.json
"""

from __future__ import annotations

import argparse

from benchmarks.long_context import D, H, W, R, inputs, programs
from benchmarks.timing import Sweep, time_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("framework", choices=("jax", "torch"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", default="262144,1048576,2097152")
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--implementation", default="cudnn", help="of jax.nn.dot_product_attention (xla: a CPU check)")
    ap.add_argument("--device", default="cuda", help="torch device (cpu: a check of the script)")
    args = ap.parse_args()
    (run_jax if args.framework == "jax" else run_torch)(args)


def run_torch(args):
    import torch
    import torch.nn.functional as F

    import ring_torch

    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    sweep = Sweep(args.out, args.budget_s, {"device": name, "torch": torch.__version__,
                                            "heads": H, "head_dim": D, "segment_lengths": W, "dilation_rates": R})
    kw = {"segment_lengths": W, "dilation_rates": R, "mix": "head_groups", "is_causal": True}
    for n in (int(x) for x in args.n.split(",")):
        if not sweep.left():
            return
        plan = ring_torch.build_plan(ring_torch.DilatedConfig(W, R, "head_groups", True), n, H, H)
        rows = [[torch.randn(n // u.segment, u.num_heads, u.rows, D, device=dev, dtype=torch.bfloat16)
                 for _ in range(3)] for u in plan.units]  # [S, H, m, d] each
        qkv = [torch.randn(1, n, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3)]

        def floor_fwd(rows):
            with torch.no_grad():
                return [F.scaled_dot_product_attention(*x, is_causal=True) for x in rows]

        def floor_both(rows):
            xs = [[t.detach().requires_grad_() for t in x] for x in rows]
            sum(F.scaled_dot_product_attention(*x, is_causal=True).float().sum() for x in xs).backward()
            return [t.grad for x in xs for t in x]

        def ours_fwd(qkv):
            with torch.no_grad():
                return ring_torch.dilated_attention(*qkv, **kw)

        def ours_both(qkv):
            xs = [t.detach().requires_grad_() for t in qkv]
            ring_torch.dilated_attention(*xs, **kw).float().sum().backward()
            return [t.grad for t in xs]

        sweep.add(**_row(n, time_ms(floor_fwd, rows, repeats=10), time_ms(floor_both, rows, repeats=10),
                         time_ms(ours_fwd, qkv, repeats=10), time_ms(ours_both, qkv, repeats=10)))
        del rows, qkv


def _row(n, floor_fwd, floor_both, ours_fwd, ours_both):
    return {"n": n, "floor_fwd_ms": floor_fwd, "floor_fwdbwd_ms": floor_both, "ours_fwd_ms": ours_fwd,
            "ours_fwdbwd_ms": ours_both, "ratio_fwd": ours_fwd / floor_fwd, "ratio_fwdbwd": ours_both / floor_both}


def run_jax(args):
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
        sweep.add(**_row(n, time_ms(floor_fwd, rows, repeats=10), time_ms(floor_both, rows, repeats=10),
                         time_ms(fwd, q, k, v, repeats=10), time_ms(both, q, k, v, repeats=10)))
        del rows, q, k, v


if __name__ == "__main__":
    main()
