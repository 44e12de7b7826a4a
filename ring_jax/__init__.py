"""Ring dilated attention in JAX: exact LongNet dilated attention, on one device or sharded.

Shapes everywhere: ``[batch, seq, heads, head_dim]``.

Layout (one file per step; lower layers never import higher ones):
  ``_config``     pattern config (frozen, self-validating) and input checks
  ``_layout``     the contiguous and balanced token placements of a sharded sequence
  ``_plan``       static NumPy plan of units and layers, memoised at trace time
  ``_dropout``    the counter hash shared with ``ring_torch``
  ``_coords``     a block's global coordinates; causal, dropout and padding masks derived in one place
  ``_pallas``     Pallas flash kernels for one block (Triton on GPU, the interpreter elsewhere)
  ``_kernels``    block kernels behind one protocol (XLA reference; ``_cudnn``: cuDNN flash behind a
                  version-checked adapter; ``_pallas``), chosen once per call into a ``BlockSpec``
  ``_rows``       strided gathers and scatters, one unit through the kernel, the LSE merge
  ``_dilated``    one device, one pass: ``custom_vjp``s with saved outputs or kept rows
  ``_chunked``    one device in chunks: ``custom_vjp`` keeping only q, k, v
  ``_ring_plan``  each unit as one device of a sharded sequence sees it
  ``_ring``       the ring unit: ``ppermute`` (or simulated) hops with their own backward
  ``_api``        the public functions: validation, mode and kernel chosen once
  ``_decode``     cached decoding: a constant-size cache of the current segments (beside ``_api``)
  ``nnx``, ``linen``, ``_attention_fn``, ``_module_config``  Flax layers and the ``attention_fn`` adapter
"""

from ring_jax._api import dilated_attention, ring_dilated_attention, sharded_dilated_attention
from ring_jax._attention_fn import make_attention_fn
from ring_jax._config import DilatedConfig
from ring_jax._decode import DecodeCache, decode, init_cache
from ring_jax._kernels import block_attention, get_block_kernel, set_block_kernel
from ring_jax._layout import from_balanced, to_balanced
from ring_jax._plan import Plan, build_count, get_plan
from ring_jax._ring_plan import RingPlan, get_ring_plan

__all__ = [
    "DecodeCache",
    "DilatedConfig",
    "Plan",
    "RingPlan",
    "block_attention",
    "build_count",
    "decode",
    "dilated_attention",
    "from_balanced",
    "get_block_kernel",
    "get_plan",
    "get_ring_plan",
    "init_cache",
    "make_attention_fn",
    "ring_dilated_attention",
    "set_block_kernel",
    "sharded_dilated_attention",
    "to_balanced",
]


def __getattr__(name):
    """``ring_jax.nnx`` / ``ring_jax.linen`` (the Flax layers) import flax on first access."""
    if name in ("nnx", "linen"):
        import importlib

        return importlib.import_module(f"ring_jax.{name}")
    raise AttributeError(f"module 'ring_jax' has no attribute {name!r}")
