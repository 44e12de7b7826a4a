"""Host time of the single-device torch layer against the time its kernels need, in one process:
the bare kernels (torch SDPA on pre-gathered per-unit rows, ``benchmarks._floors``), the layer
eager, the layer replayed from a ``torch.cuda.CUDAGraph``, and ``torch.compile`` (default mode,
and on CUDA ``mode="reduce-overhead"``, inductor's own CUDA graphs), forward and forward+backward.

Per call, for each row:

* ``host_ms``: wall time of ``--calls`` calls launched back to back without a sync, divided by
  the calls (median of ``--repeats``): what the Python side costs when the GPU keeps up;
* ``device_ms`` (CUDA): CUDA events around one call queued behind a ``torch.cuda._sleep``
  kernel long enough for all its launches to be queued first, so the GPU runs them without
  gaps: what the kernels cost (one call: many calls would fill CUDA's launch queue, and the
  host would then feed the GPU at its own pace);
* ``wall_ms``: one call between two syncs (median of ``--repeats``), for reference;
* ``host_over_kernels``: ``host_ms`` over the bare kernels' ``device_ms`` (CPU: their
  ``wall_ms``) of the same mix and direction; the target of issue 15 is <= 2;
* ``rel_err`` (layer programs): the largest relative L2 difference of the output (``fwd``) or of
  dq, dk, dv (``fwdbwd``) from the eager layer's, so a fast program is also a right one.

The anchors' pattern: bf16, b=1, h=8, d=64, causal, w=(2K, 4K, 8K, 16K), r=(1, 2, 4, 8).

    python -m benchmarks.torch_host --out host.json                      # H200, n = 16K
    python -m benchmarks.torch_host --out host.json --device cpu --n 4096  # a check on the CPU
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

from benchmarks._floors import torch_floor, torch_rows, unit_shapes
from benchmarks.timing import Sweep

W, R = (2048, 4096, 8192, 16384), (1, 2, 4, 8)
SLEEP_CYCLES_PER_MS = 2_000_000  # GPU clock cycles per millisecond (about 2 GHz), for the sleep kernel


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_ms(fn, args, calls: int, repeats: int, device) -> float:
    """Milliseconds of host time per call of ``calls`` calls without a sync (median of repeats)."""
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        samples.append((time.perf_counter() - start) * 1e3 / calls)
        _sync(device)
    return statistics.median(samples)


def device_ms(fn, args, repeats: int, host: float) -> float:
    """Milliseconds of GPU time of one call: events around it while it waits, queued, behind a
    sleep kernel of twice its host time (median of repeats)."""
    import torch

    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(2 * host * SLEEP_CYCLES_PER_MS) + 1000)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def capture(step, device):
    """A function replaying ``step()`` captured in a CUDA graph (after a warm-up on a side
    stream) and returning the captured outputs."""
    import torch

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return lambda: (graph.replay(), outputs)[1]


def layer_programs(kw: dict, qkv, device, compile_backend: str, names=("layer", "graph", "compiled")):
    """Yields ``(name, direction, fn, args)`` of the layer's programs among ``names``: eager
    (``layer``), CUDA graph replays (``graph``, CUDA) and compiled (``compiled``, and on CUDA
    with inductor ``compiled_cudagraphs``); directions ``fwd`` and ``fwdbwd`` (the gradient of ``sum(out)``). Lazily: each
    compiled variant starts from a reset compiler once the previous one is measured."""
    import torch

    import ring_torch

    attention = lambda q, k, v: ring_torch.dilated_attention(q, k, v, **kw)  # noqa: E731

    def fwd(fn):
        def run(q, k, v):
            with torch.no_grad():
                return [fn(q, k, v)]
        return run

    def both(fn):
        def run(q, k, v):
            xs = [t.detach().requires_grad_() for t in (q, k, v)]
            out = fn(*xs)
            out.backward(torch.ones_like(out))
            return [t.grad for t in xs]
        return run

    def fwd_static():
        with torch.no_grad():
            return [attention(*static)]

    if "layer" in names:
        yield "layer", "fwd", fwd(attention), qkv
        yield "layer", "fwdbwd", both(attention), qkv
    static = [t.detach().clone().requires_grad_() for t in qkv]
    if device.type == "cuda" and "graph" in names:
        ones = torch.ones_like(static[0])

        def graph_both():
            for t in static:
                t.grad = None
            attention(*static).backward(ones)
            return [t.grad for t in static]

        yield "graph", "fwd", capture(fwd_static, device), ()
        yield "graph", "fwdbwd", capture(graph_both, device), ()
    compiled = {"compiled": dict(backend=compile_backend)}
    if device.type == "cuda" and compile_backend == "inductor":
        compiled["compiled_cudagraphs"] = dict(mode="reduce-overhead")
    for name, options in compiled.items():
        if name not in names:
            continue
        torch._dynamo.reset()
        fn = torch.compile(attention, **options)
        yield name, "fwd", fwd(fn), qkv
        yield name, "fwdbwd", both(fn), qkv


def measure(fn, args, opts, device) -> dict:
    """``host_ms``, ``device_ms`` (CUDA; else None) and ``wall_ms`` of ``fn(*args)``."""
    for _ in range(opts.warmup):
        fn(*args)
    _sync(device)
    host = host_ms(fn, args, opts.calls, opts.repeats, device)
    dev = device_ms(fn, args, opts.repeats, host) if device.type == "cuda" else None
    return {"host_ms": host, "device_ms": dev, "wall_ms": wall_ms(fn, args, opts.repeats, device)}


def wall_ms(fn, args, repeats: int, device) -> float:
    """Milliseconds of one call between two syncs (median of repeats; graph replays return
    nothing to sync on, so the device is synchronised, not the result)."""
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn(*args)
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def run(sweep: Sweep, n: int, mix: str, opts, device):
    import torch

    dtype = getattr(torch, opts.dtype)
    base = {"n": n, "mix": mix}
    kernels = {}
    fwd, both = torch_floor()
    rows = torch_rows(unit_shapes(n, mix, W, R, opts.heads), opts.head_dim, device, dtype)
    for direction, fn in (("fwd", fwd), ("fwdbwd", both)):
        kernels[direction] = _row(sweep, base, "kernels", direction, fn, (rows,), opts, device, "self", None)
    names = tuple(opts.names.split(","))
    del rows
    qkv = [torch.randn(1, n, opts.heads, opts.head_dim, device=device, dtype=dtype) for _ in range(3)]
    kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True)
    programs = layer_programs(kw, qkv, device, opts.compile_backend, names)
    reference = {}
    while sweep.left():
        try:
            name, direction, fn, args = next(programs)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - a capture or compile failed: its row, then the next mix
            sweep.add(**base, name="setup", error=f"{type(e).__name__}: {e}"[:500])
            return
        if direction not in reference:  # the first program is eager (or stands in for it)
            reference[direction] = [t.detach().clone() for t in fn(*args)]
        _row(sweep, base, name, direction, fn, args, opts, device, kernels[direction], reference[direction])


def rel_err(got, want) -> float:
    """The largest relative L2 difference of the tensors ``got`` from ``want``."""
    return max(((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
               for a, b in zip(got, want))


def _row(sweep, base, name, direction, fn, args, opts, device, kernels, reference) -> dict | None:
    """Measures one program and adds its row (or its error); returns the measurement.
    ``kernels``: the bare kernels' measurement of this direction (``"self"``: this one; None:
    they failed) for ``host_over_kernels``; ``reference``: the eager layer's outputs (None: no
    check)."""
    row = dict(base, name=name, direction=direction)
    try:
        if reference is not None:
            row["rel_err"] = rel_err(fn(*args), reference)
        got = measure(fn, args, opts, device)
    except Exception as e:  # noqa: BLE001 - a program that cannot run is a row, not the end
        sweep.add(**row, error=f"{type(e).__name__}: {e}"[:500])
        return None
    kernels = got if kernels == "self" else kernels
    if kernels is not None:
        floor = kernels["device_ms"] if kernels["device_ms"] is not None else kernels["wall_ms"]
        got["host_over_kernels"] = got["host_ms"] / floor
    sweep.add(**row, **got)
    return got


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file of the rows (rewritten after each)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--n", default="16384", help="sequence lengths, comma-separated")
    ap.add_argument("--mix", default="head_groups,longnet", help="mixes, comma-separated")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--calls", type=int, default=20, help="calls per host-time sample")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: a quick check)")
    ap.add_argument("--names", default="layer,graph,compiled,compiled_cudagraphs",
                    help="layer programs to measure besides the bare kernels, comma-separated")
    ap.add_argument("--budget-s", type=float, default=600)
    opts = ap.parse_args(argv)

    import torch

    device = torch.device(opts.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {"device": name, "torch": torch.__version__, "heads": opts.heads, "head_dim": opts.head_dim,
            "dtype": opts.dtype, "segment_lengths": W, "dilation_rates": R, "causal": True,
            "calls": opts.calls, "repeats": opts.repeats,
            "command": "python -m benchmarks.torch_host " + shlex.join(argv)}
    sweep = Sweep(opts.out, opts.budget_s, meta)
    for n in (int(x) for x in opts.n.split(",")):
        for mix in opts.mix.split(","):
            if sweep.left():
                run(sweep, n, mix, opts, device)
    return sweep.data


if __name__ == "__main__":
    main()
