"""A spanning pattern whose last segment is partial (``n % w != 0``) on the sharded JAX ring: the
last sub-ring has fewer devices and runs as a ring of its own size. Held to the float64 reference
(values, LSE, gradients), with lengths, documents and dropout; the hops in the compiled program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ring_jax
from parity_tests.frameworks import Case, max_abs_err, run_jax
from parity_tests.test_jax_ring import executed_permutes, mesh_of
from parity_tests.test_parity_matrix import check_against_reference

# (P, n, w, r): the spanning pattern's last segment covers fewer devices than the others.
PARTIAL = [
    (4, 64, (8, 48), (1, 2)),  # L = 16, w = 3L: segments of 3 devices, the last of 1
    (8, 64, (8, 24, 40), (1, 2, 4)),  # L = 8: w = 24 -> 3 + 3 + 2 devices, w = 40 -> 5 + 3
    (2, 64, (16, 96), (1, 2)),  # w > n: one segment of n, nothing partial (w' = n)
    (3, 48, (8, 32), (1, 2)),  # L = 16, g = 2, the last segment on 1 device
]


def _sharded(mesh, **extra):
    return lambda q, k, v, **kw: ring_jax.sharded_dilated_attention(q, k, v, mesh=mesh, return_lse=True, **kw,
                                                                    **extra)


@pytest.mark.parametrize("P, n, w, r", PARTIAL, ids=[f"P{c[0]}-n{c[1]}-w{'-'.join(map(str, c[2]))}" for c in PARTIAL])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_partial_segments_match_reference(P, n, w, r, mix, causal):
    case = Case(n, 4, 2, 8, w, r, mix, causal)
    x = case.inputs()
    fn = _sharded(mesh_of(P))
    check_against_reference(run_jax(case, x, lambda q, k, v: fn(q, k, v, **case.kwargs)), case, x)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_partial_segments_with_lengths_and_documents(causal):
    docs = ((10, 30, 1, 23), (64,))
    case = Case(64, 4, 2, 8, (8, 48), (1, 2), "longnet", causal, seq_lengths=(64, 41), documents=docs)
    x = case.inputs(seed=3)
    fn = _sharded(mesh_of(4))
    check_against_reference(run_jax(case, x, lambda q, k, v: fn(q, k, v, **case.kwargs)), case, x)


def test_partial_segments_dropout_equals_one_device():
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 64, h, 8))) for h in (4, 2, 2))
    kw = dict(segment_lengths=(8, 24, 40), dilation_rates=(1, 2, 4), mix="longnet", is_causal=True,
              dropout_rate=0.3, dropout_seed=5, return_lse=True)
    ring = ring_jax.sharded_dilated_attention(q, k, v, mesh=mesh_of(8), **kw)
    single = ring_jax.dilated_attention(q, k, v, **kw)
    for a, b in zip(ring, single):
        assert max_abs_err(a, b) <= 1e-12


def test_partial_plan_and_hops():
    P, L = 8, 8
    config = ring_jax.DilatedConfig((8, 24, 40), (1, 2, 4), "longnet", True)
    plan = ring_jax.get_ring_plan(config, L, P, 4, 2)
    spanning = [ru for ru in plan.units if ru.group > 1]
    assert [(ru.group, ru.last_group) for ru in spanning] == [(3, 2), (5, 3)]
    assert spanning[0].perm(P) == ((0, 1), (1, 2), (2, 0), (3, 4), (4, 5), (5, 3), (6, 7), (7, 6))
    # the backward's g - 1 = 2 hops bring a ring of 2 back round: dK/dV are home already
    assert spanning[0].home_perm(P)[-2:] == ((6, 6), (7, 7))
    assert spanning[0].home_perm(P)[:3] == spanning[0].perm(P)[:3]  # a full ring: one more hop
    mesh, spec = mesh_of(P), jax.sharding.PartitionSpec(None, "sp")
    f = jax.shard_map(lambda q, k, v: ring_jax.ring_dilated_attention(
        q, k, v, axis_name="sp", segment_lengths=(8, 24, 40), dilation_rates=(1, 2, 4), mix="longnet",
        is_causal=True).sum()[None], mesh=mesh, in_specs=(spec,) * 3, out_specs=jax.sharding.PartitionSpec("sp"),
        check_vma=False)
    q, k = jnp.zeros((1, L * P, 4, 8), jnp.float32), jnp.zeros((1, L * P, 2, 8), jnp.float32)
    assert sum(executed_permutes(jax.jit(f).lower(q, k, k).compile().as_text()).values()) == plan.num_permutes()


def test_other_layouts_keep_refusing_partial_spanning_segments():
    config = ring_jax.DilatedConfig((8, 48), (1, 2))
    with pytest.raises(ValueError, match="pattern 1 .*n is not a multiple of w.*use layout='contiguous'"):
        ring_jax.get_ring_plan(config, 16, 4, 2, 2, layout="balanced")
    # the simulated ring pads to whole segments instead (the same result)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((1, 64, 2, 4)))
    kw = dict(segment_lengths=(8, 48), dilation_rates=(1, 2), is_causal=True)
    assert max_abs_err(ring_jax.dilated_attention(x, x, x, ring_size=4, **kw),
                       ring_jax.dilated_attention(x, x, x, **kw)) <= 1e-12
