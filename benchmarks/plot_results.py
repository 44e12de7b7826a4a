"""Plots the committed H100 results beside the anchors (bare segment kernels, dense flash, the seed
system), log-log with the slope of each curve from 32K on.

    python -m benchmarks.plot_results [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def slope(n, t):
    n, t = np.asarray(n, float), np.asarray(t, float)
    keep = n >= 32768
    return float(np.polyfit(np.log(n[keep]), np.log(t[keep]), 1)[0]) if keep.sum() > 1 else float("nan")


def load(results):
    def read(name):
        with open(os.path.join(results, name)) as f:
            return json.load(f)

    anchors = read("anchors_h100_2026-11-25.json")["rows"]
    cudnn = [r for r in read("h100_jax_cudnn_2026-11-25.json")["rows"] if r["section"] == "scaling_cudnn" and "fwd_ms" in r]
    xla = [r for r in read("h100_jax_sweep_2026-11-25.json")["rows"] if r["section"] == "scaling"]
    torch = [r for r in read("h100_torch_sweep_2026-11-25.json")["rows"] if r["section"] == "scaling"]
    series = {
        "JAX cuDNN, head groups": [(r["n"], r["fwd_ms"], r["fwdbwd_ms"]) for r in cudnn if r["mix"] == "head_groups"],
        "JAX cuDNN, longnet mix": [(r["n"], r["fwd_ms"], r["fwdbwd_ms"]) for r in cudnn if r["mix"] == "longnet"],
        "JAX XLA kernel, head groups": [(r["n"], r["fwd_ms"], r["fwdbwd_ms"]) for r in xla],
        "torch (efficient attn), head groups": [(r["n"], r["fwd_ms"], r["fwdbwd_ms"]) for r in torch],
    }
    refs = {
        "anchor: bare segment kernels (floor)": [(r["n"], r["floor_fwd_ms"], r["floor_fwdbwd_ms"]) for r in anchors],
        "anchor: dense causal flash": [(r["n"], r["dense_sdpa_fwd_ms"], None) for r in anchors if "dense_sdpa_fwd_ms" in r],
        "anchor: seed system (DarcStar)": [(r["n"], r["ds_fwd_ms"], None) for r in anchors],
    }
    return series, refs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series, refs = load(args.results)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for col, (ax, title) in enumerate(zip(axes, ("forward", "forward + backward"))):
        for label, rows in series.items():
            n, t = [r[0] for r in rows], [r[1 + col] for r in rows]
            ax.loglog(n, t, "o-", label=f"{label} (slope {slope(n, t):.2f})")
        for label, rows in refs.items():
            rows = [r for r in rows if r[1 + col] is not None]
            if rows:
                ax.loglog([r[0] for r in rows], [r[1 + col] for r in rows], "s--", alpha=0.6, label=label)
        ax.set(xlabel="sequence length n (tokens)", ylabel="time [ms]",
               title=f"{title}: bf16, b=1, h=8, d=64, causal, w=(2K,4K,8K,16K), r=(1,2,4,8)")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.2)
    fig.suptitle("One NVIDIA H100 80GB, 2026-11-25 (slopes fitted from 32K on)", fontsize=10)
    fig.tight_layout()
    out = os.path.join(args.results, "h100_scaling_2026-11-25.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
