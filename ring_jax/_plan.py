"""Static plan of a dilated-attention call, built with NumPy/Python at trace time and memoised.

A *unit* is one pattern applied to a set of query heads, each head with its offset: its rows are
gathered by a strided reshape, its segments folded into the batch, and one block-attention kernel
call computes it. A *layer* is a set of units that covers every head once; ``head_groups`` has one
layer (one unit per head group, one offset per group), ``longnet`` has one layer per pattern (one
unit over all heads, head j at offset ``j % r_i``), and layers are merged by log-sum-exp
(LongNet Eq. 10).

Everything here depends only on static shapes and the config, so it is computed once per
(config, n, h, h_kv) and baked into the compiled program as constants: a jitted call builds nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from ring_jax._config import DilatedConfig

PLAN_CACHE_SIZE = 256
_build_count = 0


@dataclasses.dataclass(frozen=True)
class Unit:
    """One pattern over a set of query heads, each at its own offset.

    ``w`` is the effective segment length ``min(w_i, n)``; in each of the ``n // w`` segments,
    head ``heads[t]`` attends among the ``m = w // r`` rows ``offsets[t], offsets[t] + r, ...``.
    """

    pattern: int
    w: int
    r: int
    heads: tuple[int, ...]  # query heads, increasing
    kv_heads: tuple[int, ...]  # the kv head each query head reads (GQA)
    offsets: tuple[int, ...]  # the offset of each query head

    @property
    def m(self) -> int:
        return self.w // self.r

    @property
    def offset(self) -> int | None:
        """The offset shared by all heads, or None when they differ."""
        return self.offsets[0] if len(set(self.offsets)) == 1 else None


@dataclasses.dataclass(frozen=True)
class Layer:
    """Units over consecutive head ranges that together cover every head once, in order."""

    units: tuple[Unit, ...]


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

    @property
    def one_layer(self) -> bool:
        """All heads in one layer (``head_groups``, or one pattern): each output row comes from
        one unit, no LSE merge."""
        return len(self.layers) == 1

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


def length_problem(config: DilatedConfig, seq_len: int, num_devices: int = 1, partial: bool = False) -> str | None:
    """Why the plan's strided layout cannot hold ``seq_len`` tokens in ``num_devices`` blocks of
    ``L = seq_len / num_devices`` (the message), or None when it can: every effective segment
    ``w' = min(w, seq_len)`` divides ``seq_len`` and is a multiple of ``r``; on several blocks,
    ``w' <= L`` divides ``L``, or ``w' > L`` is a multiple of ``L`` and ``L`` of ``r`` (and divides
    ``n`` unless ``partial``: the sharded contiguous ring runs a last segment spanning fewer devices)."""
    n, P = seq_len, num_devices
    if n % P:
        return f"seq_len={n} is not a multiple of ring_size={P}"
    L = n // P
    for i, (w, r) in enumerate(zip(config.segment_lengths, config.dilation_rates)):
        we = min(w, n)
        if P == 1:
            if n % we or we % r:
                return f"seq_len={n} is not a multiple of w={we} and r={r} (pattern {i})"
            continue
        where = f"pattern {i} (w={we}, r={r}) with n={n}, local length L={L} on P={P} devices"
        if we <= L:
            if L % we:
                return f"{where}: L is not a multiple of w (a segment would span devices)"
        elif we % L:
            return f"{where}: w is not a multiple of L (a segment would span devices)"
        elif n % we and not partial:
            return (f"{where}: n is not a multiple of w, so the last segment is partial and spans devices "
                    f"(the sharded ring runs it; this layout does not)")
        elif L % r:
            return f"{where}: L is not a multiple of r"
    return None


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def padded_length(config: DilatedConfig, seq_len: int, multiple: int = 1, num_devices: int = 1) -> int:
    """The smallest ``N >= seq_len``, a multiple of ``multiple``, whose layout fits
    (:func:`length_problem` with ``num_devices`` blocks). Every such ``N`` is a multiple of each
    ``r`` (``w % r == 0``), so candidates step by ``lcm(r..., multiple, num_devices)``; ``P *
    lcm(w..., step)`` always fits, so the search ends."""
    step = math.lcm(*config.dilation_rates, int(multiple), int(num_devices))
    n = -(-int(seq_len) // step) * step
    while length_problem(config, n, num_devices) is not None:
        n += step
    return n


def get_plan(config: DilatedConfig, seq_len: int, num_heads: int, num_kv_heads: int) -> Plan:
    """The memoised plan of ``seq_len`` tokens; ``ValueError`` for head counts the config cannot
    run, or a ``seq_len`` whose layout does not fit (:func:`length_problem`; the public functions
    pad to :func:`padded_length` first)."""
    config.validate_shapes(seq_len, num_heads, num_kv_heads)
    problem = length_problem(config, seq_len)
    if problem is not None:
        raise ValueError(problem)
    return _build_plan(config, seq_len, num_heads, num_kv_heads)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _build_plan(config: DilatedConfig, seq_len: int, num_heads: int, num_kv_heads: int) -> Plan:
    global _build_count
    _build_count += 1
    group = num_heads // num_kv_heads

    def unit(i, heads, offset_of):
        w = min(config.segment_lengths[i], seq_len)
        r = config.dilation_rates[i]
        return Unit(i, w, r, tuple(heads), tuple(j // group for j in heads), tuple(offset_of(j) for j in heads))

    if config.mix == "head_groups":
        units, start = [], 0
        for i, size in enumerate(head_group_sizes(num_heads, config.num_patterns)):
            units.append(unit(i, range(start, start + size), lambda j, i=i: i % config.dilation_rates[i]))
            start += size
        return Plan(config, seq_len, num_heads, num_kv_heads, (Layer(tuple(units)),))
    return Plan(config, seq_len, num_heads, num_kv_heads, tuple(
        Layer((unit(i, range(num_heads), lambda j, r=r: j % r),)) for i, r in enumerate(config.dilation_rates)))


def cache_info():
    """``functools`` cache statistics of the plan memo (hits, misses, maxsize, currsize)."""
    return _build_plan.cache_info()
