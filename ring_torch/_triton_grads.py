"""Flash-attention backward over strided rows, written in place (Triton).

:func:`grads_into` is the backward of :func:`ring_torch._triton_rows.attend_into` from the rows'
global ``(out, lse)`` (every pattern's, every ring hop's): a ``Delta`` pass, a dk/dv kernel that
walks the queries of each key block (a GQA group summed in the program) and a dq kernel that walks
the keys of each query block, writing dq, dk, dv into their rows or adding them into float32
accumulators. Row loads, masks, document ids and dropout are the forward's
(:mod:`ring_torch._triton_rows`, :mod:`ring_torch._triton_dropout`).
"""

from __future__ import annotations

import math

import torch

from ring_torch._triton_dropout import RowsDropout, dropout_args
from ring_torch._triton_rows import GradConfig, RowsConfig, _check, _check_device, _ids_args, triton

__all__ = ["grads_into"]

if triton is not None:
    import triton.language as tl

    from ring_torch._triton_dropout import _hashes, _kept, _query_hashes
    from ring_torch._triton_rows import _ids, _keep, _key_range, _rows

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
    def _dkdv_block(dk, dv, k, v, kid, Q, DO, L, Delta, I, b, h, bh, start_n, start_m, m, mk,
                    sq_b, sq_m, sq_h, sd_b, sd_m, sd_h, sl_b, sl_m, sl_h, si_b, si_m, si_h, scale_log2,
                    kpos, R, sr_b, sr_m, sr_h, threshold, keep_scale,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_IDS: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
        """One query block's share of the key block's ``(dk, dv)`` (transposed: keys are rows);
        ``DROPOUT``: the key block's positions ``kpos`` against the query rows' hashes."""
        q = _rows(Q, b, h, start_m, sq_b, sq_m, sq_h, m, BLOCK_M, D, MASK, False)
        do = _rows(DO, b, h, start_m, sd_b, sd_m, sd_h, m, BLOCK_M, D, MASK, False)
        lse2, delta = _row_stats(L, Delta, b, h, bh, start_m, sl_b, sl_m, sl_h, m, BLOCK_M, MASK)
        s_t = tl.dot(k, q.T, input_precision=PRECISION) * scale_log2  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASK or HAS_IDS:
            qid = _ids(I, b, h, start_m, si_b, si_m, si_h, m, BLOCK_M, HAS_IDS)
            keep = _keep((start_m + tl.arange(0, BLOCK_M))[None, :], (start_n + tl.arange(0, BLOCK_N))[:, None],
                         qid[None, :], kid[:, None], m, mk, MASK, CAUSAL, HAS_IDS)
            p_t = tl.where(keep, p_t, 0.0)
        dp_t = tl.dot(v, do.T, input_precision=PRECISION)
        if DROPOUT:  # dV = (Z P / (1 - p))^T dO and dP = Z dO V^T / (1 - p), Z the keep mask
            rh = _hashes(R, b.to(tl.int64) * sr_b + h * sr_h, start_m, sr_m, m, BLOCK_M)
            kept = _kept(rh[None, :], kpos[:, None], threshold)
            dv = tl.dot((tl.where(kept, p_t, 0.0) * keep_scale).to(do.dtype), do, dv, input_precision=PRECISION)
            dp_t = tl.where(kept, dp_t, 0.0) * keep_scale
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
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
    def _dkdv_kernel(Q, K, V, DO, L, Delta, I, IK, DK, DV, scale, scale_log2, m, mk, H, H_kv, group, kv_blocks,
                     sq_b, sq_m, sq_h, sk_b, sk_m, sk_h, sv_b, sv_m, sv_h, sd_b, sd_m, sd_h,
                     sl_b, sl_m, sl_h, si_b, si_m, si_h, sik_b, sik_m, sik_h, sdk_b, sdk_m, sdk_h, sdv_b, sdv_m, sdv_h,
                     R, sr_b, sr_m, sr_h, P, sp_b, sp_m, sp_h, threshold, keep_scale,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     EVEN: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_IDS: tl.constexpr,
                     PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
        pid = tl.program_id(0)
        kv_block = pid % kv_blocks  # causal: the first key block has the most queries; it runs first
        bh = pid // kv_blocks
        b = bh // H_kv
        kh = bh % H_kv
        start_n = kv_block * BLOCK_N
        k = _rows(K, b, kh, start_n, sk_b, sk_m, sk_h, mk, BLOCK_N, D, not EVEN, False)
        v = _rows(V, b, kh, start_n, sv_b, sv_m, sv_h, mk, BLOCK_N, D, not EVEN, False)
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
            kid = _ids(IK, b, h, start_n, sik_b, sik_m, sik_h, mk, BLOCK_N, HAS_IDS)  # as head h sees the keys
            if DROPOUT:
                kpos = _hashes(P, b.to(tl.int64) * sp_b + h * sp_h, start_n, sp_m, mk, BLOCK_N)
            else:
                kpos = kid
            for start_m in range(lo, diag_end, BLOCK_M):
                dk, dv = _dkdv_block(dk, dv, k, v, kid, Q, DO, L, Delta, I, b, h, qbh, start_n, start_m, m, mk,
                                     sq_b, sq_m, sq_h, sd_b, sd_m, sd_h, sl_b, sl_m, sl_h, si_b, si_m, si_h, scale_log2,
                                     kpos, R, sr_b, sr_m, sr_h, threshold, keep_scale,
                                     D, BLOCK_M, BLOCK_N, True, CAUSAL, HAS_IDS, PRECISION, DROPOUT)
            for start_m in range(diag_end, full_end, BLOCK_M):
                dk, dv = _dkdv_block(dk, dv, k, v, kid, Q, DO, L, Delta, I, b, h, qbh, start_n, start_m, m, mk,
                                     sq_b, sq_m, sq_h, sd_b, sd_m, sd_h, sl_b, sl_m, sl_h, si_b, si_m, si_h, scale_log2,
                                     kpos, R, sr_b, sr_m, sr_h, threshold, keep_scale,
                                     D, BLOCK_M, BLOCK_N, False, CAUSAL, HAS_IDS, PRECISION, DROPOUT)
            for start_m in range(tl.maximum(tail, lo), m, BLOCK_M):  # the ragged last query block
                dk, dv = _dkdv_block(dk, dv, k, v, kid, Q, DO, L, Delta, I, b, h, qbh, start_n, start_m, m, mk,
                                     sq_b, sq_m, sq_h, sd_b, sd_m, sd_h, sl_b, sl_m, sl_h, si_b, si_m, si_h, scale_log2,
                                     kpos, R, sr_b, sr_m, sr_h, threshold, keep_scale,
                                     D, BLOCK_M, BLOCK_N, True, CAUSAL, HAS_IDS, PRECISION, DROPOUT)
        _grad_out(DK, dk * scale, b, kh, start_n, sdk_b, sdk_m, sdk_h, mk, BLOCK_N, D, EVEN, ACCUMULATE)
        _grad_out(DV, dv, b, kh, start_n, sdv_b, sdv_m, sdv_h, mk, BLOCK_N, D, EVEN, ACCUMULATE)

    @triton.jit
    def _dq_block(dq, q, do, lse2, delta, qid, K, V, IK, b, h, kh, start_m, start_n, m, mk, sk_b, sk_m, sk_h,
                  sv_b, sv_m, sv_h, sik_b, sik_m, sik_h, scale_log2, rh, P, p_base, sp_m, threshold, keep_scale,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_IDS: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
        """One key block's share of the query block's ``dq``; ``DROPOUT``: the rows' hashes ``rh``
        against the key block's positions."""
        k = _rows(K, b, kh, start_n, sk_b, sk_m, sk_h, mk, BLOCK_N, D, MASK, False)
        v = _rows(V, b, kh, start_n, sv_b, sv_m, sv_h, mk, BLOCK_N, D, MASK, False)
        s = tl.dot(q, k.T, input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(s - lse2[:, None])
        if MASK or HAS_IDS:
            kid = _ids(IK, b, h, start_n, sik_b, sik_m, sik_h, mk, BLOCK_N, HAS_IDS)
            keep = _keep((start_m + tl.arange(0, BLOCK_M))[:, None], (start_n + tl.arange(0, BLOCK_N))[None, :],
                         qid[:, None], kid[None, :], m, mk, MASK, CAUSAL, HAS_IDS)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, v.T, input_precision=PRECISION)
        if DROPOUT:
            kpos = _hashes(P, p_base, start_n, sp_m, mk, BLOCK_N)
            dp = tl.where(_kept(rh[:, None], kpos[None, :], threshold), dp, 0.0) * keep_scale
        ds = p * (dp - delta[:, None])
        return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)

    @triton.jit
    def _dq_kernel(Q, K, V, DO, L, Delta, I, IK, DQ, scale, scale_log2, m, mk, H, group, row_blocks,
                   sq_b, sq_m, sq_h, sk_b, sk_m, sk_h, sv_b, sv_m, sv_h, sd_b, sd_m, sd_h,
                   sl_b, sl_m, sl_h, si_b, si_m, si_h, sik_b, sik_m, sik_h, sdq_b, sdq_m, sdq_h,
                   R, sr_b, sr_m, sr_h, P, sp_b, sp_m, sp_h, threshold, keep_scale,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   EVEN: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_IDS: tl.constexpr, PRECISION: tl.constexpr,
                   DROPOUT: tl.constexpr):
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
        qid = _ids(I, b, h, start_m, si_b, si_m, si_h, m, BLOCK_M, HAS_IDS)
        p_base = b.to(tl.int64) * sp_b + h * sp_h
        rh = _query_hashes(R, b, h, start_m, sr_b, sr_m, sr_h, m, qid, BLOCK_M, DROPOUT)
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        full_end, end = _key_range(start_m, m, mk, BLOCK_M, BLOCK_N, CAUSAL)
        for start_n in range(0, full_end, BLOCK_N):
            dq = _dq_block(dq, q, do, lse2, delta, qid, K, V, IK, b, h, kh, start_m, start_n, m, mk, sk_b, sk_m, sk_h,
                           sv_b, sv_m, sv_h, sik_b, sik_m, sik_h, scale_log2, rh, P, p_base, sp_m, threshold, keep_scale,
                           D, BLOCK_M, BLOCK_N, False, CAUSAL, HAS_IDS, PRECISION, DROPOUT)
        for start_n in range(full_end, end, BLOCK_N):
            dq = _dq_block(dq, q, do, lse2, delta, qid, K, V, IK, b, h, kh, start_m, start_n, m, mk, sk_b, sk_m, sk_h,
                           sv_b, sv_m, sv_h, sik_b, sik_m, sik_h, scale_log2, rh, P, p_base, sp_m, threshold, keep_scale,
                           D, BLOCK_M, BLOCK_N, True, CAUSAL, HAS_IDS, PRECISION, DROPOUT)
        _grad_out(DQ, dq * scale, b, h, start_m, sdq_b, sdq_m, sdq_h, m, BLOCK_M, D, EVEN, ACCUMULATE)


def _check_grads(q, k, v, out, lse, dout, dlse, dq, dk, dv, config: GradConfig, causal: bool):
    _check(q, k, v, out, lse, None, RowsConfig(), causal)
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
               ids=None, dropout: RowsDropout | None = None, key_ids=None):
    """The backward of :func:`attend_into` from the rows' *global* ``(out, lse)``, written into
    (or added to) the gradient rows in place.

    Fed the merged ``out``/``lse`` of every key these rows see (other patterns, other ring hops),
    it gives this block's exact share of the gradients: ``P = exp(S - lse)`` and
    ``D = rowsum(dout * out)`` are then the global ones. The LSE cotangent enters as
    ``dS = P (dP - D + dlse)``.

    Args:
      q, out, dout: ``[B, m, H, d]`` query rows, their global output and its cotangent (any
        strides, head dim contiguous).
      k, v: ``[B, m_k, H_kv, d]``; ``H % H_kv == 0`` (query head ``j`` reads kv head
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
      dropout: the forward's :class:`~ring_torch._triton_dropout.RowsDropout` (the same mask,
        drawn again per tile), or None.
      key_ids: the key rows' document ids as in :func:`attend_into`, or None.

    Returns:
      ``(dq, dk, dv)``, the destinations.
    """
    _check_grads(q, k, v, out, lse, dout, dlse, dq, dk, dv, config, causal)
    B, m, H, d = q.shape
    m_k, H_kv = k.shape[1:3]
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
    ids, si_b, si_m, si_h, key_ids, sik_b, sik_m, sik_h = _ids_args(ids, key_ids, q, k)
    drop = dropout_args(dropout, q, k)
    kv_blocks = triton.cdiv(m_k, config.dkv_block_n)
    _dkdv_kernel[(kv_blocks * B * H_kv,)](
        q, k, v, dout, lse, delta, ids, key_ids, dk, dv, scale, scale_log2, m, m_k, H, H_kv, H // H_kv, kv_blocks,
        *strides, si_b, si_m, si_h, sik_b, sik_m, sik_h, *dk.stride()[:3], *dv.stride()[:3], *drop, DROPOUT=dropout is not None,
        D=d, BLOCK_M=config.dkv_block_m, BLOCK_N=config.dkv_block_n, CAUSAL=bool(causal),
        EVEN=m_k % config.dkv_block_n == 0, ACCUMULATE=accumulate_kv, HAS_IDS=ids is not q, PRECISION=precision,
        **launch)
    row_blocks = triton.cdiv(m, config.dq_block_m)
    _dq_kernel[(row_blocks * B * H,)](
        q, k, v, dout, lse, delta, ids, key_ids, dq, scale, scale_log2, m, m_k, H, H // H_kv, row_blocks,
        *strides, si_b, si_m, si_h, sik_b, sik_m, sik_h, *dq.stride()[:3], *drop, DROPOUT=dropout is not None,
        D=d, BLOCK_M=config.dq_block_m, BLOCK_N=config.dq_block_n, CAUSAL=bool(causal),
        EVEN=m % config.dq_block_m == 0, ACCUMULATE=accumulate_q, HAS_IDS=ids is not q, PRECISION=precision,
        **launch)
    return dq, dk, dv
