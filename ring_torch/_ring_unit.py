"""One spanning ring unit: forward and backward as plain functions, and the thin
``torch.autograd.Function`` that saves and delegates.

Tensors carry two leading axes ``[G, gl]``: the sub-rings and the group-ranks this process
holds (``[1, 1]`` distributed, ``[R / g, g]`` simulated). At hop ``t`` the queries of group-rank
``j`` hold the K/V block of group-rank ``(j - t) mod g`` (the communicator decides how it
arrives); partial ``(out, lse)`` are merged by LSE in float32 or better. Causal: blocks of later
ranks (``t > j``) are skipped (no compute, still forwarded), earlier blocks need no mask, only
the own block is masked (:class:`ring_torch._coords.BlockCoords` says which).

The backward feeds every block the final global ``(out, lse)`` of its rows (``dS = P * (dP - D
+ dlse)``, ``P = exp(S - lse)``, ``D = rowsum(dO * O)``) through the call's kernel (the fused
kernel's backward, or the float32 formula), so no per-hop scores are kept and memory per rank
does not grow with the ring; the communicator brings each block's dK/dV home.
"""

from __future__ import annotations

import torch

from ring_torch._comm import _Comm
from ring_torch._coords import BlockCoords
from ring_torch._kernels import Kernel
from ring_torch._rows import lse_merge

__all__ = ["ring_unit_forward", "ring_unit_backward", "RingUnitFunction"]


def _fold(x, lo):
    """``[G, gl, b, m, X, d]`` -> the active group-ranks ``[lo:]`` folded into the batch."""
    return x[:, lo:].reshape(-1, *x.shape[3:])


def _first_active(js, t, causal):
    """Index of the first local group-rank that attends the block of hop ``t`` (causal: the
    block of ``j - t`` is in the future when ``t > j``)."""
    return sum(1 for j in js if j < t) if causal else 0


def _hop_coords(coords: BlockCoords, comm: _Comm, t: int, lo: int) -> BlockCoords:
    """The coordinates of hop ``t``'s block for the group-ranks ``[lo:]``: keys are the own
    rows at hop 0, the block of another shard after."""
    return coords.at(comm.block_starts(0, lo), None if t == 0 else comm.block_starts(t, lo))


def _sum_into_pairs(dk_h, dv_h, pair_index, num_pairs):
    """Per-query-head ``dk``/``dv [B, m, H, d]`` summed into their (kv head, offset) pairs
    ``[B, m, num_pairs, d]`` (the transpose of ``index_select(2, pair_index)``)."""
    B, m, _, d = dk_h.shape
    dk = torch.zeros(B, m, num_pairs, d, dtype=dk_h.dtype, device=dk_h.device)
    return dk.index_add_(2, pair_index, dk_h), torch.zeros_like(dk).index_add_(2, pair_index, dv_h)


