"""Dilated attention on one device in chunks: forward and backward over independent stretches.

``chunk_size`` is a multiple of every segment length, so a chunk's attention needs no other chunk.
Forward and backward loop over the chunks (``lax.fori_loop``: one chunk's temporaries live at a
time); only ``q, k, v`` are kept for the backward, which recomputes each chunk's ``out``/``lse``, so
``out`` and its cotangent are never both alive at full length.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ring_jax._coords import Origin
from ring_jax._dilated import backward, forward
from ring_jax._kernels import BlockSpec
from ring_jax._plan import Plan


def by_chunks(fn, chunk: int, inputs, outputs):
    """``fn(start, *chunks_of_inputs) -> chunks_of_outputs`` applied to consecutive ``chunk``-token
    stretches of ``inputs`` (``[b, n, ...]``, None passes through) in a loop, written into
    ``outputs`` (``ShapeDtypeStruct``s)."""
    n = outputs[0].shape[1]

    def step(i, acc):
        start = i * chunk
        parts = fn(start, *(None if x is None else lax.dynamic_slice_in_dim(x, start, chunk, axis=1) for x in inputs))
        return tuple(lax.dynamic_update_slice_in_dim(a, p.astype(a.dtype), start, axis=1) for a, p in zip(acc, parts))

    return lax.fori_loop(0, n // chunk, step, tuple(jnp.zeros(o.shape, o.dtype) for o in outputs))


class Inputs(NamedTuple):
    """Residuals of :func:`chunked_attention`: the inputs only."""

    query: jax.Array
    key: jax.Array
    value: jax.Array
    origin: Origin


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def chunked_attention(plan: Plan, spec: BlockSpec, with_lse: bool, query, key, value, origin: Origin):
    """``out`` (and ``lse`` if ``with_lse``) of the whole sequence, ``plan`` being the plan of one
    chunk of ``plan.seq_len`` tokens."""
    return _chunked_fwd(plan, spec, with_lse, query, key, value, origin)[0]


def _chunked_fwd(plan, spec, with_lse, query, key, value, origin):
    b, n, h = query.shape[:3]
    outputs = (jax.ShapeDtypeStruct(query.shape, query.dtype),
               jax.ShapeDtypeStruct((b, n, h), jnp.promote_types(query.dtype, jnp.float32)))
    out, lse = by_chunks(lambda s, q, k, v: forward(q, k, v, plan, spec, origin.at(s)), plan.seq_len,
                         (query, key, value), outputs)
    return ((out, lse) if with_lse else out), Inputs(query, key, value, origin)


def _chunked_bwd(plan, spec, with_lse, res: Inputs, cotangents):
    dout, dlse = cotangents if with_lse else (cotangents, None)

    def chunk_grads(start, q, k, v, do, dlse):
        origin = res.origin.at(start)
        out, lse = forward(q, k, v, plan, spec, origin)
        return backward(q, k, v, out, lse, do, dlse, plan, spec, origin)

    outputs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in res[:3])
    return (*by_chunks(chunk_grads, plan.seq_len, (*res[:3], dout, dlse), outputs), None)


chunked_attention.defvjp(_chunked_fwd, _chunked_bwd)
