"""Dilated attention on one device: gather strided rows, fold segments into the batch, attend, scatter.

No ``n x n`` or ``n x w`` mask exists anywhere: the selected rows of a (pattern, offset) pair are a
strided reshape (one paired gather when heads use different offsets), and within a segment they keep their order, so causality is the plain lower
triangle of each ``m x m`` block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ring_jax._config import DilatedConfig, check_inputs
from ring_jax._dropout import Dropout, make_dropout
from ring_jax._kernels import block_attention
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


def attend_unit(query, key, value, u: Unit, causal: bool, scale: float, dropout: Dropout | None = None):
    """One unit on the whole (local) sequence: ``(out [b, n, H, d], lse [b, n, H])`` for its heads."""
    b, n = query.shape[:2]
    q = gather_rows(query, u, u.heads)  # [b*S, m, H, d]
    k = gather_rows(key, u, u.kv_heads)
    v = gather_rows(value, u, u.kv_heads)
    if dropout is None:
        o, lse = block_attention(q, k, v, causal, scale)
    else:
        drop = dropout.block_args(b, n // u.w, u.w, u.r, u.heads, u.offsets)
        o, lse = block_attention(q, k, v, causal, scale, dropout.rate, u.pattern, drop)
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


def dilated_attention_planned(query, key, value, plan: Plan, scale: float, dropout: Dropout | None = None):
    """``(out [b, n, h, d], lse [b, n, h])`` for a validated plan."""
    causal = plan.config.is_causal
    return run_layers(query, key, value, [layer.units for layer in plan.layers],
                      lambda q, k, v, u: attend_unit(q, k, v, u, causal, scale, dropout))


def dilated_attention(query, key, value, *, segment_lengths, dilation_rates, mix="head_groups",
                      is_causal=False, softmax_scale=None, return_lse=False, ring_size=None,
                      dropout_rate=0.0, dropout_seed=None):
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

    Returns:
      ``out [batch, seq, heads, head_dim]`` in the input dtype (rows with no key are 0), or
      ``(out, lse)``.
    """
    config = DilatedConfig(segment_lengths, dilation_rates, mix, is_causal, softmax_scale)
    _, n, h, h_kv, d = check_inputs(query, key, value)
    dropout = make_dropout(dropout_rate, dropout_seed)
    if ring_size is not None and ring_size > 1:
        from ring_jax._ring import simulated_ring_attention  # the ring builds on this module

        out, lse = simulated_ring_attention(query, key, value, config, ring_size, dropout)
    else:
        plan = get_plan(config, n, h, h_kv)
        out, lse = dilated_attention_planned(query, key, value, plan, config.scale(d), dropout)
    return (out, lse) if return_lse else out
