"""Packed documents (``segment_ids``) in ``ring_jax``, held to the float64 oracle and autodiff
reference: a query attends only keys of its document, on top of the pattern (whose segments keep
their global positions), padding and causality. Every entry point: one device, ``chunk_size``,
``ring_size`` in both layouts, the sharded ring on 2/4 simulated devices in both layouts (and with
a sharded batch), the Flax layers and ``make_attention_fn``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ring_jax
from parity_tests import oracle
from parity_tests.reference import reference_attention
from ring_jax import linen as rlinen
from ring_jax import nnx as rnnx

W, R = (8, 16, 32, 64), (1, 2, 2, 4)
# Documents of varied lengths crossing segments and shards, one of length 1, ids not sorted.
IDS_64 = np.stack([np.repeat([3, 0, 0, 7, 1], [10, 5, 20, 28, 1]), np.repeat([1, 2, 5], [33, 30, 1])])


def _ids(n):
    return IDS_64[:, :n] if n <= 64 else np.repeat(IDS_64, -(-n // 64), axis=1)[:, :n]


def _inputs(n, b=2, h=4, hk=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, n, h, d)), rng.standard_normal((b, n, hk, d)),
            rng.standard_normal((b, n, hk, d)), rng.standard_normal((b, n, h, d)), rng.standard_normal((b, n, h)))


def _reference(q, k, v, dout, dlse, kw):
    qt, kt, vt = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    out, lse = reference_attention(qt, kt, vt, **kw)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    ((out * torch.from_numpy(dout)).sum() + (finite * torch.from_numpy(dlse)).sum()).backward()
    return tuple(t.detach().numpy() for t in (out, lse, qt.grad, kt.grad, vt.grad))


def _run(fn, q, k, v, dout, dlse, ids, lens=None):
    """``fn(q, k, v, ids, lens) -> (out, lse)`` under jit, and the gradients of the reference's loss."""

    @jax.jit
    def fwd_bwd(q, k, v, ids, lens):
        (out, lse), vjp = jax.vjp(lambda q, k, v: fn(q, k, v, ids, lens), q, k, v)
        return (out, lse, *vjp((jnp.asarray(dout), jnp.where(jnp.isfinite(lse), jnp.asarray(dlse), 0.0))))

    lens = None if lens is None else jnp.asarray(lens, jnp.int32)
    return tuple(np.asarray(a) for a in fwd_bwd(*(jnp.asarray(x) for x in (q, k, v)), jnp.asarray(ids), lens))


def _check(got, ref):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert np.array_equal(np.isinf(a), np.isinf(b)), name
        fin = np.isfinite(b)
        assert np.abs(a[fin] - b[fin]).max() <= (1e-10 if name in ("out", "lse") else 1e-9), name


def _mesh(P):
    return jax.make_mesh((P,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:P])


ENTRY_POINTS = {
    "one_device": lambda kw: lambda q, k, v, ids, lens: ring_jax.dilated_attention(
        q, k, v, return_lse=True, segment_ids=ids, seq_lengths=lens, **kw),
    "chunks": lambda kw: lambda q, k, v, ids, lens: ring_jax.dilated_attention(
        q, k, v, return_lse=True, segment_ids=ids, seq_lengths=lens, chunk_size=64, **kw),
    "ring_size4": lambda kw: lambda q, k, v, ids, lens: ring_jax.dilated_attention(
        q, k, v, return_lse=True, segment_ids=ids, seq_lengths=lens, ring_size=4, **kw),
    "ring_size4_balanced": lambda kw: lambda q, k, v, ids, lens: ring_jax.dilated_attention(
        q, k, v, return_lse=True, segment_ids=ids, seq_lengths=lens, ring_size=4, layout="balanced", **kw),
    "mesh2": lambda kw: lambda q, k, v, ids, lens: ring_jax.sharded_dilated_attention(
        q, k, v, mesh=_mesh(2), return_lse=True, segment_ids=ids, seq_lengths=lens, **kw),
    "mesh4_balanced": lambda kw: lambda q, k, v, ids, lens: ring_jax.sharded_dilated_attention(
        q, k, v, mesh=_mesh(4), return_lse=True, segment_ids=ids, seq_lengths=lens, layout="balanced", **kw),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_documents_match_reference(entry, mix, causal):
    n = 64
    q, k, v, dout, dlse = _inputs(n)
    kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=causal)
    got = _run(ENTRY_POINTS[entry](kw), q, k, v, dout, dlse, _ids(n))
    ref = _reference(q, k, v, dout, dlse, dict(kw, segment_ids=_ids(n)))
    _check(got, ref)
    plain = oracle.dilated_attention(q, k, v, **kw)[0]
    assert np.abs(got[0] - plain).max() > 1e-2  # the documents change the result


