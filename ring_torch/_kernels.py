"""Block attention kernels returning the log-sum-exp, behind one small protocol, and the backend
dispatch.

Every kernel maps ``q [B, m, H, d]``, ``k``/``v [B, m, H_kv, d]`` (``H % H_kv == 0``; query head
``j`` reads kv head ``j // (H // H_kv)``) to ``out [B, m, H, d]`` in ``q``'s dtype and
``lse [B, m, H]`` in float32 (float64 for float64 inputs). Rows are never empty here: the layer
only sends selected rows, and causal rows always see their own key. The block's masks come from
its :class:`ring_torch._coords.BlockCoords`.

Kernels (:data:`KERNELS`, one per backend; :func:`kernel_for` picks one per call):

* :class:`~ring_torch._math_kernel.MathKernel` (``math``, :mod:`ring_torch._math_kernel`):
  plain matmuls in float32 or better, any dtype, any mask; autograd differentiates it exactly.
  Its backward is the float32 formula from the rows' global ``(out, lse)``.
* :class:`TorchKernel` (``torch``): torch's fused kernels (:mod:`ring_torch._aten`; CPU:
  ``aten._scaled_dot_product_flash_attention_for_cpu``; CUDA: cuDNN's flash attention on sm90+,
  FlashAttention-2 on sm80+, else the memory-efficient kernel: :func:`cuda_kernel` decides). No
  dropout, no key mask: non-causal padding, ``segment_ids`` documents and dropout run the math
  kernel, except where the table names rows kernels with a backward (on one device; in rings on
  cards in :data:`ROWS_TESTED` ``"ring"``): there both rows kernels mask by the rows' ids
  (:attr:`~TorchKernel.masks`) and, on cards in :data:`ROWS_TESTED` ``"dropout"``, draw dropout
  (:attr:`~TorchKernel.dropout`; :func:`kernel_for`).
  Its backward is the fused kernel's, fed the global ``(out, lse)``, in the input dtype
  (:attr:`~TorchKernel.fused_backward`). Where :func:`rows_config` names a configuration (CUDA,
  measured faster on that card) its forward outside autograd, and its backward where the
  configuration has one, are :mod:`ring_torch._triton_rows`, reading and writing the strided rows
  in place (:attr:`~TorchKernel.rows`).
* :class:`XFormersKernel` (``xformers``): CUDA only, xformers' forward; no dropout; the backward
  from a global LSE is the math formula.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Protocol

import torch

from ring_torch._aten import (CUDNN_MAX_HEAD_DIM, _AtenCPU, _AtenCUDA, _AtenCudnnCUDA, _AtenFlashCUDA, _XFormers,
                              ExactLSE, exact_backward, records_graph)
from ring_torch._config import memo
from ring_torch._coords import BlockCoords, block_ids, dropout_rows
from ring_torch._math_kernel import GradInputs, MathKernel
from ring_torch._triton_grads import grads_into
from ring_torch._triton_rows import GradConfig, RowsConfig, RowsDropout, attend_into
from ring_torch._triton_rows import supports as rows_support

__all__ = ["BACKENDS", "KERNELS", "GradInputs", "Kernel", "MathKernel", "TorchKernel",
           "XFormersKernel", "check_backend", "cuda_kernel", "fused_block_grads", "kernel_for",
           "rows_config", "rows_tested", "select_backend", "xformers_available"]

BACKENDS = ("auto", "math", "torch", "xformers")
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def xformers_available() -> bool:
    """True when xformers imports *and* its memory-efficient kernel runs a tiny forward and
    backward on the current CUDA device (:func:`xformers_runs`): an import alone does not prove
    a build for this torch and GPU, whose ops may raise ``NotImplementedError``. Asked once per
    process, so ``backend="auto"`` never picks a backend that cannot run."""
    if not torch.cuda.is_available():
        return False
    try:
        from xformers.ops import fmha
    except Exception:  # a missing, or a build for another torch, fails in many ways
        return False
    return xformers_runs(fmha, torch.device("cuda"))


def xformers_runs(fmha, device: torch.device) -> bool:
    """Whether ``fmha`` (``xformers.ops.fmha``) runs the forward and backward ring_torch calls on
    a ``[1, 8, 1, 8]`` fp16 problem on ``device``."""
    try:
        q = torch.zeros(1, 8, 1, 8, device=device, dtype=torch.float16)
        out, lse = fmha.memory_efficient_attention_forward_requires_grad(q, q, q, attn_bias=None, scale=1.0)
        fmha.memory_efficient_attention_backward(out, out, lse, q, q, q, attn_bias=None, scale=1.0)
    except Exception:  # NotImplementedError (no kernel for this build/GPU), RuntimeError, ...
        return False
    return True


def select_backend(device_type: str, dtype: torch.dtype,
                   capability: tuple[int, int] | None = None) -> tuple[str, torch.dtype]:
    """``backend="auto"``: ``(backend, compute_dtype)`` for a device type, input dtype and, on
    CUDA, the compute capability.

    * float64 anywhere: ``math`` (the exactness path).
    * CPU: ``torch`` in the input dtype (the CPU flash kernel takes fp32, bf16 and fp16).
    * CUDA sm80+: ``torch`` in the input dtype, never ``xformers``: xformers 0.0.35 (built from
      its sdist for torch 2.11, H200) measured no faster in the
      forward (its fmha dispatches to the same aten flash kernel) and 1.6-2.7x slower forward+
      backward (``benchmarks/results/h200_xformers_2026-11-30.json``); it runs only when asked for.
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
            return "torch", dtype
        return "torch", torch.float32
    return "math", dtype


