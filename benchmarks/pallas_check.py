"""The Pallas block kernel on a GPU, in one process: exactness against the float32 XLA kernel (bf16
error next to the bf16 XLA and cuDNN kernels', with the LSE cotangent), then time at block level
(the 1M-token floor shape) and inside dilated attention, with and without documents.

    python -m benchmarks.pallas_check --out results.json [--budget-s 400] [--stages parity,tiles,layer]

Stages: ``parity`` (block and layer errors), ``tiles`` (forward and backward tile sweep at the floor
shape, next to cuDNN and XLA), ``layer`` (dilated attention fwd / fwd+bwd at ``--sizes``: cuDNN vs
Pallas without documents; XLA and Pallas with each of ``--documents`` counts of equal documents), ``ring`` (the
simulated ring of ``--ring-size`` at ``--sizes``: cuDNN, Pallas, ``auto``), ``dropout`` (rate 0.1
at ``--sizes``: XLA vs Pallas).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import ring_jax
from benchmarks.gpu_sweep import D, H, R, W, new_sweep, rel
from benchmarks.timing import time_ms
from ring_jax import _kernels, _pallas
from ring_jax._coords import Mods, aligned_coords

FLOOR = (960, 2048, 2, D)  # [B, m, H, d] of the 1M-token head-groups floor


def block_inputs(shape, dtype, documents: int = 0, key=0):
    keys = jax.random.split(jax.random.PRNGKey(key), 5)
    q, k, v, g = (jax.random.normal(x, shape, jnp.float32).astype(dtype) for x in keys[:4])
    gl = jax.random.normal(keys[4], shape[:-1], jnp.float32)
    coords = aligned_coords(shape[0], shape[1], shape[2])
    if documents:
        ids = np.repeat(np.arange(documents), -(-shape[1] // documents))[: shape[1]]
        coords = coords._replace(docs=jnp.asarray(np.broadcast_to(ids, (shape[0], shape[1])), jnp.int32))
    return (q, k, v, g, gl), coords


def block_fn(kernel, scale, mods, coords):
    """Jitted ``(out, lse, dq, dk, dv)`` of one block through ``kernel``'s forward and backward."""

    def run(q, k, v, g, gl):
        out, lse = kernel.forward(q, k, v, scale, mods, coords)
        return (out, lse, *kernel.backward(q, k, v, out, lse, g, gl, scale, mods, coords))

    return jax.jit(run)


def forward_fn(kernel, scale, mods, coords):
    return jax.jit(lambda q, k, v: kernel.forward(q, k, v, scale, mods, coords))


