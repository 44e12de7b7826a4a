"""Cached decoding: time per decoded token and bytes held, dilated cache vs dense decoding.

The dilated cache (``ring_jax.init_cache`` / ``ring_torch.init_cache``) holds the current segment of
every pattern, so its size and the time of a one-token step do not depend on the context length;
dense decoding attends one query over a K/V cache of the whole context
(``jax.nn.dot_product_attention``, ``torch.nn.functional.scaled_dot_product_attention``), where it
fits in memory. The cache's state at context ``n`` is its position and its buffers, so the
dilated cache is put at position ``n`` with random buffers (no prefill is run); the dense cache is
random K/V of ``n`` tokens.

bf16, b=1, h=8, h_kv=8, d=64, w=(2048, 4096, 8192, 16384), r=(1, 2, 4, 8), head groups; contexts
16K, 1M, 16M. ``--small``: a CPU check at tiny sizes.

    python -m benchmarks.decode --out benchmarks/results/decode.json          # a GPU
    python -m benchmarks.decode --small --out /tmp/decode_small.json          # CPU check
"""

from __future__ import annotations

import argparse
import json
import platform
import time

FULL = dict(w=(2048, 4096, 8192, 16384), r=(1, 2, 4, 8), h=8, h_kv=8, d=64,
            contexts=(16384, 1 << 20, 1 << 24))
SMALL = dict(w=(16, 32, 64, 128), r=(1, 2, 4, 8), h=8, h_kv=8, d=64, contexts=(256, 4096, 65536))


def _time(step, state, steps: int, sync) -> tuple[float, object]:
    """Milliseconds per call of ``state = step(state)`` after two warm-up calls."""
    for _ in range(2):
        state = step(state)
    sync(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state = step(state)
    sync(state)
    return (time.perf_counter() - t0) * 1e3 / steps, state


def run_jax(cfg, args, rows):
    import jax
    import jax.numpy as jnp

    import ring_jax

    dt = jnp.dtype(args.dtype)
    b, h, h_kv, d = 1, cfg["h"], cfg["h_kv"], cfg["d"]
    key = jax.random.key(0)
    q = jax.random.normal(key, (b, 1, h, d), dt)
    k = jax.random.normal(jax.random.key(1), (b, 1, h_kv, d), dt)
    step = jax.jit(lambda q, k, v, cache: ring_jax.decode(q, k, v, cache), donate_argnums=3)

    def sync(state):
        jax.block_until_ready(state)

    for n in cfg["contexts"]:
        cache = ring_jax.init_cache(b, h, h_kv, d, cfg["w"], cfg["r"], mix=args.mix, dtype=dt)
        leaves, treedef = jax.tree.flatten(cache)
        bufs = [jax.random.normal(jax.random.key(i + 2), x.shape, dt) for i, x in enumerate(leaves[1:])]
        cache = jax.tree.unflatten(treedef, [jnp.int32(n)] + bufs)
        nbytes = cache.nbytes
        ms, cache = _time(lambda c: step(q, k, k, c)[1], cache, args.steps, sync)
        rows.append(dict(framework="jax", method="dilated_cache", context=n, ms_per_token=ms,
                         cache_bytes=nbytes))
        print(rows[-1], flush=True)
        dense_bytes = 2 * b * n * h_kv * d * dt.itemsize
        row = dict(framework="jax", method="dense", context=n, cache_bytes=dense_bytes)
        if dense_bytes > args.dense_limit_gb * 2**30:
            row["ms_per_token"] = None
            row["skipped"] = f"dense cache of {dense_bytes / 2**30:.1f} GiB over --dense-limit-gb"
        else:
            try:
                kc = jax.random.normal(jax.random.key(7), (b, n, h_kv, d), dt)
                vc = jax.random.normal(jax.random.key(8), (b, n, h_kv, d), dt)
                dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=args.jax_impl))
                ms, _ = _time(lambda out: dense(q, kc, vc), q, args.steps, sync)
                row["ms_per_token"] = ms
                del kc, vc
            except Exception as e:  # out of memory, or no such implementation here
                row["ms_per_token"], row["skipped"] = None, f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(row, flush=True)


def run_torch(cfg, args, rows):
    import torch
    import torch.nn.functional as F

    import ring_torch

    dev = torch.device(args.device)
    dt = getattr(torch, args.dtype)
    b, h, h_kv, d = 1, cfg["h"], cfg["h_kv"], cfg["d"]
    q = torch.randn(b, 1, h, d, device=dev, dtype=dt)
    k = torch.randn(b, 1, h_kv, d, device=dev, dtype=dt)

    def sync(_):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for n in cfg["contexts"]:
        cache = ring_torch.init_cache(b, h, h_kv, d, cfg["w"], cfg["r"], mix=args.mix, dtype=dt, device=dev)
        for x in (*cache.keys, *cache.values):
            x.normal_()
        cache.position = n
        ms, cache = _time(lambda c: ring_torch.decode(q, k, k, c)[1], cache, args.steps, sync)
        rows.append(dict(framework="torch", method="dilated_cache", context=n, ms_per_token=ms,
                         cache_bytes=cache.nbytes))
        print(rows[-1], flush=True)
        dense_bytes = 2 * b * n * h_kv * d * torch.finfo(dt).bits // 8
        row = dict(framework="torch", method="dense", context=n, cache_bytes=dense_bytes)
        if dense_bytes > args.dense_limit_gb * 2**30:
            row["ms_per_token"] = None
            row["skipped"] = f"dense cache of {dense_bytes / 2**30:.1f} GiB over --dense-limit-gb"
        else:
            try:
                kc = torch.randn(b, h_kv, n, d, device=dev, dtype=dt)  # [b, h, s, d]: SDPA's layout
                vc = torch.randn(b, h_kv, n, d, device=dev, dtype=dt)
                qt = q.transpose(1, 2)
                with torch.no_grad():
                    ms, _ = _time(lambda out: F.scaled_dot_product_attention(qt, kc, vc), qt, args.steps, sync)
                row["ms_per_token"] = ms
                del kc, vc
            except Exception as e:  # out of memory
                row["ms_per_token"], row["skipped"] = None, f"{type(e).__name__}: {str(e)[:200]}"
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(row, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/decode.json")
    ap.add_argument("--small", action="store_true", help="tiny sizes, for a CPU check of the script")
    ap.add_argument("--frameworks", default="jax,torch")
    ap.add_argument("--mix", default="head_groups", choices=("head_groups", "longnet"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=50, help="timed decode steps per point")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    ap.add_argument("--jax-impl", default=None, help="implementation= of jax.nn.dot_product_attention")
    ap.add_argument("--dense-limit-gb", type=float, default=64.0, help="skip dense caches larger than this")
    args = ap.parse_args()
    cfg = SMALL if args.small else FULL
    rows, meta = [], dict(config={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                          dtype=args.dtype, mix=args.mix, batch=1, steps=args.steps, host=platform.node())
    frameworks = args.frameworks.split(",")
    if "torch" in frameworks:
        import torch

        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        meta["torch"] = torch.__version__
        meta["torch_device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        run_torch(cfg, args, rows)
    if "jax" in frameworks:
        import jax

        meta["jax"], meta["jax_devices"] = jax.__version__, [str(x) for x in jax.devices()]
        run_jax(cfg, args, rows)
    with open(args.out, "w") as f:
        json.dump(dict(meta, results=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
