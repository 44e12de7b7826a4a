"""The balanced ring layout of ring_torch across gloo process groups of 2 and 4 CPU processes:
each rank passes its balanced shard (chunks ``rank`` and ``2P-1-rank``) and gets its shard of the
output back; the gathered results equal the float64 oracle. One spawn per world size runs every
case (with the hard deadline of :func:`parity_tests._spawn.spawn_ranks`)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import numpy as np
import pytest
import torch

from parity_tests._spawn import case_results, spawn_cases
from parity_tests.oracle import dilated_attention as oracle_attention
from parity_tests.reference import reference_attention

SPAWN_DEADLINE_S = 150
# n=64 on 4 ranks: C=8: w'=8 local, 16 split (g=2), 32 split (g=4), 64 joint.
MIXED4 = dict(n=64, h=8, h_kv=2, d=8, w=(8, 16, 32, 64), r=(1, 2, 2, 4))
# n=32 on 2 ranks: C=8: w'=8 local, 16 split (g=2), 32 joint.
MIXED2 = dict(n=32, h=4, h_kv=2, d=8, w=(8, 16, 32), r=(1, 2, 4))


@dataclasses.dataclass(frozen=True)
class Case:
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
    comm: str = "ring"
    kind: str = "grad"  # grad | lengths | dropout | module | mismatch | invalid | work
    layout: str = "balanced"
    batch: int = 2

    @property
    def kwargs(self):
        return dict(segment_lengths=self.w, dilation_rates=self.r, mix=self.mix,
                    is_causal=self.causal)


def _grad_cases():
    cases = []
    for world, cfg, comms in ((4, MIXED4, ("ring", "all_gather")), (2, MIXED2, ("ring",))):
        for mix in ("head_groups", "longnet"):
            for causal in (False, True):
                for comm in comms:
                    name = f"p{world}-{mix}-{'causal' if causal else 'full'}-{comm}"
                    cases.append(Case(name, world, **cfg, mix=mix, causal=causal, comm=comm))
    return cases


GRAD_CASES = _grad_cases() + [Case("p2-longnet-causal-all_gather", 2, **MIXED2, mix="longnet",
                                   causal=True, comm="all_gather")]
LENGTH_CASES = [Case(f"lengths-p4-{c}", 4, **MIXED4, mix="longnet", causal=c == "causal",
                     kind="lengths", batch=3) for c in ("causal", "full")]
DROPOUT_CASES = [Case("dropout-p4", 4, **MIXED4, mix="longnet", causal=True, kind="dropout")]
MODULE_CASES = [Case("module-p4", 4, **MIXED4, mix="longnet", causal=True, kind="module")]
ERROR_CASES = [Case("mismatch-layout-p4", 4, **MIXED4, kind="mismatch"),
               Case("invalid-odd-length-p4", 4, **dict(MIXED4, n=36), kind="invalid")]
WORK_CASES = [Case(f"work-p4-{layout}", 4, **MIXED4, mix="longnet", causal=True, kind="work",
                   layout=layout) for layout in ("balanced", "contiguous")]
ALL_CASES = GRAD_CASES + LENGTH_CASES + DROPOUT_CASES + MODULE_CASES + ERROR_CASES + WORK_CASES
LENGTHS = (0, 37, 64)
DROPOUT_P, DROPOUT_SEED = 0.25, 11


def _global_inputs(case: Case):
    g = torch.Generator().manual_seed(0)
    b, n, h, hk, d = case.batch, case.n, case.h, case.h_kv, case.d
    shapes = ((b, n, h, d), (b, n, hk, d), (b, n, hk, d), (b, n, h, d), (b, n, h))
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _shard(x, rank, world, layout="balanced"):
    """Rank ``rank``'s shard of a natural-order ``x [b, n, ...]`` in ``layout``."""
    import ring_torch

    if layout == "balanced":
        x = ring_torch.to_balanced(x, world)
    L = x.shape[1] // world
    return x[:, rank * L:(rank + 1) * L]


def _gather(per_rank, key, world):
    """The natural-order global array of the ranks' balanced shards."""
    import ring_torch

    return ring_torch.from_balanced(torch.cat([torch.as_tensor(r[key]) for r in per_rank], 1),
                                    world)


