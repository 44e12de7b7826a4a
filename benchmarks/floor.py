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

from benchmarks._floors import jax_floor, jax_rows, torch_floor, torch_layer, torch_rows, unit_shapes
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

    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    sweep = Sweep(args.out, args.budget_s, {"device": name, "torch": torch.__version__,
                                            "heads": H, "head_dim": D, "segment_lengths": W, "dilation_rates": R})
    floor_fwd, floor_both = torch_floor()
    ours_fwd, ours_both = torch_layer(segment_lengths=W, dilation_rates=R, mix="head_groups", is_causal=True)
    for n in (int(x) for x in args.n.split(",")):
        if not sweep.left():
            return
        rows = torch_rows(unit_shapes(n, "head_groups", W, R, H), D, dev)  # [S, H, m, d] each
        qkv = [torch.randn(1, n, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3)]
        sweep.add(**_row(n, time_ms(floor_fwd, rows, repeats=10), time_ms(floor_both, rows, repeats=10),
                         time_ms(ours_fwd, *qkv, repeats=10), time_ms(ours_both, *qkv, repeats=10)))
        del rows, qkv


def _row(n, floor_fwd, floor_both, ours_fwd, ours_both):
    return {"n": n, "floor_fwd_ms": floor_fwd, "floor_fwdbwd_ms": floor_both, "ours_fwd_ms": ours_fwd,
            "ours_fwdbwd_ms": ours_both, "ratio_fwd": ours_fwd / floor_fwd, "ratio_fwdbwd": ours_both / floor_both}


def run_jax(args):
    import jax

    import ring_jax

    sweep = Sweep(args.out, args.budget_s, {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                                            "heads": H, "head_dim": D, "segment_lengths": W, "dilation_rates": R})
    floor_fwd, floor_both = jax_floor(None if args.implementation == "none" else args.implementation)
    fwd, both = programs(ring_jax, "head_groups", None)
    for n in (int(x) for x in args.n.split(",")):
        if not sweep.left():
            return
        rows = jax_rows(unit_shapes(n, "head_groups", W, R, H), D)  # [S, m, H, d] each
        q, k, v = inputs(n)
        sweep.add(**_row(n, time_ms(floor_fwd, rows, repeats=10), time_ms(floor_both, rows, repeats=10),
                         time_ms(fwd, q, k, v, repeats=10), time_ms(both, q, k, v, repeats=10)))
        del rows, q, k, v


if __name__ == "__main__":
    main()
