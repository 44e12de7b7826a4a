"""Dropout drawn inside the Triton rows kernels (``ring_torch._triton_dropout``).

The kernels finish the shared counter hash per (row, key) in their tiles; these tests hold them
to the mask :func:`ring_torch._dropout.keep_mask` draws (the math kernel's, and JAX's): a block
against a float64 reference both ways, the longnet epilogue, how a block's dropout is derived
from its coordinates, the dispatch and the errors. The layer (with documents and padding too)
and the API route are in ``test_triton_rows`` (``test_layer_masks_by_document_ids``,
``test_api_routes_masks_to_the_rows_kernels``). On the CPU the kernels run in Triton's
interpreter; the ``-m cuda`` tests run them compiled (``ring_torch._kernels.ROWS_TESTED["dropout"]``
lists the cards they passed on).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import ring_torch._kernels as kernels
from parity_tests._triton_marks import CPU, CUDA, needs_cuda
from ring_torch._aten import _AtenCPU
from ring_torch._config import DilatedConfig
from ring_torch._coords import MaskSpec, dropout_rows, unit_coords
from ring_torch._dilated import AutogradExecutor, FusedExecutor
from ring_torch._dropout import Dropout, _mix, keep_mask, row_hash, threshold
from ring_torch._plan import build_plan
from ring_torch._triton_grads import grads_into
from ring_torch._triton_rows import GradConfig, RowsConfig, RowsDropout, attend_into

SMALL = RowsConfig(block_m=32, block_n=16, num_warps=4, num_stages=2,
                   backward=GradConfig(dkv_block_m=16, dkv_block_n=32, dq_block_m=32, dq_block_n=16,
                                       num_warps=4, num_stages=2))


def _block_case(device, m, p=0.3, B=3, H=4, H_kv=2, d=16):
    """Inputs of one block, its dropout (rows at positions ``5 + 3 i``, heads from 1) and the
    boolean keep mask ``[B, H, m, m]`` drawn by :func:`keep_mask`."""
    g = torch.Generator().manual_seed(m)
    q, k, v = (torch.randn(B, m, h, d, generator=g).to(device) for h in (H, H_kv, H_kv))
    batch, heads = torch.arange(B, device=device), torch.arange(1, H + 1, device=device)
    qpos = (5 + 3 * torch.arange(m, device=device)).expand(B, H, m)
    drop = RowsDropout(row_hash(1234, 2, batch, heads, qpos).transpose(1, 2), qpos[:, 0], p)
    return (q, k, v), drop, keep_mask(1234, 2, batch, heads, qpos, qpos, p)


def _reference(q, k, v, keep, p, scale, causal, ids=None):
    """float64 ``(out, lse)`` of a block with dropout ``keep`` (differentiable)."""
    m, group = q.shape[1], q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(group, 2) for x in (k, v))
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if causal:
        s = s.masked_fill(torch.ones(m, m, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    if ids is not None:
        s = s.masked_fill((ids[:, :, None] != ids[:, None, :])[:, None], -math.inf)
    weights = torch.softmax(s, -1) * keep / (1 - p)
    return torch.einsum("bhij,bjhd->bihd", weights, v), torch.logsumexp(s, -1).transpose(1, 2)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("m", [64, 50], ids=["even", "ragged"])
@pytest.mark.parametrize("documents", [False, True])
def test_block_dropout_against_float64(device, causal, m, documents):
    """Forward (out, LSE) and backward (dq, dk, dv with an LSE cotangent) of a GQA block with
    dropout, alone and with document ids, against float64 autograd of the same mask."""
    (q, k, v), drop, keep = _block_case(device, m)
    ids = (torch.arange(m, device=device) * 3 // m).expand(q.shape[0], m).contiguous() if documents else None
    xs = [x.double().requires_grad_() for x in (q, k, v)]
    want_o, want_l = _reference(*xs, keep, drop.p, 0.25, causal, ids)
    g = torch.Generator().manual_seed(1)
    d_out, d_lse = (torch.randn(x.shape, generator=g, dtype=torch.float64).to(device) for x in (want_o, want_l))
    ((want_o * d_out).sum() + (want_l * d_lse).sum()).backward()
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3], device=device)
    attend_into(q, k, v, out, lse, 0.25, causal, SMALL, ids=ids, dropout=drop)
    torch.testing.assert_close(out.double(), want_o.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), want_l.detach(), atol=2e-5, rtol=1e-6)
    grads = [torch.empty_like(x) for x in (q, k, v)]
    grads_into(q, k, v, out, lse, d_out.float(), d_lse.float(), *grads, 0.25, causal, SMALL.backward,
               ids=ids, dropout=drop)
    for got, x in zip(grads, xs):
        torch.testing.assert_close(got.double(), x.grad, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("device", [CPU])
def test_rows_and_merge_draw_the_same_mask(device):
    """The longnet epilogue (``merge=True`` into -inf/0 accumulators) with dropout equals the
    written rows, and dropout changes the output (the mask is not silently skipped)."""
    (q, k, v), drop, _ = _block_case(device, 64)
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3], device=device)
    attend_into(q, k, v, out, lse, 0.25, True, SMALL, dropout=drop)
    acc, acc_lse = torch.zeros_like(q), torch.full(q.shape[:3], -math.inf, device=device)
    attend_into(q, k, v, acc, acc_lse, 0.25, True, SMALL, merge=True, dropout=drop)
    torch.testing.assert_close(acc, out, atol=1e-6, rtol=1e-6)
    plain = torch.empty_like(q)
    attend_into(q, k, v, plain, None, 0.25, True, SMALL)
    assert (plain - out).abs().max() > 0.1


def test_dispatch_of_dropout(monkeypatch):
    """On CUDA ``backend="torch"`` draws dropout in the rows kernels (every mix, both ways) only on
    one device (in a ring once ``ROWS_TESTED["ring"]`` lists the card), where the table names rows
    kernels with a backward and ``ROWS_TESTED["dropout"]`` lists the card; otherwise the math kernel. A torch kernel that does not draw
    dropout refuses a block with it."""
    cuda = torch.device("cuda")
    table = {"rows": SMALL}
    monkeypatch.setattr(kernels.TorchKernel, "create", classmethod(lambda cls, *a: cls(_AtenCPU, table["rows"])))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(kernels, "ROWS_TESTED", {"dropout": set(), "ring": set()})
    assert kernels.kernel_for("torch", cuda, torch.bfloat16, 64, True, rows_masks=True).name == "math"
    kernels.ROWS_TESTED["dropout"].add((9, 0))
    chosen = kernels.kernel_for("torch", cuda, torch.bfloat16, 64, True, rows_masks=True)
    assert (chosen.name, chosen.dropout, chosen.masks, chosen.rows.in_place_heads) == ("torch", True, False, True)
    chosen = kernels.kernel_for("torch", cuda, torch.bfloat16, 64, True, True, rows_masks=True)
    assert (chosen.dropout, chosen.masks) == (True, True)
    assert kernels.kernel_for("torch", cuda, torch.bfloat16, 64, True).name == "math"  # a ring: not tested there
    kernels.ROWS_TESTED["ring"].add((9, 0))
    assert kernels.kernel_for("torch", cuda, torch.bfloat16, 64, True).dropout
    assert kernels.kernel_for("torch", torch.device("cpu"), torch.float32, 64, True, rows_masks=True).name == "math"
    table["rows"] = RowsConfig()  # no backward: the math kernel
    assert kernels.kernel_for("torch", cuda, torch.bfloat16, 64, True, rows_masks=True).name == "math"
    config = DilatedConfig(segment_lengths=(16,), dilation_rates=(1,))
    unit = build_plan(config, 32, 2, 2).units[0]
    coords = unit_coords(unit, MaskSpec(is_causal=True, dropout=Dropout(0.1, 1)), 1, 32)
    q = torch.zeros(2, 16, 2, 16)
    with pytest.raises(RuntimeError, match="does not draw it"):
        kernels.TorchKernel(_AtenCPU).forward(q, q, q, 0.25, coords)
    with pytest.raises(ValueError, match="dropout=True needs rows kernels"):
        kernels.TorchKernel(_AtenCPU, RowsConfig(), dropout=True)


def test_dropout_rows_are_keep_mask():
    """:func:`dropout_rows` splits exactly the mask :func:`block_masks` draws: for a unit's own
    rows, and for a ring hop's block (other key rows, heads at different offsets)."""
    config = DilatedConfig(segment_lengths=(16, 32), dilation_rates=(1, 2))
    spec = MaskSpec(is_causal=True, dropout=Dropout(0.3, 5), batch_base=1)
    blocks = [unit_coords(unit, spec, 2, 64) for unit in build_plan(config, 64, 4, 2).units]
    hop = dataclasses.replace(blocks[-1], offsets=(0, 1), heads=(2, 3), batch_outer=False)
    blocks.append(hop.at([40, 72], [8, 104]))
    for coords in blocks:
        hashes, kpos = dropout_rows(coords, "cpu")
        qpos = coords.positions(coords.q_starts, "cpu")
        kpos_all = qpos if coords.k_starts is None else coords.positions(coords.k_starts, "cpu")
        want = keep_mask(5, coords.pattern, coords.batch_index("cpu"), torch.tensor(coords.heads), qpos, kpos_all, 0.3)
        kpos = kpos[:, None, :] if kpos.dim() == 2 else kpos.transpose(1, 2)  # [B, H or 1, m_k]
        got = _mix(hashes.transpose(1, 2)[..., None] ^ kpos[:, :, None, :]) >= threshold(0.3)
        assert torch.equal(got, want)
    assert dropout_rows(unit_coords(build_plan(config, 64, 4, 2).units[0], MaskSpec(is_causal=True), 2, 64),
                        "cpu") is None


