"""The README's kernel table, regenerated in one process on whatever GPU is present: each dilated
layer (``ring_jax`` and ``ring_torch``, both mixes) as a ratio to the bare fused kernels on the
same work, forward and forward+backward, with memory per token; a JSON, a plot and the table.

Workload: bf16, batch 1, 8 heads, head_dim 64, separate q, k, v, causal, segment_lengths
w=(2048, 4096, 8192, 16384), dilation_rates r=(1, 2, 4, 8); n = 16K, 256K, 1M, 4M (K = 1024).

* floor, head groups: the faster of torch ``F.scaled_dot_product_attention`` and JAX
  ``jax.nn.dot_product_attention(..., implementation="cudnn")`` on pre-gathered contiguous rows,
  one call per unit of the head-groups plan (``[n/w_i, h_i, m_i, d]`` torch, ``[n/w_i, m_i, h_i, d]``
  JAX), all calls in one timed function; fwd+bwd is the gradient of the summed outputs w.r.t.
  those rows. Taken per direction: the fwd floor and the fwd+bwd floor may come from different
  frameworks (``floor_*_by`` in the JSON says which).
* floor, longnet: the same with every head on every pattern (head j runs pattern i at offset
  j % r_i; one call per (pattern, offset) group of heads).
* layers: ``ring_jax.dilated_attention(..., is_causal=True)`` under ``jax.jit`` (fwd+bwd:
  ``jax.grad`` of ``out.astype(float32).sum()`` w.r.t. q, k, v) and ``ring_torch.dilated_attention``
  (fwd under ``no_grad``; fwd+bwd: ``out.backward(ones)``); ratio = layer time / floor of its mix.
* memory, bytes per token of fwd+bwd: JAX, the compiled program's ``temp_size_in_bytes / n``;
  torch, ``max_memory_allocated`` above what was allocated before the call (inputs) / n (GPU only).
* time: ``benchmarks.timing.time_ms`` for everything (median of ``--repeats`` after ``--warmup``
  calls, wall clock around a device sync): one clock for both frameworks, so the floor's
  "faster of" compares like with like.

Each cell is flushed to ``--out`` as it finishes and a failure (out of memory: JAX's longnet
fwd+bwd at 4M) is recorded as ``null`` with its error in the row's ``errors``; ``--budget-s``
skips the cells left once spent. Torch runs first at each n, then JAX (whose pool does not shrink).

    python -m benchmarks.kernel_table --out benchmarks/results/h200_kernel_table_<date>.json \\
        --plot benchmarks/results/h200_kernel_table_<date>.png
    python -m benchmarks.kernel_table --table-from benchmarks/results/h200_kernel_table_<date>.json
    python -m benchmarks.kernel_table --device cpu --n 2048 --repeats 1 --out /tmp/t.json  # a check
"""

from __future__ import annotations

import os

# Both frameworks share one GPU in this process. JAX preallocates 75% of the card at start-up by
# default, which would leave torch too little: allocate on demand instead (set before jax is
# imported; a caller's own setting wins). Should torch still run short of memory after JAX's pool
# has grown, XLA_PYTHON_CLIENT_ALLOCATOR=platform makes JAX hand memory back (at a cost in time).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402

from benchmarks._floors import jax_floor, jax_layer, jax_rows, torch_floor, torch_layer, torch_rows, unit_shapes  # noqa: E402
from benchmarks.timing import Sweep, emit, time_ms  # noqa: E402

K = 1024
H, D = 8, 64
W, R = (2048, 4096, 8192, 16384), (1, 2, 4, 8)
W_CPU = (64, 128, 256, 512)  # --device cpu: the same pattern shrunk 32x, so a check takes seconds
MIXES = {"hg": "head_groups", "ln": "longnet"}
DIRS = ("fwd", "fwdbwd")
IMPLS = ("jax", "torch")
COLUMNS = (("jax", "hg", "JAX head groups"), ("torch", "hg", "torch head groups"),
           ("jax", "ln", "JAX longnet*"), ("torch", "ln", "torch longnet*"))


def parse_n(text: str) -> list[int]:
    """``"16K,256K,1M,4M"`` (K = 1024, M = 1024 K) or plain integers."""
    scale = {"K": K, "M": K * K}
    return [int(x[:-1]) * scale[x[-1].upper()] if x[-1].upper() in scale else int(x) for x in text.split(",")]


def label_n(n: int) -> str:
    return f"{n // K // K}M" if n % (K * K) == 0 else f"{n // K}K" if n % K == 0 else str(n)


