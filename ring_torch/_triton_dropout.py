"""Dropout inside the Triton rows kernels: the shared counter hash (:mod:`ring_torch._dropout`)
finished per (row, key) in the kernels' tiles, so the forward and both backward kernels draw the
mask the math kernel draws, bit for bit, without materialising it.

The host gives each block's rows their partial hashes (:func:`ring_torch._dropout.row_hash`,
``[B, m, H]``) and its keys' global positions (``[B, m]``) as :class:`RowsDropout`; a kernel mixes
a key position into a row's hash and keeps the weight where the result reaches the rate's
threshold. Kept weights are scaled by ``1 / (1 - p)``; the LSE is that of the undropped weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["RowsDropout", "dropout_args"]

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


class RowsDropout(NamedTuple):
    """Dropout of one block of rows, drawn in the kernels.

    ``row_hash``: int64 ``[B, m, H]`` in ``[0, 2^32)``, :func:`ring_torch._dropout.row_hash` of
    each query row and head (any strides); ``kpos``: int64 ``[B, m_k]`` global position of each
    key row, or ``[B, m_k, H]`` as each query head sees them (any strides); ``p``: the rate, in
    ``(0, 1)``."""

    row_hash: torch.Tensor
    kpos: torch.Tensor
    p: float


def dropout_args(dropout: RowsDropout | None, q, k) -> tuple:
    """The kernels' dropout operands: ``(row_hash, sr_b, sr_m, sr_h, kpos, sp_b, sp_m, sp_h,
    threshold, keep_scale)``; placeholders (``q``, zero strides) for None. ``ValueError`` naming
    what is off."""
    if dropout is None:
        return q, 0, 0, 0, q, 0, 0, 0, 0, 1.0
    row_hash, kpos, p = dropout
    B, m, H = q.shape[:3]
    m_k = k.shape[1]
    if row_hash.shape != (B, m, H) or row_hash.dtype != torch.int64:
        raise ValueError(f"dropout.row_hash must be int64 {(B, m, H)}, got {row_hash.dtype} {tuple(row_hash.shape)}")
    if kpos.shape not in ((B, m_k), (B, m_k, H)) or kpos.dtype != torch.int64:
        raise ValueError(f"dropout.kpos must be int64 {(B, m_k)} or {(B, m_k, H)}, got {kpos.dtype} {tuple(kpos.shape)}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout.p={p} must be in (0, 1)")
    kpos_head = kpos.stride(2) if kpos.dim() == 3 else 0
    return (row_hash, *row_hash.stride(), kpos, *kpos.stride()[:2], kpos_head, int(p * 2 ** 32), 1.0 / (1.0 - p))


if triton is not None:
    @triton.jit
    def _mix(x):
        """:func:`ring_torch._dropout._mix` on uint32 (its products wrap as the masked int64 ones)."""
        x = ((x >> 16) ^ x) * 0x45D9F3B
        x = ((x >> 16) ^ x) * 0x45D9F3B
        return (x >> 16) ^ x

    @triton.jit
    def _hashes(X, base, start, sx_m, m, BLOCK: tl.constexpr):
        """``[BLOCK]`` uint32 from ``X + base`` (an int64 offset: a block and head of the row
        hashes, or a block of the key positions), rows ``start ..`` (0 past ``m``)."""
        rows = start + tl.arange(0, BLOCK)
        return tl.load(X + base + rows.to(tl.int64) * sx_m, mask=rows < m, other=0).to(tl.uint32)

    @triton.jit
    def _query_hashes(R, b, h, start, sr_b, sr_m, sr_h, m, placeholder, BLOCK: tl.constexpr, DROPOUT: tl.constexpr):
        """``[BLOCK]`` uint32 row hashes of query rows ``start ..`` of block ``b``, head ``h``
        (``placeholder`` without dropout)."""
        if DROPOUT:
            rh = _hashes(R, b.to(tl.int64) * sr_b + h * sr_h, start, sr_m, m, BLOCK)
        else:
            rh = placeholder
        return rh

    @triton.jit
    def _kept(row_hash, kpos, threshold):
        """Whether each weight is kept: row hashes against key positions (a column against a
        row, either way round), broadcast."""
        return _mix(row_hash ^ kpos).to(tl.int64) >= threshold