def cuda_kernel(dtype: torch.dtype, head_dim: int, capability: tuple[int, int], cudnn: bool = True) -> str:
    """Which fused kernel ``backend="torch"`` runs on CUDA:

    * ``"cudnn"``: cuDNN's flash attention (fp16/bf16, sm90+, ``head_dim % 8 == 0`` and
      ``<= 128``; ``cudnn``: whether torch has cuDNN 9+). On an H200 it measured 1.5x faster
      than FlashAttention-2 forward and faster forward+backward at head_dim 64 and 128
      (``benchmarks/results/h200_torch_kernels_2026-12-01.json``).
    * ``"flash"``: FlashAttention-2 (fp16/bf16, sm80+, ``head_dim % 8 == 0`` and ``<= 256``).
    * ``"efficient"``: the memory-efficient kernel (any card from sm50, fp32 too, any head_dim
      after padding to a multiple of 8)."""
    half = dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0
    if half and cudnn and tuple(capability) >= (9, 0) and head_dim <= CUDNN_MAX_HEAD_DIM:
        return "cudnn"
    if half and tuple(capability) >= (8, 0) and head_dim <= 256:
        return "flash"
    return "efficient"


# The Triton rows kernels' configuration per (compute capability, head_dim), for fp16/bf16: only
# where they measured faster than the aten kernel plus its row copies. H200, head_dim 64, bf16:
# - forward (python -m benchmarks.triton_rows, h200_triton_rows_2026-12-01.json): longnet 1.44-1.56x
#   faster from 256K to 4M (the kernel merges each pattern into the float32 accumulators);
#   head_groups written in place within -8%..+2% of cuDNN plus row copies;
# - backward (python -m benchmarks.triton_grads, h200_triton_grads_2026-12-02.json): longnet
#   forward+backward 0.99-1.01x the time of cuDNN's backward from 256K (0.77x at 16K) and 9248
#   B/token at its peak from 16K (cuDNN: 9248 from 4M, 12206 at 256K); head_groups 1.08-1.14x slower
#   from 256K (0.91x at 16K) for 5160 B/token instead of 5519-6960.
# So head_groups keep cuDNN both ways (in_place_heads=False).
ROWS_CONFIGS: dict[tuple[tuple[int, int], int], RowsConfig] = {
    ((9, 0), 64): RowsConfig(block_m=64, block_n=64, num_warps=4, num_stages=3, tma=True, in_place_heads=False,
                             backward=GradConfig(dkv_block_m=32, dkv_block_n=128, dq_block_m=128, dq_block_n=64,
                                                 num_warps=4, num_stages=3)),
}


def rows_config(dtype: torch.dtype, head_dim: int, capability: tuple[int, int]) -> RowsConfig | None:
    """The :data:`ROWS_CONFIGS` entry ``backend="torch"`` runs its forward with on this card, or
    None (the aten kernel and row copies)."""
    if dtype not in (torch.float16, torch.bfloat16) or not rows_support(dtype, head_dim):
        return None
    return ROWS_CONFIGS.get((tuple(capability), head_dim))


