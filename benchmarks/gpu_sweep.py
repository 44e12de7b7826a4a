"""One GPU sweep, written for a short lease: every finished row is flushed to ``--out`` at once.

Sections (each skipped once ``--budget-s`` is spent):

* ``jax_ring``: ``ring_size`` (simulated ring) vs the single-device result, float32 and bfloat16,
  both mixes, and time per call (forward, forward+backward);
* ``torch_ring``: the same for ``ring_torch`` (simulated ring on the CUDA backend) at two lengths;
* ``scaling``: forward and forward+backward time vs n for both frameworks, bf16, head groups,
  causal, next to the plan's FLOPs (achieved TFLOP/s).

    python -m benchmarks.gpu_sweep --out results.json [--budget-s 480]
"""

from __future__ import annotations

import argparse
import platform

import numpy as np

from benchmarks.timing import Sweep, first_call_ms, time_ms

W, R = (2048, 4096, 8192, 16384), (1, 2, 4, 8)  # the anchors' LongNet-like pattern
H, D = 8, 64


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fin = np.isfinite(b)
    return float(np.linalg.norm(a[fin] - b[fin]) / np.linalg.norm(b[fin]))


def new_sweep(out, budget_s) -> Sweep:
    return Sweep(out, budget_s, dict(python=platform.python_version(), pattern=dict(w=W, r=R, heads=H, head_dim=D)))


def jax_sections(sweep: Sweep, n_ring: int, n_scaling):
    import jax
    import jax.numpy as jnp

    import ring_jax

    sweep.data["meta"].update(jax=jax.__version__, device=jax.devices()[0].device_kind)

    def fwd_bwd(fn):
        def run(q, k, v, g):
            (out, lse), vjp = jax.vjp(fn, q, k, v)
            return (out, lse, *vjp((g, jnp.zeros_like(lse))))

        return jax.jit(run)

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    base = [jax.random.normal(key, (1, n_ring, H, D), jnp.float32) for key in keys]
    for mix in ("head_groups", "longnet"):
        kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True)
        with jax.default_matmul_precision("highest"):  # XLA's GPU default for float32 is TF32
            ref = fwd_bwd(lambda q, k, v: ring_jax.dilated_attention(q, k, v, return_lse=True, **kw))(*base)
        for dtype in ("float32", "bfloat16"):
            for ring_size in (1, 4):
                if not sweep.left():
                    return
                args = [x.astype(dtype) for x in base]
                fn = lambda q, k, v: ring_jax.dilated_attention(q, k, v, return_lse=True, ring_size=ring_size, **kw)  # noqa: E731
                step = fwd_bwd(fn)
                with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
                    got = step(*args)
                    sweep.add(section="jax_ring", dtype=dtype, mix=mix, ring_size=ring_size, n=n_ring,
                              rel_err_vs_fp32_single={k: rel(a, b) for k, a, b in
                                                      zip(("out", "lse", "dq", "dk", "dv"), got, ref)},
                              fwdbwd_ms=time_ms(step, *args, repeats=5))
    kw = dict(segment_lengths=W, dilation_rates=R, is_causal=True)
    fwd = jax.jit(lambda q, k, v: ring_jax.dilated_attention(q, k, v, **kw))
    both = jax.jit(jax.grad(lambda q, k, v: ring_jax.dilated_attention(q, k, v, **kw).astype(jnp.float32).sum(),
                            argnums=(0, 1, 2)))
    for n in n_scaling:
        if not sweep.left():
            return
        q = jax.random.normal(keys[0], (1, n, H, D), jnp.bfloat16)
        plan = ring_jax.get_plan(ring_jax.DilatedConfig(W, R, is_causal=True), n, H, H)
        try:
            first = first_call_ms(fwd, q, q, q)
            f_ms, b_ms = time_ms(fwd, q, q, q, repeats=5), time_ms(both, q, q, q, repeats=5)
        except Exception as e:  # noqa: BLE001 -- out of memory ends the sweep, recorded
            sweep.add(section="scaling", framework="jax", n=n, error=type(e).__name__ + ": " + str(e)[:200])
            return
        sweep.add(section="scaling", framework="jax", n=n, fwd_ms=f_ms, fwdbwd_ms=b_ms, first_call_ms=first,
                  flops=plan.flops(1, D), fwd_tflops=plan.flops(1, D) / f_ms / 1e9)


