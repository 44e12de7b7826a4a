"""Where a block of attention rows sits in the global problem, and every score modifier from there.

A kernel sees one block: query rows ``q [B, m, H, d]`` and key rows ``k, v [B, m_k, H, d]``, the
segments of a unit folded into ``B``. :class:`Coords` carries the block's global coordinates (batch
index, query head, query and key positions) and :class:`Mods` the static modifiers that apply
(causal, dropout, padded keys, documents). :func:`score_mask` and :func:`dropout_keep` derive every
mask from those two, so a new modifier is a field here and a line in one of them.

:class:`Origin` is what a whole call knows about its place: the dropout seed, the global batch
index and sequence position of its local entry 0 (non-zero on a shard, or a chunk) and the
per-example lengths (positions at or past a length are padding: never a key, and their query rows
are zeroed by :func:`real_rows`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ring_jax._dropout import as_seed, keep_mask, row_hash


class Origin(NamedTuple):
    """A call's place in the global problem (traced scalars; a pytree)."""

    seed: jax.Array  # uint32 []: the dropout seed (0 without dropout)
    batch_base: jax.Array  # int32 []: global batch index of local batch entry 0
    pos_base: jax.Array  # int32 []: global position of local position 0
    lengths: jax.Array | None = None  # int32 [global batch]: real positions of each entry (None: all)
    half_base: jax.Array | None = None  # int32 []: global position of the second half's first row
    # (the balanced ring layout, whose shards hold two chunks); None: the rows are one stretch
    docs: jax.Array | None = None  # int32 [global batch, n]: the document of each position (None: one)

    def at(self, start) -> Origin:
        """The origin of the stretch that starts ``start`` positions further on."""
        return self._replace(pos_base=self.pos_base + start)

    def positions(self, index, rows: int):
        """Global positions of local rows ``index`` (any shape) of a call holding ``rows`` rows."""
        if self.half_base is None:
            return self.pos_base + index
        half = rows // 2
        return jnp.where(index < half, self.pos_base + index, self.half_base + (index - half))


def make_origin(seed=None, batch_base=0, pos_base=0, lengths=None, half_base=None, docs=None) -> Origin:
    as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)  # noqa: E731
    return Origin(as_seed(0 if seed is None else seed), jnp.asarray(batch_base, jnp.int32),
                  jnp.asarray(pos_base, jnp.int32), as_int(lengths), as_int(half_base), as_int(docs))


def real_rows(origin: Origin, batch: int, rows: int):
    """Boolean ``[batch, rows]``: local rows ``[0, rows)`` of local batch entries ``[0, batch)`` that
    lie before their entry's length (None when the call has no lengths: every row is real)."""
    if origin.lengths is None:
        return None
    lengths = origin.lengths[origin.batch_base + jnp.arange(batch)]  # [batch]
    return origin.positions(jnp.arange(rows), rows)[None, :] < lengths[:, None]


class Coords(NamedTuple):
    """Global coordinates of one block (traced; a pytree)."""

    seed: jax.Array  # uint32 []
    batch: jax.Array  # [B] global batch index of each folded row block
    heads: jax.Array  # [H] global query heads
    qpos: jax.Array  # [B, H, m] global query positions
    kpos: jax.Array  # [B, H, m_k] global key positions
    klen: jax.Array | None = None  # [B] length of each block's batch entry: keys at kpos >= klen are padding
    docs: jax.Array | None = None  # [global batch, n] document ids: a score needs equal ids at qpos and kpos


@dataclasses.dataclass(frozen=True)
class Mods:
    """Static score modifiers of a block (hashable).

    ``causal``: keys after their query are masked. A block is only given ``causal=True`` when its
    keys are its own query rows (a segment on one device, or the own block of a ring), where the
    mask is the lower triangle that fused kernels know; blocks wholly in a query's past run with
    ``causal=False``, wholly future ones are not computed. ``dropout_rate`` with the ``pattern``
    index of the shared hash. ``key_mask``: keys at or past their entry's length (``Coords.klen``)
    are masked; a causal call never needs it (padding comes after every real query).
    ``documents``: a key counts only for queries of its document (``Coords.docs``).
    ``skip_padding``: rows at or past their entry's length may be left uncomputed (a kernel hint
    for calls given ``seq_lengths``; the rows are zeroed afterwards either way)."""

    causal: bool = False
    dropout_rate: float = 0.0
    pattern: int = 0
    key_mask: bool = False
    documents: bool = False
    skip_padding: bool = False

    @property
    def dropout(self) -> bool:
        return self.dropout_rate > 0.0


