"""Partial last segments spanning ranks in the torch ring (contiguous layout, gloo process groups).

When ``n % w' != 0`` for a pattern with ``w' > L``, the last segment ``[n - n % w', n)`` spans only
``g' = (n % w') / L`` ranks: the last sub-ring runs as a ring of ``g'``. Checked in float64 against
the oracle (out, LSE) and the autograd reference (dq, dk, dv of every rank's shard), both
communicators, both mixes, causal and not, GQA / MQA, ``seq_lengths``, ``segment_ids``, dropout
equal to one device, the bytes each rank sends, and the plan (units, sub-ring sizes, bytes) in one
process. P = 2 cannot hold a partial spanning segment (``g <= 2`` and ``g = 2`` means ``w' = n``):
its case checks that the ring is unchanged there; P = 5 gives a last sub-ring of 2 ranks.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

from parity_tests._spawn import case_results, spawn_cases
from parity_tests.frameworks import max_abs_err
from parity_tests.oracle import dilated_attention as oracle_attention
from parity_tests.reference import reference_attention

SPAWN_DEADLINE_S = 200
DROPOUT_P, DROPOUT_SEED = 0.25, 7


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    world: int
    n: int
    h: int
    h_kv: int
    w: tuple[int, ...]
    r: tuple[int, ...]
    mix: str = "head_groups"
    causal: bool = False
    comm: str = "ring"
    kind: str = "grad"  # grad | dropout | balanced
    lengths: tuple[int, ...] | None = None
    documents: bool = False
    d: int = 8
    batch: int = 2

    @property
    def kwargs(self):
        return dict(segment_lengths=self.w, dilation_rates=self.r, mix=self.mix,
                    is_causal=self.causal)


# P=4, L=16: w'=48 -> sub-rings [0, 3) and the partial [3, 4) (g'=1).
P4 = dict(n=64, h=4, h_kv=2, w=(8, 48), r=(1, 2))
# P=4, L=24, MQA: w'=72 -> [0, 3) and [3, 4) (the last segment is 1 of 3 ranks).
P4_MQA = dict(n=96, h=4, h_kv=1, w=(8, 72), r=(1, 2))
# P=4, L=16: whole sub-rings of 2 and 4 next to the partial one of w'=48.
P4_MIXED = dict(n=64, h=6, h_kv=3, w=(32, 48, 64), r=(1, 2, 4))
# P=3, L=16: w'=32 -> [0, 2) and the partial [2, 3) (g'=1).
P3 = dict(n=48, h=4, h_kv=2, w=(8, 32), r=(1, 2))
# P=5, L=16: w'=48 -> [0, 3) and the partial [3, 5), a ring of 2 ranks.
P5 = dict(n=80, h=4, h_kv=2, w=(16, 48), r=(1, 2))
# P=2, L=16: every spanning segment is whole.
P2 = dict(n=32, h=4, h_kv=2, w=(8, 32), r=(1, 2))


def _name(tag, mix, causal, comm):
    return f"{tag}-{mix}-{'causal' if causal else 'full'}-{comm}"


def _cases():
    cases = []
    for mix in ("head_groups", "longnet"):
        for causal in (False, True):
            for comm in ("ring", "all_gather"):
                cases.append(Case(_name("p4", mix, causal, comm), 4, **P4, mix=mix, causal=causal,
                                  comm=comm))
    for tag, world, cfg in (("p3", 3, P3), ("p5", 5, P5)):
        for mix, causal, comm in (("head_groups", False, "ring"), ("head_groups", True, "all_gather"),
                                  ("longnet", True, "ring"), ("longnet", False, "all_gather")):
            cases.append(Case(_name(tag, mix, causal, comm), world, **cfg, mix=mix, causal=causal,
                              comm=comm))
    cases += [
        Case("p4mqa-longnet-causal-ring", 4, **P4_MQA, mix="longnet", causal=True),
        Case("p4mqa-head_groups-full-all_gather", 4, **P4_MQA, comm="all_gather"),
        Case("p4mixed-longnet-causal-ring", 4, **P4_MIXED, mix="longnet", causal=True),
        Case("p4mixed-head_groups-full-all_gather", 4, **P4_MIXED, comm="all_gather"),
        Case("p2-longnet-causal-ring", 2, **P2, mix="longnet", causal=True),
        Case("p4-lengths-longnet-full-ring", 4, **P4, mix="longnet", lengths=(50, 7)),
        Case("p3-documents-head_groups-causal-all_gather", 3, **P3, causal=True,
             comm="all_gather", lengths=(40, 48), documents=True),
        Case("p5-documents-longnet-full-ring", 5, **P5, mix="longnet", documents=True),
        Case("p4-dropout-longnet-causal-ring", 4, **P4, mix="longnet", causal=True, kind="dropout"),
        Case("p5-dropout-head_groups-full-all_gather", 5, **P5, comm="all_gather", kind="dropout"),
        Case("p4-balanced-refused", 4, **P4, kind="balanced"),
    ]
    return cases


ALL_CASES = _cases()
GRAD = [c for c in ALL_CASES if c.kind == "grad"]
DROPOUT = [c for c in ALL_CASES if c.kind == "dropout"]


def _documents(case: Case):
    """Global ``[batch, n]`` document ids: a few documents of uneven lengths, cutting segments."""
    cuts = [(11, 30, 41), (5, 37)]
    pos = torch.arange(case.n)
    return torch.stack([sum((pos >= c).long() for c in cuts[b % 2]) for b in range(case.batch)])


def _global_inputs(case: Case):
    g = torch.Generator().manual_seed(case.n + case.h)
    b, n, h, hk, d = case.batch, case.n, case.h, case.h_kv, case.d
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64)
               for s in ((b, n, h, d), (b, n, hk, d), (b, n, hk, d)))
    return q, k, v, torch.randn(b, n, h, d, generator=g, dtype=torch.float64), \
        torch.randn(b, n, h, generator=g, dtype=torch.float64)


def _masks(case: Case) -> dict:
    out = {}
    if case.lengths is not None:
        out["seq_lengths"] = torch.tensor(case.lengths)
    if case.documents:
        out["segment_ids"] = _documents(case)
    return out


def _shard(x, rank, world):
    L = x.shape[1] // world
    return x[:, rank * L:(rank + 1) * L]


def _grads(fn, q, k, v, dout, dlse):
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*xs)
    fin = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # rows with no key
    ((out.double() * dout).sum() + (fin.double() * dlse).sum()).backward()
    return {"out": out.detach(), "lse": lse.detach(), "dq": xs[0].grad, "dk": xs[1].grad,
            "dv": xs[2].grad}


def _run_case(case: Case, rank: int, world: int):
    import torch.distributed as dist

    import ring_torch

    q, k, v, dout, dlse = (_shard(x, rank, world) for x in _global_inputs(case))
    stats = ring_torch.CommStats()
    kw = dict(case.kwargs, **_masks(case), process_group=dist.group.WORLD, comm=case.comm,
              stats=stats, return_lse=True)
    if case.kind == "balanced":
        try:
            ring_torch.ring_dilated_attention(q, k, v, layout="balanced", **kw)
        except ValueError as e:
            return {"error": str(e), "sent": dict(stats.sent)}
        return {"error": None}
    if case.kind == "dropout":  # every rank its own seed: rank 0's wins
        kw.update(dropout_p=DROPOUT_P, dropout_seed=DROPOUT_SEED + rank)
    res = _grads(lambda *x: ring_torch.ring_dilated_attention(*x, **kw), q, k, v, dout, dlse)
    res = {key: t.numpy() for key, t in res.items()}
    return dict(res, sent=dict(stats.sent), exchanges=dict(stats.exchanges))


@functools.cache
def _results(world: int) -> list[dict]:
    return spawn_cases(__name__, ALL_CASES, world, deadline_s=SPAWN_DEADLINE_S,
                       label="partial ring tests")


def _per_rank(case: Case) -> list[dict]:
    return case_results(_results(case.world), case.name)


def _cat(per_rank, key):
    return np.concatenate([r[key] for r in per_rank], axis=1)


@functools.cache
def _expected(case: Case):
    q, k, v, dout, dlse = _global_inputs(case)
    masks = _masks(case)
    out, lse = oracle_attention(q.numpy(), k.numpy(), v.numpy(), **case.kwargs,
                                **{k_: m.numpy() for k_, m in masks.items()})
    ref = _grads(lambda *x: reference_attention(*x, **case.kwargs, **masks), q, k, v, dout, dlse)
    return {"out": out, "lse": lse, **{key: ref[key].numpy() for key in ("dq", "dk", "dv")}}


def _sub_ring_size(case: Case, pattern: int, rank: int) -> int:
    """Ranks of the sub-ring of ``rank`` for ``pattern``, from the definition: the segment
    holding the rank's rows, cut at ``n``, over ``L`` rows per rank (1: local)."""
    L, we = case.n // case.world, min(case.w[pattern], case.n)
    if we <= L:
        return 1
    start = rank * L // we * we
    return (min(start + we, case.n) - start) // L


