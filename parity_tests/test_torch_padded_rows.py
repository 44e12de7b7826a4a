"""``ring_torch._padded``: padded rows zeroed in place and in a unit's dense row copy, against a
loop over positions; on the CPU the ``torch`` fallback, on CUDA the Triton kernel (``-m cuda``)."""

from __future__ import annotations

import pytest
import torch

from ring_torch._padded import triton_available, unit_rows_zeroed, zero_padded_rows_
from ring_torch._plan import Unit
from ring_torch._rows import head_rows

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and triton")])]
DTYPES = [torch.float32, torch.bfloat16]


def _unit(segment, rate, offset, heads):
    return Unit(pattern=0, segment=segment, rate=rate, offset=offset, q_heads=heads, kv_heads=heads,
                kv_repeat=1, kv_index=None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 77, 3, 16), (3, 50, 4), (1, 4097, 8, 64)], ids=["4d", "lse", "wide"])
def test_zero_padded_rows_in_place(device, dtype, shape):
    b, n = shape[:2]
    x = torch.randn(shape, dtype=dtype, device=device)
    lengths = torch.tensor([n, 0, 31][:b] if b > 1 else [n - 5], device=device)
    want = x.clone()
    for i, length in enumerate(lengths.tolist()):
        want[i, length:] = 0
    got = zero_padded_rows_(x, lengths)
    assert got is x
    assert torch.equal(x, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("segment,rate,offset,heads", [(16, 1, 0, (0, 4, 1)), (32, 4, 3, (2, 6, 1)),
                                                       (64, 8, 5, (0, 8, 1))])
def test_unit_rows_zeroed(device, dtype, segment, rate, offset, heads):
    """A strided unit view (batch 2, several segments, a head subset) copied densely with the
    rows at or past each entry's length zeroed, real rows bit for bit."""
    b, n, h, d = 2, 128, 8, 16
    x = torch.randn(b, n, h, d, dtype=dtype, device=device)
    unit = _unit(segment, rate, offset, heads)
    rows = head_rows(x, unit, heads)  # [b * S, m, H, d]
    lengths = torch.tensor([45, 128], device=device)
    got = unit_rows_zeroed(rows, lengths, unit, n)
    assert got.is_contiguous() and got.shape == rows.shape
    S, m = n // segment, segment // rate
    want = rows.clone()
    for block in range(b * S):
        for i in range(m):
            if (block % S) * segment + i * rate + offset >= lengths[block // S]:
                want[block, i] = 0
    assert torch.equal(got, want)
    assert not torch.equal(want, rows)  # some rows were padding


@pytest.mark.parametrize("device", DEVICES)
def test_unit_rows_zeroed_reads_expanded_rows(device):
    """Any strides: a cotangent expanded from one value (stride 0) is read as such."""
    n = 64
    unit = _unit(16, 2, 1, (0, 2, 1))
    dout = torch.ones((), device=device).expand(1, n, 2, 8)
    got = unit_rows_zeroed(head_rows(dout, unit, (0, 2, 1)), torch.tensor([20], device=device), unit, n)
    pos = torch.arange(n // 16, device=device)[:, None] * 16 + torch.arange(8, device=device)[None, :] * 2 + 1
    assert torch.equal(got, (pos < 20).to(got.dtype)[:, :, None, None].expand_as(got))
