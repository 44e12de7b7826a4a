"""torch ``dilated_attention`` on one GPU: forward and forward+backward time and peak memory vs n,
for this ``ring_torch`` and optionally another copy (``--baseline``, importable under that name,
e.g. the previous commit), in one process for an A/B on one card; gradient error of each against
this one's float32-input run.

bf16, b=1, h=8, d=64, causal, w=(2K, 4K, 8K, 16K), r=(1, 2, 4, 8) (the anchors' pattern), separate
q, k, v; forward+backward is ``out.backward(dout)``. Rows stop once ``--budget-s`` is spent.

    python -m benchmarks.torch_single --out torch_single.json [--baseline ring_torch_base]
"""

from __future__ import annotations

import argparse
import importlib

from benchmarks.gpu_sweep import D, H, R, W  # the anchors' pattern
from benchmarks.timing import Sweep, time_ms

K = 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--n", default=",".join(str(x * K) for x in (16, 64, 256, 1024)))
    ap.add_argument("--mixes", default="head_groups,longnet")
    ap.add_argument("--budget-s", type=float, default=300)
    args = ap.parse_args()
    import torch

    modules = {"ring_torch": importlib.import_module("ring_torch")}
    if args.baseline:
        modules[args.baseline] = importlib.import_module(args.baseline)
    dev = torch.device("cuda")
    sweep = Sweep(args.out, args.budget_s, dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__,
                                                 heads=H, head_dim=D, segment_lengths=W, dilation_rates=R))
    gen = torch.Generator(device=dev).manual_seed(0)
    for n in (int(x) for x in args.n.split(",")):
        for mix in args.mixes.split(","):
            kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True)
            qkv = [torch.randn(1, n, H, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3)]
            dout = torch.randn(1, n, H, D, device=dev, dtype=torch.bfloat16, generator=gen)

            def fwd_bwd(module, dtype=torch.bfloat16, qkv=qkv, dout=dout, kw=kw):
                xs = [x.detach().to(dtype).requires_grad_() for x in qkv]  # fresh leaves: no grad accumulation
                module.dilated_attention(*xs, **kw).backward(dout.to(dtype))
                return [x.grad for x in xs]

            ref = None
            if n <= 256 * K:  # float32 inputs: the error yardstick (the same module, fp32 kernel)
                ref = [g.float() for g in fwd_bwd(modules["ring_torch"], torch.float32)]
            for name, module in modules.items():
                if not sweep.left():
                    return
                err = None
                if ref is not None:
                    got = fwd_bwd(module)
                    err = max(((a.float() - b).norm() / b.norm()).item() for a, b in zip(got, ref))
                    del got
                row = dict(impl=name, n=n, mix=mix, grad_rel_err_vs_fp32=err)
                try:
                    with torch.no_grad():
                        row["fwd_ms"] = time_ms(lambda m=module, x=qkv, kw=kw: m.dilated_attention(*x, **kw), repeats=5)
                    torch.cuda.reset_peak_memory_stats(dev)
                    base = torch.cuda.memory_allocated(dev)
                    row["fwdbwd_ms"] = time_ms(lambda m=module: fwd_bwd(m), repeats=5)
                    row["fwdbwd_peak_bytes_per_token"] = (torch.cuda.max_memory_allocated(dev) - base) / n
                except torch.OutOfMemoryError:
                    row["oom"] = True
                torch.cuda.empty_cache()
                sweep.add(**row)


if __name__ == "__main__":
    main()
