"""Dilated attention on one device: gather strided rows, fold segments into the batch, attend, scatter.

No ``n x n`` or ``n x w`` mask exists anywhere: the selected rows of a (pattern, offset) pair are a
strided reshape (one paired gather when heads use different offsets), and within a segment they
keep their order, so causality is the plain lower triangle of each ``m x m`` block.

The backward is written out: each unit's block gradient is taken against the merged output and
LSE, so only ``q, k, v, out, lse`` are kept between forward and backward. With ``chunk_size``
both run over independent stretches of the sequence in a loop and the backward recomputes each
stretch's ``out, lse`` (long sequences in bounded memory).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ring_jax._config import DilatedConfig, check_inputs
from ring_jax._dropout import Dropout, make_dropout
from ring_jax._kernels import block_attention, block_attention_bwd
from ring_jax._plan import Plan, Unit, get_plan


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


def unit_rows(query, key, value, u: Unit, causal: bool, scale: float, dropout: Dropout | None = None):
    """One unit's gathered ``q, k, v`` rows ``[b*S, m, H, d]`` and its kernel's ``o`` (same shape)
    and ``lse [b*S, m, H]``."""
    b, n = query.shape[:2]
    q = gather_rows(query, u, u.heads)  # [b*S, m, H, d]
    k = gather_rows(key, u, u.kv_heads)
    v = gather_rows(value, u, u.kv_heads)
    if dropout is None:
        o, lse = block_attention(q, k, v, causal, scale)
    else:
        drop = dropout.block_args(b, n // u.w, u.w, u.r, u.heads, u.offsets)
        o, lse = block_attention(q, k, v, causal, scale, dropout.rate, u.pattern, drop)
    return q, k, v, o, lse


def attend_unit(query, key, value, u: Unit, causal: bool, scale: float, dropout: Dropout | None = None):
    """One unit on the whole (local) sequence: ``(out [b, n, H, d], lse [b, n, H])`` for its heads."""
    *_, o, lse = unit_rows(query, key, value, u, causal, scale, dropout)
    n = query.shape[1]
    return scatter_rows(o, u, n, 0.0), scatter_rows(lse, u, n, -jnp.inf)  # [b, n, H, d], [b, n, H]


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


def _forward(query, key, value, plan: Plan, scale: float, dropout: Dropout | None):
    """``(out [b, n, h, d], lse [b, n, h])`` of one independent stretch of the sequence."""
    causal = plan.config.is_causal
    return run_layers(query, key, value, [layer.units for layer in plan.layers],
                      lambda q, k, v, u: attend_unit(q, k, v, u, causal, scale, dropout))


def _scatter_add_rows(y, shape, u: Unit, heads: tuple[int, ...]):
    """The transpose of ``gather_rows(., u, heads)`` on an input of ``shape``: rows back in place,
    repeated heads (GQA) summed, in ``y``'s dtype."""
    return jax.linear_transpose(lambda x: gather_rows(x, u, heads), jax.ShapeDtypeStruct(shape, y.dtype))(y)[0]


def _backward(query, key, value, out, lse, dout, dlse, plan: Plan, scale: float, dropout: Dropout | None):
    """``(dq, dk, dv)`` of one stretch from the *merged* ``out``/``lse``: with ``P = exp(S - lse)``
    taken against the global LSE, each unit's block gradient is exact on its own (the same
    formula as the ring backward), so no per-pattern output or LSE is kept for the backward and a
    zero ``dlse`` (``None``) lets the fast kernel skip the LSE column. Gradients several units
    add into are summed in float32 (:func:`tiles_heads` says when none are)."""
    rows = [(gather_rows(query, u, u.heads), gather_rows(key, u, u.kv_heads), gather_rows(value, u, u.kv_heads),
             gather_rows(out, u, u.heads), gather_rows(lse[..., None], u, u.heads)[..., 0]) for u in plan.units]
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (query, key, value))
    return _backward_rows(rows, shapes, dout, dlse, plan, scale, dropout)


