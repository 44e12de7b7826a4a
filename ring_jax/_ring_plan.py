"""The ring plan: each unit as one device of a sharded sequence sees it (static, memoised).

A device holds ``slots`` chunks of ``c`` tokens: one chunk of ``L`` (contiguous layout) or two of
``L / 2`` (balanced layout, ``_layout``). Per unit (one pattern over some heads), with ``w`` the
effective segment length: ``w <= c``: each segment lies in one chunk, the unit runs locally;
``w > c``: a segment spans chunks on several devices, and each device sends its selected K/V rows,
one row block per *distinct* (kv head, offset) pair the unit needs, around a sub-ring of
``group`` devices. :class:`HopCalls` says which (query chunks, key chunks) blocks a hop computes:

* contiguous: a segment spans ``g = w / L`` consecutive devices; hop ``t`` brings the block of
  position ``j - t``; causal: earlier blocks whole, later ones skipped. With ``n % w != 0`` the
  last segment spans ``last_group < g`` devices: a ring of that size, idle after its own hops.
* balanced, ``w = n`` ("joint"): all ``P`` devices, both chunks of one segment: causal hops
  compute queries ``[A;B]`` x keys ``A`` (from an earlier device) or ``B`` x ``[A;B]`` (from a
  later one): two chunk blocks on every device at every hop.
* balanced, ``P % g == 0`` with ``g = w / c`` ("split"): ``g`` devices hold two segments, chunk A
  at position ``a`` of one and chunk B at position ``g-1-a`` of the other (mirrored); causal
  hops compute ``A`` x ``A`` or ``B`` x ``B``: one chunk block per device and hop.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from ring_jax._config import DilatedConfig
from ring_jax._layout import check_balanced_length, check_layout
from ring_jax._plan import PLAN_CACHE_SIZE, Unit, _build_plan, length_problem

Slots = tuple[int, int]  # a range [lo, hi) of a device's chunks, in increasing global position
Call = tuple[Slots, Slots]  # one block: (query chunks, key chunks)


@dataclasses.dataclass(frozen=True)
class HopCalls:
    """The blocks of a spanning unit's hops. ``same``: the blocks of rows of one segment (the
    own hop, causal-masked when the call is causal; every hop of a non-causal call); ``early`` /
    ``late``: a causal hop whose keys come from an earlier / a later device position (no mask)."""

    same: tuple[Call, ...]
    early: tuple[Call, ...]
    late: tuple[Call, ...]


CONTIGUOUS = HopCalls(same=(((0, 1), (0, 1)),), early=(((0, 1), (0, 1)),), late=())
JOINT = HopCalls(same=(((0, 2), (0, 2)),), early=(((0, 2), (0, 1)),), late=(((1, 2), (0, 2)),))
SPLIT = HopCalls(same=(((0, 1), (0, 1)), ((1, 2), (1, 2))), early=(((0, 1), (0, 1)),), late=(((1, 2), (1, 2)),))


@dataclasses.dataclass(frozen=True)
class RingUnit:
    """A unit as one device sees it: ``local`` is the unit restricted to one chunk of rows."""

    unit: Unit
    local: Unit  # w = min(unit.w, c): the view of one chunk, for gathers and scatters
    group: int  # devices of one sub-ring; 1 means no communication
    pair_heads: tuple[int, ...]  # kv head of each distinct (kv head, offset) pair on the wire
    pair_offsets: tuple[int, ...]
    q_to_pair: tuple[int, ...]  # the pair each query head of the unit reads
    calls: HopCalls = CONTIGUOUS
    directions: tuple[int, ...] = (1,)  # per chunk: +1 when its global chunk index rises with the device
    last_group: int = 0  # devices of the last sub-ring when its segment is partial (0: all full)

    @property
    def slots(self) -> int:
        return len(self.directions)

    def sizes(self, num_devices: int) -> list[tuple[int, int]]:
        """``(first device, size)`` of each sub-ring."""
        return [(s, min(self.group, num_devices - s)) for s in range(0, num_devices, self.group)]

    def perm(self, num_devices: int) -> tuple[tuple[int, int], ...]:
        """``ppermute`` pairs: each device sends to the next one of its sub-ring."""
        return tuple((s + j, s + (j + 1) % g) for s, g in self.sizes(num_devices) for j in range(g))

    def home_perm(self, num_devices: int) -> tuple[tuple[int, int], ...]:
        """``ppermute`` pairs taking dK/dV home after ``group - 1`` hops: the block at position
        ``j`` belongs to position ``j - (group - 1)`` of its sub-ring (``j + 1`` in a full one)."""
        return tuple((s + j, s + (j - self.group + 1) % g) for s, g in self.sizes(num_devices) for j in range(g))

    def hop_bytes(self, batch: int, head_dim: int, itemsize: int) -> int:
        """Bytes of one forward hop: K and V, ``L / r`` rows of each distinct pair. A backward hop
        carries K and V in their own dtype and dK, dV in the float32 (or wider) accumulator dtype
        (``_ring.pack_hop``; the last hop dK, dV only)."""
        return 2 * batch * self.slots * self.local.m * len(self.pair_heads) * head_dim * itemsize

    def hop_calls(self, t: int, position: int, causal: bool) -> tuple[Call, ...]:
        """The blocks the device at sub-ring ``position`` computes at hop ``t`` (``t = 0``: its own)."""
        if t == 0 or not causal:
            return self.calls.same
        return self.calls.early if t <= position else self.calls.late

    def hop_work(self, t: int, position: int, causal: bool) -> float:
        """Chunk-by-chunk blocks the device at ``position`` computes at hop ``t`` (a causal own
        block of ``s`` chunks counts ``s * s / 2``: its lower triangle)."""
        half = 2 if causal and t == 0 else 1
        return sum((q[1] - q[0]) * (k[1] - k[0]) / half for q, k in self.hop_calls(t, position, causal))


@dataclasses.dataclass(frozen=True)
class RingPlan:
    local_len: int
    num_devices: int
    layers: tuple[tuple[RingUnit, ...], ...]
    layout: str = "contiguous"

    @property
    def units(self) -> tuple[RingUnit, ...]:
        return tuple(ru for layer in self.layers for ru in layer)

    def num_permutes(self, with_backward: bool = False) -> int:
        """``sum (g - 1)`` over spanning units; the backward adds ``g`` per unit: ``g - 1`` hops of
        K/V with their dK/dV accumulators, and one hop that takes the accumulators home."""
        return sum(ru.group - 1 + (ru.group if with_backward else 0) for ru in self.units if ru.group > 1)


def balanced_problem(config: DilatedConfig, seq_len: int, num_devices: int) -> str | None:
    """Why the balanced layout cannot hold ``seq_len`` tokens on ``num_devices`` (the message),
    or None: the contiguous rules on ``2P`` chunks of ``C``, and every pattern spanning chunks
    has ``w = n`` or ``g = w / C`` dividing ``P``."""
    n, P = seq_len, num_devices
    C = check_balanced_length(n, P)
    problem = length_problem(config, n, 2 * P)
    where = f"layout='balanced' (2 chunks of C={C} tokens on each of P={P} devices, n={n})"
    if problem is not None:
        return f"{where}: {problem.replace(f'ring_size={2 * P}', f'2P={2 * P}')}; use layout='contiguous'"
    for i, (w, r) in enumerate(zip(config.segment_lengths, config.dilation_rates)):
        g = min(w, n) // C
        if g > 1 and g != 2 * P and P % g:
            return (f"{where}: pattern {i} (w={min(w, n)}, r={r}) spans g={g} chunks, neither 2P nor a divisor of "
                    f"P; use layout='contiguous'")
    return None


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def balanced_padded_length(config: DilatedConfig, seq_len: int, num_devices: int) -> int:
    """The smallest ``N >= seq_len`` the balanced layout holds on ``num_devices`` (candidates
    step by ``lcm(r..., 2P)``; ``N = 2P * lcm(w...)`` always fits: every pattern local)."""
    step = math.lcm(*config.dilation_rates, 2 * num_devices)
    n = -(-int(seq_len) // step) * step
    while balanced_problem(config, n, num_devices) is not None:
        n += step
    return n


def get_ring_plan(config: DilatedConfig, local_len: int, num_devices: int, num_heads: int,
                  num_kv_heads: int, layout: str = "contiguous") -> RingPlan:
    """The memoised ring plan; ``ValueError`` naming pattern, n, L and P for invalid shardings."""
    n = local_len * num_devices
    if check_layout(layout) == "balanced":
        problem = balanced_problem(config, n, num_devices)
    else:
        problem = length_problem(config, n, num_devices, partial=True)
    if problem is not None:
        raise ValueError(problem)
    config.validate_shapes(n, num_heads, num_kv_heads)
    return _build_ring_plan(_build_plan(config, n, num_heads, num_kv_heads), local_len, num_devices, layout)


def _spanning(u: Unit, chunk: int, P: int, layout: str):
    """(group, calls, directions, last group) of a unit whose segments span chunks."""
    if layout == "contiguous":
        partial = (chunk * P) % u.w // chunk  # devices of a partial last segment
        return u.w // chunk, CONTIGUOUS, (1,), partial
    g = u.w // chunk
    return (P, JOINT, (1, -1), 0) if g == 2 * P else (g, SPLIT, (1, -1), 0)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _build_ring_plan(plan, local_len, num_devices, layout) -> RingPlan:
    L, P = local_len, num_devices
    chunk = L if layout == "contiguous" else L // 2
    layers = []
    for layer in plan.layers:
        units = []
        for u in layer.units:  # the shapes passed length_problem / balanced_problem
            if u.w <= chunk:
                units.append(RingUnit(u, u, 1, (), (), ()))
                continue
            pairs = sorted(set(zip(u.kv_heads, u.offsets)))
            q_to_pair = tuple(pairs.index(p) for p in zip(u.kv_heads, u.offsets))
            group, calls, directions, last = _spanning(u, chunk, P, layout)
            units.append(RingUnit(u, dataclasses.replace(u, w=chunk), group, tuple(p[0] for p in pairs),
                                  tuple(p[1] for p in pairs), q_to_pair, calls, directions, last))
        layers.append(tuple(units))
    return RingPlan(L, P, tuple(layers), layout)
