"""torch single-device layer, forward+backward: peak memory above the inputs and time, with each
unit's backward in row blocks (``ring_torch._dilated_grads.BACKWARD_BLOCK_BYTES``, the default) and
with whole units (the budget unbounded), alternating in one process.

bf16, batch 1, h=8, d=64, causal, w=(2048, 4096, 8192, 16384), r=(1, 2, 4, 8); the backward of
``out.backward(ones)`` as in ``benchmarks.kernel_table`` (whose memory column this is).

    python -m benchmarks.torch_backward_blocks --out benchmarks/results/torch_backward_blocks.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/torch_backward_blocks.json")
    ap.add_argument("--sizes", default="262144,1048576,4194304")
    ap.add_argument("--mixes", default="head_groups,longnet")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budgets-mib", default="", help="extra block budgets to compare, MiB, comma-separated")
    args = ap.parse_args()

    import torch

    import ring_torch._dilated_grads as dilated
    from benchmarks._floors import torch_layer
    from benchmarks.kernel_table import torch_peak

    dev = torch.device("cuda")
    budgets = {"blocks": dilated.BACKWARD_BLOCK_BYTES, "whole_units": 1 << 62}
    budgets.update({f"blocks_{mib}mib": int(mib) << 20 for mib in filter(None, args.budgets_mib.split(","))})
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        qkv = [torch.randn(1, n, 8, 64, device=dev, dtype=torch.bfloat16) for _ in range(3)]
        for mix in args.mixes.split(","):
            _, both = torch_layer(segment_lengths=(2048, 4096, 8192, 16384), dilation_rates=(1, 2, 4, 8),
                                  mix=mix, is_causal=True)
            for rep in range(2):
                for label, budget in budgets.items():
                    dilated.BACKWARD_BLOCK_BYTES = budget
                    peak = torch_peak(both, qkv, dev)
                    both(*qkv)
                    torch.cuda.synchronize(dev)
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        both(*qkv)
                    torch.cuda.synchronize(dev)
                    ms = (time.perf_counter() - t0) * 1e3 / args.steps
                    rows.append(dict(n=n, mix=mix, variant=label, rep=rep, peak_b_per_token=peak / n, fwd_bwd_ms=ms))
                    print(f"n={n} {mix:11s} {label:11s} rep {rep}: {peak / n:7.0f} B/token above inputs, "
                          f"fwd+bwd {ms:.3f} ms", flush=True)
        del qkv
        torch.cuda.empty_cache()
    dilated.BACKWARD_BLOCK_BYTES = budgets["blocks"]
    meta = dict(card=torch.cuda.get_device_name(dev), torch=torch.__version__, host=platform.node(),
                date=time.strftime("%Y-%m-%d"), block_bytes=budgets["blocks"],
                temps_per_q=dilated.BACKWARD_TEMPS_PER_Q, command="python -m benchmarks.torch_backward_blocks")
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