def _backward_rows(rows, shapes, dout, dlse, plan: Plan, scale: float, dropout: Dropout | None):
    """:func:`_backward` from each unit's ``(q, k, v, out, lse)`` rows (gathered, or kept from the
    forward); ``shapes``: those of ``query, key, value``."""
    causal = plan.config.is_causal
    b, n = shapes[0].shape[:2]
    tiled = tiles_heads(plan)
    grads, parts = [None, None, None], ([], [], [])
    for u, (q_u, k_u, v_u, o_u, lse_u) in zip(plan.units, rows):
        drop = None if dropout is None else dropout.block_args(b, n // u.w, u.w, u.r, u.heads, u.offsets)
        do_u = gather_rows(dout, u, u.heads)  # [b*S, m, H, d]
        dlse_u = None if dlse is None else gather_rows(dlse[..., None], u, u.heads)[..., 0]
        g = block_attention_bwd(q_u, k_u, v_u, o_u, lse_u, do_u, dlse_u, causal=causal, scale=scale,
                                keep_acc_dtype=True, rate=0.0 if dropout is None else dropout.rate,
                                pattern=u.pattern, drop=drop)
        for i, (shape, heads) in enumerate(zip(shapes, (u.heads, u.kv_heads, u.kv_heads))):
            if tiled:  # each element has one writer: no float32 full-size sums
                parts[i].append(g[i].astype(shape.dtype))
                continue
            full = _scatter_add_rows(g[i], shape.shape, u, heads)
            grads[i] = full if grads[i] is None else grads[i] + full
    if tiled:
        return tuple(concat_heads(plan.units, p, n, 0.0) for p in parts)  # [b, n, h or h_kv, d]
    return tuple(gr.astype(shape.dtype) for gr, shape in zip(grads, shapes))


def tiles_heads(plan: Plan) -> bool:
    """One layer whose units' query heads, and kv heads, each run through all heads once in order
    (``head_groups`` without GQA sharing): every gradient element comes from one unit, so the
    gradients are assembled like the output, in the input dtype."""
    if len(plan.layers) != 1:
        return False
    heads = [j for u in plan.units for j in u.heads]
    kv = [j for u in plan.units for j in u.kv_heads]
    return heads == list(range(plan.num_heads)) and kv == list(range(plan.num_kv_heads))


def keeps_rows(plan: Plan, n: int) -> bool:
    """Whether the one-pass backward keeps each unit's gathered rows and kernel output from the
    forward (no second gather) instead of ``q, k, v, out``: with one layer (``head_groups``) each
    output row comes from one unit, so the kernel's ``o``/``lse`` rows *are* the merged ones; only
    when those rows take no more memory than the tensors they replace (GQA repeats kv rows)."""
    if plan.seq_len != n or len(plan.layers) != 1:
        return False
    rows = sum(len(u.heads) * n // u.r for u in plan.units)  # selected (row, head) pairs
    return 4 * rows <= 2 * n * (plan.num_heads + plan.num_kv_heads)


def _by_chunks(fn, chunk: int, inputs, outputs):
    """``fn(start, *chunks_of_inputs) -> chunks_of_outputs`` applied to consecutive ``chunk``-token
    stretches of ``inputs`` (``[b, n, ...]``, None passes through) in a loop, written into
    ``outputs`` (``ShapeDtypeStruct``s): one stretch's temporaries are live at a time."""
    n = outputs[0].shape[1]
    if chunk == n:
        return fn(0, *inputs)

    def step(i, acc):
        start = i * chunk
        parts = fn(start, *(None if x is None else lax.dynamic_slice_in_dim(x, start, chunk, axis=1) for x in inputs))
        return tuple(lax.dynamic_update_slice_in_dim(a, p.astype(a.dtype), start, axis=1) for a, p in zip(acc, parts))

    return lax.fori_loop(0, n // chunk, step, tuple(jnp.zeros(o.shape, o.dtype) for o in outputs))


def _dropout_at(rate: float, state, start) -> Dropout | None:
    """The dropout of the stretch starting at ``start`` (positions stay global)."""
    if state is None:
        return None
    seed, batch_base, pos_base = state
    return Dropout(rate, seed, batch_base, pos_base + start)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _attention(plan: Plan, scale: float, rate: float, with_lse: bool, query, key, value, drop_state):
    """``out`` (and ``lse`` if ``with_lse``) over the whole sequence, ``plan`` being the plan of one
    chunk: the sequence is cut into ``n / plan.seq_len`` independent chunks (segments never cross
    one), each computed in turn."""
    return _attention_fwd(plan, scale, rate, with_lse, query, key, value, drop_state)[0]


def _attention_fwd(plan, scale, rate, with_lse, query, key, value, drop_state):
    b, n, h = query.shape[:3]
    if keeps_rows(plan, n):
        dropout = _dropout_at(rate, drop_state, 0)
        rows = [unit_rows(query, key, value, u, plan.config.is_causal, scale, dropout) for u in plan.units]
        out = concat_heads(plan.units, [r[3] for r in rows], n, 0.0)
        lse = concat_heads(plan.units, [r[4] for r in rows], n, -jnp.inf)
        return ((out, lse) if with_lse else out), (tuple(rows), None, None, None, None, None, drop_state)
    outputs = (jax.ShapeDtypeStruct(query.shape, query.dtype),
               jax.ShapeDtypeStruct((b, n, h), jnp.promote_types(query.dtype, jnp.float32)))
    out, lse = _by_chunks(lambda s, q, k, v: _forward(q, k, v, plan, scale, _dropout_at(rate, drop_state, s)),
                          plan.seq_len, (query, key, value), outputs)
    # Chunked (the memory-bound case): keep only q, k, v and recompute each chunk's out/lse in the
    # backward, so out and its cotangent are never both alive at full length.
    saved = (out, lse) if plan.seq_len == n else (None, None)
    return ((out, lse) if with_lse else out), (None, query, key, value, *saved, drop_state)


def _attention_bwd(plan, scale, rate, with_lse, residuals, cotangents):
    rows, query, key, value, out, lse, drop_state = residuals
    dout, dlse = cotangents if with_lse else (cotangents, None)
    if rows is not None:  # one pass, one layer: the forward's rows (keeps_rows)
        q_u, k_u, v_u = rows[0][:3]
        b, d, n = q_u.shape[0] // (plan.seq_len // plan.units[0].w), q_u.shape[-1], plan.seq_len
        shapes = (jax.ShapeDtypeStruct((b, n, plan.num_heads, d), q_u.dtype),
                  jax.ShapeDtypeStruct((b, n, plan.num_kv_heads, d), k_u.dtype),
                  jax.ShapeDtypeStruct((b, n, plan.num_kv_heads, d), v_u.dtype))
        return (*_backward_rows(rows, shapes, dout, dlse, plan, scale, _dropout_at(rate, drop_state, 0)), None)
    outputs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (query, key, value))

    def chunk_grads(start, q, k, v, o, lse, do, dlse):
        dropout = _dropout_at(rate, drop_state, start)
        if o is None:
            o, lse = _forward(q, k, v, plan, scale, dropout)
        return _backward(q, k, v, o, lse, do, dlse, plan, scale, dropout)

    return (*_by_chunks(chunk_grads, plan.seq_len, (query, key, value, out, lse, dout, dlse), outputs), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def check_chunk_type(chunk_size) -> None:
    """``ValueError`` unless ``chunk_size`` is None or a positive int (what needs no shapes)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                   or chunk_size <= 0):
        raise ValueError(f"{chunk_size=} must be a positive int or None")


def check_chunk_size(chunk_size: int | None, seq_len: int, config: DilatedConfig) -> int:
    """``chunk_size`` (``seq_len`` when None) if every segment of every pattern lies inside one chunk."""
    check_chunk_type(chunk_size)
    if chunk_size is None:
        return seq_len
    if seq_len % chunk_size:
        raise ValueError(f"{seq_len=} is not a multiple of {chunk_size=}")
    for w in config.segment_lengths:
        if chunk_size % min(w, seq_len):
            raise ValueError(f"{chunk_size=} is not a multiple of the segment length w={min(w, seq_len)} "
                             f"({seq_len=}): a segment would cross chunks")
    return int(chunk_size)


def dilated_attention(query, key, value, *, segment_lengths, dilation_rates, mix="head_groups",
                      is_causal=False, softmax_scale=None, return_lse=False, ring_size=None,
                      dropout_rate=0.0, dropout_seed=None, chunk_size=None):
    """Dilated attention (LongNet) on one device.

    Args:
      query: ``[batch, seq, heads, head_dim]``.
      key, value: ``[batch, seq, kv_heads, head_dim]``, ``heads % kv_heads == 0`` (GQA).
      segment_lengths, dilation_rates: the patterns ``(w_1..w_K)``, ``(r_1..r_K)``.
      mix: ``"head_groups"`` (head group i uses pattern i) or ``"longnet"`` (every head uses
        every pattern, merged by LSE: LongNet Eq. 10).
      is_causal: keys after the query position are excluded.
      softmax_scale: defaults to ``head_dim ** -0.5``.
      return_lse: also return the natural-log LSE ``[batch, seq, heads]`` (float32; float64 for
        float64 inputs; ``-inf`` on rows with no key).
      ring_size: if > 1, run the ring algorithm on this one device with the sequence cut into
        ``ring_size`` blocks (same result, peak memory falling with ``ring_size``).
      dropout_rate, dropout_seed: dropout on each pattern's attention probabilities, the mask a
        hash of (seed, pattern, batch, head, query and key position): the same on one device, in
        any ring and in ``ring_torch`` for the same seed. ``dropout_seed``: an int or a uint32
        scalar (e.g. ``jax.random.bits(key, dtype=jnp.uint32)``). The LSE is not affected.
      chunk_size: if set, compute the sequence ``chunk_size`` tokens at a time in a loop, forward
        and backward (a multiple of every segment length, so chunks are independent). Only q, k, v
        are kept for the backward, which recomputes each chunk's forward: peak memory is q, k, v,
        their gradients and ``out``'s cotangent plus one chunk's temporaries, for one extra
        forward pass. Not with ``ring_size``.

    Returns:
      ``out [batch, seq, heads, head_dim]`` in the input dtype (rows with no key are 0), or
      ``(out, lse)``.
    """
    config = DilatedConfig(segment_lengths, dilation_rates, mix, is_causal, softmax_scale)
    _, n, h, h_kv, d = check_inputs(query, key, value)
    dropout = make_dropout(dropout_rate, dropout_seed)
    if ring_size is not None and ring_size > 1:
        if chunk_size is not None:
            raise ValueError(f"{chunk_size=} and {ring_size=}: pick one way of cutting the sequence")
        from ring_jax._ring import simulated_ring_attention  # the ring builds on this module

        out, lse = simulated_ring_attention(query, key, value, config, ring_size, dropout)
        return (out, lse) if return_lse else out
    config.validate_shapes(n, h, h_kv)  # errors name the whole sequence, not a chunk
    plan = get_plan(config, check_chunk_size(chunk_size, n, config), h, h_kv)  # the plan of one chunk
    drop_state = None if dropout is None else (dropout.seed, jnp.asarray(dropout.batch_base, jnp.int32),
                                               jnp.asarray(dropout.pos_base, jnp.int32))
    rate = 0.0 if dropout is None else dropout.rate
    return _attention(plan, config.scale(d), rate, bool(return_lse), query, key, value, drop_state)
