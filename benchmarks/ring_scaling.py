"""Weak and strong scaling of the rings over the GPUs of one host, rows flushed to ``--out``.

* weak: fixed local length ``L`` per GPU, ``n = P * L``;
* strong: fixed total length ``n``, ``L = n / P``;

for ``P = 1, 2, 4, ...`` up to the GPU count (JAX: sub-meshes of the first P devices, one process;
torch: run once per P under ``torchrun --nproc_per_node=P``, NCCL). The pattern keeps the work
per token fixed as n grows (LongNet Sec. 2.2): ``w = (2K, 4K, 8K, 16K, n)``,
``r = (1, 2, 4, 8, n / 16K)`` with two heads a pattern (h = 10, d = 64, bf16, causal), so the last
pattern spans all P devices and every P pays its ring hops; ideal weak scaling is flat time,
ideal strong scaling is time ~ 1/P. Efficiency = time(1) / time(P) (weak) or
time(1) / (P * time(P)) (strong).

    python -m benchmarks.ring_scaling jax --out jax.json [--local 262144] [--total 1048576] [--repeats 5]
    torchrun --nproc_per_node=P -m benchmarks.ring_scaling torch --out torch_P.json
"""

from __future__ import annotations

import argparse
import os

from benchmarks.timing import emit, time_ms

K = 1024
H, D = 10, 64


def pattern(n: int) -> dict:
    return dict(segment_lengths=(2 * K, 4 * K, 8 * K, 16 * K, n), dilation_rates=(1, 2, 4, 8, max(n // (16 * K), 1)),
                mix="head_groups", is_causal=True)


def cases(P_max: int, local: int, total: int):
    P = 1
    while P <= P_max:
        yield "weak", P, P * local
        if total % P == 0:
            yield "strong", P, total
        P *= 2


def run_jax(args):
    import jax
    import jax.numpy as jnp

    import ring_jax

    devices = jax.devices()
    rows = [dict(framework="jax", device=devices[0].device_kind, devices=len(devices), jax=jax.__version__)]
    for kind, P, n in cases(len(devices), args.local, args.total):
        kw = pattern(n)
        mesh = jax.sharding.Mesh(devices[:P], ("sp",), axis_types=(jax.sharding.AxisType.Auto,))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "sp"))
        qkv = [jax.device_put(jax.random.normal(key, (1, n, H, D), jnp.bfloat16), sharding)
               for key in jax.random.split(jax.random.PRNGKey(0), 3)]
        attend = lambda q, k, v, kw=kw, mesh=mesh: ring_jax.sharded_dilated_attention(q, k, v, mesh=mesh, **kw)  # noqa: E731
        fwd = jax.jit(attend)
        both = jax.jit(jax.grad(lambda *x, f=attend: f(*x).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
        row = dict(kind=kind, P=P, n=n, L=n // P, pattern=kw)
        try:
            row.update(fwd_ms=time_ms(fwd, *qkv, repeats=args.repeats), fwdbwd_ms=time_ms(both, *qkv, repeats=args.repeats))
        except Exception as e:  # noqa: BLE001 -- out of memory is a result
            row["error"] = type(e).__name__ + ": " + str(e)[:300]
        rows.append(row)
        emit(row, rows, args.out)


def run_torch(args):
    import torch
    import torch.distributed as dist

    import ring_torch

    # The GPU of this process on its host (torchrun's LOCAL_RANK): the global rank is not a device
    # index on a second host.
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rank, P = dist.get_rank(), dist.get_world_size()
    rows = [dict(framework="torch", device=torch.cuda.get_device_name(), ranks=P, torch=torch.__version__)]
    for kind, n in (("weak", P * args.local), ("strong", args.total)):
        L = n // P
        kw = pattern(n)
        gen = torch.Generator(device="cuda").manual_seed(rank)
        qkv = [torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3)]

        def fwd(*x, kw=kw):
            with torch.no_grad():
                return ring_torch.ring_dilated_attention(*x, process_group=dist.group.WORLD, **kw)

        def both(*x, kw=kw):
            x = [t.detach().requires_grad_() for t in x]
            ring_torch.ring_dilated_attention(*x, process_group=dist.group.WORLD, **kw).float().sum().backward()
            return [t.grad for t in x]

        row = dict(kind=kind, P=P, n=n, L=L, pattern=kw)
        for name, fn in (("fwd_ms", fwd), ("fwdbwd_ms", both)):
            try:
                row[name] = time_ms(fn, *qkv, repeats=args.repeats)
            except torch.OutOfMemoryError as e:
                row[name.replace("ms", "error")] = str(e)[:200]
        if rank == 0:
            rows.append(row)
            emit(row, rows, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("framework", choices=("jax", "torch"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--local", type=int, default=256 * K, help="tokens per GPU (weak scaling)")
    ap.add_argument("--total", type=int, default=1024 * K, help="total tokens (strong scaling)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per row (median reported)")
    args = ap.parse_args()
    (run_jax if args.framework == "jax" else run_torch)(args)
