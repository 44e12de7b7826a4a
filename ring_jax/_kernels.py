"""Block attention returning ``(out, lse)``, with an exact backward that includes the LSE cotangent.

Shapes: ``q [B, m, H, d]``, ``k/v [B, m_k, H, d]`` (segments already folded into ``B``, kv heads
already matched to query heads) → ``out [B, m, H, d]``, ``lse [B, m, H]`` (float32, or float64 for
float64 inputs). Scores and softmax are computed in at least float32.

The backward is written out (``jax.custom_vjp``) rather than left to autodiff because

* a ring merges blocks by LSE, so the cotangent of ``lse`` must flow: with ``P = exp(S - lse)``,
  ``dS = P * (dP - D + dlse)`` where ``D = rowsum(dO * O)`` (FlashAttention-2, Alg. 2, with the
  extra ``dlse`` term);
* the same formula evaluated with a *global* ``(O, lse)`` gives the exact gradient of one block of a
  merged attention, which is what the ring backward needs (``block_attention_bwd``).

Kernels: ``xla`` (matmuls and a softmax, any dtype and device: the reference) and ``cudnn``
(flash attention through ``_cudnn``, CUDA and 16-bit inputs only). ``set_block_kernel`` picks one;
``auto`` (default) takes cuDNN where it can run and no dropout is asked for. The choice is made
when a function is traced.

Dropout (``rate > 0`` with ``DropoutArgs``) multiplies the probabilities by ``keep / (1 - rate)``;
the LSE stays that of the undropped weights, and the backward regenerates the mask:
``dS = P * (keep / (1 - rate) * dP - D + dlse)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ring_jax import _cudnn
from ring_jax._dropout import DropoutArgs, keep_mask

KERNELS = ("auto", "xla", "cudnn")
_kernel = "auto"


def set_block_kernel(name: str) -> None:
    """``"auto"`` | ``"xla"`` | ``"cudnn"`` for functions traced from now on."""
    global _kernel
    if name not in KERNELS:
        raise ValueError(f"block kernel {name!r} is not one of {KERNELS}")
    _kernel = name


def get_block_kernel() -> str:
    return _kernel


def _use_cudnn(q, drop) -> bool:
    if _kernel == "xla":
        return False
    usable = drop is None and _cudnn.usable(q, q.shape[-1])
    if _kernel == "cudnn" and not usable:
        raise ValueError(f"block kernel 'cudnn' cannot run here: needs a CUDA backend (have "
                         f"{jax.default_backend()!r}), bf16/f16 inputs (have {q.dtype}), head_dim % 8 == 0 "
                         f"and <= 120 (have {q.shape[-1]}), no dropout, and JAX in {_cudnn.TESTED_JAX}")
    return usable


def _acc_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _scores(q, k, causal: bool, scale: float):
    """``[B, H, m, m_k]`` scaled scores in the accumulation dtype, ``-inf`` above the diagonal."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=_acc_dtype(q.dtype)) * scale
    if causal:
        row = jax.lax.broadcasted_iota(jnp.int32, s.shape[-2:], 0)
        col = jax.lax.broadcasted_iota(jnp.int32, s.shape[-2:], 1)
        s = jnp.where(row >= col, s, -jnp.inf)
    return s


def _dropped(p, drop: DropoutArgs | None, pattern: int, rate: float):
    """``P * keep / (1 - rate)``, or ``P`` without dropout."""
    if drop is None or rate == 0.0:
        return p
    return jnp.where(keep_mask(drop, pattern, rate), p / (1.0 - rate), 0.0)


def block_attention_fwd(q, k, v, causal: bool, scale: float, rate: float = 0.0, pattern: int = 0,
                        drop: DropoutArgs | None = None):
    """The forward of `block_attention` without the custom VJP (for callers that write their own)."""
    if _use_cudnn(q, drop):
        return _cudnn.forward(q, k, v, causal, scale)
    s = _scores(q, k, causal, scale)
    lse = jax.nn.logsumexp(s, axis=-1)  # [B, H, m]; finite: every row sees at least its diagonal
    p = _dropped(jnp.exp(s - lse[..., None]), drop, pattern, rate)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(p.dtype))
    return out.astype(q.dtype), jnp.swapaxes(lse, 1, 2)  # [B, m, H, d], [B, m, H]


def block_attention_bwd(q, k, v, out, lse, dout, dlse, *, causal: bool, scale: float, keep_acc_dtype=False,
                        rate: float = 0.0, pattern: int = 0, drop: DropoutArgs | None = None):
    """Gradients ``(dq, dk, dv)`` of one block given the (possibly global) ``out`` and ``lse`` of
    the rows and their cotangents (``dlse=None``: zero). Rows with ``lse = -inf`` contribute nothing. With
    ``keep_acc_dtype`` the gradients stay in the accumulation dtype (for ring accumulators)."""
    acc = _acc_dtype(q.dtype)
    if _use_cudnn(q, drop):
        grads = _cudnn.backward(q, k, v, out, lse, dout, dlse, causal, scale)
        return tuple(g.astype(acc) for g in grads) if keep_acc_dtype else grads
    s = _scores(q, k, causal, scale)
    lse_t = jnp.swapaxes(lse, 1, 2).astype(acc)[..., None]  # [B, H, m, 1]
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse_t), lse_t, jnp.inf))
    dout = dout.astype(acc)
    dv = jnp.einsum("bhqk,bqhd->bkhd", _dropped(p, drop, pattern, rate), dout)
    dp = _dropped(jnp.einsum("bqhd,bkhd->bhqk", dout, v.astype(acc)), drop, pattern, rate)
    delta = jnp.sum(dout * out.astype(acc), axis=-1)  # [B, m, H]
    if dlse is not None:
        delta = delta - dlse.astype(acc)
    ds = p * (dp - jnp.swapaxes(delta, 1, 2)[..., None])
    dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k.astype(acc)) * scale
    dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q.astype(acc)) * scale
    if keep_acc_dtype:
        return dq, dk, dv
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def block_attention(q, k, v, causal: bool, scale: float, rate: float = 0.0, pattern: int = 0,
                    drop: DropoutArgs | None = None):
    """``(out [B, m, H, d], lse [B, m, H])`` of softmax attention within each of the B blocks."""
    return block_attention_fwd(q, k, v, causal, scale, rate, pattern, drop)


def _block_attention_fwd(q, k, v, causal, scale, rate, pattern, drop):
    out, lse = block_attention_fwd(q, k, v, causal, scale, rate, pattern, drop)
    return (out, lse), (q, k, v, out, lse, drop)


def _block_attention_bwd(causal, scale, rate, pattern, residuals, cotangents):
    q, k, v, out, lse, drop = residuals
    dout, dlse = cotangents
    grads = block_attention_bwd(q, k, v, out, lse, dout, dlse, causal=causal, scale=scale, rate=rate,
                                pattern=pattern, drop=drop)
    return (*grads, None)


block_attention.defvjp(_block_attention_fwd, _block_attention_bwd)
