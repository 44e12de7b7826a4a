"""Rings over real GPUs: the JAX ``shard_map`` ring (one process, every local GPU) and the torch
NCCL ring (``torchrun``, one process a GPU), against the single-device result, with time per call.

    python -m benchmarks.multi_gpu_ring jax --out jax.json
    torchrun --nproc_per_node=P -m benchmarks.multi_gpu_ring torch --out torch.json

The last pattern (w = 2^20 >= n) spans every device, so every length exercises the ring.
"""

from __future__ import annotations

import argparse
import os


from benchmarks.gpu_sweep import rel
from benchmarks.timing import emit, time_ms

W, R = (2048, 4096, 8192, 16384, 1 << 20), (1, 2, 4, 8, 16)
H, D = 10, 64  # two heads per pattern



def run_jax(out):
    import jax
    import jax.numpy as jnp

    import ring_jax

    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("sp",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = [dict(device=devices[0].device_kind, devices=len(devices), jax=jax.__version__)]
    for n in (32768, 131072):
        for mix in ("head_groups", "longnet"):
            kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True)
            q = jax.random.normal(jax.random.PRNGKey(0), (1, n, H, D), jnp.bfloat16)
            single = jax.jit(lambda q: ring_jax.dilated_attention(q, q, q, **kw))
            ring = jax.jit(lambda q: ring_jax.sharded_dilated_attention(q, q, q, mesh=mesh, **kw))
            grad = jax.jit(jax.grad(lambda q: ring_jax.sharded_dilated_attention(q, q, q, mesh=mesh, **kw)
                                    .astype(jnp.float32).sum()))
            rows.append(dict(n=n, mix=mix, rel_err_vs_single=rel(ring(q).astype(jnp.float32), single(q).astype(jnp.float32)),
                             single_fwd_ms=time_ms(single, q, repeats=5), ring_fwd_ms=time_ms(ring, q, repeats=5),
                             ring_fwdbwd_ms=time_ms(grad, q, repeats=5)))
            emit(rows[-1], rows, out)


def run_torch(out):
    import torch
    import torch.distributed as dist

    import ring_torch

    # The GPU of this process on its host (torchrun's LOCAL_RANK): the global rank is not a device
    # index on a second host.
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rank, P = dist.get_rank(), dist.get_world_size()
    rows = [dict(device=torch.cuda.get_device_name(), ranks=P, torch=torch.__version__)]
    for n in (32768, 131072):
        L = n // P
        for mix in ("head_groups", "longnet"):
            x = torch.randn(1, n, H, D, device="cuda", dtype=torch.bfloat16,
                            generator=torch.Generator(device="cuda").manual_seed(0))
            shard = x[:, rank * L:(rank + 1) * L].contiguous()
            kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True)
            with torch.no_grad():
                single = ring_torch.dilated_attention(x, x, x, **kw)[:, rank * L:(rank + 1) * L]
                row = dict(n=n, mix=mix)
                for comm in ("ring", "all_gather"):
                    def fwd(s, comm=comm):
                        return ring_torch.ring_dilated_attention(s, s, s, process_group=dist.group.WORLD, comm=comm, **kw)

                    err = torch.tensor(rel(fwd(shard).float().cpu(), single.float().cpu()), device="cuda")
                    dist.all_reduce(err, op=dist.ReduceOp.MAX)
                    row[f"{comm}_rel_err_vs_single"] = float(err)
                    row[f"{comm}_fwd_ms"] = time_ms(fwd, shard, repeats=5)
            if rank == 0:
                rows.append(row)
                emit(row, rows, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("framework", choices=("jax", "torch"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    (run_jax if args.framework == "jax" else run_torch)(args.out)
