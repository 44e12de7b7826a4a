"""Row bookkeeping shared by the single-device layer and the ring: the strided rows a unit
selects (views, so writes land in place), the selected rows a ring unit sends, blank results,
the log-sum-exp merges, and the padding of a call (:class:`Padding`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ring_torch._aten import records_graph
from ring_torch._coords import MaskSpec, mask_rows, real_rows
from ring_torch._plan import Unit, index_tensor

__all__ = ["gather_rows", "head_rows", "q_rows", "kv_rows", "blank", "lse_merge", "merge_rows", "to_ring",
           "from_ring", "assemble_heads", "Padding", "make_padding", "pad_inputs",
           "unpad_outputs", "cut_padding"]


@dataclass(frozen=True, eq=False)
class Padding:
    """How one call pads: the caller's ``seq_len`` (``n``), the plan length ``padded_len``
    (``N >= n``, zeros appended), ``lengths`` (int64 ``[batch]`` real lengths, the given
    ``seq_lengths`` or ``n``; None when nothing is padded), ``mask_rows`` (``seq_lengths`` were
    given: padded output rows become ``0`` / ``-inf`` by ``torch.where``, so their cotangents
    are 0), ``key_mask`` (non-causal with padding: blocks hide padded keys,
    :class:`ring_torch._coords.MaskSpec`) and ``segment_ids`` (int64 ``[batch, padded_len]``
    document ids, the appended positions ``-1``: they are padding, hidden by causality or the
    key mask; None: one document).

    The inputs' padded rows are not copied or zeroed (that would cost a pass over q, k and v):
    any finite values there give exactly the result of zeros, with exactly zero gradients (a
    padded query row has zero cotangents, a padded key zero weight from every real query);
    a NaN or an infinity there reaches real rows as ``0 * NaN``."""

    seq_len: int
    padded_len: int
    lengths: torch.Tensor | None = None
    mask_rows: bool = False
    key_mask: bool = False
    segment_ids: torch.Tensor | None = None

    def mask_fields(self) -> dict:
        """The :class:`ring_torch._coords.MaskSpec` fields this padding decides."""
        return dict(lengths=self.lengths, key_mask=self.key_mask, segment_ids=self.segment_ids)


def make_padding(seq_lengths: torch.Tensor | None, batch: int, seq_len: int, padded_len: int,
                 is_causal: bool, device, segment_ids: torch.Tensor | None = None) -> Padding:
    """The :class:`Padding` of a call with checked ``seq_lengths`` (int64 ``[batch]`` or None)
    and ``segment_ids`` (int64 ``[batch, seq_len]`` or None)."""
    if segment_ids is not None and padded_len > seq_len:
        segment_ids = F.pad(segment_ids, (0, padded_len - seq_len), value=-1)
    if seq_lengths is None and padded_len == seq_len:
        return Padding(seq_len, padded_len, segment_ids=segment_ids)
    lengths = seq_lengths if seq_lengths is not None else torch.full(
        (batch,), seq_len, dtype=torch.int64, device=device)
    return Padding(seq_len, padded_len, lengths, seq_lengths is not None, not is_causal, segment_ids)


def pad_inputs(padding: Padding, xs):
    """``xs`` (each ``[b, nl, X, d]``) with ``padded_len - seq_len`` zero rows appended."""
    extra = padding.padded_len - padding.seq_len
    return [F.pad(x, (0, 0, 0, 0, 0, extra)) if extra else x for x in xs]


def unpad_outputs(padding: Padding, out: torch.Tensor, lse: torch.Tensor | None,
                  spec: MaskSpec | None = None):
    """``out [b, nl, h, d]``, ``lse [b, nl, h]`` (None: not asked for, stays None; local rows at
    the global positions of ``spec``, None: from 0) with padded rows ``0`` / ``-inf``
    (``mask_rows``), cut back to ``nl - (padded_len - seq_len)`` rows."""
    if padding.mask_rows:
        nl = out.shape[1]
        positions = torch.arange(nl, device=out.device) if spec is None else spec.row_positions(nl, out.device)
        out, lse = mask_rows(out, lse, real_rows(padding.lengths, positions))
    return cut_padding(padding, out, lse)


def cut_padding(padding: Padding, out: torch.Tensor, lse: torch.Tensor | None):
    """``out [b, nl, h, d]``, ``lse [b, nl, h]`` (or None) without the ``padded_len - seq_len``
    rows :func:`pad_inputs` appended (views)."""
    keep = out.shape[1] - (padding.padded_len - padding.seq_len)
    return out[:, :keep], (None if lse is None else lse[:, :keep])


def _strided(x: torch.Tensor, unit: Unit, heads: tuple[int, int, int] | None) -> torch.Tensor | None:
    """The rows of :func:`gather_rows` over the heads ``range(*heads)`` (None: all) as one
    ``as_strided`` view of ``x``'s storage (one call instead of a slice, two reshapes and an
    index); None where that view is not what :func:`gather_rows` gives: ``x`` takes part in
    autograd (an ``as_strided`` backward would write a full-size buffer per unit), or its batch
    and segments do not fold into one stride (the reshape copies); and None under
    ``torch.compile``, which breaks its graph at ``storage_offset`` (the reshapes trace)."""
    if records_graph(x) or torch.compiler.is_compiling():
        return None
    shape, stride = x.shape, x.stride()
    b, n = shape[0], shape[1]
    S, m, seq = n // unit.segment, unit.rows, stride[1]
    if S == 1:
        outer = stride[0]
    elif b == 1 or stride[0] == n * seq:
        outer = unit.segment * seq
    else:
        return None
    start, count, step = 0, shape[2], 1
    if heads is not None:
        start, stop, step = heads
        count = len(range(start, stop, step))
    # Position p = s*w' + i*r + o: segment s (folded with the batch), selected row i, offset o.
    return x.as_strided((b * S, m, count, *shape[3:]), (outer, unit.rate * seq, step * stride[2], *stride[3:]),
                        x.storage_offset() + unit.offset * seq + start * stride[2])


def gather_rows(x: torch.Tensor, unit: Unit) -> torch.Tensor:
    """``x [b, n, H, ...]`` -> the rows ``unit`` selects, ``[b * S, m, H, ...]``: a strided view
    (no copy) of a contiguous ``x``, so writing into it writes into ``x``."""
    rows = _strided(x, unit, None)
    return _reshaped(x, unit) if rows is None else rows


def _reshaped(x: torch.Tensor, unit: Unit) -> torch.Tensor:
    """:func:`gather_rows` by reshapes (autograd-friendly; a copy where ``x`` does not fold)."""
    b, n = x.shape[:2]
    S, m = n // unit.segment, unit.rows
    # Position p = s*w' + i*r + o: segment s, selected row i, offset o.
    x = x.reshape(b, S, m, unit.rate, *x.shape[2:])[:, :, :, unit.offset]  # [b, S, m, H, ...]
    return x.reshape(b * S, m, *x.shape[3:])  # [b*S, m, H, ...]


def head_rows(x: torch.Tensor, unit: Unit, heads: tuple[int, int, int]) -> torch.Tensor:
    """The rows ``unit`` selects of the heads ``range(*heads)`` of ``x [b, n, H, ...]``:
    ``[b * S, m, |heads|, ...]``, a view of a contiguous ``x`` (:func:`gather_rows`)."""
    rows = _strided(x, unit, heads)
    return _reshaped(x[:, :, slice(*heads)], unit) if rows is None else rows


def q_rows(x: torch.Tensor, unit: Unit) -> torch.Tensor:
    """The unit's query heads and rows of ``x [b, n, h, ...]`` (q, out, lse and their grads)."""
    return head_rows(x, unit, unit.q_heads)


