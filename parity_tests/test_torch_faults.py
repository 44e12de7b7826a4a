"""Faults of ring_torch's distributed ring (gloo, 2 and 4 CPU processes): every rank raises,
or finishes, within a deadline; nothing hangs.

One spawn per world size runs every scenario of that size in order (each rank writes its
results to a file); the spawn has a hard deadline, so a hang fails the tests instead of
stalling the suite. The timeout scenario leaves its process group unusable, so it runs last.
"""

from __future__ import annotations

import functools
import os
import time
import traceback
from datetime import timedelta

import numpy as np
import pytest

from parity_tests._spawn import spawn_ranks

torch = pytest.importorskip("torch")

SPAWN_DEADLINE_S = 120
W, R = (8, 32), (1, 2)  # n=32 on 4 ranks: L=8, w=32 spans all 4 ranks, w=8 is local
SPAN = dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4))  # on 4 ranks: g = 1, 2, 4


def _inputs(n, h=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, h, d, generator=g, dtype=torch.float64) for _ in range(3)]


def _shard(x, rank, world):
    L = x.shape[1] // world
    return x[:, rank * L:(rank + 1) * L]


def _error(call):
    start = time.perf_counter()
    try:
        call()
    except Exception as e:  # noqa: BLE001 (the test inspects the type)
        return {"type": type(e).__name__, "error": str(e), "seconds": time.perf_counter() - start}
    return {"type": None, "error": None, "seconds": time.perf_counter() - start}


def _all_gather_after_user_group(rank, world):
    """The user creates a group only rank 0 belongs to; the all_gather ring still runs."""
    import torch.distributed as dist

    import ring_torch

    dist.new_group([0])
    q, k, v = _inputs(32)
    ref = ring_torch.dilated_attention(q, k, v, **SPAN, is_causal=True)
    out = ring_torch.ring_dilated_attention(*(_shard(x, rank, world) for x in (q, k, v)), **SPAN,
                                            is_causal=True, process_group=dist.group.WORLD,
                                            comm="all_gather", timeout=30)
    return {"err": (out - _shard(ref, rank, world)).abs().max().item()}


def _all_gather_point_to_point(rank, world):
    """A process group of only some processes: the all_gather exchange runs point to point
    (forced here on the whole world); forward and backward equal the single-device layer."""
    import torch.distributed as dist

    import ring_torch
    import ring_torch._comm as comm

    q, k, v = _inputs(32, seed=1)
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = ring_torch.dilated_attention(*qkv, **SPAN, mix="longnet")
    ref.sum().backward()
    local = [_shard(x, rank, world).clone().requires_grad_() for x in (q, k, v)]
    original = comm._sub_ring_groups
    comm._sub_ring_groups = lambda dist, group, g: None
    try:
        out = ring_torch.ring_dilated_attention(*local, **SPAN, mix="longnet",
                                                process_group=dist.group.WORLD, comm="all_gather")
        out.sum().backward()
    finally:
        comm._sub_ring_groups = original
    errs = [(out - _shard(ref, rank, world)).abs().max().item()]
    errs += [(x.grad - _shard(y.grad, rank, world)).abs().max().item() for x, y in zip(local, qkv)]
    return {"err": max(errs)}


def _one_rank_invalid(rank, world):
    """Rank 3 passes 12 tokens, the others 8: rank 3's sharding is invalid only locally."""
    import torch.distributed as dist

    import ring_torch

    q, k, v = _inputs(12 if rank == 3 else 8)
    return _error(lambda: ring_torch.ring_dilated_attention(
        q, k, v, segment_lengths=W, dilation_rates=R, process_group=dist.group.WORLD, timeout=30))


def _one_rank_bad_argument(rank, world):
    """Rank 1 passes a string as is_causal: a TypeError there, a ValueError everywhere."""
    import torch.distributed as dist

    import ring_torch

    q, k, v = (_shard(x, rank, world) for x in _inputs(32))
    return _error(lambda: ring_torch.ring_dilated_attention(
        q, k, v, segment_lengths=W, dilation_rates=R, is_causal="yes" if rank == 1 else False,
        process_group=dist.group.WORLD, timeout=30))


def _config_differs(rank, world):
    """Rank 2 passes other segment lengths and causality: both fields are named."""
    import torch.distributed as dist

    import ring_torch

    q, k, v = (_shard(x, rank, world) for x in _inputs(32))
    w = (8, 16) if rank == 2 else W
    return _error(lambda: ring_torch.ring_dilated_attention(
        q, k, v, segment_lengths=w, dilation_rates=[1, 2], is_causal=rank == 2,
        process_group=dist.group.WORLD, timeout=30))


