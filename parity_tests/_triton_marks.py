"""Where the Triton kernels' tests run: ``CPU`` (Triton's interpreter, ``TRITON_INTERPRET=1``, set
by the conftest where no NVIDIA device exists) and ``CUDA`` (compiled, ``-m cuda``) as pytest
params of a ``device`` argument; :func:`interpreted` and :data:`needs_interpreter` for the rest."""

from __future__ import annotations

import pytest
import torch

from ring_torch._triton_rows import triton_available

if triton_available():
    from ring_torch._triton_rows import interpreted
else:  # pragma: no cover - depends on the install
    def interpreted():
        return False

__all__ = ["CPU", "CUDA", "interpreted", "needs_cuda", "needs_interpreter"]

needs_interpreter = pytest.mark.skipif(not (triton_available() and interpreted()),
                                       reason="triton's interpreter (TRITON_INTERPRET=1) absent")
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and triton")
CPU = pytest.param("cpu", marks=needs_interpreter)
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])
