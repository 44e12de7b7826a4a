"""Flax NNX layers: the dilated-attention core, and LongNet's multi-head dilated attention layer.

``DilatedAttention`` has no parameters; ``MultiHeadDilatedAttention`` mirrors
``ring_torch.MultiheadDilatedAttention`` (same parameters, names, initialisation and
function: ``parity_tests/bridge.py`` copies one into the other).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ring_jax._attention_fn import attend, check_dropout_rate, check_placement, seed_from_key
from ring_jax._decode import decode as decode_step, init_cache as init_decode_cache
from ring_jax._module_config import (check_heads, pattern_config, resolve_deterministic,
                                     multihead_forward, xavier_normal)

__all__ = ["DilatedAttention", "MultiHeadDilatedAttention"]


def _fork(rngs, rate: float):
    """The dropout stream of ``rngs`` (as ``nnx.Dropout``): None without dropout or rngs."""
    if rate == 0.0 or rngs is None:
        return nnx.data(None)
    if isinstance(rngs, nnx.Rngs):
        return rngs["dropout"].fork()
    if isinstance(rngs, nnx.RngStream):
        return rngs.fork()
    raise TypeError(f"rngs must be a Rngs, RngStream or None, but got {type(rngs)}")


def _key(rngs):
    if isinstance(rngs, nnx.Rngs):
        return rngs["dropout"]()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    if isinstance(rngs, jax.Array):
        return rngs
    raise TypeError(f"rngs must be a Rngs, RngStream or a key array, but got {type(rngs)}")


class DilatedAttention(nnx.Module):
    """Dilated attention (LongNet) over ``[batch, seq, heads, head_dim]`` arrays; no parameters.

    The pattern is ``self.config`` (a frozen :class:`ring_jax.DilatedConfig`; causality is the
    call's ``is_causal``). ``mesh``: the ring over ``mesh[seq_axis]``
    (:func:`ring_jax.sharded_dilated_attention`, global arrays in and out; ``layout``:
    ``"contiguous"`` or ``"balanced"`` placement of the ring's tokens); ``ring_size``: the
    simulated ring on one device; otherwise :func:`ring_jax.dilated_attention` (with
    ``chunk_size``: in independent chunks, for sequences that do not fit in one pass).

    ``dropout``: attention-probability dropout (the core's hashed mask, seed
    ``jax.random.bits(key, uint32)`` from ``rngs``' ``dropout`` stream), off when
    ``deterministic`` (the call's, else the module's; ``module.eval()`` / ``nnx.view(...,
    deterministic=True)`` set it, as for ``nnx.Dropout``).
    """

    def __init__(self, segment_lengths, dilation_rates, *, mix: str = "head_groups",
                 softmax_scale: float | None = None, dropout: float = 0.0, mesh=None,
                 seq_axis: str = "sp", batch_axis=None, ring_size: int | None = None,
                 chunk_size: int | None = None, deterministic: bool | None = False,
                 rngs: nnx.Rngs | None = None, layout: str = "contiguous"):
        self.config = pattern_config(segment_lengths, dilation_rates, mix, softmax_scale)
        check_placement(mesh, ring_size, chunk_size, layout)
        self.layout = layout
        self.dropout = check_dropout_rate(dropout)
        self.mesh, self.seq_axis, self.batch_axis = mesh, seq_axis, batch_axis
        self.ring_size, self.chunk_size = ring_size, chunk_size
        self.deterministic = deterministic
        self.rngs = _fork(rngs, self.dropout)

    def set_view(self, deterministic: bool | None = None):
        """For ``nnx.view``: ``deterministic=True`` turns dropout off."""
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(self, query, key, value, *, is_causal: bool = False,
                 deterministic: bool | None = None, rngs=None, seq_lengths=None, segment_ids=None):
        """``query [b, n, h, d]``, ``key``/``value [b, n, h_kv, d]`` -> ``[b, n, h, d]``.
        ``segment_ids [b, n]``: packed documents (a query attends only keys of its document).
        ``rngs`` (Rngs, RngStream or key) overrides the module's dropout stream; ``seq_lengths
        [b]``: per-example lengths, positions past them are padding (rows 0, no gradient)."""
        det = resolve_deterministic(deterministic, self.deterministic, self.dropout)
        rate, seed = 0.0, None
        if not det:
            rngs = rngs if rngs is not None else self.rngs
            if rngs is None:
                raise ValueError("dropout is on (deterministic=False) but the module has no "
                                 "rngs: pass rngs= to the constructor or the call")
            rate, seed = self.dropout, seed_from_key(_key(rngs))
        return attend(query, key, value, config=self.config, is_causal=is_causal,
                      mesh=self.mesh, seq_axis=self.seq_axis, batch_axis=self.batch_axis,
                      ring_size=self.ring_size, chunk_size=self.chunk_size, dropout_rate=rate,
                      dropout_seed=seed, seq_lengths=seq_lengths, layout=self.layout, segment_ids=segment_ids)


class MultiHeadDilatedAttention(nnx.Module):
    """LongNet's multi-head dilated attention layer: ``[batch, seq, in_features]`` in and out.

    ``q = q_proj(query)``, ``k = k_proj(key)``, ``v = v_proj(value)`` (``k``/``v`` project to
    ``num_kv_heads * head_dim``: grouped-query attention), split into heads, dilated attention
    (:class:`DilatedAttention`, so ``mesh``/``ring_size``/``chunk_size`` apply), heads concatenated, then
    ``LayerNorm(in_features)`` (MAGNETO's sub-LN, when ``layer_norm``) and ``out_proj``.
    Self-attention when ``key`` and ``value`` are None; cross-attention when given (same shape
    as the query; ``value`` defaults to ``key``).

    Initialisation (MAGNETO, as ``ring_torch.MultiheadDilatedAttention``): xavier normal with
    gain 1 on ``q_proj``/``k_proj`` and ``gamma_init`` on ``v_proj``/``out_proj``, zero biases,
    LayerNorm scale 1 and bias 0. Submodules: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``
    (``nnx.Linear``), ``norm`` (``nnx.LayerNorm`` or None), ``attention``.

    Cached decoding, as ``nnx.MultiHeadAttention``: :meth:`init_cache` once, then
    ``layer(x, decode=True)`` with the next tokens ``x [batch, t, in_features]`` (self-attention,
    causal, no dropout); projections and the LayerNorm run on those tokens only, and ``self.cache``
    (an ``nnx.Cache`` holding a :class:`ring_jax.DecodeCache`) advances by ``t``.
    """

    def __init__(self, num_heads: int, in_features: int, segment_lengths, dilation_rates, *,
                 num_kv_heads: int | None = None, dropout: float = 0.0, use_bias: bool = True,
                 layer_norm: bool = True, layer_norm_eps: float = 1e-5, gamma_init: float = 1.0,
                 mix: str = "head_groups", softmax_scale: float | None = None, mesh=None,
                 seq_axis: str = "sp", batch_axis=None, ring_size: int | None = None,
                 chunk_size: int | None = None, dtype=None, param_dtype=jnp.float32, deterministic: bool | None = False,
                 decode: bool = False, rngs: nnx.Rngs, layout: str = "contiguous"):
        config = pattern_config(segment_lengths, dilation_rates, mix, softmax_scale)
        self.num_kv_heads, self.head_dim = check_heads(in_features, num_heads, num_kv_heads,
                                                       config)
        self.num_heads, self.in_features = num_heads, in_features
        self.gamma_init = float(gamma_init)
        kv_dim = self.num_kv_heads * self.head_dim
        zeros = jax.nn.initializers.zeros

        def linear(out_features, gain):
            return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                              param_dtype=param_dtype, kernel_init=xavier_normal(gain),
                              bias_init=zeros, rngs=rngs)

        self.q_proj = linear(in_features, 1.0)
        self.k_proj = linear(kv_dim, 1.0)
        self.v_proj = linear(kv_dim, self.gamma_init)
        self.norm = (nnx.LayerNorm(in_features, epsilon=layer_norm_eps, dtype=dtype,
                                   param_dtype=param_dtype, use_fast_variance=False, rngs=rngs)
                     if layer_norm else None)
        self.out_proj = linear(in_features, self.gamma_init)
        self.attention = DilatedAttention(
            config.segment_lengths, config.dilation_rates, mix=mix, softmax_scale=softmax_scale,
            dropout=dropout, mesh=mesh, seq_axis=seq_axis, batch_axis=batch_axis,
            ring_size=ring_size, chunk_size=chunk_size, deterministic=deterministic, rngs=rngs, layout=layout)
        self.decode = decode
        self.cache = nnx.data(None)

    def init_cache(self, input_shape, dtype=jnp.float32):
        """An empty decoding cache in ``self.cache`` for inputs ``[batch, ..., in_features]``
        (only the batch is read: the cache size does not depend on the length), stored in
        ``dtype``."""
        self.cache = nnx.Cache(init_decode_cache(
            int(input_shape[0]), self.num_heads, self.num_kv_heads, self.head_dim,
            self.attention.config.segment_lengths, self.attention.config.dilation_rates,
            mix=self.attention.config.mix, dtype=dtype))

    def _decode(self, q, k, v):
        if self.cache is None:
            raise ValueError("decode=True needs a cache: call init_cache(input_shape) first")
        out, cache = decode_step(q, k, v, self.cache.get_value(), self.attention.config.softmax_scale)
        self.cache.set_value(cache)
        return out

    def __call__(self, query, key=None, value=None, *, is_causal: bool = False,
                 deterministic: bool | None = None, rngs=None, decode: bool | None = None,
                 seq_lengths=None, segment_ids=None):
        """``query [b, n, in_features]`` (``key``/``value`` the same shape, or None for
        self-attention) -> ``[b, n, in_features]``. ``decode`` (default: the constructor's):
        the next ``n`` tokens of a causal self-attention through ``self.cache``. ``seq_lengths
        [b]``: per-example lengths of the attention (padded positions are never keys and their
        attention rows are 0; the output projection's bias still applies to them). ``segment_ids
        [b, n]``: packed documents (not with ``decode``)."""
        if self.decode if decode is None else decode:
            if key is not None or value is not None:
                raise ValueError("decode=True is causal self-attention: pass key=None, value=None")
            if segment_ids is not None:
                raise ValueError("segment_ids is not supported with decode=True: decode one document per "
                                 "batch entry")
            return multihead_forward(self, query, None, None, self.num_kv_heads, self._decode)
        return multihead_forward(self, query, key, value, self.num_kv_heads, lambda q, k, v: self.attention(
            q, k, v, is_causal=is_causal, deterministic=deterministic, rngs=rngs, seq_lengths=seq_lengths,
            segment_ids=segment_ids))
