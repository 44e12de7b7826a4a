"""The xformers backend against backend ``torch`` on one GPU, in one process: forward and
forward+backward time, and how far their outputs and gradients are apart.

bf16, b=1, h=8, d=64, causal, w=(2048, 4096, 8192, 16384), r=(1, 2, 4, 8) (the anchors' pattern),
both mixes; fwd+bwd is ``out.backward(dout)`` with respect to separate q, k, v. Needs an xformers
build that runs on this torch (``bash benchmarks/xformers_check.sh`` builds one from the sdist).

    python -m benchmarks.xformers_check --out xformers.json [--n 65536,1048576]
"""

from __future__ import annotations

import argparse

from benchmarks.gpu_sweep import D, H, R, W
from benchmarks.timing import Sweep, time_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", default="65536,1048576")
    ap.add_argument("--mixes", default="head_groups,longnet")
    ap.add_argument("--budget-s", type=float, default=240)
    args = ap.parse_args()
    import torch

    import ring_torch
    from ring_torch._kernels import xformers_available

    import xformers

    dev = torch.device("cuda")
    sweep = Sweep(args.out, args.budget_s, dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__,
                                                 xformers=xformers.__version__, available=xformers_available(),
                                                 heads=H, head_dim=D, segment_lengths=W, dilation_rates=R))
    gen = torch.Generator(device=dev).manual_seed(0)
    for n in (int(x) for x in args.n.split(",")):
        for mix in args.mixes.split(","):
            kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True)
            qkv = [torch.randn(1, n, H, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3)]
            dout = torch.randn(1, n, H, D, device=dev, dtype=torch.bfloat16, generator=gen)

            def fwd(backend, qkv=qkv, kw=kw):
                with torch.no_grad():
                    return ring_torch.dilated_attention(*qkv, backend=backend, **kw)

            def fwd_bwd(backend, qkv=qkv, dout=dout, kw=kw):
                xs = [x.detach().requires_grad_() for x in qkv]
                out = ring_torch.dilated_attention(*xs, backend=backend, **kw)
                out.backward(dout)
                return [out.detach()] + [x.grad for x in xs]

            ref = fwd_bwd("torch")
            for backend in ("torch", "xformers"):
                if not sweep.left():
                    return
                row = dict(n=n, mix=mix, backend=backend)
                try:
                    got = fwd_bwd(backend)
                    row["rel_vs_torch"] = {name: float((a.float() - b.float()).norm() / b.float().norm())
                                           for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
                    row["fwd_ms"] = time_ms(fwd, backend)
                    row["fwdbwd_ms"] = time_ms(fwd_bwd, backend)
                except Exception as e:  # noqa: BLE001 -- a failing backend is a result
                    row["error"] = type(e).__name__ + ": " + str(e)[:300]
                sweep.add(**row)


if __name__ == "__main__":
    main()
