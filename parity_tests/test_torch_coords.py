"""Block coordinates: the positions they compute are the rows the layers gather, and masks come
from one function (nothing built on the fast path)."""

from __future__ import annotations

import pytest
import torch

from ring_torch import DilatedConfig, build_plan, build_ring_plan
from ring_torch._comm import make_communicator
from ring_torch._coords import BlockCoords, MaskSpec, block_masks, unit_coords
from ring_torch._dropout import Dropout
from ring_torch._plan import causal_mask, index_tensor
from ring_torch._rows import q_rows, to_ring


def _position_tensor(b, n, h):
    """``[b, n, h, 1]`` holding each row's sequence position."""
    return torch.arange(n).view(1, n, 1, 1).expand(b, n, h, 1).contiguous()


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_unit_positions_are_the_gathered_rows(mix):
    b, n, h, base = 2, 32, 4, 64
    plan = build_plan(DilatedConfig((8, 16, 32), (1, 2, 4), mix), n, h, 2)
    spec = MaskSpec(False, base=base)
    for u in plan.units:
        coords = unit_coords(u, spec, b, n)
        rows = q_rows(_position_tensor(b, n, h), u)[..., 0]  # [b * S, m, H]
        assert torch.equal(coords.positions(coords.q_starts, "cpu"), rows.transpose(1, 2) + base)
        assert coords.batch_index("cpu").tolist() == [i for i in range(b) for _ in range(n // u.segment)]


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_simulated_ring_hop_positions_are_the_rows_of_the_held_shards(mix):
    b, n, h, R = 2, 64, 4, 4
    L = n // R
    rplan = build_ring_plan(DilatedConfig((8, 64), (1, 2), mix), L, R, h, h)
    make_comm = make_communicator("ring", None, R, L, None)
    x = _position_tensor(b, n, h)
    for ru in (ru for ru in rplan.units if ru.group > 1):
        comm = make_comm(ru.group, ru.pattern)
        idx = index_tensor(tuple(o * h + j for j, o in zip(ru.heads, ru.offsets)), "cpu")
        rows = to_ring(x, idx, ru.rate, L, len(comm.js))[..., 0]  # [G, gl, b, m, H]
        template = BlockCoords(MaskSpec(True), ru.pattern, ru.rate, L // ru.rate, ru.heads,
                               ru.offsets, b, batch_outer=False)
        for t in range(ru.group):
            held = torch.roll(rows, t, dims=1)  # the block each group-rank holds at hop t
            coords = template.at(comm.block_starts(0, 0), comm.block_starts(t, 0))
            want = held.reshape(-1, *held.shape[3:]).transpose(1, 2)  # [G * gl * b, H, m]
            assert torch.equal(coords.positions(coords.k_starts, "cpu"), want)
            assert not coords.is_causal  # another shard's keys: no triangle
        assert template.at(comm.block_starts(0, 0), None).is_causal  # own rows: the triangle


def test_masks_come_from_one_function():
    def coords(spec, k_starts=None):
        return BlockCoords(spec, 0, 2, 4, (0, 1), (0, 1), 1, range(0, 16, 8), k_starts)

    assert block_masks(coords(MaskSpec(False)), "cpu") == (None, None)  # the fast path builds nothing
    hide, keep = block_masks(coords(MaskSpec(True)), "cpu")
    assert hide is causal_mask(4, "cpu") and keep is None
    assert block_masks(coords(MaskSpec(True), k_starts=(16, 24)), "cpu") == (None, None)
    hide, keep = block_masks(coords(MaskSpec(True, Dropout(0.5, 3))), "cpu")
    assert hide is not None and keep.shape == (2, 2, 4, 4) and keep.dtype == torch.bool
