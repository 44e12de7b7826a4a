"""The cuDNN block kernel on a GPU: exactness against the XLA kernel (float32 reference), with the
LSE cotangent, inside dilated attention and the simulated ring, then forward / forward+backward
time vs n. Rows are flushed to ``--out`` as they finish.

    python -m benchmarks.cudnn_check --out results.json [--budget-s 300]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import ring_jax
from benchmarks.gpu_sweep import D, H, R, W, new_sweep, rel
from benchmarks.timing import first_call_ms, time_ms


def grads_of(fn):
    """``(out, lse, dq, dk, dv)`` of ``sum(out * g) + sum(lse * gl)``; for an ``fn`` that returns
    ``out`` only (no LSE cotangent: the kernel's plain backward), ``(out, dq, dk, dv)``."""

    def run(q, k, v, g, gl):
        res, vjp = jax.vjp(fn, q, k, v)
        if not isinstance(res, tuple):
            return (res, *vjp(g.astype(res.dtype)))
        out, lse = res
        return (out, lse, *vjp((g.astype(out.dtype), gl)))

    return jax.jit(run)


def compare(sweep, name, fn, shape, kv_shape, **extra):
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    q = jax.random.normal(keys[0], shape, jnp.float32)
    k, v = (jax.random.normal(key, kv_shape, jnp.float32) for key in keys[1:3])
    g = jax.random.normal(keys[3], shape, jnp.float32)
    gl = jax.random.normal(keys[4], shape[:-1], jnp.float32)
    results = {}
    for kernel, dtype in (("xla", jnp.float32), ("xla", jnp.bfloat16), ("cudnn", jnp.bfloat16)):
        ring_jax.set_block_kernel(kernel)
        with jax.default_matmul_precision("highest" if dtype == jnp.float32 else "default"):
            results[kernel, dtype] = grads_of(fn)(q.astype(dtype), k.astype(dtype), v.astype(dtype), g, gl)
    ref = results["xla", jnp.float32]
    fields = ("out", "lse", "dq", "dk", "dv") if len(ref) == 5 else ("out", "dq", "dk", "dv")
    sweep.add(section="cudnn_parity", case=name, **extra,
              cudnn_bf16={f: rel(a, b) for f, a, b in zip(fields, results["cudnn", jnp.bfloat16], ref)},
              xla_bf16={f: rel(a, b) for f, a, b in zip(fields, results["xla", jnp.bfloat16], ref)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--parity-only", action="store_true", help="skip the timing sweep")
    args = ap.parse_args()
    sweep = new_sweep(args.out, args.budget_s)
    sweep.data["meta"].update(jax=jax.__version__, device=jax.devices()[0].device_kind)
    for causal in (False, True):
        compare(sweep, "block",
                lambda q, k, v, c=causal: ring_jax.block_attention(q, k, v, scale=D ** -0.5, is_causal=c),
                (8, 2048, 4, D), (8, 2048, 4, D), causal=causal)
    for mix in ("head_groups", "longnet"):
        for ring_size in (1, 4):
            kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True, ring_size=ring_size)
            compare(sweep, "dilated", lambda q, k, v, kw=kw: ring_jax.dilated_attention(q, k, v, return_lse=True, **kw),
                    (1, 16384, H, D), (1, 16384, H // 2, D), mix=mix, ring_size=ring_size)
        for chunk in (None, 4096 * 4):
            kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True, chunk_size=chunk)
            compare(sweep, "dilated_out_only", lambda q, k, v, kw=kw: ring_jax.dilated_attention(q, k, v, **kw),
                    (1, 65536, H, D), (1, 65536, H // 2, D), mix=mix, chunk_size=chunk)
    if args.parity_only:
        return
    ring_jax.set_block_kernel("cudnn")
    for mix in ("head_groups", "longnet"):
        kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True)
        fwd = jax.jit(lambda q: ring_jax.dilated_attention(q, q, q, **kw))
        both = jax.jit(jax.grad(lambda q: ring_jax.dilated_attention(q, q, q, **kw).astype(jnp.float32).sum()))
        for n in [2 ** p for p in range(14, 22)]:  # 16K .. 2M
            if not sweep.left():
                return
            q = jax.random.normal(jax.random.PRNGKey(0), (1, n, H, D), jnp.bfloat16)
            plan = ring_jax.get_plan(ring_jax.DilatedConfig(W, R, mix, True), n, H, H)
            try:
                first = first_call_ms(fwd, q)
                f_ms, b_ms = time_ms(fwd, q, repeats=5), time_ms(both, q, repeats=5)
            except Exception as e:  # noqa: BLE001 -- out of memory ends this mix's sweep, recorded
                sweep.add(section="scaling_cudnn", mix=mix, n=n, error=type(e).__name__ + ": " + str(e)[:160])
                break
            sweep.add(section="scaling_cudnn", mix=mix, n=n, fwd_ms=f_ms, fwdbwd_ms=b_ms, first_call_ms=first,
                      fwd_tflops=plan.flops(1, D) / f_ms / 1e9)


if __name__ == "__main__":
    main()
