"""CUDA backends against the oracle and the float64 reference; skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity_tests.oracle import dilated_attention as oracle_attention
from parity_tests.reference import reference_attention
import ring_torch
from ring_torch import dilated_attention
from ring_torch._api import resolve_backend

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# (id, seq_len, heads, kv_heads, head_dim, segment_lengths, dilation_rates)
CONFIGS = [
    ("w8-16-32_r1-2-4_gqa", 64, 6, 3, 16, (8, 16, 32), (1, 2, 4)),
    ("h12_5_patterns_d12", 32, 12, 4, 12, (4, 8, 16, 32, 32), (1, 2, 2, 4, 8)),  # d % 8 != 0
    ("w_gt_n_d64", 16, 4, 4, 64, (32, 64), (2, 4)),
    ("d128_gqa", 32, 4, 2, 128, (8, 16), (1, 2)),  # the LSE column widens past cuDNN's 128
]
# Relative L2 tolerance per dtype; the looser of the input and compute dtypes applies.
TOL = {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _inputs(n, h, h_kv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, n, h, d, generator=g, dtype=torch.float64),
            torch.randn(2, n, h_kv, d, generator=g, dtype=torch.float64),
            torch.randn(2, n, h_kv, d, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_output_only_gradients_and_kernel_choice(config, mix, dtype, monkeypatch):
    """No LSE cotangent: the fused backward runs as is (no extra column); the kernel is the one
    cuda_kernel names (cuDNN on sm90+, flash on sm80+, with head_dim % 8 == 0), and the longnet
    forward (and backward, where its ``backward`` is set) the Triton rows kernel where
    ``rows_config`` names one; head groups keep the aten kernel both ways (``in_place_heads``
    off in the table)."""
    import ring_torch._kernels as kernels

    _, n, h, h_kv, d, w, r = config
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=True)
    q, k, v = _inputs(n, h, h_kv, d, seed=3)
    dout = torch.randn(2, n, h, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    used = []
    for name in ("_AtenCudnnCUDA", "_AtenFlashCUDA", "_AtenCUDA"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernel, "forward", staticmethod(
            lambda *a, f=kernel.forward, name=name: used.append(name) or f(*a)))
    monkeypatch.setattr(kernels, "attend_into", lambda *a, f=kernels.attend_into: used.append("rows") or f(*a))
    monkeypatch.setattr(kernels, "grads_into", lambda *a, f=kernels.grads_into: used.append("rows_grads") or f(*a))

    def grads(fn, *x):
        x = [t.detach().clone().requires_grad_() for t in x]
        fn(*x).backward(dout.to(x[0].device, x[0].dtype))
        return [t.grad.cpu().double() for t in x]

    got = grads(lambda *x: dilated_attention(*x, backend="torch", **kw), *(t.cuda().to(dtype) for t in (q, k, v)))
    ref = grads(lambda *x: reference_attention(*x, **kw)[0], q, k, v)
    for name, a, b in zip("qkv", got, ref):
        assert _rel(a.numpy(), b.numpy()) <= 5 * TOL[dtype], f"d{name}"
    capability = torch.cuda.get_device_capability()
    chosen = kernels.CUDA_ATEN[kernels.cuda_kernel(dtype, d, capability, kernels.cudnn_attention_available())].__name__
    rows = kernels.rows_config(dtype, d, capability)
    if mix == "longnet" and rows is not None:
        assert "rows" in used and set(used) <= {"rows", "rows_grads", chosen}  # aten at most for its RNG state
        assert ("rows_grads" in used) == (rows.backward is not None)
    else:
        assert set(used) == {chosen}


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.float16),
                                           ("torch", torch.bfloat16), ("math", torch.float64),
                                           ("auto", torch.bfloat16), ("xformers", torch.float16),
                                           ("xformers", torch.bfloat16), ("xformers", torch.float32)])
def test_cuda_forward_and_gradients(config, mix, causal, backend, dtype):
    if backend == "xformers" and not ring_torch._kernels.xformers_available():
        pytest.skip("no xformers build that runs on this torch (benchmarks/xformers_check.sh builds one)")
    _, n, h, h_kv, d, w, r = config
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal)
    q, k, v = _inputs(n, h, h_kv, d)
    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(2, n, h, d, generator=g, dtype=torch.float64)
    w_lse = torch.randn(2, n, h, generator=g, dtype=torch.float64)

    def loss_and_grads(fn, q, k, v):
        q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
        out, lse = fn(q, k, v)
        loss = (out.double() * w_out.to(out.device)).sum() + torch.where(
            torch.isfinite(lse), lse.double() * w_lse.to(lse.device), 0.0).sum()
        loss.backward()
        return out.detach(), lse.detach(), (q.grad, k.grad, v.grad)

    cuda = [x.cuda().to(dtype) for x in (q, k, v)]
    out, lse, grads = loss_and_grads(
        lambda *x: dilated_attention(*x, return_lse=True, backend=backend, **kw), *cuda)
    ref_out, ref_lse = oracle_attention(q.numpy(), k.numpy(), v.numpy(), **kw)
    _, _, ref_grads = loss_and_grads(lambda *x: reference_attention(*x, **kw), q, k, v)
    compute = resolve_backend(backend, cuda[0].device, dtype)[1]
    tol = max(TOL[dtype], TOL[compute])
    assert out.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert _rel(out.cpu().double().numpy(), ref_out) <= tol
    lse = lse.cpu().double().numpy()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    assert _rel(lse[finite], ref_lse[finite]) <= tol
    for name, a, b in zip("qkv", grads, ref_grads):
        assert a.dtype == dtype
        a = a.cpu().double()
        assert torch.isfinite(a).all(), name
        assert _rel(a.numpy(), b.numpy()) <= 5 * tol, f"d{name}"


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_cuda_flop_counter_matches_plan(mix):
    from torch.utils.flop_counter import FlopCounterMode

    from ring_torch import plan_flops
    w, r, h, d = (8, 16, 32), (1, 2, 4), 6, 16  # d % 8 == 0: the kernel runs unpadded
    q = torch.randn(2, 64, h, d, device="cuda")
    with FlopCounterMode(display=False) as counter:
        dilated_attention(q, q, q, segment_lengths=w, dilation_rates=r, mix=mix, backend="torch")
    expected = plan_flops(batch=2, seq_len=64, num_heads=h, head_dim=d, segment_lengths=w,
                          dilation_rates=r, mix=mix)
    assert counter.get_total_flops() == expected


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_lse", [False, True], ids=["out_only", "with_lse"])
@pytest.mark.parametrize("layout", ["contiguous", "balanced"])
def test_cuda_simulated_ring_fused_backward(mix, dtype, with_lse, layout):
    """The ring backward on CUDA (fused kernels fed the global out/lse) against the float64
    reference, with and without an LSE cotangent."""
    n, h, h_kv, d = 64, 6, 3, 16
    kw = dict(segment_lengths=(8, 32, 64), dilation_rates=(1, 2, 4), mix=mix, is_causal=True)
    q, k, v = _inputs(n, h, h_kv, d, seed=7)
    g = torch.Generator().manual_seed(8)
    w_out = torch.randn(2, n, h, d, generator=g, dtype=torch.float64)
    w_lse = torch.randn(2, n, h, generator=g, dtype=torch.float64) if with_lse else torch.zeros(2, n, h)

    def grads(fn, *x):
        x = [t.detach().clone().requires_grad_() for t in x]
        out, lse = fn(*x)
        ((out.double() * w_out.to(out.device)).sum() + (lse.double() * w_lse.to(lse.device)).sum()).backward()
        return [t.grad.cpu().double() for t in x]

    got = grads(lambda *x: ring_torch.ring_dilated_attention(*x, ring_size=4, return_lse=True, backend="torch",
                                                             layout=layout, **kw),
                *(t.cuda().to(dtype) for t in (q, k, v)))
    ref = grads(lambda *x: reference_attention(*x, **kw), q, k, v)
    for name, a, b in zip("qkv", got, ref):
        assert _rel(a.numpy(), b.numpy()) <= 5 * TOL[dtype], f"d{name}"
