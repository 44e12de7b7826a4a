"""What the NNX and Linen layers share: argument checks (the messages of ``ring_torch``),
key/value resolution, MAGNETO initialisers and dropout resolution. No flax import."""

from __future__ import annotations

import jax

from ring_jax._config import DilatedConfig

__all__ = ["pattern_config", "check_heads", "resolve_kv", "xavier_normal", "resolve_deterministic"]


def pattern_config(segment_lengths, dilation_rates, mix, softmax_scale) -> DilatedConfig:
    """The (frozen, validated) pattern part; causality is a call argument."""
    return DilatedConfig(segment_lengths, dilation_rates, mix, False, softmax_scale)


def check_heads(embed_dim: int, num_heads: int, num_kv_heads: int | None,
                config: DilatedConfig) -> tuple[int, int]:
    """``(num_kv_heads, head_dim)``; ``ValueError`` as ``ring_torch.MultiheadDilatedAttention``."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
        raise ValueError(f"{embed_dim=} must be a positive multiple of {num_heads=}")
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads=} must be a multiple of {num_kv_heads=}")
    if config.mix == "head_groups" and num_heads < config.num_patterns:
        raise ValueError(f"mix='head_groups' needs a head per pattern: "
                         f"num_heads={num_heads} < num_patterns={config.num_patterns}")
    return num_kv_heads, embed_dim // num_heads


def resolve_kv(query, key, value, embed_dim: int):
    """Self-attention when ``key`` and ``value`` are None; ``value`` defaults to ``key``; both of
    the query's shape ``[batch, seq, embed_dim]``."""
    if query.ndim != 3 or query.shape[-1] != embed_dim:
        raise ValueError(f"query must be [batch, seq, embed_dim={embed_dim}], got "
                         f"{tuple(query.shape)}")
    if key is None and value is not None:
        raise ValueError("value given without key")
    if key is None:
        key = value = query
    elif value is None:
        value = key
    for name, x in (("key", key), ("value", value)):
        if x.shape != query.shape:
            raise ValueError(f"cross-attention needs {name} of the query's shape "
                             f"{tuple(query.shape)} (same batch, length and embed_dim), got "
                             f"{tuple(x.shape)}")
    return key, value


def multihead_forward(layer, query, key, value, num_kv_heads: int, attend):
    """The multi-head layer of both Flax APIs (and of ``ring_torch.MultiheadDilatedAttention``):
    project, split heads, ``attend(q, k, v)``, merge heads, LayerNorm, output projection."""
    key, value = resolve_kv(query, key, value, layer.in_features)
    b, n, _ = query.shape
    q = layer.q_proj(query).reshape(b, n, layer.num_heads, layer.head_dim)  # [b, s, h, d]
    k = layer.k_proj(key).reshape(b, n, num_kv_heads, layer.head_dim)  # [b, s, h_kv, d]
    v = layer.v_proj(value).reshape(b, n, num_kv_heads, layer.head_dim)
    out = attend(q, k, v).reshape(b, n, layer.in_features)  # [b, s, h * d]
    if layer.norm is not None:
        out = layer.norm(out)
    return layer.out_proj(out)


def xavier_normal(gain: float = 1.0):
    """``torch.nn.init.xavier_normal_`` for a ``[in, out]`` kernel: untruncated normal with
    ``std = gain * sqrt(2 / (in + out))``."""
    return jax.nn.initializers.variance_scaling(float(gain) ** 2, "fan_avg", "normal")


def resolve_deterministic(call_value, attr_value, dropout_rate: float) -> bool:
    """The call's ``deterministic`` if given, else the module's; True when there is no dropout."""
    if dropout_rate == 0.0:
        return True
    value = call_value if call_value is not None else attr_value
    if value is None:
        raise ValueError("dropout > 0: pass deterministic=True/False to the call or the module")
    return bool(value)
