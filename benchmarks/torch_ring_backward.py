"""The torch simulated ring (``ring_size``) on one GPU: forward+backward time and errors against
the single-device layer, for this ``ring_torch`` and optionally another copy (``--baseline``,
importable under that name), in one process for an A/B on one card.

bf16, b=1, h=10, d=64, causal, w=(2K, 4K, 8K, 16K, n), r=(1, 2, 4, 8, n/16K): with
``ring_size=4`` the patterns longer than n/4 span ring blocks, so the ring backward runs.

    python -m benchmarks.torch_ring_backward --out ring.json [--baseline ring_torch_base]
"""

from __future__ import annotations

import argparse
import importlib

from benchmarks.ring_scaling import pattern
from benchmarks.timing import emit, time_ms

H, D = 10, 64


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--n", default="65536,262144")
    ap.add_argument("--ring-size", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    import torch

    modules = {"ring_torch": importlib.import_module("ring_torch")}
    if args.baseline:
        modules[args.baseline] = importlib.import_module(args.baseline)
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows = [dict(device=name, torch=torch.__version__, ring_size=args.ring_size)]
    gen = torch.Generator(device=dev).manual_seed(0)
    for n in (int(x) for x in args.n.split(",")):
        for mix in ("head_groups", "longnet"):
            kw = dict(pattern(n), mix=mix)
            qkv = [torch.randn(1, n, H, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3)]
            dout = torch.randn(1, n, H, D, device=dev, dtype=torch.bfloat16, generator=gen)

            def fwd_bwd(module, ring_size, qkv=qkv, dout=dout, kw=kw):
                xs = [x.detach().requires_grad_() for x in qkv]
                module.ring_dilated_attention(*xs, ring_size=ring_size, **kw).backward(dout)
                return [x.grad for x in xs]

            single = [g.float() for g in fwd_bwd(modules["ring_torch"], None)]
            for name, module in modules.items():
                got = fwd_bwd(module, args.ring_size)
                err = max(((a.float() - b).norm() / b.norm()).item() for a, b in zip(got, single))
                row = dict(impl=name, n=n, mix=mix, max_rel_err_vs_single=err,
                           ring_fwdbwd_ms=time_ms(lambda m=module: fwd_bwd(m, args.ring_size), repeats=5))
                rows.append(row)
                emit(row, rows, args.out)


if __name__ == "__main__":
    main()