@pytest.mark.parametrize("entry", ["one_device", "ring_size4", "ring_size4_balanced", "mesh2"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_documents_with_lengths_and_any_n(entry, causal):
    """With ``seq_lengths`` at once; n = 53 (no pattern divides it) where the entry pads."""
    n = 64 if entry == "mesh2" else 53
    q, k, v, dout, dlse = _inputs(n, seed=1)
    lens = np.array([n - 17, n])
    kw = dict(segment_lengths=W, dilation_rates=R, mix="longnet", is_causal=causal)
    got = _run(ENTRY_POINTS[entry](kw), q, k, v, dout, dlse, _ids(n), lens)
    _check(got, _reference(q, k, v, dout, dlse, dict(kw, segment_ids=_ids(n), seq_lengths=lens)))
    for g in got[2:]:  # padded q, k, v get exactly no gradient
        assert not g[0, n - 17:].any()


def test_sharded_batch_and_sequence():
    mesh = jax.make_mesh((2, 2), ("dp", "sp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:4])
    q, k, v, dout, dlse = _inputs(64, b=4, seed=2)
    ids = np.concatenate([IDS_64, IDS_64[::-1]])
    kw = dict(segment_lengths=W, dilation_rates=R, mix="head_groups", is_causal=True)
    fn = lambda q, k, v, ids, lens: ring_jax.sharded_dilated_attention(  # noqa: E731
        q, k, v, mesh=mesh, batch_axis="dp", return_lse=True, segment_ids=ids, **kw)
    _check(_run(fn, q, k, v, dout, dlse, ids), _reference(q, k, v, dout, dlse, dict(kw, segment_ids=ids)))


def test_one_document_equals_no_segment_ids_with_dropout():
    q, k, v, *_ = (jnp.asarray(x) for x in _inputs(64, seed=3))
    kw = dict(segment_lengths=W, dilation_rates=R, mix="longnet", is_causal=True, dropout_rate=0.25, dropout_seed=9,
              return_lse=True)
    for extra in ({}, dict(ring_size=4), dict(ring_size=4, layout="balanced")):
        with_ids = ring_jax.dilated_attention(q, k, v, segment_ids=np.full((2, 64), 5), **kw, **extra)
        without = ring_jax.dilated_attention(q, k, v, **kw, **extra)
        for a, b in zip(with_ids, without):
            assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-12
    split = ring_jax.dilated_attention(q, k, v, segment_ids=_ids(64), **kw)
    assert np.abs(np.asarray(split[0]) - np.asarray(without[0])).max() > 1e-2


def test_one_program_for_all_ids():
    q = jnp.ones((2, 64, 4, 8))
    f = jax.jit(lambda q, ids: ring_jax.dilated_attention(q, q, q, segment_lengths=W, dilation_rates=R,
                                                          segment_ids=ids))
    for ids in (_ids(64), np.zeros((2, 64), np.int32), np.arange(128).reshape(2, 64)):
        f(q, jnp.asarray(ids, jnp.int32))
    assert f._cache_size() == 1


def test_flax_layers_and_attention_fn():
    q, k, v, *_ = (jnp.asarray(x) for x in _inputs(64, seed=4))
    ids = jnp.asarray(_ids(64))
    kw = dict(segment_lengths=W, dilation_rates=R)
    core = ring_jax.dilated_attention(q, k, v, is_causal=True, segment_ids=ids, **kw)
    layer = rnnx.DilatedAttention(W, R, ring_size=4, layout="balanced")
    assert np.abs(np.asarray(layer(q, k, v, is_causal=True, segment_ids=ids) - core)).max() <= 1e-12
    lin = rlinen.DilatedAttention(W, R, mesh=_mesh(2))
    assert np.abs(np.asarray(lin.apply({}, q, k, v, is_causal=True, segment_ids=ids) - core)).max() <= 1e-12
    fn = functools.partial(ring_jax.make_attention_fn(W, R, is_causal=True), segment_ids=ids)
    assert np.abs(np.asarray(fn(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2))) - np.asarray(core)).max() <= 1e-12
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 64, 32)))
    mha = rnnx.MultiHeadDilatedAttention(4, 32, W, R, rngs=nnx.Rngs(0))
    assert np.abs(np.asarray(mha(x, is_causal=True, segment_ids=ids) - mha(x, is_causal=True))).max() > 1e-3
    with pytest.raises(ValueError, match="segment_ids is not supported with decode=True"):
        mha.init_cache(x.shape)
        mha(x[:, :1], decode=True, segment_ids=ids[:, :1])


def test_errors():
    q = jnp.ones((2, 64, 4, 8))
    kw = dict(segment_lengths=W, dilation_rates=R)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[batch, seq\]=\(2, 64\)"):
        ring_jax.dilated_attention(q, q, q, segment_ids=np.zeros((2, 32), np.int32), **kw)
    with pytest.raises(TypeError, match="segment_ids has dtype float32"):
        ring_jax.dilated_attention(q, q, q, segment_ids=np.zeros((2, 64), np.float32), **kw)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[batch, seq\]=\(2, 64\)"):
        ring_jax.sharded_dilated_attention(q, q, q, mesh=_mesh(2), segment_ids=np.zeros((64,), np.int32), **kw)
