"""ring_jax on one device: transformations, plan caching, causality, errors, FLOP scaling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ring_jax
from parity_tests.frameworks import Case, max_abs_err, run_jax
from parity_tests.oracle import dilated_attention as oracle
from parity_tests.test_parity_matrix import check_against_reference

LONGNET = dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4))


def _qkv(b=2, n=64, h=6, h_kv=3, d=16, dtype=jnp.float64, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(k1, (b, n, h, d), dtype), jax.random.normal(k2, (b, n, h_kv, d), dtype),
            jax.random.normal(k3, (b, n, h_kv, d), dtype))


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_vmap_equals_loop(mix):
    q, k, v = _qkv()
    f = lambda q, k, v: ring_jax.dilated_attention(q, k, v, mix=mix, is_causal=True, **LONGNET)  # noqa: E731
    stacked = [jnp.stack([x, 2 * x]) for x in (q, k, v)]
    batched = jax.vmap(f)(*stacked)
    for i in range(2):
        assert max_abs_err(batched[i], f(*(x[i] for x in stacked))) <= 1e-12


def test_plan_is_built_once_per_shape():
    # A config no other test uses, so its plan is not cached yet.
    cfg = dict(segment_lengths=(12, 24), dilation_rates=(3, 2))
    f = jax.jit(lambda q, k, v: ring_jax.dilated_attention(q, k, v, **cfg))
    q, k, v = _qkv(n=48, h=4, h_kv=4)
    before = ring_jax.build_count()
    for _ in range(10):
        f(q, k, v).block_until_ready()
    for _ in range(10):  # eager calls hit the memo too
        ring_jax.dilated_attention(q, k, v, **cfg)
    assert ring_jax.build_count() == before + 1
    q2, k2, v2 = _qkv(n=96, h=4, h_kv=4)
    for _ in range(3):
        f(q2, k2, v2).block_until_ready()
    assert ring_jax.build_count() == before + 2


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_causality_bit_identical(mix):
    q, k, v = _qkv()
    f = jax.jit(lambda q, k, v: ring_jax.dilated_attention(q, k, v, mix=mix, is_causal=True, **LONGNET))
    out = f(q, k, v)
    for p in (0, 7, 31, 50):
        v2 = v.at[:, p + 1:].set(1e3 * jax.random.normal(jax.random.PRNGKey(p), v[:, p + 1:].shape, v.dtype))
        k2 = k.at[:, p + 1:].set(-k[:, p + 1:])
        out2 = f(q, k2, v2)
        assert jnp.array_equal(out[:, :p + 1], out2[:, :p + 1]), p
        assert not jnp.array_equal(out[:, p + 1:], out2[:, p + 1:])


@pytest.mark.parametrize("is_causal", [False, True])
def test_single_pattern_equals_dense_attention(is_causal):
    q, k, v = _qkv(n=32, h=4, h_kv=2, dtype=jnp.float32)
    ours = ring_jax.dilated_attention(q, k, v, segment_lengths=(32,), dilation_rates=(1,), is_causal=is_causal)
    dense = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")
    assert jnp.allclose(ours, dense, atol=2e-6, rtol=2e-6)


@st.composite
def valid_cases(draw):
    """Random valid configs: powers of two keep ``w' % r`` and ``n % w'`` valid by construction."""
    n = 2 ** draw(st.integers(3, 6))
    K = draw(st.integers(1, 3))
    ws = [2 ** draw(st.integers(1, 7)) for _ in range(K)]
    rs = [2 ** draw(st.integers(0, int(np.log2(min(w, n))))) for w in ws]
    mix = draw(st.sampled_from(["head_groups", "longnet"]))
    h_kv = draw(st.sampled_from([1, 2, 3]))
    h = h_kv * draw(st.integers(max(1, -(-K // h_kv)), 4))
    return Case(n, h, h_kv, draw(st.sampled_from([4, 8])), tuple(ws), tuple(rs), mix, draw(st.booleans()),
                batch=draw(st.integers(1, 2)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_cases(), st.integers(0, 2**16))
def test_property_random_configs_match_oracle(case, seed):
    x = case.inputs(seed)
    check_against_reference(run_jax(case, x), case, x)


ERRORS = [
    (dict(segment_lengths=(8, 16), dilation_rates=(1,)), {}, "equal length"),
    (dict(segment_lengths=(), dilation_rates=()), {}, "non-empty"),
    (dict(segment_lengths=(0,), dilation_rates=(1,)), {}, r"segment length w=0 must be positive"),
    (dict(segment_lengths=(8,), dilation_rates=(-2,)), {}, r"dilation rate r=-2 must be positive"),
    (dict(segment_lengths=(12,), dilation_rates=(5,)), {}, "12 .* not a multiple of r=5"),
    (dict(segment_lengths=(8, 16, 32, 64, 8, 8, 8), dilation_rates=(1,) * 7), {}, "num_heads=6 < num_patterns=7"),
    (dict(LONGNET, mix="both"), {}, "mix='both'"),
    (LONGNET, dict(h_kv=4), "num_heads=6 is not a multiple of num_kv_heads=4"),
]


@pytest.mark.parametrize("kwargs,shape_kw,message", ERRORS)
def test_errors_name_the_values(kwargs, shape_kw, message):
    q, k, v = _qkv(**shape_kw)
    with pytest.raises(ValueError, match=message):
        ring_jax.dilated_attention(q, k, v, **kwargs)


def test_input_errors_name_the_values():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"query must be \[batch, seq, heads, head_dim\], got shape \(64, 6, 16\)"):
        ring_jax.dilated_attention(q[0], k, v, **LONGNET)
    with pytest.raises(ValueError, match="dtypes differ: query float32"):
        ring_jax.dilated_attention(q.astype(jnp.float32), k, v, **LONGNET)
    with pytest.raises(ValueError, match="differ in batch, seq or head_dim"):
        ring_jax.dilated_attention(q, k[:, :32], v[:, :32], **LONGNET)
    with pytest.raises(ValueError, match="key shape"):
        ring_jax.dilated_attention(q, k, v[..., :8], **LONGNET)


def test_empty_rows_are_zero_not_nan():
    # head_groups: a head of group i outputs 0 on rows pattern i does not select; lse is -inf.
    q, k, v = _qkv(h=2, h_kv=2)
    out, lse = ring_jax.dilated_attention(q, k, v, segment_lengths=(8, 8), dilation_rates=(2, 2), return_lse=True)
    assert jnp.all(out[:, 1::2, 0] == 0) and jnp.all(lse[:, 1::2, 0] == -jnp.inf)
    assert jnp.all(out[:, 0::2, 1] == 0) and jnp.all(jnp.isfinite(out))
    g = jax.grad(lambda q: ring_jax.dilated_attention(q, k, v, segment_lengths=(8, 8), dilation_rates=(2, 2)).sum())(q)
    assert jnp.all(jnp.isfinite(g))
    ref, _ = oracle(q, k, v, segment_lengths=(8, 8), dilation_rates=(2, 2))
    assert max_abs_err(out, ref) < 1e-12


def _xla_flops(n, h=4, d=64, mix="longnet", is_causal=False, **cfg):
    q = jnp.zeros((1, n, h, d), jnp.float32)
    f = jax.jit(lambda q, k, v: ring_jax.dilated_attention(q, k, v, mix=mix, is_causal=is_causal, **cfg))
    cost = f.lower(q, q, q).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    plan = ring_jax.get_plan(ring_jax.DilatedConfig(mix=mix, is_causal=is_causal, **cfg), n, h, h)
    return cost["flops"], plan.flops(1, d), sum((n // u.w) * len(u.heads) * u.m * u.m for u in plan.units)


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_xla_flops_match_plan_and_scale_linearly(mix, is_causal):
    cfg = dict(segment_lengths=(16, 32, 64), dilation_rates=(1, 2, 4), mix=mix, is_causal=is_causal)
    counts = {n: _xla_flops(n, **cfg) for n in (8, 16, 64, 128, 256, 512)}
    for n, (xla, analytic, scores) in counts.items():
        # XLA also counts the elementwise work on each score (scale, mask, max, exp, sum, divide:
        # at most ~20 FLOPs a score here) and the LSE merge (linear in n); the matmuls dominate.
        assert analytic <= xla <= analytic + 24 * scores + 64 * n * 4 * 64 * 3, (n, xla, analytic)
    # The O(n) claim: doubling n doubles the work once n >= max(w) ...
    for n in (64, 128, 256):
        assert counts[2 * n][1] == 2 * counts[n][1]
        assert 1.95 <= counts[2 * n][0] / counts[n][0] <= 2.05
    # ... and quadruples it while every segment is the whole sequence (n <= min(w)); XLA's ratio
    # sits a little under 4 because the LSE merge, linear in n, weighs most at tiny n.
    assert counts[16][1] == 4 * counts[8][1]
    assert 3.6 <= counts[16][0] / counts[8][0] <= 4.05


def test_ring_jax_imports_and_runs_without_torch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
            "import jax.numpy as jnp, ring_jax\n"
            "x = jnp.ones((1, 16, 2, 8))\n"
            "ring_jax.dilated_attention(x, x, x, segment_lengths=(8,), dilation_rates=(2,), ring_size=2)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
