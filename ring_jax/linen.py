"""Flax Linen layers: the dilated-attention core, and LongNet's multi-head dilated attention layer.

Same layers as :mod:`ring_jax.nnx` as ``nn.Module`` dataclasses. Parameters of
``MultiHeadDilatedAttention``: ``{"q_proj": {"kernel", "bias"}, "k_proj": ..., "v_proj": ...,
"norm": {"scale", "bias"}, "out_proj": ...}`` (``parity_tests/bridge.py`` converts a
``ring_torch.MultiheadDilatedAttention`` state_dict to them and back). Dropout draws its key
with ``self.make_rng("dropout")`` (pass ``rngs={"dropout": key}`` to ``apply``) unless
deterministic.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ring_jax._attention_fn import attend, check_dropout_rate, check_placement, seed_from_key
from ring_jax._config import DilatedConfig
from ring_jax._decode import decode as decode_step, init_cache as init_decode_cache
from ring_jax._module_config import (check_heads, pattern_config, resolve_deterministic,
                                     multihead_forward, xavier_normal)

__all__ = ["CachedDecode", "DilatedAttention", "MultiHeadDilatedAttention"]


class DilatedAttention(nn.Module):
    """Dilated attention (LongNet) over ``[batch, seq, heads, head_dim]`` arrays; no parameters.

    ``mesh``: the ring over ``mesh[seq_axis]`` (global arrays in and out; ``layout``:
    ``"contiguous"`` or ``"balanced"`` placement of the ring's tokens); ``ring_size``: the
    simulated ring on one device; otherwise :func:`ring_jax.dilated_attention` (with
    ``chunk_size``: in independent chunks, for sequences that do not fit in one pass). ``dropout``:
    attention-probability dropout (the core's hashed mask, seed ``jax.random.bits(key, uint32)``
    with ``key = dropout_rng`` or ``self.make_rng("dropout")``), off when ``deterministic`` (the
    call's, else the field's; one of them is needed when ``dropout > 0``).
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    mix: str = "head_groups"
    softmax_scale: float | None = None
    dropout: float = 0.0
    mesh: Any = None
    seq_axis: str = "sp"
    batch_axis: Any = None
    ring_size: int | None = None
    chunk_size: int | None = None
    deterministic: bool | None = None
    layout: str = "contiguous"

    def __post_init__(self):
        pattern_config(self.segment_lengths, self.dilation_rates, self.mix, self.softmax_scale)
        check_placement(self.mesh, self.ring_size, self.chunk_size, self.layout)
        check_dropout_rate(self.dropout)
        super().__post_init__()

    @property
    def config(self) -> DilatedConfig:
        """The pattern (frozen; causality is the call's ``is_causal``)."""
        return pattern_config(self.segment_lengths, self.dilation_rates, self.mix,
                              self.softmax_scale)

    def __call__(self, query, key, value, *, is_causal: bool = False,
                 deterministic: bool | None = None, dropout_rng=None, seq_lengths=None, segment_ids=None):
        """``query [b, n, h, d]``, ``key``/``value [b, n, h_kv, d]`` -> ``[b, n, h, d]``;
        ``seq_lengths [b]``: per-example lengths, positions past them are padding; ``segment_ids
        [b, n]``: packed documents."""
        rate = check_dropout_rate(self.dropout)
        det = resolve_deterministic(deterministic, self.deterministic, rate)
        seed = None
        if det:
            rate = 0.0
        else:
            if dropout_rng is None:
                dropout_rng = self.make_rng("dropout")
            seed = seed_from_key(dropout_rng)
        return attend(query, key, value, config=self.config, is_causal=is_causal,
                      mesh=self.mesh, seq_axis=self.seq_axis, batch_axis=self.batch_axis,
                      ring_size=self.ring_size, chunk_size=self.chunk_size, dropout_rate=rate,
                      dropout_seed=seed, seq_lengths=seq_lengths, layout=self.layout, segment_ids=segment_ids)


class CachedDecode(nn.Module):
    """Causal dilated attention of the next tokens through a :class:`ring_jax.DecodeCache` in the
    ``"cache"`` collection (variable ``"state"``), as Linen's ``decode=True``: ``init`` creates an
    empty cache (and leaves it empty); ``apply(..., mutable=["cache"])`` advances it."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    mix: str = "head_groups"
    softmax_scale: float | None = None

    @nn.compact
    def __call__(self, query, key, value):
        """``query [b, t, h, d]``, ``key``/``value [b, t, h_kv, d]`` -> ``[b, t, h, d]``."""
        initialized = self.has_variable("cache", "state")
        b, _, h, d = query.shape
        state = self.variable("cache", "state", init_decode_cache, b, h, key.shape[2], d,
                              tuple(self.segment_lengths), tuple(self.dilation_rates),
                              mix=self.mix, dtype=key.dtype)
        out, cache = decode_step(query, key, value, state.value, self.softmax_scale)
        if initialized:
            state.value = cache
        return out


class MultiHeadDilatedAttention(nn.Module):
    """LongNet's multi-head dilated attention layer: ``[batch, seq, in_features]`` in and out.

    Mirrors ``ring_torch.MultiheadDilatedAttention`` (see :class:`ring_jax.nnx.
    MultiHeadDilatedAttention`): q/k/v projections (k/v to ``num_kv_heads * head_dim``), dilated
    attention, ``LayerNorm(in_features)`` when ``layer_norm``, ``out_proj``; MAGNETO
    initialisation (xavier normal, gain 1 on q/k and ``gamma_init`` on v/out, zero biases).
    Self-attention when ``key`` and ``value`` are None, cross-attention when given.

    Cached decoding, as ``linen.MultiHeadDotProductAttention``: with ``decode=True`` (field or
    call) ``init`` creates an empty cache in the ``"cache"`` collection and
    ``apply(variables, x, decode=True, mutable=["cache"])`` attends the next tokens ``x [batch, t,
    in_features]`` (causal self-attention, no dropout; projections and LayerNorm on those tokens
    only) and advances the cache by ``t``.
    """

    num_heads: int
    in_features: int
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    num_kv_heads: int | None = None
    dropout: float = 0.0
    use_bias: bool = True
    layer_norm: bool = True
    layer_norm_eps: float = 1e-5
    gamma_init: float = 1.0
    mix: str = "head_groups"
    softmax_scale: float | None = None
    mesh: Any = None
    seq_axis: str = "sp"
    batch_axis: Any = None
    ring_size: int | None = None
    chunk_size: int | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    deterministic: bool | None = None
    decode: bool = False
    layout: str = "contiguous"

    def __post_init__(self):
        config = pattern_config(self.segment_lengths, self.dilation_rates, self.mix,
                                self.softmax_scale)
        check_heads(self.in_features, self.num_heads, self.num_kv_heads, config)
        check_placement(self.mesh, self.ring_size, self.chunk_size, self.layout)
        check_dropout_rate(self.dropout)
        super().__post_init__()

    @property
    def head_dim(self) -> int:
        return self.in_features // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def setup(self):
        zeros = jax.nn.initializers.zeros

        def dense(features, gain):
            return nn.Dense(features, use_bias=self.use_bias, dtype=self.dtype,
                            param_dtype=self.param_dtype, kernel_init=xavier_normal(gain),
                            bias_init=zeros)

        kv_dim = self.kv_heads * self.head_dim
        self.q_proj = dense(self.in_features, 1.0)
        self.k_proj = dense(kv_dim, 1.0)
        self.v_proj = dense(kv_dim, self.gamma_init)
        self.norm = (nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                  param_dtype=self.param_dtype, use_fast_variance=False)
                     if self.layer_norm else None)
        self.out_proj = dense(self.in_features, self.gamma_init)
        self.attention = DilatedAttention(
            tuple(self.segment_lengths), tuple(self.dilation_rates), mix=self.mix,
            softmax_scale=self.softmax_scale, dropout=self.dropout, mesh=self.mesh,
            seq_axis=self.seq_axis, batch_axis=self.batch_axis, ring_size=self.ring_size,
            chunk_size=self.chunk_size, deterministic=self.deterministic, layout=self.layout)
        self.cached = CachedDecode(tuple(self.segment_lengths), tuple(self.dilation_rates),
                                   mix=self.mix, softmax_scale=self.softmax_scale)

    def __call__(self, query, key=None, value=None, *, is_causal: bool = False,
                 deterministic: bool | None = None, dropout_rng=None, decode: bool | None = None,
                 seq_lengths=None, segment_ids=None):
        """``query [b, n, in_features]`` (``key``/``value`` the same shape, or None for
        self-attention) -> ``[b, n, in_features]``. ``decode`` (default: the field): the next
        ``n`` tokens of a causal self-attention through the ``"cache"`` collection.
        ``seq_lengths [b]``: per-example lengths, ``segment_ids [b, n]``: packed documents (as the
        NNX layer)."""
        if self.decode if decode is None else decode:
            if key is not None or value is not None:
                raise ValueError("decode=True is causal self-attention: pass key=None, value=None")
            if segment_ids is not None:
                raise ValueError("segment_ids is not supported with decode=True: decode one document per "
                                 "batch entry")
            return multihead_forward(self, query, None, None, self.kv_heads, self.cached)
        return multihead_forward(self, query, key, value, self.kv_heads, lambda q, k, v: self.attention(
            q, k, v, is_causal=is_causal, deterministic=deterministic, dropout_rng=dropout_rng,
            seq_lengths=seq_lengths, segment_ids=segment_ids))
