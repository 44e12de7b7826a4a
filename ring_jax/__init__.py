"""Ring dilated attention in JAX: exact LongNet dilated attention, on one device or sharded.

Shapes everywhere: ``[batch, seq, heads, head_dim]``.

Layout (one file per algorithm step):
  ``_config``  pattern config (frozen, self-validating) and input checks
  ``_plan``    static NumPy plan, memoised at trace time
  ``_kernels`` block attention returning ``(out, lse)`` with an exact backward (XLA reference;
               ``_cudnn``: cuDNN flash on CUDA, behind a version-checked adapter)
  ``_dropout`` the counter-hash dropout mask shared with ``ring_torch``
  ``_dilated`` one device: strided gather → block attention → scatter → LSE merge
  ``_ring``    sharded: sub-rings of ``ppermute`` hops over the selected rows, custom backward
  ``nnx``, ``linen``, ``_attention_fn``  Flax layers and the ``attention_fn`` adapter
"""

from ring_jax._attention_fn import make_attention_fn
from ring_jax._config import DilatedConfig
from ring_jax._dilated import dilated_attention
from ring_jax._kernels import block_attention, get_block_kernel, set_block_kernel
from ring_jax._plan import Plan, build_count, get_plan
from ring_jax._ring import RingPlan, get_ring_plan, ring_dilated_attention, sharded_dilated_attention

__all__ = [
    "DilatedConfig",
    "Plan",
    "RingPlan",
    "block_attention",
    "build_count",
    "dilated_attention",
    "get_block_kernel",
    "get_plan",
    "get_ring_plan",
    "make_attention_fn",
    "ring_dilated_attention",
    "set_block_kernel",
    "sharded_dilated_attention",
]


def __getattr__(name):
    """``ring_jax.nnx`` / ``ring_jax.linen`` (the Flax layers) import flax on first access."""
    if name in ("nnx", "linen"):
        import importlib

        return importlib.import_module(f"ring_jax.{name}")
    raise AttributeError(f"module 'ring_jax' has no attribute {name!r}")
