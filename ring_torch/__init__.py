"""PyTorch dilated attention (LongNet), held to the float64 oracle in ``parity_tests.oracle``.

Tensors are ``[batch, seq, heads, head_dim]``. This package never imports jax. Its files, each
importing only the ones above it:

* ``_config``: the validated configuration and the input shape checks.
* ``_plan``: the static, cached plan of kernel calls (units) and the plan/mask caches.
* ``_dropout``: the counter-hash dropout keep-mask (shared bit for bit with ``ring_jax``).
* ``_coords``: a block's global coordinates and the one function deriving its masks.
* ``_aten``: adapters of torch's (and xformers') fused kernels, exact in the LSE gradient.
* ``_kernels``: the kernels (math, torch, xformers) behind one protocol, and backend dispatch.
* ``_rows``: strided row views and gathers, blank results, the LSE merges and a call's padding.
* ``_dilated``: one device: the executors (fused or autograd) and the fused autograd Function.
* ``_runs``: independent pieces of one call (spans, batch entries) as one fused autograd node.
* ``_api``: the single-device entry point ``dilated_attention``: checks, backend, spans.
* ``_decode``: cached decoding from a constant-size cache of the current segments.
* ``_layout``: the ring layouts (contiguous, balanced): the permutations, the balanced rules
  and each spanning unit's per-hop block schedule.
* ``_ring_plan``: how the units run on ranks (local or spanning sub-rings).
* ``_comm``: the communicators (point-to-point, all-gather, simulated) and their stats.
* ``_consistency``: the cross-rank consistency check every distributed call makes first.
* ``_ring_unit``: one spanning unit's forward and backward over its sub-ring.
* ``_ring``: the ring layer, ``ring_dilated_attention``.
* ``_module``: the ``nn.Module`` wrappers.
"""

from ring_torch._comm import CommStats
from ring_torch._consistency import RingCheckError
from ring_torch._config import DilatedConfig
from ring_torch._decode import DecodeCache, decode, init_cache
from ring_torch._api import dilated_attention
from ring_torch._kernels import select_backend
from ring_torch._layout import from_balanced, to_balanced
from ring_torch._module import MultiheadDilatedAttention, RingDilatedAttention
from ring_torch._plan import DilatedPlan, Unit, build_plan, get_stats, plan_flops
from ring_torch._ring import ring_dilated_attention
from ring_torch._ring_plan import RingPlan, RingUnit, build_ring_plan

__all__ = ["dilated_attention", "DilatedConfig", "DilatedPlan", "Unit", "build_plan",
           "plan_flops", "get_stats", "select_backend", "ring_dilated_attention", "CommStats",
           "RingPlan", "RingUnit", "build_ring_plan", "RingDilatedAttention",
           "MultiheadDilatedAttention", "DecodeCache", "init_cache", "decode", "RingCheckError",
           "to_balanced", "from_balanced"]
