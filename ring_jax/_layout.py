"""Where the tokens of a sharded sequence live: the contiguous and the balanced ring layouts.

``"contiguous"``: device ``j`` of ``P`` holds positions ``[j*L, (j+1)*L)``, ``L = n / P``.

``"balanced"`` (zigzag): the sequence is cut into ``2P`` chunks of ``C = n / (2P)`` tokens and
device ``j`` holds chunk ``j`` then chunk ``2P-1-j``, so every device holds as many early as late
tokens and causal work is equal on every device::

    n = 8 chunks, P = 4:   chunks  0 1 2 3 4 5 6 7
                           device  0 1 2 3 3 2 1 0
    balanced order: [c0 c7 | c1 c6 | c2 c5 | c3 c4]   (device j's shard is the j-th quarter)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LAYOUTS = ("contiguous", "balanced")


def check_layout(layout) -> str:
    """``layout`` if it is one of :data:`LAYOUTS`, else ``ValueError`` naming it."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"{layout=} must be one of {LAYOUTS}")
    return layout


def check_balanced_length(seq_len: int, num_devices: int) -> int:
    """The chunk length ``C = seq_len / (2 * num_devices)``; ``ValueError`` when it is not whole."""
    if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) or num_devices < 1:
        raise ValueError(f"{num_devices=} must be a positive int")
    if seq_len % (2 * num_devices):
        raise ValueError(f"{seq_len=} is not a multiple of 2 * {num_devices=}: the balanced layout cuts the "
                         f"sequence into 2 chunks per device")
    return seq_len // (2 * num_devices)


def balanced_order(num_devices: int) -> np.ndarray:
    """The chunk order of the balanced layout: ``[0, 2P-1, 1, 2P-2, ..., P-1, P]``."""
    P = num_devices
    return np.stack([np.arange(P), 2 * P - 1 - np.arange(P)], axis=1).reshape(-1)


def _permute_chunks(x, num_devices: int, axis: int, order):
    axis = axis % x.ndim
    C = check_balanced_length(x.shape[axis], num_devices)
    chunks = jnp.asarray(x).reshape(*x.shape[:axis], 2 * num_devices, C, *x.shape[axis + 1:])
    index = (slice(None),) * axis + (jnp.asarray(order),)
    # The input's sharding for the output: explicitly sharded arrays (jax.make_mesh) need it named.
    return chunks.at[index].get(out_sharding=jax.typeof(chunks).sharding).reshape(x.shape)


def to_balanced(x, num_devices: int, axis: int = 1):
    """Natural order to the balanced layout along ``axis`` (the sequence axis of ``[batch, seq,
    ...]``): the ``2P`` chunks reordered ``[c0, c_{2P-1}, c1, c_{2P-2}, ..., c_{P-1}, c_P]``, so
    the ``j``-th of ``P`` equal shards is device ``j``'s.

    Args:
      x: an array whose ``axis`` has length ``n``, a multiple of ``2 * num_devices``.
      num_devices: ``P``, the devices of the ring.
      axis: the sequence axis (default 1).

    Returns:
      ``x`` with its sequence axis permuted (same shape and dtype).
    """
    return _permute_chunks(x, num_devices, axis, balanced_order(num_devices))


def from_balanced(x, num_devices: int, axis: int = 1):
    """The inverse of :func:`to_balanced`: balanced layout back to natural order along ``axis``."""
    return _permute_chunks(x, num_devices, axis, np.argsort(balanced_order(num_devices)))


def _shard_perms(P: int):
    """``ppermute`` pairs moving each device's first (second) natural chunk, global chunk ``2d``
    (``2d + 1``), to the device that holds it in the balanced layout."""
    home = lambda c: c if c < P else 2 * P - 1 - c  # noqa: E731
    return tuple((d, home(2 * d)) for d in range(P)), tuple((d, home(2 * d + 1)) for d in range(P))


def shard_to_balanced(x, axis_name, num_devices: int):
    """Inside ``shard_map``: this device's contiguous shard ``[b, L, ...]`` → its balanced shard
    (two ``ppermute``s of ``L / 2`` rows: what a natural-order caller pays for the layout)."""
    P, C = num_devices, x.shape[1] // 2
    first, second = _shard_perms(P)
    even, odd = lax.ppermute(x[:, :C], axis_name, first), lax.ppermute(x[:, C:], axis_name, second)
    j_even = lax.axis_index(axis_name) % 2 == 0  # chunk j is even: it came with the first chunks
    return jnp.where(j_even, jnp.concatenate([even, odd], 1), jnp.concatenate([odd, even], 1))


def shard_from_balanced(x, axis_name, num_devices: int):
    """The inverse of :func:`shard_to_balanced`."""
    P, C = num_devices, x.shape[1] // 2
    first, second = _shard_perms(P)
    j_even = lax.axis_index(axis_name) % 2 == 0
    even, odd = jnp.where(j_even, x[:, :C], x[:, C:]), jnp.where(j_even, x[:, C:], x[:, :C])
    inverse = lambda perm: tuple((b, a) for a, b in perm)  # noqa: E731
    return jnp.concatenate([lax.ppermute(even, axis_name, inverse(first)),
                            lax.ppermute(odd, axis_name, inverse(second))], axis=1)
