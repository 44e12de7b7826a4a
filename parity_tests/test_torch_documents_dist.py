"""Packed documents (``segment_ids``) across gloo process groups of 2 and 4 CPU processes, in
both layouts: every rank passes its shard of q, k, v (natural or balanced order) and the same
global ``[batch, n]`` ids in natural order; the gathered out, LSE and gradients equal the float64
oracle and reference, with ``seq_lengths``, causal or not, both mixes, GQA, ``comm="ring"`` and
``"all_gather"``. Also dropout, the module, and the errors every rank raises. One spawn per world
size runs every case (the hard deadline of :func:`parity_tests._spawn.spawn_ranks`)."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from parity_tests._spawn import case_results, spawn_cases
from parity_tests.test_torch_documents import D, check, doc_ids, inputs

SPAWN_DEADLINE_S = 150
# n=64 on 4 ranks: L=16, C=8: local, split and joint patterns in both layouts; GQA 8 -> 2.
SPAN4 = dict(n=64, h=8, h_kv=2, w=(8, 16, 32, 64), r=(1, 2, 2, 4))
# n=32 on 2 ranks: L=16, C=8.
SPAN2 = dict(n=32, h=4, h_kv=2, w=(8, 16, 32), r=(1, 2, 4))
LENGTHS = {4: (50, 64), 2: (32, 21)}
DROPOUT_P, DROPOUT_SEED = 0.25, 11


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    world: int
    n: int
    h: int
    h_kv: int
    w: tuple[int, ...]
    r: tuple[int, ...]
    mix: str = "longnet"
    causal: bool = False
    layout: str = "contiguous"
    comm: str = "ring"
    kind: str = "grad"  # grad | dropout | module | mismatch | shape

    @property
    def kwargs(self):
        return dict(segment_lengths=self.w, dilation_rates=self.r, mix=self.mix,
                    is_causal=self.causal)

    @property
    def lengths(self):
        return LENGTHS[self.world]


def _grad_cases():
    cases = []
    for world, cfg in ((4, SPAN4), (2, SPAN2)):
        for layout in ("contiguous", "balanced"):
            for mix in ("head_groups", "longnet"):
                for causal in (False, True):
                    name = f"p{world}-{layout}-{mix}-{'causal' if causal else 'full'}"
                    cases.append(Case(name, world, **cfg, mix=mix, causal=causal, layout=layout))
    cases += [Case("p4-balanced-longnet-full-all_gather", 4, **SPAN4, layout="balanced",
                   comm="all_gather"),
              Case("p4-contiguous-head_groups-causal-all_gather", 4, **SPAN4, mix="head_groups",
                   causal=True, comm="all_gather")]
    return cases


GRAD_CASES = _grad_cases()
DROPOUT_CASE = Case("dropout-p4-balanced", 4, **SPAN4, causal=True, layout="balanced", kind="dropout")
MODULE_CASE = Case("module-p4", 4, **SPAN4, kind="module")
MISMATCH_CASE = Case("mismatch-p2", 2, **SPAN2, kind="mismatch")
SHAPE_CASE = Case("local-shape-p2", 2, **SPAN2, kind="shape")
ALL_CASES = GRAD_CASES + [DROPOUT_CASE, MODULE_CASE, MISMATCH_CASE, SHAPE_CASE]


def _shard(x, rank, world, layout):
    """Rank ``rank``'s shard of a natural-order ``x [b, n, ...]`` in ``layout``."""
    import ring_torch

    if layout == "balanced":
        x = ring_torch.to_balanced(x, world)
    L = x.shape[1] // world
    return x[:, rank * L:(rank + 1) * L]


def _gather(per_rank, key, case):
    """The natural-order global tensor of the ranks' shards."""
    import ring_torch

    x = torch.cat([torch.as_tensor(r[key]) for r in per_rank], 1)
    return ring_torch.from_balanced(x, case.world) if case.layout == "balanced" else x


def _module_inputs(case):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, case.n, case.h * D, generator=g, dtype=torch.float64)


