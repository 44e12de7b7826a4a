"""Dilated attention (LongNet) on one device: each (pattern, offset) pair's rows, attended per
segment, written back in place; ``mix="longnet"`` merges the patterns by their log-sum-exp.

No ``n x n`` or ``n x w`` mask is ever built: the rows a pattern selects in a segment are a
strided slice, so with all segments folded into the batch they are a *view* of the input (the
kernels read strided rows) and of the output and gradient buffers (written in place).
``backend="torch"`` without dropout runs :class:`FusedDilated` (its own backward, fed the merged
``out``/``lse``); ``math``, ``xformers`` and dropout differentiate through autograd.
"""

from __future__ import annotations

import torch

from ring_torch._config import DilatedConfig
from ring_torch._dropout import Dropout, keep_mask, make_dropout
from ring_torch._kernels import (block_attention, check_backend, fused_block_grads, select_backend,
                                xformers_available)
from ring_torch._plan import DilatedPlan, Unit, build_plan, index_tensor

__all__ = ["dilated_attention", "resolve_backend"]


def _gather_rows(x: torch.Tensor, unit: Unit) -> torch.Tensor:
    """``x [b, n, H, ...]`` -> the rows ``unit`` selects, ``[b * S, m, H, ...]``: a strided view
    (no copy) of a contiguous ``x``, so writing into it writes into ``x``."""
    b, n = x.shape[:2]
    S, m = n // unit.segment, unit.rows
    # Position p = s*w' + i*r + o: segment s, selected row i, offset o.
    x = x.reshape(b, S, m, unit.rate, *x.shape[2:])[:, :, :, unit.offset]  # [b, S, m, H, ...]
    return x.reshape(b * S, m, *x.shape[3:])  # [b*S, m, H, ...]


def _q_rows(x: torch.Tensor, unit: Unit) -> torch.Tensor:
    """The unit's query heads and rows of ``x [b, n, h, ...]`` (q, out, lse and their grads)."""
    return _gather_rows(x[:, :, slice(*unit.q_heads)], unit)


def _kv_rows(x: torch.Tensor, unit: Unit) -> torch.Tensor:
    """The unit's kv rows of ``x [b, n, h_kv, d]``: its kv heads (a view), or with ``kv_index``
    one kv head per query head (a copy of the selected rows only)."""
    if unit.kv_index is None:
        return _gather_rows(x[:, :, slice(*unit.kv_heads)], unit)
    return _gather_rows(x, unit).index_select(2, index_tensor(unit.kv_index, x.device))


def _unit_keep(unit: Unit, dropout: Dropout, b: int, n: int, device) -> torch.Tensor:
    """The dropout mask of a unit's folded blocks ``[b * S, H, m, m]`` (global positions)."""
    S, m = n // unit.segment, unit.rows
    pos = (dropout.base + torch.arange(S, device=device)[:, None] * unit.segment
           + torch.arange(m, device=device)[None, :] * unit.rate + unit.offset)  # [S, m]
    heads = torch.arange(*unit.q_heads, device=device)
    pos = pos.repeat(b, 1)[:, None, :].expand(b * S, len(heads), m)
    batch = dropout.batch_base + torch.arange(b, device=device).repeat_interleave(S)
    return keep_mask(dropout.seed, unit.pattern, batch, heads, pos, pos, dropout.p)


