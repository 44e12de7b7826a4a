"""``ring_torch._triton_rows``: the Triton forward over strided rows, written in place.

On the CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by the conftest
where no NVIDIA device exists) against a float64 block reference and the float64 oracle; the same
tests run compiled on CUDA (``-m cuda``), bf16 within 2x a bf16 math kernel's error.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import ring_torch._kernels as kernels
from parity_tests import oracle
from ring_torch._aten import _AtenCPU
from ring_torch._config import DilatedConfig
from ring_torch._coords import MaskSpec
from ring_torch._dropout import Dropout
from ring_torch._dilated import AutogradExecutor, FusedExecutor, _run_heads
from ring_torch._plan import build_plan
from ring_torch._triton_grads import grads_into
from parity_tests._triton_marks import CPU, CUDA, interpreted, needs_cuda
from ring_torch._triton_rows import GradConfig, RowsConfig, attend_into, triton_available

SMALL = RowsConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)
SMALL_GRADS = GradConfig(dkv_block_m=16, dkv_block_n=32, dq_block_m=32, dq_block_n=16, num_warps=4, num_stages=2)


def _block_reference(q, k, v, scale, causal, ids=None):
    """``(out, lse)`` of each block's rows in float64: ``[B, m, H, d]``, ``[B, m, H]``; ``ids``
    ``[B, m]``: keys of other documents hidden."""
    B, m, H, d = q.shape
    g = H // k.shape[2]
    k, v = (x.double().repeat_interleave(g, 2) for x in (k, v))
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k) * scale
    if causal:
        s = s.masked_fill(torch.ones(m, m, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    if ids is not None:
        s = s.masked_fill((ids[:, :, None] != ids[:, None, :])[:, None], -math.inf)
    out = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v)
    return out, torch.logsumexp(s, -1).transpose(1, 2)


def _views(x, S, m, rate, offset, heads):
    """The rows of ``x [b, n, h, d]`` at ``offset`` of every ``rate`` in each of ``S`` segments,
    heads ``heads``: ``[b * S, m, |heads|, d]`` (a view)."""
    b = x.shape[0]
    return x.view(b, S, m, rate, *x.shape[2:])[:, :, :, offset, heads[0]:heads[1]].flatten(0, 1)


def _tolerance(dtype):
    return {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("m", [64, 50], ids=["even", "ragged"])
@pytest.mark.parametrize("fill", [False, True])
@pytest.mark.parametrize("tma", [False, True])
def test_rows_against_float64(device, dtype, causal, m, fill, tma):
    """Strided rows of a larger buffer with GQA: values and LSE; with ``fill`` the positions
    between the rows get 0 / -inf; nothing else is touched."""
    torch.manual_seed(0)
    b, S, rate, offset, h, h_kv, d = 2, 3, 2, 1, 6, 3, 16
    n = S * m * rate
    Q = torch.randn(b, n, h, d, dtype=dtype, device=device)
    K, V = (torch.randn(b, n, h_kv, d, dtype=dtype, device=device) for _ in range(2))
    O = torch.full((b, n, h, d), 7.0, dtype=dtype, device=device)
    L = torch.full((b, n, h), 7.0, device=device)
    q, k, v = _views(Q, S, m, rate, offset, (2, 4)), _views(K, S, m, rate, offset, (1, 2)), _views(V, S, m, rate, offset, (1, 2))
    o, l = _views(O, S, m, rate, offset, (2, 4)), _views(L, S, m, rate, offset, (2, 4))
    config = RowsConfig(block_m=32, block_n=16, num_warps=4, num_stages=2, tma=tma)
    if tma and device == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("tensor descriptors need compute capability 9")
    got = attend_into(q, k, v, o, l, 0.3, causal, config, fill=(rate, offset) if fill else None)
    assert got[0] is o and got[1] is l
    want_o, want_l = _block_reference(q, k, v, 0.3, causal)
    tol = _tolerance(dtype)
    assert (o.double() - want_o).abs().max() <= tol
    assert (l.double() - want_l).abs().max() <= 2e-5 * max(1.0, want_l.abs().max().item())
    others = _views(O, S, m, rate, 1 - offset, (2, 4)), _views(L, S, m, rate, 1 - offset, (2, 4))
    if fill:
        assert (others[0] == 0).all() and (others[1] == -math.inf).all()
    else:
        assert (others[0] == 7).all() and (others[1] == 7).all()
    assert (O[:, :, :2] == 7).all() and (O[:, :, 4:] == 7).all() and (L[:, :, :2] == 7).all()


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_rows_without_lse_and_one_row_blocks(device):
    """``lse=None`` writes out alone; a block of one row attends to itself."""
    q, k, v = (torch.randn(3, 1, 2, 32, device=device) for _ in range(3))
    out = torch.zeros_like(q)
    attend_into(q, k, v, out, None, 0.5, True, SMALL)
    torch.testing.assert_close(out, v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("m", [64, 50, 7], ids=["even", "ragged", "short"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_grads_against_float64(device, dtype, causal, m, accumulate):
    """Strided rows with GQA (two query heads per kv head) and an LSE cotangent: ``dq``, ``dk``,
    ``dv`` against float64 autograd of the block; written over (every other element of the
    buffers untouched) or added to float32 accumulators."""
    torch.manual_seed(3)
    b, S, rate, offset, h, h_kv, d = 2, 2, 2, 1, 6, 3, 16
    n = S * m * rate
    Q, DO = (torch.randn(b, n, h, d, dtype=dtype, device=device) for _ in range(2))
    K, V = (torch.randn(b, n, h_kv, d, dtype=dtype, device=device) for _ in range(2))
    q, do = _views(Q, S, m, rate, offset, (2, 6)), _views(DO, S, m, rate, offset, (2, 6))
    k, v = _views(K, S, m, rate, offset, (1, 3)), _views(V, S, m, rate, offset, (1, 3))
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    want_o, want_l = _block_reference(*leaves, 0.3, causal)
    dlse = torch.randn(want_l.shape, device=device)
    (want_o * do.double()).sum().add_((want_l * dlse.double()).sum()).backward()
    out, lse = want_o.detach().to(dtype), want_l.detach().float()
    grad_dtype = torch.float32 if accumulate else dtype
    bufs = [torch.randn(b, n, x, d, device=device).to(grad_dtype) if accumulate else
            torch.full((b, n, x, d), 7.0, dtype=grad_dtype, device=device) for x in (h, h_kv, h_kv)]
    before = [x.clone() for x in bufs]
    heads = ((2, 6), (1, 3), (1, 3))
    views = [_views(x, S, m, rate, offset, hs) for x, hs in zip(bufs, heads)]
    got = grads_into(q, k, v, out, lse, do, dlse, *views, 0.3, causal, SMALL_GRADS,
                     accumulate_q=accumulate, accumulate_kv=accumulate)
    assert all(g is w for g, w in zip(got, views))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for name, view, old, leaf, hs in zip("qkv", views, before, leaves, heads):
        want = leaf.grad + (_views(old, S, m, rate, offset, hs).double() if accumulate else 0)
        err = (view.double() - want).abs().max().item()
        assert err <= tol * max(1.0, leaf.grad.abs().max().item()), (name, err)
        rest = torch.ones(old.shape, dtype=torch.bool, device=device)
        _views(rest, S, m, rate, offset, hs).fill_(False)
        after = bufs["qkv".index(name)]
        assert torch.equal(after[rest], old[rest]), name


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("m", [64, 50], ids=["even", "ragged"])
def test_rows_with_document_ids(device, causal, m):
    """``ids`` (a strided view of ``[b, n]`` ids): forward (written and merged) and backward
    against float64 with keys of other documents hidden; documents interleave, so one block
    mixes several."""
    torch.manual_seed(4)
    b, S, rate, offset, h, h_kv, d = 2, 2, 2, 0, 4, 2, 16
    n = S * m * rate
    Q, DO = (torch.randn(b, n, h, d, device=device) for _ in range(2))
    K, V = (torch.randn(b, n, h_kv, d, device=device) for _ in range(2))
    IDS = torch.randint(0, 3, (b, n), device=device)
    q, do = _views(Q, S, m, rate, offset, (0, 4)), _views(DO, S, m, rate, offset, (0, 4))
    k, v = _views(K, S, m, rate, offset, (0, 2)), _views(V, S, m, rate, offset, (0, 2))
    ids = IDS.view(b, S, m, rate)[:, :, :, offset].flatten(0, 1)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    want_o, want_l = _block_reference(*leaves, 0.3, causal, ids)
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3], device=device)
    attend_into(q, k, v, out, lse, 0.3, causal, SMALL, ids=ids)
    assert (out.double() - want_o).abs().max() <= 2e-5
    assert (lse.double() - want_l).abs().max() <= 2e-5
    acc_o, acc_l = torch.zeros_like(q), torch.full(q.shape[:3], -math.inf, device=device)
    attend_into(q, k, v, acc_o, acc_l, 0.3, causal, SMALL, merge=True, ids=ids)
    assert (acc_o.double() - want_o).abs().max() <= 2e-5
    dlse = torch.randn(lse.shape, device=device)
    (want_o * do.double()).sum().add_((want_l * dlse.double()).sum()).backward()
    grads = [torch.zeros_like(x) for x in (q, k, v)]
    grads_into(q, k, v, out, lse, do, dlse, *grads, 0.3, causal, SMALL_GRADS, ids=ids)
    for name, got, leaf in zip("qkv", grads, leaves):
        assert (got.double() - leaf.grad).abs().max() <= 2e-5 * max(1.0, leaf.grad.abs().max().item()), name
    with pytest.raises(ValueError, match="ids must be int32/int64"):
        attend_into(q, k, v, out, lse, 0.3, causal, SMALL, ids=ids.float())


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_grads_of_empty_rows_are_zero(device):
    """Rows whose LSE is ``-inf`` (no key) get no gradient, whatever ``out`` and ``dlse`` hold,
    and add nothing to the keys."""
    B, m, H, d = 1, 16, 2, 16
    q, k, v, out, dout = (torch.randn(B, m, H, d, device=device) for _ in range(5))
    lse = torch.full((B, m, H), -math.inf, device=device)
    grads = [torch.full_like(q, 5.0) for _ in range(3)]
    grads_into(q, k, v, out, lse, dout, torch.randn(B, m, H, device=device), *grads, 0.5, False, SMALL_GRADS)
    for g in grads:
        assert (g == 0).all()


def _layer_inputs(device, dtype, n=96, h=4, h_kv=2, d=16):
    torch.manual_seed(1)
    return [torch.randn(2, n, x, d, dtype=dtype, device=device) for x in (h, h_kv, h_kv)]


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("m", [64, 50], ids=["even", "ragged"])
def test_rows_merge_into_accumulators(device, m):
    """``merge=True``: the rows' attention merged into float32 ``(out, lse)`` already holding a
    partial attention over other keys (``0`` / ``-inf`` rows among them) by the exact softmax
    merge; other positions untouched."""
    torch.manual_seed(2)
    B, H, d = 3, 2, 16
    q, k, v = (torch.randn(B, m, H, d, device=device) for _ in range(3))
    old_o = torch.randn(B, m, H, d, device=device)
    old_l = torch.randn(B, m, H, device=device)
    old_l[0, :7] = -math.inf
    old_o[0, :7] = 0
    out, lse = old_o.clone(), old_l.clone()
    attend_into(q, k, v, out, lse, 0.3, True, SMALL, merge=True)
    new_o, new_l = _block_reference(q, k, v, 0.3, True)
    total = torch.logaddexp(old_l.double(), new_l)
    want = old_o.double() * torch.exp(old_l.double() - total)[..., None] + new_o * torch.exp(new_l - total)[..., None]
    assert (out.double() - want).abs().max() <= 2e-5
    assert (lse.double() - total).abs().max() <= 2e-5
    with pytest.raises(ValueError, match="merge=True needs float32"):
        attend_into(q.half(), k.half(), v.half(), out.half(), lse, 0.3, True, SMALL, merge=True)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_layer_rows_against_oracle(device, causal, mix):
    """A plan's units through ``FusedDilated`` with the rows kernel (head groups written in
    place, longnet merged into the accumulators by the kernel): out and LSE against the float64
    oracle, gradients against the plain kernel path, with the aten backward and with the rows
    backward (gradients written or added into their rows by :func:`grads_into`)."""
    W, R = (16, 32, 96), (1, 2, 4)
    config = DilatedConfig(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=causal)
    q, k, v = _layer_inputs(device, torch.float32)
    n, h = q.shape[1], q.shape[2]
    plan = build_plan(config, n, h, k.shape[2])
    aten = _AtenCPU if device == "cpu" else kernels.CUDA_ATEN["efficient"]
    spec = MaskSpec(is_causal=causal)
    results = {}
    variants = (("rows", SMALL), ("rows_grads", dataclasses.replace(SMALL, backward=SMALL_GRADS)), ("plain", None))
    for label, rows in variants:
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = FusedExecutor(kernels.TorchKernel(aten, rows)).run(plan, *xs, 0.25, spec)
        (out.square().sum() + lse.sin().sum()).backward()
        results[label] = (out.detach(), lse.detach(), *(x.grad for x in xs))
    want_o, want_l = oracle.dilated_attention(*(x.cpu().numpy() for x in (q, k, v)), segment_lengths=W,
                                              dilation_rates=R, mix=mix, is_causal=causal, softmax_scale=0.25)
    out, lse = results["rows"][:2]
    np.testing.assert_allclose(out.cpu().double().numpy(), want_o, atol=2e-5, rtol=0)
    np.testing.assert_allclose(lse.cpu().double().numpy(), want_l, atol=2e-5, rtol=1e-6)
    for label in ("rows", "rows_grads"):
        for got, plain in zip(results[label][2:], results["plain"][2:]):
            torch.testing.assert_close(got, plain, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("case", ["documents", "padding", "both", "dropout", "documents+dropout",
                                  "padding+dropout"])
def test_layer_masks_by_document_ids(device, causal, mix, case):
    """A kernel that masks by row ids (``masks=True``: documents, and padded keys where blocks
    hide them) and draws dropout in the kernels (``dropout=True``; the math kernel draws the same
    mask from the seed) through ``FusedDilated``, both ways: out, LSE and gradients against the
    math kernel through autograd; an uneven GQA split (units with ``kv_index``) included."""
    W, R = (16, 32, 96), (1, 2, 4)
    config = DilatedConfig(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=causal)
    q, k, v = _layer_inputs(device, torch.float32, h=8, h_kv=2)
    b, n, h = q.shape[:3]
    plan = build_plan(config, n, h, k.shape[2])
    assert mix == "longnet" or any(u.kv_index is not None for u in plan.units)
    ids = torch.randint(0, 4, (b, n), generator=torch.Generator().manual_seed(5)).sort(-1).values.to(device)
    lengths = torch.tensor([n, 61], device=device) if case.startswith(("padding", "both")) else None
    spec = MaskSpec(is_causal=causal, dropout=Dropout(0.25, 77) if "dropout" in case else None, lengths=lengths,
                    key_mask=lengths is not None and not causal,
                    segment_ids=ids if case.startswith(("documents", "both")) else None)
    masks = case != "dropout"
    w_out = torch.randn(q.shape, device=device)
    w_lse = torch.randn(q.shape[:3], device=device)
    aten = _AtenCPU if device == "cpu" else kernels.CUDA_ATEN["efficient"]
    rows = dataclasses.replace(SMALL, backward=SMALL_GRADS)
    results = []
    fused = kernels.TorchKernel(aten, rows, masks=masks, dropout="dropout" in case)
    for executor in (FusedExecutor(fused), AutogradExecutor(kernels.MathKernel())):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = executor.run(plan, *xs, 0.25, spec, row_lengths=lengths)
        loss = (out * w_out).sum() + torch.where(torch.isfinite(lse), lse * w_lse, 0).sum()
        loss.backward()
        results.append((out.detach(), lse.detach(), *(x.grad for x in xs)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)


def test_masks_need_rows_kernels_both_ways():
    with pytest.raises(ValueError, match="masks=True needs rows kernels"):
        kernels.TorchKernel(_AtenCPU, SMALL, masks=True)
    assert kernels.kernel_for("torch", torch.device("cpu"), torch.float32, 16, False, True, rows_masks=True).name == "math"


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_units_not_covering_every_head_leave_the_rest_blank(device):
    """A subset of the units (a ring's local sub-plan): their rows written, every other head
    ``0`` / ``-inf`` as the plain path leaves them."""
    config = DilatedConfig(segment_lengths=(16, 32), dilation_rates=(1, 2), mix="head_groups", is_causal=True)
    q, k, v = _layer_inputs(device, torch.float32, n=64)
    plan = build_plan(config, 64, 4, 2)
    aten = _AtenCPU if device == "cpu" else kernels.CUDA_ATEN["efficient"]
    units = plan.units[1:]
    got = _run_heads(units, q, k, v, 0.25, kernels.TorchKernel(aten, SMALL), MaskSpec(is_causal=True))
    want = _run_heads(units, q, k, v, 0.25, kernels.TorchKernel(aten), MaskSpec(is_causal=True))
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=0)
    assert (got[0][:, :, :2] == 0).all() and (got[1][:, :, :2] == -math.inf).all()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_cuda_layer_bf16_within_twice_math(mix):
    """``ring_torch.dilated_attention`` in bf16 with the rows kernels forced on (forward and
    backward): its error against float32 math at most twice that of the bf16 math kernel's;
    gradients likewise."""
    import ring_torch

    q, k, v = _layer_inputs("cuda", torch.bfloat16, n=4096, h=8, h_kv=8, d=64)
    kw = dict(segment_lengths=(512, 1024, 2048, 4096), dilation_rates=(1, 2, 4, 8), mix=mix, is_causal=True)
    key = (torch.cuda.get_device_capability(), 64)
    exact = ring_torch.dilated_attention(*(x.float() for x in (q, k, v)), backend="math", **kw)
    naive = ring_torch.dilated_attention(q, k, v, backend="math", **kw).float()
    saved = kernels.ROWS_CONFIGS.get(key)
    kernels.ROWS_CONFIGS[key] = RowsConfig(backward=GradConfig())
    try:
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = ring_torch.dilated_attention(*xs, backend="torch", **kw)
        out.float().square().sum().backward()
    finally:
        kernels.ROWS_CONFIGS.pop(key)
        if saved is not None:
            kernels.ROWS_CONFIGS[key] = saved
    assert (out.float() - exact).abs().max() <= 2 * (naive - exact).abs().max()
    xs32 = [x.float().requires_grad_() for x in (q, k, v)]
    ring_torch.dilated_attention(*xs32, backend="math", **kw).square().sum().backward()
    xs16 = [x.clone().requires_grad_() for x in (q, k, v)]
    ring_torch.dilated_attention(*xs16, backend="math", **kw).float().square().sum().backward()
    for got, ref, nv in zip(xs, xs32, xs16):
        assert (got.grad.float() - ref.grad).abs().max() <= 2 * (nv.grad.float() - ref.grad).abs().max()


def _mask_case(case, n, device):
    """The keyword arguments of a call that needs a key mask: documents (causal or not) or
    non-causal padding; or dropout."""
    if case == "dropout":
        return dict(is_causal=True, dropout_p=0.2, dropout_seed=9)
    if case == "padding":
        return dict(is_causal=False, seq_lengths=torch.tensor([n, n * 3 // 5 - 8], device=device))
    return dict(is_causal=case == "documents_causal", segment_ids=(torch.arange(n, device=device) * 5 // n).expand(2, -1))


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("case", ["documents_causal", "documents", "padding", "dropout"])
def test_api_routes_masks_to_the_rows_kernels(mix, case, monkeypatch):
    """``ring_torch.dilated_attention`` with a key mask or dropout, given a kernel table that names
    rows kernels on this device (the CPU, in the interpreter) and a dispatch that routes them
    there: both rows kernels run, and values and gradients equal the math kernel's (dropout: the
    same seed draws the same mask)."""
    if not (triton_available() and interpreted()):
        pytest.skip("triton's interpreter (TRITON_INTERPRET=1) absent")
    import ring_torch
    import ring_torch._dilated as dilated

    rows = RowsConfig(block_m=32, block_n=16, num_stages=2, in_place_heads=False, backward=SMALL_GRADS)

    def kernel_for(backend, device, dtype, head_dim, needs_dropout, needs_key_mask=False, rows_masks=False):
        if backend != "torch":
            return kernels.kernel_for(backend, device, dtype, head_dim, needs_dropout, needs_key_mask, rows_masks)
        assert rows_masks
        if needs_key_mask or needs_dropout:
            return kernels.TorchKernel(_AtenCPU, dataclasses.replace(rows, in_place_heads=True), masks=needs_key_mask,
                                       dropout=needs_dropout)
        return kernels.TorchKernel(_AtenCPU, rows)

    monkeypatch.setattr(dilated, "kernel_for", kernel_for)
    used = []
    monkeypatch.setattr(kernels, "attend_into", lambda *a, f=kernels.attend_into: used.append("rows") or f(*a))
    monkeypatch.setattr(kernels, "grads_into", lambda *a, f=kernels.grads_into: used.append("rows_grads") or f(*a))
    q, k, v = _layer_inputs("cpu", torch.float32, n=256, h=8, h_kv=4)
    kw = dict(segment_lengths=(32, 64, 128, 256), dilation_rates=(1, 2, 4, 8), mix=mix, **_mask_case(case, 256, "cpu"))
    results = {}
    for backend in ("math", "torch"):
        used.clear()
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = ring_torch.dilated_attention(*xs, backend=backend, **kw)
        out.square().sum().backward()
        results[backend] = (out.detach(), *(x.grad for x in xs))
        assert set(used) == (set() if backend == "math" else {"rows", "rows_grads"})
    for got, want in zip(results["torch"], results["math"]):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("case", ["documents_causal", "documents", "padding"])
def test_cuda_masks_take_the_rows_kernels(mix, case, monkeypatch):
    """``segment_ids`` (and non-causal padding) on CUDA in bf16 run the rows kernels both ways
    where the table names them: errors against float32 math at most twice the bf16 math
    kernel's, gradients likewise."""
    import ring_torch

    if kernels.rows_config(torch.bfloat16, 64, torch.cuda.get_device_capability()) is None:
        pytest.skip("the kernel table names no rows kernels for this card")
    q, k, v = _layer_inputs("cuda", torch.bfloat16, n=4096, h=8, h_kv=4, d=64)
    kw = dict(segment_lengths=(512, 1024, 2048, 4096), dilation_rates=(1, 2, 4, 8), mix=mix,
              **_mask_case(case, 4096, "cuda"))
    used = []
    monkeypatch.setattr(kernels, "attend_into", lambda *a, f=kernels.attend_into: used.append("rows") or f(*a))
    monkeypatch.setattr(kernels, "grads_into", lambda *a, f=kernels.grads_into: used.append("rows_grads") or f(*a))

    def grads(backend, dtype):
        xs = [x.detach().to(dtype, copy=True).requires_grad_() for x in (q, k, v)]
        out = ring_torch.dilated_attention(*xs, backend=backend, **kw)
        out.float().square().sum().backward()
        return out.float(), [x.grad.float() for x in xs]

    exact, exact_grads = grads("math", torch.float32)
    naive, naive_grads = grads("math", torch.bfloat16)
    assert not used
    got, got_grads = grads("torch", torch.bfloat16)
    assert "rows" in used and "rows_grads" in used
    assert (got - exact).abs().max() <= 2 * (naive - exact).abs().max()
    for g, e, nv in zip(got_grads, exact_grads, naive_grads):
        assert (g - e).abs().max() <= 2 * (nv - e).abs().max()


