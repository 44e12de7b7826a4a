"""Block attention kernels returning the log-sum-exp, and the backend dispatch.

Every kernel maps ``q [B, m, H, d]``, ``k``/``v [B, m, H_kv, d]`` (``H % H_kv == 0``; query head
``j`` reads kv head ``j // (H // H_kv)``) to ``out [B, m, H, d]`` in ``q``'s dtype and
``lse [B, m, H]`` in float32 (float64 for float64 inputs). Rows are never empty here: the layer
only sends selected rows, and causal rows always see their own key.

Backends:

* ``math``: plain matmuls in float32 or better, any dtype; autograd differentiates it exactly.
* ``torch``: torch's fused kernels (CPU: ``aten._scaled_dot_product_flash_attention_for_cpu``;
  CUDA: ``aten._scaled_dot_product_flash_attention`` for fp16/bf16 on sm80+ with
  ``head_dim % 8 == 0`` and ``<= 256``, else ``aten._scaled_dot_product_efficient_attention``;
  :func:`cuda_kernel` decides).
* ``xformers``: CUDA only, ``memory_efficient_attention_forward_requires_grad`` / ``..._backward``.

The fused backwards ignore the gradient of the LSE. :class:`_ExactLSE` makes them exact: with
``dS = P * (dP - D + dlse)``, ``dP = dO V^T`` and ``D = rowsum(dO * O)``, appending a column of ones
to ``V``, the column ``dlse`` to ``dO`` and a zero column to ``O`` (zero columns to ``Q``, ``K``)
turns the kernel's own ``dP - D`` into ``dP + dlse - D``; the appended columns are dropped.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ring_torch._plan import causal_mask

__all__ = ["BACKENDS", "block_attention", "check_backend", "cuda_kernel", "fused_block_grads",
           "select_backend", "xformers_available"]

BACKENDS = ("auto", "math", "torch", "xformers")
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def xformers_available() -> bool:
    """True when an xformers build that works with the installed torch imports."""
    try:
        from xformers.ops import fmha  # noqa: F401
    except Exception:  # a missing, or a build for another torch, fails in many ways
        return False
    return True


def select_backend(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None = None,
                   xformers_available: bool = False) -> tuple[str, torch.dtype]:
    """``backend="auto"``: ``(backend, compute_dtype)`` for a device type, input dtype and, on
    CUDA, the compute capability.

    * float64 anywhere: ``math`` (the exactness path).
    * CPU: ``torch`` in the input dtype (the CPU flash kernel takes fp32, bf16 and fp16).
    * CUDA sm80+: ``xformers`` when available, else ``torch``, in the input dtype.
    * CUDA before sm80 (e.g. Pascal sm_61): ``torch`` (the memory-efficient kernel; flash needs
      sm80) computing in float32: fp16 for accuracy, bf16 because these cards have no bf16 math.
      bf16 inputs are accepted, not refused: storage and casts work on every card.
    """
    if dtype == torch.float64:
        return "math", torch.float64
    if dtype not in _FUSED_DTYPES:
        raise ValueError(f"unsupported {dtype=}; expected float64, float32, float16 or bfloat16")
    if device_type == "cpu":
        return "torch", dtype
    if device_type == "cuda":
        if capability is None:
            raise ValueError("select_backend needs the CUDA compute capability")
        if tuple(capability) >= (8, 0):
            return ("xformers" if xformers_available else "torch"), dtype
        return "torch", torch.float32
    return "math", dtype


def cuda_kernel(dtype: torch.dtype, head_dim: int, capability: tuple[int, int]) -> str:
    """Which fused kernel ``backend="torch"`` runs on CUDA: ``"flash"`` (FlashAttention-2: fp16/bf16,
    sm80+, ``head_dim % 8 == 0`` and ``<= 256``) or ``"efficient"`` (the memory-efficient kernel:
    any card from sm50, fp32 too, any head_dim after padding to a multiple of 8)."""
    flash = (dtype in (torch.float16, torch.bfloat16) and tuple(capability) >= (8, 0)
             and head_dim % 8 == 0 and head_dim <= 256)
    return "flash" if flash else "efficient"


def check_backend(backend: str, device_type: str, dtype: torch.dtype):
    """Raises ``ValueError`` for an explicit backend that cannot run these inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown {backend=}; expected one of {BACKENDS}")
    if backend == "torch":
        if device_type == "cpu" and dtype not in _FUSED_DTYPES + (torch.float64,):
            raise ValueError(f"backend='torch' on cpu does not support {dtype=}")
        if device_type == "cuda" and dtype not in _FUSED_DTYPES:
            raise ValueError(f"backend='torch' on cuda does not support {dtype=}")
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"backend='torch' does not support {device_type=}")
    if backend == "xformers":
        if device_type != "cuda" or dtype not in _FUSED_DTYPES:
            raise ValueError(f"backend='xformers' needs CUDA and fp32/fp16/bf16, got "
                             f"{device_type=}, {dtype=}")
        if not xformers_available():
            raise ValueError("backend='xformers' but no xformers build matching this torch imports")


