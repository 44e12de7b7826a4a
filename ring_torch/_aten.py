"""The fused attention kernels (aten and xformers) behind one adapter interface, and the
extra-column trick that makes their backwards exact in the gradient of the LSE.

Each adapter maps ``q [B, m, H, d]``, ``k``/``v [B, m, H_kv, d]`` to ``(out [B, m, H, d],
lse [B, m, H], saved)`` by ``forward(q, k, v, scale, is_causal)`` and back by
``backward(dout, q, k, v, out, saved, scale, is_causal)``; ``saved_from_lse(lse, q)`` rebuilds
``saved`` from an outside (global) LSE, so a block's share of a merged attention can be
differentiated; ``pad_multiple`` is the head-dim alignment the kernel wants.

The fused backwards ignore the gradient of the LSE. :class:`ExactLSE` makes them exact: with
``dS = P * (dP - D + dlse)``, ``dP = dO V^T`` and ``D = rowsum(dO * O)``, appending a column of ones
to ``V``, the column ``dlse`` to ``dO`` and a zero column to ``O`` (zero columns to ``Q``, ``K``)
turns the kernel's own ``dP - D`` into ``dP + dlse - D``; the appended columns are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ring_torch._config import memo

__all__ = ["ExactLSE", "exact_backward", "copy_rows_", "dense", "records_graph"]


def records_graph(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on ``tensors`` (grad mode on and one of them requires it)."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in tensors)


def copy_rows_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` for rows of equal shape and dtype whose last dim is contiguous, moved as
    8-byte words (strided 16-bit copies then run on 4x fewer, wider elements); any other pair,
    views whose strides or offsets are not whole words, copies autograd records and copies
    traced by ``torch.compile`` take the plain copy."""
    if (dst.dtype == src.dtype and dst.shape == src.shape and dst.element_size() < 8 and dst.dim()
            and not records_graph(dst, src) and not torch.compiler.is_compiling()
            and _as_words(dst) and _as_words(src)):
        dst.view(torch.int64).copy_(src.view(torch.int64))
        return dst
    return dst.copy_(src)


def _as_words(x: torch.Tensor) -> bool:
    """Whether ``x`` (a dtype narrower than 8 bytes, at least one dim) reads as 8-byte words: the
    last dim contiguous and a whole number of words long, every other stride and the offset
    whole words."""
    per_word = 8 // x.element_size()
    *outer, last = x.stride()
    if last != 1 or x.shape[-1] % per_word or x.storage_offset() % per_word:
        return False
    for stride in outer:
        if stride % per_word:
            return False
    return True


