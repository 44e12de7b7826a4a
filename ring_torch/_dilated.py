"""Dilated attention (LongNet): gather the rows of each (pattern, offset) pair, attend per
segment, scatter back, and for ``mix="longnet"`` merge the patterns by their log-sum-exp.

No ``n x n`` or ``n x w`` mask is ever built: the rows a pattern selects in a segment are a
strided slice, so they are gathered by a reshape and all segments folded into the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ring_torch._config import DilatedConfig
from ring_torch._dropout import Dropout, keep_mask, make_dropout
from ring_torch._kernels import block_attention, check_backend, select_backend, xformers_available
from ring_torch._plan import DilatedPlan, Unit, build_plan, index_tensor

__all__ = ["dilated_attention", "resolve_backend"]


def _gather_rows(x: torch.Tensor, unit: Unit) -> torch.Tensor:
    """``x [b, n, H, d]`` -> the rows ``unit`` selects, ``[b * S, m, H, d]``."""
    b, n, H, d = x.shape
    S, m = n // unit.segment, unit.rows
    # Position p = s*w' + i*r + o: segment s, selected row i, offset o.
    x = x.reshape(b, S, m, unit.rate, H, d)[:, :, :, unit.offset]  # [b, S, m, H, d]
    return x.reshape(b * S, m, H, d)  # [b*S, m, H, d]


def _scatter_rows(out: torch.Tensor, lse: torch.Tensor, unit: Unit, b: int, n: int):
    """Inverse of :func:`_gather_rows`: unselected rows get ``out = 0``, ``lse = -inf``."""
    _, m, H, d = out.shape
    S, r, o = n // unit.segment, unit.rate, unit.offset
    if r > 1:  # pad the rate axis: the selected rows sit at offset o of each group of r
        out = F.pad(out.reshape(b, S, m, 1, H, d), (0, 0, 0, 0, o, r - 1 - o))  # [b, S, m, r, H, d]
        lse = F.pad(lse.reshape(b, S, m, 1, H), (0, 0, o, r - 1 - o), value=float("-inf"))
    return out.reshape(b, n, H, d), lse.reshape(b, n, H)  # [b, n, H, d], [b, n, H]


def _unit_keep(unit: Unit, dropout: Dropout, b: int, n: int, device) -> torch.Tensor:
    """The dropout mask of a unit's folded blocks ``[b * S, H, m, m]`` (global positions)."""
    S, m = n // unit.segment, unit.rows
    pos = (dropout.base + torch.arange(S, device=device)[:, None] * unit.segment
           + torch.arange(m, device=device)[None, :] * unit.rate + unit.offset)  # [S, m]
    heads = torch.arange(*unit.q_heads, device=device)
    pos = pos.repeat(b, 1)[:, None, :].expand(b * S, len(heads), m)
    batch = dropout.batch_base + torch.arange(b, device=device).repeat_interleave(S)
    return keep_mask(dropout.seed, unit.pattern, batch, heads, pos, pos, dropout.p)


def _run_unit(unit: Unit, q, k, v, scale, is_causal, backend, dropout: Dropout | None = None):
    b, n = q.shape[:2]
    qs = _gather_rows(q[:, :, slice(*unit.q_heads)], unit)
    if unit.kv_index is None:
        heads = slice(*unit.kv_heads)
        ks, vs = _gather_rows(k[:, :, heads], unit), _gather_rows(v[:, :, heads], unit)
    else:  # gather rows first so the head copy only touches selected rows
        index = index_tensor(unit.kv_index, q.device)
        ks = _gather_rows(k, unit).index_select(2, index)
        vs = _gather_rows(v, unit).index_select(2, index)
    keep = None if dropout is None else _unit_keep(unit, dropout, b, n, q.device)
    out, lse = block_attention(qs, ks, vs, scale=scale, is_causal=is_causal, backend=backend,
                               keep=keep, dropout_p=0.0 if dropout is None else dropout.p)
    return _scatter_rows(out, lse, unit, b, n)


def _run_heads(units, q, k, v, scale, is_causal, backend, dropout=None):
    """Runs ``units`` and concatenates their heads in unit order."""
    results = [_run_unit(u, q, k, v, scale, is_causal, backend, dropout) for u in units]
    if len(results) == 1:
        return results[0]
    return torch.cat([o for o, _ in results], dim=2), torch.cat([l for _, l in results], dim=2)


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
    """``mix="longnet"``: all heads under pattern ``i``, head j at position j."""
    out, lse = _run_heads(plan.pattern_units(i), q, k, v, scale, plan.is_causal, backend,
                          dropout)
    order = plan.head_order(i)
    if order != tuple(range(plan.num_heads)):
        # Units produce heads grouped by offset class; put head j back at position j.
        inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
        index = index_tensor(inverse, q.device)
        out, lse = out.index_select(2, index), lse.index_select(2, index)
    return out, lse


def _forward(plan: DilatedPlan, q, k, v, scale, backend, dropout=None):
    if plan.mix == "head_groups":
        return _run_heads(plan.units, q, k, v, scale, plan.is_causal, backend, dropout)
    outs, lses = zip(*(_run_pattern(plan, i, q, k, v, scale, backend, dropout)
                       for i in range(len(plan.segment_lengths))))
    return _lse_merge(list(outs), list(lses))


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
    out, lse = _forward(plan, q, k, v, scale, backend, dropout)
    out = out.to(dtype)
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if dtype == torch.float64 else torch.float32)
