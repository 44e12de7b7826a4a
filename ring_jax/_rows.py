"""Rows of a unit: strided gathers and scatters, one unit through the block kernel, the LSE merge.

Shared by the single-device paths (``_dilated``, ``_chunked``) and the ring (``_ring``). No
``n x n`` or ``n x w`` mask exists anywhere: the selected rows of a (pattern, offset) pair are a
strided reshape (one paired gather when heads use different offsets), and within a segment they
keep their order, so causality is the plain lower triangle of each ``m x m`` block.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ring_jax._coords import Origin, unit_coords
from ring_jax._kernels import BlockSpec
from ring_jax._plan import Unit


def take_heads(x, heads: tuple[int, ...], axis: int):
    """Static head selection: a slice when contiguous, else a constant-index gather."""
    if heads == tuple(range(heads[0], heads[0] + len(heads))):
        return jax.lax.slice_in_dim(x, heads[0], heads[0] + len(heads), axis=axis)
    return jnp.take(x, np.asarray(heads), axis=axis)


def gather_rows(x, u: Unit, heads: tuple[int, ...]):
    """``[b, n, hx, d]`` → ``[b * n/w, m, H, d]``: the unit's selected rows, segments in the batch.

    ``heads`` are the heads of ``x`` to read, one per unit head (query or kv heads)."""
    b, n, _, d = x.shape
    x = x.reshape(b, n // u.w, u.m, u.r, x.shape[2], d)  # [b, S, m, r, hx, d]
    if u.offset is not None:
        x = take_heads(x[:, :, :, u.offset], heads, axis=3)  # [b, S, m, H, d]
    else:  # each head its own offset: one paired gather
        x = x[:, :, :, np.asarray(u.offsets), np.asarray(heads)]  # [b, S, m, H, d]
    return x.reshape(b * (n // u.w), u.m, len(heads), d)


def scatter_rows(y, u: Unit, seq_len: int, fill: float):
    """Inverse of ``gather_rows`` for ``y [b * S, m, H, ...]`` → ``[b, n, H, ...]``; rows a head
    does not select get ``fill``."""
    segments = seq_len // u.w
    y = y.reshape(y.shape[0] // segments, segments, u.m, *y.shape[2:])  # [b, S, m, H, ...]
    if u.offset is not None:
        pad = [(0, 0)] * (y.ndim + 1)
        pad[3] = (u.offset, u.r - 1 - u.offset)
        y = jnp.pad(y[:, :, :, None], pad, constant_values=fill)  # [b, S, m, r, H, ...]
    else:
        full = jnp.full((*y.shape[:3], u.r, *y.shape[3:]), fill, y.dtype)
        y = full.at[:, :, :, np.asarray(u.offsets), np.arange(len(u.heads))].set(y)  # [b, S, m, r, H, ...]
    return y.reshape(y.shape[0], seq_len, *y.shape[4:])


def scatter_add_rows(y, shape, u: Unit, heads: tuple[int, ...]):
    """The transpose of ``gather_rows(., u, heads)`` on an input of ``shape``: rows back in place,
    repeated heads (GQA) summed, in ``y``'s dtype."""
    return jax.linear_transpose(lambda x: gather_rows(x, u, heads), jax.ShapeDtypeStruct(shape, y.dtype))(y)[0]


def concat_heads(units, rows, seq_len: int, fill: float):
    """Each unit's ``rows [b * S, m, H, ...]`` scattered back (``fill`` elsewhere) and the units
    concatenated along heads, in unit order: ``[b, n, sum H, ...]``."""
    return jnp.concatenate([scatter_rows(x, u, seq_len, fill) for u, x in zip(units, rows)], axis=2)


def merge_by_lse(outs, lses):
    """Exact softmax merge of partial attentions over disjoint key sets (float32 or wider).

    ``out = sum_k exp(lse_k - lse) out_k``, ``lse = log sum_k exp(lse_k)``; rows empty in every
    part stay ``out = 0``, ``lse = -inf`` without NaN, also in the gradient.
    """
    acc = jnp.promote_types(outs[0].dtype, jnp.float32)
    lses = [x.astype(acc) for x in lses]
    m = lses[0]
    for x in lses[1:]:
        m = jnp.maximum(m, x)
    # The result does not depend on the shift m, so no gradient needs to flow through it.
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    weights = [jnp.exp(x - m) for x in lses]
    total = sum(weights)
    nonempty = total > 0
    safe_total = jnp.where(nonempty, total, 1.0)
    out = sum((wk / safe_total)[..., None] * o.astype(acc) for wk, o in zip(weights, outs))
    lse = jnp.where(nonempty, jnp.log(safe_total) + m, -jnp.inf)
    return out.astype(outs[0].dtype), lse


class UnitRows(NamedTuple):
    """One unit's gathered ``q, k, v [b*S, m, H, d]`` and its kernel's ``out`` (same shape) and
    ``lse [b*S, m, H]``."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    out: jax.Array
    lse: jax.Array


def unit_rows(query, key, value, u: Unit, spec: BlockSpec, origin: Origin, differentiable: bool = False) -> UnitRows:
    """One unit's rows through the block kernel: without a custom VJP (callers own the backward),
    or, ``differentiable``, through the kernel's exact block backward (the LSE cotangent included;
    a fused kernel's own VJP would drop it)."""
    b, n = query.shape[:2]
    q = gather_rows(query, u, u.heads)  # [b*S, m, H, d]
    k = gather_rows(key, u, u.kv_heads)
    v = gather_rows(value, u, u.kv_heads)
    coords = unit_coords(origin, b, n // u.w, u.w, u.r, u.heads, u.offsets)
    attend = spec.attend if differentiable else spec.forward
    return UnitRows(q, k, v, *attend(q, k, v, spec.mods(u.pattern), coords))


def attend_unit(query, key, value, u: Unit, spec: BlockSpec, origin: Origin):
    """One unit on the whole (local) sequence: ``(out [b, n, H, d], lse [b, n, H])`` for its heads,
    differentiable (the rings' local units and the simulated ring are differentiated through it)."""
    rows = unit_rows(query, key, value, u, spec, origin, differentiable=True)
    n = query.shape[1]
    return scatter_rows(rows.out, u, n, 0.0), scatter_rows(rows.lse, u, n, -jnp.inf)  # [b, n, H, d], [b, n, H]


def run_layers(query, key, value, layers, attend):
    """Concatenates each layer's units along heads and merges the layers by LSE.

    ``attend(query, key, value, unit) -> (out [b, n, H, d], lse [b, n, H])`` for the unit's heads;
    the units of a layer cover consecutive head ranges in order."""
    outs, lses = [], []
    for units in layers:
        parts = [attend(query, key, value, u) for u in units]
        outs.append(jnp.concatenate([o for o, _ in parts], axis=2))
        lses.append(jnp.concatenate([lse for _, lse in parts], axis=2))
    if len(outs) == 1:
        return outs[0], lses[0]
    return merge_by_lse(outs, lses)
