"""Strong scaling of causal rings, contiguous against balanced layout (fixed n, P = 1, 2, 4, ...),
rows flushed to ``--out``; and, for P the host does not have, the per-device compute the plan
gives each layout, from kernel times measured on this GPU.

Cases (bf16, batch 1, 8 heads, head_dim 64, causal, head groups):

* ``dense_causal_256K``: one pattern ``w = n = 262144``, ``r = 1`` (every device on one ring);
* ``longnet_1M``: ``w = (4096, 65536, 1048576)``, ``r = (1, 4, 16)``, ``n = 1048576``.

Efficiency = time(P=1, contiguous) / (P * time(P)). JAX runs sub-meshes of the first P devices in one
process; ``balanced`` keeps the data in balanced order (``ring_dilated_attention`` in a
``shard_map`` over ``to_balanced`` inputs), ``balanced_natural`` is ``sharded_dilated_attention(...,
layout="balanced")`` with natural-order arrays (two permutes each way per array). torch: one process
per GPU under ``torchrun``, each rank passing its shard of the layout.

    python -m benchmarks.balanced_scaling jax --out jax.json [--repeats 10] [--project 2,4,8]
    torchrun --nproc_per_node=P -m benchmarks.balanced_scaling torch --out torch_P.json

``--project``: for each listed P, the plan's blocks per device and hop (``RingUnit.hop_calls``)
timed one kernel call at a time on this GPU (fwd and fwd+bwd of the block kernel, cached by
shape); the critical path is the sum over hops of the slowest device, plus each device's local
units. It leaves out communication, gathers, merges and scatters: a bound on what balancing can
give, not a ring measurement.
"""

from __future__ import annotations

import argparse
import os

from benchmarks.timing import Sweep, time_ms

H, D = 8, 64
CASES = {
    "dense_causal_256K": dict(n=262144, segment_lengths=(262144,), dilation_rates=(1,)),
    "longnet_1M": dict(n=1048576, segment_lengths=(4096, 65536, 1048576), dilation_rates=(1, 4, 16)),
}


SHRINK = 1  # --shrink k divides n and every w by k (a CPU smoke run of the same code)


def _n(case):
    return CASES[case]["n"] // SHRINK