def dense(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous()`` by :func:`copy_rows_`."""
    return x if x.is_contiguous() else copy_rows_(torch.empty(x.shape, dtype=x.dtype, device=x.device), x)


def _pad_last(x, pad):
    """Zero columns appended to the head dim (no copy when none are needed)."""
    return F.pad(x, (0, pad)) if pad else x


class _AtenCPU:
    """``aten._scaled_dot_product_flash_attention_for_cpu`` (takes [B, H, m, d], native GQA)."""

    pad_multiple = 1

    @staticmethod
    def forward(q, k, v, scale, is_causal):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, is_causal, scale=scale)
        return out.transpose(1, 2), lse.transpose(1, 2), (lse,)  # [B, m, H, d], [B, m, H]

    @staticmethod
    def backward(dout, q, k, v, out, saved, scale, is_causal):
        (lse,) = saved
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            out.transpose(1, 2), lse, 0.0, is_causal, scale=scale)
        return tuple(g.transpose(1, 2) for g in grads)

    @staticmethod
    def saved_from_lse(lse, q):
        acc = torch.promote_types(q.dtype, torch.float32)  # the kernel's own LSE dtype
        return (lse.transpose(1, 2).to(acc).contiguous(),)  # [B, H, m]


class _AtenCUDA:
    """``aten._scaled_dot_product_efficient_attention``: fp32/fp16/bf16 on sm50+; no GQA, so
    the caller repeats kv heads; head_dim padded to a multiple of 8 for alignment."""

    pad_multiple = 8

    @staticmethod
    def forward(q, k, v, scale, is_causal):
        m, d = q.shape[1], q.shape[-1]
        q, k, v = (_pad_last(x, -d % 8).transpose(1, 2) for x in (q, k, v))  # [B, H, m, d8]
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, is_causal, scale=scale)
        # The kernel pads lse's row axis to a multiple of 32; its backward wants it so.
        return (out[..., :d].transpose(1, 2), lse[..., :m].transpose(1, 2),
                (lse, seed, offset))

    @staticmethod
    def backward(dout, q, k, v, out, saved, scale, is_causal):
        lse, seed, offset = saved
        d = q.shape[-1]
        dout, q, k, v, out = (_pad_last(x, -d % 8).transpose(1, 2) for x in (dout, q, k, v, out))
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout.contiguous(), q, k, v, None, out, lse, seed, offset, 0.0,
            [True, True, True, False], is_causal, scale=scale)
        return tuple(g[..., :d].transpose(1, 2) for g in (dq, dk, dv))

    @staticmethod
    def saved_from_lse(lse, q):
        m = lse.shape[1]
        lse = F.pad(lse.transpose(1, 2).float(), (0, -m % 32)).contiguous()  # [B, H, m padded to 32]
        return (lse, *_rng_state(_AtenCUDA, q))


def _rng_state(kernel, q):
    """The (unused without dropout) RNG seed/offset tensors the kernel's backward takes, as its
    own forward makes them for dropout 0: from one tiny forward call, once per kernel, device,
    dtype and head_dim (a ring backward asks for them at every hop)."""
    return _rng_state_for(kernel, q.device, q.dtype, q.shape[-1])


@memo(maxsize=64)
def _rng_state_for(kernel, device, dtype, head_dim):
    tiny = torch.zeros(1, 1, 1, head_dim, device=device, dtype=dtype)
    return kernel.forward(tiny, tiny, tiny, 1.0, False)[2][1:]


class _AtenFlashCUDA:
    """``aten._scaled_dot_product_flash_attention`` (FlashAttention-2): fp16/bf16, sm80+, no GQA
    (the caller repeats kv heads). Its backward takes ``out`` and the float32 ``logsumexp``."""

    pad_multiple = 8

    @staticmethod
    def forward(q, k, v, scale, is_causal):
        out, lse, *_, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, is_causal, False, scale=scale)
        return out.transpose(1, 2), lse.transpose(1, 2), (lse, seed, offset)  # [B, m, H, d], [B, m, H]

    @staticmethod
    def backward(dout, q, k, v, out, saved, scale, is_causal):
        lse, seed, offset = saved
        # The kernel reads strided q, k, v (rows gathered as views stay views); it makes dout and
        # out contiguous itself, so doing it here costs nothing extra.
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        dout, out = dout.contiguous(), out.contiguous()
        dout, q, k, v, out = (x.transpose(1, 2) for x in (dout, q, k, v, out))  # [B, H, m, d]
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, is_causal, seed, offset, scale=scale)
        return tuple(g.transpose(1, 2) for g in grads)

    @staticmethod
    def saved_from_lse(lse, q):
        return (lse.transpose(1, 2).float().contiguous(), *_rng_state(_AtenFlashCUDA, q))


class _AtenCudnnCUDA:
    """``aten._scaled_dot_product_cudnn_attention`` (cuDNN's fused flash attention; on sm90 its
    Hopper kernels, the ones ``F.scaled_dot_product_attention`` picks there): fp16/bf16, no GQA
    (the caller repeats kv heads), ``head_dim % 8 == 0`` and ``<= 128``. Strided q, k, v rows are
    read in place. Its LSE is float32 ``[B, H, m, 1]``; a backward whose operands are widened past
    :data:`CUDNN_MAX_HEAD_DIM` (the exact-LSE column) runs the flash backward, which computes the
    same gradients from the same ``(out, lse)``."""

    pad_multiple = 8

    @staticmethod
    def forward(q, k, v, scale, is_causal):
        out, lse, *_, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, is_causal, False,
            scale=scale)
        lse = lse.reshape(lse.shape[:3])  # [B, H, m]
        return out.transpose(1, 2), lse.transpose(1, 2), (lse, seed, offset)  # [B, m, H, d], [B, m, H]

    @staticmethod
    def backward(dout, q, k, v, out, saved, scale, is_causal):
        lse, seed, offset = saved
        if q.shape[-1] > CUDNN_MAX_HEAD_DIM:
            return _AtenFlashCUDA.backward(dout, q, k, v, out, _AtenFlashCUDA.saved_from_lse(lse.transpose(1, 2), q),
                                           scale, is_causal)
        m, n = q.shape[1], k.shape[1]
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        # cuDNN's backward reads dout and out as dense rows: strided views of the layer's
        # [b, n, h, d] tensors gave wrong gradients on an H200 (torch 2.11, cuDNN 9.19).
        dout, out = dense(dout), dense(out)
        dout, q, k, v, out = (x.transpose(1, 2) for x in (dout, q, k, v, out))  # [B, H, m, d]
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.unsqueeze(-1), seed, offset, None, None, None, m, n, 0.0, is_causal,
            scale=scale)
        return tuple(g.transpose(1, 2) for g in grads)

    @staticmethod
    def saved_from_lse(lse, q):
        return (lse.transpose(1, 2).float().contiguous(), *_rng_state(_AtenCudnnCUDA, q))


# The widest head_dim the cuDNN adapter sends to cuDNN's backward.
CUDNN_MAX_HEAD_DIM = 128


class _XFormers:
    """xformers' memory-efficient forward/backward in its own [B, m, H, d] layout."""

    pad_multiple = 8

    @staticmethod
    def _bias(is_causal):
        from xformers.ops import fmha
        return fmha.attn_bias.LowerTriangularMask() if is_causal else None

    @staticmethod
    def forward(q, k, v, scale, is_causal):
        from xformers.ops import fmha
        m = q.shape[1]
        out, lse = fmha.memory_efficient_attention_forward_requires_grad(
            q, k, v, attn_bias=_XFormers._bias(is_causal), scale=scale)
        return out, lse[..., :m].transpose(1, 2), (lse,)

    @staticmethod
    def backward(dout, q, k, v, out, saved, scale, is_causal):
        from xformers.ops import fmha
        (lse,) = saved
        return fmha.memory_efficient_attention_backward(
            dout.contiguous(), out, lse, q, k, v, attn_bias=_XFormers._bias(is_causal), scale=scale)


def exact_backward(kernel, dout, dlse, q, k, v, out, saved, scale, is_causal):
    """``kernel.backward`` made exact in ``dlse`` (None: zero) by the extra column of the module
    docstring; every operand padded to the kernel's head-dim multiple."""
    d = q.shape[-1]
    if dlse is None:
        pad = -d % kernel.pad_multiple
        dout, q, k, v, out = (_pad_last(x, pad) for x in (dout, q, k, v, out))
    else:
        pad = -(d + 1) % kernel.pad_multiple  # zero columns beyond the one we need
        ones = torch.ones_like(v[..., :1])
        q, k, out = (F.pad(x, (0, 1 + pad)) for x in (q, k, out))
        v = F.pad(torch.cat([v, ones], dim=-1), (0, pad))
        dout = F.pad(torch.cat([dout, dlse.unsqueeze(-1).to(dout.dtype)], dim=-1), (0, pad))
    return tuple(g[..., :d] for g in kernel.backward(dout, q, k, v, out, saved, scale, is_causal))


class ExactLSE(torch.autograd.Function):
    """A fused kernel whose backward is exact in both ``dout`` and ``dlse`` (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, kernel, scale, is_causal):
        out, lse, saved = kernel.forward(q, k, v, scale, is_causal)
        ctx.kernel, ctx.scale, ctx.is_causal, ctx.num_saved = kernel, scale, is_causal, len(saved)
        ctx.save_for_backward(q, k, v, out, *saved)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, *saved = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = exact_backward(ctx.kernel, dout, dlse, q, k, v, out, saved, ctx.scale, ctx.is_causal)
        return dq, dk, dv, None, None, None
