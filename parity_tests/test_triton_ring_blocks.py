"""Ring hops through the Triton rows kernels: blocks whose keys are another shard's rows
(``key_ids``, ``m_k != m``, head columns at different offsets), with documents, non-causal
padding and dropout, against the math kernel.

On the CPU the kernels run in Triton's interpreter; on CUDA the ring takes them once the card is in
``ring_torch._kernels.ROWS_TESTED["ring"]`` (the ``-m cuda`` test here is what puts it there).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ring_torch
import ring_torch._dilated as dilated
import ring_torch._kernels as kernels
from ring_torch._aten import _AtenCPU
from ring_torch._dropout import keep_mask, row_hash
from ring_torch._triton_grads import grads_into
from parity_tests._triton_marks import needs_cuda, needs_interpreter
from ring_torch._triton_rows import GradConfig, RowsConfig, RowsDropout, attend_into

ROWS = RowsConfig(block_m=32, block_n=16, num_warps=4, num_stages=2,
                  backward=GradConfig(dkv_block_m=16, dkv_block_n=32, dq_block_m=32, dq_block_n=16,
                                      num_warps=4, num_stages=2))


@needs_interpreter
@pytest.mark.parametrize("per_head", [False, True])
def test_block_over_other_key_rows_against_float64(per_head):
    """``m_k != m`` key rows with their own ids (per row, or per head), not causal: out, LSE and
    gradients against float64 autograd; a query row whose keys are all of other documents gets
    ``out = 0``, ``lse = -inf`` and no gradient."""
    g = torch.Generator().manual_seed(0)
    B, m, m_k, H, d = 2, 24, 50, 4, 16
    q, k, v = (torch.randn(B, rows, H, d, generator=g) for rows in (m, m_k, m_k))
    shape = (B, m, H) if per_head else (B, m)
    ids = torch.randint(0, 3, shape, generator=g)
    key_ids = torch.randint(0, 3, (B, m_k, H) if per_head else (B, m_k), generator=g)
    ids[0, 0] = 7  # no key of document 7
    xs = [x.double().requires_grad_() for x in (q, k, v)]
    s = torch.einsum("bihd,bjhd->bhij", *xs[:2]) / 4
    qi, ki = (x.transpose(1, 2) if per_head else x[:, None] for x in (ids, key_ids))  # [B, H or 1, rows]
    s = s.masked_fill(qi[..., :, None] != ki[..., None, :], -math.inf)
    want_o = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1).nan_to_num(), xs[2])
    want_l = torch.logsumexp(s, -1).transpose(1, 2)
    d_out = torch.randn(want_o.shape, generator=g, dtype=torch.float64)
    (want_o * d_out).sum().backward()
    out, lse = torch.empty_like(q), torch.empty(B, m, H)
    attend_into(q, k, v, out, lse, 0.25, False, ROWS, ids=ids, key_ids=key_ids)
    assert torch.isneginf(lse[0, 0]).all() and (out[0, 0] == 0).all()
    torch.testing.assert_close(out.double(), want_o.detach(), atol=2e-5, rtol=0)
    finite = torch.isfinite(want_l)
    torch.testing.assert_close(lse.double()[finite], want_l.detach()[finite], atol=2e-5, rtol=1e-6)
    assert torch.equal(torch.isfinite(lse), finite)
    grads = [torch.empty_like(x) for x in (q, k, v)]
    grads_into(q, k, v, out, lse, d_out.float(), None, *grads, 0.25, False, ROWS.backward, ids=ids, key_ids=key_ids)
    for got, x in zip(grads, xs):
        torch.testing.assert_close(got.double(), x.grad, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(causal=True), "causal=True needs the block's own rows as keys"),
    (dict(ids=torch.zeros(2, 24, dtype=torch.int64)), "ids without key_ids needs the query rows as keys"),
    (dict(key_ids=torch.zeros(2, 40, dtype=torch.int64)), "key_ids needs ids"),
    (dict(ids=torch.zeros(2, 24, dtype=torch.int64), key_ids=torch.zeros(2, 39, dtype=torch.int64)),
     r"key_ids must be int32/int64 \(2, 40\)"),
])
def test_other_key_rows_errors_name_the_argument(kwargs, message):
    q, k = torch.zeros(2, 24, 2, 16), torch.zeros(2, 40, 2, 16)
    kwargs = dict(dict(causal=False), **kwargs)
    with pytest.raises(ValueError, match=message):
        attend_into(q, k, k, torch.empty_like(q), None, 0.25, kwargs.pop("causal"), ROWS, **kwargs)


def _case(case, n):
    """A ring call's keyword arguments that need a key mask or dropout."""
    if case == "padding":
        return dict(is_causal=False, seq_lengths=torch.tensor([n, n * 3 // 5 - 8]))
    if case == "dropout":
        return dict(is_causal=True, dropout_p=0.2, dropout_seed=11)
    docs = (torch.arange(n) * 5 // n).expand(2, -1)
    return dict(is_causal=case == "documents_causal", segment_ids=docs)


@needs_interpreter
@pytest.mark.parametrize("layout, mix, case", [
    ("contiguous", "head_groups", "documents_causal"), ("contiguous", "longnet", "documents"),
    ("contiguous", "head_groups", "padding"), ("contiguous", "longnet", "dropout"),
    ("balanced", "longnet", "documents_causal"), ("balanced", "head_groups", "padding"),
    ("balanced", "head_groups", "dropout"),
])
def test_simulated_ring_hops_take_the_rows_kernels(layout, mix, case, monkeypatch):
    """``ring_dilated_attention(ring_size=4, backend="torch")`` where the dispatch routes masks and
    dropout to the rows kernels (as on a card in ``ROWS_TESTED``): the hops' blocks run them
    (other shards' key rows; balanced: a slot against both), and values, LSE and gradients equal
    ``backend="math"``."""

    def kernel_for(backend, device, dtype, head_dim, needs_dropout, needs_key_mask=False, rows_masks=False):
        if backend != "torch":
            return kernels.kernel_for(backend, device, dtype, head_dim, needs_dropout, needs_key_mask, rows_masks)
        assert needs_dropout or needs_key_mask
        rows = dataclasses.replace(ROWS, in_place_heads=True)
        return kernels.TorchKernel(_AtenCPU, rows, masks=needs_key_mask, dropout=needs_dropout)

    monkeypatch.setattr(dilated, "kernel_for", kernel_for)
    hops = []
    for name in ("forward", "backward"):
        original = getattr(kernels.TorchKernel, name)
        monkeypatch.setattr(kernels.TorchKernel, name,
                            lambda self, *a, f=original, name=name: hops.append(name) or f(self, *a))
    n = 256
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, n, h, 16, generator=g) for h in (4, 2, 2))
    kw = dict(segment_lengths=(32, 64, 128, 256), dilation_rates=(1, 2, 4, 8), mix=mix, ring_size=4,
              layout=layout, return_lse=True, **_case(case, n))
    w_out = torch.randn(q.shape, generator=g)
    results = {}
    for backend in ("math", "torch"):
        hops.clear()
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = ring_torch.ring_dilated_attention(*xs, backend=backend, **kw)
        ((out * w_out).sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
        results[backend] = (out.detach(), lse.detach(), *(x.grad for x in xs))
        assert ({"forward", "backward"} <= set(hops)) == (backend == "torch")
    for got, want in zip(results["torch"], results["math"]):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("layout, mix, case", [
    ("contiguous", "head_groups", "documents_causal"), ("contiguous", "longnet", "padding"),
    ("balanced", "longnet", "dropout"),
])
def test_cuda_ring_hops_bf16_within_twice_math(layout, mix, case, monkeypatch):
    """The compiled rows kernels on a simulated ring's hops, bf16: output and gradients within 2x
    the error of the bf16 math kernel, both against the float32 math kernel (same mask)."""
    rows = kernels.rows_config(torch.bfloat16, 64, torch.cuda.get_device_capability()) or RowsConfig(
        block_m=64, block_n=64, backward=GradConfig())
    rows = dataclasses.replace(rows, in_place_heads=True, backward=rows.backward or GradConfig())

    def kernel_for(backend, device, dtype, head_dim, needs_dropout, needs_key_mask=False, rows_masks=False):
        if backend != "torch":
            return kernels.kernel_for(backend, device, dtype, head_dim, needs_dropout, needs_key_mask, rows_masks)
        return kernels.TorchKernel(kernels.CUDA_ATEN["efficient"], rows, masks=needs_key_mask, dropout=needs_dropout)

    monkeypatch.setattr(dilated, "kernel_for", kernel_for)
    n = 2048
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, n, h, 64, generator=g).cuda() for h in (8, 2, 2))
    kw = dict(segment_lengths=(256, 512, 1024, 2048), dilation_rates=(1, 2, 4, 8), mix=mix, ring_size=4,
              layout=layout, **{key: x.cuda() if torch.is_tensor(x) else x for key, x in _case(case, n).items()})
    results = []
    for backend, dtype in (("torch", torch.bfloat16), ("math", torch.bfloat16), ("math", torch.float32)):
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out = ring_torch.ring_dilated_attention(*xs, backend=backend, **kw)
        out.float().square().sum().backward()
        results.append([out.detach().float(), *(x.grad.float() for x in xs)])
    for got, naive, exact in zip(*results):
        assert (got - exact).abs().max() <= 2 * (naive - exact).abs().max()


@needs_interpreter
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 70), extra_keys=st.integers(0, 40), group=st.sampled_from([1, 2]), causal=st.booleans(),
       documents=st.integers(0, 4), per_head=st.booleans(), p=st.sampled_from([0.0, 0.2, 0.6]),
       seed=st.integers(0, 2 ** 16))
