"""Counter-based dropout masks for attention probabilities, bit-identical to ``ring_torch``'s.

The keep/drop decision of a weight is a 32-bit hash of ``(seed, pattern, batch index, head, query
position, key position)`` (global indices), never of the order of computation: one device, the
simulated ring and every device of a sharded ring (forward, and the backward that regenerates the
mask) draw the same mask, and so does ``ring_torch`` for the same seed. Dropout applies to each
pattern's normalised probabilities; the LSE is that of the undropped weights.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class DropoutArgs(NamedTuple):
    """The traced part of one block's dropout (a pytree; the rate and pattern are static)."""

    seed: jax.Array  # uint32 []
    batch: jax.Array  # [B] global batch index of each folded row block
    heads: jax.Array  # [H] global query heads
    qpos: jax.Array  # [B, H, m] global query positions
    kpos: jax.Array  # [B, H, m_k] global key positions


def _mix(x):
    """A 32-bit integer finaliser (uint32 arithmetic wraps, as ``ring_torch``'s masked int64 does)."""
    x = ((x >> 16) ^ x) * jnp.uint32(0x45D9F3B)
    x = ((x >> 16) ^ x) * jnp.uint32(0x45D9F3B)
    return (x >> 16) ^ x


def keep_mask(args: DropoutArgs, pattern: int, rate: float):
    """Boolean ``[B, H, m, m_k]``: True where a weight is kept (probability ``1 - rate``)."""
    u32 = lambda x: jnp.asarray(x).astype(jnp.uint32)  # noqa: E731
    base = _mix(_mix(u32(args.seed)) ^ jnp.uint32(pattern))
    h = _mix(base ^ u32(args.batch))  # [B]
    h = _mix(h[:, None] ^ u32(args.heads)[None, :])  # [B, H]
    h = _mix(h[:, :, None] ^ u32(args.qpos))  # [B, H, m]
    h = _mix(h[..., None] ^ u32(args.kpos)[:, :, None, :])  # [B, H, m, m_k]
    return h >= jnp.uint32(int(rate * 2**32))


def as_seed(seed) -> jax.Array:
    """A uint32 seed from a Python int or an integer array (keep ints below 2^32)."""
    return jnp.asarray(seed).astype(jnp.uint32)


class Dropout(NamedTuple):
    """One call's dropout: ``rate`` (static), ``seed``, and the global batch index and sequence
    position of local entry 0 (non-zero on a shard of a sharded batch or sequence)."""

    rate: float
    seed: jax.Array
    batch_base: jax.Array | int = 0
    pos_base: jax.Array | int = 0

    def block_args(self, batch: int, segments: int, w: int, r: int, heads, offsets) -> DropoutArgs:
        """``DropoutArgs`` of the folded blocks ``[batch * segments, m = w / r]`` of one unit."""
        blocks = jnp.arange(batch * segments)
        qpos = (self.pos_base + (blocks % segments)[:, None, None] * w
                + jnp.arange(w // r)[None, None, :] * r + jnp.asarray(offsets)[None, :, None])  # [B, H, m]
        return DropoutArgs(self.seed, self.batch_base + blocks // segments, jnp.asarray(heads), qpos, qpos)


def make_dropout(rate: float, seed) -> Dropout | None:
    """None when ``rate == 0``; ``ValueError`` outside ``[0, 1)`` or without a seed."""
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate={rate} must be in [0, 1)")
    if rate == 0.0:
        return None
    if seed is None:
        raise ValueError(f"dropout_rate={rate} needs a dropout_seed (an int, or uint32 drawn from a PRNG key)")
    return Dropout(rate, as_seed(seed))
