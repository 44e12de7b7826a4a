"""The parity report: every implementation against the float64 oracle, and the O(n) scaling check.

Implementations: ``jax`` (one device), ``jax_ring`` (``shard_map`` ring over the available devices:
simulated CPU devices by default), ``torch`` (one device), ``torch_ring`` (the simulated ring,
``ring_size`` blocks). Each row checks out, lse and the gradients against the float64 reference
under the dtype rule of ``parity_tests.frameworks.tolerances``: the error is absolute in float64
and relative in float32 and bfloat16, and a row passes when every error is within its bound.

Matrices: ``full_cases`` is every config x dtype x mix x causal x implementation; ``default_cases``
is a covering subset of one config in which every implementation runs every dtype, both mixes and
both causal settings, and every implementation and every dtype meets all four mix x causal pairs.

The FLOP scaling comes from the plans (exact, machine-independent). Timings are optional; on a CPU
they are measured single-threaded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import time

import numpy as np
from tqdm import tqdm

from parity_tests.frameworks import DTYPES, Case, reference, run_jax, run_torch, tolerances

# name: (n, h, h_kv, d, segment_lengths, dilation_rates). With a ring of 4, L = 64: w=16 is local,
# w=64 one shard, w=256 spans four devices.
REPORT_CONFIGS = {
    "longnet_like": (256, 6, 3, 16, (16, 64, 256), (1, 2, 4)),
    "h12_over_5": (256, 12, 4, 16, (16, 32, 64, 128, 256), (1, 2, 4, 8, 4)),
}
# Padding rows: per-example lengths on the ring-compatible config (every implementation), and a
# sequence length no pattern divides (one device: a mesh needs whole segments per device); packed
# documents (their lengths per batch entry: crossing segments and shards, one of length 1).
PADDED = {"longnet_like+lengths": ("longnet_like", 256, (256, 173), None),
          "longnet_like_n203+lengths": ("longnet_like", 203, (203, 91), None),
          "longnet_like+documents": ("longnet_like", 256, (256, 200), ((70, 1, 120, 65), (256,)))}
ONE_DEVICE = ("jax", "torch")
DEFAULT_CONFIG = "longnet_like"
RING = 4
MIXES = ("head_groups", "longnet")
# The two (mix, causal) pairings of the default subset: together they hold all four combinations.
PAIRINGS = ((("head_groups", False), ("longnet", True)), (("head_groups", True), ("longnet", False)))
# The FLOP sweep's pattern (n from 32 to 8192 crosses min w and max w).
FLOP_PATTERN = ((64, 128, 256), (1, 2, 4))
FIELDS = ("out", "lse", "dq", "dk", "dv")


def _jax_ring(case: Case, x):
    import jax

    import ring_jax

    mesh = jax.make_mesh((RING,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:RING])
    return run_jax(case, x, lambda q, k, v: ring_jax.sharded_dilated_attention(
        q, k, v, mesh=mesh, return_lse=True, **case.kwargs))


def _torch_ring(case: Case, x):
    import ring_torch

    kw = dict(case.kwargs)
    call = dict(is_causal=kw.pop("is_causal"), seq_lengths=kw.pop("seq_lengths", None),
                segment_ids=kw.pop("segment_ids", None))
    module = ring_torch.RingDilatedAttention(**kw, ring_size=RING)
    return run_torch(case, x, lambda q, k, v: module(q, k, v, return_lse=True, **call))


IMPLEMENTATIONS = {"jax": run_jax, "jax_ring": _jax_ring, "torch": run_torch, "torch_ring": _torch_ring}


@dataclasses.dataclass(frozen=True)
class ReportCase:
    """One case on one config and the implementations that run it (they share inputs and reference)."""

    config: str
    case: Case
    impls: tuple[str, ...]


def _case(config: str, dtype: str, mix: str, causal: bool) -> Case:
    n, h, hk, d, w, r = REPORT_CONFIGS[config]
    return Case(n, h, hk, d, w, r, mix, causal, dtype)


def full_cases(impls=tuple(IMPLEMENTATIONS), configs=tuple(REPORT_CONFIGS), dtypes=DTYPES) -> list[ReportCase]:
    """Every config x dtype x mix x causal, each run by every implementation in ``impls``."""
    return [ReportCase(c, _case(c, dt, mix, causal), tuple(impls))
            for c in configs for dt in dtypes for mix in MIXES for causal in (False, True)]


def default_cases(impls=tuple(IMPLEMENTATIONS), config=DEFAULT_CONFIG, dtypes=DTYPES) -> list[ReportCase]:
    """The covering subset on ``config``: implementation ``i`` in dtype ``j`` runs the two
    (mix, causal) pairs of ``PAIRINGS[(i + j) % 2]`` (both mixes, both causal settings). Indices
    are positions in ``IMPLEMENTATIONS``, so dropping an implementation leaves the others' cases
    unchanged. Each case is shared by one JAX and one torch implementation."""
    order = list(IMPLEMENTATIONS)
    runs: dict[tuple, list[str]] = {}
    for j, dt in enumerate(dtypes):
        for impl in impls:
            for mix, causal in PAIRINGS[(order.index(impl) + j) % 2]:
                runs.setdefault((dt, mix, causal), []).append(impl)
    return [ReportCase(config, _case(config, dt, mix, causal), tuple(names))
            for (dt, mix, causal), names in sorted(runs.items(), key=lambda kv: (dtypes.index(kv[0][0]),
                                                                                  MIXES.index(kv[0][1]), kv[0][2]))]


def padded_cases(impls=tuple(IMPLEMENTATIONS), full: bool = False) -> list[ReportCase]:
    """Rows with padding (:data:`PADDED`): per-example lengths run by every implementation in
    float64 (every dtype with ``full``), both mixes, causal and not; an ``n`` no pattern divides,
    one device only, in float32 (every dtype with ``full``)."""
    cases = []
    for name, dtypes, runners, pairing in (
            ("longnet_like+lengths", DTYPES if full else ("float64",), impls, 0),
            ("longnet_like_n203+lengths", DTYPES if full else ("float32",), tuple(i for i in impls if i in ONE_DEVICE), 1),
            ("longnet_like+documents", DTYPES if full else ("float64",), impls, 1)):
        base, n, lengths, documents = PADDED[name]
        _, h, hk, d, w, r = REPORT_CONFIGS[base]
        for dt in dtypes:
            for mix, causal in (PAIRINGS[0] + PAIRINGS[1] if full else PAIRINGS[pairing]):
                case = Case(n, h, hk, d, w, r, mix, causal, dt, seq_lengths=lengths, documents=documents)
                cases.append(ReportCase(name, case, runners))
    return cases


def error_kind(dtype: str) -> str:
    """``"abs"`` (max absolute error) in float64, ``"rel"`` (``||a - b|| / ||b||``) otherwise."""
    return "abs" if dtype == "float64" else "rel"


def ratio(error: float, bound: float) -> float:
    """``error / bound``; ``inf`` for a NaN error or a positive error against a zero bound."""
    if math.isnan(error):
        return math.inf
    if bound <= 0:
        return 0.0 if error == 0 else math.inf
    return error / bound


def parity_row(config: str, impl: str, case: Case, errs: dict[str, tuple[float, float]]) -> dict:
    """One report row from ``{field: (error, bound)}``: every field's error and bound, the worst
    field by ``error / bound`` (``error``, ``bound``, ``ratio``), and ``pass`` (every error within
    its bound)."""
    ratios = {k: ratio(e, b) for k, (e, b) in errs.items()}
    worst = max(ratios, key=ratios.get)
    return dict(config=config, impl=impl, dtype=case.dtype, mix=case.mix, causal=case.is_causal,
                shape=dict(batch=case.batch, n=case.n, h=case.h, h_kv=case.h_kv, d=case.d,
                           segment_lengths=list(case.segment_lengths), dilation_rates=list(case.dilation_rates)),
                kind=error_kind(case.dtype),
                errors={k: e for k, (e, _) in errs.items()}, bounds={k: b for k, (_, b) in errs.items()},
                worst=worst, error=errs[worst][0], bound=errs[worst][1], ratio=ratios[worst],
                **{"pass": all(e <= b for e, b in errs.values())})


def parity_rows(cases: list[ReportCase], implementations=IMPLEMENTATIONS) -> list[dict]:
    """Runs every case through its implementations (one reference per case); a row per run."""
    rows = []
    with tqdm(total=sum(len(c.impls) for c in cases), desc="parity", unit="run") as bar:
        for rc in cases:
            x = rc.case.inputs()
            ref = reference(rc.case, x)
            for impl in rc.impls:
                bar.set_postfix_str(f"{impl} {rc.case.dtype} {rc.case.mix} causal={rc.case.is_causal}")
                errs = tolerances(implementations[impl](rc.case, x), rc.case, x, ref)
                rows.append(parity_row(rc.config, impl, rc.case, errs))
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
        rows.append(dict(n=n, mix=mix, jax_flops=jax_flops, torch_flops=torch_flops))
    for prev, row in zip(rows, rows[1:]):
        row["ratio_per_doubling"] = row["jax_flops"] / prev["jax_flops"]
    return rows


def timing_rows(n_list, segment_lengths, dilation_rates, heads=4, head_dim=32, dtype="float32"):
    """Forward time vs n for both frameworks on the default device (jit-compiled JAX; torch eager).
    On a CPU torch runs one thread (JAX's single thread is an XLA flag set before import)."""
    import jax
    import jax.numpy as jnp
    import torch

    import ring_jax
    import ring_torch
    from benchmarks.timing import time_ms

    kw = dict(segment_lengths=segment_lengths, dilation_rates=dilation_rates, is_causal=True)
    jax_fn = jax.jit(functools.partial(ring_jax.dilated_attention, **kw))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    rows = []
    try:
        for n in tqdm(n_list, desc="timing", unit="n"):
            xj = jax.random.normal(jax.random.PRNGKey(0), (1, n, heads, head_dim), jnp.dtype(dtype))
            xt = torch.randn(1, n, heads, head_dim, dtype=getattr(torch, dtype), device=device)
            with torch.no_grad():
                torch_ms = time_ms(lambda x: ring_torch.dilated_attention(x, x, x, **kw), xt)
            rows.append(dict(n=n, jax_ms=time_ms(lambda x: jax_fn(x, x, x), xj), torch_ms=torch_ms,
                             flops=ring_jax.get_plan(ring_jax.DilatedConfig(**kw), n, heads, heads).flops(1, head_dim)))
    finally:
        torch.set_num_threads(threads)
    return rows


def slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x)."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def _cell(errors: dict, bounds: dict, fields) -> str:
    worst = max(fields, key=lambda k: ratio(errors[k], bounds[k]))
    return f"{errors[worst]:.1e}/{bounds[worst]:.1e}"


