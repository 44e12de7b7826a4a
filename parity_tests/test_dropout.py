"""Dropout: one counter-based mask in both frameworks, every ring, forward and backward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

import ring_jax
from parity_tests.frameworks import Case, max_abs_err, run_jax, run_torch

RATE, SEED = 0.3, 1234


def _jax_impls():
    mesh = jax.make_mesh((4,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    return {
        "single": functools.partial(ring_jax.dilated_attention, return_lse=True),
        "ring_size": functools.partial(ring_jax.dilated_attention, return_lse=True, ring_size=4),
        "sharded": functools.partial(ring_jax.sharded_dilated_attention, mesh=mesh, return_lse=True),
    }


@pytest.mark.parametrize("impl", ["single", "ring_size", "sharded"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_jax_dropout_equals_torch_dropout(mix, causal, impl):
    ring_torch = pytest.importorskip("ring_torch")
    case = Case(256, 6, 3, 8, (16, 64, 256), (1, 2, 4), mix, causal)
    x = case.inputs()
    fn = _jax_impls()[impl]
    ours = run_jax(case, x, lambda q, k, v: fn(q, k, v, dropout_rate=RATE, dropout_seed=SEED, **case.kwargs))
    theirs = run_torch(case, x, lambda q, k, v: ring_torch.dilated_attention(
        q, k, v, return_lse=True, dropout_p=RATE, dropout_seed=SEED, **case.kwargs))
    for a, b in zip(ours, theirs):  # values, lse and gradients: the same mask everywhere
        assert max_abs_err(a, b) <= 1e-12
    plain = run_jax(case, x)
    assert max_abs_err(ours.out, plain.out) > 0.1  # dropout did something
    assert max_abs_err(ours.lse, plain.lse) <= 1e-12  # but not to the LSE


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_untiled_length_dropout_equals_jax(causal):
    """``n = 300`` with ``lcm(w) = 256``: torch runs the prefix and the 44-row tail apart, JAX
    the whole sequence padded; the keep-mask hashes global positions, so both agree."""
    ring_torch = pytest.importorskip("ring_torch")
    case = Case(300, 6, 3, 8, (16, 64, 256), (1, 2, 4), "longnet", causal)
    x = case.inputs()
    ours = run_jax(case, x, lambda q, k, v: ring_jax.dilated_attention(
        q, k, v, return_lse=True, dropout_rate=RATE, dropout_seed=SEED, **case.kwargs))
    theirs = run_torch(case, x, lambda q, k, v: ring_torch.dilated_attention(
        q, k, v, return_lse=True, dropout_p=RATE, dropout_seed=SEED, **case.kwargs))
    for a, b in zip(ours, theirs):
        assert max_abs_err(a, b) <= 1e-12
    assert max_abs_err(ours.out, run_jax(case, x).out) > 0.1


def test_kernel_dropout_backward_equals_autodiff():
    from ring_jax._coords import Coords, Mods
    from ring_jax._kernels import XlaKernel, block_attention

    B, m, H, d = 3, 8, 2, 4
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (B, m, H, d), jnp.float64) for i in range(3))
    pos = jnp.broadcast_to(jnp.arange(m), (B, H, m))
    coords = Coords(jnp.uint32(7), jnp.arange(B), jnp.arange(H), pos, pos)

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)[0])) + jnp.sum(jnp.cos(f(q, k, v)[1]))

    custom = jax.grad(loss(lambda q, k, v: block_attention(q, k, v, scale=0.4, is_causal=True, dropout_rate=0.5,
                                                           pattern=2, coords=coords)), argnums=(0, 1, 2))
    plain = jax.grad(loss(lambda q, k, v: XlaKernel().forward(q, k, v, 0.4, Mods(True, 0.5, 2), coords)),
                     argnums=(0, 1, 2))
    for a, b in zip(custom(q, k, v), plain(q, k, v)):
        assert max_abs_err(a, b) <= 1e-12


def test_dropout_seeds_and_rates():
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 64, 4, 8))
    kw = dict(segment_lengths=(16, 64), dilation_rates=(1, 2))
    f = jax.jit(lambda seed: ring_jax.dilated_attention(q, q, q, dropout_rate=0.5, dropout_seed=seed, **kw))
    assert jnp.array_equal(f(jnp.uint32(1)), f(jnp.uint32(1)))
    assert not jnp.array_equal(f(jnp.uint32(1)), f(jnp.uint32(2)))
    assert jnp.array_equal(ring_jax.dilated_attention(q, q, q, dropout_rate=0.0, dropout_seed=3, **kw),
                           ring_jax.dilated_attention(q, q, q, **kw))
    key = jax.random.PRNGKey(5)  # a seed drawn from a PRNG key, as the Flax modules do
    ring_jax.dilated_attention(q, q, q, dropout_rate=0.1, dropout_seed=jax.random.bits(key, dtype=jnp.uint32), **kw)
    with pytest.raises(ValueError, match=r"dropout_rate=1.0 must be in \[0, 1\)"):
        ring_jax.dilated_attention(q, q, q, dropout_rate=1.0, dropout_seed=1, **kw)
    with pytest.raises(ValueError, match="dropout_rate=0.2 needs a dropout_seed"):
        ring_jax.dilated_attention(q, q, q, dropout_rate=0.2, **kw)
