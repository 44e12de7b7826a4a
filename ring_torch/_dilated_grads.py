"""The backward of the single-device layer (and of a ring's local units): every unit's block
gradient from the *merged* ``(out, lse)``, written in place into its strided rows of ``dq``,
``dk``, ``dv`` (:func:`_backward`); which gradients add up and in what dtype (:func:`_sums`,
:func:`grad_dtypes`); a long unit's row blocks; the rows' document ids for kernels that mask by
them (:func:`_call_ids`, shared with the forward in :mod:`ring_torch._dilated`).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ring_torch._aten import copy_rows_
from ring_torch._config import memo
from ring_torch._coords import BlockCoords, MaskSpec, row_ids, unit_coords
from ring_torch._kernels import GradInputs, Kernel
from ring_torch._padded import unit_rows_zeroed
from ring_torch._plan import DilatedPlan, Unit, index_tensor
from ring_torch._rows import gather_rows, head_rows, kv_rows, q_rows

__all__ = ["BACKWARD_BLOCK_BYTES", "grad_dtypes"]


def _call_ids(kernel: Kernel, spec: MaskSpec, q) -> torch.Tensor | None:
    """The rows' document ids ``[b, n]`` where the kernel masks by them (:attr:`Kernel.masks`)."""
    return row_ids(spec, q.shape[0], q.shape[1], q.device) if kernel.masks else None


def _unit_ids(ids: torch.Tensor | None, unit: Unit) -> torch.Tensor | None:
    """The unit's rows of ``ids [b, n]``: ``[b * S, m]``, a view."""
    return None if ids is None else gather_rows(ids[:, :, None], unit)[..., 0]


def _overlaps(head_lists) -> bool:
    """True when a head is listed twice, in one unit or two (its gradients are then summed)."""
    seen: set[int] = set()
    for heads in head_lists:
        if len(set(heads)) < len(heads) or seen & set(heads):
            return True
        seen |= set(heads)
    return False


@memo(maxsize=256)
def _sums(plan: DilatedPlan) -> tuple[bool, bool]:
    """Whether gradients of several query heads or units add into one query head, and into one
    kv head (``kv_repeat`` repeats are summed inside a unit and do not count); once per plan."""
    q_lists = [list(range(*u.q_heads)) for u in plan.units]
    kv_lists = [list(u.kv_index) if u.kv_index is not None else list(range(*u.kv_heads)) for u in plan.units]
    return _overlaps(q_lists), _overlaps(kv_lists)