def _pairs(case: Case, pattern: int) -> int:
    from parity_tests.oracle import head_pairs

    group = case.h // case.h_kv
    return len({(j // group, o) for j, pairs in enumerate(head_pairs(case.h, case.w, case.r, case.mix))
                for i, o in pairs if i == pattern})


def _ring_bytes(case: Case, rank: int) -> dict:
    """What rank ``rank`` sends with ``comm="ring"``: ``g - 1`` hops of K/V forward, again
    backward, and ``g - 1`` of dK/dV, ``g`` its sub-ring's size (nothing when ``g = 1``)."""
    L, expected = case.n // case.world, {}
    for i, r in enumerate(case.r):
        hops = _sub_ring_size(case, i, rank) - 1
        if hops:
            hop = 2 * case.batch * (L // r) * _pairs(case, i) * case.d * 8
            for phase in ("forward", "backward_kv", "backward_grad"):
                expected[(phase, i)] = hops * hop
    return expected


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("case", GRAD, ids=[c.name for c in GRAD])
def test_partial_ring_matches_oracle_and_reference(case):
    per_rank = _per_rank(case)
    ref = _expected(case)
    for key, tol in (("out", 1e-10), ("lse", 1e-10), ("dq", 1e-9), ("dk", 1e-9), ("dv", 1e-9)):
        assert max_abs_err(_cat(per_rank, key), ref[key]) <= tol, key


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("case", GRAD, ids=[c.name for c in GRAD])
def test_bytes_each_rank_sends(case):
    """Ring: per rank and pattern, the hops of its own sub-ring (a partial one sends less);
    all_gather: the same forward bytes (its block to ``g - 1`` peers). The plan agrees."""
    import ring_torch

    rplan = ring_torch.build_ring_plan(ring_torch.DilatedConfig(case.w, case.r, case.mix, case.causal),
                                       case.n // case.world, case.world, case.h, case.h_kv)
    for rank, res in enumerate(_per_rank(case)):
        expected = _ring_bytes(case, rank)
        forward = {key: b for key, b in expected.items() if key[0] == "forward"}
        if case.comm == "ring":
            assert res["sent"] == expected, rank
            assert sum(res["exchanges"].values()) == rplan.num_permutes(True, rank), rank
        else:
            assert {key: b for key, b in res["sent"].items() if key[0] == "forward"} == forward, rank
        plan = {i: b for i, b in rplan.forward_bytes(case.batch, case.d, 8, rank).items() if b}
        assert plan == {key[1]: b for key, b in forward.items()}, rank


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("case", DROPOUT, ids=[c.name for c in DROPOUT])
def test_partial_ring_dropout_equals_one_device(case):
    import ring_torch

    q, k, v, dout, dlse = _global_inputs(case)
    one = _grads(lambda *x: ring_torch.dilated_attention(
        *x, **case.kwargs, return_lse=True, dropout_p=DROPOUT_P, dropout_seed=DROPOUT_SEED),
        q, k, v, dout, dlse)
    per_rank = _per_rank(case)
    for key, value in one.items():
        assert max_abs_err(_cat(per_rank, key), value.numpy()) <= 1e-12, key


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
def test_balanced_layout_refuses_a_partial_spanning_segment_on_every_rank():
    (case,) = [c for c in ALL_CASES if c.kind == "balanced"]
    for res in _per_rank(case):
        assert res["error"] is not None and res["sent"] == {}
        assert res["error"].startswith("pattern 1 (w=48, w'=48, r=2) with n=64, chunk C=8 on P=4")
        assert "last segment would be partial" in res["error"]
        assert 'use layout="contiguous"' in res["error"]


@pytest.mark.parametrize("n, P, w, r, last", [
    (64, 4, (8, 48), (1, 2), {1: 1}),
    (96, 4, (8, 72), (1, 2), {1: 1}),
    (48, 3, (8, 32), (1, 2), {1: 1}),
    (80, 5, (16, 48), (1, 2), {1: 2}),
    (64, 4, (32, 48, 64), (1, 2, 4), {1: 1}),
    (160, 5, (64, 96), (2, 4), {0: 1, 1: 2}),
])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_plan_units_sub_rings_and_bytes(n, P, w, r, last, mix):
    """One process: each spanning unit's sub-rings ``(first rank, size)`` (the last of
    ``last_group`` ranks), its schedules, and the bytes and exchanges of every rank."""
    from ring_torch import DilatedConfig, build_ring_plan

    L, h, h_kv, b, d = n // P, 4, 2, 2, 8
    plan = build_ring_plan(DilatedConfig(w, r, mix), L, P, h, h_kv)
    for ru in plan.units:
        we = min(w[ru.pattern], n)
        if we <= L:
            assert ru.group == 1 and ru.last_group == 0
            continue
        g = we // L
        assert ru.group == g and ru.last_group == last.get(ru.pattern, 0) == (n % we) // L
        full = [(s, g) for s in range(0, P - ru.last_group, g)]
        tail = [(P - ru.last_group, ru.last_group)] if ru.last_group else []
        assert list(ru.sizes(P)) == full + tail
        assert ru.schedule.group == g
        assert (ru.last_schedule is None) == (ru.last_group == 0)
        if ru.last_group:
            assert ru.last_schedule.group == ru.last_group and ru.schedule_of(ru.last_group) is ru.last_schedule
        for first, size in ru.sizes(P):
            assert all(ru.size_at(rank, P) == size for rank in range(first, first + size))
    case = Case("plan", P, n, h, h_kv, w, r, mix, batch=b, d=d)
    for rank in range(P):
        forward = {i: byt for (ph, i), byt in _ring_bytes(case, rank).items() if ph == "forward"}
        assert {i: byt for i, byt in plan.forward_bytes(b, d, 8, rank).items() if byt} == forward
        sizes = [ru.size_at(rank, P) for ru in plan.units]
        assert plan.num_permutes(True, rank) == sum(2 * g - 1 for g in sizes if g > 1)


def test_only_the_process_group_ring_allows_partial_segments():
    """The rules: a process group's plan takes ``n % w' != 0``; the lengths a simulated ring pads
    to keep whole segments; the balanced layout refuses it with a clear message."""
    from ring_torch import DilatedConfig, build_ring_plan
    from ring_torch._ring_plan import check_sharding, ring_padded_length, sharding_error

    config = DilatedConfig((8, 48), (1, 2))
    assert sharding_error(config, 16, 4, partial=True) is None
    assert "last segment is partial" in sharding_error(config, 16, 4)
    check_sharding(config, 16, 4)
    N = ring_padded_length(config, 64, 4)
    assert N > 64 and all(N % min(w, N) == 0 for w in config.segment_lengths)
    with pytest.raises(ValueError, match=r"pattern 1 .*n=64, chunk C=8 on P=4.*partial.*contiguous"):
        build_ring_plan(config, 16, 4, 2, 2, layout="balanced")
    with pytest.raises(ValueError, match=r"pattern 1 .*L=16 on P=4 ranks: w' is not a multiple of L"):
        build_ring_plan(DilatedConfig((8, 40), (1, 2)), 16, 4, 2, 2)


def test_simulated_ring_pads_to_whole_segments_and_matches_the_oracle():
    """``ring_size`` on the same lengths: padded to whole segments, equal to the oracle."""
    import ring_torch

    case = Case("sim", 4, **P4, mix="longnet", causal=True)
    q, k, v, _, _ = _global_inputs(case)
    out, lse = ring_torch.ring_dilated_attention(q, k, v, **case.kwargs, ring_size=4, return_lse=True)
    ref = _expected(case)
    assert max_abs_err(out.numpy(), ref["out"]) <= 1e-10 and max_abs_err(lse.numpy(), ref["lse"]) <= 1e-10
