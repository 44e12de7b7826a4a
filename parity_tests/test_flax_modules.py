"""The Flax layers on their own: against a float64 dense composition (their own parameters through
dense projections, the float64 autograd reference attention ``log C`` bias, layer norm and the
output projection), the parameter-free core layer against ``ring_jax``'s functions and the
oracle, MAGNETO initialisation, dtypes, and the error messages (``ring_torch``'s, word for word).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import ring_jax
import ring_torch
from parity_tests import bridge, oracle
from parity_tests.reference import reference_attention
from ring_jax import linen as rlinen
from ring_jax import nnx as rnnx

E, H = 32, 4
PATTERN = dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4))


def _dense(tree, xs, *, num_kv_heads, is_causal, mix, softmax_scale, layer_norm_eps=1e-5):
    """The layer written out densely in torch float64 with the parameters ``tree`` (torch
    names); returns ``(out, [d input], {name: d param})`` for ``sum(out * dout)``."""
    def run(dout):
        params = {k: torch.from_numpy(np.array(v, np.float64)).requires_grad_()
                  for k, v in tree.items()}
        ts = [torch.from_numpy(np.array(x, np.float64)).requires_grad_() for x in xs]
        query, key, value = bridge._kv(ts)
        key = query if key is None else key
        value = key if value is None else value
        b, n, _ = query.shape
        hd = E // H
        q = F.linear(query, params["q_proj.weight"], params.get("q_proj.bias")).view(b, n, H, hd)
        k = F.linear(key, params["k_proj.weight"], params.get("k_proj.bias")).view(
            b, n, num_kv_heads, hd)
        v = F.linear(value, params["v_proj.weight"], params.get("v_proj.bias")).view(
            b, n, num_kv_heads, hd)
        out, _ = reference_attention(q, k, v, **PATTERN, mix=mix, is_causal=is_causal,
                                     softmax_scale=softmax_scale)
        out = out.reshape(b, n, E)
        if "norm.weight" in params:
            out = F.layer_norm(out, (E,), params["norm.weight"], params["norm.bias"],
                               layer_norm_eps)
        out = F.linear(out, params["out_proj.weight"], params.get("out_proj.bias"))
        (out * torch.from_numpy(dout)).sum().backward()
        return (out.detach().numpy(), [t.grad.numpy() for t in ts],
                {k: p.grad.numpy() for k, p in params.items()})
    return run


CASES = [
    dict(kw=dict(), count=1, causal=False),
    dict(kw=dict(num_kv_heads=2, mix="longnet", softmax_scale=0.25), count=2, causal=True),
    dict(kw=dict(use_bias=False, layer_norm=False, num_kv_heads=1), count=3, causal=True),
]


@pytest.mark.parametrize("framework", ["nnx", "linen"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=["self", "cross_gqa_longnet",
                                                          "cross_mqa_no_bias_ln"])
def test_dense_composition(framework, case):
    kw, count, causal = CASES[case]["kw"], CASES[case]["count"], CASES[case]["causal"]
    rng = np.random.default_rng(case)
    xs = [rng.standard_normal((2, 32, E)) for _ in range(count)]
    dout = rng.standard_normal((2, 32, E))
    if framework == "nnx":
        m = rnnx.MultiHeadDilatedAttention(H, E, **PATTERN, param_dtype=jnp.float64,
                                           rngs=nnx.Rngs(case), **kw)
        tree = bridge.flax_tree_to_state_dict(bridge.nnx_params(m))
        got = bridge.nnx_value_and_grads(m, xs, dout, is_causal=causal)
    else:
        m = rlinen.MultiHeadDilatedAttention(H, E, **PATTERN, param_dtype=jnp.float64, **kw)
        params = jax.jit(m.init)(jax.random.key(case), jnp.asarray(xs[0]))["params"]
        # LayerNorm starts at scale 1, bias 0: perturb it so the test sees its parameters.
        if "norm" in params:
            params["norm"] = {"scale": 1 + 0.1 * jnp.asarray(rng.standard_normal(E)),
                              "bias": 0.1 * jnp.asarray(rng.standard_normal(E))}
        tree = bridge.flax_tree_to_state_dict(params)
        got = bridge.linen_value_and_grads(m, params, xs, dout, is_causal=causal)
    ref = _dense(tree, xs, num_kv_heads=kw.get("num_kv_heads", H), is_causal=causal,
                 mix=kw.get("mix", "head_groups"), softmax_scale=kw.get("softmax_scale"))(dout)
    assert np.abs(got[0] - ref[0]).max() <= 1e-10
    for a, b in zip(got[1], ref[1]):
        assert np.abs(a - b).max() <= 1e-10
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert np.abs(got[2][name] - ref[2][name]).max() <= 1e-10, name


@pytest.mark.parametrize("placement", ["single", "ring_size", "mesh", "chunk_size"])
def test_core_layer(placement):
    """``DilatedAttention`` (no parameters) == ``ring_jax.dilated_attention`` == the oracle."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 64, 4, 8)))
    k, v = (jnp.asarray(rng.standard_normal((2, 64, 2, 8))) for _ in range(2))
    extra = {"single": {}, "ring_size": {"ring_size": 4}, "chunk_size": {"chunk_size": 32},
             "mesh": {"mesh": jax.make_mesh((4,), ("sp",),
                                            axis_types=(jax.sharding.AxisType.Auto,),
                                            devices=jax.devices()[:4])}}[placement]
    ref, _ = oracle.dilated_attention(q, k, v, **PATTERN, mix="longnet", is_causal=True)
    layer = rnnx.DilatedAttention(**PATTERN, mix="longnet", **extra)
    assert layer.config == ring_jax.DilatedConfig(PATTERN["segment_lengths"],
                                                  PATTERN["dilation_rates"], "longnet")
    assert nnx.state(layer, nnx.Param) == nnx.state(rnnx.DilatedAttention((8,), (1,)), nnx.Param)
    out = nnx.jit(lambda layer, q, k, v: layer(q, k, v, is_causal=True))(layer, q, k, v)
    assert np.abs(np.asarray(out) - ref).max() <= 1e-12
    lin = rlinen.DilatedAttention(**PATTERN, mix="longnet", **extra)
    variables = jax.eval_shape(lin.init, jax.random.key(0), q, k, v)
    assert not jax.tree.leaves(variables)  # no parameters
    out = jax.jit(lambda q, k, v: lin.apply(variables, q, k, v, is_causal=True))(q, k, v)
    assert np.abs(np.asarray(out) - ref).max() <= 1e-12