def test_rows_config_only_from_the_table():
    """``backend="torch"`` takes the rows kernel only where ``ROWS_CONFIGS`` names this card and
    head_dim, for fp16/bf16 and a head_dim the kernel takes."""
    key = ((9, 0), 64)
    saved = dict(kernels.ROWS_CONFIGS)
    try:
        kernels.ROWS_CONFIGS.clear()
        assert kernels.rows_config(torch.bfloat16, 64, (9, 0)) is None
        kernels.ROWS_CONFIGS[key] = SMALL
        assert kernels.rows_config(torch.bfloat16, 64, (9, 0)) == SMALL
        assert kernels.rows_config(torch.float16, 64, (9, 0)) == SMALL
        assert kernels.rows_config(torch.float32, 64, (9, 0)) is None
        assert kernels.rows_config(torch.bfloat16, 64, (8, 0)) is None
        assert kernels.rows_config(torch.bfloat16, 48, (9, 0)) is None
    finally:
        kernels.ROWS_CONFIGS.clear()
        kernels.ROWS_CONFIGS.update(saved)
    assert kernels.TorchKernel.create(torch.device("cpu"), torch.float32, 64).rows is None


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("case,message", [
    ("lse_dtype", "lse must be float32"),
    ("head_stride", "head dim must be contiguous"),
    ("head_dim", "power-of-two head_dim"),
    ("gqa", "not a multiple of num_kv_heads"),
    ("fill", "are not rate=3 positions"),
    ("blocks", "does not divide"),
    ("tma", "not 16-byte aligned"),
])
def test_rows_errors_name_the_argument(case, message):
    q, k, v = (torch.randn(2, 8, 4, 16) for _ in range(3))
    out, lse, config, fill = torch.empty_like(q), torch.empty(2, 8, 4), SMALL, None
    if case == "lse_dtype":
        lse = lse.double()
    elif case == "head_stride":
        q = torch.randn(2, 8, 4, 32)[..., ::2]
    elif case == "head_dim":
        q, k, v = (torch.randn(2, 8, 4, 24) for _ in range(3))
        out = torch.empty_like(q)
    elif case == "gqa":
        k, v = (torch.randn(2, 8, 3, 16) for _ in range(2))
    elif case == "fill":
        fill = (3, 0)
    elif case == "tma":
        q = torch.randn(2, 8, 4, 17)[..., :16]
        config = RowsConfig(block_m=32, block_n=16, tma=True)
    else:
        config = RowsConfig(block_m=32, block_n=64)
    with pytest.raises(ValueError, match=message):
        attend_into(q, k, v, out, lse, 0.5, True, config, fill)
