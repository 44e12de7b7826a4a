"""The Flax layers (NNX and Linen) against ``ring_torch.MultiheadDilatedAttention`` with the
same weights (``parity_tests.bridge``): same outputs, input gradients and parameter gradients;
weights survive torch -> flax -> torch exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ring_torch
from parity_tests import bridge
from parity_tests.frameworks import rel_err
from ring_jax import linen as rlinen
from ring_jax import nnx as rnnx

E, H = 32, 4
PATTERN = dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4))


def mesh4():
    return jax.make_mesh((4,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:4])


def torch_module(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {**PATTERN, **kw}
    return ring_torch.MultiheadDilatedAttention(E, H, dtype=dtype, **kw)


def _flax_kwargs(kw):
    kw = {**PATTERN, **kw}
    if "bias" in kw:
        kw["use_bias"] = kw.pop("bias")
    return kw


def nnx_module(param_dtype=jnp.float64, mesh=None, **kw):
    return rnnx.MultiHeadDilatedAttention(H, E, param_dtype=param_dtype, mesh=mesh,
                                          rngs=nnx.Rngs(1), **_flax_kwargs(kw))


def linen_module(param_dtype=jnp.float64, mesh=None, **kw):
    return rlinen.MultiHeadDilatedAttention(H, E, param_dtype=param_dtype, mesh=mesh,
                                            **_flax_kwargs(kw))


def inputs(count, n=64, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((2, n, E)).astype(dtype) for _ in range(count)]
    return xs, rng.standard_normal((2, n, E)).astype(dtype)


CASES = {
    "self": dict(kw=dict(), count=1, causal=False),
    "self_causal_longnet": dict(kw=dict(mix="longnet"), count=1, causal=True),
    "cross_kv": dict(kw=dict(gamma_init=0.7), count=3, causal=False),
    "cross_k_causal_gqa": dict(kw=dict(num_kv_heads=2), count=2, causal=True),
    "gqa1_longnet": dict(kw=dict(num_kv_heads=1, mix="longnet"), count=1, causal=False),
    "ring_size": dict(kw=dict(ring_size=4, num_kv_heads=2), count=3, causal=True),
    "no_bias_no_ln": dict(kw=dict(bias=False, layer_norm=False, softmax_scale=0.3), count=1,
                          causal=False),
    "mesh": dict(kw=dict(), count=3, causal=True, mesh=True),
    "mesh_longnet_gqa": dict(kw=dict(mix="longnet", num_kv_heads=2), count=1, causal=False,
                             mesh=True),
}


def _run(framework, case, dtype=np.float64):
    kw, count, causal = case["kw"], case["count"], case["causal"]
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    pdtype = jnp.float64 if dtype == np.float64 else jnp.float32
    tm = torch_module(dtype=tdtype, **kw)
    mesh = mesh4() if case.get("mesh") else None
    xs, dout = inputs(count, dtype=dtype)
    ref = bridge.torch_value_and_grads(tm, xs, dout, is_causal=causal)
    if framework == "nnx":
        m = bridge.torch_to_nnx(tm, nnx_module(param_dtype=pdtype, mesh=mesh, **kw))
        got = bridge.nnx_value_and_grads(m, xs, dout, is_causal=causal)
    else:
        m = linen_module(param_dtype=pdtype, mesh=mesh, **kw)
        got = bridge.linen_value_and_grads(m, bridge.torch_to_linen(tm), xs, dout,
                                           is_causal=causal)
    return ref, got


def _compare(ref, got, check):
    (out_r, dx_r, dp_r), (out_g, dx_g, dp_g) = ref, got
    assert out_g.dtype == out_r.dtype
    check(out_g, out_r, "out")
    assert len(dx_g) == len(dx_r)
    for i, (a, b) in enumerate(zip(dx_g, dx_r)):
        check(a, b, f"d input {i}")
    assert dp_g.keys() == dp_r.keys()
    for name in dp_r:
        check(dp_g[name], dp_r[name], f"d {name}")


def _abs_1e10(a, b, what):
    err = float(np.abs(np.asarray(a, np.float64) - b).max())
    assert err <= 1e-10, (what, err)


def _rel_2e5(a, b, what):
    if what == "d k_proj.bias":  # exactly 0 (softmax is shift invariant): no relative scale
        err = float(np.abs(a - b).max())
        assert err <= 1e-5, (what, err)
        return
    err = rel_err(a, b)
    assert err <= 2e-5, (what, err)


@pytest.mark.parametrize("framework", ["nnx", "linen"])
@pytest.mark.parametrize("name", list(CASES))
def test_same_as_torch_float64(framework, name):
    ref, got = _run(framework, CASES[name])
    _compare(ref, got, _abs_1e10)


@pytest.mark.parametrize("framework", ["nnx", "linen"])
@pytest.mark.parametrize("name", ["cross_k_causal_gqa", "mesh_longnet_gqa"])
def test_same_as_torch_float32(framework, name):
    ref, got = _run(framework, CASES[name], dtype=np.float32)
    _compare(ref, got, _rel_2e5)


@pytest.mark.parametrize("kw", [dict(), dict(bias=False, layer_norm=False, num_kv_heads=2)])
def test_round_trip_nnx(kw):
    tm = torch_module(**kw)
    sd = {k: v.clone() for k, v in tm.state_dict().items()}
    m = bridge.torch_to_nnx(tm, nnx_module(**kw))
    other = torch_module(seed=5, **kw)
    assert any(not torch.equal(other.state_dict()[k], sd[k]) for k in sd)
    bridge.nnx_to_torch(m, other)
    assert other.state_dict().keys() == sd.keys()
    for k in sd:
        assert other.state_dict()[k].dtype == sd[k].dtype
        assert torch.equal(other.state_dict()[k], sd[k]), k


@pytest.mark.parametrize("kw", [dict(), dict(bias=False, layer_norm=False, num_kv_heads=2)])
def test_round_trip_linen(kw):
    tm = torch_module(**kw)
    sd = {k: v.clone() for k, v in tm.state_dict().items()}
    params = bridge.torch_to_linen(tm)
    # The tree has the Linen module's structure, shapes and dtypes.
    init = jax.eval_shape(linen_module(**kw).init, jax.random.key(0), jnp.zeros((1, 32, E)))
    init = init["params"]
    assert (jax.tree.map(lambda x: (x.shape, x.dtype), params)
            == jax.tree.map(lambda x: (x.shape, x.dtype), init))
    other = torch_module(seed=5, **kw)
    bridge.linen_to_torch({"params": params}, other)
    for k in sd:
        assert torch.equal(other.state_dict()[k], sd[k]), k


def test_bridge_refuses_mismatched_modules():
    tm = torch_module(layer_norm=False)
    with pytest.raises(ValueError, match="parameter names differ"):
        bridge.torch_to_nnx(tm, nnx_module())
    with pytest.raises(ValueError, match="shape"):
        bridge.torch_to_nnx(torch_module(num_kv_heads=2), nnx_module())
    with pytest.raises(ValueError, match="parameter names differ"):
        bridge.linen_to_torch(bridge.torch_to_linen(torch_module()), tm)


@pytest.mark.parametrize("framework", ["nnx", "linen"])
@pytest.mark.parametrize("mix, causal, n", [("head_groups", False, 64), ("longnet", True, 64),
                                            ("head_groups", True, 53)])
def test_padding_same_as_torch_float64(framework, mix, causal, n):
    """Per-example lengths: torch's right-padding ``key_padding_mask`` and Flax's ``seq_lengths``
    give the same outputs and gradients (n = 53: a length no pattern divides)."""
    lengths = np.array([n, n - 20])
    tm = torch_module(mix=mix, num_kv_heads=2)
    xs, dout = inputs(1, n=n)
    padding = torch.from_numpy(np.arange(n)[None, :] >= lengths[:, None])
    ref = bridge.torch_value_and_grads(tm, xs, dout, is_causal=causal, key_padding_mask=padding)
    if framework == "nnx":
        m = bridge.torch_to_nnx(tm, nnx_module(mix=mix, num_kv_heads=2))
        got = bridge.nnx_value_and_grads(m, xs, dout, is_causal=causal, seq_lengths=jnp.asarray(lengths))
    else:
        m = linen_module(mix=mix, num_kv_heads=2)
        got = bridge.linen_value_and_grads(m, bridge.torch_to_linen(tm), xs, dout, is_causal=causal,
                                           seq_lengths=jnp.asarray(lengths))
    _compare(ref, got, _abs_1e10)


@pytest.mark.parametrize("framework", ["nnx", "linen"])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_balanced_layout_same_as_torch_float64(framework, mix):
    """The balanced ring in every layer (Flax: the mesh of 4 for NNX, a simulated ring of 4 for
    Linen; torch: a simulated ring of 4) against torch's single-device layer, same weights."""
    tm = torch_module(mix=mix, num_kv_heads=2)
    xs, dout = inputs(1)
    ref = bridge.torch_value_and_grads(tm, xs, dout, is_causal=True)
    ring = torch_module(mix=mix, num_kv_heads=2, ring_size=4, layout="balanced")
    ring.load_state_dict(tm.state_dict())
    _compare(ref, bridge.torch_value_and_grads(ring, xs, dout, is_causal=True), _abs_1e10)
    if framework == "nnx":
        m = bridge.torch_to_nnx(tm, nnx_module(mix=mix, num_kv_heads=2, mesh=mesh4(), layout="balanced"))
        got = bridge.nnx_value_and_grads(m, xs, dout, is_causal=True)
    else:
        m = linen_module(mix=mix, num_kv_heads=2, ring_size=4, layout="balanced")
        got = bridge.linen_value_and_grads(m, bridge.torch_to_linen(tm), xs, dout, is_causal=True)
    _compare(ref, got, _abs_1e10)


def test_to_balanced_same_permutation_in_both_frameworks():
    import ring_jax

    x = np.arange(3 * 48 * 2).reshape(3, 48, 2)
    for P in (1, 2, 3, 4, 6, 8, 12, 24):
        got = np.asarray(ring_jax.to_balanced(jnp.asarray(x), P))
        assert np.array_equal(got, ring_torch.to_balanced(torch.from_numpy(x), P).numpy())
        assert np.array_equal(np.asarray(ring_jax.from_balanced(jnp.asarray(got), P)), x)
