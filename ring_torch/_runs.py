"""Several independent runs of one call as one autograd node: :class:`FusedRuns`.

A call cut into pieces that attend only within themselves (a sequence's tiled prefix and its
tail, each batch entry's real rows) runs each piece as a :class:`Run` with the fused kernel's
forward and backward of :mod:`ring_torch._dilated`, writing into one ``out``/``lse`` and one
``dq``/``dk``/``dv``: no per-piece outputs joined by a copy, no split gradients joined by a copy.
Rows no run covers (padding past an entry's length) are ``0`` / ``-inf`` with zero gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ring_torch._coords import MaskSpec
from ring_torch._dilated import _forward, _real
from ring_torch._dilated_grads import _backward
from ring_torch._kernels import Kernel
from ring_torch._padded import zero_padded_rows_
from ring_torch._plan import DilatedPlan

__all__ = ["Run", "FusedRuns", "run_fused"]


@dataclass(frozen=True, eq=False)
class Run:
    """One piece of a call: the batch entries ``batch`` (a slice) and rows ``[start, stop)``
    of the inputs, run as ``plan`` over ``stop - start + pad`` rows (``pad`` zero rows
    appended), with ``spec`` (global coordinates and masks) and ``row_lengths`` (int64
    ``[entries]``, local: rows at or past them are padding; None: none)."""

    plan: DilatedPlan
    batch: slice
    start: int
    stop: int
    pad: int
    spec: MaskSpec
    row_lengths: torch.Tensor | None = None

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The run's rows of ``x [b, n, ...]`` (a view)."""
        return x[self.batch, self.start:self.stop]

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """The run's rows of ``x [b, n, X, d]`` with ``pad`` zero rows appended (a view without)."""
        rows = self.rows(x)
        return F.pad(rows, (0, 0) * (x.dim() - 2) + (0, self.pad)) if self.pad else rows

    def direct(self, x: torch.Tensor) -> bool:
        """Whether the run writes straight into its rows of ``x``: no padded rows, and the rows
        are a contiguous view (one entry, or whole entries), which the unit views fold."""
        return not self.pad and self.rows(x).is_contiguous()


def _covered(runs, batch: int) -> list[int]:
    """Per batch entry, the end of the rows the runs cover (runs cover a prefix of each entry)."""
    ends = [0] * batch
    for run in runs:
        for i in range(*run.batch.indices(batch)):
            ends[i] = max(ends[i], run.stop)
    return ends


def _zero_uncovered(runs, tensors, fills):
    """Rows no run covers: ``tensors[j]`` set to ``fills[j]`` there."""
    b, n = tensors[0].shape[:2]
    for i, end in enumerate(_covered(runs, b)):
        if end < n:
            for x, value in zip(tensors, fills):
                x[i, end:].fill_(value)


class FusedRuns(torch.autograd.Function):
    """``(out [b, n, h, d], lse [b, n, h])`` of independent :class:`Run` s by a kernel with a
    fused backward, as one autograd node; ``lse`` is the float32+ log-sum-exp (``-inf`` on
    padded rows; the saved one stays finite there for the backward). Direct runs
    (:meth:`Run.direct`) read views and write into the results' rows; padded ones (a short
    tail) run on padded copies whose outputs are kept for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, runs, scale, kernel, with_lse):
        b, n, h, d = q.shape
        out = q.new_empty(b, n, h, d)
        lse = torch.empty(b, n, h, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        _zero_uncovered(runs, (out, lse), (0.0, float("-inf")))
        kept = []  # padded runs' own (out, lse), their padded rows included
        for run in runs:
            xs = [run.padded(x) for x in (q, k, v)]
            t = run.stop - run.start
            if run.direct(out):
                o, l = _forward(run.plan, *xs, scale, kernel, run.spec, into=(run.rows(out), run.rows(lse)))
                kept.append(None)
            else:
                o, l = _forward(run.plan, *xs, scale, kernel, run.spec)
                o = o.to(q.dtype)
                kept.append((o, l))
            if run.row_lengths is not None:  # padded rows: out 0 (kept so), lse -inf (shown only)
                zero_padded_rows_(o, run.row_lengths)
            if kept[-1] is not None:
                run.rows(out).copy_(o[:, :t])
                run.rows(lse).copy_(l[:, :t])
        ctx.args = (runs, scale, kernel, kept)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        if not with_lse:
            return out
        masked = [run for run in runs if run.row_lengths is not None]
        shown = lse.clone() if masked else lse
        for run in masked:
            rows = run.rows(shown)
            rows.copy_(torch.where(_real(run.row_lengths, rows.shape[1])[:, :, None], rows, float("-inf")))
        return out, shown

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse=None):
        q, k, v, out, lse = ctx.saved_tensors
        runs, scale, kernel, kept = ctx.args
        dout = torch.zeros_like(out) if dout is None else dout.to(q.dtype)
        grads = [torch.empty_like(x) for x in (q, k, v)]
        _zero_uncovered(runs, grads, (0.0, 0.0, 0.0))
        for run, saved in zip(runs, kept):
            xs = [run.padded(x) for x in (q, k, v)]
            o, l = (run.rows(out), run.rows(lse)) if saved is None else saved
            do = run.padded(dout)
            dl = None if dlse is None else run.padded(dlse)
            if dl is not None and run.row_lengths is not None:
                dl = torch.where(_real(run.row_lengths, dl.shape[1])[:, :, None], dl, 0)
            if run.direct(grads[0]) and run.direct(grads[1]):
                _backward(run.plan, *xs, o, l, do, dl, scale, kernel, run.spec, run.row_lengths,
                          into=tuple(run.rows(g) for g in grads))
                continue
            parts = _backward(run.plan, *xs, o, l, do, dl, scale, kernel, run.spec, run.row_lengths)
            for g, part in zip(grads, parts):
                run.rows(g).copy_(part[:, :run.stop - run.start])
        return (*grads, None, None, None, None)


def run_fused(runs, q, k, v, scale: float, kernel: Kernel, with_lse: bool):
    """``(out, lse or None)`` of :class:`FusedRuns` (see there)."""
    if with_lse:
        return FusedRuns.apply(q, k, v, tuple(runs), scale, kernel, True)
    return FusedRuns.apply(q, k, v, tuple(runs), scale, kernel, False), None
