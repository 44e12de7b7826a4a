"""The balanced ring layout in ``ring_jax`` (zigzag: device j holds chunks j and 2P-1-j): the
permutation, exactness against the float64 reference on 2/4/8 simulated devices and the
simulated ring, equality with the contiguous layout (dropout, LSE), per-device causal work from
the plan for P = 2..16, the hops in the compiled program, and the errors."""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ring_jax
from parity_tests.frameworks import Case, max_abs_err, run_jax
from parity_tests.test_jax_ring import _compiled_permutes, executed_permutes, mesh_of
from parity_tests.test_parity_matrix import check_against_reference

# n = 128 on P = 8 (C = 8): w=8 local, w=16 spans 2 chunks (split), w=32 spans 4 (split), w=128 is
# the whole sequence (joint). On P = 4 (C = 16): local, local, split g=2, joint. On P = 2: local,
# local, local... w=32 = 2C split g=2, joint.
W, R = (8, 16, 32, 128), (1, 2, 2, 4)


def test_to_and_from_balanced():
    x = jnp.arange(2 * 16 * 3).reshape(2, 16, 3)
    y = ring_jax.to_balanced(x, 4)  # 8 chunks of 2 positions
    chunks = [int(c) for c in y[0, ::2, 0] // 6]
    assert chunks == [0, 7, 1, 6, 2, 5, 3, 4]
    assert jnp.array_equal(ring_jax.from_balanced(y, 4), x)
    assert jnp.array_equal(ring_jax.from_balanced(ring_jax.to_balanced(x, 2, axis=-2), 2, axis=-2), x)
    with pytest.raises(ValueError, match="seq_len=16 is not a multiple of 2 \\* num_devices=3"):
        ring_jax.to_balanced(x, 3)


@pytest.mark.parametrize("P", [2, 4, 8])
def test_shard_permutation_equals_to_balanced(P):
    """What sharded_dilated_attention does to each shard inside its program is to_balanced."""
    from ring_jax._layout import shard_from_balanced, shard_to_balanced

    mesh, spec = mesh_of(P), jax.sharding.PartitionSpec(None, "sp")
    x = jnp.arange(2 * 8 * P).reshape(2, 8 * P).astype(jnp.float32)
    run = lambda f: jax.shard_map(lambda s: f(s, "sp", P), mesh=mesh, in_specs=spec, out_specs=spec)  # noqa: E731
    balanced = run(shard_to_balanced)(x)
    assert jnp.array_equal(balanced, ring_jax.to_balanced(x, P))
    assert jnp.array_equal(run(shard_from_balanced)(balanced), x)


def _balanced(mesh):
    return lambda q, k, v, **kw: ring_jax.sharded_dilated_attention(q, k, v, mesh=mesh, return_lse=True,
                                                                    layout="balanced", **kw)


@pytest.mark.parametrize("P", [2, 4, 8])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_balanced_ring_matches_reference(P, mix, causal):
    case = Case(128, 4, 2, 8, W, R, mix, causal)
    x = case.inputs()
    fn = _balanced(mesh_of(P))
    check_against_reference(run_jax(case, x, lambda q, k, v: fn(q, k, v, **case.kwargs)), case, x)


@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_balanced_ring_with_lengths(P, causal):
    case = Case(128, 4, 2, 8, W, R, "longnet", causal, batch=3, seq_lengths=(0, 77, 128))
    x = case.inputs()
    fn = _balanced(mesh_of(P))
    got = run_jax(case, x, lambda q, k, v: fn(q, k, v, **case.kwargs))
    check_against_reference(got, case, x)
    for g in (got.dq, got.dk, got.dv):  # padded q, k, v get exactly no gradient
        assert not g[0].any() and not g[1, 77:].any()


@pytest.mark.parametrize("n, seq_lengths", [(128, None), (53, None), (100, (0, 41))])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_simulated_balanced_ring_matches_reference(n, seq_lengths, causal):
    """``dilated_attention(ring_size=4, layout="balanced")``: natural order in and out, any n."""
    case = Case(n, 4, 2, 8, W, R, "head_groups", causal, seq_lengths=seq_lengths)
    x = case.inputs()
    fn = lambda q, k, v: ring_jax.dilated_attention(q, k, v, ring_size=4, layout="balanced", return_lse=True,  # noqa: E731
                                                    **case.kwargs)
    check_against_reference(run_jax(case, x, fn), case, x)


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_dropout_and_lse_equal_the_contiguous_layout(mix):
    """Same seed, same mask: the balanced ring computes the contiguous ring's values."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 128, h, 8))) for h in (4, 2, 2))
    kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True, dropout_rate=0.3, dropout_seed=11,
              return_lse=True)
    mesh = mesh_of(4)
    ours = ring_jax.sharded_dilated_attention(q, k, v, mesh=mesh, layout="balanced", **kw)
    contiguous = ring_jax.sharded_dilated_attention(q, k, v, mesh=mesh, **kw)
    simulated = ring_jax.dilated_attention(q, k, v, ring_size=8, layout="balanced", **kw)
    for a, b, c in zip(ours, contiguous, simulated):
        assert max_abs_err(a, b) <= 1e-12 and max_abs_err(c, b) <= 1e-12
    no_drop = ring_jax.sharded_dilated_attention(q, k, v, mesh=mesh, layout="balanced",
                                                 **{**kw, "dropout_rate": 0.0})
    assert max_abs_err(no_drop[0], ours[0]) > 1e-3  # the mask does something


def test_own_shard_map_in_balanced_order():
    """A caller keeping its data in balanced order calls ring_dilated_attention in its shard_map."""
    P, mesh, spec = 4, mesh_of(4), jax.sharding.PartitionSpec(None, "sp")
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 128, h, 8))) for h in (4, 2, 2))
    kw = dict(segment_lengths=W, dilation_rates=R, mix="longnet", is_causal=True)
    f = jax.jit(jax.shard_map(lambda q, k, v: ring_jax.ring_dilated_attention(q, k, v, axis_name="sp",
                                                                               layout="balanced", **kw),
                              mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False))
    out = ring_jax.from_balanced(f(*(ring_jax.to_balanced(x, P) for x in (q, k, v))), P)
    assert max_abs_err(out, ring_jax.dilated_attention(q, k, v, **kw)) <= 1e-12


def _work(ru, causal=True):
    """Per-device total work and the synchronised critical path (sum over hops of the max)."""
    hops = [[ru.hop_work(t, a, causal) for a in range(ru.group)] for t in range(ru.group)]
    totals = [sum(h[a] for h in hops) for a in range(ru.group)]
    return totals, sum(max(h) for h in hops)


def _spanning_groups(P):
    """Chunk counts ``g`` of every pattern the balanced layout accepts with P devices."""
    return [2 * P] + [g for g in range(2, P + 1) if P % g == 0]


@pytest.mark.parametrize("P", range(2, 17))
def test_causal_work_per_device_is_balanced(P):
    C = 4
    for g in _spanning_groups(P):
        config = ring_jax.DilatedConfig((g * C,), (1,), is_causal=True)
        (ru,) = ring_jax.get_ring_plan(config, 2 * C, P, 1, 1, layout="balanced").units
        totals, critical = _work(ru)
        mean = sum(totals) / len(totals)
        assert max(totals) / mean <= 1.1 and critical / mean <= 1.1, (P, g, totals, critical)
        if g % 2 == 0 and g <= 2 * P:  # the same pattern on contiguous shards: not balanced
            (cu,) = ring_jax.get_ring_plan(config, 2 * C, P, 1, 1).units
            c_totals, c_critical = _work(cu)
            assert max(c_totals) / (sum(c_totals) / len(c_totals)) > 1.1 or cu.group == 1, (P, g, c_totals)


@pytest.mark.parametrize("causal", [True, False])
def test_hops_are_what_the_plan_says(causal):
    P, L, b, d = 4, 32, 2, 16
    cfg = dict(segment_lengths=(8, 32, 64, 128), dilation_rates=(1, 2, 2, 4), mix="longnet", is_causal=causal)
    plan = ring_jax.get_ring_plan(ring_jax.DilatedConfig(**cfg), L, P, 6, 3, layout="balanced")
    assert [ru.group for ru in plan.units] == [1, 2, 4, 4]  # local, split g=2, split g=4, joint (P devices)
    mesh, spec = mesh_of(P), jax.sharding.PartitionSpec(None, "sp")
    f = jax.shard_map(lambda q, k, v: ring_jax.ring_dilated_attention(q, k, v, axis_name="sp", layout="balanced",
                                                                       **cfg).sum()[None],
                      mesh=mesh, in_specs=(spec,) * 3, out_specs=jax.sharding.PartitionSpec("sp"), check_vma=False)
    q, k = jnp.zeros((b, L * P, 6, d), jnp.float32), jnp.zeros((b, L * P, 3, d), jnp.float32)
    fwd = executed_permutes(jax.jit(f).lower(q, k, k).compile().as_text())
    expected = collections.Counter()
    for ru in plan.units:
        if ru.group > 1:  # both chunks of K and V, L/2/r rows of each distinct pair
            shape = f"f32[{b},2,{L // 2 // ru.unit.r},2,{len(ru.pair_heads)},{d}]"
            expected[shape] += ru.group - 1
            assert 4 * math.prod(int(x) for x in shape[4:-1].split(",")) == ru.hop_bytes(b, d, 4)
    assert fwd == expected and sum(fwd.values()) == plan.num_permutes()
    # sharded_dilated_attention in natural order adds two permutes per array: q, k, v, out (its
    # loss does not read the LSE)
    natural = _compiled_permutes(P, L, {**cfg, "layout": "balanced"})
    assert sum(natural.values()) == plan.num_permutes() + 2 * 4


def test_local_patterns_stay_local_below_half_a_shard():
    cfg = dict(segment_lengths=(8, 16), dilation_rates=(1, 2), mix="longnet", is_causal=True, layout="balanced")
    ring = [s for s in _compiled_permutes(4, 32, cfg, grad=True) if s.count(",") > 3]  # [b, 2, m, 2, p, d] hops
    assert ring == []


def test_layout_errors():
    x = jnp.zeros((1, 48, 2, 4))
    kw = dict(segment_lengths=(16,), dilation_rates=(1,))
    with pytest.raises(ValueError, match="layout='zigzag' must be one of"):
        ring_jax.dilated_attention(x, x, x, ring_size=2, layout="zigzag", **kw)
    with pytest.raises(ValueError, match="layout='zigzag' must be one of"):
        ring_jax.dilated_attention(x, x, x, layout="zigzag", **kw)
    with pytest.raises(ValueError, match="seq_len=45 is not a multiple of 2 \\* num_devices=5"):
        ring_jax.get_ring_plan(ring_jax.DilatedConfig(**kw), 9, 5, 2, 2, layout="balanced")
    # P = 3 (C = 8): w = 16 spans 2 chunks, neither 2P = 6 nor a divisor of P
    with pytest.raises(ValueError, match="pattern 0 \\(w=16, r=1\\) spans g=2 chunks.*layout='contiguous'"):
        ring_jax.get_ring_plan(ring_jax.DilatedConfig(**kw), 16, 3, 2, 2, layout="balanced")
    # C = 6 is not a multiple of w = 4
    with pytest.raises(ValueError, match="layout='balanced' \\(2 chunks of C=6.*use layout='contiguous'"):
        ring_jax.get_ring_plan(ring_jax.DilatedConfig((4,), (1,)), 12, 2, 2, 2, layout="balanced")
