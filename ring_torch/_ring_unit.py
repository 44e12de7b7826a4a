"""One spanning ring unit: forward and backward as plain functions, and the thin
``torch.autograd.Function`` that saves and delegates.

Tensors carry two leading axes ``[G, gl]``: the sub-rings and the group-ranks this process
holds (``[1, 1]`` distributed, ``[R / g, g]`` simulated). At hop ``t`` the queries of group-rank
``j`` hold the K/V block of group-rank ``(j - t) mod g`` (the communicator decides how it
arrives); the unit's :class:`ring_torch._layout.Schedule` says which rows attend which rows of
it (contiguous and causal: later blocks are skipped, still forwarded, earlier blocks need no
mask, only the own block is masked; balanced: a slot of one against both, or slot against
slot); partial ``(out, lse)`` are merged by LSE in float32 or better.

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
from ring_torch._layout import Schedule
from ring_torch._rows import lse_merge

__all__ = ["ring_unit_forward", "ring_unit_backward", "RingUnitFunction"]


def _rows(x, lo: int, hi: int, rows: slice):
    """``[G, gl, b, m, X, d]`` -> the group-ranks ``[lo:hi)`` and ``rows`` of each, folded into
    the batch: ``[G * (hi - lo) * b, |rows|, X, d]``."""
    return x[:, lo:hi, :, rows].flatten(0, 2)


def _slice(pieces: tuple[int, int], piece_rows: int) -> slice:
    return slice(pieces[0] * piece_rows, pieces[1] * piece_rows)


def _hop_calls(schedule: Schedule, comm: _Comm, m: int, coords: BlockCoords):
    """Per hop ``t``: ``(lo, hi, q rows, k rows, coords)`` of each kernel call of the held
    group-ranks ``[lo, hi)`` (the schedule's blocks, with their global row starts)."""
    piece_rows = m // schedule.pieces
    own = [s for row in comm.block_shards(0) for s in row]
    gl = len(comm.js)
    hops = []
    for t in range(schedule.group):
        held = [s for row in comm.block_shards(t) for s in row]
        calls = []
        for lo, hi, blk in schedule.calls(comm.js, t):
            # Sub-rings outer, then the held group-ranks [lo, hi).
            idx = [s * gl + i for s in range(len(own) // gl) for i in range(lo, hi)]
            q_starts = [schedule.piece_starts(own[i])[slice(*blk.q)] for i in idx]
            k_starts = None if blk.own else [schedule.piece_starts(held[i])[slice(*blk.k)] for i in idx]
            calls.append((lo, hi, _slice(blk.q, piece_rows), _slice(blk.k, piece_rows),
                          coords.at(q_starts, k_starts)))
        hops.append(calls)
    return hops


def _sum_into_pairs(dk_h, dv_h, pair_index, num_pairs):
    """Per-query-head ``dk``/``dv [B, m, H, d]`` summed into their (kv head, offset) pairs
    ``[B, m, num_pairs, d]`` (the transpose of ``index_select(2, pair_index)``)."""
    B, m, _, d = dk_h.shape
    dk = torch.zeros(B, m, num_pairs, d, dtype=dk_h.dtype, device=dk_h.device)
    return dk.index_add_(2, pair_index, dk_h), torch.zeros_like(dk).index_add_(2, pair_index, dv_h)


def ring_unit_forward(q, k, v, comm: _Comm, pair_index, scale: float, kernel: Kernel,
                      coords: BlockCoords, schedule: Schedule):
    """Attention of the held rows over every block of the sub-ring.

    Args:
        q: ``[G, gl, b, m, H, d]`` the local selected query rows.
        k, v: ``[G, gl, b, m, Np, d]`` the local selected rows of each distinct pair.
        comm: the unit's communicator.
        pair_index: ``[H]`` int64, the pair each query head reads.
        scale: softmax scale.
        kernel: the call's kernel.
        coords: the unit's coordinates (row starts filled in per call).
        schedule: the blocks each group-rank computes per hop.

    Returns:
        ``out [G, gl, b, m, H, d]``, ``lse [G, gl, b, m, H]``, both float32 or wider.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    G, gl, b, m, H, d = q.shape
    hops = _hop_calls(schedule, comm, m, coords)
    kv = torch.stack([k, v]).contiguous()  # the wire buffer: K and V of every pair
    out = torch.zeros(G, gl, b, m, H, d, dtype=compute, device=q.device)
    lse = torch.full((G, gl, b, m, H), float("-inf"), dtype=compute, device=q.device)
    for t, block in comm.forward_blocks(kv):
        for lo, hi, qs, ks, hop_coords in hops[t]:
            ke, ve = (x[:, lo:hi, :, ks].index_select(4, pair_index).flatten(0, 2) for x in block)
            o, l = kernel.forward(_rows(q, lo, hi, qs), ke, ve, scale, hop_coords)
            shape = (G, hi - lo, b, o.shape[1], H)
            o, l = o.reshape(*shape, d).to(compute), l.reshape(shape).to(compute)
            part = (slice(None), slice(lo, hi), slice(None), qs)
            out[part], lse[part] = lse_merge([out[part], o], [lse[part], l])
    return out, lse


def ring_unit_backward(q, k, v, out, lse, dout, dlse, comm: _Comm, pair_index, scale: float,
                       kernel: Kernel, coords: BlockCoords, schedule: Schedule):
    """Gradients of :func:`ring_unit_forward` from its global ``(out, lse)``: the same blocks.

    Args:
        q, k, v, comm, pair_index, scale, kernel, coords, schedule: as in
            :func:`ring_unit_forward`.
        out: ``[G, gl, b, m, H, d]``, lse: ``[G, gl, b, m, H]``: the forward's float32+ results.
        dout: ``[G, gl, b, m, H, d]`` or None (zero); dlse: ``[G, gl, b, m, H]`` or None (zero).

    Returns:
        ``dq`` in ``q``'s dtype, ``dk``, ``dv`` in ``k``'s dtype, shaped like their inputs.
    """
    compute = out.dtype
    G, gl, b, m, H, d = q.shape
    Np = k.shape[4]
    hops = _hop_calls(schedule, comm, m, coords)
    unit = kernel.grad_inputs(q, out, lse, dout, dlse)  # in the kernel's dtypes, once per unit
    dq = torch.zeros(q.shape, dtype=compute, device=q.device)

    def block_grads(block, t):
        """Adds to dq in place; returns the ``[2, G, gl, b, m, Np, d]`` dK/dV of ``block``."""
        dkv = torch.zeros(2, G, gl, b, m, Np, d, dtype=compute, device=q.device)
        for lo, hi, qs, ks, hop_coords in hops[t]:
            ke, ve = (x[:, lo:hi, :, ks].index_select(4, pair_index).flatten(0, 2) for x in block)
            dq_t, dk_h, dv_h = (x.to(compute) for x in kernel.backward(
                unit.select(lo, hi, qs), ke, ve, scale, hop_coords))
            dk_t, dv_t = _sum_into_pairs(dk_h, dv_h, pair_index, Np)
            dq[:, lo:hi, :, qs] += dq_t.reshape(G, hi - lo, b, -1, H, d)
            dkv[0, :, lo:hi, :, ks] += dk_t.reshape(G, hi - lo, b, -1, Np, d)
            dkv[1, :, lo:hi, :, ks] += dv_t.reshape(G, hi - lo, b, -1, Np, d)
        return dkv

    dkv = comm.backward_exchange(torch.stack([k, v]).contiguous(), block_grads)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingUnitFunction(torch.autograd.Function):
    """``q [G, gl, b, m, H, d]``, ``k``/``v [G, gl, b, m, Np, d]`` (the local selected rows) ->
    ``out [G, gl, b, m, H, d]`` (q's dtype), ``lse [G, gl, b, m, H]`` (float32+); saves the
    float32+ ``(out, lse)`` for :func:`ring_unit_backward`."""

    @staticmethod
    def forward(ctx, q, k, v, comm, pair_index, scale, kernel, coords, schedule):
        out, lse = ring_unit_forward(q, k, v, comm, pair_index, scale, kernel, coords, schedule)
        ctx.save_for_backward(q, k, v, out, lse, pair_index)
        ctx.args = (comm, scale, kernel, coords, schedule)
        ctx.set_materialize_grads(False)
        return out.to(q.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, pair_index = ctx.saved_tensors
        comm, scale, kernel, coords, schedule = ctx.args
        grads = ring_unit_backward(q, k, v, out, lse, dout, dlse, comm, pair_index, scale, kernel,
                                   coords, schedule)
        return (*grads, None, None, None, None, None, None)
