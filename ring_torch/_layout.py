"""Where the tokens of a sharded sequence live, and which blocks each rank computes at each hop.

``"contiguous"``: rank ``j`` of ``P`` holds positions ``[j*L, (j+1)*L)``, ``L = n / P``.

``"balanced"`` (zigzag): the sequence is cut into ``2P`` chunks of ``C = n / (2P)`` tokens and
rank ``j`` holds chunk ``j`` (slot A, local rows ``[0, C)``) then chunk ``2P-1-j`` (slot B, local
rows ``[C, 2C)``), so every rank holds as many early as late tokens::

    n = 8 chunks, P = 4:   chunks  0 1 2 3 4 5 6 7
                           rank    0 1 2 3 3 2 1 0
    balanced order: [c0 c7 | c1 c6 | c2 c5 | c3 c4]   (rank j's shard is the j-th quarter)

A spanning unit's :class:`Schedule` says, per hop ``t`` and sub-ring position ``a``, which
:class:`Block` s of (query rows x key rows of the block in hand) are computed, in *pieces* (the
whole shard for contiguous; the slots A and B for balanced). Contiguous and causal: the own block
is a triangle, earlier blocks are full, later blocks are skipped. Balanced (sub-ring ``G = P``,
"joint", when one segment is the whole sequence; else ``G = g = w' / C`` ranks, "split", holding
two mirrored segments): every rank computes the same work at every hop
(:func:`balanced_blocks`).
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

import torch

from ring_torch._config import DilatedConfig

__all__ = ["LAYOUTS", "check_layout", "balanced_order", "to_balanced", "from_balanced",
           "balanced_error", "Block", "Schedule", "make_schedule", "span_of", "sub_rings",
           "sub_ring_of"]

LAYOUTS = ("contiguous", "balanced")


def check_layout(layout) -> str:
    """``layout`` if it is one of :data:`LAYOUTS`, else ``ValueError`` naming it."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"unknown {layout=}; expected one of {LAYOUTS}")
    return layout


def _chunk_len(seq_len: int, num_devices) -> int:
    """``C = seq_len / (2 * num_devices)``; ``ValueError`` naming both when it is not whole."""
    if isinstance(num_devices, bool) or not isinstance(num_devices, numbers.Integral) or num_devices < 1:
        raise ValueError(f"{num_devices=} must be a positive int")
    if seq_len % (2 * num_devices):
        raise ValueError(f"{seq_len=} is not a multiple of 2 * {num_devices=}: the balanced layout "
                         f"cuts the sequence into 2 chunks per device")
    return seq_len // (2 * num_devices)


def balanced_order(num_devices: int) -> list[int]:
    """The chunk order of the balanced layout: ``[0, 2P-1, 1, 2P-2, ..., P-1, P]``."""
    P = int(num_devices)
    return [c for j in range(P) for c in (j, 2 * P - 1 - j)]


def _permute(x: torch.Tensor, num_devices: int, dim: int, order) -> torch.Tensor:
    dim = dim % x.dim()
    C = _chunk_len(x.shape[dim], num_devices)
    chunks = x.unflatten(dim, (2 * num_devices, C))
    index = torch.tensor(order, dtype=torch.int64, device=x.device)
    return chunks.index_select(dim, index).flatten(dim, dim + 1)


def to_balanced(x: torch.Tensor, num_devices: int, dim: int = 1) -> torch.Tensor:
    """Natural order to the balanced layout along ``dim`` (the sequence axis of ``[batch, seq,
    heads, head_dim]``): the ``2P`` chunks reordered ``[c0, c_{2P-1}, c1, c_{2P-2}, ...,
    c_{P-1}, c_P]``, so the ``j``-th of ``P`` equal shards is rank ``j``'s.

    Args:
        x: a tensor whose ``dim`` has length ``n``, a multiple of ``2 * num_devices``.
        num_devices: ``P``, the ranks of the ring.
        dim: the sequence axis (default 1).

    Returns:
        ``x`` with its sequence axis permuted (same shape, dtype and device; differentiable).

    Raises:
        ValueError: ``n % (2 * num_devices) != 0`` (naming both), or ``num_devices < 1``.
    """
    return _permute(x, num_devices, dim, balanced_order(num_devices))


