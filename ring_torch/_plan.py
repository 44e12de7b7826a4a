"""Static plan of dilated attention: which (pattern, offset) pair each head runs, and caches.

A plan depends only on ``(seq_len, heads, kv_heads, patterns, mix, causal)``, never on data, so it
is pure Python and cached. Each :class:`Unit` is one kernel call: one (pattern, offset) pair on a
set of query heads, all segments folded into the batch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from ring_torch._config import DilatedConfig

__all__ = ["Unit", "DilatedPlan", "LRUCache", "PATTERN_CACHE", "MASK_CACHE", "build_plan",
           "plan_flops", "causal_mask", "index_tensor", "get_stats"]


class LRUCache:
    """A bounded least-recently-used map with hit/miss counters."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_or_create(self, key: Hashable, factory: Callable):
        """The value of ``key``, made by ``factory()`` on a miss. Under ``torch.compile`` the
        factory's value, never stored or looked up: the tracer cannot enter a lock, a traced value
        must not outlive its trace, and a look-up would guard the compiled graph on the order of
        the cache's keys, which eager calls reorder (dynamo then fails building that guard)."""
        if torch.compiler.is_compiling():
            return factory()
        with self._lock:
            if key in self._data:
                self.hits += 1
                self._data.move_to_end(key)
                return self._data[key]
            self.misses += 1
        value = factory()  # outside the lock: factories may be slow, a duplicate build is harmless
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
        return value

    def get_stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "entries": len(self._data),
                    "maxsize": self.maxsize}

    def clear(self):
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0


# Plans and the small index tensors derived from them (keyed by device).
PATTERN_CACHE = LRUCache(maxsize=128)
# Causal (strictly upper-triangular) boolean masks of the math backend, keyed by (rows, device).
MASK_CACHE = LRUCache(maxsize=64)
_PLAN_BUILDS = 0


@dataclass(frozen=True)
class Unit:
    """One kernel call: pattern ``pattern`` with effective segment ``segment`` (w'), rate ``rate``
    and ``offset`` on query heads ``range(*q_heads)``.

    Key/value heads are ``range(*kv_heads)`` each repeated ``kv_repeat`` times (grouped-query
    attention as the kernels understand it), or, when the heads do not form such runs,
    ``kv_index``: one kv head per query head.
    """

    pattern: int
    segment: int
    rate: int
    offset: int
    q_heads: tuple[int, int, int]
    kv_heads: tuple[int, int, int] | None
    kv_repeat: int
    kv_index: tuple[int, ...] | None

    @property
    def num_heads(self) -> int:
        return len(range(*self.q_heads))

    @property
    def rows(self) -> int:
        """``m = w' / r``: selected rows per segment."""
        return self.segment // self.rate

    def flops(self, batch: int, seq_len: int, head_dim: int) -> int:
        # Per segment and head: QK^T and PV, 2*m*m*d each. Causal kernels are counted in full:
        # the math backend multiplies full blocks and FlopCounterMode counts sdpa ops unmasked.
        segments = seq_len // self.segment
        return 4 * batch * segments * self.num_heads * self.rows * self.rows * head_dim


def _kv_selection(kv_ids: list[int]):
    """``(kv_heads, kv_repeat, kv_index)`` for the kv head of each query head in order."""
    runs: list[list[int]] = []  # [kv head, run length]
    for kv in kv_ids:
        if runs and runs[-1][0] == kv:
            runs[-1][1] += 1
        else:
            runs.append([kv, 1])
    heads = [kv for kv, _ in runs]
    repeat = runs[0][1]
    step = heads[1] - heads[0] if len(heads) > 1 else 1
    if (all(count == repeat for _, count in runs) and step > 0
            and heads == list(range(heads[0], heads[-1] + 1, step))):
        return (heads[0], heads[-1] + 1, step), repeat, None
    return None, 1, tuple(kv_ids)