def _blank(q: torch.Tensor, heads: int, out_dtype: torch.dtype | None = None):
    """``out = 0 [b, n, heads, d]`` (``q``'s dtype unless ``out_dtype``) and ``lse = -inf
    [b, n, heads]`` (float32 or wider): what rows no unit writes hold."""
    b, n, _, d = q.shape
    out = torch.zeros(b, n, heads, d, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.full((b, n, heads), float("-inf"), dtype=torch.promote_types(q.dtype, torch.float32),
                     device=q.device)
    return out, lse


def _attend_rows(unit: Unit, q, k, v, scale, is_causal, backend, dropout: Dropout | None = None):
    """``(out [b*S, m, H, d], lse [b*S, m, H])`` of the unit's selected rows."""
    b, n = q.shape[:2]
    keep = None if dropout is None else _unit_keep(unit, dropout, b, n, q.device)
    return block_attention(_q_rows(q, unit), _kv_rows(k, unit), _kv_rows(v, unit), scale=scale,
                           is_causal=is_causal, backend=backend, keep=keep,
                           dropout_p=0.0 if dropout is None else dropout.p)


def _run_unit(unit: Unit, q, k, v, scale, is_causal, backend, dropout: Dropout | None = None):
    """One unit as ``(out [b, n, H, d], lse [b, n, H])`` over its own heads (the ring's local
    units); rows it does not select get ``out = 0``, ``lse = -inf``."""
    out, lse = _blank(q, unit.num_heads)
    o, l = _attend_rows(unit, q, k, v, scale, is_causal, backend, dropout)
    _gather_rows(out, unit).copy_(o)  # out holds only the unit's heads
    _gather_rows(lse, unit).copy_(l)
    return out, lse


def _run_heads(units, q, k, v, scale, is_causal, backend, dropout=None):
    """``units`` covering each query head at most once (``head_groups``, or one ``longnet``
    pattern), each written in place into its heads and rows of one ``(out, lse)``; heads no
    unit covers (a ring's local sub-plan) stay ``out = 0``, ``lse = -inf``."""
    out, lse = _blank(q, q.shape[2])
    for u in units:
        o, l = _attend_rows(u, q, k, v, scale, is_causal, backend, dropout)
        _q_rows(out, u).copy_(o)
        _q_rows(lse, u).copy_(l)
    return out, lse


def _lse_merge(outs, lses):
    """Merges per-pattern ``(out [b, n, h, d], lse [b, n, h])`` as attention over the union of
    their keys, in float32 or better; rows empty in every pattern give ``out = 0``,
    ``lse = -inf`` with finite gradients."""
    dtype = torch.promote_types(outs[0].dtype, torch.float32)
    L = torch.stack([l.to(dtype) for l in lses])  # [K, b, n, h]
    # The shift cancels in value and gradient, so it is detached; 0 where all are -inf.
    shift = L.amax(0).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    e = torch.exp(L - shift)  # [K, b, n, h]
    z = e.sum(0)
    nonempty = z > 0
    z_safe = torch.where(nonempty, z, torch.ones_like(z))
    lse = torch.where(nonempty, shift + torch.log(z_safe), torch.full_like(z, float("-inf")))
    weights = (e / z_safe).unsqueeze(-1)  # [K, b, n, h, 1]
    out = sum(weights[i] * o.to(dtype) for i, o in enumerate(outs))
    return out, lse


def _run_pattern(plan: DilatedPlan, i: int, q, k, v, scale, backend, dropout=None):
    """``mix="longnet"``: all heads under pattern ``i`` (head j at position j)."""
    return _run_heads(plan.pattern_units(i), q, k, v, scale, plan.is_causal, backend, dropout)


def _merge_rows(acc, acc_lse, o, lse):
    """In place: ``acc [B, m, H, d]``, ``acc_lse [B, m, H]`` (float32+ views) become the softmax
    merge of themselves and one unit's ``o``, ``lse`` rows (a unit's rows are never empty, so
    ``lse`` is finite and an empty ``acc_lse = -inf`` just takes the unit's values)."""
    new = torch.logaddexp(acc_lse, lse)
    acc.mul_(torch.exp(acc_lse - new).unsqueeze(-1)).addcmul_(o, torch.exp(lse - new).unsqueeze(-1))
    acc_lse.copy_(new)


def _forward(plan: DilatedPlan, q, k, v, scale, backend, dropout=None):
    if plan.mix == "head_groups":
        return _run_heads(plan.units, q, k, v, scale, plan.is_causal, backend, dropout)
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))):
        # No autograd graph (inference, FusedDilated): merge each unit into one float32 output
        # in place, no per-pattern full-size outputs.
        acc, acc_lse = _blank(q, q.shape[2], out_dtype=torch.promote_types(q.dtype, torch.float32))
        for u in plan.units:
            o, l = _attend_rows(u, q, k, v, scale, plan.is_causal, backend, dropout)
            _merge_rows(_q_rows(acc, u), _q_rows(acc_lse, u), o, l)
        return acc, acc_lse
    patterns = sorted({u.pattern for u in plan.units})  # a ring's local sub-plan may hold a few
    outs, lses = zip(*(_run_pattern(plan, i, q, k, v, scale, backend, dropout) for i in patterns))
    return (outs[0], lses[0]) if len(outs) == 1 else _lse_merge(list(outs), list(lses))


