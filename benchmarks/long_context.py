"""Long sequences on one GPU: time and memory of the JAX path vs n, with and without ``chunk_size``,
and the longest forward+backward that fits. Every finished row is flushed to ``--out`` at once.

Sections (``--sections``, comma-separated; each stops once ``--budget-s`` is spent):

* ``ab``: forward and forward+backward time and compiled memory at n = 16K .. 2M for both mixes,
  one pass vs ``chunk_size`` (and ``--baseline``, another copy of ``ring_jax`` importable under
  that name, e.g. the previous commit, measured in the same process for an A/B on one card);
* ``memory``: compiled memory only (nothing runs) vs n up to 16M, bytes per token beside the
  7 * 2 * h * d bytes per token of q, k, v, o, dq, dk, dv;
* ``max_n``: chunked forward+backward at growing n until the device runs out of memory,
  with the device's peak bytes in use (inputs from a fused generator: no allocator holes).

bf16, b=1, h=8, d=64, causal, w=(2K, 4K, 8K, 16K), r=(1, 2, 4, 8); forward+backward is
``grad(sum(out))`` with respect to separate q, k, v.

    python -m benchmarks.long_context --out results.json [--sections ab,memory,max_n] [--budget-s 400]
"""

from __future__ import annotations

import argparse
import importlib
import platform

from benchmarks.gpu_sweep import D, H, R, W  # the anchors' pattern
from benchmarks.timing import Sweep, time_ms

K = 1024


def programs(module, mix, chunk):
    import jax
    import jax.numpy as jnp

    kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True)
    if chunk is not None:
        kw["chunk_size"] = chunk
    attend = lambda q, k, v: module.dilated_attention(q, k, v, **kw)  # noqa: E731
    fwd = jax.jit(attend)
    both = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
    return fwd, both


def memory(fn, n, **extra):
    """Compiled bytes per token: arguments, outputs and XLA temporaries (peak = their sum)."""
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((1, n, H, D), jnp.bfloat16)
    m = fn.lower(x, x, x).compile().memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return dict(arg_b_per_tok=m.argument_size_in_bytes / n, out_b_per_tok=m.output_size_in_bytes / n,
                temp_b_per_tok=m.temp_size_in_bytes / n, total_b_per_tok=total / n, **extra)


def inputs(n):
    import jax
    import jax.numpy as jnp

    make = jax.jit(lambda key: jax.random.normal(key, (1, n, H, D), jnp.bfloat16))
    return [make(key) for key in jax.random.split(jax.random.PRNGKey(0), 3)]