def _all_invalid_alike(rank, world):
    """Every rank invalid the same way: each raises its own error, unchanged."""
    import torch.distributed as dist

    import ring_torch

    q, k, v = (_shard(x, rank, world) for x in _inputs(32))
    return _error(lambda: ring_torch.ring_dilated_attention(
        q, k, v, segment_lengths=W, dilation_rates=R, softmax_scale=float("nan"),
        process_group=dist.group.WORLD, timeout=30))


def _absent_rank(rank, world):
    """The last rank never calls: the others raise TimeoutError after ``timeout`` seconds."""
    import torch.distributed as dist

    import ring_torch

    if rank == world - 1:
        time.sleep(6)
        return {"type": None, "error": None, "seconds": 0.0}
    q, k, v = (_shard(x, rank, world) for x in _inputs(32))
    return _error(lambda: ring_torch.ring_dilated_attention(
        q, k, v, segment_lengths=W, dilation_rates=R, process_group=dist.group.WORLD, timeout=2))


SCENARIOS = {
    4: [_all_gather_after_user_group, _all_gather_point_to_point, _one_rank_invalid,
        _one_rank_bad_argument, _config_differs, _all_invalid_alike, _absent_rank],
    2: [_all_gather_after_user_group, _absent_rank],
}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    results = {}
    for scenario in SCENARIOS[world]:
        try:
            results[scenario.__name__] = scenario(rank, world)
        except Exception:  # noqa: BLE001 (recorded; the comparing test reports it)
            results[scenario.__name__] = {"exception": traceback.format_exc()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    os._exit(0)  # the timeout scenario leaves a pending collective: no barrier, no teardown


@functools.cache
def _results(world: int) -> list[dict]:
    return spawn_ranks(_worker, world, deadline_s=SPAWN_DEADLINE_S, label="fault scenarios")


def _per_rank(world, scenario):
    per_rank = [res[scenario.__name__] for res in _results(world)]
    for rank, res in enumerate(per_rank):
        assert "exception" not in res, f"rank {rank}:\n{res['exception']}"
    return per_rank


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("world", [2, 4])
def test_all_gather_after_a_user_group_of_one_rank(world):
    for res in _per_rank(world, _all_gather_after_user_group):
        assert res["err"] < 1e-12


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
def test_all_gather_point_to_point_matches_single_device():
    for res in _per_rank(4, _all_gather_point_to_point):
        assert res["err"] < 1e-12


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
def test_a_rank_invalid_only_locally_fails_every_rank():
    for rank, res in enumerate(_per_rank(4, _one_rank_invalid)):
        assert res["type"] == "RingCheckError", (rank, res)
        assert "local_len: [8, 8, 8, 12]" in res["error"]
        assert ("rank 3 raised ValueError: pattern 0 (w=8, w'=8, r=1) with local length L=12 on "
                "P=4 ranks: L is not a multiple of w'") in res["error"]
        assert res["seconds"] < 20


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
def test_a_rank_with_a_bad_argument_fails_every_rank():
    for res in _per_rank(4, _one_rank_bad_argument):
        assert res["type"] == "RingCheckError"
        assert "is_causal: [False, 'yes', False, False]" in res["error"]
        assert "rank 1 raised TypeError: is_causal='yes' must be a bool" in res["error"]


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
def test_differing_fields_are_named_with_per_rank_values():
    for res in _per_rank(4, _config_differs):
        assert res["type"] == "RingCheckError"
        assert "segment_lengths: [(8, 32), (8, 32), (8, 16), (8, 32)]" in res["error"]
        assert "is_causal: [False, False, True, False]" in res["error"]
        assert "dilation_rates" not in res["error"]  # [1, 2] and (1, 2) agree


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
def test_the_same_error_everywhere_is_raised_unchanged():
    for res in _per_rank(4, _all_invalid_alike):
        assert res["type"] == "ValueError"
        assert res["error"] == "softmax_scale=nan must be a finite positive number or None"


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("world", [2, 4])
def test_an_absent_rank_times_out(world):
    per_rank = _per_rank(world, _absent_rank)
    for res in per_rank[:-1]:
        assert res["type"] == "TimeoutError"
        assert "timeout=2 s" in res["error"]
        assert 1.5 < res["seconds"] < 10
    np.testing.assert_equal(per_rank[-1]["type"], None)
