"""Any sequence length and per-example lengths (``seq_lengths``) in ``ring_jax``, held to the
float64 oracle and autodiff reference (segments ``[s*w, (s+1)*w)`` cut at n; positions past a
length are never keys, their rows are 0 with LSE ``-inf`` and their q, k, v get no gradient).

Every entry point: one device, ``chunk_size``, ``ring_size``, the sharded ring on 2/4/8 simulated
devices (with a sharded batch too), the Flax layers and ``make_attention_fn``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import ring_jax
import ring_jax._api as api
from parity_tests import oracle
from parity_tests.reference import reference_attention


def _inputs(n, b=2, h=4, hk=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, n, h, d)), rng.standard_normal((b, n, hk, d)),
            rng.standard_normal((b, n, hk, d)), rng.standard_normal((b, n, h, d)), rng.standard_normal((b, n, h)))


def _reference(q, k, v, dout, dlse, lens, kw):
    """``(out, lse, dq, dk, dv)`` of the float64 autodiff reference; ``dlse`` applies on finite rows."""
    qt, kt, vt = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    out, lse = reference_attention(qt, kt, vt, seq_lengths=lens, **kw)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    ((out * torch.from_numpy(dout)).sum() + (finite * torch.from_numpy(dlse)).sum()).backward()
    return tuple(t.detach().numpy() for t in (out, lse, qt.grad, kt.grad, vt.grad))


def _run(fn, q, k, v, dout, dlse, lens):
    """``fn(q, k, v, lens) -> (out, lse)`` under jit, and the gradients of the same loss."""

    @jax.jit
    def fwd_bwd(q, k, v, lens):
        (out, lse), vjp = jax.vjp(lambda q, k, v: fn(q, k, v, lens), q, k, v)
        return (out, lse, *vjp((jnp.asarray(dout), jnp.where(jnp.isfinite(lse), jnp.asarray(dlse), 0.0))))

    lens = None if lens is None else jnp.asarray(lens, jnp.int32)
    return tuple(np.asarray(a) for a in fwd_bwd(*(jnp.asarray(x) for x in (q, k, v)), lens))


def _check(got, ref, lens, n):
    out, lse, *grads = got
    np.testing.assert_allclose(out, ref[0], atol=1e-10, rtol=0)
    assert np.array_equal(np.isfinite(lse), np.isfinite(ref[1]))
    np.testing.assert_allclose(np.where(np.isfinite(ref[1]), lse, 0), np.where(np.isfinite(ref[1]), ref[1], 0),
                               atol=1e-10, rtol=0)
    for g, r in zip(grads, ref[2:]):
        np.testing.assert_allclose(g, r, atol=1e-9, rtol=0)
    if lens is not None:
        for b, length in enumerate(lens):
            length = min(max(int(length), 0), n)
            assert not out[b, length:].any() and np.all(lse[b, length:] == -np.inf)
            for g in grads:  # padded q, k, v: exactly zero gradient
                assert not g[b, length:].any()


def _core(**kw):
    return lambda q, k, v, lens: ring_jax.dilated_attention(q, k, v, return_lse=True, seq_lengths=lens, **kw)


# (n, segment_lengths, dilation_rates, mix, causal, lengths): prime n, n < w, n between segment
# lengths, lengths 0, n and in between (None: all n), a tiled prefix of 32 and a tail of 5 with a
# length inside the tail.
CASES = [
    (13, (4, 8), (1, 2), "head_groups", False, None),
    (13, (4, 8), (1, 2), "longnet", True, (13, 6)),
    (5, (8, 16), (2, 4), "longnet", False, (0, 3)),
    (12, (8, 16), (1, 2), "head_groups", True, (12, 0)),
    (23, (4, 8, 16), (1, 2, 4), "longnet", False, (9, 23)),
    (16, (4, 16), (1, 4), "head_groups", False, (16, 11)),
    (37, (4, 16), (2, 4), "head_groups", True, (37, 34)),
]
ENTRY = {"one": {}, "chunk": "chunk", "ring": dict(ring_size=2), "ring3": dict(ring_size=3)}


@pytest.mark.parametrize("entry", ["one", "chunk", "ring", "ring3"])
@pytest.mark.parametrize("n,w,r,mix,causal,lens", CASES)
def test_one_device_entry_points_match_the_oracle(n, w, r, mix, causal, lens, entry):
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal)
    extra = dict(chunk_size=max(w)) if entry == "chunk" else ENTRY[entry]
    x = _inputs(n)
    _check(_run(_core(**kw, **extra), *x, lens), _reference(*x, lens, kw), lens, n)


def test_out_of_range_lengths_are_clipped():
    kw = dict(segment_lengths=(4, 8), dilation_rates=(1, 2))
    q, k, v = (jnp.asarray(a) for a in _inputs(10)[:3])
    a = ring_jax.dilated_attention(q, k, v, seq_lengths=jnp.array([-3, 15]), **kw)
    b = ring_jax.dilated_attention(q, k, v, seq_lengths=jnp.array([0, 10]), **kw)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("extra", [{}, dict(ring_size=2), dict(chunk_size=16), dict(mix="longnet")])
def test_full_lengths_equal_no_lengths_exactly(extra, causal):
    kw = dict(segment_lengths=(4, 16), dilation_rates=(1, 2), is_causal=causal, return_lse=True, **extra)
    q, k, v = (jnp.asarray(a) for a in _inputs(32)[:3])
    full = ring_jax.dilated_attention(q, k, v, seq_lengths=jnp.array([32, 32]), **kw)
    plain = ring_jax.dilated_attention(q, k, v, **kw)
    for a, b in zip(full, plain):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_untiled_n_runs_an_unpadded_prefix_and_a_padded_tail(monkeypatch, causal):
    """``n = 37``, ``lcm(w) = 16``: the prefix ``[0, 32)`` runs unpadded (without ``seq_lengths``
    its spec masks no keys, so a non-causal call keeps cuDNN where it runs), the tail ``[32, 37)``
    padded to 8 rows; the result is the oracle's (``CASES``) and the whole padded call's."""
    seen = []
    attend = api.one_device_attention

    def spy(mode, plan, spec, with_lse, padded_len, q, *args):
        seen.append((q.shape[1], padded_len, spec.key_mask))
        return attend(mode, plan, spec, with_lse, padded_len, q, *args)

    monkeypatch.setattr(api, "one_device_attention", spy)
    kw = dict(segment_lengths=(4, 16), dilation_rates=(2, 4), is_causal=causal, return_lse=True)
    q, k, v = (jnp.asarray(a) for a in _inputs(37)[:3])
    got = ring_jax.dilated_attention(q, k, v, **kw)
    assert seen == [(32, 32, False), (5, 8, not causal)]
    whole = ring_jax.dilated_attention(q, k, v, chunk_size=48, **kw)  # one padded chunk of 48
    for a, b in zip(got, whole):
        np.testing.assert_allclose(a, b, atol=1e-12, rtol=0)


def test_traced_lengths_compile_once():
    kw = dict(segment_lengths=(4, 8), dilation_rates=(1, 2))
    q, k, v = (jnp.asarray(a) for a in _inputs(11)[:3])
    traces = []

    @jax.jit
    def f(q, k, v, lens):
        traces.append(1)
        return ring_jax.dilated_attention(q, k, v, seq_lengths=lens, **kw)

    f(q, k, v, jnp.array([3, 11]))
    f(q, k, v, jnp.array([7, 0]))
    assert len(traces) == 1
    # Eager calls: one jitted program for every value of the lengths.
    ring_jax.dilated_attention(q, k, v, seq_lengths=jnp.array([1, 2]), **kw)
    compiled = api._jitted(api.spans_attention, (0, 1))  # 11 = a tiled prefix of 8 and a tail of 3
    size = compiled._cache_size()
    ring_jax.dilated_attention(q, k, v, seq_lengths=jnp.array([5, 9]), **kw)
    assert compiled._cache_size() == size


def test_dropout_mask_is_unchanged_on_real_positions():
    """A padded call's real prefix equals the unpadded call on that prefix, with the same seed."""
    kw = dict(segment_lengths=(4, 8), dilation_rates=(1, 2), mix="longnet", dropout_rate=0.3, dropout_seed=7,
              return_lse=True)
    q, k, v = (jnp.asarray(a) for a in _inputs(19)[:3])
    m = 11
    for extra in ({}, dict(ring_size=2), dict(chunk_size=8)):
        out, lse = ring_jax.dilated_attention(q, k, v, seq_lengths=jnp.array([19, m]), **kw, **extra)
        ref_out, ref_lse = ring_jax.dilated_attention(q[:, :m], k[:, :m], v[:, :m], **kw, **extra)
        np.testing.assert_allclose(out[1, :m], ref_out[1], atol=1e-12)
        np.testing.assert_allclose(lse[1, :m], ref_lse[1], atol=1e-12)
        assert not np.asarray(out[1, m:]).any()
        full = ring_jax.dilated_attention(q, k, v, **kw, **extra)[0]
        np.testing.assert_allclose(out[0], full[0], atol=1e-12)


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                         devices=jax.devices()[:int(np.prod(shape))])


