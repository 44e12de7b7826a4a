"""The parity report: every implementation against the float64 oracle, and the O(n) scaling check.

Implementations: ``jax`` (one device), ``jax_ring`` (``shard_map`` ring over the available devices:
simulated CPU devices by default), ``torch`` (one device), ``torch_ring`` (the simulated ring,
``ring_size`` blocks). Each row checks out, lse and the gradients against the float64 reference
under the dtype rule of ``parity_tests.frameworks.tolerances``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform

import numpy as np
from tqdm import tqdm

from parity_tests.frameworks import Case, reference, run_jax, run_torch, tolerances

# name: (n, h, h_kv, d, segment_lengths, dilation_rates). With a ring of 4, L = 64: w=16 is local,
# w=64 one shard, w=256 spans four devices.
REPORT_CONFIGS = {
    "longnet_like": (256, 6, 3, 16, (16, 64, 256), (1, 2, 4)),
    "h12_over_5": (256, 12, 4, 16, (16, 32, 64, 128, 256), (1, 2, 4, 8, 4)),
}
RING = 4


def _jax_ring(case: Case, x):
    import jax

    import ring_jax

    mesh = jax.make_mesh((RING,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:RING])
    return run_jax(case, x, lambda q, k, v: ring_jax.sharded_dilated_attention(
        q, k, v, mesh=mesh, return_lse=True, **case.kwargs))


def _torch_ring(case: Case, x):
    import ring_torch

    kw = dict(case.kwargs)
    is_causal = kw.pop("is_causal")
    module = ring_torch.RingDilatedAttention(**kw, ring_size=RING)
    return run_torch(case, x, lambda q, k, v: module(q, k, v, is_causal=is_causal, return_lse=True))


IMPLEMENTATIONS = {"jax": run_jax, "jax_ring": _jax_ring, "torch": run_torch, "torch_ring": _torch_ring}


def parity_rows(configs=REPORT_CONFIGS, dtypes=("float64", "float32", "bfloat16"), causals=(False, True),
                mixes=("head_groups", "longnet"), implementations=tuple(IMPLEMENTATIONS)):
    cases = [(name, Case(n, h, hk, d, w, r, mix, causal, dtype))
             for name, (n, h, hk, d, w, r) in configs.items() for dtype in dtypes for mix in mixes
             for causal in causals]
    rows = []
    with tqdm(total=len(cases) * len(implementations), desc="parity", unit="run") as bar:
        for name, case in cases:
            x = case.inputs()
            ref = reference(case, x)
            for impl in implementations:
                errs = tolerances(IMPLEMENTATIONS[impl](case, x), case, x, ref)
                rows.append(dict(config=name, impl=impl, dtype=case.dtype, mix=case.mix, causal=case.is_causal,
                                 errors={k: e for k, (e, _) in errs.items()},
                                 bounds={k: b for k, (_, b) in errs.items()},
                                 ok=all(e <= b for e, b in errs.values())))
                bar.update()
    return rows


def flop_ratios(n_list, segment_lengths, dilation_rates, heads=8, head_dim=64, mix="head_groups"):
    """Analytic FLOPs of both frameworks' plans and their ratio per doubling of n."""
    import ring_jax
    import ring_torch

    cfg = ring_jax.DilatedConfig(segment_lengths, dilation_rates, mix)
    rows = []
    for n in n_list:
        jax_flops = ring_jax.get_plan(cfg, n, heads, heads).flops(1, head_dim)
        torch_flops = ring_torch.plan_flops(batch=1, seq_len=n, num_heads=heads, head_dim=head_dim,
                                            segment_lengths=segment_lengths, dilation_rates=dilation_rates, mix=mix)
        rows.append(dict(n=n, jax_flops=jax_flops, torch_flops=torch_flops))
    for prev, row in zip(rows, rows[1:]):
        row["ratio_per_doubling"] = row["jax_flops"] / prev["jax_flops"]
    return rows


def timing_rows(n_list, segment_lengths, dilation_rates, heads=4, head_dim=32, dtype="float32"):
    """Forward time vs n for both frameworks on the default device (jit-compiled JAX; torch eager)."""
    import jax
    import jax.numpy as jnp
    import torch

    import ring_jax
    import ring_torch
    from benchmarks.timing import time_ms

    kw = dict(segment_lengths=segment_lengths, dilation_rates=dilation_rates, is_causal=True)
    jax_fn = jax.jit(functools.partial(ring_jax.dilated_attention, **kw))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for n in tqdm(n_list, desc="timing", unit="n"):
        xj = jax.random.normal(jax.random.PRNGKey(0), (1, n, heads, head_dim), jnp.dtype(dtype))
        xt = torch.randn(1, n, heads, head_dim, dtype=getattr(torch, dtype), device=device)
        with torch.no_grad():
            torch_ms = time_ms(lambda x: ring_torch.dilated_attention(x, x, x, **kw), xt)
        rows.append(dict(n=n, jax_ms=time_ms(lambda x: jax_fn(x, x, x), xj), torch_ms=torch_ms,
                         flops=ring_jax.get_plan(ring_jax.DilatedConfig(**kw), n, heads, heads).flops(1, head_dim)))
    return rows


def slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x)."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def format_table(rows) -> str:
    head = f"{'config':<13} {'impl':<10} {'dtype':<8} {'mix':<11} {'causal':<6} {'out':>9} {'lse':>9} {'grad':>9}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        e = r["errors"]
        grad = max(e["dq"], e["dk"], e["dv"])
        lines.append(f"{r['config']:<13} {r['impl']:<10} {r['dtype']:<8} {r['mix']:<11} {str(r['causal']):<6} "
                     f"{e['out']:9.1e} {e['lse']:9.1e} {grad:9.1e}  {'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def plot(timing, flops, path, segment_lengths):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2))
    n = [r["n"] for r in timing]
    big = [i for i, v in enumerate(n) if v >= max(segment_lengths)]
    for key, label in (("jax_ms", "JAX"), ("torch_ms", "PyTorch")):
        t = [r[key] for r in timing]
        s = slope([n[i] for i in big], [t[i] for i in big]) if len(big) > 1 else float("nan")
        ax_t.loglog(n, t, "o-", label=f"{label} (slope {s:.2f} for n ≥ max w)")
    ax_t.set(xlabel="sequence length n", ylabel="forward time [ms]", title="Measured time")
    ax_t.legend()
    nf = [r["n"] for r in flops]
    ax_f.loglog(nf, [r["jax_flops"] for r in flops], "o-", label="JAX plan")
    ax_f.loglog(nf, [r["torch_flops"] for r in flops], "x--", label="PyTorch plan")
    ax_f.axvline(max(segment_lengths), color="grey", lw=0.8, ls=":")
    for r in flops[1:]:
        ax_f.annotate(f"×{r['ratio_per_doubling']:.2f}", (r["n"], r["jax_flops"]), textcoords="offset points",
                      xytext=(-10, 8), fontsize=8)
    ax_f.set(xlabel="sequence length n", ylabel="FLOPs (analytic)", title="Work per doubling (4 while n ≤ min w, then 2)")
    ax_f.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(quick: bool = False, out_json: str = "report.json", out_png: str = "report.png") -> bool:
    """Runs the report, prints the table, writes JSON and PNG; True when every row is within bounds."""
    import jax
    import torch

    configs = {"longnet_like": REPORT_CONFIGS["longnet_like"]} if quick else REPORT_CONFIGS
    impls = tuple(IMPLEMENTATIONS)
    if len(jax.devices()) < RING:  # an accelerator machine with fewer than RING devices
        impls = tuple(i for i in impls if i != "jax_ring")
        print(f"jax_ring skipped: {len(jax.devices())} {jax.default_backend()} device(s) < {RING}")
    rows = parity_rows(configs, causals=(True,) if quick else (False, True), implementations=impls)
    w, r = (64, 128, 256), (1, 2, 4)
    flops = flop_ratios([2 ** k for k in range(5, 14)], w, r)
    timing = timing_rows([2 ** k for k in range(8, 11 if quick else 15)], w, r)
    print(format_table(rows))
    print(f"\nFLOPs per doubling of n (w={w}, r={r}): "
          + ", ".join(f"{row['n']}: x{row['ratio_per_doubling']:.2f}" for row in flops[1:]))
    print("forward time [ms]: " + ", ".join(f"n={t['n']}: jax {t['jax_ms']:.2f} / torch {t['torch_ms']:.2f}"
                                            for t in timing))
    meta = dict(jax=jax.__version__, torch=torch.__version__, python=platform.python_version(),
                jax_devices=[str(d) for d in jax.devices()], ring_devices=RING, quick=quick)
    with open(out_json, "w") as f:
        json.dump(dict(meta=meta, parity=rows, flops=flops, timing=timing), f, indent=1,
                  default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o))
    plot(timing, flops, out_png, w)
    failed = [row for row in rows if not row["ok"]]
    worst = {dt: max((max(row["errors"].values()) for row in rows if row["dtype"] == dt), default=math.nan)
             for dt in ("float64", "float32", "bfloat16")}
    print(f"\n{len(rows) - len(failed)}/{len(rows)} within bounds; worst error per dtype: "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + f"\nwrote {out_json}, {out_png}")
    return not failed
