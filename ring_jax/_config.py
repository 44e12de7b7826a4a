"""Pattern configuration: a frozen dataclass that validates itself, and input-shape checks."""

from __future__ import annotations

import dataclasses
from typing import Literal

MIXES = ("head_groups", "longnet")
Mix = Literal["head_groups", "longnet"]


@dataclasses.dataclass(frozen=True)
class DilatedConfig:
    """Dilated-attention patterns and how heads use them (hashable: usable as a static jit arg).

    ``segment_lengths=(w_1..w_K)``, ``dilation_rates=(r_1..r_K)``; see the README's definition.
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    mix: Mix = "head_groups"
    is_causal: bool = False
    softmax_scale: float | None = None

    def __post_init__(self):
        w = tuple(int(x) for x in self.segment_lengths)
        r = tuple(int(x) for x in self.dilation_rates)
        object.__setattr__(self, "segment_lengths", w)
        object.__setattr__(self, "dilation_rates", r)
        object.__setattr__(self, "is_causal", bool(self.is_causal))
        if not w or len(w) != len(r):
            raise ValueError(f"segment_lengths={w} and dilation_rates={r} must be non-empty and of equal length")
        for wi, ri in zip(w, r):
            if wi <= 0 or ri <= 0:
                raise ValueError(f"segment lengths and dilation rates must be positive, got w={wi}, r={ri}")
        if self.mix not in MIXES:
            raise ValueError(f"mix={self.mix!r} is not one of {MIXES}")

    @property
    def num_patterns(self) -> int:
        return len(self.segment_lengths)

    def scale(self, head_dim: int) -> float:
        return head_dim ** -0.5 if self.softmax_scale is None else float(self.softmax_scale)

    def validate_shapes(self, seq_len: int, num_heads: int, num_kv_heads: int) -> None:
        """Errors that depend on n and head counts, named by value."""
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"{num_heads=} is not a multiple of {num_kv_heads=}")
        if self.mix == "head_groups" and num_heads < self.num_patterns:
            raise ValueError(f"mix='head_groups' needs at least one head per pattern: "
                             f"{num_heads=} < {self.num_patterns} patterns")
        for w, r in zip(self.segment_lengths, self.dilation_rates):
            we = min(w, seq_len)
            if we % r:
                raise ValueError(f"effective segment length {we} (w={w}, {seq_len=}) is not a multiple of r={r}")
            if seq_len % we:
                raise ValueError(f"{seq_len=} is not a multiple of w={we}")


def check_inputs(query, key, value) -> tuple[int, int, int, int, int]:
    """Checks ranks, dtypes and matching dims of ``q [b,n,h,d]``, ``k/v [b,n,h_kv,d]``.

    Returns ``(b, n, h, h_kv, d)``.
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"dtypes differ: query {query.dtype}, key {key.dtype}, value {value.dtype}")
    if key.shape != value.shape:
        raise ValueError(f"key shape {tuple(key.shape)} != value shape {tuple(value.shape)}")
    b, n, h, d = query.shape
    bk, nk, h_kv, dk = key.shape
    if (bk, nk, dk) != (b, n, d):
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} differ in batch, seq or head_dim")
    return b, n, h, h_kv, d
