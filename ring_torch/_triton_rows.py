"""Flash-attention forward and backward over strided rows, written in place (Triton).

:func:`attend_into` reads a unit's selected rows through their strides (the views
``ring_torch._rows.q_rows``/``kv_rows`` make: ``[B, m, H, d]`` with any row, head and block
strides) and writes ``out`` and a float32 ``lse`` straight into the rows of the layer's
buffers: no dense operand copies, no kernel output to scatter. Or, ``merge=True``, it folds the
rows' attention into float32 ``(out, lse)`` accumulators in its epilogue (the longnet mix,
pattern after pattern, with no per-pattern output and no merge pass). GQA by head index (query
head ``j`` reads kv head ``j // (H / H_kv)``), no repeated kv heads. Causal is the lower
triangle of each ``m x m`` block; ``ids`` (a document id per row) hide the keys of other
documents. Rows load through pointers or, ``RowsConfig.tma``, tensor descriptors.

:func:`grads_into` is the backward from the rows' global ``(out, lse)`` (every pattern's, every
hop's): dq, dk, dv written into their rows, or added into float32 accumulators, in place.

On CUDA tensors the compiled kernel runs; on CPU tensors Triton's interpreter does (the CPU
tests: the same kernel body, numpy underneath) when ``TRITON_INTERPRET=1`` was set before
``triton`` was imported.
"""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["GradConfig", "RowsConfig", "attend_into", "grads_into", "interpreted", "supports", "triton_available"]

try:  # triton ships with torch's CUDA builds; CPU installs add it for the interpreter
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def triton_available() -> bool:
    """Whether ``triton`` imports (the kernel, or its interpreter on CPU tensors)."""
    return triton is not None


@dataclasses.dataclass(frozen=True)
class GradConfig:
    """Tile sizes of the backward kernels (:func:`grads_into`): the dk/dv kernel takes
    ``dkv_block_n`` keys per program and walks the queries ``dkv_block_m`` at a time
    (``dkv_block_m`` divides ``dkv_block_n``); the dq kernel takes ``dq_block_m`` queries and
    walks the keys ``dq_block_n`` at a time (``dq_block_n`` divides ``dq_block_m``)."""

    dkv_block_m: int = 32
    dkv_block_n: int = 64
    dq_block_m: int = 64
    dq_block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class RowsConfig:
    """Tile sizes and launch shape of the kernel (``block_n`` divides ``block_m``); ``tma``: rows
    through tensor descriptors (Hopper's bulk tensor copies; compute capability 9+, 16-byte
    aligned rows) instead of pointer loads; ``warp_specialize``: Triton's warp specialization of
    the unmasked key loop. ``backward``: the tiles of :func:`grads_into` where the layers'
    backward runs it (dq, dk, dv written or added into their rows in place); None: the aten
    backward. ``in_place_heads``: whether layers whose units each own their heads
    (``head_groups``) run these kernels too, or only layers that merge patterns (``longnet``)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False
    warp_specialize: bool = False
    in_place_heads: bool = True
    backward: GradConfig | None = None


DEFAULT_CONFIG = RowsConfig()
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel takes ``dtype`` and ``head_dim`` (a power of two, 16 to 256)."""
    return (triton is not None and dtype in _DTYPES and 16 <= head_dim <= 256
            and head_dim & (head_dim - 1) == 0)