TABLE_LEGEND = (
    "kind: abs = max |got - ref| (float64); rel = ||got - ref|| / ||ref|| (float32, bfloat16).\n"
    "Each cell is error/bound; grad is the worst of dq, dk, dv; err/bound is the row's worst ratio.\n"
    "Bounds: float64 1e-10 (out, lse), 1e-9 (gradients); float32 2e-5; "
    "bfloat16 2x the error of a naive dense bfloat16 implementation.")


def format_table(rows) -> str:
    """The per-row table: labels, error kind, error/bound of out, lse and gradients, PASS/FAIL."""
    head = (f"{'impl':<10} {'dtype':<8} {'mix':<11} {'causal':<6} {'config':<12} {'kind':<4} "
            f"{'out':>15} {'lse':>15} {'grad':>15} {'err/bound':>9}  result")
    lines = [TABLE_LEGEND, "", head, "-" * len(head)]
    for r in rows:
        e, b = r["errors"], r["bounds"]
        lines.append(f"{r['impl']:<10} {r['dtype']:<8} {r['mix']:<11} {str(r['causal']):<6} {r['config']:<12} "
                     f"{r['kind']:<4} {_cell(e, b, ('out',)):>15} {_cell(e, b, ('lse',)):>15} "
                     f"{_cell(e, b, ('dq', 'dk', 'dv')):>15} {r['ratio']:9.1e}  {'PASS' if r['pass'] else 'FAIL'}")
    return "\n".join(lines)


