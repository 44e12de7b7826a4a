"""cuDNN flash attention for one block, behind one adapter (private JAX API, version-checked).

The public ``jax.nn.dot_product_attention(implementation="cudnn", return_residual=True)`` returns
its LSE in the input dtype (bf16), too coarse to merge ring blocks, and its backward ignores the LSE
cotangent. The module under it, ``jax._src.cudnn.fused_attention_stablehlo``, returns float32
softmax stats ``[B, H, m]`` (the natural-log LSE) and has a backward primitive that takes
``(stats, output)`` as inputs, which is what an exact block backward needs:

* ``dlse`` enters through one extra head-dim column (padded to 8): ``q, k`` get zeros (scores
  unchanged), ``v`` a column of ones, ``out`` zeros, ``dout`` the column ``dlse``; then the
  kernel's ``dP - D`` becomes ``dP + dlse - D`` exactly.

``usable`` says whether this path can run; anything else uses the XLA kernel in ``_kernels``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

TESTED_JAX = ((0, 10), (0, 12))  # inclusive range of (major, minor) this adapter was written against


@functools.cache
def _module():
    """The private module, or None if this JAX is outside the tested range or lacks the API."""
    version = tuple(int(x) for x in jax.__version__.split(".")[:2])
    if not TESTED_JAX[0] <= version <= TESTED_JAX[1]:
        return None
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError:
        return None
    needed = ("dot_product_attention", "_dot_product_attention_bwd_p_wrapper", "MaskType", "AttentionLayout")
    return fa if all(hasattr(fa, name) for name in needed) else None


def compute_capability(device) -> tuple[int, int] | None:
    """``(major, minor)`` of a CUDA device (``device.compute_capability``, e.g. ``"9.0"``), else None."""
    value = getattr(device, "compute_capability", None)
    try:
        major, minor = str(value).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def usable(dtype, head_dim: int) -> bool:
    """cuDNN flash runs on CUDA devices of compute capability 8.0 or newer (Ampere on; a Pascal or
    Volta card takes the XLA kernel) for 16-bit inputs with ``head_dim % 8 == 0`` (<= 120, leaving
    room for the LSE column of the backward)."""
    if _module() is None or jax.default_backend() != "gpu":
        return False
    capability = compute_capability(jax.devices()[0])
    return (capability is not None and capability >= (8, 0) and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 120)


def _mask(causal: bool, padded: bool = False):
    fa = _module()
    if padded:
        return fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
    return fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK


def _real(x, count, fill):
    """``x [B, m, ...]`` with rows ``>= count[B]`` set to ``fill`` (what cuDNN leaves there is unset)."""
    rows = jnp.arange(x.shape[1]).reshape(1, -1, *([1] * (x.ndim - 2)))
    return jnp.where(rows < count.reshape(-1, *([1] * (x.ndim - 1))), x, jnp.asarray(fill, x.dtype))


def forward(q, k, v, causal: bool, scale: float, counts=None):
    """``(out [B, m, H, d], lse [B, m, H] float32)``. ``counts``: ``(query rows, key rows)`` int32
    ``[B]`` that are real (the rest are padding, not computed: cuDNN skips their tiles); their
    rows come out 0 with LSE ``-inf``."""
    lens = {} if counts is None else dict(q_seqlen=counts[0], kv_seqlen=counts[1])
    out, stats = _module().dot_product_attention(q, k, v, **lens, scale=scale,
                                                 mask_type=_mask(causal, counts is not None), return_residual=True)
    lse = jnp.swapaxes(stats, 1, 2)
    if counts is not None:
        rows = jnp.where(counts[1] == 0, 0, counts[0])  # no real key: no row of the block has one
        out, lse = _real(out, rows, 0.0), _real(lse, rows, -jnp.inf)
    return out, lse


def backward(q, k, v, out, lse, dout, dlse, causal: bool, scale: float, counts=None):
    """``(dq, dk, dv)`` given the rows' (possibly global) ``out``, ``lse`` and cotangents;
    ``dlse=None`` means a zero LSE cotangent (no extra column: the kernel runs at ``head_dim``);
    ``counts`` as in :func:`forward` (padding rows get zero gradients)."""
    fa = _module()
    d = q.shape[-1]

    def pad(x, column=None):  # [..., d] -> [..., d + 8]; the first extra column is `column`
        extra = jnp.zeros((*x.shape[:-1], 8), x.dtype)
        if column is not None:
            extra = extra.at[..., 0].set(column.astype(x.dtype))
        return jnp.concatenate([x, extra], axis=-1)

    out, dout = out.astype(q.dtype), dout.astype(q.dtype)
    if dlse is not None:
        q, k, v, out, dout = pad(q), pad(k), pad(v, jnp.ones(v.shape[:-1], v.dtype)), pad(out), pad(dout, dlse)
    unused = jnp.zeros(0, dtype=q.dtype)
    q_len, kv_len = (unused, unused) if counts is None else counts
    if counts is not None:  # finite stats on padded rows (their dout is 0): no inf * 0 if a kernel reads them
        lse = _real(lse, counts[0], 0.0)
    stats = jnp.swapaxes(lse, 1, 2).astype(jnp.float32)  # [B, H, m]
    grads = fa._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, unused, q_len, kv_len, unused, unused, unused, unused, stats, out, dout,
        scale=scale, seed=42, dropout_rate=0.0, variadic_args=(False, False),
        mask_type=_mask(causal, counts is not None), layout=fa.AttentionLayout.BTNH.value, sliding_window_length=None)
    dq, dk, dv = (g[..., :d] for g in grads[:3])
    if counts is not None:  # a block with no real query adds nothing to its keys
        keys = jnp.where(counts[0] == 0, 0, counts[1])
        dq, dk, dv = _real(dq, counts[0], 0.0), _real(dk, keys, 0.0), _real(dv, keys, 0.0)
    return dq, dk, dv