def from_balanced(x: torch.Tensor, num_devices: int, dim: int = 1) -> torch.Tensor:
    """The inverse of :func:`to_balanced`: the balanced layout back to natural order.

    Args:
        x: a tensor in balanced order along ``dim`` (length a multiple of ``2 * num_devices``).
        num_devices: ``P``, the ranks of the ring.
        dim: the sequence axis (default 1).

    Returns:
        ``x`` in natural order (same shape, dtype and device; differentiable).
    """
    order = balanced_order(num_devices)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return _permute(x, num_devices, dim, inverse)


def balanced_error(config: DilatedConfig, seq_len: int, world: int) -> str | None:
    """Why ``world`` ranks cannot run ``config`` on ``seq_len`` tokens in the balanced layout
    (naming the pattern, ``n``, ``C`` and ``P``), or None.

    The contiguous rules on ``2P`` blocks of ``C`` tokens (``w' <= C``: ``C % w' == 0``;
    ``w' > C``: ``w' % C == 0``, ``n % w' == 0`` (no partial segment spanning chunks),
    ``C % r == 0``), and every spanning pattern has ``g = w' / C`` equal to ``2P`` or a divisor
    of ``P``."""
    n, P = seq_len, world
    hint = '; use layout="contiguous"'
    if n % (2 * P):
        return f"n={n} is not a multiple of 2P={2 * P} (P={P} ranks){hint}"
    C = n // (2 * P)
    for i, (w, r) in enumerate(zip(config.segment_lengths, config.dilation_rates)):
        we = min(w, n)
        where = f"pattern {i} (w={w}, w'={we}, r={r}) with n={n}, chunk C={C} on P={P} ranks"
        if we % r:
            return f"{where}: w' is not a multiple of r{hint}"
        if we <= C:
            if C % we:
                return f"{where}: C is not a multiple of w'{hint}"
            continue
        if we % C:
            return f"{where}: w' is not a multiple of C{hint}"
        if n % we:
            return (f"{where}: n is not a multiple of w', so the last segment would be partial "
                    f"and span chunks, which the balanced layout does not run (the contiguous "
                    f"layout of a process group does){hint}")
        if C % r:
            return f"{where}: C is not a multiple of r{hint}"
        g = we // C
        if g != 2 * P and P % g:
            return (f"{where}: its segments span g=w'/C={g} chunks, neither 2P={2 * P} nor a "
                    f"divisor of P{hint}")
    return None


@dataclass(frozen=True)
class Block:
    """One kernel call of a hop: query pieces ``q = (lo, hi)`` of the own shard against key
    pieces ``k = (lo, hi)`` of the block in hand; ``own``: the keys are the query's own rows
    (hop 0; causal: the lower triangle over the concatenated pieces)."""

    q: tuple[int, int]
    k: tuple[int, int]
    own: bool

    def work(self, piece_len: int, causal: bool) -> float:
        """Score elements (``piece_len`` tokens per piece; a causal own block counts half)."""
        full = (self.q[1] - self.q[0]) * (self.k[1] - self.k[0]) * piece_len ** 2
        return full / 2 if self.own and causal else float(full)


_A, _B, _AB, _ALL = (0, 1), (1, 2), (0, 2), (0, 1)


def contiguous_blocks(a: int, t: int, G: int, causal: bool) -> tuple[Block, ...]:
    """The contiguous schedule at position ``a``, hop ``t``: the own block, then every earlier
    block (causal: later ones skipped)."""
    if t == 0:
        return (Block(_ALL, _ALL, True),)
    return () if causal and (a - t) % G > a else (Block(_ALL, _ALL, False),)


