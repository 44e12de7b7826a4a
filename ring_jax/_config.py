"""Pattern configuration: a frozen dataclass that validates itself, and input checks.

Every check runs before any compute: ``TypeError`` for an argument of the wrong type,
``ValueError`` for a wrong value, each naming the argument and its value. Checks of concepts
both packages share have the same message text in ``ring_torch._config``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Literal

import numpy as np

MIXES = ("head_groups", "longnet")
Mix = Literal["head_groups", "longnet"]

# --- Argument checks shared with ring_torch._config / ring_jax._config: the same message texts. ---

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _is_int(x) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def check_int_tuple(name: str, value) -> tuple[int, ...]:
    """``value`` (a tuple or list of ints; NumPy integers accepted, bools and floats refused) as
    a tuple of Python ints; ``TypeError`` naming ``name`` otherwise."""
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
            raise ValueError(f"w={wi} is not a multiple of r={ri}: every segment length must be a multiple of "
                             f"its dilation rate (segment_lengths={w}, dilation_rates={r})")
    return w, r


def _check_heads(mix: str, num_patterns: int, num_heads: int, num_kv_heads: int) -> None:
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads=} is not a multiple of {num_kv_heads=}")
    if mix == "head_groups" and num_heads < num_patterns:
        raise ValueError(f"mix='head_groups' needs a head per pattern: {num_heads=} < "
                         f"num_patterns={num_patterns}")


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
        w, r = _check_patterns(self.segment_lengths, self.dilation_rates)
        check_mix(self.mix)
        object.__setattr__(self, "segment_lengths", w)
        object.__setattr__(self, "dilation_rates", r)
        object.__setattr__(self, "is_causal", check_bool("is_causal", self.is_causal))
        object.__setattr__(self, "softmax_scale", check_softmax_scale(self.softmax_scale))

    @property
    def num_patterns(self) -> int:
        return len(self.segment_lengths)

    def scale(self, head_dim: int) -> float:
        return head_dim ** -0.5 if self.softmax_scale is None else self.softmax_scale

    def validate_shapes(self, seq_len: int, num_heads: int, num_kv_heads: int) -> None:
        """Errors that depend on the head counts, named by value (any ``seq_len >= 1`` is valid:
        segments are ``[s*w, (s+1)*w)`` cut at ``seq_len``)."""
        _check_heads(self.mix, self.num_patterns, num_heads, num_kv_heads)


def check_inputs(query, key, value) -> tuple[int, int, int, int, int]:
    """Checks types, ranks, dtypes, matching dims and non-empty sizes of ``q [b,n,h,d]``,
    ``k/v [b,n,h_kv,d]``.

    Returns ``(b, n, h, h_kv, d)``.
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "ndim")):
            raise TypeError(f"{name} must be an array, got {type(x).__module__}.{type(x).__qualname__}")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
    for name, x in (("query", query), ("key", key), ("value", value)):
        check_float_dtype(name, x.dtype)
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"dtypes differ: query {query.dtype}, key {key.dtype}, value {value.dtype}")
    if key.shape != value.shape:
        raise ValueError(f"key shape {tuple(key.shape)} != value shape {tuple(value.shape)}")
    b, n, h, d = query.shape
    bk, nk, h_kv, dk = key.shape
    if (bk, nk, dk) != (b, n, d):
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} differ in batch, seq or head_dim")
    check_sizes_positive(n, h, h_kv, d)
    return b, n, h, h_kv, d


def _integer_array(value, name: str, shape: tuple, label: str, note: str = ""):
    """``value`` as an array (array-likes through NumPy); ``TypeError`` unless its dtype is an
    integer one, ``ValueError`` unless its shape is ``shape`` (named ``label``, then ``note``)."""
    if not (hasattr(value, "dtype") and hasattr(value, "shape")):
        value = np.asarray(value)
    dtype = np.dtype(value.dtype)
    if not np.issubdtype(dtype, np.integer):
        raise TypeError(f"{name} has dtype {dtype.name}; expected an integer array of shape {label}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {label}={shape}{note}, got {tuple(value.shape)}")
    return value


def check_segment_ids(segment_ids, batch: int, seq_len: int):
    """``segment_ids`` (None, or an integer array-like of shape ``[batch, seq_len]``: the document
    of each position) as an array (or None); ``TypeError`` for a non-integer dtype, ``ValueError``
    for another shape. Values are not read (they may be traced)."""
    if segment_ids is None:
        return None
    return _integer_array(segment_ids, "segment_ids", (batch, seq_len), "[batch, seq]", " (the global sequence)")


def check_seq_lengths(seq_lengths, batch: int):
    """``seq_lengths`` (None, or an integer array-like of shape ``[batch]``) as an array (or None);
    ``TypeError`` for a non-integer dtype, ``ValueError`` for another shape. Values are not read
    (they may be traced)."""
    if seq_lengths is None:
        return None
    return _integer_array(seq_lengths, "seq_lengths", (batch,), "[batch]")
