"""The single-device torch layer's own backward (``backend="torch"``, no dropout): fed the merged
``(out, lse)``, one fused-kernel backward per unit, gradients added in place into strided rows;
float32 sums only where units share a head."""

from __future__ import annotations

import pytest
import torch

import ring_torch._dilated_grads as dilated_grads
import ring_torch._kernels as kernels
from parity_tests.reference import reference_attention
from ring_torch import DilatedConfig, dilated_attention
from ring_torch._plan import build_plan

# (id, seq_len, heads, kv_heads, head_dim, segment_lengths, dilation_rates)
CONFIGS = [
    ("mha", 32, 4, 4, 16, (8, 16), (1, 2)),
    ("gqa_shared_kv", 32, 8, 2, 16, (4, 8, 16, 32), (1, 2, 2, 4)),
    ("kv_index", 32, 12, 4, 16, (4, 8, 16, 32, 32), (1, 2, 2, 4, 8)),
    ("w_gt_n", 16, 4, 4, 16, (32, 64), (2, 4)),  # longnet rows with no key: lse = -inf
]


def _inputs(n, h, h_kv, d, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, n, x, d, generator=g, dtype=torch.float64) for x in (h, h_kv, h_kv))


def _grads(fn, inputs, loss):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    loss(*fn(*xs)).backward()
    return [torch.zeros_like(x) if x.grad is None else x.grad for x in xs]  # None: lse ignores v


def _lse_loss(out, lse):  # only the LSE: the backward sees dout = None
    return torch.where(torch.isfinite(lse), lse * torch.linspace(-1, 1, lse.shape[1], dtype=lse.dtype)[:, None], 0.0).sum()


def _out_loss(out, lse):
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return (out.double() * weights).sum()


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("loss", [_out_loss, _lse_loss], ids=["out", "lse_only"])
def test_fused_backward_float64_equals_reference_one_kernel_call_per_unit(config, mix, loss, monkeypatch):
    _, n, h, h_kv, d, w, r = config
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=True)
    calls = []
    real = kernels.fused_block_grads
    monkeypatch.setattr(kernels, "fused_block_grads", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    inputs = _inputs(n, h, h_kv, d)
    got = _grads(lambda *x: dilated_attention(*x, return_lse=True, backend="torch", **kw), inputs, loss)
    want = _grads(lambda *x: reference_attention(*x, **kw), inputs, loss)
    assert len(calls) == len(build_plan(DilatedConfig(w, r, mix, True), n, h, h_kv).units)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=f"d{name}")


def test_grad_dtypes_sum_in_float32_only_where_units_share_a_head():
    bf16, f32 = torch.bfloat16, torch.float32

    def dtypes(h, h_kv, mix, w=(4, 8, 16, 32), r=(1, 2, 2, 4)):
        return dilated_grads.grad_dtypes(build_plan(DilatedConfig(w, r, mix, True), 32, h, h_kv), bf16)

    assert dtypes(8, 8, "head_groups") == (bf16, bf16)  # every element written by one unit
    assert dtypes(8, 4, "head_groups") == (bf16, bf16)  # kv_repeat: summed in float32 per unit
    assert dtypes(8, 2, "head_groups") == (bf16, f32)  # kv head 0 serves patterns 0 and 1
    assert dtypes(6, 3, "head_groups", (8, 16), (1, 2)) == (bf16, f32)  # kv_index (0, 0, 1), (1, 2, 2)
    assert dilated_grads._overlaps([[0, 0, 1]]) and not dilated_grads._overlaps([[0, 1], [2]])  # a repeat in one unit counts
    assert dtypes(8, 8, "longnet") == (f32, f32)  # every pattern adds into every head


