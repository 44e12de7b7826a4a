"""Padding and any length: what ``seq_lengths`` and a length off the patterns' grid cost.

bf16, h=8, d=64, causal unless said, w=(2048, 4096, 8192, 16384), r=(1, 2, 4, 8), head groups; forward and
forward+backward (the backward of ``sum(out)``), milliseconds, in one process:

  (a) n = 1M (2^20), batch 1: ``seq_lengths`` all n vs no ``seq_lengths``;
  (b) n = 1,000,000 (padded inside to a length the patterns tile) vs n = 1,048,576;
  (c) batch 4 at n = 1M with lengths (1M, 700K, 300K, 10K) in one call vs the sum of four batch-1
      calls at n = 1M, 700K, 300K and 10K (each an exact length, no seq_lengths). torch twice:
      lengths on the device (one batched run) and on the host (a list: entry by entry);
  (d) as (b), not causal (keys past n must be masked: only a padded tail may need it).

``--small``: the same cases at tiny sizes, for a CPU check of the script. ``--ab-counts``: JAX
twice in the same process, as ``jax`` (cuDNN told each block's real rows) and ``jax_no_counts``
(``ring_jax._kernels._real_counts`` patched to None: cuDNN computes the padded tiles too).

    python -m benchmarks.padding --out benchmarks/results/padding.json      # a GPU
    python -m benchmarks.padding --small --out /tmp/padding_small.json      # CPU check

Each framework has a ``run_<framework>(cfg, args, rows)`` that appends one row per
(case, variant): ``framework``, ``case``, ``variant``, ``n``, ``batch``, ``lengths``, ``fwd_ms``,
``fwd_bwd_ms``.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

FULL = dict(w=(2048, 4096, 8192, 16384), r=(1, 2, 4, 8), h=8, d=64, n=1 << 20, n_odd=1_000_000,
            lengths=(1 << 20, 700_000, 300_000, 10_000))
SMALL = dict(w=(16, 32, 64, 128), r=(1, 2, 4, 8), h=8, d=64, n=4096, n_odd=4000, lengths=(4096, 2800, 1200, 40))


def cases(cfg):
    """``(case, variant, batch, n, lengths or None, causal)`` of every measurement."""
    n, lengths = cfg["n"], tuple(cfg["lengths"])
    yield "a", "seq_lengths_all_n", 1, n, (n,), True
    yield "a", "no_seq_lengths", 1, n, None, True
    yield "b", f"n={cfg['n_odd']}", 1, cfg["n_odd"], None, True
    yield "b", f"n={n}", 1, n, None, True
    yield "c", "batch_with_lengths", len(lengths), n, lengths, True
    for length in lengths:
        yield "c", f"single_n={length}", 1, length, None, True
    yield "d", f"n={cfg['n_odd']}", 1, cfg["n_odd"], None, False
    yield "d", f"n={n}", 1, n, None, False


def summarize(rows) -> dict:
    """Per framework: (a) lengths / none, (b) odd n / 2^k n, (c) batch / sum of singles (fwd, fwd+bwd)."""
    out = {}
    for fw in sorted({r["framework"] for r in rows}):
        by = {(r["case"], r["variant"]): r for r in rows if r["framework"] == fw}

        def ratio(a, b, field):
            return by[a][field] / by[b][field] if a in by and b in by and by[b][field] else None

        singles = [r for (c, v), r in by.items() if c == "c" and v.startswith("single")]
        batch = by.get(("c", "batch_with_lengths"))
        n = next((r["n"] for (c, v), r in by.items() if c == "a"), None)
        odd = next((k for k in by if k[0] == "b" and k[1] != f"n={n}"), None)
        odd_full = next((k for k in by if k[0] == "d" and k[1] != f"n={n}"), None)
        res = {}
        for field in ("fwd_ms", "fwd_bwd_ms"):
            res[field] = dict(
                a_lengths_over_none=ratio(("a", "seq_lengths_all_n"), ("a", "no_seq_lengths"), field),
                b_odd_over_pow2=ratio(odd, ("b", f"n={n}"), field) if odd else None,
                d_odd_over_pow2_not_causal=ratio(odd_full, ("d", f"n={n}"), field) if odd_full else None,
                c_batch_over_sum_of_singles=(batch[field] / sum(r[field] for r in singles)
                                             if batch and singles else None))
            host = by.get(("c", "batch_with_host_lengths"))
            if host and singles:
                res[field]["c_host_lengths_batch_over_sum_of_singles"] = host[field] / sum(r[field] for r in singles)
        out[fw] = res
    return out


def _timed(fn, args, steps: int, sync) -> float:
    """Milliseconds per call of ``fn(*args)`` after a compiling call and a warm-up call."""
    for _ in range(2):
        sync(fn(*args))
    t0 = time.perf_counter()
    for _ in range(steps):
        res = fn(*args)
    sync(res)
    return (time.perf_counter() - t0) * 1e3 / steps


def run_jax(cfg, args, rows, label="jax"):
    import jax
    import jax.numpy as jnp

    import ring_jax

    dt = jnp.dtype(args.dtype)
    kw = dict(segment_lengths=cfg["w"], dilation_rates=cfg["r"], mix=args.mix)

    def attention(q, k, v, lens, causal):
        return ring_jax.dilated_attention(q, k, v, seq_lengths=lens, is_causal=causal, **kw)

    def loss(q, k, v, lens, causal):
        return attention(q, k, v, lens, causal).astype(jnp.float32).sum()

    jitted = {causal: (jax.jit(functools.partial(attention, causal=causal)),
                       jax.jit(jax.grad(functools.partial(loss, causal=causal), argnums=(0, 1, 2))))
              for causal in (False, True)}
    for case, variant, b, n, lengths, causal in cases(cfg):
        fwd, fwd_bwd = jitted[causal]
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, (b, n, cfg["h"], cfg["d"]), dt) for key in keys)
        lens = None if lengths is None else jnp.asarray(lengths, jnp.int32)
        row = dict(framework=label, case=case, variant=variant, n=n, batch=b,
                   lengths=None if lengths is None else list(lengths))
        row["fwd_ms"] = _timed(fwd, (q, k, v, lens), args.steps, jax.block_until_ready)
        row["fwd_bwd_ms"] = _timed(fwd_bwd, (q, k, v, lens), args.steps, jax.block_until_ready)
        rows.append(row)
        print(f"{label}  {case} {variant:>24}  b={b} n={n}: fwd {row['fwd_ms']:.3f} ms, "
              f"fwd+bwd {row['fwd_bwd_ms']:.3f} ms", flush=True)
        del q, k, v


def _torch_ms(fn, steps: int, device) -> float:
    """Milliseconds per call of ``fn()`` after two warm-up calls: CUDA events around ``steps``
    calls on a GPU, the wall clock (calls are synchronous) elsewhere."""
    import torch

    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / steps


def run_torch(cfg, args, rows):
    """The cases of :func:`cases` through ``ring_torch.dilated_attention`` on ``args.device``
    (``seq_lengths`` a device tensor, and for (c) also a list; the backward of ``sum(out)`` in
    float32, as in JAX)."""
    import torch

    import ring_torch

    device, dt = torch.device(args.device), getattr(torch, args.dtype)
    points = []
    for case, variant, b, n, lengths, causal in cases(cfg):
        points.append((case, variant, b, n, lengths, causal,
                       None if lengths is None else torch.tensor(lengths, device=device)))
        if variant == "batch_with_lengths":
            points.append((case, "batch_with_host_lengths", b, n, lengths, causal, list(lengths)))
    for case, variant, b, n, lengths, causal, lens in points:
        kw = dict(segment_lengths=cfg["w"], dilation_rates=cfg["r"], mix=args.mix, is_causal=causal)
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, n, cfg["h"], cfg["d"], device=device, dtype=dt, generator=gen)
                   for _ in range(3))

        def fwd():
            with torch.no_grad():
                return ring_torch.dilated_attention(q, k, v, seq_lengths=lens, **kw)

        def fwd_bwd():
            xs = [x.detach().requires_grad_() for x in (q, k, v)]
            ring_torch.dilated_attention(*xs, seq_lengths=lens, **kw).float().sum().backward()

        row = dict(framework="torch", case=case, variant=variant, n=n, batch=b,
                   lengths=None if lengths is None else list(lengths))
        row["fwd_ms"] = _torch_ms(fwd, args.steps, device)
        row["fwd_bwd_ms"] = _torch_ms(fwd_bwd, args.steps, device)
        rows.append(row)
        print(f"torch {case} {variant:>24}  b={b} n={n}: fwd {row['fwd_ms']:.3f} ms, "
              f"fwd+bwd {row['fwd_bwd_ms']:.3f} ms", flush=True)
        del q, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/padding.json")
    ap.add_argument("--small", action="store_true", help="tiny sizes, for a CPU check of the script")
    ap.add_argument("--frameworks", default="jax,torch")
    ap.add_argument("--mix", default="head_groups", choices=("head_groups", "longnet"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=10, help="timed calls per point")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    ap.add_argument("--ab-counts", action="store_true", help="JAX with and without the blocks' real-row counts")
    args = ap.parse_args()
    cfg = SMALL if args.small else FULL
    rows, meta = [], dict(config={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                          dtype=args.dtype, mix=args.mix, causal="True except case d", steps=args.steps, host=platform.node())
    frameworks = args.frameworks.split(",")
    if "jax" in frameworks:
        import jax

        meta["jax"], meta["jax_devices"] = jax.__version__, [str(x) for x in jax.devices()]
        run_jax(cfg, args, rows)
        if args.ab_counts:
            from ring_jax import _kernels

            real_counts, _kernels._real_counts = _kernels._real_counts, lambda *args: None
            try:
                run_jax(cfg, args, rows, "jax_no_counts")
            finally:
                _kernels._real_counts = real_counts
    if "torch" in frameworks:
        import torch

        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        meta["torch"] = torch.__version__
        meta["torch_device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        run_torch(cfg, args, rows)
    summary = summarize(rows)
    print(json.dumps(summary, indent=1))
    with open(args.out, "w") as f:
        json.dump(dict(meta, summary=summary, results=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
