"""Cached decoding: the causal forward computed a chunk of tokens at a time from a constant-size
cache of the current segment of every pattern (the same layout and algorithm as
``ring_jax._decode``).

With ``w % r == 0`` the rows of offset ``o`` of pattern ``(w, r)`` are the positions ``p ≡ o
(mod r)``; row ``R = p // r`` lies in segment ``R // m`` (``m = w / r``) at slot ``R % m``. The
cache keeps, per pattern and per distinct (kv head, offset) pair its heads use, the ``m`` rows of
the current segment: keys and values ``[batch, m, pairs, head_dim]``, updated in place. A chunk's
rows of one offset attend the cached rows of their segment before them and the chunk's own rows,
with segments starting at multiples of ``m``: a masked block when the chunk has at most ``m`` rows
of the offset, ``m x m`` causal blocks segment by segment otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ring_torch._config import DilatedConfig
from ring_torch._plan import _build, index_tensor
from ring_torch._rows import lse_merge

__all__ = ["CacheLayout", "DecodeCache", "Group", "cache_layout", "init_cache", "decode"]


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class CacheLayout:
    """The static part of a cache: pattern, head counts and groups."""

    config: DilatedConfig
    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    groups: tuple[Group, ...]
    layers: tuple[tuple[int, ...], ...]  # group indices of each layer (a layer covers every head once)

    def buffer_shape(self, pattern: int) -> tuple[int, int, int, int]:
        """``[batch, m, pairs, head_dim]`` of pattern ``pattern``'s keys (and values)."""
        w, r = self.config.segment_lengths[pattern], self.config.dilation_rates[pattern]
        pairs = sum(len(g.kv_heads) for g in self.groups if g.pattern == pattern)
        return (self.batch, w // r, pairs, self.head_dim)


def cache_layout(batch, num_heads, num_kv_heads, head_dim, segment_lengths, dilation_rates,
                 mix) -> CacheLayout:
    """The layout of a cache; ``ValueError`` for shapes or patterns decoding cannot run."""
    config = DilatedConfig(segment_lengths, dilation_rates, mix, True)
    for name, x in (("batch", batch), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim)):
        if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
            raise ValueError(f"{name}={x!r} must be a positive int")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads=} is not a multiple of {num_kv_heads=}")
    if mix == "head_groups" and num_heads < config.num_patterns:
        raise ValueError(f"mix='head_groups' needs a head per pattern: "
                         f"num_heads={num_heads} < num_patterns={config.num_patterns}")
    plan = _build(max(config.segment_lengths), num_heads, num_kv_heads, config.segment_lengths,
                  config.dilation_rates, mix, True)
    group_size = num_heads // num_kv_heads
    groups, starts = [], {}
    for u in plan.units:
        heads = tuple(range(*u.q_heads))
        kvs = tuple(j // group_size for j in heads)
        distinct = tuple(sorted(set(kvs)))
        start = starts.get(u.pattern, 0)
        starts[u.pattern] = start + len(distinct)
        groups.append(Group(u.pattern, u.segment, u.rate, u.offset, heads, distinct,
                            tuple(distinct.index(kv) for kv in kvs), start))
    if mix == "head_groups":
        layers = (tuple(range(len(groups))),)
    else:
        layers = tuple(tuple(i for i, g in enumerate(groups) if g.pattern == p)
                       for p in range(config.num_patterns))
    return CacheLayout(config, batch, num_heads, num_kv_heads, head_dim, tuple(groups), layers)


class DecodeCache:
    """Keys and values of the current segment of every pattern, and the next position.

    ``keys[i]``, ``values[i]``: ``[batch, w_i / r_i, pairs_i, head_dim]`` (pairs: the distinct (kv
    head, offset) pairs of pattern ``i``'s heads); ``position``: the number of tokens decoded so
    far. :func:`decode` updates the buffers in place.
    """

    def __init__(self, layout: CacheLayout, position: int, keys, values):
        self.layout, self.position = layout, int(position)
        self.keys, self.values = list(keys), list(values)

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value buffers."""
        return sum(x.numel() * x.element_size() for x in (*self.keys, *self.values))

    def __repr__(self):
        c = self.layout.config
        return (f"DecodeCache(segment_lengths={c.segment_lengths}, dilation_rates={c.dilation_rates}, "
                f"mix={c.mix!r}, batch={self.layout.batch}, position={self.position}, "
                f"nbytes={self.nbytes})")


def init_cache(batch, num_heads, num_kv_heads, head_dim, segment_lengths, dilation_rates, *,
               mix="head_groups", dtype=torch.float32, device=None) -> DecodeCache:
    """An empty decoding cache (position 0).

    Args:
      batch, num_heads, num_kv_heads, head_dim: the shapes of the ``q [batch, t, num_heads,
        head_dim]`` and ``k``/``v [batch, t, num_kv_heads, head_dim]`` that :func:`decode` takes.
      segment_lengths, dilation_rates: the patterns (every ``w_i`` a multiple of ``r_i``).
      mix: ``"head_groups"`` or ``"longnet"``, as in :func:`ring_torch.dilated_attention`.
      dtype, device: where and how the keys and values are stored.

    Returns:
      A :class:`DecodeCache` of ``sum_i 2 * batch * (w_i / r_i) * pairs_i * head_dim`` elements
      (``cache.nbytes``), whatever the length decoded.
    """
    layout = cache_layout(batch, num_heads, num_kv_heads, head_dim, segment_lengths,
                          dilation_rates, mix)
    shapes = [layout.buffer_shape(i) for i in range(layout.config.num_patterns)]
    return DecodeCache(layout, 0, [torch.zeros(s, dtype=dtype, device=device) for s in shapes],
                       [torch.zeros(s, dtype=dtype, device=device) for s in shapes])


def _attend(q, k, v, hide, scale: float):
    """``q [B, c, H, d]``, ``k``/``v [B, L, H, d]``, ``hide [c, L]`` (True: masked; every row keeps
    a key) -> ``(out [B, c, H, d], lse [B, c, H])``."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(hide, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, H, c]
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse.unsqueeze(-1)), v)
    return out, lse.transpose(1, 2)


