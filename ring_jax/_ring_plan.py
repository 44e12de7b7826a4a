"""The ring plan: each unit as one device of a sharded sequence sees it (static, memoised).

Per unit (one pattern over some heads), with ``L`` the local length and ``w`` the effective
segment length: ``w <= L``: each segment lies on one device, the unit runs locally; ``w > L``: a
segment spans ``g = w / L`` consecutive devices, and each sends its selected K/V rows, one row
block per *distinct* (kv head, offset) pair the unit needs, around the sub-ring of those ``g``.
"""

from __future__ import annotations

import dataclasses
import functools

from ring_jax._config import DilatedConfig
from ring_jax._plan import PLAN_CACHE_SIZE, Unit, get_plan, length_problem


@dataclasses.dataclass(frozen=True)
class RingUnit:
    """A unit as one device sees it: ``local`` is the unit restricted to the ``L`` local rows."""

    unit: Unit
    local: Unit  # w = min(unit.w, L): the local view, for gathers and scatters
    group: int  # g: devices one segment spans; 1 means no communication
    pair_heads: tuple[int, ...]  # kv head of each distinct (kv head, offset) pair on the wire
    pair_offsets: tuple[int, ...]
    q_to_pair: tuple[int, ...]  # the pair each query head of the unit reads

    def perm(self, num_devices: int) -> tuple[tuple[int, int], ...]:
        """``ppermute`` pairs: each device sends to the next one of its sub-ring."""
        g = self.group
        return tuple((s + j, s + (j + 1) % g) for s in range(0, num_devices, g) for j in range(g))

    def hop_bytes(self, batch: int, head_dim: int, itemsize: int) -> int:
        """Bytes of one forward hop: K and V, ``L / r`` rows of each distinct pair. A backward hop
        carries K and V in their own dtype and dK, dV in the float32 (or wider) accumulator dtype
        (``_ring.pack_hop``; the last hop dK, dV only)."""
        return 2 * batch * self.local.m * len(self.pair_heads) * head_dim * itemsize


@dataclasses.dataclass(frozen=True)
class RingPlan:
    local_len: int
    num_devices: int
    layers: tuple[tuple[RingUnit, ...], ...]

    @property
    def units(self) -> tuple[RingUnit, ...]:
        return tuple(ru for layer in self.layers for ru in layer)

    def num_permutes(self, with_backward: bool = False) -> int:
        """``sum (g - 1)`` over spanning units; the backward adds ``g`` per unit: ``g - 1`` hops of
        K/V with their dK/dV accumulators, and one hop that takes the accumulators home."""
        return sum(ru.group - 1 + (ru.group if with_backward else 0) for ru in self.units if ru.group > 1)


def get_ring_plan(config: DilatedConfig, local_len: int, num_devices: int, num_heads: int,
                  num_kv_heads: int) -> RingPlan:
    """The memoised ring plan; ``ValueError`` naming pattern, n, L and P for invalid shardings."""
    problem = length_problem(config, local_len * num_devices, num_devices)
    if problem is not None:
        raise ValueError(problem)
    plan = get_plan(config, local_len * num_devices, num_heads, num_kv_heads)
    return _build_ring_plan(plan, local_len, num_devices)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _build_ring_plan(plan, local_len, num_devices) -> RingPlan:
    L, P = local_len, num_devices
    layers = []
    for layer in plan.layers:
        units = []
        for u in layer.units:  # the shapes passed length_problem
            if u.w <= L:
                units.append(RingUnit(u, u, 1, (), (), ()))
                continue
            pairs = sorted(set(zip(u.kv_heads, u.offsets)))
            q_to_pair = tuple(pairs.index(p) for p in zip(u.kv_heads, u.offsets))
            local = dataclasses.replace(u, w=L)
            units.append(RingUnit(u, local, u.w // L, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs),
                                  q_to_pair))
        layers.append(tuple(units))
    return RingPlan(L, P, tuple(layers))