class Row:
    """One n's row, already in the sweep's data: each cell written to ``--out`` as it finishes."""

    def __init__(self, sweep: Sweep, n: int):
        self.sweep, self.d = sweep, {"n": n, "errors": {}}
        sweep.data["rows"].append(self.d)

    def cell(self, key, fn, after_error=None):
        self.d[key] = None
        if not self.sweep.left():
            self.d["errors"][key] = "skipped: --budget-s spent"
        else:
            try:
                self.d[key] = fn()
            except Exception as e:  # noqa: BLE001 -- out of memory is a result
                self.d["errors"][key] = f"{type(e).__name__}: {str(e)[:300]}"
        if key in self.d["errors"] and after_error is not None:
            after_error()  # out of the except block: the traceback no longer holds the failed call's arrays
        with open(self.sweep.out, "w") as f:
            json.dump(self.sweep.data, f, indent=1)

    def finish(self):
        """Floors (the faster framework per mix and direction) and ratios; prints the row."""
        d = self.d
        for mix in MIXES:
            for dr in DIRS:
                got = {fw: d.get(f"floor_{mix}_{fw}_{dr}_ms") for fw in IMPLS}
                got = {fw: t for fw, t in got.items() if t is not None}
                by = min(got, key=got.get) if got else None
                floor = got.get(by)
                d[f"floor_{mix}_{dr}_ms"], d[f"floor_{mix}_{dr}_by"] = floor, by
                for impl in IMPLS:
                    t = d.get(f"{impl}_{mix}_{dr}_ms")
                    d[f"{impl}_{mix}_ratio_{dr}"] = t / floor if t is not None and floor else None
        emit(d, self.sweep.data, self.sweep.out)


