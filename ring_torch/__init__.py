"""PyTorch dilated attention (LongNet), held to the float64 oracle in ``parity_tests.oracle``.

Tensors are ``[batch, seq, heads, head_dim]``. This package never imports jax.
"""

from ring_torch._config import DilatedConfig
from ring_torch._dilated import dilated_attention
from ring_torch._kernels import select_backend
from ring_torch._module import MultiheadDilatedAttention, RingDilatedAttention
from ring_torch._plan import DilatedPlan, Unit, build_plan, get_stats, plan_flops
from ring_torch._ring import CommStats, RingPlan, RingUnit, build_ring_plan, ring_dilated_attention

__all__ = ["dilated_attention", "DilatedConfig", "DilatedPlan", "Unit", "build_plan",
           "plan_flops", "get_stats", "select_backend", "ring_dilated_attention", "CommStats",
           "RingPlan", "RingUnit", "build_ring_plan", "RingDilatedAttention",
           "MultiheadDilatedAttention"]
