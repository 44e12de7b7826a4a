"""Flash-attention forward over strided rows, written in place (Triton), and the pieces the
backward (:mod:`ring_torch._triton_grads`) shares with it.

:func:`attend_into` reads a unit's selected rows through their strides (the views
``ring_torch._rows.q_rows``/``kv_rows`` make: ``[B, m, H, d]`` with any row, head and block
strides) and writes ``out`` and a float32 ``lse`` straight into the rows of the layer's
buffers: no dense operand copies, no kernel output to scatter. Or, ``merge=True``, it folds the
rows' attention into float32 ``(out, lse)`` accumulators in its epilogue (the longnet mix,
pattern after pattern, with no per-pattern output and no merge pass). GQA by head index (query
head ``j`` reads kv head ``j // (H / H_kv)``), no repeated kv heads. Causal is the lower
triangle of each ``m x m`` block; ``ids`` (a document id per row) hide the keys of other
documents; ``dropout`` is drawn tile by tile from the shared counter hash
(:mod:`ring_torch._triton_dropout`). Rows load through pointers or, ``RowsConfig.tma``, tensor
descriptors.

:func:`ring_torch._triton_grads.grads_into` is the backward, built from this module's row loads
and masks.

On CUDA tensors the compiled kernel runs; on CPU tensors Triton's interpreter does (the CPU
tests: the same kernel body, numpy underneath) when ``TRITON_INTERPRET=1`` was set before
``triton`` was imported.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ring_torch._triton_dropout import RowsDropout, dropout_args

__all__ = ["GradConfig", "RowsConfig", "RowsDropout", "attend_into", "interpreted", "supports", "triton_available"]

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
    """Tile sizes of the backward kernels (:func:`ring_torch._triton_grads.grads_into`): the
    dk/dv kernel takes ``dkv_block_n`` keys per program and walks the queries ``dkv_block_m`` at a
    time (``dkv_block_m`` divides ``dkv_block_n``); the dq kernel takes ``dq_block_m`` queries
    and walks the keys ``dq_block_n`` at a time (``dq_block_n`` divides ``dq_block_m``)."""

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
    the unmasked key loop. ``backward``: the tiles of
    :func:`ring_torch._triton_grads.grads_into` where the layers' backward runs it (dq, dk, dv
    written or added into their rows in place); None: the aten backward. ``in_place_heads``: whether layers whose units each own their heads
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
    from ring_torch._triton_dropout import _hashes, _kept, _query_hashes

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
    def _ids(I, b, h, start, si_b, si_m, si_h, m, BLOCK: tl.constexpr, HAS_IDS: tl.constexpr):
        """``[BLOCK]`` document ids of rows ``start ..`` of block ``b`` under head ``h`` (-1 past
        ``m``; zeros without ids)."""
        rows = start + tl.arange(0, BLOCK)
        if HAS_IDS:
            ptr = I + b.to(tl.int64) * si_b + h * si_h + rows.to(tl.int64) * si_m
            ids = tl.load(ptr, mask=rows < m, other=-1)
        else:
            ids = tl.zeros([BLOCK], tl.int32)
        return ids

    @triton.jit
    def _keep(qpos, kpos, qid, kid, m, mk, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_IDS: tl.constexpr):
        """Which (query, key) pairs of a block count, broadcast from the rows' positions in the
        block and their ids (a column against a row, either way round): the query before ``m``
        and the key before ``mk`` and, causal, the key not after the query (``MASK``: a diagonal
        or ragged block); the same document (``HAS_IDS``). Called only where ``MASK or HAS_IDS``."""
        if MASK:
            keep = (qpos < m) & (kpos < mk)
            if CAUSAL:
                keep = keep & (kpos <= qpos)
            if HAS_IDS:
                keep = keep & (qid == kid)
        else:
            keep = qid == kid
        return keep

    @triton.jit
    def _block(acc, m_i, l_i, q, qid, K, V, IK, b, h, kh, sk_b, sk_m, sk_h, sv_b, sv_m, sv_h, sik_b, sik_m, sik_h, rows,
               start, m, mk, scale_log2, rh, P, p_base, sp_m, threshold, D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_IDS: tl.constexpr, TMA: tl.constexpr,
               PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
        """One key block ``[start, start + BLOCK_N)`` folded into the running ``(acc, m_i, l_i)``
        (base-2 online softmax); keys of another document (``HAS_IDS``) hidden; ``DROPOUT``: the
        weights the rows' hashes ``rh`` drop left out of ``acc`` (not of ``l_i``)."""
        k = _rows(K, b, kh, start, sk_b, sk_m, sk_h, mk, BLOCK_N, D, MASK, TMA)
        v = _rows(V, b, kh, start, sv_b, sv_m, sv_h, mk, BLOCK_N, D, MASK, TMA)
        s = tl.dot(q, k.T, input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        if MASK or HAS_IDS:
            kid = _ids(IK, b, h, start, sik_b, sik_m, sik_h, mk, BLOCK_N, HAS_IDS)
            keep = _keep(rows[:, None], (start + tl.arange(0, BLOCK_N))[None, :], qid[:, None], kid[None, :], m,
                         mk, MASK, CAUSAL, HAS_IDS)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            kpos = _hashes(P, p_base, start, sp_m, mk, BLOCK_N)
            p = tl.where(_kept(rh[:, None], kpos[None, :], threshold), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _key_range(start_m, m, mk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
        """``(full_end, end)``: a query block's keys ``[0, full_end)`` need no mask, ``[full_end,
        end)`` do (causal, ``mk == m``: the diagonal blocks; else the ragged last of ``mk`` keys)."""
        if CAUSAL:
            full_end = start_m
            end = tl.minimum(start_m + BLOCK_M, m)
        else:
            full_end = (mk // BLOCK_N) * BLOCK_N
            end = mk
        return full_end, end

    @triton.jit
    def _forward_kernel(Q, K, V, O, Op, L, I, IK, scale_log2, m, mk, H, group, row_blocks,
                        sq_b, sq_m, sq_h, sk_b, sk_m, sk_h, sv_b, sv_m, sv_h,
                        so_b, so_m, so_h, sl_b, sl_m, sl_h, si_b, si_m, si_h, sik_b, sik_m, sik_h, rate, offset,
                        R, sr_b, sr_m, sr_h, P, sp_b, sp_m, sp_h, threshold, keep_scale,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr, EVEN: tl.constexpr, WRITE_LSE: tl.constexpr,
                        FILL: tl.constexpr, MERGE: tl.constexpr, HAS_IDS: tl.constexpr, TMA: tl.constexpr,
                        WS: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
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
        qid = _ids(I, b, h, start_m, si_b, si_m, si_h, m, BLOCK_M, HAS_IDS)
        p_base = b.to(tl.int64) * sp_b + h * sp_h
        rh = _query_hashes(R, b, h, start_m, sr_b, sr_m, sr_h, m, qid, BLOCK_M, DROPOUT)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        full_end, end = _key_range(start_m, m, mk, BLOCK_M, BLOCK_N, CAUSAL)
        for start in tl.range(0, full_end, BLOCK_N, warp_specialize=WS):
            acc, m_i, l_i = _block(acc, m_i, l_i, q, qid, K, V, IK, b, h, kh, sk_b, sk_m, sk_h, sv_b, sv_m, sv_h,
                                   sik_b, sik_m, sik_h, rows, start, m, mk, scale_log2, rh, P, p_base, sp_m, threshold, D,
                                   BLOCK_N, False, CAUSAL, HAS_IDS, TMA, PRECISION, DROPOUT)
        for start in range(full_end, end, BLOCK_N):
            acc, m_i, l_i = _block(acc, m_i, l_i, q, qid, K, V, IK, b, h, kh, sk_b, sk_m, sk_h, sv_b, sv_m, sv_h,
                                   sik_b, sik_m, sik_h, rows, start, m, mk, scale_log2, rh, P, p_base, sp_m, threshold, D,
                                   BLOCK_N, True, CAUSAL, HAS_IDS, TMA, PRECISION, DROPOUT)
        nonempty = l_i > 0
        l_safe = tl.where(nonempty, l_i, 1.0)
        out = acc / l_safe[:, None]
        if DROPOUT:
            out = out * keep_scale
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


def interpreted() -> bool:
    """Whether ``triton.jit`` made interpreted kernels (``TRITON_INTERPRET=1`` before ``triton``
    was imported): the only way the kernel runs on CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_forward_kernel, InterpretedFunction)


def _check(q, k, v, out, lse, fill, config, causal: bool):
    B, m, H, d = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if causal and k.shape[1] != m:
        raise ValueError(f"causal=True needs the block's own rows as keys, got {k.shape[1]} key rows for {m} queries")
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


def _ids_args(ids, key_ids, q, k) -> tuple:
    """``(ids, stride_b, stride_m, stride_h, key_ids, stride_b, stride_m, stride_h)`` of the
    document ids of the query rows ``[B, m]`` (or per head ``[B, m, H]``) and of the key rows
    ``[B, m_k]`` (or as each query head sees them, ``[B, m_k, H]``; None: the query rows' ids,
    which needs ``m_k == m``); placeholders (``q``, zero strides) without ids."""
    if ids is None:
        if key_ids is not None:
            raise ValueError("key_ids needs ids (the query rows' ids)")
        return q, 0, 0, 0, q, 0, 0, 0
    if key_ids is None:
        if k.shape[1] != q.shape[1]:
            raise ValueError(f"ids without key_ids needs the query rows as keys, got {k.shape[1]} key rows for "
                             f"{q.shape[1]} queries")
        key_ids = ids
    args = []
    for name, x, rows in (("ids", ids, q.shape[:3]), ("key_ids", key_ids, (*k.shape[:2], q.shape[2]))):
        if x.shape not in (rows[:2], rows) or x.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32/int64 {tuple(rows[:2])} or {tuple(rows)}, got "
                             f"{x.dtype} {tuple(x.shape)}")
        args += [x, x.stride(0), x.stride(1), x.stride(2) if x.dim() == 3 else 0]
    return tuple(args)


def attend_into(q, k, v, out, lse, scale: float, causal: bool, config: RowsConfig = DEFAULT_CONFIG,
                fill: tuple[int, int] | None = None, merge: bool = False, ids=None,
                dropout: RowsDropout | None = None, key_ids=None):
    """Attention of each block's rows among themselves (or over another block's key rows),
    written into ``out`` and ``lse``.

    Args:
      q: ``[B, m, H, d]`` query rows, any strides with the last dim contiguous.
      k, v: ``[B, m_k, H_kv, d]``; ``H % H_kv == 0``; ``m_k == m`` where causal.
      out: ``[B, m, H, d]`` destination (a view; written in place, in ``out``'s dtype).
      lse: ``[B, m, H]`` float32 destination of the natural-log LSE, or None (not written).
      scale: the score scale.
      causal: the lower triangle of each block (row ``i`` sees keys ``<= i``; the keys are the
        query rows).
      config: tile sizes (:class:`RowsConfig`).
      fill: ``(rate, offset)``: ``out``/``lse`` rows are every ``rate``-th position from
        ``offset``; the positions between them (same heads) are written ``0`` / ``-inf``, so the
        destination needs no clearing first. None: only the rows themselves are written.
      merge: ``out`` (float32) and ``lse`` already hold a partial attention of these rows over
        other keys (``0`` / ``-inf`` where none): the result is their exact softmax merge with
        this one (the longnet mix, pattern after pattern, with no per-pattern output).
      ids: ``[B, m]`` int document id of each row (any strides), or ``[B, m, H]`` per head (rows
        whose heads sit at different positions), or None: a key counts for a query only when
        their ids are equal (packed documents; padding as an id of its own).
        A row that sees no key gets ``out = 0``, ``lse = -inf``.
      dropout: :class:`RowsDropout` (the shared counter hash, drawn in the kernel: the math
        kernel's mask bit for bit), or None. ``lse`` stays that of the undropped weights.
      key_ids: ``[B, m_k]`` (or as each query head sees them, ``[B, m_k, H]``) document ids of
        the key rows where they are not the query rows (a ring hop's block), or None: ``ids``.

    Returns:
      ``(out, lse)``, the destinations.
    """
    _check(q, k, v, out, lse, fill, config, causal)
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
    ids, si_b, si_m, si_h, key_ids, sik_b, sik_m, sik_h = _ids_args(ids, key_ids, q, k)
    _forward_kernel[(row_blocks * B * H,)](
        *tensors, out, lse_arg, ids, key_ids, scale * math.log2(math.e), m, k.shape[1], H, H // k.shape[2], row_blocks,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse_strides, si_b, si_m, si_h, sik_b, sik_m, sik_h,
        rate, offset, *dropout_args(dropout, q, k), DROPOUT=dropout is not None, D=d, BLOCK_M=config.block_m, BLOCK_N=config.block_n, CAUSAL=bool(causal),
        EVEN=m % config.block_m == 0, WRITE_LSE=lse is not None, FILL=fill is not None and rate > 1, MERGE=merge,
        HAS_IDS=ids is not q, TMA=config.tma, WS=config.warp_specialize, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out, lse
