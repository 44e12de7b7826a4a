"""Validated configuration of dilated attention and the checks of its inputs.

Every check here runs before any compute: ``TypeError`` for an argument of the wrong type,
``ValueError`` for a wrong value, each naming the argument and its value. Checks of concepts
both packages share have the same message text in ``ring_jax._config``.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["MIXES", "DilatedConfig", "check_shapes", "check_ring_size", "check_bool",
           "check_softmax_scale", "check_int_tuple", "check_seq_lengths", "check_segment_ids",
           "FLOAT_DTYPES"]

MIXES = ("head_groups", "longnet")

# --- Argument checks shared with ring_torch._config / ring_jax._config: the same message texts. ---

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _is_int(x) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def check_int_tuple(name: str, value) -> tuple[int, ...]:
    """``value`` (a tuple or list of ints; NumPy integers accepted, bools and floats refused) as
    a tuple of Python ints; ``TypeError`` naming ``name`` otherwise."""
    if isinstance(value, (tuple, list, range)) and all(_is_int(x) for x in value):
        return tuple(int(x) for x in value)  # the common case, without NumPy (torch.compile traces it)
    if not isinstance(value, (tuple, list, range, np.ndarray)) or np.ndim(value) != 1:
        raise TypeError(f"{name}={value!r} must be a tuple or list of ints")
    for x in value:
        if not _is_int(x):
            raise TypeError(f"{name}={tuple(value)!r} must be a tuple or list of ints: {x!r} is a "
                            f"{type(x).__name__}")
    return tuple(int(x) for x in value)


def check_mix(mix) -> None:
    if not isinstance(mix, str) or mix not in MIXES:
        raise ValueError(f"unknown mix={mix!r}; expected one of {MIXES}")


def check_bool(name: str, value) -> bool:
    """``value`` as a bool; ``TypeError`` unless it is a Python or NumPy bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}={value!r} must be a bool (True or False)")
    return bool(value)


def check_softmax_scale(scale) -> float | None:
    """``None`` or a finite positive number as a float (``TypeError`` for a non-number,
    ``ValueError`` for NaN, infinities, zero and negatives)."""
    if scale is None:
        return None
    message = f"softmax_scale={scale!r} must be a finite positive number or None"
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(message)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(message)
    return float(scale)


def check_ring_size(ring_size) -> int | None:
    """``None`` or a positive int (``TypeError`` for a non-int, ``ValueError`` for ``< 1``)."""
    if ring_size is None:
        return None
    message = f"ring_size={ring_size!r} must be a positive int or None"
    if not _is_int(ring_size):
        raise TypeError(message)
    if ring_size < 1:
        raise ValueError(message)
    return int(ring_size)