if triton is not None:
    @triton.jit
    def _rows(X, b, h, start, sx_b, sx_m, sx_h, m, BLOCK: tl.constexpr, D: tl.constexpr,
              MASK: tl.constexpr, TMA: tl.constexpr):
        """``[BLOCK, D]`` rows ``start ..`` of block ``b``, head ``h`` (zeros past ``m``): through
        the tensor descriptor ``X`` (``[B, H, m, D]``) or from the pointer ``X`` and strides."""
        if TMA:
            x = X.load([b, h, start, 0]).reshape([BLOCK, D])
        else:  # (an else, not an early return: the compiler visits both branches)
            rows = start + tl.arange(0, BLOCK)
            ptr = X + b.to(tl.int64) * sx_b + h * sx_h + rows[:, None].to(tl.int64) * sx_m + tl.arange(0, D)[None, :]
            if MASK:
                x = tl.load(ptr, mask=rows[:, None] < m, other=0.0)
            else:
                x = tl.load(ptr)
        return x

    @triton.jit
    def _ids(I, b, start, si_b, si_m, m, BLOCK: tl.constexpr, HAS_IDS: tl.constexpr):
        """``[BLOCK]`` document ids of rows ``start ..`` of block ``b`` (-1 past ``m``; zeros
        without ids)."""
        rows = start + tl.arange(0, BLOCK)
        if HAS_IDS:
            ids = tl.load(I + b.to(tl.int64) * si_b + rows.to(tl.int64) * si_m, mask=rows < m, other=-1)
        else:
            ids = tl.zeros([BLOCK], tl.int32)
        return ids

    @triton.jit
    def _keep(qpos, kpos, qid, kid, m, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_IDS: tl.constexpr):
        """Which (query, key) pairs of a block count, broadcast from the rows' positions in the
        block and their ids (a column against a row, either way round): both rows before ``m``
        and, causal, the key not after the query (``MASK``: a diagonal or ragged block); the same
        document (``HAS_IDS``). Called only where ``MASK or HAS_IDS``."""
        if MASK:
            keep = (qpos < m) & (kpos < m)
            if CAUSAL:
                keep = keep & (kpos <= qpos)
            if HAS_IDS:
                keep = keep & (qid == kid)
        else:
            keep = qid == kid
        return keep

    @triton.jit
    def _block(acc, m_i, l_i, q, qid, K, V, I, b, kh, sk_b, sk_m, sk_h, sv_b, sv_m, sv_h, si_b, si_m, rows,
               start, m, scale_log2, D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_IDS: tl.constexpr, TMA: tl.constexpr, PRECISION: tl.constexpr):
        """One key block ``[start, start + BLOCK_N)`` folded into the running ``(acc, m_i, l_i)``
        (base-2 online softmax); keys of another document (``HAS_IDS``) hidden."""
        k = _rows(K, b, kh, start, sk_b, sk_m, sk_h, m, BLOCK_N, D, MASK, TMA)
        v = _rows(V, b, kh, start, sv_b, sv_m, sv_h, m, BLOCK_N, D, MASK, TMA)
        s = tl.dot(q, k.T, input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        if MASK or HAS_IDS:
            kid = _ids(I, b, start, si_b, si_m, m, BLOCK_N, HAS_IDS)
            keep = _keep(rows[:, None], (start + tl.arange(0, BLOCK_N))[None, :], qid[:, None], kid[None, :], m,
                         MASK, CAUSAL, HAS_IDS)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _key_range(start_m, m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
        """``(full_end, end)``: a query block's keys ``[0, full_end)`` need no mask, ``[full_end,
        end)`` do (causal: the diagonal blocks; else the ragged last block)."""
        if CAUSAL:
            full_end = start_m
            end = tl.minimum(start_m + BLOCK_M, m)
        else:
            full_end = (m // BLOCK_N) * BLOCK_N
            end = m
        return full_end, end

    @triton.jit
    def _forward_kernel(Q, K, V, O, Op, L, I, scale_log2, m, H, group, row_blocks,
                        sq_b, sq_m, sq_h, sk_b, sk_m, sk_h, sv_b, sv_m, sv_h,
                        so_b, so_m, so_h, sl_b, sl_m, sl_h, si_b, si_m, rate, offset,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr, EVEN: tl.constexpr, WRITE_LSE: tl.constexpr,
                        FILL: tl.constexpr, MERGE: tl.constexpr, HAS_IDS: tl.constexpr, TMA: tl.constexpr,
                        WS: tl.constexpr, PRECISION: tl.constexpr):
        pid = tl.program_id(0)
        # Row blocks of one (block, head) are neighbours (their keys share L2); within them the
        # last (the longest causal row block) runs first.
        row_block = row_blocks - 1 - pid % row_blocks
        bh = pid // row_blocks
        b = bh // H
        h = bh % H
        kh = h // group
        start_m = row_block * BLOCK_M
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _rows(Q, b, h, start_m, sq_b, sq_m, sq_h, m, BLOCK_M, D, not EVEN, TMA)
        qid = _ids(I, b, start_m, si_b, si_m, m, BLOCK_M, HAS_IDS)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        full_end, end = _key_range(start_m, m, BLOCK_M, BLOCK_N, CAUSAL)
        for start in tl.range(0, full_end, BLOCK_N, warp_specialize=WS):
            acc, m_i, l_i = _block(acc, m_i, l_i, q, qid, K, V, I, b, kh, sk_b, sk_m, sk_h, sv_b, sv_m, sv_h,
                                   si_b, si_m, rows, start, m, scale_log2, D, BLOCK_N, False, CAUSAL, HAS_IDS,
                                   TMA, PRECISION)
        for start in range(full_end, end, BLOCK_N):
            acc, m_i, l_i = _block(acc, m_i, l_i, q, qid, K, V, I, b, kh, sk_b, sk_m, sk_h, sv_b, sv_m, sv_h,
                                   si_b, si_m, rows, start, m, scale_log2, D, BLOCK_N, True, CAUSAL, HAS_IDS,
                                   TMA, PRECISION)
        nonempty = l_i > 0
        l_safe = tl.where(nonempty, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(nonempty, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        b64 = b.to(tl.int64)
        o_ptr = Op + b64 * so_b + h * so_h + rows[:, None].to(tl.int64) * so_m + tl.arange(0, D)[None, :]
        l_ptr = L + b64 * sl_b + h * sl_h + rows.to(tl.int64) * sl_m
        if MERGE:  # fold into the float32 (out, lse) already in these rows (earlier patterns)
            if EVEN:
                old_l = tl.load(l_ptr)
                old_o = tl.load(o_ptr)
            else:
                old_l = tl.load(l_ptr, mask=rows < m, other=float("-inf"))
                old_o = tl.load(o_ptr, mask=rows[:, None] < m, other=0.0)
            top = tl.maximum(old_l, lse)
            top = tl.where(top == float("-inf"), 0.0, top)
            w_old = tl.exp(old_l - top)
            w_new = tl.exp(lse - top)
            total = w_old + w_new
            total_safe = tl.where(total > 0, total, 1.0)
            out = (old_o * w_old[:, None] + out * w_new[:, None]) / total_safe[:, None]
            lse = tl.where(total > 0, top + tl.log(total_safe), float("-inf"))
        out = out.to(Op.dtype.element_ty)
        if TMA and not MERGE:
            O.store([b, h, start_m, 0], out.reshape([1, 1, BLOCK_M, D]))
        else:
            if EVEN:
                tl.store(o_ptr, out)
            else:
                tl.store(o_ptr, out, mask=rows[:, None] < m)
        if WRITE_LSE:
            if EVEN:
                tl.store(l_ptr, lse)
            else:
                tl.store(l_ptr, lse, mask=rows < m)
        if FILL:  # the rows between the selected ones (offsets other than ``offset``): 0 / -inf
            zero = tl.zeros([BLOCK_M, D], Op.dtype.element_ty)
            empty = tl.full([BLOCK_M], float("-inf"), tl.float32)
            for j in range(0, rate):
                if j != offset:
                    shift = j - offset
                    if EVEN:
                        tl.store(o_ptr + shift * (so_m // rate), zero)
                    else:
                        tl.store(o_ptr + shift * (so_m // rate), zero, mask=rows[:, None] < m)
                    if WRITE_LSE:
                        if EVEN:
                            tl.store(l_ptr + shift * (sl_m // rate), empty)
                        else:
                            tl.store(l_ptr + shift * (sl_m // rate), empty, mask=rows < m)

    @triton.jit
    def _delta_kernel(O, DO, L, DL, Delta, m, H, row_blocks, so_b, so_m, so_h, sd_b, sd_m, sd_h,
                      sl_b, sl_m, sl_h, sg_b, sg_m, sg_h, D: tl.constexpr, BLOCK: tl.constexpr,
                      HAS_DLSE: tl.constexpr):
        """``Delta [B*H, m]`` = rowsum(dout * out) - dlse (dlse taken as 0 where lse is -inf)."""
        pid = tl.program_id(0)
        bh = pid // row_blocks
        b = (bh // H).to(tl.int64)
        h = bh % H
        start = (pid % row_blocks) * BLOCK
        rows = start + tl.arange(0, BLOCK)
        keep = rows < m
        r64 = rows.to(tl.int64)
        o = _rows(O, b, h, start, so_b, so_m, so_h, m, BLOCK, D, True, False)
        do = _rows(DO, b, h, start, sd_b, sd_m, sd_h, m, BLOCK, D, True, False)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        if HAS_DLSE:
            lse = tl.load(L + b * sl_b + h * sl_h + r64 * sl_m, mask=keep, other=0.0)
            dlse = tl.load(DL + b * sg_b + h * sg_h + r64 * sg_m, mask=keep, other=0.0)
            delta -= tl.where(lse == float("-inf"), 0.0, dlse.to(tl.float32))
        tl.store(Delta + bh.to(tl.int64) * m + rows, delta, mask=keep)

    @triton.jit
    def _row_stats(L, Delta, b, h, bh, start, sl_b, sl_m, sl_h, m, BLOCK: tl.constexpr, MASK: tl.constexpr):
        """The base-2 LSE (``+inf`` where the row is empty or past ``m``: its probabilities are 0)
        and ``Delta`` of ``BLOCK`` rows from ``start``."""
        rows = start + tl.arange(0, BLOCK)
        l_ptr = L + b.to(tl.int64) * sl_b + h * sl_h + rows.to(tl.int64) * sl_m
        d_ptr = Delta + bh.to(tl.int64) * m + rows
        if MASK:
            lse = tl.load(l_ptr, mask=rows < m, other=float("-inf"))
            delta = tl.load(d_ptr, mask=rows < m, other=0.0)
        else:
            lse = tl.load(l_ptr)
            delta = tl.load(d_ptr)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        return lse2, delta

    @triton.jit
    def _dkdv_block(dk, dv, k, v, kid, Q, DO, L, Delta, I, b, h, bh, start_n, start_m, m,
                    sq_b, sq_m, sq_h, sd_b, sd_m, sd_h, sl_b, sl_m, sl_h, si_b, si_m, scale_log2,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_IDS: tl.constexpr, PRECISION: tl.constexpr):
        """One query block's share of the key block's ``(dk, dv)`` (transposed: keys are rows)."""
        q = _rows(Q, b, h, start_m, sq_b, sq_m, sq_h, m, BLOCK_M, D, MASK, False)
        do = _rows(DO, b, h, start_m, sd_b, sd_m, sd_h, m, BLOCK_M, D, MASK, False)
        lse2, delta = _row_stats(L, Delta, b, h, bh, start_m, sl_b, sl_m, sl_h, m, BLOCK_M, MASK)
        s_t = tl.dot(k, q.T, input_precision=PRECISION) * scale_log2  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASK or HAS_IDS:
            qid = _ids(I, b, start_m, si_b, si_m, m, BLOCK_M, HAS_IDS)
            keep = _keep((start_m + tl.arange(0, BLOCK_M))[None, :], (start_n + tl.arange(0, BLOCK_N))[:, None],
                         qid[None, :], kid[:, None], m, MASK, CAUSAL, HAS_IDS)
            p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, do.T, input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _grad_out(X, G, b, h, start, sx_b, sx_m, sx_h, m, BLOCK: tl.constexpr, D: tl.constexpr,
                  EVEN: tl.constexpr, ACCUMULATE: tl.constexpr):
        """Writes (or, ``ACCUMULATE``, adds) the gradient rows ``G [BLOCK, D]`` into ``X``."""
        rows = start + tl.arange(0, BLOCK)
        ptr = X + b.to(tl.int64) * sx_b + h * sx_h + rows[:, None].to(tl.int64) * sx_m + tl.arange(0, D)[None, :]
        keep = rows[:, None] < m
        if ACCUMULATE:
            if EVEN:
                G += tl.load(ptr).to(tl.float32)
            else:
                G += tl.load(ptr, mask=keep, other=0.0).to(tl.float32)
        if EVEN:
            tl.store(ptr, G.to(X.dtype.element_ty))
        else:
            tl.store(ptr, G.to(X.dtype.element_ty), mask=keep)

    @triton.jit
    def _dkdv_kernel(Q, K, V, DO, L, Delta, I, DK, DV, scale, scale_log2, m, H, H_kv, group, kv_blocks,
                     sq_b, sq_m, sq_h, sk_b, sk_m, sk_h, sv_b, sv_m, sv_h, sd_b, sd_m, sd_h,
                     sl_b, sl_m, sl_h, si_b, si_m, sdk_b, sdk_m, sdk_h, sdv_b, sdv_m, sdv_h,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     EVEN: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_IDS: tl.constexpr,
                     PRECISION: tl.constexpr):
        pid = tl.program_id(0)
        kv_block = pid % kv_blocks  # causal: the first key block has the most queries; it runs first
        bh = pid // kv_blocks
        b = bh // H_kv
        kh = bh % H_kv
        start_n = kv_block * BLOCK_N
        k = _rows(K, b, kh, start_n, sk_b, sk_m, sk_h, m, BLOCK_N, D, not EVEN, False)
        v = _rows(V, b, kh, start_n, sv_b, sv_m, sv_h, m, BLOCK_N, D, not EVEN, False)
        kid = _ids(I, b, start_n, si_b, si_m, m, BLOCK_N, HAS_IDS)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        full_end = (m // BLOCK_M) * BLOCK_M
        if CAUSAL:  # queries before the key block see none of it; the diagonal blocks are masked
            lo = start_n
            diag_end = tl.minimum(start_n + BLOCK_N, full_end)
        else:
            lo = 0
            diag_end = 0
        tail = tl.maximum(diag_end, full_end)
        for j in range(0, group):
            h = kh * group + j
            qbh = b * H + h
            for start_m in range(lo, diag_end, BLOCK_M):
                dk, dv = _dkdv_block(dk, dv, k, v, kid, Q, DO, L, Delta, I, b, h, qbh, start_n, start_m, m,
                                     sq_b, sq_m, sq_h, sd_b, sd_m, sd_h, sl_b, sl_m, sl_h, si_b, si_m, scale_log2,
                                     D, BLOCK_M, BLOCK_N, True, CAUSAL, HAS_IDS, PRECISION)
            for start_m in range(diag_end, full_end, BLOCK_M):
                dk, dv = _dkdv_block(dk, dv, k, v, kid, Q, DO, L, Delta, I, b, h, qbh, start_n, start_m, m,
                                     sq_b, sq_m, sq_h, sd_b, sd_m, sd_h, sl_b, sl_m, sl_h, si_b, si_m, scale_log2,
                                     D, BLOCK_M, BLOCK_N, False, CAUSAL, HAS_IDS, PRECISION)
            for start_m in range(tl.maximum(tail, lo), m, BLOCK_M):  # the ragged last query block
                dk, dv = _dkdv_block(dk, dv, k, v, kid, Q, DO, L, Delta, I, b, h, qbh, start_n, start_m, m,
                                     sq_b, sq_m, sq_h, sd_b, sd_m, sd_h, sl_b, sl_m, sl_h, si_b, si_m, scale_log2,
                                     D, BLOCK_M, BLOCK_N, True, CAUSAL, HAS_IDS, PRECISION)
        _grad_out(DK, dk * scale, b, kh, start_n, sdk_b, sdk_m, sdk_h, m, BLOCK_N, D, EVEN, ACCUMULATE)
        _grad_out(DV, dv, b, kh, start_n, sdv_b, sdv_m, sdv_h, m, BLOCK_N, D, EVEN, ACCUMULATE)

    @triton.jit
    def _dq_block(dq, q, do, lse2, delta, qid, K, V, I, b, kh, start_m, start_n, m, sk_b, sk_m, sk_h,
                  sv_b, sv_m, sv_h, si_b, si_m, scale_log2, D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_IDS: tl.constexpr,
                  PRECISION: tl.constexpr):
        """One key block's share of the query block's ``dq``."""
        k = _rows(K, b, kh, start_n, sk_b, sk_m, sk_h, m, BLOCK_N, D, MASK, False)
        v = _rows(V, b, kh, start_n, sv_b, sv_m, sv_h, m, BLOCK_N, D, MASK, False)
        s = tl.dot(q, k.T, input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(s - lse2[:, None])
        if MASK or HAS_IDS:
            kid = _ids(I, b, start_n, si_b, si_m, m, BLOCK_N, HAS_IDS)
            keep = _keep((start_m + tl.arange(0, BLOCK_M))[:, None], (start_n + tl.arange(0, BLOCK_N))[None, :],
                         qid[:, None], kid[None, :], m, MASK, CAUSAL, HAS_IDS)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, v.T, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)

    @triton.jit
    def _dq_kernel(Q, K, V, DO, L, Delta, I, DQ, scale, scale_log2, m, H, group, row_blocks,
                   sq_b, sq_m, sq_h, sk_b, sk_m, sk_h, sv_b, sv_m, sv_h, sd_b, sd_m, sd_h,
                   sl_b, sl_m, sl_h, si_b, si_m, sdq_b, sdq_m, sdq_h,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   EVEN: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_IDS: tl.constexpr, PRECISION: tl.constexpr):
        pid = tl.program_id(0)
        row_block = row_blocks - 1 - pid % row_blocks  # causal: the longest row block first
        bh = pid // row_blocks
        b = bh // H
        h = bh % H
        kh = h // group
        start_m = row_block * BLOCK_M
        q = _rows(Q, b, h, start_m, sq_b, sq_m, sq_h, m, BLOCK_M, D, not EVEN, False)
        do = _rows(DO, b, h, start_m, sd_b, sd_m, sd_h, m, BLOCK_M, D, not EVEN, False)
        lse2, delta = _row_stats(L, Delta, b, h, bh, start_m, sl_b, sl_m, sl_h, m, BLOCK_M, not EVEN)
        qid = _ids(I, b, start_m, si_b, si_m, m, BLOCK_M, HAS_IDS)
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        full_end, end = _key_range(start_m, m, BLOCK_M, BLOCK_N, CAUSAL)
        for start_n in range(0, full_end, BLOCK_N):
            dq = _dq_block(dq, q, do, lse2, delta, qid, K, V, I, b, kh, start_m, start_n, m, sk_b, sk_m, sk_h,
                           sv_b, sv_m, sv_h, si_b, si_m, scale_log2, D, BLOCK_M, BLOCK_N, False, CAUSAL, HAS_IDS, PRECISION)
        for start_n in range(full_end, end, BLOCK_N):
            dq = _dq_block(dq, q, do, lse2, delta, qid, K, V, I, b, kh, start_m, start_n, m, sk_b, sk_m, sk_h,
                           sv_b, sv_m, sv_h, si_b, si_m, scale_log2, D, BLOCK_M, BLOCK_N, True, CAUSAL, HAS_IDS, PRECISION)
        _grad_out(DQ, dq * scale, b, h, start_m, sdq_b, sdq_m, sdq_h, m, BLOCK_M, D, EVEN, ACCUMULATE)


def interpreted() -> bool:
    """Whether ``triton.jit`` made interpreted kernels (``TRITON_INTERPRET=1`` before ``triton``
    was imported): the only way the kernel runs on CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_forward_kernel, InterpretedFunction)


def _check(q, k, v, out, lse, fill, config):
    B, m, H, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, m) or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if H % k.shape[2]:
        raise ValueError(f"num_heads={H} is not a multiple of num_kv_heads={k.shape[2]}")
    if out.shape != q.shape:
        raise ValueError(f"out {tuple(out.shape)} is not q's shape {tuple(q.shape)}")
    if lse is not None and (lse.shape != q.shape[:3] or lse.dtype != torch.float32):
        raise ValueError(f"lse must be float32 {tuple(q.shape[:3])}, got {lse.dtype} {tuple(lse.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name}.stride(-1)={x.stride(-1)}: the head dim must be contiguous")
    if not supports(q.dtype, d):
        raise ValueError(f"the rows kernel takes fp16/bf16/fp32 and a power-of-two head_dim in [16, 256], "
                         f"got {q.dtype} and head_dim={d}")
    if config.tma:
        for name, x in (("q", q), ("k", k), ("v", v), ("out", out)):
            if x.data_ptr() % 16 or any(st * x.element_size() % 16 for st in x.stride()[:3]):
                raise ValueError(f"{name}'s start or strides {x.stride()} are not 16-byte aligned: tma=True needs them so")
    if fill is not None:
        rate, offset = fill
        strides = [out.stride(1)] + ([] if lse is None else [lse.stride(1)])
        if not 0 <= offset < rate or any(st % rate for st in strides):
            raise ValueError(f"fill={fill}: the row strides {strides} are not rate={rate} positions")


def _check_device(q):
    """``ValueError`` unless the kernels can run on ``q``'s device: compiled on CUDA, interpreted
    on the CPU."""
    if (q.device.type == "cuda") == interpreted():
        raise ValueError(f"q on {q.device} needs " + ("the compiled kernel: unset TRITON_INTERPRET"
                         if interpreted() else "Triton's interpreter: TRITON_INTERPRET=1 before triton is imported"))


def _ids_args(ids, q):
    """``(tensor, stride_b, stride_m)`` of the document ids ``[B, m]`` (None: a placeholder)."""
    if ids is None:
        return q, 0, 0
    if ids.shape != q.shape[:2] or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be int32/int64 {tuple(q.shape[:2])}, got {ids.dtype} {tuple(ids.shape)}")
    return ids, ids.stride(0), ids.stride(1)


def attend_into(q, k, v, out, lse, scale: float, causal: bool, config: RowsConfig = DEFAULT_CONFIG,
                fill: tuple[int, int] | None = None, merge: bool = False, ids=None):
    """Attention of each block's rows among themselves, written into ``out`` and ``lse``.

    Args:
      q: ``[B, m, H, d]`` query rows, any strides with the last dim contiguous.
      k, v: ``[B, m, H_kv, d]``; ``H % H_kv == 0``.
      out: ``[B, m, H, d]`` destination (a view; written in place, in ``out``'s dtype).
      lse: ``[B, m, H]`` float32 destination of the natural-log LSE, or None (not written).
      scale: the score scale.
      causal: the lower triangle of each block (row ``i`` sees keys ``<= i``).
      config: tile sizes (:class:`RowsConfig`).
      fill: ``(rate, offset)``: ``out``/``lse`` rows are every ``rate``-th position from
        ``offset``; the positions between them (same heads) are written ``0`` / ``-inf``, so the
        destination needs no clearing first. None: only the rows themselves are written.
      merge: ``out`` (float32) and ``lse`` already hold a partial attention of these rows over
        other keys (``0`` / ``-inf`` where none): the result is their exact softmax merge with
        this one (the longnet mix, pattern after pattern, with no per-pattern output).
      ids: ``[B, m]`` int document id of each row (any strides), or None: a key counts for a
        query only when their ids are equal (packed documents; padding as an id of its own).
        A row that sees no key gets ``out = 0``, ``lse = -inf``.

    Returns:
      ``(out, lse)``, the destinations.
    """
    _check(q, k, v, out, lse, fill, config)
    if merge and (lse is None or out.dtype != torch.float32 or fill is not None):
        raise ValueError(f"merge=True needs float32 out and lse accumulators and no fill, got out {out.dtype}, "
                         f"lse {None if lse is None else lse.dtype}, {fill=}")
    B, m, H, d = q.shape
    if B == 0 or m == 0 or H == 0:
        return out, lse
    if config.block_m % config.block_n:
        raise ValueError(f"{config.block_n=} does not divide {config.block_m=}")
    _check_device(q)
    row_blocks = triton.cdiv(m, config.block_m)
    lse_arg = lse if lse is not None else out  # never written
    lse_strides = lse.stride() if lse is not None else (0, 0, 0)
    rate, offset = fill if fill is not None else (1, 0)
    tensors = (q, k, v, out)
    if config.tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        tensors = tuple(TensorDescriptor(x, [x.shape[0], x.shape[2], x.shape[1], d],
                                         [x.stride(0), x.stride(2), x.stride(1), 1], [1, 1, block, d])
                        for x, block in zip(tensors, (config.block_m, config.block_n, config.block_n, config.block_m)))
    ids, si_b, si_m = _ids_args(ids, q)
    _forward_kernel[(row_blocks * B * H,)](
        *tensors, out, lse_arg, ids, scale * math.log2(math.e), m, H, H // k.shape[2], row_blocks,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse_strides, si_b, si_m, rate, offset,
        D=d, BLOCK_M=config.block_m, BLOCK_N=config.block_n, CAUSAL=bool(causal),
        EVEN=m % config.block_m == 0, WRITE_LSE=lse is not None, FILL=fill is not None and rate > 1, MERGE=merge,
        HAS_IDS=ids is not q, TMA=config.tma, WS=config.warp_specialize, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out, lse


def _check_grads(q, k, v, out, lse, dout, dlse, dq, dk, dv, config: GradConfig):
    _check(q, k, v, out, lse, None, RowsConfig())
    if lse is None:
        raise ValueError("grads_into needs the rows' float32 lse")
    for name, x, like in (("dout", dout, q), ("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if x.shape != like.shape or x.stride(-1) != 1:
            raise ValueError(f"{name} {tuple(x.shape)} with strides {x.stride()} is not a {tuple(like.shape)} "
                             f"view with a contiguous head dim")
    if dlse is not None and dlse.shape != lse.shape:
        raise ValueError(f"dlse {tuple(dlse.shape)} is not lse's shape {tuple(lse.shape)}")
    if config.dkv_block_n % config.dkv_block_m or config.dq_block_m % config.dq_block_n:
        raise ValueError(f"{config.dkv_block_m=} must divide {config.dkv_block_n=} and "
                         f"{config.dq_block_n=} must divide {config.dq_block_m=}")


def grads_into(q, k, v, out, lse, dout, dlse, dq, dk, dv, scale: float, causal: bool,
               config: GradConfig = GradConfig(), accumulate_q: bool = False, accumulate_kv: bool = False,
               ids=None):
    """The backward of :func:`attend_into` from the rows' *global* ``(out, lse)``, written into
    (or added to) the gradient rows in place.

    Fed the merged ``out``/``lse`` of every key these rows see (other patterns, other ring hops),
    it gives this block's exact share of the gradients: ``P = exp(S - lse)`` and
    ``D = rowsum(dout * out)`` are then the global ones. The LSE cotangent enters as
    ``dS = P (dP - D + dlse)``.

    Args:
      q, out, dout: ``[B, m, H, d]`` query rows, their global output and its cotangent (any
        strides, head dim contiguous).
      k, v: ``[B, m, H_kv, d]``; ``H % H_kv == 0`` (query head ``j`` reads kv head
        ``j // (H / H_kv)``; its gradient is summed over the group in the kernel).
      lse: ``[B, m, H]`` float32 global LSE (``-inf``: an empty row, no gradient).
      dlse: ``[B, m, H]`` cotangent of ``lse`` (taken as 0 where ``lse`` is ``-inf``) or None.
      dq, dk, dv: destinations of ``q``'s, ``k``'s and ``v``'s shapes (views; any dtype).
      scale: the score scale.
      causal: the lower triangle of each block.
      config: tile sizes (:class:`GradConfig`).
      accumulate_q, accumulate_kv: add into ``dq`` / ``dk`` and ``dv`` (float32 accumulators
        where several blocks add up) instead of overwriting them.
      ids: ``[B, m]`` document ids as in :func:`attend_into`, or None.

    Returns:
      ``(dq, dk, dv)``, the destinations.
    """
    _check_grads(q, k, v, out, lse, dout, dlse, dq, dk, dv, config)
    B, m, H, d = q.shape
    H_kv = k.shape[2]
    if B == 0 or m == 0 or H == 0:
        return dq, dk, dv
    _check_device(q)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    delta = torch.empty(B * H, m, dtype=torch.float32, device=q.device)  # [B*H, m]
    block = 64
    dl = dlse if dlse is not None else lse
    _delta_kernel[(triton.cdiv(m, block) * B * H,)](
        out, dout, lse, dl, delta, m, H, triton.cdiv(m, block), *out.stride()[:3], *dout.stride()[:3],
        *lse.stride(), *dl.stride(), D=d, BLOCK=block, HAS_DLSE=dlse is not None)
    scale_log2 = scale * math.log2(math.e)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *lse.stride())
    ids, si_b, si_m = _ids_args(ids, q)
    kv_blocks = triton.cdiv(m, config.dkv_block_n)
    _dkdv_kernel[(kv_blocks * B * H_kv,)](
        q, k, v, dout, lse, delta, ids, dk, dv, scale, scale_log2, m, H, H_kv, H // H_kv, kv_blocks,
        *strides, si_b, si_m, *dk.stride()[:3], *dv.stride()[:3],
        D=d, BLOCK_M=config.dkv_block_m, BLOCK_N=config.dkv_block_n, CAUSAL=bool(causal),
        EVEN=m % config.dkv_block_n == 0, ACCUMULATE=accumulate_kv, HAS_IDS=ids is not q, PRECISION=precision,
        **launch)
    row_blocks = triton.cdiv(m, config.dq_block_m)
    _dq_kernel[(row_blocks * B * H,)](
        q, k, v, dout, lse, delta, ids, dq, scale, scale_log2, m, H, H // H_kv, row_blocks,
        *strides, si_b, si_m, *dq.stride()[:3],
        D=d, BLOCK_M=config.dq_block_m, BLOCK_N=config.dq_block_n, CAUSAL=bool(causal),
        EVEN=m % config.dq_block_m == 0, ACCUMULATE=accumulate_q, HAS_IDS=ids is not q, PRECISION=precision,
        **launch)
    return dq, dk, dv
