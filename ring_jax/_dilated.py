"""Dilated attention on one device in one pass: gather strided rows, attend, scatter, merge by LSE.

The backward is written out: each unit's block gradient is taken against the merged output and
LSE (``P = exp(S - lse)`` with the global LSE is exact for every block on its own), so no
per-pattern output is kept between forward and backward. Two residual layouts, each its own
``custom_vjp``, chosen once by the API (``_api.one_device_mode``):

* :func:`saved_attention` keeps ``q, k, v, out, lse`` (any plan);
* :func:`kept_rows_attention` keeps each unit's gathered rows and kernel output (one layer, when
  those rows are not larger): the backward gathers nothing but the cotangents.

:func:`forward` and :func:`backward` compute one independent stretch; ``_chunked`` loops them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ring_jax._coords import Origin, unit_coords
from ring_jax._kernels import BlockSpec
from ring_jax._plan import Plan
from ring_jax._rows import (UnitRows, attend_unit, concat_heads, gather_rows, run_layers, scatter_add_rows,
                            unit_rows)


def forward(query, key, value, plan: Plan, spec: BlockSpec, origin: Origin):
    """``(out [b, n, h, d], lse [b, n, h])`` of one independent stretch of the sequence."""
    return run_layers(query, key, value, [layer.units for layer in plan.layers],
                      lambda q, k, v, u: attend_unit(q, k, v, u, spec, origin))


def backward(query, key, value, out, lse, dout, dlse, plan: Plan, spec: BlockSpec, origin: Origin):
    """``(dq, dk, dv)`` of one stretch from the *merged* ``out``/``lse``; ``dlse=None`` (a zero LSE
    cotangent) lets the fused kernel skip its LSE column."""
    rows = [UnitRows(gather_rows(query, u, u.heads), gather_rows(key, u, u.kv_heads),
                     gather_rows(value, u, u.kv_heads), gather_rows(out, u, u.heads),
                     gather_rows(lse[..., None], u, u.heads)[..., 0]) for u in plan.units]
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (query, key, value))
    return backward_rows(rows, shapes, dout, dlse, plan, spec, origin)


def backward_rows(rows, shapes, dout, dlse, plan: Plan, spec: BlockSpec, origin: Origin):
    """:func:`backward` from each unit's :class:`UnitRows` (gathered, or kept from the forward);
    ``shapes``: those of ``query, key, value``. Gradients several units add into are summed in
    float32 (:func:`tiles_heads` says when none are)."""
    b, n = shapes[0].shape[:2]
    tiled = tiles_heads(plan)
    grads, parts = [None, None, None], ([], [], [])
    for u, r in zip(plan.units, rows):
        coords = unit_coords(origin, b, n // u.w, u.w, u.r, u.heads, u.offsets)
        do_u = gather_rows(dout, u, u.heads)  # [b*S, m, H, d]
        dlse_u = None if dlse is None else gather_rows(dlse[..., None], u, u.heads)[..., 0]
        g = spec.backward(r.q, r.k, r.v, r.out, r.lse, do_u, dlse_u, spec.mods(u.pattern), coords)
        for i, (shape, heads) in enumerate(zip(shapes, (u.heads, u.kv_heads, u.kv_heads))):
            if tiled:  # each element has one writer: no float32 full-size sums
                parts[i].append(g[i].astype(shape.dtype))
                continue
            full = scatter_add_rows(g[i], shape.shape, u, heads)
            grads[i] = full if grads[i] is None else grads[i] + full
    if tiled:
        return tuple(concat_heads(plan.units, p, n, 0.0) for p in parts)  # [b, n, h or h_kv, d]
    return tuple(gr.astype(shape.dtype) for gr, shape in zip(grads, shapes))


def tiles_heads(plan: Plan) -> bool:
    """One layer whose units' query heads, and kv heads, each run through all heads once in order
    (``head_groups`` without GQA sharing): every gradient element comes from one unit, so the
    gradients are assembled like the output, in the input dtype."""
    if not plan.one_layer:
        return False
    heads = [j for u in plan.units for j in u.heads]
    kv = [j for u in plan.units for j in u.kv_heads]
    return heads == list(range(plan.num_heads)) and kv == list(range(plan.num_kv_heads))


def keeps_rows(plan: Plan) -> bool:
    """Whether the one-pass backward can keep each unit's gathered rows and kernel output from the
    forward instead of ``q, k, v, out``: with one layer (``head_groups``) each output row comes from
    one unit, so the kernel's ``out``/``lse`` rows *are* the merged ones; only when those rows take
    no more memory than the tensors they replace (GQA repeats kv rows)."""
    if not plan.one_layer:
        return False
    n = plan.seq_len
    rows = sum(len(u.heads) * n // u.r for u in plan.units)  # selected (row, head) pairs
    return 4 * rows <= 2 * n * (plan.num_heads + plan.num_kv_heads)


def _outputs(out, lse, with_lse: bool):
    return (out, lse) if with_lse else out


def _cotangents(cotangents, with_lse: bool):
    return cotangents if with_lse else (cotangents, None)


class Saved(NamedTuple):
    """Residuals of :func:`saved_attention`."""

    query: jax.Array
    key: jax.Array
    value: jax.Array
    out: jax.Array
    lse: jax.Array
    origin: Origin


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def saved_attention(plan: Plan, spec: BlockSpec, with_lse: bool, query, key, value, origin: Origin):
    """``out`` (and ``lse`` if ``with_lse``) of the whole sequence in one pass; the backward keeps
    ``q, k, v, out, lse``."""
    return _outputs(*forward(query, key, value, plan, spec, origin), with_lse)


def _saved_fwd(plan, spec, with_lse, query, key, value, origin):
    out, lse = forward(query, key, value, plan, spec, origin)
    return _outputs(out, lse, with_lse), Saved(query, key, value, out, lse, origin)


def _saved_bwd(plan, spec, with_lse, res: Saved, cotangents):
    dout, dlse = _cotangents(cotangents, with_lse)
    return (*backward(res.query, res.key, res.value, res.out, res.lse, dout, dlse, plan, spec, res.origin), None)


saved_attention.defvjp(_saved_fwd, _saved_bwd)


class KeptRows(NamedTuple):
    """Residuals of :func:`kept_rows_attention`: each unit's rows, and the input shapes."""

    rows: tuple[UnitRows, ...]
    origin: Origin


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def kept_rows_attention(plan: Plan, spec: BlockSpec, with_lse: bool, query, key, value, origin: Origin):
    """As :func:`saved_attention` for a plan with :func:`keeps_rows`; the backward keeps the rows."""
    return _kept_fwd(plan, spec, with_lse, query, key, value, origin)[0]


def _kept_fwd(plan, spec, with_lse, query, key, value, origin):
    n = query.shape[1]
    rows = tuple(unit_rows(query, key, value, u, spec, origin) for u in plan.units)
    out = concat_heads(plan.units, [r.out for r in rows], n, 0.0)
    lse = concat_heads(plan.units, [r.lse for r in rows], n, -jnp.inf)
    return _outputs(out, lse, with_lse), KeptRows(rows, origin)


def _kept_bwd(plan, spec, with_lse, res: KeptRows, cotangents):
    dout, dlse = _cotangents(cotangents, with_lse)
    first = res.rows[0]
    b, n, d = first.q.shape[0] // (plan.seq_len // plan.units[0].w), plan.seq_len, first.q.shape[-1]
    shapes = tuple(jax.ShapeDtypeStruct((b, n, heads, d), x.dtype)
                   for heads, x in zip((plan.num_heads, plan.num_kv_heads, plan.num_kv_heads), first[:3]))
    return (*backward_rows(res.rows, shapes, dout, dlse, plan, spec, res.origin), None)


kept_rows_attention.defvjp(_kept_fwd, _kept_bwd)