def balanced_blocks(kind: str, a: int, t: int, G: int, causal: bool) -> tuple[Block, ...]:
    """The balanced schedule at position ``a``, hop ``t`` (block of position ``src = (a - t)
    mod G``): ``kind="joint"`` (both slots in one segment) or ``"split"`` (A and B in mirrored
    segments). Causal, ``t >= 1``: ``src < a`` attends its slot A (all of it, joint: ``[A;B] x
    A``; split: ``A x A``), ``src > a`` is attended by the own slot B (joint: ``B x [A;B]``;
    split: ``B x B``); either way ``2`` (joint) or ``1`` (split) ``C x C`` blocks."""
    joint = kind == "joint"
    if t == 0:
        return (Block(_AB, _AB, True),) if joint else (Block(_A, _A, True), Block(_B, _B, True))
    if not causal:
        return (Block(_AB, _AB, False),) if joint else (Block(_A, _A, False), Block(_B, _B, False))
    if (a - t) % G < a:
        return (Block(_AB, _A, False),) if joint else (Block(_A, _A, False),)
    return (Block(_B, _AB, False),) if joint else (Block(_B, _B, False),)


@dataclass(frozen=True)
class Schedule:
    """Which blocks a spanning unit computes, decided once per unit.

    ``kind``: ``"contiguous"``, ``"joint"`` or ``"split"``; ``group``: ``G`` ranks of the
    sub-ring; ``world``: ``P``; ``piece_len``: tokens per piece (``L`` or ``C``); ``pieces``:
    pieces per shard (1 or 2); ``table[t][a]``: the blocks of position ``a`` at hop ``t``."""

    kind: str
    group: int
    world: int
    piece_len: int
    pieces: int
    causal: bool
    table: tuple[tuple[tuple[Block, ...], ...], ...]

    def piece_starts(self, shard: int) -> tuple[int, ...]:
        """Global start of each piece of rank ``shard``'s rows."""
        if self.pieces == 1:
            return (shard * self.piece_len,)
        return (shard * self.piece_len, (2 * self.world - 1 - shard) * self.piece_len)

    def calls(self, js: tuple[int, ...], t: int) -> tuple[tuple[int, int, Block], ...]:
        """``(lo, hi, block)`` kernel calls of hop ``t`` for the held positions ``js``: the held
        indices ``[lo, hi)`` (consecutive, with equal blocks) all compute ``block``."""
        out, lo = [], 0
        for i in range(1, len(js) + 1):
            if i == len(js) or self.table[t][js[i]] != self.table[t][js[lo]]:
                out += [(lo, i, blk) for blk in self.table[t][js[lo]]]
                lo = i
        return tuple(out)

    def work(self, a: int) -> float:
        """Score elements position ``a`` computes over all hops (forward; the backward's follow)."""
        return sum(blk.work(self.piece_len, self.causal) for row in self.table for blk in row[a])


@functools.lru_cache(maxsize=256)
def make_schedule(kind: str, group: int, world: int, piece_len: int, causal: bool) -> Schedule:
    """The :class:`Schedule` of a spanning unit (cached)."""
    if kind == "contiguous":
        table = tuple(tuple(contiguous_blocks(a, t, group, causal) for a in range(group))
                      for t in range(group))
        return Schedule(kind, group, world, piece_len, 1, causal, table)
    table = tuple(tuple(balanced_blocks(kind, a, t, group, causal) for a in range(group))
                  for t in range(group))
    return Schedule(kind, group, world, piece_len, 2, causal, table)


def span_of(layout: str, segment: int, local_len: int, world: int) -> tuple[int, str]:
    """``(G, kind)`` of a pattern with effective segment ``segment``: ``G = 1`` when local, else
    the sub-ring size and the schedule kind (``"contiguous"``, ``"joint"``, ``"split"``)."""
    if layout == "contiguous":
        return (segment // local_len, "contiguous") if segment > local_len else (1, "local")
    C = local_len // 2
    if segment <= C:
        return 1, "local"
    if segment == local_len * world:
        return world, "joint"
    return segment // C, "split"


def sub_rings(world: int, group: int) -> tuple[tuple[int, int], ...]:
    """``(first rank, size)`` of each sub-ring of ``group`` consecutive ranks among ``world``:
    ranks ``[s*group, (s+1)*group)``; the last one has ``world % group`` ranks when that is not
    0 (the partial last segment of the contiguous layout)."""
    return tuple((s, min(group, world - s)) for s in range(0, world, group))


def sub_ring_of(rank: int, world: int, group: int) -> tuple[int, int]:
    """``(first rank, size)`` of the sub-ring holding ``rank`` (:func:`sub_rings`)."""
    first = rank - rank % group
    return first, min(group, world - first)