@memo(maxsize=1)
def cudnn_attention_available() -> bool:
    """Whether this torch build has cuDNN 9 or later (cuDNN's fused attention)."""
    return torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000


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




class Kernel(Protocol):
    """What the layers ask of a kernel (one instance per call, for its device, dtype, head_dim)."""

    name: str
    fused_backward: bool  # its backward takes the global (out, lse) in the input dtype
    rows: RowsConfig | None  # set: forward_into writes the rows in place (no autograd graph)
    masks: bool  # forward_into / backward_into take document ids (run only on one device)

    @classmethod
    def supports(cls, dtype: torch.dtype, device_type: str, head_dim: int, needs_dropout: bool,
                 needs_key_mask: bool = False) -> bool: ...

    @classmethod
    def create(cls, device: torch.device, dtype: torch.dtype, head_dim: int) -> Kernel: ...

    def forward(self, q, k, v, scale: float, coords: BlockCoords) -> tuple[torch.Tensor, torch.Tensor]:
        """``q [B, m, H, d]``, ``k``/``v [B, m, H_kv, d]`` -> ``out [B, m, H, d]`` (q's dtype),
        ``lse [B, m, H]`` (float32+), differentiable by autograd."""

    def forward_into(self, q, k, v, out, lse, scale: float, coords: BlockCoords,
                     fill: tuple[int, int] | None = None, merge: bool = False, ids=None):
        """Where :attr:`rows` is set: the forward written into the views ``out``/``lse`` (None:
        not written) outside autograd; ``fill=(rate, offset)`` also writes the positions between
        the rows; ``merge``: merged into the float32 ``out``/``lse`` there; ``ids [B, m]``: the
        rows' document ids (:attr:`masks`) (:func:`ring_torch._triton_rows.attend_into`)."""

    def backward_into(self, q, k, v, out, lse, dout, dlse, dq, dk, dv, scale: float, coords: BlockCoords,
                      accumulate_q: bool = False, accumulate_kv: bool = False, ids=None):
        """Where :attr:`rows` has a ``backward``: one unit's ``(dq, dk, dv)`` from its rows' global
        ``(out, lse)`` written (or added, ``accumulate_*``) into the views ``dq``, ``dk``, ``dv``;
        ``k``/``v`` with their own kv heads; ``ids`` as in :meth:`forward_into`
        (:func:`ring_torch._triton_grads.grads_into`)."""

    def grad_inputs(self, q, out, lse, dout, dlse) -> GradInputs:
        """The backward operands of a whole unit, once: ``q``, the float32+ global ``out``,
        ``lse`` and the cotangents ``dout``, ``dlse`` (None: zero)."""

    def backward(self, g: GradInputs, k, v, scale: float, coords: BlockCoords):
        """``(dq, dk, dv)`` of one block from its rows' global ``(out, lse)``; ``k``/``v``
        ``[B, m, H, d]`` one row per query head, gradients likewise per query head."""


class XFormersKernel(MathKernel):
    """``xformers``: its fused forward (CUDA, no dropout); the backward from a global LSE is
    :class:`MathKernel`'s formula (xformers' takes only its own LSE)."""

    name = "xformers"

    @classmethod
    def supports(cls, dtype, device_type, head_dim, needs_dropout, needs_key_mask=False) -> bool:
        # xformers 0.0.35 has no 16-bit operator for head_dim % 8 != 0 (measured on an H200)
        head_dim_ok = dtype == torch.float32 or head_dim % 8 == 0
        return (device_type == "cuda" and dtype in _FUSED_DTYPES and head_dim_ok
                and not (needs_dropout or needs_key_mask))

    def forward(self, q, k, v, scale, coords):
        group = q.shape[2] // k.shape[2]
        if group > 1:  # equal head counts; autograd sums the repeats back
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        return ExactLSE.apply(q, k, v, _XFormers, scale, coords.is_causal)


def _refuse_dropout(coords: BlockCoords):
    """``RuntimeError`` for a block with dropout in a kernel that draws none (it would be left out
    silently: :func:`kernel_for` never routes such a call there)."""
    if coords.spec.dropout is not None:
        raise RuntimeError("a call with dropout reached a torch kernel that does not draw it")


