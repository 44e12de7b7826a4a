"""``ring_jax.make_attention_fn`` inside ``flax.nnx.MultiHeadAttention`` and
``flax.linen.MultiHeadDotProductAttention``: the layer equals the core on its own projected
q/k/v, equals Flax's built-in attention for the dense pattern (w = n, r = 1), refuses masks,
biases and sow_weights, and maps Flax's dropout arguments to the core's dropout."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ring_jax
from parity_tests import oracle

E, H, N = 32, 4, 64
PATTERN = dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4))


def _x(count=1, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((2, N, E))) for _ in range(count)]


def _nnx_mha(fn=None, num_kv_heads=None, seed=0, **kw):
    if fn is not None:
        kw["attention_fn"] = fn
    if num_kv_heads is not None:
        kw["num_kv_heads"] = num_kv_heads
    return nnx.MultiHeadAttention(H, E, decode=False, param_dtype=jnp.float64,
                                  rngs=nnx.Rngs(seed), **kw)


def _nnx_expected(m, xq, xk, **core):
    """The NNX layer written out: its projections, the core (or the oracle), its output."""
    q, k, v = m.query(xq), m.key(xk), m.value(xk)
    att = jax.jit(functools.partial(ring_jax.dilated_attention, **core))(q, k, v)
    ref, _ = oracle.dilated_attention(q, k, v, **{k_: v_ for k_, v_ in core.items()
                                                  if not k_.startswith("dropout")})
    if not any(k_.startswith("dropout") for k_ in core):
        assert np.abs(np.asarray(att) - ref).max() <= 1e-12
    return m.out(att)


@pytest.mark.parametrize("mix,causal,kv,ring,chunk", [("head_groups", False, None, None, None),
                                                      ("longnet", True, 2, 4, None),
                                                      ("longnet", True, 2, None, 32)])
def test_nnx_equals_core(mix, causal, kv, ring, chunk):
    fn = ring_jax.make_attention_fn(**PATTERN, mix=mix, ring_size=ring, chunk_size=chunk)
    m = _nnx_mha(fn, num_kv_heads=kv)
    xq, xk = _x(2)
    out = nnx.jit(lambda m, a, b: m(a, b, is_causal=causal))(m, xq, xk)
    ref = _nnx_expected(m, xq, xk, **PATTERN, mix=mix, is_causal=causal)
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= 1e-12


def test_nnx_mesh_equals_core():
    mesh = jax.make_mesh((4,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:4])
    m = _nnx_mha(ring_jax.make_attention_fn(**PATTERN, mesh=mesh, is_causal=True))
    (x,) = _x(1)
    out = nnx.jit(lambda m, x: m(x))(m, x)
    ref = _nnx_expected(m, x, x, **PATTERN, is_causal=True)
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_nnx_dense_pattern_equals_builtin(causal):
    """One pattern w = n, r = 1 is full attention: the built-in ``dot_product_attention``."""
    # dropout_rate > 0 with deterministic=True keeps the built-in on Flax's own float64 einsum
    # path (with dropout_rate == 0 it calls jax.nn.dot_product_attention, whose XLA softmax is
    # float32); dropout is off in both.
    ours = _nnx_mha(ring_jax.make_attention_fn((N,), (1,)), dropout_rate=0.1)
    builtin = _nnx_mha(dropout_rate=0.1)  # same seed: same weights
    (x,) = _x(1, seed=3)
    mask = nnx.make_causal_mask(x[..., 0]) if causal else None
    out = nnx.jit(lambda m, x: m(x, is_causal=causal, deterministic=True))(ours, x)
    ref = nnx.jit(lambda m, x: m(x, mask=mask, deterministic=True))(builtin, x)
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= 1e-12


def _linen_expected(params, att_fn, xq, xk):
    p = params["params"]
    proj = lambda name, x: jnp.einsum("bne,ehd->bnhd", x, p[name]["kernel"]) + p[name]["bias"]  # noqa: E731
    att = att_fn(proj("query", xq), proj("key", xk), proj("value", xk))
    return jnp.einsum("bnhd,hde->bne", att, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("mix,causal", [("head_groups", True), ("longnet", False)])
def test_linen_equals_core(mix, causal):
    fn = ring_jax.make_attention_fn(**PATTERN, mix=mix, is_causal=causal)
    m = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=E, attention_fn=fn,
                                        param_dtype=jnp.float64)
    xq, xk = _x(2, seed=1)
    params = jax.jit(m.init)(jax.random.key(0), xq, xk)
    out = jax.jit(m.apply)(params, xq, xk)

    def core(q, k, v):
        att = jax.jit(functools.partial(ring_jax.dilated_attention, **PATTERN, mix=mix,
                                        is_causal=causal))(q, k, v)
        ref, _ = oracle.dilated_attention(q, k, v, **PATTERN, mix=mix, is_causal=causal)
        assert np.abs(np.asarray(att) - ref).max() <= 1e-12
        return att

    ref = _linen_expected(params, core, xq, xk)
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_linen_dense_pattern_equals_builtin(causal):
    (x,) = _x(1, seed=4)
    ours = nn.MultiHeadDotProductAttention(
        num_heads=H, attention_fn=ring_jax.make_attention_fn((N,), (1,), is_causal=causal),
        param_dtype=jnp.float64)
    builtin = nn.MultiHeadDotProductAttention(num_heads=H, param_dtype=jnp.float64)
    params = jax.jit(builtin.init)(jax.random.key(0), x)
    mask = nn.make_causal_mask(x[..., 0]) if causal else None
    out = jax.jit(ours.apply)(params, x)
    ref = jax.jit(lambda p, x: builtin.apply(p, x, mask=mask))(params, x)
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= 1e-12


def test_refuses_mask_bias_sow():
    (x,) = _x(1)
    mask = jnp.ones((2, 1, N, N), bool)
    fn = ring_jax.make_attention_fn(**PATTERN)
    m = _nnx_mha(fn)
    with pytest.raises(ValueError, match="cannot apply an arbitrary attention mask"):
        m(x, mask=mask)
    with pytest.raises(ValueError, match="sow_weights is not supported"):
        m(x, sow_weights=True)
    lm = nn.MultiHeadDotProductAttention(num_heads=H, attention_fn=fn)
    params = jax.eval_shape(lm.init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="cannot apply an arbitrary attention mask"):
        jax.eval_shape(lambda p, x: lm.apply(p, x, mask=mask), params, x)
    q = jnp.zeros((2, N, H, 8))
    with pytest.raises(ValueError, match="cannot add an attention bias"):
        fn(q, q, q, bias=jnp.zeros((2, H, N, N)))
    with pytest.raises(ValueError, match="one batch dimension"):
        fn(q[None], q[None], q[None])
    with pytest.raises(ValueError, match="need a dropout_rng"):
        fn(q, q, q, dropout_rate=0.1, deterministic=False)
    with pytest.raises(ValueError, match="pass one of them"):
        ring_jax.make_attention_fn(**PATTERN, ring_size=2, mesh=jax.make_mesh(
            (2,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2]))


def test_signature_keywords():
    """Linen filters its keywords by the signature: the ones that matter must be named."""
    import inspect

    params = inspect.signature(ring_jax.make_attention_fn(**PATTERN)).parameters
    for name in ("mask", "bias", "dropout_rng", "dropout_rate", "deterministic", "dtype",
                 "module", "is_causal", "broadcast_dropout", "precision"):
        assert name in params, name


def test_dropout_linen():
    """Linen passes dropout_rng / dropout_rate / deterministic: the core's hashed dropout with
    seed ``bits(dropout_rng)``; deterministic is dropout off."""
    fn = ring_jax.make_attention_fn(**PATTERN)
    m = nn.MultiHeadDotProductAttention(num_heads=H, attention_fn=fn, dropout_rate=0.3,
                                        param_dtype=jnp.float64)
    plain = nn.MultiHeadDotProductAttention(num_heads=H, attention_fn=fn, param_dtype=jnp.float64)
    (x,) = _x(1, seed=5)
    params = jax.jit(plain.init)(jax.random.key(0), x)
    run = jax.jit(lambda p, x, key: m.apply(p, x, deterministic=False, dropout_rng=key))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    out1, out1b, out2 = run(params, x, k1), run(params, x, k1), run(params, x, k2)
    assert np.array_equal(out1, out1b)
    assert np.abs(np.asarray(out1 - out2)).max() > 1e-3
    seed = jax.random.bits(k1, dtype=jnp.uint32)
    ref = jax.jit(lambda p, x: _linen_expected(p, lambda q, k, v: ring_jax.dilated_attention(
        q, k, v, **PATTERN, dropout_rate=0.3, dropout_seed=seed), x, x))(params, x)
    assert np.abs(np.asarray(out1) - np.asarray(ref)).max() <= 1e-12
    det = jax.jit(lambda p, x: m.apply(p, x, deterministic=True))(params, x)
    assert np.array_equal(det, jax.jit(plain.apply)(params, x))


def test_dropout_nnx():
    fn = ring_jax.make_attention_fn(**PATTERN)
    m = _nnx_mha(fn, dropout_rate=0.3)
    plain = _nnx_mha(fn)
    (x,) = _x(1, seed=6)
    f = nnx.jit(lambda m, x, rngs: m(x, deterministic=False, rngs=rngs))
    out1, out1b = f(m, x, nnx.Rngs(7)), f(m, x, nnx.Rngs(7))
    out2 = f(m, x, nnx.Rngs(8))
    assert np.array_equal(out1, out1b)
    assert np.abs(np.asarray(out1 - out2)).max() > 1e-3
    det = nnx.jit(lambda m, x: m(x, deterministic=True))(m, x)
    assert np.array_equal(det, nnx.jit(lambda m, x: m(x))(plain, x))
