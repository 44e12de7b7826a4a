"""Counter-based dropout masks for attention probabilities, bit-identical to ``ring_torch``'s.

The keep/drop decision of a weight is a 32-bit hash of ``(seed, pattern, batch index, head, query
position, key position)`` (global indices), never of the order of computation: one device, the
simulated ring and every device of a sharded ring (forward, and the backward that regenerates the
mask) draw the same mask, and so does ``ring_torch`` for the same seed. Dropout applies to each
pattern's normalised probabilities; the LSE is that of the undropped weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _mix(x):
    """A 32-bit integer finaliser (uint32 arithmetic wraps, as ``ring_torch``'s masked int64 does)."""
    x = ((x >> 16) ^ x) * jnp.uint32(0x45D9F3B)
    x = ((x >> 16) ^ x) * jnp.uint32(0x45D9F3B)
    return (x >> 16) ^ x


def threshold(rate: float):
    """The uint32 a weight's hash must reach to be kept (probability ``1 - rate``)."""
    return jnp.uint32(int(rate * 2**32))


def row_hash(seed, pattern: int, batch, heads, qpos):
    """uint32 ``[B, H, m]``: the hash of every key's weight in a row before its key position is
    mixed in (``seed`` uint32 ``[]``, ``batch [B]``, ``heads [H]``, ``qpos [B, H, m]``: global)."""
    u32 = lambda x: jnp.asarray(x).astype(jnp.uint32)  # noqa: E731
    base = _mix(_mix(u32(seed)) ^ jnp.uint32(pattern))
    h = _mix(base ^ u32(batch))  # [B]
    h = _mix(h[:, None] ^ u32(heads)[None, :])  # [B, H]
    return _mix(h[:, :, None] ^ u32(qpos))  # [B, H, m]


def kept(rows, kpos, rate: float):
    """True where a weight is kept: ``rows`` (:func:`row_hash`, ``[..., m, 1]``-broadcast) against
    key positions ``kpos`` (``[..., 1, m_k]``-broadcast); also inside the Pallas kernels."""
    return _mix(rows ^ kpos.astype(jnp.uint32)) >= threshold(rate)


def keep_mask(seed, pattern: int, rate: float, batch, heads, qpos, kpos):
    """Boolean ``[B, H, m, m_k]``: True where a weight is kept (probability ``1 - rate``).

    ``seed`` uint32 ``[]``, ``batch [B]``, ``heads [H]``, ``qpos [B, H, m]``, ``kpos [B, H, m_k]``:
    global indices."""
    return kept(row_hash(seed, pattern, batch, heads, qpos)[..., None], kpos[:, :, None, :], rate)


def as_seed(seed) -> jax.Array:
    """A uint32 seed from a Python int or an integer array (keep ints below 2^32)."""
    return jnp.asarray(seed).astype(jnp.uint32)


def check_dropout(rate, seed) -> float:
    """The rate as a float; ``ValueError`` outside ``[0, 1)`` or, for a positive rate, without a seed."""
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate={rate} must be in [0, 1)")
    if rate > 0.0 and seed is None:
        raise ValueError(f"dropout_rate={rate} needs a dropout_seed (an int, or uint32 drawn from a PRNG key)")
    return rate
