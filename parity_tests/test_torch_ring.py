"""ring_torch's distributed ring (gloo, 2 and 4 CPU processes) against the float64 oracle, the
float64 autograd reference and the single-process layer.

Start-up is shared: one spawn per world size runs every case of that world size (each rank writes
its results to a file), and the tests below only compare. The spawn has a deadline and the
process group a timeout, so a hang fails the tests instead of stalling the suite.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

from parity_tests._spawn import case_results, spawn_cases
from parity_tests.frameworks import max_abs_err, rel_err
from parity_tests.oracle import dilated_attention as oracle_attention
from parity_tests.reference import reference_attention

SPAWN_DEADLINE_S = 150


@dataclasses.dataclass(frozen=True)
class DistCase:
    name: str
    world: int
    n: int
    h: int
    h_kv: int
    d: int
    w: tuple[int, ...]
    r: tuple[int, ...]
    mix: str = "head_groups"
    causal: bool = False
    dtype: str = "float64"
    comm: str = "ring"
    kind: str = "grad"  # grad | causality | mismatch | invalid
    batch: int = 2
    seed: int = 0

    @property
    def kwargs(self):
        return dict(segment_lengths=self.w, dilation_rates=self.r, mix=self.mix,
                    is_causal=self.causal)


# n=64 on 4 ranks: L=16; w=8 is local, w=32 spans 2 ranks, w=64 all 4.
SPAN4 = dict(n=64, h=6, h_kv=3, d=8, w=(8, 32, 64), r=(1, 2, 4))
# 8 heads on 2 kv heads, longnet: every pattern on every head, 4 offsets -> 8 distinct pairs.
GQA4 = dict(n=64, h=8, h_kv=2, d=8, w=(16, 64), r=(2, 4))
LOCAL4 = dict(n=64, h=4, h_kv=2, d=8, w=(8, 16), r=(1, 2))  # every pattern local: no messages
SPAN2 = dict(n=32, h=4, h_kv=2, d=8, w=(8, 32), r=(1, 2))


def _grad_cases():
    cases = []
    for world, cfg, tag in ((4, SPAN4, "span4"), (4, GQA4, "gqa4"), (4, LOCAL4, "local4"),
                            (2, SPAN2, "span2")):
        for mix in ("head_groups", "longnet"):
            for causal in (False, True):
                for comm in ("ring", "all_gather"):
                    dtypes = ("float64", "float32") if tag in ("span4", "span2") else ("float64",)
                    for dtype in dtypes:
                        name = f"{tag}-{mix}-{'causal' if causal else 'full'}-{comm}-{dtype}"
                        cases.append(DistCase(name, world, **cfg, mix=mix, causal=causal,
                                              dtype=dtype, comm=comm))
    return cases


GRAD_CASES = _grad_cases()
OTHER_CASES = [
    DistCase("causality-span4-longnet", 4, **SPAN4, mix="longnet", causal=True, kind="causality"),
    DistCase("causality-span4-hg-allgather", 4, **SPAN4, causal=True, comm="all_gather",
             kind="causality"),
    DistCase("causality-span2", 2, **SPAN2, causal=True, kind="causality"),
    DistCase("mismatch-head-dim-4", 4, **SPAN4, kind="mismatch"),
    DistCase("mismatch-head-dim-2", 2, **SPAN2, kind="mismatch"),
    DistCase("mismatch-causal-4", 4, **SPAN4, kind="mismatch_config"),
    # A process group that is not WORLD: sub-ring peers are mapped to global ranks.
    DistCase("subgroup-2x2-longnet-causal", 4, **SPAN2, mix="longnet", causal=True,
             kind="subgroup"),
    DistCase("subgroup-2x2-hg-allgather", 4, **SPAN2, comm="all_gather", kind="subgroup"),
    # Globally valid (64 % 32 == 0, 32 % 32 == 0) but L=16 is not a multiple of r=32.
    DistCase("invalid-r-gt-L", 4, n=64, h=2, h_kv=2, d=8, w=(8, 32), r=(1, 32), kind="invalid"),
    # n=96 on 4 ranks: L=24 is not a multiple of w=16.
    DistCase("invalid-L-vs-w", 4, n=96, h=2, h_kv=2, d=8, w=(16, 96), r=(1, 2), kind="invalid"),
]
BF16_CASES = [
    DistCase("span4-longnet-causal-ring-bfloat16", 4, **SPAN4, mix="longnet", causal=True,
             dtype="bfloat16"),
    DistCase("span4-head_groups-full-ring-bfloat16", 4, **SPAN4, dtype="bfloat16"),
]
DROPOUT_SEED, DROPOUT_P = 100, 0.25
DROPOUT_CASES = [
    DistCase("dropout-span4-longnet-causal-ring", 4, **SPAN4, mix="longnet", causal=True,
             kind="dropout"),
    DistCase("dropout-span4-hg-allgather", 4, **SPAN4, comm="all_gather", kind="dropout"),
]
MODULE_CASES = [
    DistCase("module-self-span4-longnet-causal", 4, **SPAN4, mix="longnet", causal=True,
             kind="module"),
    DistCase("module-cross-span4-hg-allgather", 4, **SPAN4, comm="all_gather", kind="module_cross"),
    DistCase("module-self-span2-hg", 2, **SPAN2, kind="module"),
]
ALL_CASES = GRAD_CASES + OTHER_CASES + MODULE_CASES + BF16_CASES + DROPOUT_CASES


def _module_inputs(case: DistCase):
    g = torch.Generator().manual_seed(case.seed + 1)
    shape = (case.batch, case.n, case.h * case.d)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]


def _make_module(case: DistCase, **kw):
    import ring_torch

    torch.manual_seed(case.seed)
    return ring_torch.MultiheadDilatedAttention(
        case.h * case.d, case.h, case.w, case.r, num_kv_heads=case.h_kv, mix=case.mix,
        dtype=torch.float64, **kw)


def _module_run(module, case: DistCase, x, key, dout):
    x = x.clone().requires_grad_()
    key = key.clone().requires_grad_() if case.kind == "module_cross" else None
    out = module(x, key, is_causal=case.causal)
    (out * dout).sum().backward()
    res = {"out": out.detach().numpy(), "dx": x.grad.numpy(),
           "params": {n: p.grad.numpy() for n, p in module.named_parameters()}}
    if key is not None:
        res["dkey"] = key.grad.numpy()
    return res


def _global_inputs(case: DistCase):
    """Full-sequence float64 inputs, rounded to the case dtype, and the cotangents."""
    g = torch.Generator().manual_seed(case.seed)
    b, n, h, hk, d = case.batch, case.n, case.h, case.h_kv, case.d
    dt = getattr(torch, case.dtype)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64).to(dt).double()
               for s in ((b, n, h, d), (b, n, hk, d), (b, n, hk, d)))
    dout = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    dlse = torch.randn(b, n, h, generator=g, dtype=torch.float64)
    return q, k, v, dout, dlse


def _shard(x, rank, world):
    L = x.shape[1] // world
    return x[:, rank * L:(rank + 1) * L]


def _run_case(case: DistCase, rank: int, world: int):
    import ring_torch

    import torch.distributed as dist

    dt = getattr(torch, case.dtype)
    group = dist.group.WORLD
    if case.kind == "subgroup":  # two independent rings of 2: ranks [0, 1] and [2, 3]
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        group = groups[rank // 2]
        case, rank, world = _subgroup_case(case, rank // 2), rank % 2, 2
    q, k, v, dout, dlse = (_shard(x, rank, world) for x in _global_inputs(case))
    stats = ring_torch.CommStats()
    kwargs = case.kwargs
    if case.kind == "mismatch_config" and rank == 1:  # one rank with another causality
        kwargs = dict(kwargs, is_causal=not case.causal)
    if case.kind == "dropout":  # each rank passes its own seed: rank 0's must win
        kwargs = dict(kwargs, dropout_p=DROPOUT_P, dropout_seed=DROPOUT_SEED + rank)
    call = functools.partial(ring_torch.ring_dilated_attention, return_lse=True,
                             process_group=group, comm=case.comm, stats=stats, **kwargs)
    if case.kind in ("mismatch", "mismatch_config", "invalid"):
        if case.kind == "mismatch" and rank == 1:  # one rank with another head_dim
            q, k, v = (x[..., :-1] for x in (q, k, v))
        try:
            call(q.to(dt), k.to(dt), v.to(dt))
        except ValueError as e:
            return {"error": str(e), "sent": dict(stats.sent)}
        return {"error": None}
    if case.kind.startswith("module"):
        module = _make_module(case, process_group=torch.distributed.group.WORLD, comm=case.comm)
        x, key, dout = (_shard(t, rank, world) for t in _module_inputs(case))
        return _module_run(module, case, x, key, dout)
    if case.kind == "causality":
        out = call(q.to(dt), k.to(dt), v.to(dt))[0]
        if rank == world - 1:  # the last shard's K/V change; earlier shards must not notice
            k, v = k + 1.0, v * 2.0
        out2 = call(q.to(dt), k.to(dt), v.to(dt))[0]
        return {"out": out.double().numpy(), "out2": out2.double().numpy()}
    qs, ks, vs = (x.to(dt).requires_grad_() for x in (q, k, v))
    out, lse = call(qs, ks, vs)
    fwd = dict(stats.sent)
    fin = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # rows with no key
    loss = (out.double() * dout).sum() + (fin.double() * dlse).sum()
    loss.backward()
    as_np = lambda t: t.detach().double().numpy()  # noqa: E731
    return {"out": as_np(out), "lse": as_np(lse), "dq": as_np(qs.grad), "dk": as_np(ks.grad),
            "dv": as_np(vs.grad), "sent_forward": fwd, "sent": dict(stats.sent)}


def _subgroup_case(case: DistCase, s: int) -> DistCase:
    """The case sub-ring ``s`` of a ``subgroup`` case runs: its own data (seed + s)."""
    return dataclasses.replace(case, world=2, seed=case.seed + s, kind="grad")


@functools.cache
def _results(world: int) -> list[dict]:
    """Runs every case of ``world`` in one spawn; returns each rank's results."""
    return spawn_cases(__name__, ALL_CASES, world, deadline_s=SPAWN_DEADLINE_S, label="ring tests")