def kv_rows(x: torch.Tensor, unit: Unit) -> torch.Tensor:
    """The unit's kv rows of ``x [b, n, h_kv, d]``: its kv heads (a view), or with ``kv_index``
    one kv head per query head (a copy of the selected rows only)."""
    if unit.kv_index is None:
        return head_rows(x, unit, unit.kv_heads)
    return gather_rows(x, unit).index_select(2, index_tensor(unit.kv_index, x.device))


def blank(q: torch.Tensor, heads: int, out_dtype: torch.dtype | None = None, with_lse: bool = True):
    """``out = 0 [b, n, heads, d]`` (``q``'s dtype unless ``out_dtype``) and ``lse = -inf
    [b, n, heads]`` (float32 or wider; None without ``with_lse``): what rows no unit writes
    hold."""
    b, n, _, d = q.shape
    out = torch.zeros(b, n, heads, d, dtype=out_dtype or q.dtype, device=q.device)
    if not with_lse:
        return out, None
    lse = torch.full((b, n, heads), float("-inf"), dtype=torch.promote_types(q.dtype, torch.float32),
                     device=q.device)
    return out, lse


def lse_merge(outs, lses):
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


def merge_rows(acc, acc_lse, o, lse):
    """In place: ``acc [B, m, H, d]``, ``acc_lse [B, m, H]`` (float32+ views) become the softmax
    merge of themselves and one unit's ``o``, ``lse`` rows (a unit's rows are never empty, so
    ``lse`` is finite and an empty ``acc_lse = -inf`` just takes the unit's values)."""
    new = torch.logaddexp(acc_lse, lse)
    acc.mul_(torch.exp(acc_lse - new).unsqueeze(-1)).addcmul_(o, torch.exp(lse - new).unsqueeze(-1))
    acc_lse.copy_(new)