def unit_coords(origin: Origin, batch: int, segments: int, w: int, r: int, heads, offsets) -> Coords:
    """The coordinates of a unit's folded blocks ``[batch * segments, m = w / r]`` (keys = queries)."""
    blocks = jnp.arange(batch * segments)
    local = ((blocks % segments)[:, None, None] * w
             + jnp.arange(w // r)[None, None, :] * r + jnp.asarray(offsets)[None, :, None])  # [B, H, m]
    qpos = origin.positions(local, segments * w)
    batch_index = origin.batch_base + blocks // segments
    klen = None if origin.lengths is None else origin.lengths[batch_index]
    return Coords(origin.seed, batch_index, jnp.asarray(heads), qpos, qpos, klen, origin.docs)


def aligned_coords(batch: int, rows: int, heads: int, seed=None) -> Coords:
    """Coordinates of ``batch`` independent blocks of ``rows`` consecutive positions from 0."""
    pos = jnp.broadcast_to(jnp.arange(rows), (batch, heads, rows))
    return Coords(as_seed(0 if seed is None else seed), jnp.arange(batch), jnp.arange(heads), pos, pos)


PADDED_KEY = -(2**31)  # the key id of a padded key (``row_ids`` with ``key_mask``)


def row_ids(coords: Coords, mods: Mods):
    """``(query ids [B, H, m], key ids [B, H, m_k])`` int32, or None when no score is masked by
    them: a score takes part only where the ids are equal and, with ``mods.key_mask``, the key's id
    is not :data:`PADDED_KEY` (keys at or past their entry's length). The ids are the documents of
    the rows' positions (``Coords.docs``), or 0 without ``mods.documents``."""
    if not (mods.documents or mods.key_mask):
        return None

    def doc(pos):  # [B, H, rows]: docs[batch, pos], one gather (no [B, n] copy of the documents)
        if not mods.documents:
            return jnp.zeros(pos.shape, jnp.int32)
        return coords.docs[coords.batch[:, None, None], pos].astype(jnp.int32)

    q_ids, k_ids = doc(coords.qpos), doc(coords.kpos)
    if mods.key_mask:
        k_ids = jnp.where(coords.kpos < coords.klen[:, None, None], k_ids, PADDED_KEY)
    return q_ids, k_ids


def ids_meet(q_ids, k_ids, key_mask: bool):
    """Boolean ``[..., m, m_k]`` of ids ``[..., m]`` and ``[..., m_k]`` (from :func:`row_ids`): equal
    ids, and with ``key_mask`` a key that is not padding (the XLA and Pallas kernels' one test)."""
    same = q_ids[..., :, None] == k_ids[..., None, :]
    return same & (k_ids != PADDED_KEY)[..., None, :] if key_mask else same


def score_mask(coords: Coords, mods: Mods):
    """Boolean ``[B, H, m, m_k]`` (or broadcastable to it), True where a score takes part, or None
    when every one does."""
    mask = None
    if mods.causal:
        mask = coords.qpos[..., :, None] >= coords.kpos[..., None, :]
    ids = row_ids(coords, mods)
    if ids is not None:
        same = ids_meet(*ids, mods.key_mask)  # [B, H, m, m_k]
        mask = same if mask is None else mask & same
    return mask


def dropout_keep(coords: Coords, mods: Mods):
    """Boolean ``[B, H, m, m_k]``, True where a probability is kept, or None without dropout."""
    if not mods.dropout:
        return None
    return keep_mask(coords.seed, mods.pattern, mods.dropout_rate, coords.batch, coords.heads, coords.qpos,
                     coords.kpos)


def dropout_rows(coords: Coords, mods: Mods):
    """``(row hashes uint32 [B, H, m], key positions [B, H, m_k])`` from which a kernel draws
    :func:`dropout_keep` tile by tile (``_dropout.kept``), or None without dropout."""
    if not mods.dropout:
        return None
    return row_hash(coords.seed, mods.pattern, coords.batch, coords.heads, coords.qpos), coords.kpos