def _kwargs(case):
    c = CASES[case]
    return dict(segment_lengths=tuple(w // SHRINK for w in c["segment_lengths"]), dilation_rates=c["dilation_rates"],
                is_causal=True)


def _powers(limit):
    P = 1
    while P <= limit:
        yield P
        P *= 2


def run_jax(args, sweep: Sweep):
    import jax
    import jax.numpy as jnp

    import ring_jax

    devices = jax.devices()
    sweep.add(**check_jax())
    for case in CASES:
        n, kw = _n(case), _kwargs(case)
        base = None
        for P in _powers(len(devices)):
            mesh = jax.sharding.Mesh(devices[:P], ("sp",), axis_types=(jax.sharding.AxisType.Auto,))
            spec = jax.sharding.PartitionSpec(None, "sp")
            put = lambda x, mesh=mesh, spec=spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))  # noqa: E731
            natural = [put(jax.random.normal(key, (1, n, H, D), jnp.bfloat16))
                       for key in jax.random.split(jax.random.PRNGKey(0), 3)]
            for layout in ("contiguous", "balanced", "balanced_natural"):
                if layout == "balanced_natural" and P == 1:
                    continue
                if layout == "balanced":
                    ring = jax.shard_map(lambda q, k, v: ring_jax.ring_dilated_attention(
                        q, k, v, axis_name="sp", layout="balanced", **kw), mesh=mesh, in_specs=(spec,) * 3,
                        out_specs=spec, check_vma=False)
                    qkv = [put(ring_jax.to_balanced(x, P)) for x in natural]
                else:
                    lay = "contiguous" if layout == "contiguous" else "balanced"
                    ring = lambda q, k, v, mesh=mesh, lay=lay: ring_jax.sharded_dilated_attention(  # noqa: E731
                        q, k, v, mesh=mesh, layout=lay, **kw)
                    qkv = natural
                fwd = jax.jit(ring)
                both = jax.jit(jax.grad(lambda *x, f=ring: f(*x).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
                row = dict(framework="jax", case=case, P=P, n=n, layout=layout)
                try:
                    row.update(fwd_ms=time_ms(fwd, *qkv, repeats=args.repeats),
                               fwdbwd_ms=time_ms(both, *qkv, repeats=args.repeats))
                except Exception as e:  # noqa: BLE001 -- out of memory is a result
                    row["error"] = type(e).__name__ + ": " + str(e)[:300]
                if P == 1 and layout == "contiguous":
                    base = row
                _efficiency(row, base, P)
                sweep.add(**row)
        if args.project:
            for P in args.project:
                for layout in ("contiguous", "balanced"):
                    sweep.add(**project(case, P, layout, args.repeats))


def check_jax(n=32768):
    """On this device's kernels: the simulated balanced ring (4 devices) against one device and the
    contiguous ring, bf16, out and dq relative errors."""
    import jax
    import jax.numpy as jnp

    import ring_jax

    kw = dict(segment_lengths=(2048, 8192, n), dilation_rates=(1, 2, 4), mix="longnet", is_causal=True)
    q, k, v = (jax.random.normal(key, (1, n, H, D), jnp.bfloat16) for key in jax.random.split(jax.random.PRNGKey(2), 3))
    row = dict(framework="jax", case="check_simulated_ring4", n=n, **{k: v for k, v in kw.items() if k != "is_causal"})
    outs = {}
    for name, extra in (("single", {}), ("contiguous", dict(ring_size=4)), ("balanced", dict(ring_size=4, layout="balanced"))):
        f = lambda q, extra=extra: ring_jax.dilated_attention(q, k, v, **kw, **extra)  # noqa: E731
        grad = jax.grad(lambda q, f=f: f(q).astype(jnp.float32).sum())
        outs[name] = [jax.jit(f)(q).astype(jnp.float32), jax.jit(grad)(q).astype(jnp.float32)]
    for name in ("contiguous", "balanced"):
        for i, what in enumerate(("out", "dq")):
            ref = outs["single"][i]
            row[f"{name}_{what}_rel"] = float(jnp.linalg.norm(outs[name][i] - ref) / jnp.linalg.norm(ref))
    return row


def _efficiency(row, base, P):
    for key in ("fwd_ms", "fwdbwd_ms"):
        if base is not None and key in row and key in base:
            row[key.replace("_ms", "_eff")] = round(base[key] / (P * row[key]), 3)


def project(case, P, layout, repeats):
    """The plan's compute per device on this GPU (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    import ring_jax

    n, kw = _n(case), _kwargs(case)
    config = ring_jax.DilatedConfig(**kw)
    plan = ring_jax.get_ring_plan(config, n // P, P, H, H, layout)
    cache = {}

    def kernel(B, mq, mk, heads, causal):  # (fwd ms, fwd+bwd ms) of one block call
        key = (B, mq, mk, heads, causal)
        if key not in cache:
            q = jax.random.normal(jax.random.PRNGKey(0), (B, mq, heads, D), jnp.bfloat16)
            k = jax.random.normal(jax.random.PRNGKey(1), (B, mk, heads, D), jnp.bfloat16)
            f = lambda q, k: ring_jax.block_attention(q, k, k, scale=D ** -0.5, is_causal=causal)  # noqa: E731
            g = jax.grad(lambda q, k: f(q, k)[0].astype(jnp.float32).sum(), argnums=(0, 1))
            cache[key] = (time_ms(jax.jit(f), q, k, repeats=repeats), time_ms(jax.jit(g), q, k, repeats=repeats))
        return cache[key]

    total = [0.0, 0.0]
    for ru in plan.units:
        u, heads = ru.unit, len(ru.unit.heads)
        if ru.group == 1:  # every device: its local segments
            t = kernel(n // P // u.w, u.m, u.m, heads, True)
            total = [a + b for a, b in zip(total, t)]
            continue
        m = ru.local.m
        for hop in range(ru.group):
            per_device = []
            for a in range(ru.group):
                times = [kernel(1, (qs[1] - qs[0]) * m, (ks[1] - ks[0]) * m, heads, hop == 0)
                         for qs, ks in ru.hop_calls(hop, a, True)]
                per_device.append([sum(x[i] for x in times) for i in (0, 1)])
            total = [total[i] + max(d[i] for d in per_device) for i in (0, 1)]
    return dict(framework="jax", case=case, P=P, n=n, layout=layout, projected=True,
                fwd_ms=round(total[0], 3), fwdbwd_ms=round(total[1], 3))


def run_torch(args, sweep: Sweep):
    import torch
    import torch.distributed as dist

    import ring_torch

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    rank, P = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD if P > 1 else None
    for case in CASES:
        n, kw = _n(case), _kwargs(case)
        gen = torch.Generator(device="cuda").manual_seed(rank)
        qkv = [torch.randn(1, n // P, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3)]
        for layout in ("contiguous", "balanced"):
            def fwd(*x, layout=layout):
                with torch.no_grad():
                    return ring_torch.ring_dilated_attention(*x, process_group=group, layout=layout, **kw)

            def both(*x, layout=layout):
                x = [t.detach().requires_grad_() for t in x]
                ring_torch.ring_dilated_attention(*x, process_group=group, layout=layout, **kw).float().sum().backward()
                return [t.grad for t in x]

            row = dict(framework="torch", case=case, P=P, n=n, layout=layout, devices_per_host=torch.cuda.device_count())
            for name, fn in (("fwd_ms", fwd), ("fwdbwd_ms", both)):
                try:
                    row[name] = time_ms(fn, *qkv, repeats=args.repeats)
                except torch.OutOfMemoryError as e:
                    row[name.replace("ms", "error")] = str(e)[:200]
            if rank == 0:
                sweep.add(**row)
    dist.destroy_process_group()


def meta(framework):
    import platform

    info = dict(framework=framework, python=platform.python_version(), heads=H, head_dim=D, dtype="bfloat16")
    if framework == "jax":
        import jax

        info.update(jax=jax.__version__, device=jax.devices()[0].device_kind, devices=jax.device_count())
    else:
        import torch

        info.update(torch=torch.__version__, device=torch.cuda.get_device_name(), devices=torch.cuda.device_count())
    return info


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("framework", choices=("jax", "torch"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per row (median reported)")
    ap.add_argument("--project", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                    help="P values whose per-device compute to project from kernel times (JAX)")
    ap.add_argument("--shrink", type=int, default=1, help="divide n and every w by this (smoke runs)")
    args = ap.parse_args()
    SHRINK = args.shrink
    sweep = Sweep(args.out, 600.0, {**meta(args.framework), "command": " ".join(os.sys.argv)})
    (run_jax if args.framework == "jax" else run_torch)(args, sweep)