@pytest.mark.parametrize("P,mix,causal", [(2, "longnet", False), (4, "head_groups", True), (8, "longnet", True),
                                          (8, "head_groups", False)])
def test_sharded_ring_with_lengths(P, mix, causal):
    kw = dict(segment_lengths=(4, 8, 32), dilation_rates=(1, 2, 4), mix=mix, is_causal=causal)
    lens = (32, 19) if P < 8 else (3, 0)
    mesh = _mesh((P,), ("sp",))
    fn = lambda q, k, v, lens: ring_jax.sharded_dilated_attention(  # noqa: E731
        q, k, v, mesh=mesh, return_lse=True, seq_lengths=lens, **kw)
    x = _inputs(32)
    _check(_run(fn, *x, lens), _reference(*x, lens, kw), lens, 32)


def test_sharded_batch_and_sequence_with_lengths():
    """With ``batch_axis`` each device reads its batch shard's lengths from the global array."""
    kw = dict(segment_lengths=(4, 16), dilation_rates=(1, 2), mix="longnet", is_causal=False)
    mesh = _mesh((2, 4), ("dp", "sp"))
    lens = (16, 5, 0, 11)
    fn = lambda q, k, v, lens: ring_jax.sharded_dilated_attention(  # noqa: E731
        q, k, v, mesh=mesh, batch_axis="dp", return_lse=True, seq_lengths=lens, **kw)
    x = _inputs(16, b=4)
    _check(_run(fn, *x, lens), _reference(*x, lens, kw), lens, 16)