@contextlib.contextmanager
def _count_work(counts):
    """While active, ring blocks of the math kernel count their score elements into ``counts``
    (``forward``, ``backward``; a causal own block counts its triangle)."""
    from ring_torch._kernels import MathKernel

    def elements(q, k, coords):
        B, mq, H, _ = q.shape
        mk = k.shape[1]
        return B * H * (mq * (mq + 1) // 2 if coords.is_causal else mq * mk)

    forward, backward = MathKernel.forward, MathKernel.backward

    def counted_forward(self, q, k, v, scale, coords):
        if not coords.batch_outer:  # a ring block (local units fold batch outer)
            counts["forward"] += elements(q, k, coords)
        return forward(self, q, k, v, scale, coords)

    def counted_backward(self, g, k, v, scale, coords):
        counts["backward"] += elements(g.q, k, coords)
        return backward(self, g, k, v, scale, coords)

    MathKernel.forward, MathKernel.backward = counted_forward, counted_backward
    try:
        yield
    finally:
        MathKernel.forward, MathKernel.backward = forward, backward


def _run_case(case: Case, rank: int, world: int):
    import torch.distributed as dist

    import ring_torch

    layout = "contiguous" if case.kind == "invalid" else case.layout  # n=36 has no balanced shards
    q, k, v, dout, dlse = (_shard(x, rank, world, layout) for x in _global_inputs(case))
    stats = ring_torch.CommStats()
    kwargs = dict(case.kwargs, layout=case.layout)
    if case.kind == "mismatch" and rank == 1:
        kwargs["layout"] = "contiguous"
    if case.kind == "lengths":
        kwargs["seq_lengths"] = torch.tensor(LENGTHS)
    if case.kind == "dropout":  # rank 0's seed wins
        kwargs.update(dropout_p=DROPOUT_P, dropout_seed=DROPOUT_SEED + rank)
    call = functools.partial(ring_torch.ring_dilated_attention, return_lse=True,
                             process_group=dist.group.WORLD, comm=case.comm, stats=stats,
                             timeout=60, **kwargs)
    if case.kind in ("mismatch", "invalid"):
        try:
            call(q, k, v)
        except ValueError as e:
            return {"type": type(e).__name__, "error": str(e)}
        return {"type": None}
    if case.kind == "module":
        torch.manual_seed(0)
        mha = ring_torch.MultiheadDilatedAttention(
            case.h * case.d, case.h, case.w, case.r, num_kv_heads=case.h_kv, mix=case.mix,
            process_group=dist.group.WORLD, layout="balanced", dtype=torch.float64)
        x = _shard(torch.randn(case.batch, case.n, case.h * case.d, generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64), rank, world).clone().requires_grad_()
        out = mha(x, is_causal=case.causal)
        out.sum().backward()
        return {"out": out.detach().numpy(), "dx": x.grad.numpy()}
    counts = {"forward": 0, "backward": 0}
    with _count_work(counts) if case.kind == "work" else contextlib.nullcontext():
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        out, lse = call(qs, ks, vs)
        fwd = stats.bytes("forward")
        fin = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        ((out * dout).sum() + (fin * dlse).sum()).backward()
    return {"out": out.detach().numpy(), "lse": lse.detach().numpy(), "dq": qs.grad.numpy(),
            "dk": ks.grad.numpy(), "dv": vs.grad.numpy(), "sent_forward": fwd, "work": counts}


@functools.cache
def _results(world: int) -> list[dict]:
    """Runs every case of ``world`` in one spawn; returns each rank's results."""
    return spawn_cases(__name__, ALL_CASES, world, deadline_s=SPAWN_DEADLINE_S, label="balanced ring")


def _case_results(case: Case) -> list[dict]:
    return case_results(_results(case.world), case.name)


def _max_abs(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    fin = torch.isfinite(b)
    assert torch.equal(fin, torch.isfinite(a))
    return (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0


@functools.cache
def _expected(case: Case, seq_lengths=None):
    """The oracle's out and lse and the float64 autograd reference's gradients, natural order."""
    q, k, v, dout, dlse = _global_inputs(case)
    kw = case.kwargs if seq_lengths is None else dict(case.kwargs, seq_lengths=np.array(seq_lengths))
    out, lse = oracle_attention(q.numpy(), k.numpy(), v.numpy(), **kw)
    if seq_lengths is not None:
        kw["seq_lengths"] = torch.tensor(seq_lengths)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    r_out, r_lse = reference_attention(*xs, **kw)
    fin = torch.where(torch.isfinite(r_lse), r_lse, torch.zeros_like(r_lse))
    ((r_out * dout).sum() + (fin * dlse).sum()).backward()
    return {"out": out, "lse": lse, "dq": xs[0].grad, "dk": xs[1].grad, "dv": xs[2].grad}


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("case", GRAD_CASES + LENGTH_CASES,
                         ids=[c.name for c in GRAD_CASES + LENGTH_CASES])
def test_balanced_process_group_equals_oracle(case):
    per_rank = _case_results(case)
    ref = _expected(case, LENGTHS if case.kind == "lengths" else None)
    for key, tol in (("out", 1e-10), ("lse", 1e-10), ("dq", 1e-9), ("dk", 1e-9), ("dv", 1e-9)):
        assert _max_abs(_gather(per_rank, key, case.world), ref[key]) <= tol, key
    if case.kind == "lengths":
        padded = torch.arange(case.n)[None, :] >= torch.tensor(LENGTHS)[:, None]
        assert (_gather(per_rank, "out", case.world)[padded] == 0).all()
        assert torch.isneginf(_gather(per_rank, "lse", case.world)[padded]).all()
        for key in ("dq", "dk", "dv"):
            assert (_gather(per_rank, key, case.world)[padded] == 0).all()


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("case", [c for c in GRAD_CASES if c.comm == "ring"],
                         ids=[c.name for c in GRAD_CASES if c.comm == "ring"])
def test_bytes_per_pattern(case):
    """Forward bytes per pattern: the balanced plan's formula; a joint pattern (``w' = n``)
    sends what the contiguous layout sends."""
    import ring_torch

    config = ring_torch.DilatedConfig(case.w, case.r, case.mix, case.causal)
    L = case.n // case.world
    plans = {layout: ring_torch.build_ring_plan(config, L, case.world, case.h, case.h_kv, layout)
             for layout in ("balanced", "contiguous")}
    formula = {p: b for p, b in plans["balanced"].forward_bytes(case.batch, case.d, 8).items() if b}
    contiguous = plans["contiguous"].forward_bytes(case.batch, case.d, 8)
    for rank, res in enumerate(_case_results(case)):
        assert res["sent_forward"] == formula, rank
    joint = case.w.index(case.n)
    assert formula[joint] == contiguous[joint]


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
def test_dropout_equals_single_device():
    import ring_torch

    (case,) = DROPOUT_CASES
    q, k, v, _, _ = _global_inputs(case)
    out, lse = ring_torch.dilated_attention(q, k, v, return_lse=True, dropout_p=DROPOUT_P,
                                            dropout_seed=DROPOUT_SEED, **case.kwargs)
    per_rank = _case_results(case)
    assert _max_abs(_gather(per_rank, "out", 4), out) <= 1e-12
    assert _max_abs(_gather(per_rank, "lse", 4), lse) <= 1e-12


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
def test_module_on_balanced_shards_equals_one_process():
    import ring_torch

    (case,) = MODULE_CASES
    torch.manual_seed(0)
    mha = ring_torch.MultiheadDilatedAttention(case.h * case.d, case.h, case.w, case.r,
                                               num_kv_heads=case.h_kv, mix=case.mix,
                                               dtype=torch.float64)
    x = torch.randn(case.batch, case.n, case.h * case.d, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64).requires_grad_()
    out = mha(x, is_causal=case.causal)
    out.sum().backward()
    per_rank = _case_results(case)
    assert _max_abs(_gather(per_rank, "out", 4), out.detach()) <= 1e-12
    assert _max_abs(_gather(per_rank, "dx", 4), x.grad) <= 1e-12


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
def test_errors_raise_on_every_rank():
    mismatch, invalid = (_case_results(c) for c in ERROR_CASES)
    for rank, res in enumerate(mismatch):
        assert res["type"] == "RingCheckError", (rank, res)
        assert "layout: ['balanced', 'contiguous', 'balanced', 'balanced']" in res["error"], res
    for rank, res in enumerate(invalid):  # 9 rows per rank: n=36 is not a multiple of 2P=8
        assert res["type"] == "ValueError", (rank, res)
        assert "n=36 is not a multiple of 2P=8" in res["error"] and "contiguous" in res["error"]


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
def test_causal_ring_work_per_rank():
    """Score elements each rank's ring blocks compute (counted in the kernel): balanced equal on
    every rank, the backward's equal to the forward's; contiguous unequal."""
    balanced, contiguous = ([r["work"] for r in _case_results(c)] for c in WORK_CASES)
    forward = [w["forward"] for w in balanced]
    assert len(set(forward)) == 1 and forward[0] > 0, balanced
    assert all(w["backward"] == w["forward"] for w in balanced + contiguous)
    forward = [w["forward"] for w in contiguous]
    assert max(forward) / (sum(forward) / 4) > 1.1, contiguous