def _pad_last(x, pad):
    """Zero columns appended to the head dim (no copy when none are needed)."""
    return F.pad(x, (0, pad)) if pad else x


def _math_attention(q, k, v, scale, is_causal, keep=None, dropout_p=0.0):
    B, m, H, d = q.shape
    H_kv = k.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    qh = q.to(compute).permute(0, 2, 1, 3).reshape(B, H_kv, H // H_kv, m, d)  # [B, H_kv, g, m, d]
    kh = k.to(compute).permute(0, 2, 1, 3).unsqueeze(2)  # [B, H_kv, 1, m, d]
    vh = v.to(compute).permute(0, 2, 1, 3).unsqueeze(2)  # [B, H_kv, 1, m, d]
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B, H_kv, g, m, m]
    if is_causal:
        s = s.masked_fill(causal_mask(m, s.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, H_kv, g, m]
    probs = torch.exp(s - lse.unsqueeze(-1))
    if keep is not None:  # dropout on the probabilities; [B, H, m, m] -> [B, H_kv, g, m, m]
        probs = probs * keep.reshape(probs.shape).to(compute) / (1.0 - dropout_p)
    out = torch.matmul(probs, vh)  # [B, H_kv, g, m, d]
    out = out.reshape(B, H, m, d).transpose(1, 2).to(q.dtype)  # [B, m, H, d]
    return out, lse.reshape(B, H, m).transpose(1, 2)  # [B, m, H]


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


@functools.cache
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


def _kernel_backward(kernel, dout, dlse, q, k, v, out, saved, scale, is_causal):
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


class _ExactLSE(torch.autograd.Function):
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
        dq, dk, dv = _kernel_backward(ctx.kernel, dout, dlse, q, k, v, out, saved, ctx.scale, ctx.is_causal)
        return dq, dk, dv, None, None, None


def _fused_kernel(q, backend: str):
    """The fused kernel ``backend`` runs on ``q``'s device and dtype, or None (math)."""
    if backend == "math":
        return None
    if backend == "torch" and q.device.type == "cpu":
        return _AtenCPU
    if backend == "torch":
        flash = cuda_kernel(q.dtype, q.shape[-1], torch.cuda.get_device_capability(q.device)) == "flash"
        return _AtenFlashCUDA if flash else _AtenCUDA
    return _XFormers


def fused_block_grads(dout, q, k, v, out, lse, dlse=None, *, scale: float, is_causal: bool, backend: str):
    """``(dq, dk, dv)`` of one block by the fused backward kernel, given the rows' *global*
    ``out [B, m, H, d]``, ``lse [B, m, H]`` and cotangents ``dout``, ``dlse`` (None: zero): a
    ring block's share of a merged attention, since the kernel's ``P = exp(S - lse)`` and
    ``D = rowsum(dO * O)`` are then the global ones. ``k``/``v`` have ``H`` heads. Only for
    ``backend="torch"``, whose kernels take an outside LSE."""
    if backend != "torch":
        raise ValueError(f"fused_block_grads runs backend='torch' kernels, not {backend=}")
    kernel = _fused_kernel(q, backend)
    dout, k, v, out = (x.to(q.dtype) for x in (dout, k, v, out))
    return _kernel_backward(kernel, dout, dlse, q, k, v, out, kernel.saved_from_lse(lse, q), scale, is_causal)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                    is_causal: bool, backend: str, keep: torch.Tensor | None = None,
                    dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention per block: ``q [B, m, H, d]``, ``k``/``v [B, m, H_kv, d]`` ->
    ``(out [B, m, H, d], lse [B, m, H])``; causal is plain lower-triangular over the m rows.

    ``keep [B, H, m, m]`` (dropout): the probabilities are multiplied by ``keep / (1 - p)``
    (the LSE is not); this always runs the math path."""
    kernel = _fused_kernel(q, backend)
    if kernel is None or keep is not None:
        return _math_attention(q, k, v, scale, is_causal, keep, dropout_p)
    if kernel is not _AtenCPU:
        group = q.shape[2] // k.shape[2]
        if group > 1:  # these kernels want equal head counts; autograd sums the repeats back
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    return _ExactLSE.apply(q, k, v, kernel, scale, is_causal)
