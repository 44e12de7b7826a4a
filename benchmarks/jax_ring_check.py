"""The JAX ring on the available accelerator(s): equality with the single-device result in
float32/bfloat16, and time per call, for the simulated ring (``ring_size``) and, when several
devices are present, the sharded ring.

    python -m benchmarks.jax_ring_check --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import ring_jax
from benchmarks.timing import time_ms

W, R = (2048, 4096, 8192, 16384), (1, 2, 4, 8)  # the LongNet-like pattern of the anchors


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fin = np.isfinite(b)
    return float(np.linalg.norm(a[fin] - b[fin]) / np.linalg.norm(b[fin]))


def fwd_bwd(fn):
    """``(out, lse, dq, dk, dv)`` of ``sum(out * g)`` with a fixed random cotangent."""

    def run(q, k, v, g):
        (out, lse), vjp = jax.vjp(fn, q, k, v)
        return (out, lse, *vjp((g, jnp.zeros_like(lse))))

    return jax.jit(run)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    # float32 comparisons at full float32 matmul precision (XLA's GPU default is TF32).
    jax.config.update("jax_default_matmul_precision", "highest")
    n, h, d = args.n, args.heads, args.head_dim
    rows = []
    ndev = len(jax.devices())
    jobs = [(dt, mix, rs) for dt in ("float32", "bfloat16") for mix in ("head_groups", "longnet")
            for rs in (1, 2, 4, 8)]
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    for dtype, mix, ring_size in tqdm(jobs, desc="jax ring"):
        kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True)
        q, k, v, g = (jax.random.normal(key, (1, n, h, d), jnp.float32) for key in keys)
        ref = fwd_bwd(lambda q, k, v: ring_jax.dilated_attention(q, k, v, return_lse=True, **kw))(q, k, v, g)
        cast = [x.astype(dtype) for x in (q, k, v, g)]
        fn = lambda q, k, v: ring_jax.dilated_attention(q, k, v, return_lse=True, ring_size=ring_size, **kw)  # noqa: E731
        got = fwd_bwd(fn)(*cast)
        fwd = jax.jit(fn)
        rows.append(dict(
            dtype=dtype, mix=mix, ring_size=ring_size, n=n, heads=h, head_dim=d, causal=True,
            rel_err_vs_fp32_single={name: rel(a, b) for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref)},
            fwd_ms=time_ms(fwd, *cast[:3]), fwdbwd_ms=time_ms(fwd_bwd(fn), *cast),
        ))
        tqdm.write(json.dumps(rows[-1]))
    if ndev > 1:
        mesh = jax.make_mesh((ndev,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,))
        for mix in ("head_groups", "longnet"):
            kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True)
            q, k, v, g = (jax.random.normal(key, (1, n, h, d), jnp.bfloat16) for key in keys)
            fn = lambda q, k, v: ring_jax.sharded_dilated_attention(q, k, v, mesh=mesh, return_lse=True, **kw)  # noqa: E731
            single = fwd_bwd(lambda q, k, v: ring_jax.dilated_attention(q, k, v, return_lse=True, **kw))(q, k, v, g)
            got = fwd_bwd(fn)(q, k, v, g)
            rows.append(dict(dtype="bfloat16", mix=mix, devices=ndev, n=n,
                             rel_err_vs_single={nm: rel(a, b) for nm, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, single)},
                             fwd_ms=time_ms(jax.jit(fn), q, k, v), fwdbwd_ms=time_ms(fwd_bwd(fn), q, k, v, g)))
    meta = dict(device=str(jax.devices()[0].device_kind), num_devices=ndev, jax=jax.__version__,
                python=platform.python_version(), segment_lengths=W, dilation_rates=R)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