def test_fuzz_blocks_against_float64(m, extra_keys, group, causal, documents, per_head, p, seed):
    """Random blocks through both rows kernels against float64 autograd: any row counts (ragged
    and shorter than a tile), other key rows (not causal), GQA, ids and key positions per row or
    per query head (``documents=0``: no ids), dropout (0.0: none; 0.6: a threshold above 2^31)."""
    g = torch.Generator().manual_seed(seed)
    B, H, d = 2, 2 * group, 16
    m_k = m if causal else m + extra_keys
    q = torch.randn(B, m, H, d, generator=g)
    k, v = (torch.randn(B, m_k, 2, d, generator=g) for _ in range(2))
    kw = {}
    if documents:
        shape = lambda rows, heads: (B, rows, heads) if per_head else (B, rows)  # noqa: E731
        kw["ids"] = torch.randint(0, documents, shape(m, H), generator=g)
        if not causal:
            kw["key_ids"] = torch.randint(0, documents, shape(m_k, H), generator=g)
    keep = torch.ones(B, H, m, m_k, dtype=torch.bool)
    if p:
        batch, heads = torch.arange(B), torch.arange(H)
        qpos = (torch.randint(0, 1000, (B, H, 1), generator=g) + torch.arange(m)).clone()
        kpos = torch.randint(0, 1000, (B, H if per_head else 1, 1), generator=g) + torch.arange(m_k)
        kpos = kpos.expand(B, H, m_k)
        if causal:  # keys are the query rows
            qpos = qpos if per_head else qpos[:, :1].expand(B, H, m)
            kpos = qpos
        kpos_arg = kpos.transpose(1, 2) if per_head else kpos[:, 0]  # per query head, or shared
        kw["dropout"] = RowsDropout(row_hash(seed, 1, batch, heads, qpos).transpose(1, 2), kpos_arg, p)
        keep = keep_mask(seed, 1, batch, heads, qpos, kpos, p)
    xs = [x.double().requires_grad_() for x in (q, k, v)]
    kk, vv = (x.repeat_interleave(group, 2) for x in xs[1:])
    s = torch.einsum("bihd,bjhd->bhij", xs[0], kk) / 4
    if causal:
        s = s.masked_fill(torch.ones(m, m, dtype=torch.bool).triu(1), -math.inf)
    if documents:
        qi = kw["ids"].transpose(1, 2) if per_head else kw["ids"][:, None]  # [B, H or 1, m]
        ki = kw.get("key_ids", kw["ids"])
        ki = ki.transpose(1, 2) if per_head else ki[:, None]
        s = s.masked_fill(qi[..., :, None] != ki[..., None, :], -math.inf)
    want_o = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1).nan_to_num() * keep / (1 - p), vv)
    want_l = torch.logsumexp(s, -1).transpose(1, 2)
    d_out = torch.randn(want_o.shape, generator=g, dtype=torch.float64)
    (want_o * d_out).sum().backward()
    out, lse = torch.empty_like(q), torch.empty(B, m, H)
    attend_into(q, k, v, out, lse, 0.25, causal, ROWS, **kw)
    torch.testing.assert_close(out.double(), want_o.detach(), atol=2e-5, rtol=0)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(want_l))
    finite = torch.isfinite(want_l)
    torch.testing.assert_close(lse.double()[finite], want_l.detach()[finite], atol=2e-5, rtol=1e-6)
    grads = [torch.empty_like(x) for x in (q, k, v)]
    grads_into(q, k, v, out, lse, d_out.float(), None, *grads, 0.25, causal, ROWS.backward, **kw)
    for got, x in zip(grads, xs):
        torch.testing.assert_close(got.double(), x.grad, atol=5e-5, rtol=1e-5)
