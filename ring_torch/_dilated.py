"""Dilated attention (LongNet) on one device: each (pattern, offset) pair's rows, attended per
segment, written back in place; ``mix="longnet"`` merges the patterns by their log-sum-exp.

No ``n x n`` or ``n x w`` mask is ever built: the rows a pattern selects in a segment are a
strided slice, so with all segments folded into the batch they are a *view* of the input (the
kernels read strided rows) and of the output and gradient buffers (written in place).

One executor per call runs the units (:func:`make_executor`): :class:`FusedExecutor` for a
kernel with a fused backward (``backend="torch"``, with dropout only where the Triton rows kernels
draw it: :class:`FusedDilated`, its own backward, :mod:`ring_torch._dilated_grads`, fed the merged
``out``/``lse``), :class:`AutogradExecutor` for the rest (``math``, ``xformers``, other dropout:
autograd through every kernel call). The ring runs its local units with
the same executor; :mod:`ring_torch._api` runs a call's spans with them.
"""

from __future__ import annotations

import torch

from ring_torch._aten import copy_rows_, records_graph
from ring_torch._config import memo
from ring_torch._coords import MaskSpec, mask_rows, real_rows, unit_coords
from ring_torch._dilated_grads import _backward, _call_ids, _unit_ids, grad_dtypes
from ring_torch._dropout import Dropout
from ring_torch._kernels import Kernel, kernel_for
from ring_torch._padded import zero_padded_rows_
from ring_torch._plan import DilatedPlan, Unit
from ring_torch._rows import blank, kv_rows, lse_merge, merge_rows, q_rows

__all__ = ["make_executor", "AutogradExecutor", "FusedExecutor", "FusedDilated", "grad_dtypes",
           "traces_fused"]


def _attend_rows(unit: Unit, q, k, v, scale, kernel: Kernel, spec: MaskSpec):
    """``(out [b*S, m, H, d], lse [b*S, m, H])`` of the unit's selected rows."""
    coords = unit_coords(unit, spec, q.shape[0], q.shape[1])
    return kernel.forward(q_rows(q, unit), kv_rows(k, unit), kv_rows(v, unit), scale, coords)


def _cleared(into, with_lse=True):
    """The destination ``(out, lse)`` views as :func:`blank` leaves them: ``0`` / ``-inf``."""
    out, lse = into
    out.zero_()
    if not with_lse:
        return out, None
    return out, lse.fill_(float("-inf"))


def _run_heads(units, q, k, v, scale, kernel, spec, with_lse=True, into=None, ids=None):
    """``units`` covering each query head at most once (``head_groups``, or one ``longnet``
    pattern), each written in place into its heads and rows of one ``(out, lse)`` (new, or the
    views ``into`` of the same shapes and dtypes); heads no unit covers (a ring's local
    sub-plan) stay ``out = 0``, ``lse = -inf``; ``with_lse=False``: ``lse`` is None (not
    written). A kernel with :attr:`~ring_torch._kernels.Kernel.rows` (``in_place_heads``) writes
    the rows itself (outside autograd), and the rows between them too when the units cover every
    head; ``ids``: the rows' document ids ``[b, n]`` for a kernel that masks by them."""
    in_place = kernel.rows is not None and kernel.rows.in_place_heads and not records_graph(q, k, v)
    if kernel.masks and not in_place:
        raise RuntimeError("a kernel that masks by document ids runs only outside autograd (FusedDilated)")
    fill = in_place and _tiles(units, q.shape[2])
    if fill:  # every element is written by one unit: no clearing
        out, lse = into if into is not None else _empty(q, with_lse)
        lse = lse if with_lse else None
    else:
        out, lse = blank(q, q.shape[2], with_lse=with_lse) if into is None else _cleared(into, with_lse)
    for u in units:
        if in_place:
            coords = unit_coords(u, spec, q.shape[0], q.shape[1])
            kernel.forward_into(q_rows(q, u), kv_rows(k, u), kv_rows(v, u), q_rows(out, u),
                                q_rows(lse, u) if with_lse else None, scale, coords,
                                (u.rate, u.offset) if fill else None, ids=_unit_ids(ids, u))
            continue
        o, l = _attend_rows(u, q, k, v, scale, kernel, spec)
        copy_rows_(q_rows(out, u), o)
        if with_lse:
            copy_rows_(q_rows(lse, u), l)
    return out, lse


@memo(maxsize=256)
def _tiles(units, num_heads: int) -> bool:
    """Whether the units' query heads are every head once (each element of the output then
    belongs to one unit's rows or the positions between them)."""
    heads = sorted(j for u in units for j in range(*u.q_heads))
    return heads == list(range(num_heads))