def grad_dtypes(plan: DilatedPlan, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """Dtypes the backward accumulates ``dq`` and ``dk``/``dv`` in: float32 (or wider) where
    gradients add up (:func:`_sums`), else ``dtype``: each element is written once, so nothing
    is lost (``head_groups`` without shared kv heads)."""
    acc = torch.promote_types(dtype, torch.float32)
    return tuple(acc if summed else dtype for summed in _sums(plan))


def _grad_buffers(plan: DilatedPlan, q, k, into):
    """Zeroed ``(dq, dk, dv)`` in :func:`grad_dtypes`: the views ``into`` where their dtype is
    that, else new tensors."""
    q_dtype, kv_dtype = grad_dtypes(plan, q.dtype)
    wanted = (q_dtype, kv_dtype, kv_dtype)
    if into is None:
        into = (None,) * 3
    return tuple(dst.zero_() if dst is not None and dst.dtype == dt else
                 torch.zeros(x.shape, dtype=dt, device=x.device)
                 for dst, dt, x in zip(into, wanted, (q, k, k)))


# A unit's backward runs on blocks of its folded rows (whole segments of one batch entry) so that
# its temporaries (the dense dout and out rows cuDNN reads, the kernel's gradients and float32
# workspace: about BACKWARD_TEMPS_PER_Q times the block's q rows) stay under
# BACKWARD_BLOCK_BYTES; smaller units run whole.
BACKWARD_TEMPS_PER_Q = 7
BACKWARD_BLOCK_BYTES = 1 << 30


def _row_blocks(coords: BlockCoords, folded: int, segments: int, q_bytes: int):
    """``[(rows, coords)]``: slices of a unit's ``folded = b * segments`` rows and their
    coordinates, within :data:`BACKWARD_BLOCK_BYTES` (one block: the whole unit)."""
    per = max(1, BACKWARD_BLOCK_BYTES * folded // max(1, BACKWARD_TEMPS_PER_Q * q_bytes))
    if per >= folded:
        return [(slice(None), coords)]
    per = min(per, segments)
    spec = coords.spec
    return [(slice(e * segments + s, e * segments + min(segments, s + per)),
             replace(coords, batch=1, q_starts=coords.q_starts[s:s + per],
                     spec=replace(spec, batch_base=spec.batch_base + e)))
            for e in range(folded // segments) for s in range(0, segments, per)]


def _backward(plan: DilatedPlan, q, k, v, out, lse, dout, dlse, scale, kernel, spec, row_lengths=None,
              into=None):
    """``(dq, dk, dv)`` from the *merged* ``(out, lse)``: each unit's block gradient is the fused
    kernel's backward fed the global ``out``/``lse`` rows (the ring's formula), written in place
    into its strided rows: copied where each element has one writer, else added in float32; a
    long unit in row blocks (:func:`_row_blocks`). A kernel whose :attr:`~Kernel.rows` has a
    ``backward`` (for ``head_groups`` also ``in_place_heads``) computes a unit's gradients into
    those rows itself (no dense copies, no row blocks; units with ``kv_index`` through copies of
    their kv rows, added back by index), masking by document where :attr:`~Kernel.masks`.
    ``row_lengths`` (int64 ``[b]``): rows at or past them are padding, their ``dout`` taken as 0.
    ``into``: views ``(dq, dk, dv)`` in the inputs' dtypes the gradients are written to."""
    grads = list(_grad_buffers(plan, q, k, into))
    _unit_grads(plan, q, k, v, out, lse, dout, dlse, scale, kernel, spec, row_lengths, *grads)
    if into is not None:
        return tuple(dst if dst is g else dst.copy_(g) for dst, g in zip(into, grads))
    return _narrowed(grads, (q.dtype, k.dtype, v.dtype))


def _narrowed(grads: list, dtypes) -> tuple:
    """``grads`` (emptied) in ``dtypes``, each float32 buffer freed before the next is converted:
    the peak holds one converted copy above the buffers, not three."""
    return tuple(grads.pop(0).to(dt) for dt in dtypes)


def _unit_grads(plan: DilatedPlan, q, k, v, out, lse, dout, dlse, scale, kernel, spec, row_lengths, dq, dk, dv):
    """Every unit's gradients written or added into the buffers ``dq``, ``dk``, ``dv``
    (:func:`_backward`)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    q_sums, kv_sums = _sums(plan)
    b, n = q.shape[:2]
    rows = kernel.rows
    in_place = rows is not None and rows.backward is not None and (plan.merged or rows.in_place_heads)
    ids = _call_ids(kernel, spec, q)
    for u in plan.units:
        coords = unit_coords(u, spec, b, n)
        qs = q_rows(q, u)
        du = q_rows(dout, u)
        if row_lengths is not None:  # the dense rows cuDNN wants anyway, padded ones zeroed
            du = unit_rows_zeroed(du, row_lengths, u, n)
        dls = None if dlse is None else q_rows(dlse, u)
        if in_place:  # the kernel reads and writes the strided rows itself
            rest = (q_rows(out, u), q_rows(lse, u), du, dls, q_rows(dq, u))
            flags = dict(accumulate_q=q_sums, ids=_unit_ids(ids, u))
            if u.kv_index is None:
                kernel.backward_into(qs, *(head_rows(x, u, u.kv_heads) for x in (k, v)), *rest,
                                     *(head_rows(x, u, u.kv_heads) for x in (dk, dv)), scale, coords,
                                     accumulate_kv=kv_sums, **flags)
                continue
            # one kv head per query head: copies of those rows, their gradients added back by index
            index = index_tensor(u.kv_index, q.device)
            ks, vs = kv_rows(k, u), kv_rows(v, u)
            gk, gv = (torch.zeros(ks.shape, dtype=acc, device=q.device) for _ in range(2))
            kernel.backward_into(qs, ks, vs, *rest, gk, gv, scale, coords, **flags)
            for x, g in zip((dk, dv), (gk, gv)):
                gather_rows(x, u).index_add_(2, index, g.to(x.dtype))
            continue
        kv = [gather_rows(x, u) if u.kv_index is not None else head_rows(x, u, u.kv_heads) for x in (k, v)]
        dkv = [gather_rows(x, u) if u.kv_index is not None else head_rows(x, u, u.kv_heads) for x in (dk, dv)]
        outs, lses, dq_rows = q_rows(out, u), q_rows(lse, u), q_rows(dq, u)
        blocks = ([(slice(None), coords)] if row_lengths is not None else
                  _row_blocks(coords, qs.shape[0], n // u.segment, qs.numel() * qs.element_size()))
        for rows_, block in blocks:
            ks, vs = (x[rows_] for x in kv)
            if u.kv_index is not None:  # one kv head per query head
                ks, vs = (x.index_select(2, index_tensor(u.kv_index, x.device)) for x in (ks, vs))
            elif u.kv_repeat > 1:  # the fused backward wants one kv head per query head
                ks, vs = ks.repeat_interleave(u.kv_repeat, dim=2), vs.repeat_interleave(u.kv_repeat, dim=2)
            grads = GradInputs(qs[rows_], outs[rows_], lses[rows_], du[rows_],
                               None if dls is None else dls[rows_], None)
            gq, gk, gv = kernel.backward(grads, ks, vs, scale, block)
            if q_sums:
                dq_rows[rows_].add_(gq)
            else:
                copy_rows_(dq_rows[rows_], gq)
            for full, g in zip(dkv, (gk, gv)):
                if u.kv_index is not None:
                    full[rows_].index_add_(2, index_tensor(u.kv_index, g.device), g.to(full.dtype))
                    continue
                if u.kv_repeat > 1:  # repeats summed per kv head, in float32
                    B, m, _, d = g.shape
                    g = g.view(B, m, -1, u.kv_repeat, d).sum(3, dtype=acc)
                if kv_sums:
                    full[rows_].add_(g)
                else:
                    copy_rows_(full[rows_], g)
