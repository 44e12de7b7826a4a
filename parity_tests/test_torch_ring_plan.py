"""The torch ring plan mirrors the JAX ring plan (``ring_jax._ring_plan``): same units, same sub-ring
sizes, same distinct (kv head, offset) pairs on the wire, same query-to-pair map, same bytes per
hop, the same partial last sub-rings, and the same shardings refused. Also checks the plan's
structure on its own."""

from __future__ import annotations

import itertools

import pytest

import ring_torch
from ring_torch import DilatedConfig, build_ring_plan

# (n, P, h, h_kv, segment_lengths, dilation_rates)
CONFIGS = [
    (64, 4, 6, 3, (8, 32, 64), (1, 2, 4)),
    (64, 4, 8, 2, (16, 64), (2, 4)),
    (64, 2, 4, 4, (8, 16), (1, 2)),
    (128, 8, 12, 4, (4, 8, 16, 32, 64), (1, 2, 2, 4, 8)),
    (64, 4, 4, 1, (128, 256), (2, 4)),  # w > n: w' = n
    (96, 3, 6, 6, (32, 96), (1, 4)),
    # partial last segments spanning ranks: the last sub-ring has fewer ranks
    (64, 4, 4, 2, (8, 48), (1, 2)),  # [0, 3) and [3, 4)
    (96, 4, 4, 1, (8, 72), (1, 2)),  # L=24: the last segment on 1 of 3 ranks
    (96, 3, 2, 2, (64,), (1,)),  # [0, 2) and [2, 3)
    (160, 5, 4, 2, (64, 96), (2, 4)),  # [0,2) [2,4) [4,5); [0,3) [3,5)
]
MIXES = ("head_groups", "longnet")
INVALID = [
    (64, 4, 2, 2, (8, 32), (1, 32)),  # L=16 % r=32
    (96, 4, 2, 2, (16, 96), (1, 2)),  # L=24 % w=16
    (64, 4, 2, 2, (40,), (1,)),  # w=40 > L=16 is no multiple of L
    (48, 3, 2, 2, (8, 32), (1, 32)),  # partial last segment, but L=16 % r=32
]


def _jax_plan(n, P, h, h_kv, w, r, mix):
    ring_jax_ring = pytest.importorskip("ring_jax._ring_plan")
    from ring_jax._config import DilatedConfig as JaxConfig

    return ring_jax_ring.get_ring_plan(JaxConfig(w, r, mix), n // P, P, h, h_kv)


IDS = [f"n{c[0]}-P{c[1]}-h{c[2]}-kv{c[3]}" for c in CONFIGS]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("mix", MIXES)
def test_units_pairs_and_bytes_match_the_jax_ring_plan(config, mix):
    n, P, h, h_kv, w, r = config
    jplan = _jax_plan(n, P, h, h_kv, w, r, mix)
    tplan = build_ring_plan(DilatedConfig(w, r, mix), n // P, P, h, h_kv)
    assert len(tplan.units) == len(jplan.units)
    for tu, ju in zip(tplan.units, jplan.units):
        assert tu.pattern == ju.unit.pattern
        assert tu.segment == ju.unit.w and tu.rate == ju.unit.r
        assert tu.heads == ju.unit.heads and tu.offsets == ju.unit.offsets
        assert tu.group == ju.group
        assert tu.last_group == ju.last_group
        assert list(tu.sizes(P)) == list(ju.sizes(P))
        assert tu.pairs == tuple(zip(ju.pair_heads, ju.pair_offsets))
        assert tu.q_to_pair == ju.q_to_pair
        if tu.group > 1:
            assert tu.hop_bytes(2, n // P, 16, 4) == ju.hop_bytes(2, 16, 4)
    assert tplan.num_permutes() == jplan.num_permutes()
    assert tplan.num_permutes(True) == jplan.num_permutes(True)


@pytest.mark.parametrize("config", INVALID, ids=[f"invalid{i}" for i in range(len(INVALID))])
@pytest.mark.parametrize("mix", MIXES)
def test_same_shardings_refused(config, mix):
    n, P, h, h_kv, w, r = config
    with pytest.raises(ValueError) as torch_error:
        build_ring_plan(DilatedConfig(w, r, mix), n // P, P, h, h_kv)
    with pytest.raises(ValueError):
        _jax_plan(n, P, h, h_kv, w, r, mix)
    message = str(torch_error.value)
    if message.startswith("pattern"):
        assert f"L={n // P}" in message and f"P={P}" in message


@pytest.mark.parametrize("config", CONFIGS, ids=[f"n{c[0]}-P{c[1]}" for c in CONFIGS])
@pytest.mark.parametrize("mix", MIXES)
def test_plan_structure(config, mix):
    """Local units exactly where ``w' <= L``; every query head's pair has its kv head and offset;
    pairs are distinct; heads of head_groups units are contiguous and cover all heads once."""
    n, P, h, h_kv, w, r = config
    L = n // P
    plan = build_ring_plan(DilatedConfig(w, r, mix), L, P, h, h_kv)
    for ru in plan.units:
        we = min(w[ru.pattern], n)
        assert ru.segment == we
        assert ru.group == (we // L if we > L else 1)
        assert ru.last_group == (n % we // L if we > L else 0)
        if ru.group > 1:
            assert len(set(ru.pairs)) == len(ru.pairs)
            for j, o, p in zip(ru.heads, ru.offsets, ru.q_to_pair):
                assert ru.pairs[p] == (j // (h // h_kv), o)
    if mix == "head_groups":
        heads = itertools.chain.from_iterable(ru.heads for ru in plan.units)
        assert sorted(heads) == list(range(h))
    else:
        assert [ru.pattern for ru in plan.units] == list(range(len(w)))
        assert all(ru.offsets == tuple(j % ru.rate for j in range(h)) for ru in plan.units)


def test_plan_is_cached():
    config = DilatedConfig((8, 32), (1, 2), "longnet")
    a = build_ring_plan(config, 16, 4, 4, 2)
    b = build_ring_plan(config, 16, 4, 4, 2)
    assert a is b
    assert ring_torch.get_stats()["pattern"]["hits"] >= 1


@pytest.mark.parametrize("w, r", [((8, 32), (1, 2)), ((16, 96), (1, 2)), ((12, 40, 64), (3, 4, 8)), ((64,), (4,))])
def test_padded_lengths_agree_with_the_jax_plan(w, r):
    """Both frameworks pad a sequence to the same length, on one device and for a simulated ring."""
    jax_plan = pytest.importorskip("ring_jax._plan")
    from ring_jax._config import DilatedConfig as JaxConfig
    from ring_jax._ring_plan import balanced_padded_length
    from ring_torch._ring_plan import ring_padded_length

    jax_config, torch_config = JaxConfig(w, r), ring_torch.DilatedConfig(w, r)
    for n in list(range(1, 130)) + [997, 1000, 4097]:
        assert torch_config.padded_length(n) == jax_plan.padded_length(jax_config, n), n
        for P in (2, 3, 4):
            assert ring_padded_length(torch_config, n, P) == jax_plan.padded_length(jax_config, n, 1, P), (n, P)
            assert (ring_padded_length(torch_config, n, P, "balanced")
                    == balanced_padded_length(jax_config, n, P)), (n, P, "balanced")