def _unit(pattern, segment, rate, offset, q_heads, group) -> Unit:
    kv_heads, kv_repeat, kv_index = _kv_selection([j // group for j in range(*q_heads)])
    return Unit(pattern, segment, rate, offset, q_heads, kv_heads, kv_repeat, kv_index)


@dataclass(frozen=True)
class DilatedPlan:
    """All kernel calls of one dilated attention, in the order the layer assembles them.

    ``head_groups``: one unit per pattern, heads contiguous. ``longnet``: per pattern, one unit
    per offset class ``j % r_i`` (the strided heads ``o::r_i``). Every unit writes its heads and
    rows in place, so no permutation or concatenation follows.
    """

    seq_len: int
    num_heads: int
    num_kv_heads: int
    segment_lengths: tuple[int, ...]  # effective w'
    dilation_rates: tuple[int, ...]
    mix: str
    is_causal: bool
    units: tuple[Unit, ...]

    @property
    def merged(self) -> bool:
        """True when every head runs several patterns merged by their LSE (``longnet``); False
        when each head runs one unit (``head_groups``), so units only fill in their own heads."""
        return self.mix == "longnet"

    def pattern_units(self, pattern: int) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.pattern == pattern)

    def flops(self, batch: int, head_dim: int) -> int:
        """Analytic matmul FLOPs of the kernels (QK^T and PV; causal blocks counted in full)."""
        return sum(u.flops(batch, self.seq_len, head_dim) for u in self.units)


def _build(seq_len, num_heads, num_kv_heads, segments, rates, mix, is_causal) -> DilatedPlan:
    global _PLAN_BUILDS
    _PLAN_BUILDS += 1
    group = num_heads // num_kv_heads
    K = len(segments)
    units = []
    if mix == "head_groups":
        start = 0
        for i in range(K):
            size = num_heads // K + (1 if i < num_heads % K else 0)
            units.append(_unit(i, segments[i], rates[i], i % rates[i], (start, start + size, 1),
                               group))
            start += size
    else:  # longnet: head j uses offset j % r_i, so offset class o is the strided heads o::r_i
        for i in range(K):
            for o in range(min(rates[i], num_heads)):
                units.append(_unit(i, segments[i], rates[i], o, (o, num_heads, rates[i]), group))
    return DilatedPlan(seq_len, num_heads, num_kv_heads, segments, rates, mix, is_causal,
                       tuple(units))


def build_plan(config: DilatedConfig, seq_len: int, num_heads: int,
               num_kv_heads: int, tiled: bool = True) -> DilatedPlan:
    """The (cached) plan of a plan length ``seq_len`` (one the patterns tile:
    :meth:`DilatedConfig.padded_length`); validates the sizes first. ``tiled=False``: any
    ``seq_len`` (the ring plan of a process group, whose last segment may be partial)."""
    segments = config.validate_sizes(seq_len, num_heads, num_kv_heads, tiled)
    key = ("plan", seq_len, num_heads, num_kv_heads, segments, config.dilation_rates, config.mix,
           config.is_causal)
    return PATTERN_CACHE.get_or_create(key, lambda: _build(
        seq_len, num_heads, num_kv_heads, segments, config.dilation_rates, config.mix,
        config.is_causal))


def plan_flops(*, batch: int, seq_len: int, num_heads: int, head_dim: int,
               segment_lengths, dilation_rates, num_kv_heads: int | None = None,
               mix: str = "head_groups", is_causal: bool = False) -> int:
    """Analytic matmul FLOPs of one forward of :func:`ring_torch.dilated_attention` (at the plan
    length ``DilatedConfig.padded_length(seq_len)`` the call runs)."""
    config = DilatedConfig(segment_lengths, dilation_rates, mix, is_causal)
    plan = build_plan(config, config.padded_length(seq_len), num_heads,
                      num_heads if num_kv_heads is None else num_kv_heads)
    return plan.flops(batch, head_dim)


def index_tensor(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A cached int64 tensor of ``values`` on ``device`` (head gathers and permutations)."""
    return PATTERN_CACHE.get_or_create(
        ("index", values, str(device)),
        lambda: torch.tensor(values, dtype=torch.long, device=device))


def causal_mask(rows: int, device: torch.device) -> torch.Tensor:
    """A cached ``[rows, rows]`` boolean mask, True above the diagonal (keys a causal row hides)."""
    return MASK_CACHE.get_or_create(
        (rows, str(device)),
        lambda: torch.ones(rows, rows, dtype=torch.bool, device=device).triu(1))


def get_stats() -> dict:
    """Counters of both caches and of plan builds."""
    return {"pattern": PATTERN_CACHE.get_stats(), "mask": MASK_CACHE.get_stats(),
            "plan_builds": _PLAN_BUILDS}