def _empty(q, with_lse: bool):
    """Uninitialised ``(out, lse)`` of :func:`blank`'s shapes and dtypes."""
    b, n, h, d = q.shape
    out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
    if not with_lse:
        return out, None
    return out, torch.empty(b, n, h, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)


def _forward(plan: DilatedPlan, q, k, v, scale, kernel, spec, with_lse=True, into=None):
    """``(out [b, n, h, d], lse [b, n, h])`` of every unit of ``plan``: ``out`` in ``q``'s dtype
    when heads are not merged, else the float32+ merge; ``with_lse=False``: ``lse`` may be None
    (``head_groups``: not written; a merge needs it). ``into`` (no autograd graph): views
    ``(out, lse)`` in ``q``'s dtype and float32+ the result is written to and returned as."""
    ids = _call_ids(kernel, spec, q)
    if not plan.merged:
        return _run_heads(plan.units, q, k, v, scale, kernel, spec, with_lse, into, ids)
    if not records_graph(q, k, v):
        # No autograd graph (inference, FusedDilated): merge each unit into one float32 output
        # in place, no per-pattern full-size outputs.
        acc_dtype = torch.promote_types(q.dtype, torch.float32)
        if into is not None and into[0].dtype == acc_dtype:
            acc, acc_lse = _cleared(into)
        else:
            acc, acc_lse = blank(q, q.shape[2], out_dtype=acc_dtype)
        for u in plan.units:
            if kernel.rows is not None:  # the kernel merges into the accumulators itself
                kernel.forward_into(q_rows(q, u), kv_rows(k, u), kv_rows(v, u), q_rows(acc, u), q_rows(acc_lse, u),
                                    scale, unit_coords(u, spec, q.shape[0], q.shape[1]), merge=True,
                                    ids=_unit_ids(ids, u))
                continue
            o, l = _attend_rows(u, q, k, v, scale, kernel, spec)
            merge_rows(q_rows(acc, u), q_rows(acc_lse, u), o, l)
        if into is not None and acc is not into[0]:
            return copy_rows_(into[0], acc), into[1].copy_(acc_lse)
        return acc, acc_lse
    patterns = sorted({u.pattern for u in plan.units})  # a ring's local sub-plan may hold a few
    outs, lses = zip(*(_run_heads(plan.pattern_units(i), q, k, v, scale, kernel, spec)
                       for i in patterns))
    return (outs[0], lses[0]) if len(outs) == 1 else lse_merge(list(outs), list(lses))


def _real(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """``[b, n]`` bool: True where the row is before its entry's length."""
    return real_rows(lengths, torch.arange(n, device=lengths.device))


class FusedDilated(torch.autograd.Function):
    """``(out, lse)`` of ``plan``'s units by a kernel with a fused backward: the forward keeps
    only ``q, k, v, out, lse`` and the backward is :func:`_backward` (no per-unit copies or
    full-size per-unit gradients). Also runs a ring's local units as one sub-plan.

    ``out`` comes back in ``q``'s dtype, the very tensor kept for the backward (no second copy);
    with ``merged_out=True`` a float32 longnet merge comes back unrounded, for a ring to merge on.
    ``with_lse=False``: ``out`` alone comes back (the LSE is kept for the backward only), so the
    backward has no LSE cotangent even where ``torch.compile`` would pass zeros for an unused
    output (which would widen every backward kernel by the exact-LSE column)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale, kernel, spec, merged_out=False, with_lse=True, row_lengths=None):
        out, lse = _forward(plan, q, k, v, scale, kernel, spec)
        if row_lengths is not None:  # padded rows: out 0 (kept so), lse -inf (the kept one stays finite)
            zero_padded_rows_(out, row_lengths)
        ctx.args = (plan, scale, kernel, spec, row_lengths)
        rounded = out.to(q.dtype)  # the fused backward reads q's dtype
        ctx.save_for_backward(q, k, v, rounded, lse)
        ctx.set_materialize_grads(False)
        result = out if merged_out else rounded
        if not with_lse:
            return result
        if row_lengths is not None:
            lse = torch.where(_real(row_lengths, q.shape[1])[:, :, None], lse, float("-inf"))
        return result, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse=None):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale, kernel, spec, row_lengths = ctx.args
        dout = torch.zeros_like(out) if dout is None else dout.to(q.dtype)
        if dlse is not None and row_lengths is not None:
            dlse = torch.where(_real(row_lengths, q.shape[1])[:, :, None], dlse, 0)
        return (*_backward(plan, q, k, v, out, lse, dout, dlse, scale, kernel, spec, row_lengths),
                None, None, None, None, None, None, None)


class AutogradExecutor:
    """Runs a plan's units through autograd, kernel by kernel (``math``, ``xformers``, and any
    backend with dropout)."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel

    def run(self, plan: DilatedPlan, q, k, v, scale: float, spec: MaskSpec, merged_out: bool = False,
            with_lse: bool = True, row_lengths: torch.Tensor | None = None):
        """``(out [b, n, h, d], lse [b, n, h])`` of ``plan``'s units (``merged_out``: a longnet
        merge is float32+ either way; ``with_lse=False``: ``lse`` is None; ``row_lengths``
        (int64 ``[b]``): rows at or past them come back ``0`` / ``-inf``, their cotangents 0)."""
        out, lse = _forward(plan, q, k, v, scale, self.kernel, spec, with_lse)
        lse = lse if with_lse else None
        if row_lengths is not None:
            out, lse = mask_rows(out, lse, _real(row_lengths, q.shape[1]))
        return out, lse


