"""Attention dropout in the Flax layers: off when deterministic (call, ``eval()``, ``nnx.view``,
Linen field), reproducible for a key and different across keys, and equal to ``ring_torch`` for
the same seed (``jax.random.bits(key, uint32)``), values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ring_jax
import ring_torch
import ring_torch._dropout
from parity_tests import bridge
from ring_jax import linen as rlinen
from ring_jax import nnx as rnnx

PATTERN = dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4))
E, H, RATE = 32, 4, 0.3


def _qkv(seed=0, n=64, h=4, h_kv=2, d=8):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, n, h, d)), rng.standard_normal((2, n, h_kv, d)),
            rng.standard_normal((2, n, h_kv, d)))


def _mesh():
    return jax.make_mesh((4,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:4])


def test_deterministic_is_no_dropout():
    q, k, v = (jnp.asarray(x) for x in _qkv())
    call = nnx.jit(lambda layer, q, k, v, **kw: layer(q, k, v, is_causal=True, **kw),
                   static_argnames="deterministic")
    plain = call(rnnx.DilatedAttention(**PATTERN), q, k, v)
    layer = rnnx.DilatedAttention(**PATTERN, dropout=RATE, rngs=nnx.Rngs(0))
    assert np.array_equal(call(layer, q, k, v, deterministic=True), plain)
    assert np.array_equal(call(nnx.view(layer, deterministic=True), q, k, v), plain)
    layer.eval()
    assert np.array_equal(call(layer, q, k, v), plain)
    layer.train()
    assert not np.array_equal(call(layer, q, k, v), plain)
    for lin, kw in ((rlinen.DilatedAttention(**PATTERN, dropout=RATE), dict(deterministic=True)),
                    (rlinen.DilatedAttention(**PATTERN, dropout=RATE, deterministic=True), {})):
        out = jax.jit(lambda q, k, v: lin.apply({}, q, k, v, is_causal=True, **kw))(q, k, v)
        assert np.array_equal(out, plain)


@pytest.mark.parametrize("placement", ["single", "ring_size", "mesh"])
def test_core_layer_matches_torch(placement):
    """Same seed, same mask as ``ring_torch.dilated_attention`` (one device), on any ring."""
    q, k, v = _qkv(1)
    key = jax.random.key(3)
    seed = int(jax.random.bits(key, dtype=jnp.uint32))
    ref = ring_torch.dilated_attention(*(torch.from_numpy(x) for x in (q, k, v)), **PATTERN,
                                       mix="longnet", is_causal=True, dropout_p=RATE,
                                       dropout_seed=seed).numpy()
    extra = {"single": {}, "ring_size": {"ring_size": 4}, "mesh": {"mesh": _mesh()}}[placement]
    layer = rnnx.DilatedAttention(**PATTERN, mix="longnet", dropout=RATE, **extra)
    out = nnx.jit(lambda l, q, k, v, key: l(q, k, v, is_causal=True, rngs=key))(
        layer, *map(jnp.asarray, (q, k, v)), key)
    assert np.abs(np.asarray(out) - ref).max() <= 1e-12
    lin = rlinen.DilatedAttention(**PATTERN, mix="longnet", dropout=RATE, deterministic=False,
                                  **extra)
    out = jax.jit(lambda q, k, v, key: lin.apply({}, q, k, v, is_causal=True, dropout_rng=key))(
        *map(jnp.asarray, (q, k, v)), key)
    assert np.abs(np.asarray(out) - ref).max() <= 1e-12


def test_keys_nnx():
    q, k, v = (jnp.asarray(x) for x in _qkv(2))
    call = nnx.jit(lambda l, q, k, v: l(q, k, v))
    a = call(rnnx.DilatedAttention(**PATTERN, dropout=RATE, rngs=nnx.Rngs(1)), q, k, v)
    layer = rnnx.DilatedAttention(**PATTERN, dropout=RATE, rngs=nnx.Rngs(1))
    b, b2 = call(layer, q, k, v), call(layer, q, k, v)  # the stream advances between calls
    c = call(rnnx.DilatedAttention(**PATTERN, dropout=RATE, rngs=nnx.Rngs(2)), q, k, v)
    assert np.array_equal(a, b)
    assert np.abs(np.asarray(a - c)).max() > 1e-3
    assert np.abs(np.asarray(b - b2)).max() > 1e-3
    # An explicit key: reproducible, equal to the core with seed bits(key).
    key = jax.random.key(9)
    kcall = nnx.jit(lambda l, q, k, v, key: l(q, k, v, rngs=key))
    d = kcall(layer, q, k, v, key)
    assert np.array_equal(d, kcall(layer, q, k, v, key))
    core = jax.jit(lambda q, k, v, key: ring_jax.dilated_attention(
        q, k, v, **PATTERN, dropout_rate=RATE, dropout_seed=jax.random.bits(key, dtype=jnp.uint32)))
    assert np.array_equal(d, core(q, k, v, key))
    with pytest.raises(ValueError, match="has no rngs"):
        rnnx.DilatedAttention(**PATTERN, dropout=RATE)(q, k, v)


def test_keys_linen():
    q, k, v = (jnp.asarray(x) for x in _qkv(3))
    lin = rlinen.DilatedAttention(**PATTERN, dropout=RATE)
    run = jax.jit(lambda key: lin.apply({}, q, k, v, deterministic=False, rngs={"dropout": key}))
    a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    assert np.array_equal(a, b)
    assert np.abs(np.asarray(a - c)).max() > 1e-3
    with pytest.raises(ValueError, match="pass deterministic"):
        lin.apply({}, q, k, v)


@pytest.mark.parametrize("framework", ["nnx", "linen"])
@pytest.mark.parametrize("ring", [None, "ring_size", "mesh"])
def test_module_matches_torch(framework, ring, monkeypatch):
    """The multi-head layer with dropout: ring_torch's (training mode, its seed drawn by
    ``draw_seed``, here the Flax key's bits) values, input and parameter gradients."""
    key = jax.random.key(11)
    seed = int(jax.random.bits(key, dtype=jnp.uint32))
    monkeypatch.setattr(ring_torch._dropout, "draw_seed", lambda generator=None: seed)
    kw = dict(num_kv_heads=2, dropout=RATE)
    if ring == "ring_size":
        kw["ring_size"] = 4
    torch.manual_seed(0)
    tm = ring_torch.MultiheadDilatedAttention(E, H, **PATTERN, dtype=torch.float64, **kw)
    assert tm.training
    mesh = _mesh() if ring == "mesh" else None
    rng = np.random.default_rng(4)
    xs, dout = [rng.standard_normal((2, 64, E)) for _ in range(2)], rng.standard_normal((2, 64, E))
    ref = bridge.torch_value_and_grads(tm, xs, dout, is_causal=True)
    if framework == "nnx":
        m = rnnx.MultiHeadDilatedAttention(H, E, **PATTERN, param_dtype=jnp.float64, mesh=mesh,
                                           rngs=nnx.Rngs(0), **kw)
        bridge.torch_to_nnx(tm, m)
        got = bridge.nnx_value_and_grads(m, xs, dout, is_causal=True, rngs=key)
    else:
        m = rlinen.MultiHeadDilatedAttention(H, E, **PATTERN, param_dtype=jnp.float64, mesh=mesh,
                                             **kw)
        got = bridge.linen_value_and_grads(m, bridge.torch_to_linen(tm), xs, dout,
                                           is_causal=True, deterministic=False, dropout_rng=key)
    assert np.abs(got[0] - ref[0]).max() <= 1e-10
    for a, b in zip(got[1], ref[1]):
        assert np.abs(a - b).max() <= 1e-10
    for name in ref[2]:
        assert np.abs(got[2][name] - ref[2][name]).max() <= 1e-10, name
    # ... and it is not the undropped layer.
    tm.eval()
    assert np.abs(tm(*(torch.from_numpy(x) for x in xs), is_causal=True).detach().numpy()
                  - ref[0]).max() > 1e-3
