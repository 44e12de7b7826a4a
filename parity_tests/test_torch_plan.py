"""The static plan: head assignment, caches (hits, bounds, new lengths) and analytic FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from parity_tests.oracle import head_pairs
from ring_torch import DilatedConfig, build_plan, dilated_attention, get_stats, plan_flops
from ring_torch._plan import MASK_CACHE, PATTERN_CACHE, causal_mask


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("h,h_kv", [(12, 4), (7, 7), (6, 3)])
def test_plan_assigns_the_oracle_pairs(mix, h, h_kv):
    w, r = (4, 8, 16, 32, 32), (1, 2, 2, 4, 8)
    plan = build_plan(DilatedConfig(w, r, mix), 32, h, h_kv)
    pairs = [[] for _ in range(h)]
    for u in plan.units:
        heads = list(range(*u.q_heads))
        kv = list(u.kv_index) if u.kv_index is not None else [
            j for j in range(*u.kv_heads) for _ in range(u.kv_repeat)]
        assert kv == [j // (h // h_kv) for j in heads]  # GQA mapping preserved
        for j in heads:
            pairs[j].append((u.pattern, u.offset))
    assert [sorted(p) for p in pairs] == [sorted(p) for p in head_pairs(h, w, r, mix)]


def _run(n, causal=False, backend="math"):
    q = torch.randn(1, n, 2, 8)
    return dilated_attention(q, q, q, segment_lengths=(8, 16), dilation_rates=(1, 2),
                             is_causal=causal, backend=backend)


def test_pattern_cache_hits_and_new_length_misses_once():
    PATTERN_CACHE.clear()
    builds = get_stats()["plan_builds"]
    _run(32)
    assert get_stats()["pattern"]["misses"] == 1 and get_stats()["plan_builds"] == builds + 1
    for _ in range(3):
        _run(32)
    stats = get_stats()["pattern"]
    assert stats["hits"] == 3 and stats["misses"] == 1 and stats["entries"] == 1
    _run(64)  # a new sequence length is a new key: one miss, then hits
    _run(64)
    stats = get_stats()["pattern"]
    assert stats["misses"] == 2 and stats["hits"] == 4 and stats["entries"] == 2
    assert get_stats()["plan_builds"] == builds + 2


def test_mask_cache_hits_and_misses():
    MASK_CACHE.clear()
    _run(32, causal=True)  # rows m = 8 for both patterns: one mask
    assert MASK_CACHE.get_stats() == {"hits": 1, "misses": 1, "entries": 1,
                                      "maxsize": MASK_CACHE.maxsize}
    _run(32, causal=True)
    assert MASK_CACHE.get_stats()["hits"] == 3
    _run(16, causal=True)  # w' = 8 and 16: rows m = 8 again, so only hits
    assert MASK_CACHE.get_stats()["misses"] == 1


@pytest.mark.parametrize("cache", [PATTERN_CACHE, MASK_CACHE], ids=["pattern", "mask"])
def test_caches_stay_bounded(cache):
    cache.clear()
    for i in range(cache.maxsize + 20):
        if cache is MASK_CACHE:
            causal_mask(i + 1, torch.device("cpu"))
        else:
            build_plan(DilatedConfig((1,), (1,)), i + 1, 1, 1)
    stats = cache.get_stats()
    assert stats["entries"] == cache.maxsize and stats["misses"] == cache.maxsize + 20
    # Least recently used went first: the newest key is still there, the oldest is not.
    if cache is MASK_CACHE:
        causal_mask(cache.maxsize + 20, torch.device("cpu"))
        assert cache.get_stats()["hits"] == 1
        causal_mask(1, torch.device("cpu"))
        assert cache.get_stats()["misses"] == cache.maxsize + 21


FLOP_CASES = [
    ("head_groups", False, 6, 6, (8, 16, 32), (1, 2, 4)),
    ("head_groups", True, 12, 4, (4, 8, 16, 32, 32), (1, 2, 2, 4, 8)),
    ("longnet", False, 6, 3, (8, 16, 32), (1, 2, 4)),
    ("longnet", True, 4, 2, (16, 64), (2, 4)),
]


@pytest.mark.parametrize("mix,causal,h,h_kv,w,r", FLOP_CASES)
def test_flop_counter_matches_plan(mix, causal, h, h_kv, w, r):
    b, n, d = 2, 64, 16
    q, k = torch.randn(b, n, h, d), torch.randn(b, n, h_kv, d)
    with FlopCounterMode(display=False) as counter:
        dilated_attention(q, k, k, segment_lengths=w, dilation_rates=r, mix=mix,
                          is_causal=causal, backend="math")
    expected = plan_flops(batch=b, seq_len=n, num_heads=h, num_kv_heads=h_kv, head_dim=d,
                          segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal)
    # Exact: FlopCounterMode counts only matmuls, and the math backend's only matmuls are the
    # QK^T and PV of full m x m blocks (causal masks, softmax and the merge are not counted).
    assert counter.get_total_flops() == expected
    with FlopCounterMode(display=False) as counter:
        dilated_attention(q, k, k, segment_lengths=w, dilation_rates=r, mix=mix,
                          is_causal=causal, backend="torch")
    # torch 2.13 registers no FLOP formula for the CPU flash op; if a later one does, it counts
    # full blocks like the plan.
    assert counter.get_total_flops() in (0, expected)


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_flops_scale_linearly_past_max_w_and_quadratically_below_min_w(mix):
    w, r = (16, 32, 64), (1, 2, 4)

    def flops(n):
        return plan_flops(batch=1, seq_len=n, num_heads=6, head_dim=32, segment_lengths=w,
                          dilation_rates=r, mix=mix)

    for n in (64, 128, 256):  # n >= max(w): segments double, block size fixed
        assert flops(2 * n) == 2 * flops(n)
    for n in (4, 8):  # 2n <= min(w): one segment of n rows per pattern
        assert flops(2 * n) == 4 * flops(n)
