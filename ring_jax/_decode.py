"""Cached decoding: the causal forward computed a chunk of tokens at a time from a constant-size
cache of the current segment of every pattern.

With ``w % r == 0`` the rows of offset ``o`` of pattern ``(w, r)`` are the positions ``p ≡ o
(mod r)``; row ``R = p // r`` lies in segment ``R // m`` (``m = w / r`` rows per segment) at slot
``R % m``. A query at ``p`` reads, per (pattern, offset) pair of its head that selects ``p``, only
the rows of its own segment up to itself, so the cache keeps, per pattern and per distinct (kv
head, offset) pair the pattern's heads use, the ``m`` rows of the current segment: keys and values
``[batch, m, pairs, head_dim]``. Slots at or after the next row are stale (rows of an earlier
segment) and are never read. A chunk of ``t`` tokens is attended as the cached rows followed by the
chunk's own rows, placed so that segments start at multiples of ``m``: up to ``m`` rows per pair
against every key (a masked block of ``c x (m + c - 1)`` scores, ``c = ceil(t / r)``), longer
chunks segment by segment (``m x m`` causal blocks). The position is a traced scalar of the cache:
one compiled program per chunk length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ring_jax._config import DilatedConfig
from ring_jax._plan import _build_plan
from ring_jax._rows import merge_by_lse

__all__ = ["CacheLayout", "DecodeCache", "Group", "cache_layout", "init_cache", "decode"]


@dataclasses.dataclass(frozen=True)
class Group:
    """One (pattern, offset) of the cache: query ``heads`` read kv heads ``kv_heads[head_pair[t]]``,
    stored at pair indices ``start + head_pair[t]`` of the pattern's buffers."""

    pattern: int
    w: int
    r: int
    offset: int
    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]  # distinct, increasing
    head_pair: tuple[int, ...]  # per query head: its index into kv_heads
    start: int

    @property
    def m(self) -> int:
        return self.w // self.r


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """The static part of a cache: pattern, head counts, groups and buffer shapes (hashable: it
    is the cache's treedef)."""

    config: DilatedConfig
    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    groups: tuple[Group, ...]
    layers: tuple[tuple[int, ...], ...]  # group indices of each layer (a layer covers every head once)

    def pairs(self, pattern: int) -> int:
        return sum(len(g.kv_heads) for g in self.groups if g.pattern == pattern)

    def buffer_shape(self, pattern: int) -> tuple[int, int, int, int]:
        """``[batch, m, pairs, head_dim]`` of pattern ``pattern``'s keys (and values)."""
        w, r = self.config.segment_lengths[pattern], self.config.dilation_rates[pattern]
        return (self.batch, w // r, self.pairs(pattern), self.head_dim)


def cache_layout(batch, num_heads, num_kv_heads, head_dim, segment_lengths, dilation_rates, mix,
                 dtype) -> CacheLayout:
    """The layout of a cache; ``ValueError`` for shapes or patterns decoding cannot run."""
    config = DilatedConfig(segment_lengths, dilation_rates, mix, True)
    for name, x in (("batch", batch), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim)):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x <= 0:
            raise ValueError(f"{name}={x!r} must be a positive int")
    for w, r in zip(config.segment_lengths, config.dilation_rates):
        if w % r:
            raise ValueError(f"decoding needs every segment length to be a multiple of its "
                             f"dilation rate: w={w}, r={r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads=} is not a multiple of {num_kv_heads=}")
    if mix == "head_groups" and num_heads < config.num_patterns:
        raise ValueError(f"mix='head_groups' needs at least one head per pattern: "
                         f"{num_heads=} < {config.num_patterns} patterns")
    plan = _build_plan(config, max(config.segment_lengths), int(num_heads), int(num_kv_heads))
    groups, layers, starts = [], [], {}
    for layer in plan.layers:
        ids = []
        for u in layer.units:
            for o in sorted(set(u.offsets)):
                heads = tuple(j for j, oj in zip(u.heads, u.offsets) if oj == o)
                kvs = tuple(kv for kv, oj in zip(u.kv_heads, u.offsets) if oj == o)
                distinct = tuple(sorted(set(kvs)))
                start = starts.get(u.pattern, 0)
                starts[u.pattern] = start + len(distinct)
                ids.append(len(groups))
                groups.append(Group(u.pattern, u.w, u.r, o, heads, distinct,
                                    tuple(distinct.index(kv) for kv in kvs), start))
        layers.append(tuple(ids))
    return CacheLayout(config, int(batch), int(num_heads), int(num_kv_heads), int(head_dim),
                       jnp.dtype(dtype).name, tuple(groups), tuple(layers))