def _case_results(case: DistCase) -> list[dict]:
    return case_results(_results(case.world), case.name)


def _cat(per_rank, key):
    return np.concatenate([r[key] for r in per_rank], axis=1)


@functools.cache
def _expected(case: DistCase):
    """Oracle values, autograd-reference gradients and the single-process layer's values."""
    import ring_torch

    q, k, v, dout, dlse = _global_inputs(case)
    out, lse = oracle_attention(q.numpy(), k.numpy(), v.numpy(), **case.kwargs)
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    r_out, r_lse = reference_attention(qs, ks, vs, **case.kwargs)
    fin = torch.where(torch.isfinite(r_lse), r_lse, torch.zeros_like(r_lse))
    ((r_out * dout).sum() + (fin * dlse).sum()).backward()
    dt = getattr(torch, case.dtype)
    single = ring_torch.dilated_attention(q.to(dt), k.to(dt), v.to(dt), return_lse=True,
                                          **case.kwargs)
    return {"out": out, "lse": lse, "dq": qs.grad.numpy(), "dk": ks.grad.numpy(),
            "dv": vs.grad.numpy(), "single_out": single[0].double().numpy(),
            "single_lse": single[1].double().numpy()}


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.name for c in GRAD_CASES])
def test_distributed_matches_oracle_and_reference(case):
    per_rank = _case_results(case)
    ref = _expected(case)
    got = {key: _cat(per_rank, key) for key in ("out", "lse", "dq", "dk", "dv")}
    if case.dtype == "float64":
        for key in ("out", "lse"):
            assert max_abs_err(got[key], ref[key]) <= 1e-10, key
        for key in ("dq", "dk", "dv"):
            assert max_abs_err(got[key], ref[key]) <= 1e-9, key
        # == the single-process layer
        assert max_abs_err(got["out"], ref["single_out"]) <= 1e-12
        assert max_abs_err(got["lse"], ref["single_lse"]) <= 1e-12
    else:
        for key in ("out", "lse"):
            assert rel_err(got[key], ref[key]) <= 2e-5, key
            assert rel_err(got[key], ref["single_" + key]) <= 2e-5, key
        for key in ("dq", "dk", "dv"):
            assert rel_err(got[key], ref[key]) <= 2e-5, key


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=[c.name for c in DROPOUT_CASES])
def test_distributed_dropout_equals_single_device(case):
    """Same position-hashed mask on every rank (rank 0's seed), forward and ring backward."""
    import ring_torch

    per_rank = _case_results(case)
    q, k, v, dout, dlse = _global_inputs(case)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = ring_torch.dilated_attention(*xs, return_lse=True, dropout_p=DROPOUT_P,
                                            dropout_seed=DROPOUT_SEED, **case.kwargs)
    fin = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    ((out * dout).sum() + (fin * dlse).sum()).backward()
    ref = {"out": out.detach(), "lse": lse.detach(), "dq": xs[0].grad, "dk": xs[1].grad,
           "dv": xs[2].grad}
    for key, value in ref.items():
        assert max_abs_err(_cat(per_rank, key), value.numpy()) <= 1e-12, key


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("case", BF16_CASES, ids=[c.name for c in BF16_CASES])
def test_distributed_bfloat16(case):
    """bfloat16 in and out (the merge in float32): within bf16 rounding of the reference, and the
    wire carries 2-byte K/V (dK/dV accumulators in float32)."""
    per_rank = _case_results(case)
    ref = _expected(case)
    for key in ("out", "lse", "dq", "dk", "dv"):
        assert rel_err(_cat(per_rank, key), ref[key]) <= 2e-2, key
    assert per_rank[0]["sent"] == _formula_bytes(case)