def run_torch(row: Row, n: int, w, args):
    import torch

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    free = (lambda: (gc.collect(), torch.cuda.empty_cache())) if cuda else gc.collect
    timed = lambda fn, *a: time_ms(fn, *a, warmup=args.warmup, repeats=args.repeats)  # noqa: E731
    fwd, both = torch_floor()
    for mix, name in MIXES.items():
        shapes = unit_shapes(n, name, w, R, H)
        for dr, fn in zip(DIRS, (fwd, both)):
            row.cell(f"floor_{mix}_torch_{dr}_ms", lambda fn=fn: timed(fn, torch_rows(shapes, D, dev)), free)
    qkv = [torch.randn(1, n, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    for mix, name in MIXES.items():
        fwd, both = torch_layer(segment_lengths=w, dilation_rates=R, mix=name, is_causal=True)
        if cuda:
            row.cell(f"torch_{mix}_peak_b_per_tok", lambda: torch_peak(both, qkv, dev) / n, free)
        row.cell(f"torch_{mix}_fwd_ms", lambda: timed(fwd, *qkv), free)
        row.cell(f"torch_{mix}_fwdbwd_ms", lambda: timed(both, *qkv), free)
    del qkv
    free()


def torch_peak(both, qkv, dev) -> int:
    """Bytes allocated at the peak of one fwd+bwd above those allocated before it."""
    import torch

    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    grads = both(*qkv)
    torch.cuda.synchronize(dev)
    del grads
    return torch.cuda.max_memory_allocated(dev) - before


def run_jax(row: Row, n: int, w, args):
    import jax

    from benchmarks.long_context import inputs

    timed = lambda fn, *a: time_ms(fn, *a, warmup=args.warmup, repeats=args.repeats)  # noqa: E731
    with jax.default_device(jax.devices("cpu" if args.device == "cpu" else "gpu")[0]):
        fwd, both = jax_floor(args.implementation)
        for mix, name in MIXES.items():
            shapes = unit_shapes(n, name, w, R, H)
            for dr, fn in zip(DIRS, (fwd, both)):
                row.cell(f"floor_{mix}_jax_{dr}_ms", lambda fn=fn: timed(fn, jax_rows(shapes, D)), gc.collect)
        q, k, v = inputs(n)
        for mix, name in MIXES.items():
            fwd, both = jax_layer(segment_lengths=w, dilation_rates=R, mix=name, is_causal=True)
            row.cell(f"jax_{mix}_temp_b_per_tok",
                     lambda: both.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes / n)
            row.cell(f"jax_{mix}_fwd_ms", lambda: timed(fwd, q, k, v), gc.collect)
            row.cell(f"jax_{mix}_fwdbwd_ms", lambda: timed(both, q, k, v), gc.collect)
        del q, k, v, fwd, both
    gc.collect()
    jax.clear_caches()  # this n's compiled programs are not needed again


def meta(args, argv, w) -> dict:
    import jax
    import torch

    try:
        import flax
        flax_version = flax.__version__
    except ImportError:
        flax_version = None
    cuda = args.device != "cpu"
    return dict(device=torch.cuda.get_device_name() if cuda else "cpu", jax_device=jax.devices()[0].device_kind,
                date=datetime.date.today().isoformat(), torch=torch.__version__, jax=jax.__version__,
                flax=flax_version, command="python -m benchmarks.kernel_table " + shlex.join(argv),
                pattern=dict(segment_lengths=list(w), dilation_rates=list(R), heads=H, head_dim=D, batch=1,
                             dtype="bfloat16", causal=True, qkv="separate"),
                jax_floor_implementation=args.implementation, repeats=args.repeats, warmup=args.warmup,
                clock="benchmarks.timing.time_ms: median wall clock around a device sync",
                env={k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR")})


def _ms(x) -> str:
    return "–" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _missing(d, key) -> str:
    err = d.get("errors", {}).get(key, "")
    return "OOM" if ("RESOURCE_EXHAUSTED" in err or "out of memory" in err.lower()) else "–"


def _ratio(d, impl, mix, dr) -> str:
    x = d.get(f"{impl}_{mix}_ratio_{dr}")
    return _missing(d, f"{impl}_{mix}_{dr}_ms") if x is None else f"{x:.2f}×"


def table(data) -> str:
    """The markdown table (and the memory table under it) of a result JSON."""
    rows = sorted(data["rows"], key=lambda d: d["n"])
    out = ["| n | floor fwd / fwd+bwd | " + " | ".join(c[2] for c in COLUMNS) + " |", "| --- " * 6 + "|"]
    for d in rows:
        floor = " / ".join(_ms(d.get(f"floor_hg_{dr}_ms")) for dr in DIRS)
        ln = " / ".join(_ms(d.get(f"floor_ln_{dr}_ms")) for dr in DIRS)
        cells = [" / ".join(_ratio(d, impl, mix, dr) for dr in DIRS) for impl, mix, _ in COLUMNS]
        out.append(f"| {label_n(d['n'])} | {floor} (longnet {ln}) | " + " | ".join(cells) + " |")
    out += ["", "Floors in ms, each layer as a ratio to the floor of its mix, fwd / fwd+bwd. *longnet against "
            "its own floor (in brackets): every head on every pattern.", "",
            "| n | " + " | ".join(f"{c[2].rstrip('*')}, B/token" for c in COLUMNS) + " |", "| --- " * 5 + "|"]
    for d in rows:
        cells = []
        for impl, mix, _ in COLUMNS:
            key = f"{impl}_{mix}_{'temp' if impl == 'jax' else 'peak'}_b_per_tok"
            cells.append(_missing(d, key) if d.get(key) is None else f"{d[key]:.0f}")
        out.append(f"| {label_n(d['n'])} | " + " | ".join(cells) + " |")
    out += ["", "Memory of fwd+bwd per token: JAX, the compiled program's temporaries; torch, the peak "
            "allocated above the inputs."]
    return "\n".join(out)


def plot(data, path: str):
    """Ratio to the floor vs n, the four layers, forward and forward+backward, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = sorted(data["rows"], key=lambda d: d["n"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, dr, title in zip(axes, DIRS, ("forward", "forward + backward")):
        for impl, mix, label in COLUMNS:
            pts = [(d["n"], d.get(f"{impl}_{mix}_ratio_{dr}")) for d in rows]
            pts = [p for p in pts if p[1] is not None]
            if pts:
                ax.plot(*zip(*pts), "o-" if mix == "hg" else "s:", color="C0" if impl == "jax" else "C1",
                        label=label.rstrip("*"))
        ax.axhline(1.0, color="k", ls="--", lw=1, label="floor of the mix")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: label_n(int(round(x)))))
        ax.set_yscale("log")
        ax.set(xlabel="sequence length n (tokens)", ylabel="time / floor", title=title)
        ax.grid(True, which="both", alpha=0.2)
        ax.legend(fontsize=7)
    m = data["meta"]
    p = m["pattern"]
    fig.suptitle(f"{m['device']}, {m['date']}, jax {m['jax']}, torch {m['torch']}: bf16, b=1, h={p['heads']}, "
                 f"d={p['head_dim']}, causal, w={tuple(p['segment_lengths'])}, r={tuple(p['dilation_rates'])}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="the result JSON (rewritten after every cell)")
    ap.add_argument("--plot", help="a PNG of the ratios vs n")
    ap.add_argument("--table-from", help="print the table of this result JSON and exit (runs nothing)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a check of the script (w shrunk 32x, JAX's xla attention)")
    ap.add_argument("--n", default=None, help="lengths, e.g. 16K,256K,1M,4M (the default; cpu: 2K)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=540, help="cells left after this many seconds are skipped")
    ap.add_argument("--implementation", default=None, help="of jax.nn.dot_product_attention (cudnn; cpu: xla)")
    args = ap.parse_args(argv)
    if args.table_from:
        with open(args.table_from) as f:
            print(table(json.load(f)))
        return
    if not args.out:
        ap.error("--out is required unless --table-from")
    cpu = args.device == "cpu"
    args.implementation = args.implementation or ("xla" if cpu else "cudnn")
    w = W_CPU if cpu else W
    sweep = Sweep(args.out, args.budget_s, meta(args, argv, w))
    for n in parse_n(args.n or ("2K" if cpu else "16K,256K,1M,4M")):
        if not sweep.left():
            break
        row = Row(sweep, n)
        run_torch(row, n, w, args)
        run_jax(row, n, w, args)
        row.finish()
    if args.plot:
        plot(sweep.data, args.plot)
    print(table(sweep.data))
    return sweep.data


if __name__ == "__main__":
    main()
