"""The single-process simulated ring (``ring_size=R``): the same hops, merges and ring backward
as the distributed ring, equal to the single-device layer and the float64 reference."""

from __future__ import annotations

import functools

import pytest
import torch

import ring_torch
from parity_tests.oracle import dilated_attention as oracle_attention
from parity_tests.reference import reference_attention

# (id, n, h, h_kv, d, segment_lengths, dilation_rates, ring_sizes)
CONFIGS = [
    ("span", 64, 6, 3, 8, (8, 32, 64), (1, 2, 4), (2, 4, 8)),
    ("gqa_longnet_pairs", 64, 8, 2, 8, (16, 64), (2, 4), (2, 4)),
    ("single_pattern", 32, 2, 2, 16, (32,), (1,), (2, 4)),
    ("w_gt_n", 32, 4, 4, 8, (64, 128), (2, 4), (2, 4)),  # w' = n: empty rows under longnet
    ("five_patterns", 64, 12, 4, 8, (4, 8, 16, 32, 64), (1, 2, 2, 4, 8), (2, 4, 8)),
]
CASES = [(c, R) for c in CONFIGS for R in c[-1]]
IDS = [f"{c[0]}-R{R}" for c, R in CASES]


def _inputs(n, h, h_kv, d, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    shapes = ((batch, n, h, d), (batch, n, h_kv, d), (batch, n, h_kv, d), (batch, n, h, d),
              (batch, n, h))
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _run(fn, q, k, v, dout, dlse, dtype):
    xs = [x.detach().to(dtype, copy=True).requires_grad_() for x in (q, k, v)]
    out, lse = fn(*xs)
    fin = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    ((out.double() * dout).sum() + (fin.double() * dlse).sum()).backward()
    return [out.detach().double(), lse.detach().double()] + [x.grad.double() for x in xs]


def _max_abs(a, b):
    fin = torch.isfinite(b)
    assert torch.equal(fin, torch.isfinite(a))
    return (a[fin] - b[fin]).abs().max().item()


def _rel(a, b):
    fin = torch.isfinite(b)
    assert torch.equal(fin, torch.isfinite(a))
    return ((a[fin] - b[fin]).norm() / b[fin].norm()).item()


@functools.cache
def _expected(config, mix, causal):
    """Single-device layer, float64 reference and oracle of one config (shared by all R)."""
    _, n, h, h_kv, d, w, r, _ = config
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal)
    q, k, v, dout, dlse = _inputs(n, h, h_kv, d)
    single = _run(lambda *x: ring_torch.dilated_attention(*x, return_lse=True, **kw),
                  q, k, v, dout, dlse, torch.float64)
    ref = _run(lambda *x: reference_attention(*x, **kw), q, k, v, dout, dlse, torch.float64)
    return single, ref, oracle_attention(q.numpy(), k.numpy(), v.numpy(), **kw)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_simulated_ring_float64_equals_single_device_and_reference(case, mix, causal):
    (_, n, h, h_kv, d, w, r, _), R = case
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal)
    q, k, v, dout, dlse = _inputs(n, h, h_kv, d)
    ring = _run(lambda *x: ring_torch.ring_dilated_attention(*x, return_lse=True, ring_size=R,
                                                             **kw), q, k, v, dout, dlse,
                torch.float64)
    single, ref, (o_out, o_lse) = _expected(case[0], mix, causal)
    assert _max_abs(ring[0], torch.from_numpy(o_out)) <= 1e-10
    assert _max_abs(ring[1], torch.from_numpy(o_lse)) <= 1e-10
    for a, b in zip(ring, single):
        assert _max_abs(a, b) <= 1e-12
    for a, b in zip(ring[2:], ref[2:]):
        assert _max_abs(a, b) <= 1e-9


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)],
                         ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_simulated_ring_low_precision(dtype, tol, mix, causal):
    _, n, h, h_kv, d, w, r, _ = CONFIGS[0]
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal)
    q, k, v, dout, dlse = _inputs(n, h, h_kv, d, seed=1)
    q, k, v = (x.to(dtype).double() for x in (q, k, v))  # exactly representable
    ring = _run(lambda *x: ring_torch.ring_dilated_attention(*x, return_lse=True, ring_size=4,
                                                             **kw), q, k, v, dout, dlse, dtype)
    ref = _run(lambda *x: reference_attention(*x, **kw), q, k, v, dout, dlse, torch.float64)
    for a, b in zip(ring, ref):
        assert _rel(a, b) <= tol
    assert ring[0].dtype == torch.float64  # (converted by _run) and the layer kept dtype:
    out = ring_torch.ring_dilated_attention(q.to(dtype), k.to(dtype), v.to(dtype), ring_size=4,
                                            **kw)
    assert out.dtype == dtype