def to_ring(x: torch.Tensor, idx: torch.Tensor, rate: int, local_len: int,
            ranks_here: int) -> torch.Tensor:
    """``x [b, nl, X, d]`` (``nl / L`` shards) -> the ring rows ``[G, gl, b, m, |idx|, d]``:
    per shard, rows ``i * r + o`` of the columns ``idx = o * X + head`` (``m = L / r``,
    ``gl = ranks_here`` group-ranks per sub-ring in this process)."""
    b, nl, X, d = x.shape
    Rl, m = nl // local_len, local_len // rate
    rows = x.reshape(b, Rl, m, rate * X, d).index_select(3, idx)  # [b, Rl, m, |idx|, d]
    return rows.movedim(1, 0).reshape(Rl // ranks_here, ranks_here, b, m, len(idx), d)


def from_ring(out: torch.Tensor, lse: torch.Tensor, idx: torch.Tensor, rate: int, heads: int):
    """Ring results ``out [G, gl, b, m, heads, d]``, ``lse [G, gl, b, m, heads]`` -> ``out
    [b, nl, heads, d]``, ``lse [b, nl, heads]``; ``idx`` places head column ``c`` at
    ``o * heads + c``; unselected rows get ``out = 0``, ``lse = -inf``."""
    G, gl, b, m, _, d = out.shape
    Rl = G * gl
    out = out.reshape(Rl, b, m, heads, d).movedim(0, 1)  # [b, Rl, m, heads, d]
    lse = lse.reshape(Rl, b, m, heads).movedim(0, 1)  # [b, Rl, m, heads]
    full_out = out.new_zeros(b, Rl, m, rate * heads, d).index_copy(3, idx, out)
    full_lse = lse.new_full((b, Rl, m, rate * heads), float("-inf")).index_copy(3, idx, lse)
    return full_out.reshape(b, Rl * m * rate, heads, d), full_lse.reshape(b, Rl * m * rate, heads)


def assemble_heads(full, parts, heads):
    """``head_groups``: ``(out, lse)`` over all heads from ``full`` (all heads, its own written,
    the rest 0 / -inf; None: ``parts`` cover every head in order) and ``parts`` (``(out, lse)``
    over the heads ``heads[i]`` each)."""
    if full is None:
        return parts[0] if len(parts) == 1 else tuple(torch.cat(x, dim=2) for x in zip(*parts))
    if not parts:
        return full
    idx = index_tensor(tuple(j for hs in heads for j in hs), full[0].device)
    return tuple(f.index_copy(2, idx, torch.cat(x, dim=2)) for f, x in zip(full, zip(*parts)))