def traces_fused(device: torch.device) -> bool:
    """Whether ``torch.compile`` traces :class:`FusedDilated` into its graph on ``device``: on
    the CPU (outputs and gradients bit for bit those of eager, ``parity_tests/test_torch_graphs``);
    elsewhere it runs eagerly behind a graph break, since traced on CUDA (torch 2.11, H200, with
    ``aot_eager`` as with inductor, cuDNN or flash) ``head_groups`` came back with zero
    gradients."""
    return device.type == "cpu"


def _apply_fused(*args):
    return FusedDilated.apply(*args)


# FusedDilated outside the compiled graph (a graph break; eager autograd inside).
_apply_fused_eagerly = torch.compiler.disable(_apply_fused)


class FusedExecutor:
    """Runs a plan's units as one :class:`FusedDilated` call (a kernel with a fused backward:
    ``backend="torch"``; dropout only by the rows kernels, :attr:`TorchKernel.dropout`)."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel

    def run(self, plan: DilatedPlan, q, k, v, scale: float, spec: MaskSpec, merged_out: bool = False,
            with_lse: bool = True, row_lengths: torch.Tensor | None = None):
        """``(out [b, n, h, d], lse [b, n, h])``; ``out`` in ``q``'s dtype unless ``merged_out``
        (a longnet merge stays float32); ``with_lse=False``: ``lse`` is None; ``row_lengths``
        as in :meth:`AutogradExecutor.run`, zeroed inside (:mod:`ring_torch._padded`: on CUDA a
        kernel that writes the padded rows only). With nothing to differentiate and no LSE asked
        for (inference), the units run without the autograd Function and without LSE rows
        (``head_groups``). Under ``torch.compile`` :class:`FusedDilated` is traced only where
        :func:`traces_fused`."""
        if not with_lse and not records_graph(q, k, v):
            out, _ = _forward(plan, q, k, v, scale, self.kernel, spec, with_lse=False)
            if row_lengths is not None:
                zero_padded_rows_(out, row_lengths)
            return (out if merged_out else out.to(q.dtype)), None
        apply = FusedDilated.apply
        if torch.compiler.is_compiling() and not traces_fused(q.device):
            apply = _apply_fused_eagerly
        if with_lse:
            return apply(q, k, v, plan, scale, self.kernel, spec, merged_out, True, row_lengths)
        return apply(q, k, v, plan, scale, self.kernel, spec, merged_out, False, row_lengths), None


def make_executor(backend: str, device: torch.device, compute: torch.dtype, head_dim: int,
                  dropout: Dropout | None, key_mask: bool = False,
                  rows_masks: bool = False) -> AutogradExecutor | FusedExecutor:
    """The kernel and executor of one call, chosen once: ``backend`` resolved, ``compute`` the
    dtype the kernels see, ``key_mask``: whether blocks take a per-key mask
    (:attr:`ring_torch._coords.MaskSpec.needs_key_mask`: padding without causality, documents),
    which only the math kernel can, or on one device (``rows_masks``) the Triton rows kernels
    (:func:`ring_torch._kernels.kernel_for`)."""
    kernel = kernel_for(backend, device, compute, head_dim, needs_dropout=dropout is not None,
                        needs_key_mask=key_mask, rows_masks=rows_masks)
    return (FusedExecutor if kernel.fused_backward else AutogradExecutor)(kernel)