def test_ring_inside_user_shard_map_with_lengths():
    kw = dict(segment_lengths=(4, 16), dilation_rates=(1, 2), is_causal=False)
    mesh = _mesh((4,), ("sp",))
    spec = jax.sharding.PartitionSpec(None, "sp")
    lens = (10, 3)

    def fn(q, k, v, lens):
        ring = functools.partial(ring_jax.ring_dilated_attention, axis_name="sp", return_lse=True,
                                 seq_lengths=lens, **kw)
        return jax.shard_map(ring, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec, spec))(q, k, v)

    x = _inputs(16)
    _check(_run(fn, *x, lens), _reference(*x, lens, kw), lens, 16)


def test_unaligned_segment_on_a_mesh_is_refused():
    mesh = _mesh((4,), ("sp",))
    q = jnp.zeros((1, 24, 2, 8))
    with pytest.raises(ValueError, match=r"pattern 0 \(w=16, r=1\) with n=24, local length L=6 on P=4 devices: "
                                         r"w is not a multiple of L"):
        ring_jax.sharded_dilated_attention(q, q, q, mesh=mesh, segment_lengths=(16,), dilation_rates=(1,))


def test_argument_errors():
    q = jnp.zeros((2, 8, 4, 8))
    kw = dict(segment_lengths=(4,), dilation_rates=(1,))
    with pytest.raises(TypeError, match=r"^seq_lengths has dtype float32; expected an integer array of shape "
                                        r"\[batch\]$"):
        ring_jax.dilated_attention(q, q, q, seq_lengths=jnp.array([1.0, 2.0], jnp.float32), **kw)
    with pytest.raises(TypeError, match="seq_lengths has dtype bool"):
        ring_jax.dilated_attention(q, q, q, seq_lengths=np.array([True, False]), **kw)
    with pytest.raises(ValueError, match=r"^seq_lengths must have shape \[batch\]=\(2,\), got \(2, 1\)$"):
        ring_jax.dilated_attention(q, q, q, seq_lengths=jnp.zeros((2, 1), jnp.int32), **kw)
    with pytest.raises(ValueError, match=r"seq_lengths must have shape \[batch\]=\(2,\), got \(3,\)"):
        ring_jax.sharded_dilated_attention(q, q, q, mesh=_mesh((2,), ("sp",)), seq_lengths=[1, 2, 3], **kw)
    with pytest.raises(ValueError, match=r"^w=12 is not a multiple of r=8: every segment length must be a "
                                         r"multiple of its dilation rate"):
        ring_jax.dilated_attention(q, q, q, segment_lengths=(12,), dilation_rates=(8,))
    # A Python list of ints is accepted.
    ring_jax.dilated_attention(q, q, q, seq_lengths=[3, 8], **kw)


