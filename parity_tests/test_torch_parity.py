"""ring_torch.dilated_attention against the float64 oracle (values) and the float64 autograd
reference (gradients), for both mixes, causal or not, GQA, and the math and torch backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parity_tests.oracle import dilated_attention as oracle_attention
from parity_tests.reference import reference_attention
from ring_torch import dilated_attention

# (id, seq_len, heads, kv_heads, head_dim, segment_lengths, dilation_rates)
CONFIGS = [
    ("single", 32, 2, 2, 16, (32,), (1,)),
    ("single_dilated_gqa", 32, 4, 2, 16, (16,), (2,)),
    ("w8-16-32_r1-2-4", 64, 6, 3, 16, (8, 16, 32), (1, 2, 4)),
    ("w_gt_n", 16, 4, 4, 16, (32, 64), (2, 4)),  # w' = n; with longnet some rows are empty
    ("h12_5_patterns_gqa", 32, 12, 4, 16, (4, 8, 16, 32, 32), (1, 2, 2, 4, 8)),
    ("d64", 32, 4, 2, 64, (8, 16), (1, 2)),
]
MIXES = ["head_groups", "longnet"]


def _inputs(n, h, h_kv, d, dtype=torch.float64, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(batch, n, h_kv, d, generator=g, dtype=torch.float64)
    v = torch.randn(batch, n, h_kv, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _kwargs(config, mix, causal):
    _, _, _, _, _, w, r = config
    return dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal)


def _assert_lse_equal(lse, ref, atol):
    lse, ref = np.asarray(lse, dtype=np.float64), np.asarray(ref)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref))
    finite = np.isfinite(ref)
    assert np.isfinite(lse[finite]).all()
    np.testing.assert_allclose(lse[finite], ref[finite], rtol=0, atol=atol)


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", ["math", "torch"])
def test_forward_float64_matches_oracle(config, mix, causal, backend):
    _, n, h, h_kv, d, _, _ = config
    q, k, v = _inputs(n, h, h_kv, d)
    kw = _kwargs(config, mix, causal)
    out, lse = dilated_attention(q, k, v, return_lse=True, backend=backend, **kw)
    ref_out, ref_lse = oracle_attention(q.numpy(), k.numpy(), v.numpy(), **kw)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert out.shape == (2, n, h, d) and lse.shape == (2, n, h)
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=0, atol=1e-10)
    _assert_lse_equal(lse.numpy(), ref_lse, atol=1e-10)


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_float32_torch_backend(config, mix, causal):
    _, n, h, h_kv, d, _, _ = config
    q, k, v = _inputs(n, h, h_kv, d)
    kw = _kwargs(config, mix, causal)
    out, lse = dilated_attention(q.float(), k.float(), v.float(), return_lse=True,
                                 backend="torch", **kw)
    ref_out, ref_lse = oracle_attention(q.numpy(), k.numpy(), v.numpy(), **kw)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert _rel(out.numpy(), ref_out) <= 2e-5
    _assert_lse_equal(lse.numpy(), ref_lse, atol=2e-5)


def test_bfloat16_torch_backend_runs_close():
    q, k, v = _inputs(32, 4, 2, 16)
    kw = dict(segment_lengths=(8, 16), dilation_rates=(1, 2), mix="longnet", is_causal=True)
    out, lse = dilated_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), return_lse=True, **kw)
    ref_out, ref_lse = oracle_attention(q.numpy(), k.numpy(), v.numpy(), **kw)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert _rel(out.float().numpy(), ref_out) <= 2e-2  # bf16 inputs: 8 mantissa bits


def _loss_weights(n, h, d, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, n, h, d, generator=g, dtype=torch.float64),
            torch.randn(batch, n, h, generator=g, dtype=torch.float64))


def _grads(fn, q, k, v, w_out, w_lse, use_lse):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out * w_out.to(out.dtype)).sum()
    if use_lse:
        # -inf rows (position attends to nothing) are excluded from the loss.
        loss = loss + torch.where(torch.isfinite(lse), lse * w_lse.to(lse.dtype), 0.0).sum()
    loss.backward()
    return q.grad, k.grad, v.grad


GRAD_CONFIGS = [CONFIGS[1], CONFIGS[2], CONFIGS[3], CONFIGS[4]]


@pytest.mark.parametrize("config", GRAD_CONFIGS, ids=[c[0] for c in GRAD_CONFIGS])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", ["math", "torch"])
@pytest.mark.parametrize("use_lse", [False, True], ids=["out", "out+lse"])
def test_gradients_float64_match_reference(config, mix, causal, backend, use_lse):
    _, n, h, h_kv, d, _, _ = config
    q, k, v = _inputs(n, h, h_kv, d)
    w_out, w_lse = _loss_weights(n, h, d)
    kw = _kwargs(config, mix, causal)
    got = _grads(lambda *x: dilated_attention(*x, return_lse=True, backend=backend, **kw),
                 q, k, v, w_out, w_lse, use_lse)
    want = _grads(lambda *x: reference_attention(*x, **kw), q, k, v, w_out, w_lse, use_lse)
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=f"d{name}")


@pytest.mark.parametrize("config", GRAD_CONFIGS, ids=[c[0] for c in GRAD_CONFIGS])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradients_float32_torch_backend(config, mix, causal):
    _, n, h, h_kv, d, _, _ = config
    q, k, v = _inputs(n, h, h_kv, d)
    w_out, w_lse = _loss_weights(n, h, d)
    kw = _kwargs(config, mix, causal)
    got = _grads(lambda *x: dilated_attention(*x, return_lse=True, backend="torch", **kw),
                 q.float(), k.float(), v.float(), w_out, w_lse, True)
    want = _grads(lambda *x: reference_attention(*x, **kw), q, k, v, w_out, w_lse, True)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == torch.float32
        assert _rel(a.numpy(), b.numpy()) <= 1e-4, f"d{name}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", ["math", "torch"])
@pytest.mark.parametrize("h_kv", [4, 2])
def test_single_pattern_equals_sdpa(causal, backend, h_kv):
    q, k, v = _inputs(32, 4, h_kv, 16)
    out = dilated_attention(q, k, v, segment_lengths=(32,), dilation_rates=(1,),
                            is_causal=causal, backend=backend)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, enable_gqa=h_kv != 4).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("backend", ["math", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_causal_output_ignores_future(mix, backend, dtype):
    n, p = 64, 37
    q, k, v = _inputs(n, 6, 3, 16, dtype=dtype)
    kw = dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4), mix=mix, is_causal=True,
              backend=backend)
    out = dilated_attention(q, k, v, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[:, p + 1:] = torch.randn_like(k2[:, p + 1:]) * 5
    v2[:, p + 1:] = torch.randn_like(v2[:, p + 1:]) * 5
    out2 = dilated_attention(q, k2, v2, **kw)
    assert torch.equal(out[:, :p + 1], out2[:, :p + 1])
    assert not torch.equal(out[:, p + 1:], out2[:, p + 1:])


def test_softmax_scale_and_noncontiguous_inputs():
    q, k, v = _inputs(32, 4, 2, 16)
    kw = dict(segment_lengths=(8, 16), dilation_rates=(1, 2), mix="longnet", softmax_scale=0.3)
    # [b, h, n, d] storage viewed as [b, n, h, d]
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    out = dilated_attention(qt, kt, vt, backend="torch", **kw)
    ref, _ = oracle_attention(q.numpy(), k.numpy(), v.numpy(), **kw)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-10)
