"""Cached decoding (``init_cache`` / ``decode``, JAX and torch) equals the causal forward.

What is compared, in float64:

* The outputs of successive decode calls, for many ways of cutting the sequence into chunks,
  against ``dilated_attention(..., is_causal=True)`` on the whole sequence and against the oracle
  (segments ``[s * w, (s + 1) * w)`` cut at ``n``: any length).
* Causally, position ``p`` reads only positions ``<= p``, so the oracle at length ``n`` also equals
  the oracle at a padded length ``N >= n`` that is a multiple of every ``w``, restricted to the
  first ``n`` positions; for ``n < w`` the effective segment ``min(w, n) = n`` holds the same
  positions as the natural segment ``[0, w)`` cut at ``n`` (tested below).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402

import ring_jax  # noqa: E402
import ring_torch  # noqa: E402
from parity_tests import oracle  # noqa: E402

# (segment_lengths, dilation_rates, heads, kv_heads, n): GQA with a multiple of max(w); MQA with w > n.
CONFIGS = [((4, 8, 16), (1, 2, 4), 4, 2, 32), ((8, 64), (2, 4), 3, 1, 32)]
D = 8


def _inputs(h, h_kv, n, b=2, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, n, h, D)), rng.standard_normal((b, n, h_kv, D)),
            rng.standard_normal((b, n, h_kv, D)))


def extended_oracle(q, k, v, w, r, mix):
    """The causal oracle with segments ``[s * w, (s + 1) * w)`` cut at any ``n``."""
    n = q.shape[1]
    L = math.lcm(*w)
    N = -(-n // L) * L
    pad = [(0, 0), (0, N - n), (0, 0), (0, 0)]
    out, _ = oracle.dilated_attention(*(np.pad(x, pad) for x in (q, k, v)), segment_lengths=w,
                                      dilation_rates=r, mix=mix, is_causal=True)
    return out[:, :n]


def splits(n):
    """Ways of cutting ``n = 32`` tokens, with few distinct chunk lengths (one JAX program each):
    one prefill; a prompt shorter than one segment, single tokens, chunks crossing segment
    boundaries, single tokens to the end; mixed chunks."""
    return [[n], [3] + [1] * 6 + [7, 7] + [1] * (n - 23), [7, 1, 3, 1, 3, 7, 1, 1, 1, 7]]


def torch_splits(n, w):
    """:func:`splits`, token by token and random chunks (torch compiles nothing)."""
    rng = np.random.default_rng(n)
    rand, left = [], n
    while left:
        rand.append(int(min(left, rng.integers(1, 2 * max(w) // 3 + 2))))
        left -= rand[-1]
    return splits(n) + [[1] * n, rand]


_jax_decode = jax.jit(ring_jax.decode)


def run_jax(q, k, v, split, w, r, mix):
    cache = ring_jax.init_cache(q.shape[0], q.shape[2], k.shape[2], D, w, r, mix=mix, dtype=jnp.float64)
    outs, p = [], 0
    for t in split:
        out, cache = _jax_decode(*(jnp.asarray(x[:, p:p + t]) for x in (q, k, v)), cache)
        outs.append(np.asarray(out))
        p += t
    return np.concatenate(outs, axis=1), cache


def run_torch(q, k, v, split, w, r, mix):
    cache = ring_torch.init_cache(q.shape[0], q.shape[2], k.shape[2], D, w, r, mix=mix, dtype=torch.float64)
    outs, p = [], 0
    for t in split:
        out, cache = ring_torch.decode(*(torch.from_numpy(x[:, p:p + t]) for x in (q, k, v)), cache)
        outs.append(out.numpy())
        p += t
    return np.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("w, r, h, h_kv, n", CONFIGS)
def test_jax_decode_equals_causal_forward(w, r, h, h_kv, n, mix):
    q, k, v = _inputs(h, h_kv, n)
    full = np.asarray(ring_jax.dilated_attention(*(jnp.asarray(x) for x in (q, k, v)), segment_lengths=w,
                                                 dilation_rates=r, mix=mix, is_causal=True))
    ref, _ = oracle.dilated_attention(q, k, v, segment_lengths=w, dilation_rates=r, mix=mix, is_causal=True)
    assert np.abs(full - ref).max() < 1e-10
    assert np.abs(extended_oracle(q, k, v, w, r, mix) - ref).max() < 1e-12  # the two definitions agree
    for split in splits(n):
        out, cache = run_jax(q, k, v, split, w, r, mix)
        assert np.abs(out - full).max() < 1e-12, split
        assert int(cache.position) == n


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("w, r, h, h_kv, n", CONFIGS)
def test_torch_decode_equals_causal_forward_and_jax(w, r, h, h_kv, n, mix):
    q, k, v = _inputs(h, h_kv, n, seed=1)
    full = ring_torch.dilated_attention(*(torch.from_numpy(x) for x in (q, k, v)), segment_lengths=w,
                                        dilation_rates=r, mix=mix, is_causal=True).numpy()
    for split in torch_splits(n, w):
        out, cache = run_torch(q, k, v, split, w, r, mix)
        assert np.abs(out - full).max() < 1e-12, split
        assert cache.position == n
    out_jax, _ = run_jax(q, k, v, splits(n)[-1], w, r, mix)
    assert np.abs(out - out_jax).max() < 1e-12


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_any_length_against_extended_oracle(mix):
    """Lengths the forward refuses (21 is no multiple of any w) and a single token."""
    w, r, h, h_kv = (4, 8, 16), (1, 2, 4), 4, 2
    for n, split in ((21, [21]), (21, [7, 7, 7]), (21, [3, 1, 7, 3, 7]), (1, [1])):
        q, k, v = _inputs(h, h_kv, n, seed=n)
        ref = extended_oracle(q, k, v, w, r, mix)
        for run in (run_jax, run_torch):
            out, _ = run(q, k, v, split, w, r, mix)
            assert np.abs(out - ref).max() < 1e-10, (run.__name__, split)


def test_cache_bytes_constant_and_kv_heads_stored_once():
    w, r, h, h_kv = (4, 8, 16), (1, 2, 4), 4, 2
    q, k, v = _inputs(h, h_kv, 3 * 16 + 5)
    for mix, pairs in (("head_groups", (1, 1, 1)), ("longnet", (2, 4, 4))):
        # head_groups: heads (0, 1) share kv head 0 at one offset; longnet: head j at offset j % r
        # with kv head j // 2, so pattern 1 (r = 2) has the pairs (0, 0), (0, 1), (1, 0), (1, 1).
        expect = sum(2 * 2 * (wi // ri) * p * D * 8 for wi, ri, p in zip(w, r, pairs))
        for init, run in ((ring_jax.init_cache, run_jax), (ring_torch.init_cache, run_torch)):
            fresh = init(2, h, h_kv, D, w, r, mix=mix, **({"dtype": torch.float64} if run is run_torch
                                                          else {"dtype": jnp.float64}))
            assert [x.shape[2] for x in fresh.keys] == list(pairs)
            _, cache = run(q, k, v, [7] * 7 + [1] * 4, w, r, mix)
            position_bytes = 4 if run is run_jax else 0
            assert fresh.nbytes == cache.nbytes == expect + position_bytes


def test_one_compile_per_chunk_length():
    w, r, h, h_kv = (4, 8, 16), (1, 2, 4), 4, 2
    q, k, v = _inputs(h, h_kv, 32)
    traces = []

    def step(q, k, v, cache):
        traces.append(q.shape[1])
        return ring_jax.decode(q, k, v, cache)

    f = jax.jit(step, donate_argnums=3)
    cache = ring_jax.init_cache(2, h, h_kv, D, w, r, dtype=jnp.float64)
    outs, p = [], 0
    for t in [1] * 20 + [3] * 4:  # across the boundaries of every segment length
        out, cache = f(*(jnp.asarray(x[:, p:p + t]) for x in (q, k, v)), cache)
        outs.append(np.asarray(out))
        p += t
    assert traces == [1, 3]
    full = np.asarray(ring_jax.dilated_attention(*(jnp.asarray(x) for x in (q, k, v)), segment_lengths=w,
                                                 dilation_rates=r, is_causal=True))
    assert np.abs(np.concatenate(outs, axis=1) - full).max() < 1e-12


@pytest.mark.parametrize("init", [ring_jax.init_cache, ring_torch.init_cache])
def test_errors(init):
    with pytest.raises(ValueError, match="multiple of its dilation rate"):
        init(1, 4, 4, 8, (6,), (4,))
    with pytest.raises(ValueError, match="num_kv_heads"):
        init(1, 4, 3, 8, (8,), (2,))
    with pytest.raises(ValueError, match="head per pattern"):
        init(1, 1, 1, 8, (8, 16), (1, 2))
    cache = init(1, 4, 2, 8, (8,), (2,))
    decode = ring_jax.decode if init is ring_jax.init_cache else ring_torch.decode
    zeros = jnp.zeros if init is ring_jax.init_cache else torch.zeros
    with pytest.raises(ValueError, match="does not match the cache"):
        decode(zeros((1, 1, 4, 8)), zeros((1, 1, 4, 8)), zeros((1, 1, 4, 8)), cache)