def _overlaps(head_lists) -> bool:
    """True when a head is listed twice, in one unit or two (its gradients are then summed)."""
    seen: set[int] = set()
    for heads in head_lists:
        if len(set(heads)) < len(heads) or seen & set(heads):
            return True
        seen |= set(heads)
    return False


def _sums(plan: DilatedPlan) -> tuple[bool, bool]:
    """Whether gradients of several query heads or units add into one query head, and into one
    kv head (``kv_repeat`` repeats are summed inside a unit and do not count)."""
    q_lists = [list(range(*u.q_heads)) for u in plan.units]
    kv_lists = [list(u.kv_index) if u.kv_index is not None else list(range(*u.kv_heads)) for u in plan.units]
    return _overlaps(q_lists), _overlaps(kv_lists)


def grad_dtypes(plan: DilatedPlan, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """Dtypes the backward accumulates ``dq`` and ``dk``/``dv`` in: float32 (or wider) where
    gradients add up (:func:`_sums`), else ``dtype``: each element is written once, so nothing
    is lost (``head_groups`` without shared kv heads)."""
    acc = torch.promote_types(dtype, torch.float32)
    return tuple(acc if summed else dtype for summed in _sums(plan))


def _backward(plan: DilatedPlan, q, k, v, out, lse, dout, dlse, scale):
    """``(dq, dk, dv)`` from the *merged* ``(out, lse)``: each unit's block gradient is the fused
    kernel's backward fed the global ``out``/``lse`` rows (the ring's formula), written in place
    into its strided rows: copied where each element has one writer, else added in float32."""
    acc = torch.promote_types(q.dtype, torch.float32)
    q_sums, kv_sums = _sums(plan)
    q_dtype, kv_dtype = grad_dtypes(plan, q.dtype)
    dq = torch.zeros(q.shape, dtype=q_dtype, device=q.device)
    dk, dv = (torch.zeros(k.shape, dtype=kv_dtype, device=k.device) for _ in range(2))
    for u in plan.units:
        ks, vs = _kv_rows(k, u), _kv_rows(v, u)
        if u.kv_repeat > 1:  # the fused backward wants one kv head per query head
            ks, vs = ks.repeat_interleave(u.kv_repeat, dim=2), vs.repeat_interleave(u.kv_repeat, dim=2)
        gq, gk, gv = fused_block_grads(_q_rows(dout, u), _q_rows(q, u), ks, vs, _q_rows(out, u), _q_rows(lse, u),
                                       None if dlse is None else _q_rows(dlse, u), scale=scale,
                                       is_causal=plan.is_causal, backend="torch")
        rows = _q_rows(dq, u)
        (rows.add_ if q_sums else rows.copy_)(gq)
        for full, g in ((dk, gk), (dv, gv)):
            if u.kv_index is not None:
                _gather_rows(full, u).index_add_(2, index_tensor(u.kv_index, g.device), g.to(full.dtype))
                continue
            if u.kv_repeat > 1:  # repeats summed per kv head, in float32
                B, m, _, d = g.shape
                g = g.view(B, m, -1, u.kv_repeat, d).sum(3, dtype=acc)
            rows = _gather_rows(full[:, :, slice(*u.kv_heads)], u)
            (rows.add_ if kv_sums else rows.copy_)(g)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FusedDilated(torch.autograd.Function):
    """``(out, lse)`` of ``plan``'s units for ``backend="torch"`` without dropout: the forward
    keeps only ``q, k, v, out, lse`` and the backward is :func:`_backward` (no per-unit copies
    or full-size per-unit gradients). Also runs a ring's local units as one sub-plan.

    ``out`` comes back in ``q``'s dtype, the very tensor kept for the backward (no second copy);
    with ``merged_out=True`` a float32 longnet merge comes back unrounded, for a ring to merge on."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale, merged_out=False):
        out, lse = _forward(plan, q, k, v, scale, "torch")
        ctx.plan, ctx.scale = plan, scale
        rounded = out.to(q.dtype)  # the fused backward reads q's dtype
        ctx.save_for_backward(q, k, v, rounded, lse)
        ctx.set_materialize_grads(False)
        return (out if merged_out else rounded), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        return (*_backward(ctx.plan, q, k, v, out, lse, dout.to(q.dtype), dlse, ctx.scale),
                None, None, None)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype):
    """``(backend, compute_dtype)``: ``auto`` asks the device for its capability and xformers;
    an explicit backend is checked and computes in the input dtype."""
    if backend != "auto":
        check_backend(backend, device.type, dtype)
        return backend, dtype
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    available = device.type == "cuda" and xformers_available()
    return select_backend(device.type, dtype, capability, available)


def dilated_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                      segment_lengths, dilation_rates, mix: str = "head_groups",
                      is_causal: bool = False, softmax_scale: float | None = None,
                      return_lse: bool = False, backend: str = "auto",
                      dropout_p: float = 0.0, dropout_seed: int | None = None):
    """Dilated attention of ``query [batch, seq, heads, head_dim]`` against
    ``key``/``value [batch, seq, kv_heads, head_dim]`` (``heads % kv_heads == 0``).

    Pattern i splits the sequence into segments of ``w_i' = min(w_i, seq)`` and keeps the
    positions ``(p % w_i') % r_i == offset``. ``mix="head_groups"``: heads form K contiguous
    groups, group i runs pattern i at offset ``i % r_i``. ``mix="longnet"``: head j runs every
    pattern at offset ``j % r_i``, merged by log-sum-exp (LongNet Eq. 10).

    Returns ``out [batch, seq, heads, head_dim]`` in the input dtype, and with ``return_lse``
    also ``lse [batch, seq, heads]`` (natural log; float64 for float64 inputs, else float32;
    ``-inf`` and ``out = 0`` where a position attends to nothing).

    ``backend``: ``"auto"`` (see :func:`ring_torch.select_backend`), ``"math"``, ``"torch"`` or
    ``"xformers"``. All checks raise ``ValueError`` before any compute.

    ``dropout_p > 0``: dropout on each pattern's attention probabilities, with the counter-based
    mask of :mod:`ring_torch._dropout` (a hash of seed, pattern, batch, head and the two
    positions; ``dropout_seed`` defaults to a draw from torch's RNG), so the ring computes the
    same mask. It runs the math path; the LSE is that of the undropped weights.
    """
    config = DilatedConfig(segment_lengths, dilation_rates, mix, is_causal, softmax_scale)
    _, n, h, h_kv, d = config.validate_inputs(query, key, value)
    dtype = query.dtype
    backend, compute = resolve_backend(backend, query.device, dtype)
    plan = build_plan(config, n, h, h_kv)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    dropout = make_dropout(dropout_p, dropout_seed)
    q, k, v = (x.to(compute) for x in (query, key, value))
    if backend == "torch" and dropout is None:
        out, lse = FusedDilated.apply(q, k, v, plan, scale)
    else:
        out, lse = _forward(plan, q, k, v, scale, backend, dropout)
    out = out.to(dtype)
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if dtype == torch.float64 else torch.float32)
