"""The ring plan: how the single-device plan's units run on ``P`` ranks holding ``L`` rows each.

Rank ``i`` of ``P`` holds global positions ``[i*L, (i+1)*L)``. Per ring unit (one pattern over
some query heads, each head at its offset; ``w`` the effective segment ``min(w_i, n)``):
``w <= L`` (``L % w == 0``) runs locally on each shard; ``w > L`` (``w % L == 0``,
``L % r == 0``) spans ``g = w / L`` consecutive ranks (a sub-ring ``[s*g, (s+1)*g)``), whose
selected rows of each *distinct* ``(kv head, offset)`` pair travel ``g - 1`` hops. When
``n % w != 0`` the last segment is partial: its sub-ring has ``g' = (n % w) / L`` ranks
(``RingUnit.last_group``) and runs as a ring of ``g'`` (``g' - 1`` hops, its own
``last_schedule``). With ``layout="balanced"`` (:mod:`ring_torch._layout`) ``w' <= C = L / 2``
is local and a spanning pattern runs on a sub-ring of ``P`` ranks (``w' = n``) or ``w' / C``
ranks, each unit with its :class:`ring_torch._layout.Schedule` (no partial last segment). :func:`ring_padded_length` is the smallest length
a ring of ``R`` shards in one process can pad a sequence to (whole segments only: the simulated
ring never has a partial sub-ring). Pure Python, cached; the same units, pairs, sub-rings and
hops as ``ring_jax``'s plan.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass

from ring_torch._config import DilatedConfig
from ring_torch._layout import (Schedule, balanced_error, make_schedule, span_of, sub_ring_of,
                                sub_rings)
from ring_torch._plan import PATTERN_CACHE, DilatedPlan, Unit, build_plan

__all__ = ["RingUnit", "RingPlan", "check_sharding", "sharding_error", "ring_padded_length",
           "build_ring_plan"]


@dataclass(frozen=True)
class RingUnit:
    """One unit as a rank sees it.

    ``heads``: the unit's query heads (absolute), in output order; ``offsets``: each head's offset.
    ``group`` (G): ranks of the unit's sub-rings; 1 = local, run by the single-device
    ``local_units``. ``last_group``: ranks of the partial last sub-ring (0: every sub-ring has
    ``G``). ``schedule``: the blocks each rank computes per hop (None when local);
    ``last_schedule``: those of the partial last sub-ring (a ring of ``last_group``).
    ``pairs``: the distinct ``(kv head, offset)`` pairs on the wire (sorted, as in ring_jax);
    ``q_to_pair``: the pair each query head reads.
    """

    pattern: int
    segment: int  # effective w'
    rate: int
    heads: tuple[int, ...]
    offsets: tuple[int, ...]
    group: int
    pairs: tuple[tuple[int, int], ...]
    q_to_pair: tuple[int, ...]
    local_units: tuple[Unit, ...]
    schedule: Schedule | None = None
    last_group: int = 0
    last_schedule: Schedule | None = None

    def sizes(self, world: int) -> tuple[tuple[int, int], ...]:
        """``(first rank, size)`` of each sub-ring (as ring_jax's ``RingUnit.sizes``)."""
        return sub_rings(world, self.group)

    def size_at(self, rank: int, world: int) -> int:
        """Ranks of the sub-ring holding ``rank``."""
        return sub_ring_of(rank, world, self.group)[1]

    def schedule_of(self, size: int) -> Schedule:
        """The schedule of a sub-ring of ``size`` ranks (``group`` or ``last_group``)."""
        return self.schedule if size == self.group else self.last_schedule

    def rows(self, local_len: int) -> int:
        """Selected rows per rank of a spanning unit: ``L / r``."""
        return local_len // self.rate

    def hop_bytes(self, batch: int, local_len: int, head_dim: int, itemsize: int) -> int:
        """Bytes one rank sends per forward hop: K and V, ``L / r`` rows of each distinct pair."""
        return 2 * batch * self.rows(local_len) * len(self.pairs) * head_dim * itemsize


@dataclass(frozen=True)
class RingPlan:
    """The single-device ``plan`` of the global sequence, sharded as ``world`` ranks of
    ``local_len`` rows in ``layout``, and its ring units."""

    plan: DilatedPlan
    local_len: int
    world: int
    units: tuple[RingUnit, ...]  # head_groups: in head order; longnet: one per pattern
    layout: str = "contiguous"

    def forward_bytes(self, batch: int, head_dim: int, itemsize: int,
                      rank: int = 0) -> dict[int, int]:
        """Bytes rank ``rank`` sends in the forward, per pattern: ``(g - 1)`` hops of
        :meth:`RingUnit.hop_bytes`, ``g`` the size of its sub-ring (``last_group`` on a partial
        last one; 0 bytes for local patterns)."""
        sent: dict[int, int] = defaultdict(int)
        for ru in self.units:
            hops = ru.size_at(rank, self.world) - 1
            sent[ru.pattern] += hops * ru.hop_bytes(batch, self.local_len, head_dim, itemsize)
        return dict(sent)

    def num_permutes(self, with_backward: bool = False, rank: int = 0) -> int:
        """Batched sub-ring exchanges of rank ``rank``: ``g - 1`` forward hops per spanning unit
        (``g`` its sub-ring's size); the backward adds ``g``: ``g - 1`` hops of K/V (with the
        dK/dV accumulators from the second on) and one that takes the accumulators home. A
        sub-ring of one rank exchanges nothing."""
        sizes = (ru.size_at(rank, self.world) for ru in self.units)
        return sum(g - 1 + (g if with_backward else 0) for g in sizes if g > 1)


def sharding_error(config: DilatedConfig, local_len: int, world: int,
                   partial: bool = False) -> str | None:
    """Why ``world`` ranks of ``local_len`` rows cannot run the plan (naming the pattern, ``n``,
    ``L`` and ``P``), or None. ``partial``: a spanning pattern may leave a partial last segment
    (``n % w' != 0``, the process-group ring); otherwise every segment is whole (the lengths a
    simulated ring pads to, :func:`ring_padded_length`)."""
    L, P, n = local_len, world, local_len * world
    for i, (w, r) in enumerate(zip(config.segment_lengths, config.dilation_rates)):
        we = min(w, n)
        where = f"pattern {i} (w={w}, w'={we}, r={r}) with local length L={L} on P={P} ranks"
        if we % r:
            return f"{where}: w' is not a multiple of r"
        if we <= L:
            if L % we:
                return f"{where}: L is not a multiple of w'"
        else:
            if n % we and not partial:
                return (f"{where}: n={n} is not a multiple of w', so the last segment is partial "
                        f"and spans ranks (a process group runs it; a simulated ring pads n)")
            if we % L:
                return f"{where}: w' is not a multiple of L"
            if L % r:
                return f"{where}: L is not a multiple of r"
    return None


def check_sharding(config: DilatedConfig, local_len: int, world: int,
                   layout: str = "contiguous"):
    """``ValueError`` naming the pattern, ``n``, ``L`` (balanced: ``C``) and ``P`` when the
    sharding cannot run the plan (:func:`sharding_error` with partial last segments allowed,
    :func:`ring_torch._layout.balanced_error`)."""
    error = (sharding_error(config, local_len, world, partial=True) if layout == "contiguous"
             else balanced_error(config, local_len * world, world))
    if error is not None:
        raise ValueError(error)


@functools.lru_cache(maxsize=256)
def ring_padded_length(config: DilatedConfig, seq_len: int, ring_size: int,
                       layout: str = "contiguous") -> int:
    """The smallest ``N >= seq_len`` that ``ring_size`` shards of ``N / ring_size`` rows can run
    (:func:`sharding_error`), among the plan lengths (:meth:`DilatedConfig.padded_length`);
    a multiple of ``ring_size * lcm(w)`` always can, so the search is short. ``"balanced"``:
    the smallest length ``2 * ring_size`` contiguous chunks can run that the balanced layout
    accepts (:func:`ring_torch._layout.balanced_error`; ``2 * ring_size * lcm(w)`` always is)."""
    if layout == "balanced":
        N = ring_padded_length(config, seq_len, 2 * ring_size)
        while balanced_error(config, N, ring_size) is not None:
            N = ring_padded_length(config, N + 1, 2 * ring_size)
        return N
    N = config.padded_length(seq_len)
    while N % ring_size or sharding_error(config, N // ring_size, ring_size) is not None:
        N = config.padded_length(N + 1)
    return N


def _ring_unit(pattern, segment, rate, heads, offsets, group_size, local_len, local_units,
               world, layout, causal):
    """The :class:`RingUnit` of one pattern over ``heads`` at ``offsets``."""
    kv = [j // group_size for j in heads]
    span, kind = span_of(layout, segment, local_len, world)
    if span == 1:
        return RingUnit(pattern, segment, rate, tuple(heads), tuple(offsets), 1, (), (),
                        tuple(local_units))
    pairs = tuple(sorted(set(zip(kv, offsets))))
    q_to_pair = tuple(pairs.index(p) for p in zip(kv, offsets))
    piece_len = local_len if kind == "contiguous" else local_len // 2
    schedule = make_schedule(kind, span, world, piece_len, causal)
    last = world % span  # ranks of a partial last segment (contiguous only: balanced refuses it)
    last_schedule = make_schedule(kind, last, world, piece_len, causal) if last else None
    return RingUnit(pattern, segment, rate, tuple(heads), tuple(offsets), span, pairs, q_to_pair,
                    tuple(local_units), schedule, last, last_schedule)


def _build_ring(plan: DilatedPlan, local_len: int, world: int, layout: str) -> RingPlan:
    """The ring units of ``plan``: per unit (``head_groups``) or per pattern (``longnet``)."""
    group_size = plan.num_heads // plan.num_kv_heads
    where = (world, layout, plan.is_causal)
    units = []
    if not plan.merged:  # one ring unit per single-device unit, in head order
        for u in plan.units:
            heads = range(*u.q_heads)
            units.append(_ring_unit(u.pattern, u.segment, u.rate, heads, [u.offset] * len(heads),
                                    group_size, local_len, (u,), *where))
    else:  # one ring unit per pattern, over all heads
        for i, (w, r) in enumerate(zip(plan.segment_lengths, plan.dilation_rates)):
            heads = range(plan.num_heads)
            units.append(_ring_unit(i, w, r, heads, [j % r for j in heads], group_size, local_len,
                                    plan.pattern_units(i), *where))
    return RingPlan(plan, local_len, world, tuple(units), layout)


def build_ring_plan(config: DilatedConfig, local_len: int, world: int, num_heads: int,
                    num_kv_heads: int, layout: str = "contiguous") -> RingPlan:
    """The (cached) ring plan; checks the sharding, then the head counts, before anything runs.
    A contiguous spanning pattern may leave a partial last segment (``n % w' != 0``): its last
    sub-ring has ``RingUnit.last_group`` ranks (a process group runs it; a simulated ring pads
    ``n`` to :func:`ring_padded_length` first and never has one).

    Args:
        config: the validated patterns.
        local_len: ``L``, rows per rank.
        world: ``P``, ranks of the ring.
        num_heads, num_kv_heads: head counts of ``[batch, seq, heads, head_dim]`` inputs.
        layout: ``"contiguous"`` or ``"balanced"`` (:mod:`ring_torch._layout`).

    Returns:
        The :class:`RingPlan`.
    """
    check_sharding(config, local_len, world, layout)
    plan = build_plan(config, local_len * world, num_heads, num_kv_heads, tiled=False)
    key = ("ring", plan, local_len, world, layout)
    return PATTERN_CACHE.get_or_create(key, lambda: _build_ring(plan, local_len, world, layout))