def check_sizes_positive(seq_len: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """``ValueError`` naming the first empty dimension (no attention over zero rows or features)."""
    for name, size in (("seq_len", seq_len), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                       ("head_dim", head_dim)):
        if size <= 0:
            raise ValueError(f"{name}={size} must be positive")


def dtype_name(dtype) -> str:
    """``float32`` for ``torch.float32`` and ``jnp.float32`` alike."""
    return str(dtype).removeprefix("torch.")


def check_float_dtype(name: str, dtype) -> None:
    """``TypeError`` unless ``dtype`` is one of :data:`FLOAT_DTYPES`."""
    if dtype_name(dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {dtype_name(dtype)}; expected a floating dtype "
                        f"({', '.join(FLOAT_DTYPES)})")


def _check_patterns(segment_lengths, dilation_rates) -> tuple[tuple[int, ...], tuple[int, ...]]:
    w = check_int_tuple("segment_lengths", segment_lengths)
    r = check_int_tuple("dilation_rates", dilation_rates)
    if not w or len(w) != len(r):
        raise ValueError(f"segment_lengths={w} and dilation_rates={r} must be non-empty and of equal length")
    for wi in w:
        if wi <= 0:
            raise ValueError(f"segment length w={wi} must be positive (segment_lengths={w})")
    for ri in r:
        if ri <= 0:
            raise ValueError(f"dilation rate r={ri} must be positive (dilation_rates={r})")
    for wi, ri in zip(w, r):
        if wi % ri:
            raise ValueError(f"w={wi} is not a multiple of r={ri}: every segment length must be a "
                             f"multiple of its dilation rate (segment_lengths={w}, dilation_rates={r})")
    return w, r


def _check_heads(mix: str, num_patterns: int, num_heads: int, num_kv_heads: int) -> None:
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads=} is not a multiple of {num_kv_heads=}")
    if mix == "head_groups" and num_heads < num_patterns:
        raise ValueError(f"mix='head_groups' needs a head per pattern: {num_heads=} < "
                         f"num_patterns={num_patterns}")


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
        segment_lengths, dilation_rates = _check_patterns(self.segment_lengths, self.dilation_rates)
        check_mix(self.mix)
        # Frozen: normalise through object.__setattr__ so lists given by callers become tuples.
        object.__setattr__(self, "segment_lengths", segment_lengths)
        object.__setattr__(self, "dilation_rates", dilation_rates)
        object.__setattr__(self, "is_causal", check_bool("is_causal", self.is_causal))
        object.__setattr__(self, "softmax_scale", check_softmax_scale(self.softmax_scale))

    @property
    def num_patterns(self) -> int:
        return len(self.segment_lengths)

    def scale(self, head_dim: int) -> float:
        """``softmax_scale``, or ``head_dim ** -0.5`` when it is None."""
        return head_dim ** -0.5 if self.softmax_scale is None else self.softmax_scale

    def effective_segments(self, seq_len: int) -> tuple[int, ...]:
        """``w_i' = min(w_i, seq_len)`` of a plan length (:meth:`padded_length`); ``ValueError``
        for a length the plans cannot tile (callers pad to :meth:`padded_length` first)."""
        effective = tuple(min(w, seq_len) for w in self.segment_lengths)
        for w_eff, r in zip(effective, self.dilation_rates):
            if seq_len % w_eff or w_eff % r:
                raise ValueError(f"{seq_len=} is not a plan length of segment_lengths="
                                 f"{self.segment_lengths}, dilation_rates={self.dilation_rates} "
                                 f"(pad to {self.padded_length(seq_len)})")
        return effective

    def padded_length(self, seq_len: int) -> int:
        """The smallest ``N >= seq_len`` the plans tile: for every pattern ``N % w_i == 0`` if
        ``w_i <= N``, else ``N % r_i == 0`` (so ``min(w_i, N)`` tiles ``N`` and is a multiple of
        ``r_i``). On ``[0, seq_len)`` the patterns at ``N`` select exactly the definition's
        segments ``[s*w_i, (s+1)*w_i)`` cut at ``seq_len``."""
        return _padded_length(self.segment_lengths, self.dilation_rates, int(seq_len))

    def tiled_prefix(self, seq_len: int) -> int:
        """The largest multiple ``T <= seq_len`` of every ``w_i`` (of their lcm): no segment of
        any pattern crosses ``T``, so ``[0, T)`` and ``[T, seq_len)`` attend independently."""
        return seq_len - seq_len % math.lcm(*self.segment_lengths)

    def validate_sizes(self, seq_len: int, num_heads: int, num_kv_heads: int,
                       tiled: bool = True) -> tuple[int, ...]:
        """Checks head counts and (``tiled``) tiling; returns the effective segment lengths.
        ``tiled=False``: ``min(w_i, seq_len)`` unchecked (a process-group ring, whose sharding
        rules allow a partial last segment, checks its own)."""
        _check_heads(self.mix, self.num_patterns, num_heads, num_kv_heads)
        if not tiled:
            return tuple(min(w, seq_len) for w in self.segment_lengths)
        return self.effective_segments(seq_len)

    def validate_inputs(self, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor) -> tuple[int, int, int, int, int]:
        """Checks ``query [b, n, h, d]``, ``key``/``value [b, n, h_kv, d]``.

        Returns ``(batch, seq_len, num_heads, num_kv_heads, head_dim)``.
        """
        b, n, h, h_kv, d = check_shapes(query, key, value)
        _check_heads(self.mix, self.num_patterns, h, h_kv)
        return b, n, h, h_kv, d


def check_shapes(query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Types, ranks, dtypes, shapes, non-empty sizes and devices of the inputs, without the
    tiling checks (a ring shard checks tiling against the global length).

    Returns ``(batch, seq_len, num_heads, num_kv_heads, head_dim)``.
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got "
                            f"{type(x).__module__}.{type(x).__qualname__}")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq, heads, head_dim], got shape "
                             f"{tuple(x.shape)}")
    for name, x in (("query", query), ("key", key), ("value", value)):
        check_float_dtype(name, x.dtype)
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
    check_sizes_positive(n, h, h_kv, d)
    return b, n, h, h_kv, d


def memo(maxsize: int):
    """A memo of a pure function of hashable positional arguments (emptied when it holds
    ``maxsize`` values). While ``torch.compile`` traces, ``fn`` runs uncached: a traced
    autograd backward may not mutate outside state, and a look-up would guard the graph on the
    table's keys, which eager calls change."""
    def wrap(fn):
        table: dict = {}

        @functools.wraps(fn)
        def cached(*args):
            if torch.compiler.is_compiling():
                return fn(*args)
            value = table.get(args)
            if value is None:
                value = fn(*args)
                if len(table) >= maxsize:
                    table.clear()
                table[args] = value
            return value

        cached.cache_clear = table.clear
        return cached
    return wrap


