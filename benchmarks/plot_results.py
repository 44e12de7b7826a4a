"""Plots of the committed GPU results, beside the anchors (bare segment kernels, dense flash, the
seed system):

* ``h100_scaling_<date>.png``: time vs n, log-log with each curve's slope from 32K on;
* ``h100_memory_<date>.png``: device bytes per token vs n, one pass and chunked, next to the bytes
  of q, k, v, o and the gradients;
* ``2xh100_ring_scaling_<date>.png``: weak and strong scaling of both rings;
* ``h200_bench_2026-11-30.png``: the README's Performance plot: time and time / floor vs n, both
  frameworks and both mixes, from ``h200_bench_2026-11-30.json`` (one process, one H200);
* ``h200_balanced_projection_2026-12-01.png``: strong-scaling efficiency vs P of causal rings,
  contiguous against balanced, projected from the plan and kernel times on one H200;
* ``2xh200_balanced_2026-12-01.png``: the same, measured on two H200s (P = 1 vs 2), both frameworks;
* ``h200_kernel_table_2026-12-02.png``: the README's Performance plot, each layer's time over the
  floor vs n (drawn by :func:`benchmarks.kernel_table.plot`);
* ``h200_documents_2026-12-02.png``: packed documents at 1M tokens (no documents, the masked kernels
  before, the Pallas and Triton rows kernels now) and the simulated JAX ring (cuDNN vs ``auto``).

    python -m benchmarks.plot_results [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

DATE = "2026-11-25"
KERNEL_TABLE = "h200_kernel_table_2026-12-02"
PATTERN = "bf16, b=1, h=8, d=64, causal, w=(2K,4K,8K,16K), r=(1,2,4,8)"


def slope(n, t):
    n, t = np.asarray(n, float), np.asarray(t, float)
    keep = (n >= 32768) & np.isfinite(t)
    return float(np.polyfit(np.log(n[keep]), np.log(t[keep]), 1)[0]) if keep.sum() > 1 else float("nan")


def read(results, name):
    with open(os.path.join(results, name)) as f:
        return json.load(f)


def timing_series(results):
    """``{label: [(n, fwd_ms or None, fwdbwd_ms or None)]}`` for ours and for the anchors."""
    ab = [r for r in read(results, f"h100_backward_ab_{DATE}.json")["rows"] if r["impl"] == "ring_jax"]
    lc = read(results, f"h100_long_context_{DATE}.json")["rows"]
    torch = [r for r in read(results, f"h100_torch_single_{DATE}.json")["rows"]
             if r["impl"] == "ring_torch" and "fwdbwd_ms" in r]
    anchors = read(results, f"anchors_h100_{DATE}.json")["rows"]

    def ours(mix):
        rows = {r["n"]: r for r in ab if r["mix"] == mix and "fwdbwd_ms" in r}
        rows.update({r["n"]: r for r in lc if r["section"] == "ab" and r["mix"] == mix and r["chunk"] is None
                     and "fwdbwd_ms" in r})
        return [(n, rows[n]["fwd_ms"], rows[n]["fwdbwd_ms"]) for n in sorted(rows)]

    def chunked(mix):
        rows = [r for r in lc if r["mix"] == mix and r.get("chunk") == 65536 and "fwdbwd_ms" in r]
        return sorted((r["n"], r.get("fwd_ms"), r["fwdbwd_ms"]) for r in rows)

    series = {
        "JAX, head groups": ours("head_groups"),
        "JAX, head groups, chunk_size=64K": chunked("head_groups"),
        "JAX, longnet mix": ours("longnet"),
        "JAX, longnet mix, chunk_size=64K": chunked("longnet"),
        "torch, head groups": [(r["n"], r["fwd_ms"], r["fwdbwd_ms"]) for r in torch if r["mix"] == "head_groups"],
        "torch, longnet mix": [(r["n"], r["fwd_ms"], r["fwdbwd_ms"]) for r in torch if r["mix"] == "longnet"],
    }
    refs = {
        "anchor: bare segment kernels (floor)": [(r["n"], r["floor_fwd_ms"], r["floor_fwdbwd_ms"]) for r in anchors],
        "anchor: dense causal flash": [(r["n"], r["dense_sdpa_fwd_ms"], None) for r in anchors if "dense_sdpa_fwd_ms" in r],
        "anchor: seed system (DarcStar)": [(r["n"], r["ds_fwd_ms"], None) for r in anchors],
    }
    return series, refs


def plot_timing(plt, results):
    series, refs = timing_series(results)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for col, (ax, title) in enumerate(zip(axes, ("forward", "forward + backward"))):
        for label, rows in series.items():
            rows = [r for r in rows if r[1 + col] is not None]
            if rows:
                n, t = [r[0] for r in rows], [r[1 + col] for r in rows]
                ax.loglog(n, t, "o-", label=f"{label} (slope {slope(n, t):.2f})")
        for label, rows in refs.items():
            rows = [r for r in rows if r[1 + col] is not None]
            if rows:
                ax.loglog([r[0] for r in rows], [r[1 + col] for r in rows], "s--", alpha=0.6, label=label)
        ax.set(xlabel="sequence length n (tokens)", ylabel="time [ms]", title=f"{title}: {PATTERN}")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.2)
    fig.suptitle(f"One NVIDIA H100 80GB, {DATE} (slopes fitted from 32K on)", fontsize=10)
    return fig, f"h100_scaling_{DATE}.png"


def set_peak(rows):
    """The max_n rows whose run raised the process's peak bytes in use (a later, smaller run
    reports the earlier peak: that number is not its own)."""
    top, out = 0, []
    for r in rows:
        if r["section"] == "max_n" and (r.get("peak_bytes_in_use") or 0) > top:
            top = r["peak_bytes_in_use"]
            out.append(r)
    return out


def plot_memory(plt, results):
    lc = read(results, f"h100_long_context_{DATE}.json")["rows"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for mix in ("head_groups", "longnet"):
        for chunked in (False, True):
            rows = sorted((r["n"], r["total_b_per_tok"]) for r in lc if r["section"] == "memory" and r["mix"] == mix
                          and (r["chunk"] is not None) == chunked and "total_b_per_tok" in r)
            label = f"{mix}, {'chunk_size=256K' if chunked else 'one pass'} (compiled: args + outputs + temps)"
            ax.semilogx([r[0] for r in rows], [r[1] / 1024 for r in rows], "o-" if chunked else "s--", label=label)
        peak = [(r["n"], r["peak_bytes_in_use"] / r["n"]) for r in set_peak(lc) if r["mix"] == mix]
        ax.semilogx([p[0] for p in peak], [p[1] / 1024 for p in peak], "k^" if mix == "head_groups" else "kv",
                    label=f"{mix}, chunk_size=64K: measured device peak / n (runs that fit)")
    ax.axhline(7.0, color="gray", ls=":", label="q, k, v, o + dq, dk, dv (7 KiB/token)")
    ax.set(xlabel="sequence length n (tokens)", ylabel="KiB per token (forward + backward)", ylim=(0, 30),
           title=f"Device memory per token, {PATTERN}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.2)
    fig.suptitle(f"One NVIDIA H100 80GB, {DATE}", fontsize=10)
    return fig, f"h100_memory_{DATE}.png"


def efficiency(rows, kind, field):
    """time(1) / time(P) for weak scaling, time(1) / (P * time(P)) for strong."""
    base = next(r[field] for r in rows if r["P"] == 1 and r["kind"] == kind)
    return {r["P"]: base / r[field] / (r["P"] if kind == "strong" else 1) for r in rows if r["kind"] == kind}


def plot_rings(plt, results):
    data = read(results, f"2xh100_ring_scaling_{DATE}.json")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind in zip(axes, ("weak", "strong")):
        labels, width = [], 0.2
        for i, (fw, field) in enumerate([(f, x) for f in ("jax", "torch") for x in ("fwd_ms", "fwdbwd_ms")]):
            rows = [r for r in data["rows"] if r["framework"] == fw and r["kind"] == kind and field in r]
            eff = efficiency(rows, kind, field)
            Ps = sorted(eff)
            xs = np.arange(len(Ps)) + (i - 1.5) * width
            bars = ax.bar(xs, [next(r[field] for r in rows if r["P"] == P) for P in Ps], width,
                          label=f"{fw} {field.replace('_ms', '').replace('fwdbwd', 'fwd+bwd')}")
            for b, P in zip(bars, Ps):
                ax.annotate(f"{eff[P]:.0%}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=7)
            labels = [f"P={P}" for P in Ps]
        ax.set_xticks(np.arange(len(labels)), labels)
        what = "n = P x 256K" if kind == "weak" else "n = 1M"
        ax.set(ylabel="time [ms]", title=f"{kind} scaling ({what}); efficiency over the bars")
        ax.legend(fontsize=7)
    fig.suptitle(f"NVIDIA H100 80GB x2 (NCCL), {DATE}: bf16, h=10, d=64, causal, w=(2K,4K,8K,16K,n), "
                 "r=(1,2,4,8,n/16K)", fontsize=9)
    return fig, f"2xh100_ring_scaling_{DATE}.png"


H200 = "h200_bench_2026-11-30"


def plot_h200(plt, results):
    """Time (top) and time over the floor (bottom) vs n, forward and forward+backward."""
    data = read(results, f"{H200}.json")
    rows = sorted((r for r in data["rows"] if "section" not in r), key=lambda r: r["n"])
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    style = {"jax_hg": ("C0", "o-", "JAX, head groups"), "torch_hg": ("C1", "o-", "torch, head groups"),
             "jax_ln": ("C0", "s:", "JAX, longnet mix"), "torch_ln": ("C1", "s:", "torch, longnet mix")}
    floors = {"floor_hg": ("k", "--", "floor, head groups (faster of torch SDPA / JAX cuDNN)"),
              "floor_torch_ln": ("gray", "--", "floor, longnet mix (torch SDPA)")}
    for col, (what, title) in enumerate((("fwd", "forward"), ("fwdbwd", "forward + backward"))):
        top, bottom = axes[0][col], axes[1][col]
        for key, (color, fmt, label) in {**floors, **style}.items():
            pts = [(r["n"], r[f"{key}_{what}"]) for r in rows if f"{key}_{what}" in r]
            top.loglog(*zip(*pts), fmt, color=color, label=label, alpha=0.7 if key in floors else 1.0)
            if key in style:
                ratio = [(r["n"], r[f"{key}_{what}_x_floor"]) for r in rows if f"{key}_{what}_x_floor" in r]
                bottom.semilogx(*zip(*ratio), fmt, color=color, label=label)
        top.set(ylabel="time [ms]", title=f"{title}: time")
        bottom.axhline(1.1, color="green", ls="--", lw=1, label="target: 1.1x the floor")
        bottom.set(xlabel="sequence length n (tokens)", ylabel="time / floor", yscale="log",
                   title=f"{title}: time over the floor of its mix")
        for ax in (top, bottom):
            ax.grid(True, which="both", alpha=0.2)
            ax.legend(fontsize=7)
    c = data["config"]
    fig.suptitle(f"One {data['card']}, 2026-11-30, jax {data['jax']}, torch {data['torch']}: {c['dtype']}, "
                 f"b={c['B']}, h={c['H']}, d={c['D']}, causal, w={tuple(c['W'])}, r={tuple(c['R'])}, "
                 "separate q, k, v, one process", fontsize=9)
    return fig, f"{H200}.png"


BALANCED = "h200_balanced_jax_2026-12-01"


def plot_balanced(plt, results):
    """Projected strong-scaling efficiency (``--project`` rows) of both layouts, fwd and fwd+bwd."""
    rows = [r for r in read(results, f"{BALANCED}.json")["rows"] if r.get("projected")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, case in zip(axes, ("dense_causal_256K", "longnet_1M")):
        mine = [r for r in rows if r["case"] == case]
        base = next(r for r in mine if r["P"] == 1 and r["layout"] == "contiguous")
        for layout, style in (("contiguous", "--"), ("balanced", "-")):
            pts = sorted((r["P"], r) for r in mine if r["layout"] == layout)
            for field, marker in (("fwd_ms", "o"), ("fwdbwd_ms", "s")):
                eff = [base[field] / (P * r[field]) for P, r in pts]
                ax.plot([P for P, _ in pts], eff, style, marker=marker, label=f"{layout} {field[:-3]}")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.1)
        ax.set_xlabel("devices P")
        ax.set_ylabel("time(1) / (P time(P))")
        ax.set_title(case, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("Causal ring strong scaling, projected: plan blocks per device timed on one H200 "
                 "(no communication)", fontsize=9)
    return fig, f"{BALANCED.replace('jax', 'projection')}.png"


MEASURED = "2xh200_balanced_{}_2026-12-01.json"


def balanced_efficiencies(results) -> dict:
    """``{(framework, case, layout): (fwd eff, fwd+bwd eff)}`` at P = 2 over P = 1 (contiguous)."""
    rows = [r for r in read(results, MEASURED.format("jax"))["rows"] if "P" in r and "fwd_ms" in r]
    for P in (1, 2):
        rows += [r for r in read(results, MEASURED.format(f"torch_{P}"))["rows"] if "fwd_ms" in r]
    out = {}
    for r in rows:
        if r["P"] != 2:
            continue
        base = next(b for b in rows if b["framework"] == r["framework"] and b["case"] == r["case"] and b["P"] == 1
                    and b["layout"] == "contiguous")
        out[(r["framework"], r["case"], r["layout"])] = tuple(base[f] / (2 * r[f]) for f in ("fwd_ms", "fwdbwd_ms"))
    return out


def plot_balanced_measured(plt, results):
    eff = balanced_efficiencies(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, case in zip(axes, ("dense_causal_256K", "longnet_1M")):
        keys = [k for k in eff if k[1] == case]
        x = np.arange(len(keys))
        for i, (label, offset) in enumerate((("fwd", -0.2), ("fwd+bwd", 0.2))):
            ax.bar(x + offset, [eff[k][i] for k in keys], 0.4, label=label)
        ax.set_xticks(x, [f"{k[0]}\n{k[2]}" for k in keys], fontsize=8)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_ylim(0, 1.1)
        ax.set_title(case, fontsize=10)
        ax.set_ylabel("time(1) / (2 time(2))")
        ax.legend(fontsize=8)
    fig.suptitle("Causal ring strong scaling, 2 x H200 measured (P = 1 vs 2), 2026-12-01", fontsize=9)
    return fig, "2xh200_balanced_2026-12-01.png"


def documents_bars(results) -> dict:
    """``{case: (no documents, documents before, documents now)}`` fwd+bwd ms at n = 1M (None: out of
    memory), from the Pallas (JAX) and Triton rows (torch) runs of 2026-12-02."""
    jax_rows = [r for r in read(results, "h200_pallas_2026-12-02.json")["rows"]
                if r["section"] == "layer" and r["n"] == 2**20]
    torch_rows = [r for r in read(results, "h200_triton_grads_documents_2026-12-02.json")["rows"] if r["n"] == 2**20]
    bars = {}
    for mix in ("head_groups", "longnet"):
        pick = {(r["documents"], r["kernel"]): r.get("fwdbwd_ms") for r in jax_rows if r["mix"] == mix}
        bars[f"JAX {mix}"] = (pick[0, "cudnn"], pick[4, "xla"], pick[4, "pallas"])
        t = next(r for r in torch_rows if r["mix"] == mix)
        bars[f"torch {mix}"] = (t["fwd_bwd_none_ms"], t.get("fwd_bwd_math_ms"), t["fwd_bwd_rows_ms"])
    return bars


def plot_documents(plt, results):
    bars = documents_bars(results)
    ring = [r for r in read(results, "h200_pallas_ring_auto_2026-12-02.json")["rows"] if r["n"] == 2**20]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw=dict(width_ratios=[2, 1]))
    x = np.arange(len(bars))
    labels = ("no documents (default kernels)", "4 documents, before (XLA / math)",
              "4 documents, now (Pallas / Triton rows)")
    for i, (label, offset) in enumerate(zip(labels, (-0.27, 0, 0.27))):
        values = [v[i] for v in bars.values()]
        axes[0].bar(x + offset, [v or 0 for v in values], 0.27, label=label)
        for xi, v in zip(x, values):
            if v is None:
                axes[0].text(xi + offset, 12, "OOM", ha="center", rotation=90, fontsize=8)
    axes[0].set_xticks(x, list(bars), fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_ylim(5, 2000)
    axes[0].set_ylabel("fwd+bwd ms, n = 1M")
    axes[0].legend(fontsize=7)
    axes[0].set_title("Packed documents", fontsize=10)
    mixes = ("head_groups", "longnet")
    for i, (kernel, offset) in enumerate((("cudnn", -0.2), ("auto", 0.2))):
        values = [next(r["fwdbwd_ms"] for r in ring if r["mix"] == m and r["kernel"] == kernel) for m in mixes]
        axes[1].bar(np.arange(2) + offset, values, 0.4,
                    label="cuDNN" if kernel == "cudnn" else "auto: cuDNN fwd + Pallas bwd")
    axes[1].set_xticks(np.arange(2), [f"JAX {m}" for m in mixes], fontsize=8)
    axes[1].set_ylabel("fwd+bwd ms, n = 1M")
    axes[1].set_ylim(0, 120)
    axes[1].legend(fontsize=7, loc="upper left")
    axes[1].set_title("Simulated ring of 4 (LSE cotangent in every hop)", fontsize=10)
    fig.suptitle(f"One H200, 2026-12-02, {PATTERN}", fontsize=9)
    return fig, "h200_documents_2026-12-02.png"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for plot in (plot_timing, plot_memory, plot_rings, plot_h200, plot_balanced, plot_balanced_measured,
                 plot_documents):
        fig, name = plot(plt, args.results)
        fig.tight_layout()
        out = os.path.join(args.results, name)
        fig.savefig(out, dpi=110)
        print(f"wrote {out}")
    from benchmarks import kernel_table

    out = os.path.join(args.results, f"{KERNEL_TABLE}.png")
    kernel_table.plot(read(args.results, f"{KERNEL_TABLE}.json"), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