@jax.tree_util.register_pytree_node_class
class DecodeCache:
    """Keys and values of the current segment of every pattern, and the next position.

    ``keys[i]``, ``values[i]``: ``[batch, w_i / r_i, pairs_i, head_dim]`` (pairs: the distinct (kv
    head, offset) pairs of pattern ``i``'s heads); ``position``: int32 scalar, the number of tokens
    decoded so far. The layout is static (the treedef); the arrays are the leaves.
    """

    def __init__(self, layout: CacheLayout, position, keys, values):
        self.layout, self.position = layout, position
        self.keys, self.values = tuple(keys), tuple(values)

    def tree_flatten(self):
        return (self.position, self.keys, self.values), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        return cls(layout, *children)

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers and the position."""
        return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                       for x in (self.position, *self.keys, *self.values)))

    def __repr__(self):
        c = self.layout.config
        return (f"DecodeCache(segment_lengths={c.segment_lengths}, dilation_rates={c.dilation_rates}, "
                f"mix={c.mix!r}, batch={self.layout.batch}, nbytes={self.nbytes})")


def init_cache(batch, num_heads, num_kv_heads, head_dim, segment_lengths, dilation_rates, *,
               mix="head_groups", dtype=jnp.float32) -> DecodeCache:
    """An empty decoding cache (position 0).

    Args:
      batch, num_heads, num_kv_heads, head_dim: the shapes of the ``q [batch, t, num_heads,
        head_dim]`` and ``k``/``v [batch, t, num_kv_heads, head_dim]`` that :func:`decode` takes.
      segment_lengths, dilation_rates: the patterns (every ``w_i`` a multiple of ``r_i``).
      mix: ``"head_groups"`` or ``"longnet"``, as in :func:`ring_jax.dilated_attention`.
      dtype: the dtype the keys and values are stored in.

    Returns:
      A :class:`DecodeCache` of ``sum_i 2 * batch * (w_i / r_i) * pairs_i * head_dim`` elements
      (``cache.nbytes``), whatever the length decoded.
    """
    layout = cache_layout(batch, num_heads, num_kv_heads, head_dim, segment_lengths, dilation_rates,
                          mix, dtype)
    bufs = [jnp.zeros(layout.buffer_shape(i), dtype) for i in range(layout.config.num_patterns)]
    return DecodeCache(layout, jnp.zeros((), jnp.int32), bufs, [jnp.zeros_like(x) for x in bufs])


def _strided(x, start, r: int, c: int):
    """``x[:, start + r * k]`` for ``k < c`` (traced ``start < r``; zeros past the end): ``[b, c, ...]``."""
    pad = (c + 1) * r - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = lax.dynamic_slice_in_dim(x, start, c * r, axis=1)
    return x.reshape(x.shape[0], c, r, *x.shape[2:])[:, :, 0]


def _unstrided(rows, start, r: int, t: int, fill):
    """The inverse of :func:`_strided` on ``t`` positions: ``rows[:, k]`` at ``start + r * k``,
    ``fill`` elsewhere."""
    b, c = rows.shape[:2]
    spread = jnp.full((b, c, r, *rows.shape[2:]), fill, rows.dtype).at[:, :, 0].set(rows)
    spread = spread.reshape(b, c * r, *rows.shape[2:])
    full = jnp.full((b, (c + 1) * r, *rows.shape[2:]), fill, rows.dtype)
    return lax.dynamic_update_slice_in_dim(full, spread, start, axis=1)[:, :t]


def _attend(q, k, v, mask, scale: float):
    """``q [B, c, H, d]``, ``k``/``v [B, L, H, d]``, ``mask [c, L]`` (every row has a key) ->
    ``(out [B, c, H, d], lse [B, c, H])`` in the accumulation dtype of ``q``."""
    acc = q.dtype
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc) * scale
    s = jnp.where(mask, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)  # [B, H, c]
    out = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]), v)
    return out, jnp.swapaxes(lse, 1, 2)


def _group_step(q, k, v, kc, vc, g: Group, pos, scale: float):
    """One (pattern, offset) group on a chunk: ``(out [b, t, H, d], lse [b, t, H], kc', vc')``;
    ``kc``/``vc [b, m, G, d]`` are the group's cached rows."""
    t, r, m = q.shape[1], g.r, g.m
    c = -(-t // r)  # the most rows of one offset in t positions
    acc = jnp.promote_types(q.dtype, jnp.float32)
    e = (g.offset - pos) % r  # the chunk index of the first row of this offset
    row0 = (pos + e) // r
    slot0 = row0 % m
    row1 = row0 + (t - e + r - 1) // r  # the first row after the chunk
    qr = _strided(q, e, r, c)[:, :, np.asarray(g.heads)].astype(acc)  # [b, c, H, d]
    kv_idx = np.asarray(g.kv_heads)
    kr, vr = (_strided(x, e, r, c)[:, :, kv_idx].astype(kc.dtype) for x in (k, v))  # [b, c, G, d]
    pad = [(0, 0), (0, c - 1), (0, 0), (0, 0)]
    # Cached rows then the chunk's rows from slot0 on: index j is row (row0 // m) * m + j.
    keys, vals = (lax.dynamic_update_slice_in_dim(jnp.pad(cached, pad), rows, slot0, axis=1)
                  for cached, rows in ((kc, kr), (vc, vr)))  # [b, m + c - 1, G, d]
    pair = np.asarray(g.head_pair)
    kh, vh = (x[:, :, pair].astype(acc) for x in (keys, vals))  # [b, m + c - 1, H, d]
    if c <= m:
        at = slot0 + jnp.arange(c)[:, None]  # each query row's index
        j = jnp.arange(m + c - 1)[None, :]
        out, lse = _attend(qr, kh, vh, (j <= at) & (j >= at // m * m), scale)
    else:  # segment by segment: m x m causal blocks
        b, H, d = qr.shape[0], qr.shape[2], qr.shape[3]
        n_seg = -(-(m + c - 1) // m)
        tail = [(0, 0), (0, n_seg * m - (m + c - 1)), (0, 0), (0, 0)]
        qv = lax.dynamic_update_slice_in_dim(jnp.zeros((b, n_seg * m, H, d), acc), qr, slot0, axis=1)

        def seg(x):
            return x.reshape(b * n_seg, m, H, d)  # [b * S, m, H, d]

        out, lse = _attend(seg(qv), seg(jnp.pad(kh, tail)), seg(jnp.pad(vh, tail)),
                           jnp.tril(jnp.ones((m, m), bool)), scale)
        out = lax.dynamic_slice_in_dim(out.reshape(b, n_seg * m, H, d), slot0, c, axis=1)
        lse = lax.dynamic_slice_in_dim(lse.reshape(b, n_seg * m, H), slot0, c, axis=1)
    if c == 1:  # one row: written at its slot (a new segment reads none of the old ones)
        kc, vc = (lax.dynamic_update_slice_in_dim(x, rows, slot0, axis=1) for x, rows in ((kc, kr), (vc, vr)))
    else:  # the segment of the next row
        start = (row1 // m - row0 // m) * m
        grow = [(0, 0), (0, m), (0, 0), (0, 0)]
        kc, vc = (lax.dynamic_slice_in_dim(jnp.pad(x, grow), start, m, axis=1) for x in (keys, vals))
    return (_unstrided(out, e, r, t, 0.0), _unstrided(lse, e, r, t, -jnp.inf), kc, vc)


def _check_step(query, key, value, cache: DecodeCache):
    lay = cache.layout
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [batch, t, heads, head_dim], got shape {tuple(x.shape)}")
    b, t, h, d = query.shape
    want = {"query": (lay.batch, t, lay.num_heads, lay.head_dim),
            "key": (lay.batch, t, lay.num_kv_heads, lay.head_dim),
            "value": (lay.batch, t, lay.num_kv_heads, lay.head_dim)}
    for name, x in (("query", query), ("key", key), ("value", value)):
        if tuple(x.shape) != want[name]:
            raise ValueError(f"{name} shape {tuple(x.shape)} does not match the cache: expected "
                             f"{want[name]} (batch={lay.batch}, heads={lay.num_heads}, "
                             f"kv_heads={lay.num_kv_heads}, head_dim={lay.head_dim})")
    if t < 1:
        raise ValueError(f"decode needs at least one token, got t={t}")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"dtypes differ: query {query.dtype}, key {key.dtype}, value {value.dtype}")


def decode(query, key, value, cache: DecodeCache, softmax_scale=None):
    """The causal dilated attention of the next ``t`` tokens, given the cache of those before.

    Over successive calls (a prompt of any length, single tokens, chunks of any length) the outputs
    are those of ``dilated_attention(..., is_causal=True)`` on the whole sequence, with segments
    ``[s * w_i, (s + 1) * w_i)`` (any total length; equal to the forward wherever it accepts the
    length). Under ``jax.jit`` one program per ``t``: the position is a traced scalar of the
    cache; the returned cache has the input's shapes (donate it).

    Args:
      query: ``[batch, t, heads, head_dim]``, the queries of positions ``cache.position + [0, t)``.
      key, value: ``[batch, t, kv_heads, head_dim]``.
      cache: a :class:`DecodeCache` from :func:`init_cache` or an earlier call.
      softmax_scale: defaults to ``head_dim ** -0.5``.

    Returns:
      ``(out [batch, t, heads, head_dim], cache)``: ``out`` in the query dtype (0 where no pattern
      of a head selects the position), ``cache`` advanced by ``t`` tokens.
    """
    _check_step(query, key, value, cache)
    lay, pos = cache.layout, cache.position
    scale = lay.config.scale(lay.head_dim) if softmax_scale is None else float(softmax_scale)
    keys, vals = list(cache.keys), list(cache.values)
    layer_outs, layer_lses = [], []
    for ids in lay.layers:
        outs, lses, heads = [], [], []
        for gi in ids:
            g = lay.groups[gi]
            span = slice(g.start, g.start + len(g.kv_heads))
            out, lse, kc, vc = _group_step(query, key, value, keys[g.pattern][:, :, span],
                                           vals[g.pattern][:, :, span], g, pos, scale)
            keys[g.pattern] = keys[g.pattern].at[:, :, span].set(kc)
            vals[g.pattern] = vals[g.pattern].at[:, :, span].set(vc)
            outs.append(out)
            lses.append(lse)
            heads += g.heads
        order = np.argsort(heads)
        layer_outs.append(jnp.concatenate(outs, axis=2)[:, :, order])  # [b, t, h, d]
        layer_lses.append(jnp.concatenate(lses, axis=2)[:, :, order])  # [b, t, h]
    out = layer_outs[0] if len(layer_outs) == 1 else merge_by_lse(layer_outs, layer_lses)[0]
    t = query.shape[1]
    return out.astype(query.dtype), DecodeCache(lay, pos + jnp.int32(t), keys, vals)