def _module_call(case, x, process_group=None):
    """Out and input gradient of the module with documents and the global padding mask."""
    import ring_torch

    torch.manual_seed(0)
    mha = ring_torch.MultiheadDilatedAttention(case.h * D, case.h, case.w, case.r,
                                               num_kv_heads=case.h_kv, mix=case.mix,
                                               process_group=process_group, dtype=torch.float64)
    x = x.clone().requires_grad_()
    mask = torch.arange(case.n)[None, :] >= torch.tensor(case.lengths)[:, None]
    out = mha(x, is_causal=case.causal, segment_ids=doc_ids(case.n), key_padding_mask=mask)
    out.sum().backward()
    return {"out": out.detach(), "dx": x.grad}


def _run_case(case: Case, rank: int, world: int):
    import torch.distributed as dist

    import ring_torch

    group = dist.group.WORLD
    if case.kind == "module":
        return _module_call(case, _shard(_module_inputs(case), rank, world, case.layout), group)
    q, k, v, dout, dlse = (_shard(x, rank, world, case.layout)
                           for x in inputs(case.n, case.h, case.h_kv))
    kw = dict(case.kwargs, return_lse=True, process_group=group, comm=case.comm, timeout=60,
              layout=case.layout, seq_lengths=torch.tensor(case.lengths), segment_ids=doc_ids(case.n))
    if case.kind in ("mismatch", "shape"):
        if case.kind == "mismatch" and rank == 1:
            kw["segment_ids"] = None
        if case.kind == "shape":  # the local shard's ids instead of the global ones
            kw["segment_ids"] = _shard(doc_ids(case.n), rank, world, case.layout)
        try:
            ring_torch.ring_dilated_attention(q, k, v, **kw)
        except ValueError as e:
            return {"type": type(e).__name__, "error": str(e)}
        return {"type": None}
    if case.kind == "dropout":  # rank 0's seed wins
        kw.update(dropout_p=DROPOUT_P, dropout_seed=DROPOUT_SEED + rank)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = ring_torch.ring_dilated_attention(*xs, **kw)
    fin = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    ((out * dout).sum() + (fin * dlse).sum()).backward()
    return {"out": out.detach(), "lse": lse.detach(), "dq": xs[0].grad, "dk": xs[1].grad,
            "dv": xs[2].grad}


@functools.cache
def _results(world: int) -> list[dict]:
    """Runs every case of ``world`` in one spawn; returns each rank's results."""
    return spawn_cases(__name__, ALL_CASES, world, deadline_s=SPAWN_DEADLINE_S, label="documents")


def _case_results(case: Case) -> list[dict]:
    return case_results(_results(case.world), case.name)


def _gathered(case: Case):
    per_rank = _case_results(case)
    return [_gather(per_rank, key, case) for key in ("out", "lse", "dq", "dk", "dv")]


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.name for c in GRAD_CASES])
def test_process_group_documents_match_oracle(case):
    check(_gathered(case), case.n, case.h, case.h_kv, case.w, case.r, case.mix, case.causal,
          case.lengths, "varied")


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
def test_process_group_dropout_with_documents_equals_one_device():
    import ring_torch
    from parity_tests.test_torch_documents import run

    case = DROPOUT_CASE
    one = run(lambda *x: ring_torch.dilated_attention(
        *x, **case.kwargs, return_lse=True, seq_lengths=case.lengths, segment_ids=doc_ids(case.n),
        dropout_p=DROPOUT_P, dropout_seed=DROPOUT_SEED), *inputs(case.n, case.h, case.h_kv))
    for got, want in zip(_gathered(case), one):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
def test_process_group_module_equals_one_process():
    """The module with global ``segment_ids`` and ``key_padding_mask`` on every rank: outputs
    and input gradients concatenate to the single-process module's."""
    per_rank = _case_results(MODULE_CASE)
    want = _module_call(MODULE_CASE, _module_inputs(MODULE_CASE))
    for key in ("out", "dx"):
        torch.testing.assert_close(_gather(per_rank, key, MODULE_CASE), want[key], atol=1e-10, rtol=0)


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
def test_process_group_errors_raise_on_every_rank():
    for rank, res in enumerate(_case_results(MISMATCH_CASE)):
        assert res["type"] == "RingCheckError", (rank, res)
        assert "segment_ids_given: [True, False]" in res["error"], res
    for rank, res in enumerate(_case_results(SHAPE_CASE)):
        assert res["type"] == "ValueError", (rank, res)
        assert res["error"] == ("segment_ids must have shape [batch, seq]=(2, 32) (the global "
                                "sequence), got (2, 16)"), res