class TorchKernel:
    """``torch``: the aten fused kernel for the call's device, dtype and head_dim (chosen once);
    causal as the only mask. ``masks`` / ``dropout``: the Triton rows kernels (``rows``, both ways,
    every mix) take the rows' document ids / draw dropout, in place on one device and for every
    block (a ring hop's too: :meth:`forward`, :meth:`backward`) (:func:`kernel_for`)."""

    name = "torch"
    fused_backward = True

    def __init__(self, aten, rows: RowsConfig | None = None, masks: bool = False, dropout: bool = False):
        if (masks or dropout) and (rows is None or rows.backward is None or not rows.in_place_heads):
            flag = "masks" if masks else "dropout"
            raise ValueError(f"{flag}=True needs rows kernels both ways for every mix, got {rows=}")
        self.aten = aten
        self.rows = rows
        self.masks = masks
        self.dropout = dropout

    def _rows_dropout(self, coords: BlockCoords, device) -> RowsDropout | None:
        """The rows kernels' dropout of a block; ``RuntimeError`` where the call has dropout and
        this kernel does not draw it (it would be left out silently)."""
        if coords.spec.dropout is None:
            return None
        if not self.dropout:
            _refuse_dropout(coords)
        return RowsDropout(*dropout_rows(coords, device), coords.spec.dropout.p)

    @classmethod
    def supports(cls, dtype, device_type, head_dim, needs_dropout, needs_key_mask=False) -> bool:
        dtypes = {"cpu": _FUSED_DTYPES + (torch.float64,), "cuda": _FUSED_DTYPES}.get(device_type, ())
        return dtype in dtypes and not (needs_dropout or needs_key_mask)

    @classmethod
    def create(cls, device: torch.device, dtype: torch.dtype, head_dim: int) -> TorchKernel:
        if device.type == "cpu":
            return cls(_AtenCPU)
        capability = torch.cuda.get_device_capability(device)
        name = cuda_kernel(dtype, head_dim, capability, cudnn_attention_available())
        return cls(CUDA_ATEN[name], rows_config(dtype, head_dim, capability))

    def _block_masks(self, coords: BlockCoords, device) -> dict:
        """The rows kernels' ``ids``, ``key_ids`` and ``dropout`` of a block, from its coordinates."""
        ids = block_ids(coords, device) if self.masks else None
        q_ids, k_ids = ids if ids is not None else (None, None)
        return dict(ids=q_ids, key_ids=k_ids, dropout=self._rows_dropout(coords, device))

    def forward(self, q, k, v, scale, coords):
        if self.masks or self.dropout:  # the rows kernels on dense blocks (a ring hop's)
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
            return attend_into(q, k, v, out, lse, scale, coords.is_causal, self.rows,
                               **self._block_masks(coords, q.device))
        _refuse_dropout(coords)
        if self.aten is not _AtenCPU:
            group = q.shape[2] // k.shape[2]
            if group > 1:  # these kernels want equal head counts; autograd sums the repeats back
                k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        if records_graph(q, k, v):
            return ExactLSE.apply(q, k, v, self.aten, scale, coords.is_causal)
        return self.aten.forward(q, k, v, scale, coords.is_causal)[:2]  # no graph: the kernel alone

    def forward_into(self, q, k, v, out, lse, scale, coords, fill=None, merge=False, ids=None):
        attend_into(q, k, v, out, lse, scale, coords.is_causal, self.rows, fill, merge, ids,
                    self._rows_dropout(coords, q.device))

    def backward_into(self, q, k, v, out, lse, dout, dlse, dq, dk, dv, scale, coords,
                      accumulate_q=False, accumulate_kv=False, ids=None):
        grads_into(q, k, v, out, lse, dout, dlse, dq, dk, dv, scale, coords.is_causal, self.rows.backward,
                   accumulate_q, accumulate_kv, ids, self._rows_dropout(coords, q.device))

    def grad_inputs(self, q, out, lse, dout, dlse) -> GradInputs:
        """Operands in ``q``'s dtype (``lse`` stays float32+); ``dout`` None: zero; ``dlse``
        None stays None (the kernel's backward as is), else zeroed where ``lse`` is not finite."""
        dout = torch.zeros(out.shape, dtype=q.dtype, device=out.device) if dout is None else dout.to(q.dtype)
        if dlse is not None:
            dlse = dlse.to(lse.dtype)
            dlse = torch.where(torch.isfinite(lse), dlse, torch.zeros_like(dlse))
        return GradInputs(q, out.to(q.dtype), lse, dout, dlse, None)

    def backward(self, g, k, v, scale, coords):
        """``(dq, dk, dv)`` per query head in ``q``'s dtype (:func:`fused_block_grads`; the rows
        kernels where this kernel masks or drops)."""
        if self.masks or self.dropout:
            grads = tuple(torch.empty(x.shape, dtype=g.q.dtype, device=x.device) for x in (g.q, k, v))
            return grads_into(g.q, k, v, g.out, g.lse, g.dout, g.dlse, *grads, scale, coords.is_causal,
                              self.rows.backward, **self._block_masks(coords, g.q.device))
        _refuse_dropout(coords)
        return fused_block_grads(g.dout, g.q, k, v, g.out, g.lse, g.dlse, scale=scale,
                                 is_causal=coords.is_causal, aten=self.aten)


