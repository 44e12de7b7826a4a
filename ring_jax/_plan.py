"""Static plan of a dilated-attention call, built with NumPy/Python at trace time and memoised.

A *unit* is one (pattern, offset) pair applied to a set of query heads: its rows are gathered by a
strided reshape, its segments folded into the batch, and one block-attention kernel call computes
it. A *layer* is a set of units that covers every head once; ``head_groups`` has one layer (one
unit per head group), ``longnet`` has one layer per pattern (one unit per offset class
``j % r_i``), and layers are merged by log-sum-exp (LongNet Eq. 10).

Everything here depends only on static shapes and the config, so it is computed once per
(config, n, h, h_kv) and baked into the compiled program as constants: a jitted call builds nothing.
"""

from __future__ import annotations

import dataclasses
import functools

from ring_jax._config import DilatedConfig

PLAN_CACHE_SIZE = 256
_build_count = 0


@dataclasses.dataclass(frozen=True)
class Unit:
    """One (pattern, offset) pair over a set of query heads.

    ``w`` is the effective segment length ``min(w_i, n)``; each of the ``n // w`` segments holds
    ``m = w // r`` selected rows ``offset, offset + r, ...``.
    """

    pattern: int
    w: int
    r: int
    offset: int
    heads: tuple[int, ...]  # query heads, increasing
    kv_heads: tuple[int, ...]  # the kv head each query head reads (GQA)

    @property
    def m(self) -> int:
        return self.w // self.r


@dataclasses.dataclass(frozen=True)
class Layer:
    """Units that partition the heads; ``inv_perm`` restores head order after concatenation."""

    units: tuple[Unit, ...]
    inv_perm: tuple[int, ...] | None  # None when concatenation is already in head order


@dataclasses.dataclass(frozen=True)
class Plan:
    config: DilatedConfig
    seq_len: int
    num_heads: int
    num_kv_heads: int
    layers: tuple[Layer, ...]

    @property
    def units(self) -> tuple[Unit, ...]:
        return tuple(u for layer in self.layers for u in layer.units)

    def flops(self, batch: int, head_dim: int) -> int:
        """Matmul FLOPs the kernels execute: per segment and head, ``Q K^T`` and ``P V`` on an
        ``m x m`` block are ``2 * 2 * m^2 * d``. Causal blocks are computed whole and masked, so
        causal and non-causal counts are equal."""
        return sum(4 * batch * (self.seq_len // u.w) * len(u.heads) * u.m * u.m * head_dim
                   for u in self.units)


def head_group_sizes(num_heads: int, num_patterns: int) -> list[int]:
    """``K`` contiguous groups of sizes ``h // K``, the first ``h % K`` one larger."""
    return [num_heads // num_patterns + (i < num_heads % num_patterns) for i in range(num_patterns)]


def build_count() -> int:
    """How many plans have been built (not fetched from the cache) in this process."""
    return _build_count


def get_plan(config: DilatedConfig, seq_len: int, num_heads: int, num_kv_heads: int) -> Plan:
    """The memoised plan; raises ``ValueError`` for shapes the config cannot run on."""
    config.validate_shapes(seq_len, num_heads, num_kv_heads)
    return _build_plan(config, seq_len, num_heads, num_kv_heads)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _build_plan(config: DilatedConfig, seq_len: int, num_heads: int, num_kv_heads: int) -> Plan:
    global _build_count
    _build_count += 1
    group = num_heads // num_kv_heads

    def unit(i, offset, heads):
        w = min(config.segment_lengths[i], seq_len)
        r = config.dilation_rates[i]
        return Unit(i, w, r, offset, tuple(heads), tuple(j // group for j in heads))

    if config.mix == "head_groups":
        units, start = [], 0
        for i, size in enumerate(head_group_sizes(num_heads, config.num_patterns)):
            units.append(unit(i, i % config.dilation_rates[i], range(start, start + size)))
            start += size
        return Plan(config, seq_len, num_heads, num_kv_heads, (Layer(tuple(units), None),))

    layers = []
    for i, r in enumerate(config.dilation_rates):
        # Head j uses offset j % r: one unit per non-empty offset class.
        units = tuple(unit(i, o, range(o, num_heads, r)) for o in range(min(r, num_heads)))
        order = [j for u in units for j in u.heads]
        inv = tuple(order.index(j) for j in range(num_heads))
        layers.append(Layer(units, None if inv == tuple(range(num_heads)) else inv))
    return Plan(config, seq_len, num_heads, num_kv_heads, tuple(layers))


def cache_info():
    """``functools`` cache statistics of the plan memo (hits, misses, maxsize, currsize)."""
    return _build_plan.cache_info()