def _formula_bytes(case: DistCase):
    """Per rank and pattern: ``(g - 1) * b * (L/r) * n_pairs * d * itemsize * 2`` forward, the
    same again for the backward's K/V hops, and ``g - 1`` dK/dV hops in float32 or better."""
    L = case.n // case.world
    heads = _pattern_heads(case)
    itemsize = torch.empty(0, dtype=getattr(torch, case.dtype)).element_size()
    acc_itemsize = max(itemsize, 4)
    expected = {}
    for i, (w, r) in enumerate(zip(case.w, case.r)):
        we = min(w, case.n)
        g = we // L if we > L else 1
        if g == 1:
            continue
        group = case.h // case.h_kv
        n_pairs = len({(j // group, o) for j, o in heads[i]})
        hop = case.batch * (L // r) * n_pairs * case.d * 2
        expected[("forward", i)] = (g - 1) * hop * itemsize
        expected[("backward_kv", i)] = (g - 1) * hop * itemsize
        expected[("backward_grad", i)] = (g - 1) * hop * acc_itemsize
    return expected


def _pattern_heads(case: DistCase):
    """Per pattern: the (query head, offset) pairs that use it (from the oracle's head_pairs)."""
    from parity_tests.oracle import head_pairs

    per_pattern = {i: [] for i in range(len(case.w))}
    for j, pairs in enumerate(head_pairs(case.h, case.w, case.r, case.mix)):
        for i, o in pairs:
            per_pattern[i].append((j, o))
    return per_pattern


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("case", [c for c in GRAD_CASES if c.comm == "ring"],
                         ids=[c.name for c in GRAD_CASES if c.comm == "ring"])
def test_bytes_sent_per_rank_per_pattern_match_formula(case):
    import ring_torch

    expected = _formula_bytes(case)
    for rank, res in enumerate(_case_results(case)):
        assert res["sent"] == expected, f"rank {rank}"
        assert res["sent_forward"] == {k: b for k, b in expected.items() if k[0] == "forward"}
    # The plan's own formula agrees.
    config = ring_torch.DilatedConfig(case.w, case.r, case.mix, case.causal)
    rplan = ring_torch.build_ring_plan(config, case.n // case.world, case.world, case.h, case.h_kv)
    itemsize = torch.empty(0, dtype=getattr(torch, case.dtype)).element_size()
    plan_bytes = {i: b for i, b in rplan.forward_bytes(case.batch, case.d, itemsize).items() if b}
    assert plan_bytes == {k[1]: b for k, b in expected.items() if k[0] == "forward"}


CAUSALITY = [c for c in OTHER_CASES if c.kind == "causality"]


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("case", CAUSALITY, ids=[c.name for c in CAUSALITY])
def test_causal_ring_ignores_later_shards(case):
    per_rank = _case_results(case)
    for rank, res in enumerate(per_rank[:-1]):
        np.testing.assert_array_equal(res["out"], res["out2"], err_msg=f"rank {rank}")
    assert not np.array_equal(per_rank[-1]["out"], per_rank[-1]["out2"])


ERRORS = [c for c in OTHER_CASES if c.kind in ("mismatch", "mismatch_config", "invalid")]


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("case", ERRORS, ids=[c.name for c in ERRORS])
def test_errors_raise_on_every_rank_without_hanging(case):
    per_rank = _case_results(case)
    for rank, res in enumerate(per_rank):
        assert res["error"] is not None, f"rank {rank} did not raise"
        if case.kind == "invalid":
            L = case.n // case.world
            assert f"L={L}" in res["error"] and f"P={case.world}" in res["error"]
            bad = {"invalid-r-gt-L": 1, "invalid-L-vs-w": 0}[case.name]
            assert res["error"].startswith(f"pattern {bad} ")
            assert res["sent"] == {}  # raised before any message
        elif case.kind == "mismatch":
            assert "disagree" in res["error"] and "head_dim" in res["error"]
        else:  # the differing field, with its per-rank values
            assert "disagree" in res["error"]
            assert f"is_causal: [{case.causal}, {not case.causal}, {case.causal}, {case.causal}]" in res["error"]


SUBGROUPS = [c for c in OTHER_CASES if c.kind == "subgroup"]


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("case", SUBGROUPS, ids=[c.name for c in SUBGROUPS])
def test_ring_on_a_process_subgroup(case):
    per_rank = _case_results(case)
    for s in range(2):
        sub = _subgroup_case(case, s)
        ref = _expected(sub)
        for key in ("out", "lse", "dq", "dk", "dv"):
            got = _cat(per_rank[2 * s:2 * s + 2], key)
            assert max_abs_err(got, ref[key]) <= 1e-9, (s, key)
        if case.comm == "ring":
            assert per_rank[2 * s]["sent"] == _formula_bytes(sub)


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("case", MODULE_CASES, ids=[c.name for c in MODULE_CASES])
def test_distributed_module_matches_single_process(case):
    """Each rank runs the module on its shard; outputs and input gradients concatenate, and the
    parameter gradients (per-rank partial sums) add up, to the single-process module's."""
    per_rank = _case_results(case)
    x, key, dout = _module_inputs(case)
    ref = _module_run(_make_module(case), case, x, key, dout)
    assert max_abs_err(_cat(per_rank, "out"), ref["out"]) <= 1e-10
    assert max_abs_err(_cat(per_rank, "dx"), ref["dx"]) <= 1e-9
    if case.kind == "module_cross":
        assert max_abs_err(_cat(per_rank, "dkey"), ref["dkey"]) <= 1e-9
    for name, grad in ref["params"].items():
        total = sum(r["params"][name] for r in per_rank)
        assert max_abs_err(total, grad) <= 1e-9, name


ALL_GATHER = [c for c in GRAD_CASES if c.comm == "all_gather"]


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("case", ALL_GATHER, ids=[c.name for c in ALL_GATHER])
def test_all_gather_forward_bytes_match_the_ring(case):
    """all_gather moves the same forward bytes per rank as the ring (its block to g - 1 peers)."""
    expected = {k: b for k, b in _formula_bytes(case).items() if k[0] == "forward"}
    for rank, res in enumerate(_case_results(case)):
        assert res["sent_forward"] == expected, f"rank {rank}"
