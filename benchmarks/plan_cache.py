"""Plan/mask caching: first call vs cached call, in both frameworks, on the default device.

JAX: the first call of a jitted function traces (building the static plan once) and compiles;
later calls at that shape run the compiled program and build nothing (``ring_jax.build_count``).
torch: the first call at a shape builds the plan and index tensors (cache misses); later calls
hit the caches (``ring_torch.get_stats``).

    python -m benchmarks.plan_cache [--n 4096] [--out plan_cache.json]
"""

from __future__ import annotations

import argparse
import json

from benchmarks.timing import first_call_ms, time_ms

W, R = (256, 512, 1024, 2048), (1, 2, 4, 8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--out")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import torch

    import ring_jax
    import ring_torch

    kw = dict(segment_lengths=W, dilation_rates=R, is_causal=True)
    rows = []
    for mix in ("head_groups", "longnet"):
        x = jax.random.normal(jax.random.PRNGKey(0), (1, args.n, 8, 64), jnp.float32)
        f = jax.jit(lambda q: ring_jax.dilated_attention(q, q, q, mix=mix, **kw))
        builds = ring_jax.build_count()
        first = first_call_ms(f, x)
        cached = time_ms(f, x)
        rows.append(dict(framework="jax", mix=mix, n=args.n, first_call_ms=first, cached_call_ms=cached,
                         ratio=first / cached, plan_builds=ring_jax.build_count() - builds))
        t = torch.randn(1, args.n, 8, 64)
        with torch.no_grad():
            before = ring_torch.get_stats()["pattern"]
            first = first_call_ms(lambda q: ring_torch.dilated_attention(q, q, q, mix=mix, **kw), t)
            cached = time_ms(lambda q: ring_torch.dilated_attention(q, q, q, mix=mix, **kw), t)
            after = ring_torch.get_stats()["pattern"]
        rows.append(dict(framework="torch", mix=mix, n=args.n, first_call_ms=first, cached_call_ms=cached,
                         ratio=first / cached, cache_misses=after["misses"] - before["misses"],
                         cache_hits=after["hits"] - before["hits"]))
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=str(jax.devices()[0]), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