def parity(sweep):
    fields = ("out", "lse", "dq", "dk", "dv")
    for causal, documents in ((False, 0), (True, 0), (True, 4), (False, 4)):
        mods = Mods(causal=causal, documents=bool(documents))
        (q, k, v, g, gl), coords = block_inputs((8, 2048, 4, D), jnp.float32, documents)
        with jax.default_matmul_precision("highest"):
            ref = block_fn(_kernels.XlaKernel(), D ** -0.5, mods, coords)(q, k, v, g, gl)
        row = {}
        kernels = [("xla", _kernels.XlaKernel()), ("pallas", _kernels.PallasKernel())]
        if not documents:
            kernels.append(("cudnn", _kernels.CudnnKernel()))
        for name, kernel in kernels:
            low = block_fn(kernel, D ** -0.5, mods, coords)(*(x.astype(jnp.bfloat16) for x in (q, k, v, g)), gl)
            row[name + "_bf16"] = {f: rel(a, b) for f, a, b in zip(fields, low, ref)}
        sweep.add(section="parity_block", causal=causal, documents=documents, **row)
    for mix in ("head_groups", "longnet"):
        n = 16384
        keys = jax.random.split(jax.random.PRNGKey(1), 4)
        q = jax.random.normal(keys[0], (1, n, H, D), jnp.float32)
        k, v = (jax.random.normal(x, (1, n, H // 2, D), jnp.float32) for x in keys[1:3])
        g = jax.random.normal(keys[3], (1, n, H, D), jnp.float32)
        docs = jnp.asarray(np.repeat(np.arange(3), [5000, 7000, 4384])[None], jnp.int32)
        kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True, segment_ids=docs)

        def grads(kernel, dtype):
            ring_jax.set_block_kernel(kernel)
            f = jax.jit(lambda q, k, v: jax.vjp(lambda *a: ring_jax.dilated_attention(*a, **kw), q, k, v))
            out, vjp = f(*(x.astype(dtype) for x in (q, k, v)))
            return (out, *vjp(g.astype(dtype)))

        with jax.default_matmul_precision("highest"):
            ref = grads("xla", jnp.float32)
        row = {name: {f: rel(a, b) for f, a, b in zip(("out", "dq", "dk", "dv"), grads(name, jnp.bfloat16), ref)}
               for name in ("xla", "pallas")}
        sweep.add(section="parity_documents_layer", mix=mix, n=n, **row)
    ring_jax.set_block_kernel("auto")


def tiles(sweep, configs):
    scale = D ** -0.5
    for documents in (0, 4):
        (q, k, v, g, gl), coords = block_inputs(FLOOR, jnp.bfloat16, documents)
        mods = Mods(causal=True, documents=bool(documents))
        base = [("xla", _kernels.XlaKernel())] + ([] if documents else [("cudnn", _kernels.CudnnKernel())])
        for name, kernel in base + [(f"pallas {c}", _kernels.PallasKernel(blocks=c)) for c in configs]:
            if not sweep.left():
                return
            try:
                f_ms = time_ms(forward_fn(kernel, scale, mods, coords), q, k, v, repeats=5)
                b_ms = time_ms(block_fn(kernel, scale, mods, coords), q, k, v, g, gl, repeats=5)
            except Exception as e:  # noqa: BLE001 -- a tile that fails to compile is recorded
                sweep.add(section="tiles", kernel=name, documents=documents, error=type(e).__name__ + str(e)[:200])
                continue
            sweep.add(section="tiles", kernel=name, documents=documents, shape=FLOOR, fwd_ms=f_ms, fwdbwd_ms=b_ms)


def timed_layer(q, kernel: str, **kw) -> dict:
    """``{fwd_ms, fwdbwd_ms}`` of ``dilated_attention(q, q, q, **kw)`` with block kernel ``kernel``
    (the backward of ``sum(out)``), or ``{error}`` (out of memory is a result)."""
    ring_jax.set_block_kernel(kernel)
    fwd = jax.jit(lambda q: ring_jax.dilated_attention(q, q, q, **kw))
    both = jax.jit(jax.grad(lambda q: ring_jax.dilated_attention(q, q, q, **kw).astype(jnp.float32).sum()))
    try:
        return dict(fwd_ms=time_ms(fwd, q, repeats=5), fwdbwd_ms=time_ms(both, q, repeats=5))
    except Exception as e:  # noqa: BLE001 -- recorded
        return dict(error=type(e).__name__ + ": " + str(e)[:160])
    finally:
        ring_jax.set_block_kernel("auto")


def layer(sweep, sizes, counts):
    """Dilated attention without documents (cuDNN, Pallas) and with each count of equal documents
    (XLA for the first count, Pallas for each)."""
    for mix in ("head_groups", "longnet"):
        for n in sizes:
            q = jax.random.normal(jax.random.PRNGKey(0), (1, n, H, D), jnp.bfloat16)
            runs = [(0, "cudnn"), (0, "pallas")] + [(c, k) for i, c in enumerate(counts)
                                                    for k in (("xla", "pallas") if i == 0 else ("pallas",))]
            for documents, kernel in runs:
                if not sweep.left():
                    return
                docs = (jnp.asarray(np.repeat(np.arange(documents), n // documents)[None], jnp.int32)
                        if documents else None)
                row = timed_layer(q, kernel, segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True,
                                  segment_ids=docs)
                sweep.add(section="layer", mix=mix, n=n, documents=documents, kernel=kernel, **row)


def dropout(sweep, sizes, rate: float = 0.1):
    """Dilated attention with dropout (which cuDNN is not given here): XLA vs Pallas."""
    for mix in ("head_groups", "longnet"):
        for n in sizes:
            q = jax.random.normal(jax.random.PRNGKey(0), (1, n, H, D), jnp.bfloat16)
            for kernel in ("xla", "pallas"):
                if not sweep.left():
                    return
                row = timed_layer(q, kernel, segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True,
                                  dropout_rate=rate, dropout_seed=0)
                sweep.add(section="dropout", mix=mix, n=n, rate=rate, kernel=kernel, **row)


def ring(sweep, sizes, ring_size: int):
    """The simulated ring (every hop a block with an LSE cotangent in the backward): cuDNN, Pallas and
    ``auto`` (cuDNN's forward with the Pallas backward where ``PALLAS_AUTO`` says so)."""
    for mix in ("head_groups", "longnet"):
        for n in sizes:
            q = jax.random.normal(jax.random.PRNGKey(0), (1, n, H, D), jnp.bfloat16)
            for kernel in ("cudnn", "pallas", "auto"):
                if not sweep.left():
                    return
                row = timed_layer(q, kernel, segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True,
                                  ring_size=ring_size)
                sweep.add(section="ring", mix=mix, n=n, ring_size=ring_size, kernel=kernel, **row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=400)
    ap.add_argument("--stages", default="parity,tiles,layer")
    ap.add_argument("--sizes", default="262144,1048576")
    ap.add_argument("--documents", default="4", help="comma-separated counts of equal documents")
    ap.add_argument("--ring-size", type=int, default=4)
    args = ap.parse_args()
    sweep = new_sweep(args.out, args.budget_s)
    sweep.data["meta"].update(jax=jax.__version__, device=jax.devices()[0].device_kind)
    stages = args.stages.split(",")
    if "parity" in stages:
        parity(sweep)
    if "tiles" in stages:
        base = _pallas.PallasBlocks()
        configs = [base, dataclasses.replace(base, block_q=128, num_stages=3),
                   dataclasses.replace(base, block_q=128, block_k=128, num_warps=8, num_stages=3),
                   dataclasses.replace(base, dkv_block_q=32, dkv_block_k=128, dq_block_q=128, dq_block_k=32,
                                       bwd_num_stages=3),
                   dataclasses.replace(base, dkv_block_q=64, dkv_block_k=128, dq_block_q=128, dq_block_k=64,
                                       bwd_num_warps=8, bwd_num_stages=3)]
        tiles(sweep, configs)
    if "layer" in stages:
        layer(sweep, [int(x) for x in args.sizes.split(",")], [int(x) for x in args.documents.split(",")])
    if "dropout" in stages:
        dropout(sweep, [int(x) for x in args.sizes.split(",")])
    if "ring" in stages:
        ring(sweep, [int(x) for x in args.sizes.split(",")], args.ring_size)


if __name__ == "__main__":
    main()