def summary(rows) -> str:
    """The overall verdict, each failing row with its fields outside their bounds, and the worst
    error/bound per dtype."""
    failed = [r for r in rows if not r["pass"]]
    verdict = "PASS" if rows and not failed else "FAIL"
    lines = [f"{verdict}: {len(rows) - len(failed)}/{len(rows)} rows within their bounds"]
    for r in failed:
        out = ", ".join(f"{k} {r['errors'][k]:.1e} > {r['bounds'][k]:.1e}" for k in r["errors"]
                        if not r["errors"][k] <= r["bounds"][k])
        lines.append(f"  FAIL {r['impl']} {r['dtype']} {r['mix']} causal={r['causal']} {r['config']}: "
                     f"{out} ({r['kind']})")
    worst = {dt: max((r["ratio"] for r in rows if r["dtype"] == dt), default=math.nan) for dt in DTYPES}
    lines.append("worst error/bound per dtype: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(jax_backend: str, jax_kind: str, torch_cuda: str | None) -> str:
    """``"JAX cpu, torch cpu (AMD EPYC, 2 cores)"`` or the accelerators' names."""
    jax_part = f"JAX {jax_backend}" + ("" if jax_backend == "cpu" else f" ({jax_kind})")
    torch_part = f"torch cuda ({torch_cuda})" if torch_cuda else "torch cpu"
    cpu = f" ({cpu_name()}, {os.cpu_count()} cores)" if jax_backend == "cpu" or not torch_cuda else ""
    return f"{jax_part}, {torch_part}{cpu}"


def shape_label(config: str) -> str:
    if config in PADDED:
        base, n, lengths, documents = PADDED[config]
        _, h, hk, d, w, r = REPORT_CONFIGS[base]
        docs = "" if documents is None else f", documents (lengths)={documents}"
        return f"{config}: [b=2, n={n}, h={h}/{hk} kv, d={d}], w={w}, r={r}, seq_lengths={lengths}{docs}"
    n, h, hk, d, w, r = REPORT_CONFIGS[config]
    return f"{config}: [b=2, n={n}, h={h}/{hk} kv, d={d}], w={w}, r={r}"


def plot(rows, flops, path, title, timing=None, timing_label=""):
    """Parity (error/bound per implementation and dtype, log scale, bound at 1), FLOPs per doubling
    of n from the plans, and the measured times when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if timing else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 4.8))
    ax_p, ax_f = axes[0], axes[1]

    impls = sorted(dict.fromkeys(r["impl"] for r in rows),
                   key=lambda i: list(IMPLEMENTATIONS).index(i) if i in IMPLEMENTATIONS else len(IMPLEMENTATIONS))
    dtypes = [dt for dt in DTYPES if any(r["dtype"] == dt for r in rows)]
    floor = 1e-8
    width = 0.8 / max(len(dtypes), 1)
    for j, dt in enumerate(dtypes):
        xs, heights, colors = [], [], []
        for i, impl in enumerate(impls):
            sel = [r["ratio"] for r in rows if r["impl"] == impl and r["dtype"] == dt]
            if not sel:
                continue
            x = i + (j - (len(dtypes) - 1) / 2) * width
            xs.append(x)
            heights.append(max(max(sel), floor))
            colors.append("tab:red" if max(sel) > 1 else f"C{j}")
            ax_p.scatter([x] * len(sel), [max(s, floor) for s in sel], s=9, color="k", zorder=3)
        ax_p.bar(xs, heights, width=width * 0.9, color=colors, label=f"{dt} ({error_kind(dt)})", bottom=floor)
    ax_p.axhline(1.0, color="tab:red", ls="--", lw=1.2, label="bound (error/bound = 1)")
    ax_p.set_yscale("log")
    ax_p.set_xticks(range(len(impls)), impls)
    ax_p.set(ylabel="error / bound (bar: worst row; dots: each row)",
             title=f"Parity against the float64 oracle: {sum(r['pass'] for r in rows)}/{len(rows)} rows pass")
    ax_p.set_ylim(bottom=floor, top=max(1e3, max((r["ratio"] for r in rows if math.isfinite(r["ratio"])),
                                                 default=1.0) * 30))
    ax_p.legend(fontsize=8, loc="upper center", ncol=2)

    nf = [r["n"] for r in flops]
    ax_f.loglog(nf, [r["jax_flops"] for r in flops], "o-", label="JAX plan")
    ax_f.loglog(nf, [r["torch_flops"] for r in flops], "x--", label="PyTorch plan")
    w, rates = FLOP_PATTERN
    for v, name in ((min(w), "min w"), (max(w), "max w")):
        ax_f.axvline(v, color="grey", lw=0.8, ls=":")
        ax_f.annotate(name, (v, ax_f.get_ylim()[0]), fontsize=8, color="grey", xytext=(2, 2),
                      textcoords="offset points")
    for r in flops[1:]:
        ax_f.annotate(f"×{r['ratio_per_doubling']:.2f}", (r["n"], r["jax_flops"]), textcoords="offset points",
                      xytext=(-10, 8), fontsize=8)
    ax_f.set(xlabel="sequence length n", ylabel="FLOPs (analytic, from the plans)",
             title=f"FLOPs per doubling of n (w={w}, r={rates}):\n×4 while n ≤ min w, ×2 once n ≥ max w")
    ax_f.legend(fontsize=8)

    if timing:
        ax_t = axes[2]
        n = [r["n"] for r in timing]
        big = [i for i, v in enumerate(n) if v >= max(w)]
        for key, label in (("jax_ms", "JAX"), ("torch_ms", "PyTorch")):
            t = [r[key] for r in timing]
            s = slope([n[i] for i in big], [t[i] for i in big]) if len(big) > 1 else float("nan")
            ax_t.loglog(n, t, "o-", label=f"{label} (slope {s:.2f} for n ≥ max w)")
        ax_t.set(xlabel="sequence length n", ylabel="forward time [ms] (median)", title=f"Measured time, {timing_label}")
        ax_t.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(full: bool = False, timing: bool | None = None, out_json: str = "report.json", out_png: str = "report.png",
        started: float | None = None, cases: list[ReportCase] | None = None) -> bool:
    """Runs the report, prints the table, writes JSON and PNG; True when every row is within bounds.

    ``cases`` defaults to ``full_cases`` (``full``) or ``default_cases``. ``timing=None`` measures
    times only when an accelerator is present."""
    import jax
    import torch

    started = time.perf_counter() if started is None else started
    impls = tuple(IMPLEMENTATIONS)
    if len(jax.devices()) < RING:  # an accelerator machine with fewer than RING devices
        impls = tuple(i for i in impls if i != "jax_ring")
        print(f"jax_ring skipped: {len(jax.devices())} {jax.default_backend()} device(s) < {RING}")
    if cases is None:
        cases = (full_cases(impls) if full else default_cases(impls)) + padded_cases(impls, full)
    cases = [dataclasses.replace(c, impls=tuple(i for i in c.impls if i in impls)) for c in cases]
    accelerator = jax.default_backend() != "cpu" or torch.cuda.is_available()
    timing = accelerator if timing is None else timing

    rows = parity_rows(cases)
    flops = flop_ratios([2 ** k for k in range(5, 14)], *FLOP_PATTERN)
    times = timing_rows([2 ** k for k in range(8, 15)], *FLOP_PATTERN) if timing else None
    timing_label = (f"single-threaded CPU (load {os.getloadavg()[0]:.1f})" if not accelerator else "accelerator") \
        + ", float32, causal, forward"

    print(format_table(rows))
    print(f"\nFLOPs per doubling of n (w={FLOP_PATTERN[0]}, r={FLOP_PATTERN[1]}, from the plans): "
          + ", ".join(f"{row['n']}: x{row['ratio_per_doubling']:.2f}" for row in flops[1:]))
    if times:
        print(f"forward time [ms], {timing_label}: "
              + ", ".join(f"n={t['n']}: jax {t['jax_ms']:.2f} / torch {t['torch_ms']:.2f}" for t in times))
    else:
        print("timings: not measured (on a CPU only with --timing, single-threaded)")

    device = device_label(jax.default_backend(), jax.devices()[0].device_kind,
                          torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    configs = list(dict.fromkeys(c.config for c in cases))
    dtypes = [dt for dt in DTYPES if any(c.case.dtype == dt for c in cases)]
    meta = dict(jax=jax.__version__, torch=torch.__version__, python=platform.python_version(), device=device,
                jax_devices=[str(d) for d in jax.devices()], ring_devices=RING,
                matrix="full" if full else "default", configs={c: shape_label(c) for c in configs if c in REPORT_CONFIGS or c in PADDED},
                xla_flags=os.environ.get("XLA_FLAGS", ""), timing=timing_label if times else None)
    with open(out_json, "w") as f:
        json.dump(dict(meta=meta, parity=rows, flops=flops, timing=times), f, indent=1,
                  default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o))
    title = (f"{device} · dtypes {', '.join(dtypes)} · rings of {RING} (jax_ring: {RING} JAX devices of "
             f"{len(jax.devices())}; torch_ring: {RING} blocks in one process)\n"
             + "\n".join(shape_label(c) for c in configs if c in REPORT_CONFIGS or c in PADDED))
    plot(rows, flops, out_png, title, times, timing_label)

    print("\n" + summary(rows))
    print(f"wrote {os.path.abspath(out_json)} and {os.path.abspath(out_png)} in {time.perf_counter() - started:.1f} s")
    return all(r["pass"] for r in rows) and bool(rows)
