"""The ``math`` kernel: block attention by plain matmuls in float32 or better, any dtype, device
and mask (every mask of :func:`ring_torch._coords.block_masks`: causal, padding, documents,
dropout), the reference every other kernel of :mod:`ring_torch._kernels` falls back to; and the
backward operands every kernel's block backward takes (:class:`GradInputs`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ring_torch._coords import BlockCoords, block_masks

__all__ = ["GRAD_CHUNK_ELEMENTS", "GradInputs", "MathKernel"]

# Score elements (B * H * rows * keys) one chunk of the math backward materialises at most.
GRAD_CHUNK_ELEMENTS = 1 << 24


class GradInputs(NamedTuple):
    """One block's backward operands, in the dtypes its kernel wants: ``q``, ``out``, ``dout``
    ``[B, m, H, d]``, ``lse``, ``dlse``, ``delta = rowsum(dout * out)`` ``[B, m, H]``; None where
    the kernel needs none (``dlse`` None: zero)."""

    q: torch.Tensor
    out: torch.Tensor | None
    lse: torch.Tensor
    dout: torch.Tensor
    dlse: torch.Tensor | None
    delta: torch.Tensor | None

    def select(self, lo: int, hi: int, rows: slice) -> GradInputs:
        """``[G, gl, b, m, ...]`` operands -> the group-ranks ``[lo:hi)`` and ``rows`` of each,
        folded into the batch: ``[G * (hi - lo) * b, |rows|, ...]``."""
        return GradInputs(*(None if x is None else x[:, lo:hi, :, rows].flatten(0, 2) for x in self))


def _math_attention(q, k, v, scale, hide=None, keep=None, dropout_p=0.0):
    """``(out, lse)`` by plain matmuls in float32 or better; ``hide`` (``[m, m]`` or
    ``[B, H, m, m]``; rows it hides entirely give ``out = 0``, ``lse = -inf``) masks scores, ``keep [B, H, m, m]`` scales probabilities by ``1 / (1 - p)``."""
    B, m, H, d = q.shape
    H_kv = k.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    qh = q.to(compute).permute(0, 2, 1, 3).reshape(B, H_kv, H // H_kv, m, d)  # [B, H_kv, g, m, d]
    kh = k.to(compute).permute(0, 2, 1, 3).unsqueeze(2)  # [B, H_kv, 1, m, d]
    vh = v.to(compute).permute(0, 2, 1, 3).unsqueeze(2)  # [B, H_kv, 1, m, d]
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B, H_kv, g, m, m]
    empty = None
    if hide is not None and hide.dim() == 2:  # causal: every row keeps its own key
        s = s.masked_fill(hide, float("-inf"))
    elif hide is not None:  # padding, documents: a ring hop's block may hide every key of a row
        hide = hide.reshape(s.shape)
        empty = hide.all(-1)  # [B, H_kv, g, m]: such rows keep finite scores, zeroed below
        s = s.masked_fill(hide & ~empty.unsqueeze(-1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, H_kv, g, m]
    probs = torch.exp(s - lse.unsqueeze(-1))
    if keep is not None:  # dropout on the probabilities; [B, H, m, m] -> [B, H_kv, g, m, m]
        probs = probs * keep.reshape(probs.shape).to(compute) / (1.0 - dropout_p)
    out = torch.matmul(probs, vh)  # [B, H_kv, g, m, d]
    if empty is not None:
        out = torch.where(empty.unsqueeze(-1), torch.zeros((), dtype=out.dtype, device=out.device), out)
        lse = lse.masked_fill(empty, float("-inf"))
    out = out.reshape(B, H, m, d).transpose(1, 2).to(q.dtype)  # [B, m, H, d]
    return out, lse.reshape(B, H, m).transpose(1, 2)  # [B, m, H]


def _math_grads(g: GradInputs, k, v, scale, coords: BlockCoords):
    """Gradients of one block from the rows' *global* ``(out, lse)``, all in float32+.

    ``g.q``/``g.dout [B, m, H, d]``, ``k``/``v [B, m, H, d]`` (one kv row per query head),
    ``g.lse``/``g.delta``/``g.dlse [B, m, H]``. Returns ``dq``, ``dk``, ``dv [B, m, H, d]``. With
    dropout (``M = keep / (1 - p)``): ``dV = (P M)^T dO``, ``dS = P (M dP - D + dlse)`` (``D`` of
    the dropped output). Query rows go in chunks of at most :data:`GRAD_CHUNK_ELEMENTS` scores,
    so no ``m x m`` block is held for long shards; causal chunks stop at their last row's key."""
    q, dout, lse = g.q, g.dout, g.lse
    k, v = k.to(q.dtype), v.to(q.dtype)
    B, m, H, d = q.shape
    hide, keep = block_masks(coords, q.device)
    p_drop = coords.spec.dropout_p
    rows = max(1, GRAD_CHUNK_ELEMENTS // max(1, B * H * m))
    dq = torch.empty_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    row_terms = (g.delta - g.dlse).transpose(1, 2).unsqueeze(-1)  # [B, H, m, 1]
    lse_t = lse.transpose(1, 2).unsqueeze(-1)
    for c0 in range(0, m, rows):
        c1 = min(m, c0 + rows)
        kend = c1 if coords.is_causal else k.shape[1]  # causal: keys after the chunk's last row are masked
        qc, dc = q[:, c0:c1], dout[:, c0:c1]
        kc, vc = k[:, :kend], v[:, :kend]
        s = torch.einsum("bihd,bjhd->bhij", qc, kc) * scale  # [B, H, c, kend]
        if hide is not None:
            s = s.masked_fill(hide[..., c0:c1, :kend], float("-inf"))
        p = torch.exp(s - lse_t[:, :, c0:c1])
        dp = torch.einsum("bihd,bjhd->bhij", dc, vc)
        pv = p
        if keep is not None:
            scaled = keep[:, :, c0:c1, :kend].to(p.dtype) / (1.0 - p_drop)
            dp, pv = dp * scaled, p * scaled
        ds = p * (dp - row_terms[:, :, c0:c1])
        dq[:, c0:c1] = torch.einsum("bhij,bjhd->bihd", ds, kc) * scale
        dk[:, :kend] += torch.einsum("bhij,bihd->bjhd", ds, qc) * scale
        dv[:, :kend] += torch.einsum("bhij,bihd->bjhd", pv, dc)
    return dq, dk, dv


class MathKernel:
    """``math``: any dtype, device and mask; the reference every other kernel falls back to."""

    name = "math"
    fused_backward = False
    rows = None
    masks = False

    @classmethod
    def supports(cls, dtype, device_type, head_dim, needs_dropout, needs_key_mask=False) -> bool:
        return True

    @classmethod
    def create(cls, device: torch.device, dtype: torch.dtype, head_dim: int) -> MathKernel:
        return cls()

    def forward(self, q, k, v, scale, coords):
        """``(out [B, m, H, d], lse [B, m, H])`` with every mask of ``coords``."""
        hide, keep = block_masks(coords, q.device)
        return _math_attention(q, k, v, scale, hide, keep, coords.spec.dropout_p)

    def grad_inputs(self, q, out, lse, dout, dlse) -> GradInputs:
        """Operands in float32+ (``lse``'s dtype); ``dout``/``dlse`` None: zero; ``dlse`` is
        zeroed where ``lse`` is not finite."""
        compute = lse.dtype
        dout = torch.zeros(out.shape, dtype=compute, device=out.device) if dout is None else dout.to(compute)
        dlse = torch.zeros_like(lse) if dlse is None else dlse.to(compute)
        dlse = torch.where(torch.isfinite(lse), dlse, torch.zeros_like(dlse))
        return GradInputs(q.to(compute), None, lse, dout, dlse, (dout * out).sum(-1))

    def backward(self, g, k, v, scale, coords):
        """``(dq, dk, dv)`` per query head in float32+ (:func:`_math_grads`)."""
        return _math_grads(g, k, v, scale, coords)