def ring_unit_forward(q, k, v, comm: _Comm, pair_index, scale: float, kernel: Kernel,
                      coords: BlockCoords):
    """Attention of the held rows over every block of the sub-ring.

    Args:
        q: ``[G, gl, b, m, H, d]`` the local selected query rows.
        k, v: ``[G, gl, b, m, Np, d]`` the local selected rows of each distinct pair.
        comm: the unit's communicator.
        pair_index: ``[H]`` int64, the pair each query head reads.
        scale: softmax scale.
        kernel: the call's kernel.
        coords: the unit's coordinates (row starts filled in per hop).

    Returns:
        ``out [G, gl, b, m, H, d]``, ``lse [G, gl, b, m, H]``, both float32 or wider.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    G, gl, b, m, H, d = q.shape
    kv = torch.stack([k, v]).contiguous()  # the wire buffer: K and V of every pair
    out = torch.zeros(G, gl, b, m, H, d, dtype=compute, device=q.device)
    lse = torch.full((G, gl, b, m, H), float("-inf"), dtype=compute, device=q.device)
    for t, block in comm.forward_blocks(kv):
        lo = _first_active(comm.js, t, coords.spec.is_causal)
        if lo == gl:
            continue
        ke, ve = block[0].index_select(4, pair_index), block[1].index_select(4, pair_index)
        o, l = kernel.forward(_fold(q, lo), _fold(ke, lo), _fold(ve, lo), scale,
                              _hop_coords(coords, comm, t, lo))
        shape = (G, gl - lo, b, m, H)
        o, l = o.reshape(*shape, d).to(compute), l.reshape(shape).to(compute)
        out[:, lo:], lse[:, lo:] = lse_merge([out[:, lo:], o], [lse[:, lo:], l])
    return out, lse


def ring_unit_backward(q, k, v, out, lse, dout, dlse, comm: _Comm, pair_index, scale: float,
                       kernel: Kernel, coords: BlockCoords):
    """Gradients of :func:`ring_unit_forward` from its global ``(out, lse)``.

    Args:
        q, k, v, comm, pair_index, scale, kernel, coords: as in :func:`ring_unit_forward`.
        out: ``[G, gl, b, m, H, d]``, lse: ``[G, gl, b, m, H]``: the forward's float32+ results.
        dout: ``[G, gl, b, m, H, d]`` or None (zero); dlse: ``[G, gl, b, m, H]`` or None (zero).

    Returns:
        ``dq`` in ``q``'s dtype, ``dk``, ``dv`` in ``k``'s dtype, shaped like their inputs.
    """
    compute = out.dtype
    G, gl, b, m, H, d = q.shape
    Np = k.shape[4]
    unit = kernel.grad_inputs(q, out, lse, dout, dlse)  # in the kernel's dtypes, once per unit
    dq = torch.zeros(q.shape, dtype=compute, device=q.device)

    def block_grads(block, t):
        """Adds to dq in place; returns the ``[2, G, gl, b, m, Np, d]`` dK/dV of ``block``."""
        dkv = torch.zeros(2, G, gl, b, m, Np, d, dtype=compute, device=q.device)
        lo = _first_active(comm.js, t, coords.spec.is_causal)
        if lo < gl:
            ke, ve = block[0].index_select(4, pair_index), block[1].index_select(4, pair_index)
            dq_t, dk_h, dv_h = (x.to(compute) for x in kernel.backward(
                unit.fold(lo), _fold(ke, lo), _fold(ve, lo), scale, _hop_coords(coords, comm, t, lo)))
            dk_t, dv_t = _sum_into_pairs(dk_h, dv_h, pair_index, Np)
            dq[:, lo:] += dq_t.reshape(G, gl - lo, b, m, H, d)
            dkv[0, :, lo:] = dk_t.reshape(G, gl - lo, b, m, Np, d)
            dkv[1, :, lo:] = dv_t.reshape(G, gl - lo, b, m, Np, d)
        return dkv

    dkv = comm.backward_exchange(torch.stack([k, v]).contiguous(), block_grads)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingUnitFunction(torch.autograd.Function):
    """``q [G, gl, b, m, H, d]``, ``k``/``v [G, gl, b, m, Np, d]`` (the local selected rows) ->
    ``out [G, gl, b, m, H, d]`` (q's dtype), ``lse [G, gl, b, m, H]`` (float32+); saves the
    float32+ ``(out, lse)`` for :func:`ring_unit_backward`."""

    @staticmethod
    def forward(ctx, q, k, v, comm, pair_index, scale, kernel, coords):
        out, lse = ring_unit_forward(q, k, v, comm, pair_index, scale, kernel, coords)
        ctx.save_for_backward(q, k, v, out, lse, pair_index)
        ctx.args = (comm, scale, kernel, coords)
        ctx.set_materialize_grads(False)
        return out.to(q.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, pair_index = ctx.saved_tensors
        comm, scale, kernel, coords = ctx.args
        grads = ring_unit_backward(q, k, v, out, lse, dout, dlse, comm, pair_index, scale, kernel, coords)
        return (*grads, None, None, None, None, None)
