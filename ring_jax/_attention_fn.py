"""One entry point from the Flax layers to the core, and ``make_attention_fn`` for Flax's own
attention modules.

Everything here is plain JAX (no flax import): ``import ring_jax`` stays free of flax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ring_jax._api import check_chunk_type, dilated_attention, sharded_dilated_attention
from ring_jax._config import DilatedConfig, check_bool, check_ring_size
from ring_jax._layout import check_layout

__all__ = ["make_attention_fn", "seed_from_key", "attend", "check_placement"]


def seed_from_key(key) -> jax.Array:
    """A uint32 scalar dropout seed from a JAX PRNG key (raw ``uint32[2]`` or typed)."""
    return jax.random.bits(key, dtype=jnp.uint32)


def check_placement(mesh, ring_size, chunk_size=None, layout="contiguous") -> None:
    """At most one way of cutting the sequence: a mesh ring, a simulated ring or chunks; a known
    ``layout`` of the ring."""
    check_layout(layout)
    ring_size = check_ring_size(ring_size)
    if mesh is not None and ring_size is not None and ring_size > 1:
        raise ValueError(f"{ring_size=} simulates a ring on one device; with a mesh the ring is "
                         f"the mesh axis: pass one of them")
    check_chunk_type(chunk_size)
    if chunk_size is not None and (mesh is not None or (ring_size is not None and ring_size > 1)):
        raise ValueError(f"{chunk_size=} runs one device's sequence in chunks; it does not combine "
                         f"with a mesh or ring_size={ring_size}: pass one of them")


def check_dropout_rate(rate) -> float:
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout={rate} must be in [0, 1)")
    return rate


def attend(query, key, value, *, config: DilatedConfig, is_causal: bool = False, mesh=None,
           seq_axis="sp", batch_axis=None, ring_size=None, chunk_size=None, dropout_rate: float = 0.0,
           dropout_seed=None, seq_lengths=None, layout="contiguous", segment_ids=None):
    """Dilated attention of ``[b, n, h, d]`` arrays with the pattern of ``config``: the single
    device core (in chunks with ``chunk_size``), the simulated ring (``ring_size``) or the mesh
    ring (``mesh``), the rings' devices holding the sequence in ``layout``.

    ``dropout_rate > 0`` needs ``dropout_seed`` (the core checks both); the dropout arguments
    are passed to the core only when dropout is on. ``seq_lengths [b]``: per-example lengths
    (positions past them are padding), ``segment_ids [b, n]``: packed documents, as in the core."""
    kwargs = dict(segment_lengths=config.segment_lengths, dilation_rates=config.dilation_rates,
                  mix=config.mix, is_causal=check_bool("is_causal", is_causal) or config.is_causal,
                  softmax_scale=config.softmax_scale, seq_lengths=seq_lengths, layout=layout,
                  segment_ids=segment_ids)
    if dropout_rate > 0.0:
        kwargs.update(dropout_rate=float(dropout_rate), dropout_seed=dropout_seed)
    if mesh is not None:
        return sharded_dilated_attention(query, key, value, mesh=mesh, seq_axis=seq_axis,
                                         batch_axis=batch_axis, **kwargs)
    return dilated_attention(query, key, value, ring_size=ring_size, chunk_size=chunk_size, **kwargs)


def make_attention_fn(segment_lengths, dilation_rates, *, mix="head_groups", is_causal=False,
                      softmax_scale=None, ring_size=None, mesh=None, seq_axis="sp",
                      batch_axis=None, chunk_size=None, layout="contiguous"):
    """An ``attention_fn`` for ``flax.nnx.MultiHeadAttention`` and
    ``flax.linen.MultiHeadDotProductAttention`` that runs dilated attention.

    The returned function takes Flax's projected ``query [batch, seq, heads, head_dim]`` and
    ``key``/``value`` (same batch and length; ``heads`` a multiple of their heads) and the
    keywords Flax passes (NNX passes all of them, Linen those named in the signature):

    * ``mask``/``bias``: must be None (dilated attention has its own sparsity; an arbitrary mask
      or bias cannot be honoured, so it is refused with ``ValueError`` rather than ignored). For
      a causal layer pass ``is_causal=True`` here or at the NNX call, not a causal mask.
    * ``dropout_rate``, ``dropout_rng``, ``deterministic``: attention-probability dropout of
      the core (hashed mask, seed ``jax.random.bits(dropout_rng, uint32)``), off when
      ``deterministic`` or ``dropout_rate == 0``. ``broadcast_dropout`` has no effect: the mask
      is drawn per (batch, head, query, key).
    * ``is_causal`` (NNX): or-ed with this factory's ``is_causal``.
    * ``dtype``: q/k/v are cast to it (else promoted to their common dtype); ``precision`` is
      ignored (the core uses the input precision).
    * ``module`` (``sow_weights``): refused, the dilated weights are never materialised.
    * ``seq_lengths`` (not passed by Flax): per-example lengths ``[batch]`` (positions past them
      are padding, as in :func:`ring_jax.dilated_attention`); bind it with ``functools.partial``
      (``layer.attention_fn = functools.partial(fn, seq_lengths=lengths)``) or a closure;
      ``segment_ids [batch, seq]`` (packed documents) likewise.

    ``ring_size`` runs the simulated ring on one device; ``mesh`` the ring over
    ``mesh[seq_axis]`` (global arrays in and out, :func:`ring_jax.sharded_dilated_attention`);
    ``chunk_size`` runs one device's sequence in independent chunks (bounded memory, see
    :func:`ring_jax.dilated_attention`); ``layout``: ``"contiguous"`` or ``"balanced"`` placement
    of the rings' tokens (arrays stay in natural order).
    """
    config = DilatedConfig(segment_lengths, dilation_rates, mix, is_causal, softmax_scale)
    check_placement(mesh, ring_size, chunk_size, layout)

    def dilated_attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                             dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                             precision=None, module=None, is_causal=False, seq_lengths=None, segment_ids=None,
                             **unused):
        del broadcast_dropout, precision, unused
        if mask is not None:
            raise ValueError(
                f"dilated attention cannot apply an arbitrary attention mask (got one of shape "
                f"{tuple(jnp.shape(mask))}); its sparsity comes from segment_lengths/"
                f"dilation_rates. Pass mask=None (is_causal=True for a causal layer)")
        if bias is not None:
            raise ValueError(f"dilated attention cannot add an attention bias (got one of shape "
                             f"{tuple(jnp.shape(bias))}); pass bias=None")
        if module is not None:
            raise ValueError("sow_weights is not supported with dilated attention: the attention "
                             "weights are never materialised")
        if query.ndim != 4:
            raise ValueError(f"dilated attention needs query [batch, seq, heads, head_dim] (one "
                             f"batch dimension), got shape {tuple(query.shape)}")
        dt = jnp.dtype(dtype) if dtype is not None else jnp.result_type(query, key, value)
        query, key, value = (x.astype(dt) for x in (query, key, value))
        rate = check_dropout_rate(dropout_rate)
        seed = None
        if rate > 0.0 and not deterministic:
            if dropout_rng is None:
                raise ValueError("dropout_rate > 0 and deterministic=False need a dropout_rng")
            seed = seed_from_key(dropout_rng)
        else:
            rate = 0.0
        return attend(query, key, value, config=config, is_causal=is_causal, mesh=mesh,
                      seq_axis=seq_axis, batch_axis=batch_axis, ring_size=ring_size,
                      chunk_size=chunk_size, dropout_rate=rate, dropout_seed=seed, seq_lengths=seq_lengths,
                      layout=layout, segment_ids=segment_ids)

    return dilated_attention_fn
