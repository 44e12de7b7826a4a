"""Padded rows (positions at or past their batch entry's length) zeroed inside the fused
single-device path: the output's padded rows in place, and a unit's cotangent rows copied
densely with the padded ones zeroed (the dense copy cuDNN's backward needs anyway). On CUDA one
Triton kernel does both (in place it stores to padded rows only, so a call whose rows are all real
costs a launch, not a pass over the output); elsewhere, and while ``torch.compile`` traces,
``torch.where``/``masked_fill_`` do.

A row ``i`` of block ``B`` of a unit view ``[b * S, m, H, d]`` sits at position
``p = (B % S) * seg + i * rate + off`` of batch entry ``B // S``; a whole ``[b, n, h, d]``
tensor is the unit ``S = 1, seg = n, rate = 1, off = 0``.
"""

from __future__ import annotations

import torch

from ring_torch._plan import Unit

__all__ = ["zero_padded_rows_", "unit_rows_zeroed", "triton_available"]

try:  # triton ships with torch's CUDA builds; CPU builds have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def triton_available() -> bool:
    """Whether the Triton kernel can run (an importable ``triton``)."""
    return triton is not None


if triton is not None:
    @triton.jit
    def _padded_rows_kernel(src, dst, lengths, S, seg, rate, off, m, D, cols,
                            s_b, s_m, s_h, s_d, d_b, d_m, d_h, d_d,
                            COPY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        block = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        length = tl.load(lengths + block // S)
        pos = (block % S) * seg + rows * rate + off
        in_range = rows < m
        padded = in_range & (pos >= length)
        for c0 in range(0, cols, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok = c < cols
            h, e = c // D, c % D
            where_dst = dst + block * d_b + rows[:, None] * d_m + h[None, :] * d_h + e[None, :] * d_d
            if COPY:
                where_src = src + block * s_b + rows[:, None] * s_m + h[None, :] * s_h + e[None, :] * s_d
                x = tl.load(where_src, mask=(in_range & ~padded)[:, None] & ok[None, :], other=0.0)
                tl.store(where_dst, x, mask=in_range[:, None] & ok[None, :])
            else:
                zero = tl.zeros((BLOCK_M, BLOCK_C), dtype=dst.dtype.element_ty)
                tl.store(where_dst, zero, mask=padded[:, None] & ok[None, :])


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda and not torch.compiler.is_compiling()


def _real(lengths: torch.Tensor, blocks: int, m: int, S: int, seg: int, rate: int, off: int):
    """``[blocks, m]`` bool: True where the row is real."""
    block = torch.arange(blocks, device=lengths.device)
    pos = (block % S)[:, None] * seg + torch.arange(m, device=lengths.device)[None, :] * rate + off
    return pos < lengths[block // S][:, None]


def _launch(src: torch.Tensor, dst: torch.Tensor, lengths: torch.Tensor, S, seg, rate, off, copy: bool):
    blocks, m, H, D = src.shape
    block_m = 32
    block_c = min(triton.next_power_of_2(H * D), 256)
    grid = (blocks, triton.cdiv(m, block_m))
    _padded_rows_kernel[grid](src, dst, lengths, S, seg, rate, off, m, D, H * D, *src.stride(), *dst.stride(),
                              COPY=copy, BLOCK_M=block_m, BLOCK_C=block_c)


def zero_padded_rows_(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``x [b, n, h, d]`` (or ``[b, n, h]``) with rows ``p >= lengths[b]`` set to 0, in place;
    ``lengths``: int64 ``[b]`` on ``x``'s device."""
    rows = x if x.dim() == 4 else x.unsqueeze(-1)
    b, n = rows.shape[:2]
    if _use_triton(x) and b > 0 and n > 0:
        _launch(rows, rows, lengths, 1, n, 1, 0, copy=False)
        return x
    real = _real(lengths, b, n, 1, n, 1, 0)
    return x.masked_fill_(~real.view(b, n, *([1] * (x.dim() - 2))), 0)


def unit_rows_zeroed(rows: torch.Tensor, lengths: torch.Tensor, unit: Unit, seq_len: int) -> torch.Tensor:
    """A dense copy of the unit view ``rows [b * S, m, H, d]`` (any strides; ``S = seq_len /
    unit.segment``) with its padded rows zeroed; ``lengths``: int64 ``[b]``."""
    S = seq_len // unit.segment
    if _use_triton(rows) and rows.numel() > 0:
        out = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
        _launch(rows, out, lengths, S, unit.segment, unit.rate, unit.offset, copy=True)
        return out
    real = _real(lengths, rows.shape[0], rows.shape[1], S, unit.segment, unit.rate, unit.offset)
    return torch.where(real[:, :, None, None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