def test_padded_length_and_kernel_choice(monkeypatch):
    from ring_jax import _cudnn
    from ring_jax._coords import Mods
    from ring_jax._kernels import CudnnKernel
    from ring_jax._plan import length_problem, padded_length

    cfg = ring_jax.DilatedConfig((8, 16), (2, 4))
    assert padded_length(cfg, 5) == 8 and padded_length(cfg, 12) == 16 and padded_length(cfg, 17) == 32
    assert padded_length(cfg, 5, 1, 4) == 16  # L = 4: w' = 16 = 4L, and L % r == 0
    for n in range(1, 70):
        for P in (1, 2, 3):
            N = padded_length(cfg, n, 1, P)
            assert N >= n and length_problem(cfg, N, P) is None
            assert all(length_problem(cfg, m, P) is not None for m in range(n, N))
    monkeypatch.setattr(_cudnn, "usable", lambda dtype, head_dim: True)
    assert CudnnKernel().supports(jnp.bfloat16, 64, Mods(causal=True))
    assert not CudnnKernel().supports(jnp.bfloat16, 64, Mods(key_mask=True))
    q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    causal, full = ring_jax.DilatedConfig((8,), (1,), is_causal=True), ring_jax.DilatedConfig((8,), (1,))
    assert api._spec(causal, q, 0.0, padded=True).kernel.name == "cudnn"  # causal padding needs no key mask
    spec = api._spec(full, q, 0.0, padded=True)
    assert spec.key_mask and spec.kernel.name == "xla"


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(1, 40), data=st.data())
def test_fuzz_lengths_and_n(n, data):
    w, r = data.draw(st.sampled_from([((4, 8), (1, 2)), ((8, 16), (2, 4)), ((3, 6), (1, 3))]))
    mix = data.draw(st.sampled_from(["head_groups", "longnet"]))
    causal = data.draw(st.booleans())
    lens = tuple(data.draw(st.lists(st.integers(0, n), min_size=2, max_size=2)))
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal)
    x = _inputs(n, seed=n)
    _check(_run(_core(**kw), *x, lens), _reference(*x, lens, kw), lens, n)


def test_flax_layers_with_lengths():
    """The layers' real rows of a padded example equal the layer on that example's prefix; the
    core layers equal the core."""
    flax = pytest.importorskip("flax")
    import flax.linen as nn
    from flax import nnx

    pattern = dict(segment_lengths=(4, 8), dilation_rates=(1, 2))
    n, m = 13, 6
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, n, 16)))
    lens = jnp.array([n, m])

    def check_prefix(full, prefix):
        np.testing.assert_allclose(full[1, :m], prefix[1], atol=1e-12)

    mha = ring_jax.nnx.MultiHeadDilatedAttention(4, 16, **pattern, num_kv_heads=2, param_dtype=jnp.float64,
                                                 rngs=nnx.Rngs(0))
    check_prefix(mha(x, seq_lengths=lens), mha(x[:, :m]))
    lin = ring_jax.linen.MultiHeadDilatedAttention(num_heads=4, in_features=16, **pattern, param_dtype=jnp.float64)
    params = lin.init(jax.random.key(0), x)
    check_prefix(lin.apply(params, x, seq_lengths=lens), lin.apply(params, x[:, :m]))

    q, k, v = (jnp.asarray(a) for a in _inputs(n)[:3])
    core = ring_jax.dilated_attention(q, k, v, seq_lengths=lens, is_causal=True, **pattern)
    np.testing.assert_allclose(ring_jax.nnx.DilatedAttention(**pattern)(q, k, v, is_causal=True, seq_lengths=lens),
                               core, atol=1e-12)
    layer = ring_jax.linen.DilatedAttention(**pattern, ring_size=2)
    got = layer.apply({}, q, k, v, is_causal=True, seq_lengths=lens)
    np.testing.assert_allclose(got, core, atol=1e-12)

    # make_attention_fn: seq_lengths bound with functools.partial (Flax does not pass it).
    fn = ring_jax.make_attention_fn(**pattern)
    flax_mha = nnx.MultiHeadAttention(4, 16, decode=False, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    flax_mha.attention_fn = functools.partial(fn, seq_lengths=lens)
    padded = flax_mha(x)
    flax_mha.attention_fn = fn
    check_prefix(padded, flax_mha(x[:, :m]))
    dense = nn.MultiHeadDotProductAttention(num_heads=4, param_dtype=jnp.float64,
                                            attention_fn=functools.partial(fn, seq_lengths=lens))
    params = dense.init(jax.random.key(0), x)
    plain = nn.MultiHeadDotProductAttention(num_heads=4, param_dtype=jnp.float64, attention_fn=fn)
    check_prefix(dense.apply(params, x), plain.apply(params, x[:, :m]))