def test_bfloat16_head_groups_gradients_within_twice_the_naive_error():
    """The direct (no float32 buffer) path: bf16 gradients at most 2x the error of the naive
    dense implementation (the autograd reference) run in bf16 (flash-attn's rule)."""
    n, h, d = 64, 4, 32
    kw = dict(segment_lengths=(16, 32), dilation_rates=(1, 2), mix="head_groups", is_causal=True)
    inputs = tuple(x.bfloat16().double() for x in _inputs(n, h, h, d))
    exact = _grads(lambda *x: reference_attention(*x, **kw), inputs, _out_loss)
    bf16 = [x.bfloat16() for x in inputs]
    got = _grads(lambda *x: dilated_attention(*x, return_lse=True, backend="torch", **kw), bf16, _out_loss)
    naive = _grads(lambda *x: reference_attention(*x, **kw), bf16, _out_loss)
    for name, a, b, e in zip("qkv", got, naive, exact):
        assert a.dtype == torch.bfloat16
        err, naive_err = ((x.double() - e).norm() / e.norm() for x in (a, b))
        assert err <= 2 * naive_err, f"d{name}: {err:.2e} vs naive bf16 {naive_err:.2e}"


def test_noncontiguous_inputs_and_dropout_fallback():
    n, h, d = 32, 4, 16
    kw = dict(segment_lengths=(8, 16), dilation_rates=(1, 2), mix="longnet", is_causal=True)
    inputs = _inputs(n, h, h, d)
    strided = tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs)  # [b, h, n, d] storage
    want = _grads(lambda *x: reference_attention(*x, **kw), inputs, _out_loss)
    got = _grads(lambda *x: dilated_attention(*x, return_lse=True, backend="torch", **kw), strided, _out_loss)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    out = dilated_attention(*[x.requires_grad_() for x in strided], backend="torch", dropout_p=0.1,
                            dropout_seed=3, **kw)
    assert "FusedDilated" not in type(out.grad_fn).__name__  # dropout runs the autograd math path


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_returned_output_is_the_tensor_kept_for_the_backward(mix):
    """bf16: the layer returns the very ``out`` its backward keeps (longnet's float32 merge is
    rounded once), so no second full-size copy stays alive."""
    kw = dict(segment_lengths=(8, 16), dilation_rates=(1, 2), mix=mix, is_causal=True)
    q, k, v = (x.bfloat16().requires_grad_() for x in _inputs(32, 4, 4, 16))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.data_ptr()) or t, lambda t: t):
        out = dilated_attention(q, k, v, backend="torch", **kw)
    assert out.dtype == torch.bfloat16 and out.data_ptr() in kept


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_in_row_blocks_equals_whole_units(config, mix, causal, monkeypatch):
    """With the block budget at one byte every unit's backward runs one segment of one batch
    entry at a time (more kernel calls, each on its own coordinates): the gradients equal those
    of whole units to rounding, and the reference's."""
    _, n, h, h_kv, d, w, r = config
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal, return_lse=True, backend="torch")
    inputs = _inputs(n, h, h_kv, d)
    whole = _grads(lambda *x: dilated_attention(*x, **kw), inputs, _out_loss)
    calls = []
    real = kernels.fused_block_grads
    monkeypatch.setattr(kernels, "fused_block_grads", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    monkeypatch.setattr(dilated_grads, "BACKWARD_BLOCK_BYTES", 1)
    blocks = _grads(lambda *x: dilated_attention(*x, **kw), inputs, _out_loss)
    units = build_plan(DilatedConfig(w, r, mix, causal), n, h, h_kv).units
    assert len(calls) == sum(2 * (n // u.segment) for u in units)  # batch 2, one segment per call
    assert all(shape[0] == 1 for shape in calls)
    want = _grads(lambda *x: reference_attention(*x, **{k: v for k, v in kw.items() if k not in ("return_lse", "backend")}),
                  inputs, _out_loss)
    for name, a, b, c in zip("qkv", blocks, whole, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"d{name} blocks vs whole")
        torch.testing.assert_close(a, c, rtol=0, atol=1e-9, msg=f"d{name} blocks vs reference")
