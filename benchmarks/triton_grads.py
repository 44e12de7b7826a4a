"""torch on CUDA: the Triton backward over strided rows (``ring_torch._triton_rows.grads_into``:
dq, dk, dv written or added into their rows in place) against the aten backward (cuDNN on sm90,
fed dense row copies), in one process.

1. A sweep of :class:`~ring_torch._triton_rows.GradConfig` tiles at one n: the layer's
   forward+backward (``head_groups``) with each, against the table's configuration as it is.
2. With the fastest tiles, at every n, both mixes: forward+backward time and peak memory above
   the inputs, the table's configuration (``ring_torch._kernels.ROWS_CONFIGS``) with and without
   the rows backward, alternating; the largest |difference| of the gradients, and at the
   smallest n each one's error against float32 math.
3. Packed documents (``segment_ids``: 4 equal documents), both mixes: the layer forward and
   forward+backward with the rows kernels masking by document (the table as it is), without
   ``segment_ids``, and with the math kernel (the rows kernels off).
4. Dropout (``dropout_p=0.1``), both mixes: the layer with dropout drawn in the rows kernels
   (``ROWS_TESTED["dropout"]`` naming this card), with the math kernel (as dispatched without it),
   and without dropout; the largest |difference| of the outputs of the two dropout paths.
5. A simulated ring of 4 (``ring_size=4``) with 4 packed documents, both mixes: the hops' blocks
   by the rows kernels (``ROWS_TESTED["ring"]`` naming this card), by the math kernel, and the
   ring without documents.

bf16, batch 1, h=8, d=64, causal, w=(2048, 4096, 8192, 16384), r=(1, 2, 4, 8); the backward of
``out.backward(ones)`` as in ``benchmarks.kernel_table``.

    python -m benchmarks.triton_grads --out benchmarks/results/triton_grads.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time

W, R = (2048, 4096, 8192, 16384), (1, 2, 4, 8)
# (dkv_block_m, dkv_block_n, dq_block_m, dq_block_n, num_warps, num_stages)
GRAD_CONFIGS = [(32, 64, 64, 32, 4, 2), (32, 128, 128, 32, 4, 2), (32, 128, 128, 32, 4, 3),
                (32, 128, 128, 32, 4, 4), (32, 128, 128, 64, 4, 3), (64, 128, 128, 64, 8, 3),
                (64, 128, 128, 32, 8, 3), (32, 64, 64, 32, 4, 3), (64, 64, 64, 64, 4, 3)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/triton_grads.json")
    ap.add_argument("--sizes", default="16384,262144,1048576,4194304")
    ap.add_argument("--sweep-n", type=int, default=1048576)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2, help="alternations of the variants at each n")
    ap.add_argument("--stages", default="sweep,sizes,documents,dropout,ring", help="which of the stages to run")
    ap.add_argument("--doc-sizes", default="262144,1048576")
    ap.add_argument("--grad-config", default="32,128,128,64,4,3", help="the tiles when the sweep is not run")
    args = ap.parse_args()
    stages = args.stages.split(",")

    import torch
    import triton

    import ring_torch
    import ring_torch._kernels as kernels
    from benchmarks._floors import torch_layer
    from benchmarks.kernel_table import torch_peak
    from benchmarks.timing import time_ms
    from ring_torch._triton_rows import GradConfig, RowsConfig

    dev = torch.device("cuda")
    key = (tuple(torch.cuda.get_device_capability(dev)), 64)
    table = kernels.ROWS_CONFIGS.get(key) or RowsConfig(in_place_heads=False)
    rows_out, t0 = [], time.time()

    def use(conf):
        kernels.ROWS_CONFIGS[key] = conf

    def grads(both, qkv):
        return [g.float() for g in both(*qkv)]

    best = (GradConfig(*(int(x) for x in args.grad_config.split(","))), None)
    # 1. the sweep
    n = args.sweep_n if "sweep" in stages else 0
    qkv = [torch.randn(1, n, 8, 64, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    _, both = torch_layer(segment_lengths=W, dilation_rates=R, mix="head_groups", is_causal=True)
    use(table)
    base_ms = time_ms(both, *qkv, repeats=args.repeats) if n else None
    ref = grads(both, qkv) if n else None
    for c in GRAD_CONFIGS if n else ():
        conf = dataclasses.replace(table, backward=GradConfig(*c))
        use(conf)
        try:
            got = grads(both, qkv)
            diff = max((g - r).abs().max().item() for g, r in zip(got, ref))
            ms = time_ms(both, *qkv, repeats=args.repeats)
        except Exception as e:  # a configuration that does not compile or fit
            print(f"config {c}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        rows_out.append(dict(stage="sweep", n=n, grad_config=c, fwd_bwd_ms=ms, aten_fwd_bwd_ms=base_ms,
                             max_abs_diff_grads=diff))
        print(f"sweep n={n} {c}: fwd+bwd {ms:.3f} ms, aten backward {base_ms:.3f} ms, |d grads| {diff:.2e} "
              f"[{time.time() - t0:.0f}s]", flush=True)
        if best[1] is None or ms < best[1]:
            best = (GradConfig(*c), ms)
    del qkv, ref
    torch.cuda.empty_cache()
    print("best", best, flush=True)

    # 2. every n, both mixes
    sizes = [int(x) for x in args.sizes.split(",")] if "sizes" in stages else []
    variants = (("aten", table), ("rows", dataclasses.replace(table, backward=best[0])))
    for n in sizes:
        qkv = [torch.randn(1, n, 8, 64, device=dev, dtype=torch.bfloat16) for _ in range(3)]
        for mix in ("head_groups", "longnet"):
            _, both = torch_layer(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True)
            row = dict(stage="sizes", n=n, mix=mix, grad_config=dataclasses.astuple(best[0]))
            outs = {}
            for rep in range(args.reps):
                for label, conf in variants:
                    use(conf)
                    try:
                        row[f"peak_b_per_token_{label}_{rep}"] = torch_peak(both, qkv, dev) / n
                        row[f"fwd_bwd_{label}_ms_{rep}"] = time_ms(both, *qkv, repeats=args.repeats)
                    except torch.OutOfMemoryError:
                        row[f"oom_{label}"] = True
                        torch.cuda.empty_cache()
                        continue
                    if rep == 0:
                        outs[label] = grads(both, qkv)
            if len(outs) == 2:
                row["max_abs_diff_grads"] = max((a - b).abs().max().item() for a, b in zip(outs["rows"], outs["aten"]))
            if n == min(sizes):  # errors against float32 math
                xs = [x.float().requires_grad_() for x in qkv]
                out = ring_torch.dilated_attention(*xs, segment_lengths=W, dilation_rates=R, mix=mix,
                                                   is_causal=True, backend="math")
                out.backward(torch.ones_like(out))
                for label in outs:
                    row[f"grad_err_vs_fp32_{label}"] = max((g - x.grad).abs().max().item()
                                                           for g, x in zip(outs[label], xs))
                del xs, out
            del outs
            rows_out.append(row)
            print(json.dumps(row), f"[{time.time() - t0:.0f}s]", flush=True)
        del qkv
        torch.cuda.empty_cache()
    # 3. packed documents
    use(table)
    for n in [int(x) for x in args.doc_sizes.split(",")] if "documents" in stages else []:
        qkv = [torch.randn(1, n, 8, 64, device=dev, dtype=torch.bfloat16) for _ in range(3)]
        ids = (torch.arange(n, device=dev) * 4 // n)[None]
        for mix in ("head_groups", "longnet"):
            row = dict(stage="documents", n=n, mix=mix, documents=4)
            for label, conf, kw in (("none", table, {}), ("rows", table, dict(segment_ids=ids)),
                                    ("math", None, dict(segment_ids=ids))):
                kernels.ROWS_CONFIGS.pop(key, None)
                if conf is not None:
                    use(conf)
                fwd, both = torch_layer(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True, **kw)
                reps = 2 if label == "math" else args.repeats
                try:
                    row[f"fwd_{label}_ms"] = time_ms(fwd, *qkv, repeats=reps, warmup=1)
                    row[f"fwd_bwd_{label}_ms"] = time_ms(both, *qkv, repeats=reps, warmup=1)
                except torch.OutOfMemoryError:  # the math kernel's score blocks
                    row[f"oom_{label}"] = True
                    torch.cuda.empty_cache()
            use(table)
            rows_out.append(row)
            print(json.dumps(row), f"[{time.time() - t0:.0f}s]", flush=True)
        del qkv
        torch.cuda.empty_cache()
    use(table)
    if "dropout" in stages:
        rows_out += _routed(dev, key[0], "dropout", [int(x) for x in args.doc_sizes.split(",")], args.repeats, t0)
    if "ring" in stages:
        rows_out += _routed(dev, key[0], "ring", [int(x) for x in args.doc_sizes.split(",")], args.repeats, t0)
    meta = dict(card=torch.cuda.get_device_name(dev), torch=torch.__version__, triton=triton.__version__,
                host=platform.node(), date=time.strftime("%Y-%m-%d"), table=dataclasses.astuple(table),
                best=dataclasses.astuple(best[0]), command=" ".join(["python -m benchmarks.triton_grads", *sys.argv[1:]]))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows_out), f, indent=1)
    print("wrote", args.out)


def _routed(dev, capability, feature: str, sizes, repeats: int, t0: float) -> list[dict]:
    """Stages 4 and 5: a ``ROWS_TESTED`` feature on (``rows``) and off (``math``), and the call
    without its masks (``none``), forward and forward+backward, both mixes."""
    import torch

    import ring_torch
    import ring_torch._kernels as kernels
    from benchmarks.timing import time_ms

    rows = []
    saved = set(kernels.ROWS_TESTED[feature])
    for n in sizes:
        qkv = [torch.randn(1, n, 8, 64, device=dev, dtype=torch.bfloat16) for _ in range(3)]
        if feature == "dropout":
            call, extra = ring_torch.dilated_attention, dict(dropout_p=0.1, dropout_seed=1)
        else:
            call = lambda *x, **kw: ring_torch.ring_dilated_attention(*x, ring_size=4, **kw)  # noqa: E731
            extra = dict(segment_ids=(torch.arange(n, device=dev) * 4 // n)[None])
        for mix in ("head_groups", "longnet"):
            row = dict(stage=feature, n=n, mix=mix)
            outs = {}
            for label, on, kw in (("none", False, {}), ("rows", True, extra), ("math", False, extra)):
                kernels.ROWS_TESTED[feature] = {tuple(capability)} if on else set()
                base = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True, **kw)

                def fwd(q, k, v):
                    with torch.no_grad():
                        return call(q, k, v, **base)

                def both(q, k, v):
                    xs = [t.detach().requires_grad_() for t in (q, k, v)]
                    out = call(*xs, **base)
                    out.backward(torch.ones_like(out))
                    return [t.grad for t in xs]

                reps = 2 if label == "math" else repeats
                try:
                    outs[label] = fwd(*qkv).float()
                    row[f"fwd_{label}_ms"] = time_ms(fwd, *qkv, repeats=reps, warmup=1)
                    row[f"fwd_bwd_{label}_ms"] = time_ms(both, *qkv, repeats=reps, warmup=1)
                except torch.OutOfMemoryError:  # the math kernel's score blocks
                    row[f"oom_{label}"] = True
                    outs.pop(label, None)
                    torch.cuda.empty_cache()
            if "rows" in outs and "math" in outs:
                row["max_abs_diff_out_rows_math"] = (outs["rows"] - outs["math"]).abs().max().item()
            del outs
            rows.append(row)
            print(json.dumps(row), f"[{time.time() - t0:.0f}s]", flush=True)
        del qkv
        torch.cuda.empty_cache()
    kernels.ROWS_TESTED[feature] = saved
    return rows


if __name__ == "__main__":
    main()