def fused_inputs(n):
    """q, k, v from one fused elementwise kernel each (no temporaries, so no allocator holes
    before the largest runs); values in [-1, 1]."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def make(phase):
        pos, head, dim = (lax.broadcasted_iota(jnp.float32, (1, n, H, D), a) for a in (1, 2, 3))
        return jnp.sin(0.37 * pos + 1.3 * head + 0.71 * dim + phase).astype(jnp.bfloat16)

    return [jax.jit(make)(float(p)) for p in range(3)]


def chunk_for(n, chunk):
    return None if chunk is None or chunk >= n else chunk


def section_ab(rows, modules, lengths, chunks):
    import ring_jax

    for n in lengths:
        q, k, v = inputs(n)
        for mix in ("head_groups", "longnet"):
            flops = ring_jax.get_plan(ring_jax.DilatedConfig(W, R, mix, True), n, H, H).flops(1, D)
            for name, module in modules.items():
                # chunks >= n are one pass: each distinct setting once
                for chunk in dict.fromkeys(chunk_for(n, c) for c in (chunks if name == "ring_jax" else (None,))):
                    if not rows.left():
                        return
                    fwd, both = programs(module, mix, chunk)
                    row = dict(section="ab", impl=name, mix=mix, n=n, chunk=chunk, flops=flops)
                    try:
                        row.update(memory(both, n))
                        row["fwd_ms"] = time_ms(fwd, q, k, v, repeats=5)
                        row["fwdbwd_ms"] = time_ms(both, q, k, v, repeats=5)
                    except Exception as e:  # noqa: BLE001 -- out of memory is a result
                        row["error"] = type(e).__name__ + ": " + str(e)[:300]
                    rows.add(**row)
        del q, k, v


def section_memory(rows, lengths, chunk):
    import ring_jax

    for n in lengths:
        for mix in ("head_groups", "longnet"):
            for c in dict.fromkeys((None, chunk_for(n, chunk))):
                if not rows.left():
                    return
                if c is None and n > 4 * 2 ** 20:
                    continue  # one pass is long out of memory here; compiling it only costs time
                row = dict(section="memory", mix=mix, n=n, chunk=c, qkvo_grads_b_per_tok=7 * 2 * H * D)
                try:
                    row.update(memory(programs(ring_jax, mix, c)[1], n))
                except Exception as e:  # noqa: BLE001
                    row["error"] = type(e).__name__ + ": " + str(e)[:300]
                rows.add(**row)


def section_max_n(rows, lengths, chunk, mixes):
    import jax

    import ring_jax

    for mix in mixes:
        for n in lengths:
            if not rows.left():
                return
            row = dict(section="max_n", mix=mix, n=n, chunk=chunk)
            qkv = None
            try:
                both = programs(ring_jax, mix, chunk)[1]
                row.update(memory(both, n))
                qkv = fused_inputs(n)
                row["fwdbwd_ms"] = time_ms(both, *qkv, warmup=1, repeats=3)
                stats = jax.devices()[0].memory_stats() or {}
                row.update(peak_bytes_in_use=stats.get("peak_bytes_in_use"), bytes_limit=stats.get("bytes_limit"))
            except Exception as e:  # noqa: BLE001 -- the first failure ends this mix
                row["error"] = type(e).__name__ + ": " + str(e)[:300]
            qkv = None  # free the inputs before the next length allocates its own
            rows.add(**row)
            if "error" in row:
                break


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sections", default="ab,memory,max_n")
    ap.add_argument("--budget-s", type=float, default=400)
    ap.add_argument("--chunk", type=int, default=256 * K)
    ap.add_argument("--baseline", default=None, help="module name of another ring_jax to time beside this one")
    ap.add_argument("--max-n", default="4,8,10,12,14,16", help="lengths for max_n, in multiples of 2^20")
    ap.add_argument("--max-mixes", default="head_groups,longnet")
    ap.add_argument("--ab-n", default="16,64,256,1024,2048", help="lengths for ab, in multiples of 1024")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU check of the script)")
    args = ap.parse_args()
    import jax

    global W
    meta = dict(python=platform.python_version(), jax=jax.__version__, device=jax.devices()[0].device_kind,
                pattern=dict(w=W, r=R, heads=H, head_dim=D, dtype="bfloat16", causal=True, batch=1))
    rows = Sweep(args.out, args.budget_s, meta)
    modules = {"ring_jax": importlib.import_module("ring_jax")}
    if args.baseline:
        modules[args.baseline] = importlib.import_module(args.baseline)
    if args.smoke:
        W = (64, 128, 256, 512)
        rows.data["meta"]["pattern"]["w"] = W
        ab, mem, big, chunk = [1024, 2048], [1024, 4096], [2048, 4096], 512
    else:
        ab = [int(x) * K for x in args.ab_n.split(",")]
        mem = [2 ** k for k in range(14, 25)]
        big, chunk = [int(float(x) * 2 ** 20) for x in args.max_n.split(",")], args.chunk
    sections = args.sections.split(",")
    if "ab" in sections:
        section_ab(rows, modules, ab, (None, chunk, chunk // 4))
    if "memory" in sections:
        section_memory(rows, mem, chunk)
    if "max_n" in sections:
        section_max_n(rows, big, chunk // 4 if not args.smoke else chunk, args.max_mixes.split(","))


if __name__ == "__main__":
    main()