@memo(maxsize=256)
def _padded_length(segments: tuple[int, ...], rates: tuple[int, ...], n: int) -> int:
    """:meth:`DilatedConfig.padded_length`: on each interval of ``N`` between consecutive
    distinct ``w`` the patterns with ``w <= N`` are fixed, so ``N`` must be a multiple of the lcm
    of their ``w`` and of the other patterns' ``r``; the first interval holding such an
    ``N >= n`` gives the smallest (the last interval always holds one)."""
    bounds = sorted(set(segments)) + [math.inf]
    lo = 0
    for hi in bounds:
        if hi > n:
            step = math.lcm(*(w if w <= lo else r for w, r in zip(segments, rates)))
            candidate = -(-max(n, lo) // step) * step
            if candidate < hi:
                return candidate
        lo = hi
    raise AssertionError("unreachable: the last interval always holds a multiple")


def _integer_tensor(value, name: str, shape: tuple, label: str, note: str = "") -> torch.Tensor:
    """``value`` as a tensor; ``TypeError`` unless its dtype is an integer one (bool refused),
    ``ValueError`` unless its shape is ``shape`` (named ``label`` in the message, then ``note``)."""
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(np.asarray(value))
    dtype = value.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"{name} has dtype {dtype_name(dtype)}; expected an integer array of shape {label}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {label}={shape}{note}, got {tuple(value.shape)}")
    return value


def check_seq_lengths(seq_lengths, batch: int, seq_len: int, device: torch.device):
    """``seq_lengths`` (None, or an integer tensor or array-like of shape ``[batch]``) as an int64
    tensor on ``device`` (None stays None).

    ``TypeError`` for a non-integer dtype, ``ValueError`` for another shape; on the CPU the values
    are checked (``0 <= len <= seq_len``, ``ValueError``), on an accelerator they are data (no
    host sync) and clamped to ``[0, seq_len]``."""
    if seq_lengths is None:
        return None
    seq_lengths = _integer_tensor(seq_lengths, "seq_lengths", (batch,), "[batch]")
    if seq_lengths.device.type == "cpu":
        bad = (seq_lengths < 0) | (seq_lengths > seq_len)
        if bool(bad.any()):
            raise ValueError(f"seq_lengths={seq_lengths.tolist()} must lie in [0, {seq_len=}]")
    return seq_lengths.to(device=device, dtype=torch.int64, non_blocking=True).clamp(0, seq_len)


def check_segment_ids(segment_ids, batch: int, seq_len: int, device: torch.device):
    """``segment_ids`` (None, or an integer tensor or array-like of shape ``[batch, seq_len]``:
    the document of each position of the global sequence; any integers, negative ones too) as
    an int64 tensor on ``device`` (None stays None); ``TypeError`` for a non-integer dtype
    (bool included), ``ValueError`` for another shape. Values are not read."""
    if segment_ids is None:
        return None
    segment_ids = _integer_tensor(segment_ids, "segment_ids", (batch, seq_len), "[batch, seq]",
                                  " (the global sequence)")
    return segment_ids.to(device=device, dtype=torch.int64, non_blocking=True)


def lengths_from_padding_mask(key_padding_mask, batch: int, seq_len: int) -> torch.Tensor:
    """Right-padding lengths ``[batch]`` (int64, on the CPU) of a boolean ``key_padding_mask
    [batch, seq_len]`` (True = padding, torch's convention); ``ValueError`` naming the first row
    where a padding position precedes a real one (a mask that is not right padding),
    ``TypeError`` for a non-bool mask. Reads the mask (a host sync on an accelerator), so the
    lengths come back on the host, where a long padded batch can run entry by entry
    (:func:`ring_torch.dilated_attention`'s ``seq_lengths``)."""
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool torch.Tensor [batch, seq] (True = "
                        f"padding), got {getattr(key_padding_mask, 'dtype', type(key_padding_mask))}")
    if tuple(key_padding_mask.shape) != (batch, seq_len):
        raise ValueError(f"key_padding_mask must have shape [batch, seq]=({batch}, {seq_len}), got "
                         f"{tuple(key_padding_mask.shape)}")
    gaps = key_padding_mask[:, :-1] & ~key_padding_mask[:, 1:]  # padding, then a real position
    rows = gaps.any(1).nonzero().flatten().tolist()
    if rows:
        b = rows[0]
        p = int(gaps[b].nonzero()[0])
        raise ValueError(f"key_padding_mask is not right padding: row {b} has padding (True) at "
                         f"position {p} followed by a real position (False) at {p + 1}; only "
                         f"right-padded masks convert to seq_lengths")
    return (~key_padding_mask).sum(1).cpu()