def torch_sections(sweep: Sweep, n_ring_list, n_scaling):
    import torch

    import ring_torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sweep.data["meta"].update(torch=torch.__version__,
                              torch_device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(n, dtype):
        return torch.randn(1, n, H, D, device=device, dtype=dtype, generator=gen)

    def fwd_bwd(module, q, k, v, g):
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        out, lse = module(q, k, v, is_causal=True, return_lse=True)
        out.backward(g)
        return out, lse, q.grad, k.grad, v.grad

    for n in n_ring_list:
        for mix in ("head_groups", "longnet"):
            base = [rand(n, torch.float32) for _ in range(4)]
            single = ring_torch.RingDilatedAttention(W, R, mix=mix, backend="math")
            ref = [x.detach().double().cpu() for x in fwd_bwd(single, *(x.double() for x in base))]
            for dtype in (torch.float32, torch.bfloat16):
                for ring_size in (1, 4):
                    if not sweep.left():
                        return
                    module = ring_torch.RingDilatedAttention(W, R, mix=mix, ring_size=ring_size)
                    args = [x.to(dtype) for x in base]
                    got = fwd_bwd(module, *args)

                    def forward(q, k, v, module=module):
                        with torch.no_grad():
                            return module(q, k, v, is_causal=True)

                    sweep.add(section="torch_ring", dtype=str(dtype), mix=mix, ring_size=ring_size, n=n,
                              rel_err_vs_fp64_single={k: rel(a.detach().double().cpu(), b) for k, a, b in
                                                      zip(("out", "lse", "dq", "dk", "dv"), got, ref)},
                              fwd_ms=time_ms(forward, *args[:3], repeats=5),
                              fwdbwd_ms=time_ms(lambda *a: fwd_bwd(module, *a), *args, repeats=5))
    module = ring_torch.RingDilatedAttention(W, R)
    for n in n_scaling:
        if not sweep.left():
            return
        q = rand(n, torch.bfloat16)
        try:
            with torch.no_grad():
                f_ms = time_ms(lambda q: module(q, q, q, is_causal=True), q, repeats=5)
            b_ms = time_ms(lambda q, g: fwd_bwd(module, q, q, q, g), q, q, repeats=5)
        except torch.OutOfMemoryError as e:
            sweep.add(section="scaling", framework="torch", n=n, error=str(e)[:200])
            return
        flops = ring_torch.plan_flops(batch=1, seq_len=n, num_heads=H, head_dim=D, segment_lengths=W,
                                      dilation_rates=R, is_causal=True)
        sweep.add(section="scaling", framework="torch", n=n, fwd_ms=f_ms, fwdbwd_ms=b_ms, flops=flops,
                  fwd_tflops=flops / f_ms / 1e9, stats=ring_torch.get_stats())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--sections", default="jax,torch")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU check of the script)")
    args = ap.parse_args()
    sweep = new_sweep(args.out, args.budget_s)
    if args.smoke:
        global W
        W = (64, 128, 256, 512)
        ring_lengths, scaling = (1024,), [512, 1024]
    else:
        ring_lengths, scaling = (16384, 65536), [2 ** k for k in range(14, 20)]  # 16K .. 512K
    if "jax" in args.sections.split(","):
        jax_sections(sweep, ring_lengths[0], scaling)
    if "torch" in args.sections.split(","):
        torch_sections(sweep, ring_lengths, scaling)
    if "torch_scaling" in args.sections.split(","):  # the scaling part alone
        torch_sections(sweep, (), scaling)


if __name__ == "__main__":
    main()
