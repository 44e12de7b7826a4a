"""Counter-based dropout masks for attention probabilities.

The keep/drop decision of an attention weight is a hash of ``(seed, pattern, batch index, head,
query position, key position)`` (global positions), never of the order of computation: the
single-device layer, the simulated ring and every rank of a distributed ring (forward, and the
backward that regenerates the mask) draw the same mask, so they agree exactly with dropout on.

Dropout applies to each pattern's normalised probabilities (before the LongNet LSE merge, which
rescales whole patterns, so this equals dropout on the merged weights with one independent draw
per (pattern, key)); the LSE is not affected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Dropout", "keep_mask", "draw_seed", "make_dropout", "row_hash", "threshold"]

_M32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 tensors holding values in ``[0, 2^32)`` (products stay
    below 2^59, so nothing overflows)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def threshold(p: float) -> int:
    """The value a weight's 32-bit hash must reach to be kept (probability ``1 - p``)."""
    return int(p * 2 ** 32)


def row_hash(seed: int, pattern: int, batch: torch.Tensor, heads: torch.Tensor,
             qpos: torch.Tensor) -> torch.Tensor:
    """int64 ``[B, H, m_q]`` in ``[0, 2^32)``: the hash of every weight of a row before its key
    position is mixed in (``batch [B]``, ``heads [H]``, ``qpos [B, H, m_q]``: global indices); the
    Triton rows kernels finish it per key (:func:`ring_torch._triton_rows.attend_into`)."""
    device = qpos.device
    base = _mix(torch.full((1,), seed & _M32, dtype=torch.int64, device=device))  # a fill, no copy from the host
    base = _mix(base ^ (pattern & _M32))
    h = _mix(base ^ batch.to(device))  # [B]
    h = _mix(h[:, None] ^ heads.to(device)[None, :])  # [B, H]
    return _mix(h[:, :, None] ^ qpos)  # [B, H, m_q]


def keep_mask(seed: int, pattern: int, batch: torch.Tensor, heads: torch.Tensor,
              qpos: torch.Tensor, kpos: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean ``[B, H, m_q, m_k]``: True where the weight is kept (probability ``1 - p``).

    ``batch [B]``: batch index of each (folded) row block; ``heads [H]``: global query heads;
    ``qpos [B, H, m_q]``, ``kpos [B, H, m_k]``: global sequence positions (int64)."""
    h = row_hash(seed, pattern, batch, heads, qpos)
    return _mix(h[..., None] ^ kpos[:, :, None, :]) >= threshold(p)  # [B, H, m_q, m_k]


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A fresh 31-bit seed from torch's (CPU) random stream."""
    return int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator).item())


@dataclass(frozen=True)
class Dropout:
    """Dropout of one call: probability ``p`` and ``seed`` (where the rows sit globally is the
    business of :class:`ring_torch._coords.MaskSpec`)."""

    p: float
    seed: int


def make_dropout(p: float, seed: int | None) -> Dropout | None:
    """None for ``p == 0``; ``ValueError`` outside ``[0, 1)``."""
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p={p} must be in [0, 1)")
    if p == 0.0:
        return None
    return Dropout(p, draw_seed() if seed is None else int(seed))