@pytest.mark.parametrize("ring_size", [None, 1])
def test_ring_size_one_is_the_single_device_layer(ring_size):
    q, k, v, *_ = _inputs(32, 4, 2, 8)
    kw = dict(segment_lengths=(8, 32), dilation_rates=(1, 2), mix="longnet", is_causal=True)
    a = ring_torch.ring_dilated_attention(q, k, v, ring_size=ring_size, return_lse=True, **kw)
    b = ring_torch.dilated_attention(q, k, v, return_lse=True, **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_simulated_bytes_per_rank_match_formula(mix, dtype):
    _, n, h, h_kv, d, w, r, _ = CONFIGS[1]
    R, b = 4, 2
    L = n // R
    q, k, v, *_ = _inputs(n, h, h_kv, d)
    stats = ring_torch.CommStats()
    q, k, v = (x.to(dtype, copy=True).requires_grad_() for x in (q, k, v))
    out = ring_torch.ring_dilated_attention(q, k, v, segment_lengths=w, dilation_rates=r, mix=mix,
                                            ring_size=R, stats=stats)
    out.sum().backward()
    itemsize = torch.empty(0, dtype=dtype).element_size()
    group = h // h_kv
    expected = {}
    for i, (wi, ri) in enumerate(zip(w, r)):
        g = min(wi, n) // L
        if g <= 1:
            continue
        if mix == "longnet":
            pairs = {(j // group, j % ri) for j in range(h)}
        else:
            size = h // len(w)
            pairs = {(j // group, i % ri) for j in range(i * size, (i + 1) * size)}
        hop = b * (L // ri) * len(pairs) * d * itemsize * 2
        expected.update({("forward", i): (g - 1) * hop, ("backward_kv", i): (g - 1) * hop,
                         ("backward_grad", i): (g - 1) * hop})
    assert dict(stats.sent) == expected
    assert expected  # the config does communicate
    plan = ring_torch.build_ring_plan(ring_torch.DilatedConfig(w, r, mix), L, R, h, h_kv)
    assert sum(stats.exchanges.values()) == plan.num_permutes(with_backward=True)


def test_simulated_ring_peak_block_is_per_shard():
    """A hop's score block is ``[R * b, h, L/r, L/r]``; check the forward never asks the kernel
    for more than ``L/r`` key rows per query row (bounded by the shard, not the segment)."""
    import ring_torch._kernels as kernels

    seen = []
    original = kernels.MathKernel.forward

    def spy(self, q, k, v, *args):
        seen.append(k.shape[1])
        return original(self, q, k, v, *args)

    q, k, v, *_ = _inputs(64, 2, 2, 8)
    kernels.MathKernel.forward = spy
    try:
        ring_torch.ring_dilated_attention(q, k, v, segment_lengths=(64,), dilation_rates=(2,),
                                          ring_size=4)
    finally:
        kernels.MathKernel.forward = original
    assert seen and set(seen) == {64 // 4 // 2} and len(seen) == 4  # g = 4 hops of L/r rows


@pytest.mark.parametrize("kwargs,match", [
    (dict(ring_size=0), "ring_size"),
    (dict(comm="broadcast"), "unknown comm"),
])
def test_simulated_ring_errors(kwargs, match):
    q, k, v, *_ = _inputs(64, 2, 2, 8)
    kw = dict(segment_lengths=(8, 32), dilation_rates=(1, 2))
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ring_torch.ring_dilated_attention(q, k, v, **kw)


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_chunked_block_backward_equals_unchunked(monkeypatch, mix, causal, dropout_p):
    """The ring backward processes query rows in chunks (bounded score memory); tiny chunks
    (one row, then five) give the same gradients as one chunk per block."""
    import ring_torch._math_kernel as math_kernel

    _, n, h, h_kv, d, w, r, _ = CONFIGS[0]
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal,
              dropout_p=dropout_p, dropout_seed=3)
    q, k, v, dout, dlse = _inputs(n, h, h_kv, d)

    def fn(*x):
        return ring_torch.ring_dilated_attention(*x, return_lse=True, ring_size=4, **kw)
    whole = _run(fn, q, k, v, dout, dlse, torch.float64)
    for elements in (1, 5 * 2 * h * (n // 4)):
        monkeypatch.setattr(math_kernel, "GRAD_CHUNK_ELEMENTS", elements)
        chunked = _run(fn, q, k, v, dout, dlse, torch.float64)
        for a, b in zip(chunked, whole):
            assert _max_abs(a, b) <= 1e-13


def test_saved_memory_per_rank_does_not_grow_with_ring_size():
    """Autograd keeps, per rank, the local selected rows, the output and the LSE of each unit:
    with the local length fixed and a pattern spanning all R shards, the bytes saved for the
    backward divided by R stay flat as R grows (no per-hop scores or blocks are kept)."""
    L, h, d = 16, 2, 8
    per_rank = {}
    for R in (2, 4, 8):
        n = R * L
        q, k, v, *_ = _inputs(n, h, h, d)
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        xs = [x.requires_grad_() for x in (q, k, v)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = ring_torch.ring_dilated_attention(*xs, segment_lengths=(L, n),
                                                    dilation_rates=(1, 2), mix="longnet",
                                                    ring_size=R)
        out.sum().backward()
        per_rank[R] = sum(saved) / R
    assert per_rank[8] <= per_rank[2] * 1.01, per_rank


@pytest.mark.parametrize("backend", ["math", "torch"])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_softmax_scale_and_explicit_backend(backend, mix):
    _, n, h, h_kv, d, w, r, _ = CONFIGS[0]
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=True, softmax_scale=0.3)
    q, k, v, dout, dlse = _inputs(n, h, h_kv, d, seed=4)
    dtype = torch.float64 if backend == "math" else torch.float32
    ring = _run(lambda *x: ring_torch.ring_dilated_attention(*x, return_lse=True, ring_size=4,
                                                             backend=backend, **kw),
                q, k, v, dout, dlse, dtype)
    ref = _run(lambda *x: reference_attention(*x, **kw), q, k, v, dout, dlse, torch.float64)
    for a, b in zip(ring, ref):
        assert (_max_abs(a, b) <= 1e-9) if dtype == torch.float64 else (_rel(a, b) <= 2e-5)


def test_inference_mode_and_no_grad():
    q, k, v, *_ = _inputs(64, 6, 3, 8)
    kw = dict(segment_lengths=(8, 32, 64), dilation_rates=(1, 2, 4), mix="longnet")
    ref = ring_torch.dilated_attention(q, k, v, **kw)
    with torch.inference_mode():
        a = ring_torch.ring_dilated_attention(q, k, v, ring_size=4, **kw)
    with torch.no_grad():
        b = ring_torch.ring_dilated_attention(q.requires_grad_(), k, v, ring_size=4, **kw)
    assert _max_abs(a, ref) <= 1e-12 and _max_abs(b, ref) <= 1e-12 and not b.requires_grad


@pytest.mark.parametrize("config", CONFIGS[:2] + CONFIGS[4:], ids=lambda c: c[0])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)],
                         ids=["float32", "bfloat16"])
def test_ring_backward_by_the_fused_kernel(config, mix, dtype, tol, monkeypatch):
    """No dropout, ``backend="torch"``: every ring block's gradient comes from the fused backward
    kernel fed the global (out, lse), with and without an LSE cotangent (longnet merges its
    patterns' LSEs, so there it always has one); it matches the float64 reference."""
    import ring_torch._kernels as kernels

    _, n, h, h_kv, d, w, r, sizes = config
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=True)
    q, k, v, dout, dlse = _inputs(n, h, h_kv, d, seed=5)
    q, k, v = (x.to(dtype).double() for x in (q, k, v))  # exactly representable
    calls = []
    real = kernels.fused_block_grads
    monkeypatch.setattr(kernels, "fused_block_grads", lambda *a, **k: calls.append(a[6] is None) or real(*a, **k))

    def grads(fn, dtype):
        xs = [x.detach().to(dtype, copy=True).requires_grad_() for x in (q, k, v)]
        (fn(*xs).double() * dout).sum().backward()
        return [x.grad.double() for x in xs]

    ring = grads(lambda *x: ring_torch.ring_dilated_attention(*x, ring_size=max(sizes), backend="torch", **kw),
                 dtype)
    ref = grads(lambda *x: reference_attention(*x, **kw)[0], torch.float64)
    assert calls and all(calls) == (mix == "head_groups")  # no LSE cotangent unless merged
    for a, b in zip(ring, ref):
        assert _rel(a, b) <= tol
    calls.clear()
    ring = _run(lambda *x: ring_torch.ring_dilated_attention(*x, return_lse=True, ring_size=max(sizes),
                                                             backend="torch", **kw), q, k, v, dout, dlse, dtype)
    ref = _run(lambda *x: reference_attention(*x, **kw), q, k, v, dout, dlse, torch.float64)
    assert calls and not any(calls)  # the LSE cotangent went in
    for a, b in zip(ring[2:], ref[2:]):
        assert _rel(a, b) <= tol


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[4]], ids=lambda c: c[0])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_ring_local_units_run_as_one_fused_call(config, mix, monkeypatch):
    """``backend="torch"`` without dropout: each rank's local units (segments within its shard)
    run as one ``FusedDilated`` sub-plan with its own backward; ``math`` runs
    them unit by unit through autograd. Both match the float64 reference, LSE cotangent included."""
    import ring_torch._dilated as dilated_module

    _, n, h, h_kv, d, w, r, _ = config
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=True)
    q, k, v, dout, dlse = _inputs(n, h, h_kv, d, seed=7)
    calls = []
    real = dilated_module.FusedDilated.apply
    monkeypatch.setattr(dilated_module.FusedDilated, "apply", lambda *a: calls.append(a[3]) or real(*a))
    ref = _run(lambda *x: reference_attention(*x, **kw), q, k, v, dout, dlse, torch.float64)
    for backend in ("torch", "math"):
        calls.clear()
        got = _run(lambda *x, b=backend: ring_torch.ring_dilated_attention(
            *x, return_lse=True, ring_size=4, backend=b, **kw), q, k, v, dout, dlse, torch.float64)
        local = [u for u in ring_torch.build_plan(ring_torch.DilatedConfig(w, r, mix, True), n, h, h_kv).units
                 if u.segment <= n // 4]
        assert len(calls) == (1 if backend == "torch" else 0)  # the simulation batches its ranks
        assert all(c.units == tuple(local) and c.seq_len == n // 4 for c in calls)
        for a, b in zip(got, ref):
            assert _max_abs(a, b) <= 1e-9