def test_magneto_init():
    """xavier_normal_ (untruncated) with gain 1 on q/k and gamma_init on v/out, zero biases,
    LayerNorm 1/0; kernels [in, out] with torch's fan-in/fan-out."""
    e, gamma = 256, 0.5
    m = rnnx.MultiHeadDilatedAttention(8, e, **PATTERN, num_kv_heads=2, gamma_init=gamma,
                                       rngs=nnx.Rngs(0))
    lm = rlinen.MultiHeadDilatedAttention(8, e, **PATTERN, num_kv_heads=2, gamma_init=gamma)
    lp = jax.jit(lm.init)(jax.random.key(0), jnp.zeros((1, 32, e)))["params"]
    for tree in (bridge.nnx_params(m), lp):
        for name, gain, out in (("q_proj", 1.0, e), ("k_proj", 1.0, e // 4),
                                ("v_proj", gamma, e // 4), ("out_proj", gamma, e)):
            kern = np.asarray(tree[name]["kernel"])
            assert kern.shape == (e, out) and kern.dtype == np.float32
            std = gain * np.sqrt(2.0 / (e + out))
            assert abs(kern.std() / std - 1) < 0.03, name
            assert abs(kern.mean()) < 0.05 * std
            assert np.abs(kern).max() > 3.5 * std  # a normal, not a truncated normal
            assert not np.any(np.asarray(tree[name]["bias"]))
        assert np.all(np.asarray(tree["norm"]["scale"]) == 1)
        assert not np.any(np.asarray(tree["norm"]["bias"]))


def test_dtypes_and_jit():
    """param_dtype / dtype as Flax layers: bfloat16 compute from float32 parameters, under jit."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, E)), jnp.float32)
    m = rnnx.MultiHeadDilatedAttention(H, E, **PATTERN, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    m32 = rnnx.MultiHeadDilatedAttention(H, E, **PATTERN, rngs=nnx.Rngs(0))
    f = nnx.jit(lambda m, x: m(x, is_causal=True))
    out, ref = f(m, x), f(m32, x)
    assert out.dtype == jnp.bfloat16 and ref.dtype == jnp.float32
    assert bridge.nnx_params(m)["q_proj"]["kernel"].dtype == jnp.float32
    assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 0.1


def _message(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    raise AssertionError("no ValueError")


@pytest.mark.parametrize("kw", [
    dict(embed_dim=30, num_heads=4),
    dict(embed_dim=32, num_heads=0),
    dict(embed_dim=32, num_heads=4, num_kv_heads=3),
    dict(embed_dim=32, num_heads=2),  # head_groups: 3 patterns need 3 heads
], ids=["embed", "heads", "kv_heads", "head_groups"])
def test_constructor_errors_match_torch(kw):
    kw = dict(kw)
    e, h = kw.pop("embed_dim"), kw.pop("num_heads")
    want = _message(lambda: ring_torch.MultiheadDilatedAttention(e, h, **PATTERN, **kw))
    assert _message(lambda: rnnx.MultiHeadDilatedAttention(h, e, **PATTERN, rngs=nnx.Rngs(0),
                                                           **kw)) == want
    assert _message(lambda: rlinen.MultiHeadDilatedAttention(h, e, **PATTERN, **kw)) == want


@pytest.mark.parametrize("args", ["wrong_embed", "key_len", "value_shape", "value_only",
                                  "rank"])
def test_call_errors_match_torch(args):
    x = np.zeros((2, 32, E))
    inputs = {"wrong_embed": (np.zeros((2, 32, E + 1)),),
              "key_len": (x, np.zeros((2, 16, E))),
              "value_shape": (x, x, np.zeros((1, 32, E))),
              "value_only": (x, None, x),
              "rank": (np.zeros((32, E)),)}[args]
    tm = ring_torch.MultiheadDilatedAttention(E, H, **PATTERN, dtype=torch.float64)
    want = _message(lambda: tm(*[None if a is None else torch.from_numpy(a) for a in inputs]))
    m = rnnx.MultiHeadDilatedAttention(H, E, **PATTERN, rngs=nnx.Rngs(0))
    lm = rlinen.MultiHeadDilatedAttention(H, E, **PATTERN)
    js = [None if a is None else jnp.asarray(a, jnp.float32) for a in inputs]
    assert _message(lambda: m(*js)) == want
    params = jax.eval_shape(lm.init, jax.random.key(0), jnp.zeros((2, 32, E)))
    assert _message(lambda: lm.apply(params, *js)) == want
    assert "key" in want or "query" in want or "value" in want


def test_other_errors():
    mesh = jax.make_mesh((4,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:4])
    for make in (lambda **k: rnnx.DilatedAttention(**PATTERN, **k),
                 lambda **k: rnnx.MultiHeadDilatedAttention(H, E, **PATTERN, rngs=nnx.Rngs(0), **k),
                 lambda **k: rlinen.DilatedAttention(**PATTERN, **k),
                 lambda **k: rlinen.MultiHeadDilatedAttention(H, E, **PATTERN, **k)):
        with pytest.raises(ValueError, match="pass one of them"):
            make(mesh=mesh, ring_size=2)
        with pytest.raises(ValueError, match=r"dropout=1.0 must be in \[0, 1\)"):
            make(dropout=1.0)
        with pytest.raises(ValueError, match="ring_size=0 must be a positive int"):
            make(ring_size=0)
        with pytest.raises(ValueError, match="chunk_size=32 runs one device's sequence in chunks"):
            make(mesh=mesh, chunk_size=32)
        with pytest.raises(ValueError, match="chunk_size=0 must be a positive int"):
            make(chunk_size=0)
    with pytest.raises(ValueError, match="non-empty and of equal length"):
        rnnx.DilatedAttention((8, 16), (1,))
    with pytest.raises(ValueError, match="mix='bad'"):
        rlinen.DilatedAttention((8,), (1,), mix="bad")
    # The core's argument errors come through (seq_lengths not of shape [batch]).
    m = rnnx.MultiHeadDilatedAttention(H, E, **PATTERN, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"seq_lengths must have shape \[batch\]=\(1,\), got \(2,\)"):
        m(jnp.zeros((1, 40, E)), seq_lengths=jnp.zeros((2,), jnp.int32))


def test_import_ring_jax_without_flax():
    """``import ring_jax`` does not import flax; ``ring_jax.nnx`` / ``ring_jax.linen`` do."""
    import subprocess
    import sys

    code = ("import sys, ring_jax; assert 'flax' not in sys.modules; "
            "assert ring_jax.nnx.MultiHeadDilatedAttention and ring_jax.linen.DilatedAttention; "
            "assert 'flax' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