@pytest.mark.parametrize("field, value, message", [
    ("row_hash", torch.zeros(3, 64, 4, dtype=torch.int32), "row_hash must be int64"),
    ("kpos", torch.zeros(3, 63, dtype=torch.int64), "kpos must be int64"),
    ("p", 1.0, r"dropout.p=1.0 must be in \(0, 1\)"),
])
def test_rows_dropout_errors_name_the_field(field, value, message):
    (q, k, v), drop, _ = _block_case("cpu", 64)
    with pytest.raises(ValueError, match=message):
        attend_into(q, k, v, torch.empty_like(q), None, 0.25, True, SMALL, dropout=drop._replace(**{field: value}))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_cuda_layer_dropout_bf16_within_twice_math(mix):
    """bf16 through the compiled rows kernels with dropout: output and gradients within 2x the
    error of the bf16 math kernel, both against the float32 math kernel with the same mask."""
    W, R = (64, 128, 256), (1, 2, 4)
    config = DilatedConfig(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 512, h, 64, generator=g).cuda() for h in (8, 2, 2))
    plan = build_plan(config, 512, 8, 2)
    spec = MaskSpec(is_causal=True, dropout=Dropout(0.1, 3))
    rows = kernels.rows_config(torch.bfloat16, 64, torch.cuda.get_device_capability()) or RowsConfig(
        block_m=64, block_n=64, backward=GradConfig())
    rows = dataclasses.replace(rows, in_place_heads=True, backward=rows.backward or GradConfig())
    fused = kernels.TorchKernel(kernels.CUDA_ATEN["efficient"], rows, dropout=True)
    results = []
    for executor, dtype in ((FusedExecutor(fused), torch.bfloat16), (AutogradExecutor(kernels.MathKernel()), torch.bfloat16),
                            (AutogradExecutor(kernels.MathKernel()), torch.float32)):
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out, _ = executor.run(plan, *xs, 0.125, spec)
        out.float().square().sum().backward()
        results.append([out.detach().float(), *(x.grad.float() for x in xs)])
    for got, naive, exact in zip(*results):
        assert (got - exact).abs().max() <= 2 * (naive - exact).abs().max()
