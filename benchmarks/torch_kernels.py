"""torch's CUDA attention kernels behind ``backend="torch"`` side by side, in one process: what
``ring_torch._kernels.cuda_kernel`` chooses from.

Two sections:

* ``kernel``: each adapter of :data:`ring_torch._kernels.CUDA_ATEN` (cuDNN, FlashAttention-2, the
  memory-efficient kernel) on one unit's strided rows (``[n/w, w, H, d]`` views of
  ``[1, n, h, d]`` tensors, ``w = 2048``, causal): forward, the backward from the rows' LSE
  (no LSE cotangent) and with an LSE cotangent (the widened exact-LSE column), per dtype and
  head_dim.
* ``layer``: ``ring_torch.dilated_attention`` (the anchors' pattern, bf16, h=8, d=64, causal,
  both mixes) with ``cuda_kernel`` forced to each kernel: forward and forward+backward, and the
  relative L2 difference of ``out``, ``dq``, ``dk``, ``dv`` from the flash kernel's.

    python -m benchmarks.torch_kernels --out h200_torch_kernels.json [--n 1048576]
"""

from __future__ import annotations

import argparse
import datetime
from unittest import mock

import torch

import ring_torch
import ring_torch._kernels as kernels
from benchmarks.gpu_sweep import D, H, R, W
from benchmarks.timing import Sweep, time_ms


def unit_views(n, h, d, dtype, w=2048):
    """q, k, v ``[n/w, w, h, d]`` rows of every other head (strided views), and ``dout``."""
    full = [torch.randn(1, n, 2 * h, d, device="cuda", dtype=dtype) for _ in range(4)]
    return [x[:, :, ::2].reshape(n // w, w, h, d) for x in full]


def kernel_rows(sweep, n, dtypes, head_dims, repeats):
    for dtype in dtypes:
        for d in head_dims:
            q, k, v, dout = unit_views(n, 2, d, dtype)
            for name, aten in kernels.CUDA_ATEN.items():
                row = dict(section="kernel", kernel=name, dtype=str(dtype), head_dim=d, n=n)
                try:
                    out, lse, _ = aten.forward(q, k, v, 0.125, True)
                    row["fwd_ms"] = time_ms(lambda: aten.forward(q, k, v, 0.125, True)[0], repeats=repeats)
                    for key, dlse in (("bwd_ms", None), ("bwd_dlse_ms", torch.randn_like(lse))):
                        row[key] = time_ms(lambda: kernels.fused_block_grads(
                            dout, q, k, v, out, lse, dlse, scale=0.125, is_causal=True, aten=aten), repeats=repeats)
                except Exception as e:  # a kernel that cannot take these inputs
                    row["error"] = repr(e)[:300]
                sweep.add(**row)
            del q, k, v, dout
            torch.cuda.empty_cache()


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def layer_rows(sweep, n, repeats):
    q, k, v, dout = (torch.randn(1, n, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for mix in ("head_groups", "longnet"):
        kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True)

        def both():
            xs = [x.detach().requires_grad_() for x in (q, k, v)]
            ring_torch.dilated_attention(*xs, **kw).backward(dout)
            return xs[0].grad

        results = {}
        for name in ("flash", "cudnn", "efficient"):
            with mock.patch.object(kernels, "cuda_kernel", lambda *a, name=name: name):
                fwd = time_ms(lambda: ring_torch.dilated_attention(q, k, v, **kw), repeats=repeats)
                row = dict(section="layer", kernel=name, mix=mix, n=n, fwd_ms=fwd, fwd_bwd_ms=time_ms(both, repeats=repeats))
                results[name] = [ring_torch.dilated_attention(q, k, v, **kw), *both()]
                # relative L2 difference of out, dq, dk, dv from the flash kernel's (same inputs)
                row["rel_diff_vs_flash"] = [_rel(a, b) for a, b in zip(results[name], results.get("flash", results[name]))]
                sweep.add(**row)
        del results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=1 << 20)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=300)
    args = ap.parse_args()
    sweep = Sweep(args.out, args.budget_s, dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
        date=datetime.date.today().isoformat(), command="python -m benchmarks.torch_kernels " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())))
    kernel_rows(sweep, args.n, (torch.bfloat16, torch.float16), (64, 128), args.repeats)
    layer_rows(sweep, args.n, args.repeats)


if __name__ == "__main__":
    main()
