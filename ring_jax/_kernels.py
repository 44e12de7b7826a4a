"""Block attention returning ``(out, lse)``, with an exact backward that includes the LSE cotangent.

Shapes: ``q [B, m, H, d]``, ``k/v [B, m_k, H, d]`` (segments already folded into ``B``, kv heads
already matched to query heads) → ``out [B, m, H, d]``, ``lse [B, m, H]`` (float32, or float64 for
float64 inputs). Scores and softmax are computed in at least float32.

The backward is written out rather than left to autodiff because

* a ring merges blocks by LSE, so the cotangent of ``lse`` must flow: with ``P = exp(S - lse)``,
  ``dS = P * (dP - D + dlse)`` where ``D = rowsum(dO * O)`` (FlashAttention-2, Alg. 2, with the
  extra ``dlse`` term);
* the same formula evaluated with a *global* ``(O, lse)`` gives the exact gradient of one block of a
  merged attention, which is what the ring and single-device backwards need.

Kernels sit behind one small protocol (``name``, ``supports``, ``forward``, ``backward``):
:class:`XlaKernel` (matmuls and a softmax, any dtype and device, every modifier: the reference)
:class:`CudnnKernel` (flash attention through ``_cudnn``: CUDA, 16-bit inputs, no dropout) and
:class:`PallasKernel` (flash attention in Pallas, ``_pallas``: documents and padded keys too).
``set_block_kernel`` sets the preference; :func:`select_kernel` turns it into one kernel per call,
which :class:`BlockSpec` carries down to every block, forward and backward.

Dropout multiplies the probabilities by ``keep / (1 - rate)``; the LSE stays that of the undropped
weights, and the backward regenerates the mask: ``dS = P * (keep / (1 - rate) * dP - D + dlse)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import jax
import jax.numpy as jnp

from ring_jax import _cudnn, _pallas
from ring_jax._coords import Coords, Mods, aligned_coords, dropout_keep, score_mask

KERNELS = ("auto", "xla", "cudnn", "pallas")
# Where ``auto`` takes the Pallas kernel, by (compute capability, head_dim), measured on the H200
# (benchmarks/results/h200_pallas_2026-12-02.json, h200_pallas_ring_2026-12-02.json): "masks" for
# what cuDNN cannot run (documents, padded keys of a non-causal call; XLA is 7-11x slower);
# "dropout" for calls with dropout (cuDNN is not given it here; XLA computes whole score blocks);
# "lse_backward" for the backward of blocks with an LSE cotangent (rings, ``return_lse``: cuDNN
# takes it through an extra head-dim column), behind cuDNN's forward.
PALLAS_AUTO: dict[tuple[tuple[int, int], int], tuple[str, ...]] = {((9, 0), 64): ("masks", "lse_backward")}
_preference = "auto"


def _acc_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


class Kernel(Protocol):
    name: str

    def supports(self, dtype, head_dim: int, mods: Mods) -> bool: ...

    def forward(self, q, k, v, scale: float, mods: Mods, coords: Coords): ...

    def backward(self, q, k, v, out, lse, dout, dlse, scale: float, mods: Mods, coords: Coords): ...


def _dropped(p, keep, rate: float):
    """``P * keep / (1 - rate)``, or ``P`` without dropout."""
    return p if keep is None else jnp.where(keep, p / (1.0 - rate), 0.0)


@dataclasses.dataclass(frozen=True)
class XlaKernel:
    """Plain XLA: any dtype, any device, every modifier of ``_coords``."""

    name: str = "xla"

    def supports(self, dtype, head_dim: int, mods: Mods) -> bool:
        return True

    @staticmethod
    def _scores(q, k, scale: float, mods: Mods, coords: Coords):
        """``[B, H, m, m_k]`` scaled scores in the accumulation dtype, ``-inf`` where masked."""
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=_acc_dtype(q.dtype)) * scale
        mask = score_mask(coords, mods)
        return s if mask is None else jnp.where(mask, s, -jnp.inf)

    def forward(self, q, k, v, scale, mods, coords):
        s = self._scores(q, k, scale, mods, coords)
        lse = jax.nn.logsumexp(s, axis=-1)  # [B, H, m]; -inf on a row whose keys are all padding
        p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, jnp.inf)[..., None])  # 0 on such rows
        p = _dropped(p, dropout_keep(coords, mods), mods.dropout_rate)
        out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(p.dtype))
        return out.astype(q.dtype), jnp.swapaxes(lse, 1, 2)  # [B, m, H, d], [B, m, H]

    def backward(self, q, k, v, out, lse, dout, dlse, scale, mods, coords):
        acc = _acc_dtype(q.dtype)
        s = self._scores(q, k, scale, mods, coords)
        lse_t = jnp.swapaxes(lse, 1, 2).astype(acc)[..., None]  # [B, H, m, 1]
        p = jnp.exp(s - jnp.where(jnp.isfinite(lse_t), lse_t, jnp.inf))
        keep, rate = dropout_keep(coords, mods), mods.dropout_rate
        dout = dout.astype(acc)
        dv = jnp.einsum("bhqk,bqhd->bkhd", _dropped(p, keep, rate), dout)
        dp = _dropped(jnp.einsum("bqhd,bkhd->bhqk", dout, v.astype(acc)), keep, rate)
        delta = jnp.sum(dout * out.astype(acc), axis=-1)  # [B, m, H]
        if dlse is not None:
            delta = delta - dlse.astype(acc)
        ds = p * (dp - jnp.swapaxes(delta, 1, 2)[..., None])
        dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k.astype(acc)) * scale
        dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q.astype(acc)) * scale
        return dq, dk, dv


@dataclasses.dataclass(frozen=True)
class CudnnKernel:
    """cuDNN flash attention (``_cudnn``): CUDA, bf16/fp16, ``head_dim % 8 == 0``, no dropout, no
    key mask (padding in a non-causal call)."""

    name: str = "cudnn"

    def supports(self, dtype, head_dim: int, mods: Mods) -> bool:
        return not mods.dropout and not mods.key_mask and not mods.documents and _cudnn.usable(dtype, head_dim)

    def forward(self, q, k, v, scale, mods, coords):
        return _cudnn.forward(q, k, v, mods.causal, scale, _real_counts(mods, coords))

    def backward(self, q, k, v, out, lse, dout, dlse, scale, mods, coords):
        acc = _acc_dtype(q.dtype)
        grads = _cudnn.backward(q, k, v, out, lse, dout, dlse, mods.causal, scale, _real_counts(mods, coords))
        return tuple(g.astype(acc) for g in grads)


def _real_counts(mods: Mods, coords: Coords):
    """``(query rows, key rows)`` int32 ``[B]`` of each block that lie before their entry's length
    (rows are in increasing position: the real ones come first) when ``mods.skip_padding``, else
    None. cuDNN runs only with causal padding (non-causal padding masks keys with the XLA kernel),
    where a head whose count is one lower than the block's (another offset) needs no mask: its
    extra key comes after each of its real queries."""
    if not mods.skip_padding or coords.klen is None:
        return None
    count = lambda pos: jnp.max(jnp.sum(pos < coords.klen[:, None, None], axis=-1), axis=-1)  # noqa: E731
    return count(coords.qpos).astype(jnp.int32), count(coords.kpos).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class PallasKernel:
    """Pallas flash attention (``_pallas``): Triton on a CUDA device of compute capability 8.0 or
    newer (bf16/f16; Pallas' Triton backend, deprecated in jax 0.11), the interpreter on other
    backends (up to float32; slow, for tests);
    ``head_dim`` a power of two from 16 to 256; documents, padded keys and, in the interpreter,
    dropout (the shared hash, drawn tile by tile; not yet run on a GPU, where dropout takes XLA).
    A block whose rows no tile of 16 or more divides runs the XLA kernel."""

    name: str = "pallas"
    blocks: _pallas.PallasBlocks = _pallas.PallasBlocks()

    def supports(self, dtype, head_dim: int, mods: Mods) -> bool:
        if head_dim not in (16, 32, 64, 128, 256):
            return False
        if _pallas.interpreted():  # float32 sums: float64 inputs would lose precision
            return jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16, jnp.float16)
        if mods.dropout:  # the in-kernel hash has run in the interpreter only (its -m cuda tests are written)
            return False
        capability = _cudnn.compute_capability(jax.devices()[0])
        return (_pallas.compiled_backend() and capability is not None and capability >= (8, 0)
                and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16))

    def _tiled(self, q, k) -> bool:
        return _pallas.tiles_for(q.shape[1], k.shape[1], self.blocks) is not None

    def forward(self, q, k, v, scale, mods, coords):
        if not self._tiled(q, k):
            return XlaKernel().forward(q, k, v, scale, mods, coords)
        return _pallas.forward(q, k, v, coords, scale=scale, mods=mods, blocks=self.blocks)

    def backward(self, q, k, v, out, lse, dout, dlse, scale, mods, coords):
        if not self._tiled(q, k):
            return XlaKernel().backward(q, k, v, out, lse, dout, dlse, scale, mods, coords)
        return _pallas.backward(q, k, v, out, lse, dout, dlse, coords, scale=scale, mods=mods, blocks=self.blocks)


_REGISTRY = {"xla": XlaKernel(), "cudnn": CudnnKernel(), "pallas": PallasKernel()}


def set_block_kernel(name: str) -> None:
    """``"auto"`` | ``"xla"`` | ``"cudnn"`` | ``"pallas"`` for functions traced from now on."""
    global _preference
    if name not in KERNELS:
        raise ValueError(f"block kernel {name!r} is not one of {KERNELS}")
    _preference = name


def get_block_kernel() -> str:
    return _preference


@dataclasses.dataclass(frozen=True)
class SplitKernel:
    """One kernel's forward with another's backward: the backward needs only the rows' exact
    ``out`` and ``lse``, whichever kernel computed them."""

    forward_kernel: Kernel
    backward_kernel: Kernel

    @property
    def name(self) -> str:
        return f"{self.forward_kernel.name}+{self.backward_kernel.name}"

    def supports(self, dtype, head_dim: int, mods: Mods) -> bool:
        return all(k.supports(dtype, head_dim, mods) for k in (self.forward_kernel, self.backward_kernel))

    def forward(self, q, k, v, scale, mods, coords):
        return self.forward_kernel.forward(q, k, v, scale, mods, coords)

    def backward(self, q, k, v, out, lse, dout, dlse, scale, mods, coords):
        return self.backward_kernel.backward(q, k, v, out, lse, dout, dlse, scale, mods, coords)


def _pallas_measured(head_dim: int, case: str) -> bool:
    """Whether :data:`PALLAS_AUTO` records the Pallas kernel as the faster one for ``case`` here."""
    if _pallas.interpreted():
        return False
    return case in PALLAS_AUTO.get((_cudnn.compute_capability(jax.devices()[0]), head_dim), ())


def select_kernel(dtype, head_dim: int, dropout: bool, key_mask: bool = False, documents: bool = False,
                  lse_cotangent: bool = False) -> Kernel:
    """The kernel every block of one call runs, from the ``set_block_kernel`` preference.

    ``auto`` takes cuDNN where it supports the call (with the Pallas backward when the blocks'
    backward carries an LSE cotangent, ``lse_cotangent``, and :data:`PALLAS_AUTO` records that
    faster here), else Pallas where it supports the call and :data:`PALLAS_AUTO` records it faster
    than XLA, else XLA; an explicit ``cudnn`` or ``pallas`` that cannot run raises."""
    mods = Mods(dropout_rate=0.5 if dropout else 0.0, key_mask=key_mask, documents=documents)
    if _preference == "xla":
        return _REGISTRY["xla"]
    cudnn, pallas = _REGISTRY["cudnn"], _REGISTRY["pallas"]
    if _preference == "pallas":
        if pallas.supports(dtype, head_dim, mods):
            return pallas
        raise ValueError(f"block kernel 'pallas' cannot run here: needs bf16/f16 inputs on a CUDA device of "
                         f"compute capability 8.0+ with Pallas' Triton backend, or up to float32 elsewhere "
                         f"(have {jnp.dtype(dtype)} on {jax.default_backend()!r}), head_dim a power of two in "
                         f"[16, 256] (have {head_dim}) "
                         f"and, on a GPU, no dropout (have {dropout=})")
    if cudnn.supports(dtype, head_dim, mods):
        if (_preference == "auto" and lse_cotangent and pallas.supports(dtype, head_dim, mods)
                and _pallas_measured(head_dim, "lse_backward")):
            return SplitKernel(cudnn, pallas)
        return cudnn
    if _preference == "cudnn":
        raise ValueError(f"block kernel 'cudnn' cannot run here: needs a CUDA backend (have "
                         f"{jax.default_backend()!r}), bf16/f16 inputs (have {jnp.dtype(dtype)}), head_dim % 8 == 0 "
                         f"and <= 120 (have {head_dim}), no dropout, no padded keys in a non-causal call (have "
                         f"{key_mask=}), no segment_ids (have {documents=}), and JAX in {_cudnn.TESTED_JAX}")
    if pallas.supports(dtype, head_dim, mods) and _pallas_measured(head_dim, "dropout" if dropout else "masks"):
        return pallas
    return _REGISTRY["xla"]


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """How every block of one call is computed, decided once per call (hashable, static): the
    kernel, the softmax scale, and the call's modifiers (a unit adds its pattern index);
    ``key_mask``: some keys are padding (``Coords.klen``) and must be masked; ``documents``:
    scores across documents (``Coords.docs``) are masked; ``skip_padding``: padded rows may be
    skipped (cuDNN is told each block's real rows)."""

    kernel: Kernel
    scale: float
    causal: bool = False
    dropout_rate: float = 0.0
    key_mask: bool = False
    documents: bool = False
    skip_padding: bool = False

    def mods(self, pattern: int, causal: bool | None = None) -> Mods:
        """The modifiers of a block of ``pattern``; ``causal=False`` for a block wholly in the past."""
        return Mods(self.causal if causal is None else causal, self.dropout_rate, pattern, self.key_mask,
                    self.documents, self.skip_padding)

    def forward(self, q, k, v, mods: Mods, coords: Coords):
        """``(out [B, m, H, d], lse [B, m, H])``, without a custom VJP (callers own the backward)."""
        return self.kernel.forward(q, k, v, self.scale, mods, coords)

    def attend(self, q, k, v, mods: Mods, coords: Coords):
        """:meth:`forward` with the exact block backward (:meth:`backward`, LSE cotangent included)."""
        return _block(self, mods, q, k, v, coords)

    def backward(self, q, k, v, out, lse, dout, dlse, mods: Mods, coords: Coords):
        """``(dq, dk, dv)`` in the accumulation dtype, given the rows' (possibly global) ``out`` and
        ``lse`` and their cotangents (``dlse=None``: zero). Rows with ``lse = -inf`` add nothing."""
        return self.kernel.backward(q, k, v, out, lse, dout, dlse, self.scale, mods, coords)


def make_spec(dtype, head_dim: int, scale: float, causal: bool, dropout_rate: float,
              key_mask: bool = False, documents: bool = False, skip_padding: bool = False,
              lse_cotangent: bool = False) -> BlockSpec:
    """The :class:`BlockSpec` of one call; ``lse_cotangent``: its blocks' backward carries an LSE
    cotangent (rings, ``return_lse``), which may change the kernel ``auto`` picks."""
    kernel = select_kernel(dtype, head_dim, dropout_rate > 0.0, key_mask, documents, lse_cotangent)
    return BlockSpec(kernel, float(scale),
                     bool(causal), float(dropout_rate), bool(key_mask), bool(documents), bool(skip_padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _block(spec: BlockSpec, mods: Mods, q, k, v, coords):
    return spec.forward(q, k, v, mods, coords)


def _block_fwd(spec, mods, q, k, v, coords):
    out, lse = spec.forward(q, k, v, mods, coords)
    return (out, lse), (q, k, v, out, lse, coords)


def _block_bwd(spec, mods, residuals, cotangents):
    q, k, v, out, lse, coords = residuals
    grads = spec.backward(q, k, v, out, lse, *cotangents, mods, coords)
    return (*(g.astype(x.dtype) for g, x in zip(grads, (q, k, v))), None)


_block.defvjp(_block_fwd, _block_bwd)


def block_attention(q, k, v, *, scale: float, is_causal: bool = False, dropout_rate: float = 0.0,
                    pattern: int = 0, coords: Coords | None = None):
    """Softmax attention within each of ``B`` independent blocks, differentiable in ``out`` and ``lse``.

    Args:
      q: ``[B, m, H, d]``.
      k, v: ``[B, m, H, d]`` (kv heads already matched to query heads).
      scale: the softmax scale.
      is_causal: mask keys after their query (the lower triangle of each block).
      dropout_rate, pattern: dropout with the shared hash of ``pattern`` (needs ``coords``).
      coords: the blocks' global coordinates (default: block ``i`` of batch ``i``, positions from
        0, seed 0).

    Returns:
      ``(out [B, m, H, d], lse [B, m, H])``, the LSE float32 (float64 for float64 inputs).
    """
    B, m, H, d = q.shape
    mods = Mods(bool(is_causal), float(dropout_rate), int(pattern))
    spec = make_spec(q.dtype, d, scale, mods.causal, mods.dropout_rate, lse_cotangent=True)
    return _block(spec, mods, q, k, v, aligned_coords(B, m, H) if coords is None else coords)