CUDA_ATEN = {"cudnn": _AtenCudnnCUDA, "flash": _AtenFlashCUDA, "efficient": _AtenCUDA}
KERNELS: dict[str, type] = {"math": MathKernel, "torch": TorchKernel, "xformers": XFormersKernel}


def kernel_for(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int,
               needs_dropout: bool, needs_key_mask: bool = False, rows_masks: bool = False) -> Kernel:
    """The kernel of a resolved ``backend`` for one call's inputs (compute ``dtype``);
    :class:`MathKernel` where that backend cannot take them (dropout; a key mask, which
    non-causal calls with padding and calls with ``segment_ids`` need), except that with
    ``rows_masks`` (one device: every block's keys are its own rows; in a ring where
    :func:`rows_tested` ``"ring"``) ``backend="torch"`` takes a key mask, and dropout where
    :func:`rows_tested` ``"dropout"``, by the Triton rows kernels, both ways and for every mix,
    where :func:`rows_config` names them with a backward."""
    cls = KERNELS[backend]
    if cls.supports(dtype, device.type, head_dim, needs_dropout, needs_key_mask):
        return cls.create(device, dtype, head_dim)
    rows_route = (needs_key_mask or needs_dropout) and device.type == "cuda"
    rows_route = rows_route and (rows_masks or rows_tested("ring", device))
    if cls is TorchKernel and rows_route and (not needs_dropout or rows_tested("dropout", device)):
        kernel = cls.create(device, dtype, head_dim)
        if kernel.rows is not None and kernel.rows.backward is not None:
            return cls(kernel.aten, replace(kernel.rows, in_place_heads=True), masks=needs_key_mask,
                       dropout=needs_dropout)
    return MathKernel.create(device, dtype, head_dim)


# Per feature of the rows kernels, the compute capabilities where its compiled kernels have passed
# their GPU tests (pytest -m cuda): "dropout" (ring_torch._triton_dropout,
# parity_tests/test_triton_dropout.py) and "ring" (ring hops' blocks with separate key rows and
# ids, parity_tests/test_triton_ring_blocks.py). Elsewhere such calls run the math kernel. The
# interpreter runs the same kernel bodies in the CPU tests.
ROWS_TESTED: dict[str, set[tuple[int, int]]] = {"dropout": set(), "ring": set()}


def rows_tested(feature: str, device: torch.device) -> bool:
    """Whether ``backend="torch"`` may route ``feature`` (a key of :data:`ROWS_TESTED`) to the
    rows kernels on this CUDA device."""
    return tuple(torch.cuda.get_device_capability(device)) in ROWS_TESTED[feature]


def fused_block_grads(dout, q, k, v, out, lse, dlse=None, *, scale: float, is_causal: bool, aten):
    """``(dq, dk, dv)`` of one block by the fused backward kernel ``aten``, given the rows'
    *global* ``out [B, m, H, d]``, ``lse [B, m, H]`` and cotangents ``dout``, ``dlse`` (None:
    zero): a ring block's share of a merged attention, since the kernel's ``P = exp(S - lse)`` and
    ``D = rowsum(dO * O)`` are then the global ones. ``k``/``v`` have ``H`` heads."""
    dout, k, v, out = (x.to(q.dtype) for x in (dout, k, v, out))
    return exact_backward(aten, dout, dlse, q, k, v, out, aten.saved_from_lse(lse, q), scale, is_causal)
