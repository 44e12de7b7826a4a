"""Validated configuration of dilated attention and the shape checks of its inputs.

Every check here runs before any compute, and every error is a ``ValueError`` that names the
offending values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MIXES", "DilatedConfig", "check_shapes"]

MIXES = ("head_groups", "longnet")


@dataclass(frozen=True)
class DilatedConfig:
    """Patterns ``(w_i, r_i)``, how heads mix them, causality and the softmax scale.

    ``segment_lengths`` and ``dilation_rates`` are stored as tuples of ints. Checks that need the
    sequence length or head counts live in :meth:`validate_inputs`.
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    mix: str = "head_groups"
    is_causal: bool = False
    softmax_scale: float | None = None

    def __post_init__(self):
        segment_lengths = tuple(int(w) for w in self.segment_lengths)
        dilation_rates = tuple(int(r) for r in self.dilation_rates)
        if not segment_lengths or len(segment_lengths) != len(dilation_rates):
            raise ValueError(f"{segment_lengths=} and {dilation_rates=} must be non-empty and of "
                             f"equal length")
        for w, r in zip(segment_lengths, dilation_rates):
            if w <= 0:
                raise ValueError(f"segment length {w=} must be positive ({segment_lengths=})")
            if r <= 0:
                raise ValueError(f"dilation rate {r=} must be positive ({dilation_rates=})")
        if self.mix not in MIXES:
            raise ValueError(f"unknown mix={self.mix!r}; expected one of {MIXES}")
        # Frozen: normalise through object.__setattr__ so lists given by callers become tuples.
        object.__setattr__(self, "segment_lengths", segment_lengths)
        object.__setattr__(self, "dilation_rates", dilation_rates)
        object.__setattr__(self, "is_causal", bool(self.is_causal))

    @property
    def num_patterns(self) -> int:
        return len(self.segment_lengths)

    def effective_segments(self, seq_len: int) -> tuple[int, ...]:
        """``w_i' = min(w_i, seq_len)``; raises if a pattern does not tile ``seq_len``."""
        effective = []
        for w, r in zip(self.segment_lengths, self.dilation_rates):
            w_eff = min(w, seq_len)
            if w_eff % r != 0:
                raise ValueError(f"effective segment length {w_eff=} (min({w=}, {seq_len=})) is not "
                                 f"a multiple of dilation rate {r=}")
            if seq_len % w_eff != 0:
                raise ValueError(f"{seq_len=} is not a multiple of effective segment length {w_eff=}")
            effective.append(w_eff)
        return tuple(effective)

    def validate_sizes(self, seq_len: int, num_heads: int, num_kv_heads: int) -> tuple[int, ...]:
        """Checks head counts and tiling; returns the effective segment lengths."""
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"{num_heads=} is not a multiple of {num_kv_heads=}")
        if self.mix == "head_groups" and num_heads < self.num_patterns:
            raise ValueError(f"mix='head_groups' needs a head per pattern: {num_heads=} < "
                             f"num_patterns={self.num_patterns}")
        return self.effective_segments(seq_len)

    def validate_inputs(self, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor) -> tuple[int, int, int, int, int]:
        """Checks ``query [b, n, h, d]``, ``key``/``value [b, n, h_kv, d]``.

        Returns ``(batch, seq_len, num_heads, num_kv_heads, head_dim)``.
        """
        b, n, h, h_kv, d = check_shapes(query, key, value)
        self.validate_sizes(n, h, h_kv)
        return b, n, h, h_kv, d


def check_shapes(query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Ranks, shapes, dtypes and devices of the inputs, without the tiling checks (a ring
    shard checks tiling against the global length).

    Returns ``(batch, seq_len, num_heads, num_kv_heads, head_dim)``.
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq, heads, head_dim], got shape "
                             f"{tuple(x.shape)}")
    if key.shape != value.shape:
        raise ValueError(f"key shape {tuple(key.shape)} != value shape {tuple(value.shape)}")
    b, n, h, d = query.shape
    kb, kn, h_kv, kd = key.shape
    if (kb, kn, kd) != (b, n, d):
        raise ValueError(f"query shape {tuple(query.shape)} and key/value shape "
                         f"{tuple(key.shape)} differ in batch, seq or head_dim")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"dtypes differ: query {query.dtype}, key {key.dtype}, "
                         f"value {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"devices differ: query {query.device}, key {key.device}, "
                         f"value {value.device}")
    return b, n, h, h_kv, d