def _group_rows(q, k, v, kc, vc, g: Group, pos: int, scale: float):
    """One (pattern, offset) group on a chunk: ``(e, out rows [b, c, H, d], lse rows [b, c, H])``
    (rows of positions ``e, e + r, ...`` of the chunk), writing the chunk's rows into the cached
    ``kc``/``vc [b, m, G, d]`` (views of the pattern's buffers)."""
    t, r, m = q.shape[1], g.r, g.m
    e = (g.offset - pos) % r
    c = (t - e + r - 1) // r  # rows of this offset in the chunk
    if c == 0:
        return e, None, None
    row0 = (pos + e) // r
    slot0, row1 = row0 % m, row0 + c
    acc = torch.promote_types(q.dtype, torch.float32)
    dev = q.device
    qr = q[:, e::r][:, :c].index_select(2, index_tensor(g.heads, dev)).to(acc)  # [b, c, H, d]
    kv_idx = index_tensor(g.kv_heads, dev)
    kr, vr = (x[:, e::r][:, :c].index_select(2, kv_idx) for x in (k, v))  # [b, c, G, d]
    # The cached rows of the segment before the chunk, then the chunk's: index j is row
    # (row0 // m) * m + j.
    pair = index_tensor(g.head_pair, dev)
    kh, vh = (torch.cat([cached[:, :slot0], rows.to(cached.dtype)], 1).index_select(2, pair).to(acc)
              for cached, rows in ((kc, kr), (vc, vr)))  # [b, slot0 + c, H, d]
    if c <= m:
        at = torch.arange(slot0, slot0 + c, device=dev)[:, None]
        j = torch.arange(slot0 + c, device=dev)[None, :]
        out, lse = _attend(qr, kh, vh, (j > at) | (j < at // m * m), scale)
    else:  # segment by segment: m x m causal blocks
        b, H, d = qr.shape[0], qr.shape[2], qr.shape[3]
        n_seg = -(-(slot0 + c) // m)
        qv = qr.new_zeros(b, n_seg * m, H, d)
        qv[:, slot0:slot0 + c] = qr
        kv = [torch.nn.functional.pad(x, (0, 0, 0, 0, 0, n_seg * m - slot0 - c)) for x in (kh, vh)]
        hide = torch.ones(m, m, dtype=torch.bool, device=dev).triu(1)
        out, lse = _attend(*(x.reshape(b * n_seg, m, H, d) for x in (qv, *kv)), hide, scale)
        out = out.reshape(b, n_seg * m, H, d)[:, slot0:slot0 + c]
        lse = lse.reshape(b, n_seg * m, H)[:, slot0:slot0 + c]
    seg1 = row1 // m * m  # the first row of the next row's segment
    first = max(row0, seg1)  # the chunk's rows in that segment: [first, row1)
    if first < row1:
        kc[:, first - seg1:row1 - seg1] = kr[:, first - row0:]
        vc[:, first - seg1:row1 - seg1] = vr[:, first - row0:]
    return e, out, lse


def _check_step(query, key, value, cache: DecodeCache):
    lay = cache.layout
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be [batch, t, heads, head_dim], got shape {tuple(x.shape)}")
    t = query.shape[1]
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


@torch.no_grad()
def decode(query, key, value, cache: DecodeCache, softmax_scale=None):
    """The causal dilated attention of the next ``t`` tokens, given the cache of those before.

    Over successive calls (a prompt of any length, single tokens, chunks of any length) the outputs
    are those of ``dilated_attention(..., is_causal=True)`` on the whole sequence, with segments
    ``[s * w_i, (s + 1) * w_i)`` (any total length; equal to the forward wherever it accepts the
    length). No autograd (inference only).

    Args:
      query: ``[batch, t, heads, head_dim]``, the queries of positions ``cache.position + [0, t)``.
      key, value: ``[batch, t, kv_heads, head_dim]``.
      cache: a :class:`DecodeCache` from :func:`init_cache` or an earlier call; updated in place.
      softmax_scale: defaults to ``head_dim ** -0.5``.

    Returns:
      ``(out [batch, t, heads, head_dim], cache)``: ``out`` in the query dtype (0 where no pattern
      of a head selects the position), ``cache`` (the same object) advanced by ``t`` tokens.
    """
    _check_step(query, key, value, cache)
    lay, pos = cache.layout, cache.position
    b, t, h, d = query.shape
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    acc = torch.promote_types(query.dtype, torch.float32)
    outs, lses = [], []
    for ids in lay.layers:
        out = query.new_zeros(b, t, h, d, dtype=acc)
        lse = query.new_full((b, t, h), float("-inf"), dtype=acc)
        for gi in ids:
            g = lay.groups[gi]
            span = slice(g.start, g.start + len(g.kv_heads))
            e, o, l = _group_rows(query, key, value, cache.keys[g.pattern][:, :, span],
                                  cache.values[g.pattern][:, :, span], g, pos, scale)
            if o is not None:
                heads = index_tensor(g.heads, query.device)
                out[:, e::g.r][:, :o.shape[1]].index_copy_(2, heads, o)
                lse[:, e::g.r][:, :o.shape[1]].index_copy_(2, heads, l)
        outs.append(out)
        lses.append(lse)
    out = outs[0] if len(outs) == 1 else lse_merge(outs, lses)[0]
    cache.position = pos + t
    return out.to(query.dtype), cache
