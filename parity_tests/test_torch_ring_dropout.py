"""Attention-probability dropout: the position-hashed mask makes the single-device layer, the
simulated ring and (in test_torch_ring.py) the distributed ring agree exactly for one seed.

The single-device layer is checked against a dense float64 definition written here: per head
and pattern, softmax over the pattern's keys, times ``keep / (1 - p)`` from
:func:`ring_torch._dropout.keep_mask` at global positions, patterns merged by their LSE."""

from __future__ import annotations

import functools

import pytest
import torch

import ring_torch
from parity_tests.oracle import head_pairs
from parity_tests.test_torch_ring_sim import _max_abs
from parity_tests.test_torch_ring_sim import _run as _run_in
from ring_torch._dropout import keep_mask

_run = functools.partial(_run_in, dtype=torch.float64)

# (id, n, h, h_kv, d, segment_lengths, dilation_rates); longnet configs include an r=1 pattern
# so no row is empty in every pattern.
CONFIGS = [
    ("span", 64, 6, 3, 8, (8, 32, 64), (1, 2, 4)),
    ("gqa", 32, 4, 2, 8, (16, 32), (1, 2)),
]
P_DROP, SEED = 0.3, 1234


def dense_dropout_reference(q, k, v, *, segment_lengths, dilation_rates, mix, is_causal, p, seed):
    """``(out, lse)`` of the definition with dropout, densely, differentiable (float64)."""
    b, n, h, d = q.shape
    group = h // k.shape[2]
    tau = d ** -0.5
    pos = torch.arange(n)
    outs, lses = [], []
    for j in range(h):
        kj, vj = k[:, :, j // group], v[:, :, j // group]
        s = tau * torch.einsum("bpd,bqd->bpq", q[:, :, j], kj)
        parts = []
        for i, o in head_pairs(h, segment_lengths, dilation_rates, mix)[j]:
            w, r = min(segment_lengths[i], n), dilation_rates[i]
            sel = (pos % w) % r == o
            C = sel[:, None] & sel[None, :] & (pos[:, None] // w == pos[None, :] // w)
            if is_causal:
                C &= pos[None, :] <= pos[:, None]
            empty = ~C.any(-1)  # [n]
            s_i = s.masked_fill(~C, float("-inf")).masked_fill(empty[:, None], 0.0)
            lse_i = torch.logsumexp(s_i, -1).masked_fill(empty, float("-inf"))
            P_i = torch.softmax(s_i, -1).masked_fill(empty[:, None], 0.0)
            qpos = pos.expand(b, 1, n)
            keep = keep_mask(seed, i, torch.arange(b), torch.tensor([j]), qpos, qpos, p)[:, 0]
            parts.append((torch.einsum("bpq,bqd->bpd", P_i * keep / (1 - p), vj), lse_i))
        if len(parts) == 1:
            out, lse = parts[0]
        else:
            L = torch.stack([l for _, l in parts])  # [K, b, n]; rows nonempty (an r=1 pattern)
            lse = torch.logsumexp(L, 0)
            out = sum(torch.exp(l - lse)[..., None] * o for o, l in parts)
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs, 2), torch.stack(lses, 2)


def _inputs(n, h, h_kv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((2, n, h, d), (2, n, h_kv, d), (2, n, h_kv, d), (2, n, h, d), (2, n, h))
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _kw(config, mix, causal):
    _, _, _, _, _, w, r = config
    return dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal)


@functools.cache
def _single(config, mix, causal):
    _, n, h, h_kv, d, _, _ = config
    return _run(lambda *x: ring_torch.dilated_attention(
        *x, return_lse=True, dropout_p=P_DROP, dropout_seed=SEED, **_kw(config, mix, causal)),
        *_inputs(n, h, h_kv, d))


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_single_device_dropout_matches_dense_definition(config, mix, causal):
    _, n, h, h_kv, d, _, _ = config
    ref = _run(lambda *x: dense_dropout_reference(*x, p=P_DROP, seed=SEED,
                                                  **_kw(config, mix, causal)),
               *_inputs(n, h, h_kv, d))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), _single(config, mix, causal), ref):
        assert _max_abs(a, b) <= 1e-9, name


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("ring_size", [2, 4])
def test_simulated_ring_dropout_equals_single_device(config, mix, causal, ring_size):
    _, n, h, h_kv, d, _, _ = config
    ring = _run(lambda *x: ring_torch.ring_dilated_attention(
        *x, return_lse=True, ring_size=ring_size, dropout_p=P_DROP, dropout_seed=SEED,
        **_kw(config, mix, causal)), *_inputs(n, h, h_kv, d))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ring, _single(config, mix, causal)):
        assert _max_abs(a, b) <= 1e-12, name


def test_keep_mask_rate_and_determinism():
    b, h, m = 2, 3, 64
    pos = torch.arange(m).expand(b, h, m)
    args = (torch.arange(b), torch.arange(h), pos, pos)
    keep = keep_mask(SEED, 0, *args, 0.25)
    assert keep.shape == (b, h, m, m) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    assert torch.equal(keep, keep_mask(SEED, 0, *args, 0.25))
    for other in (keep_mask(SEED + 1, 0, *args, 0.25), keep_mask(SEED, 1, *args, 0.25)):
        assert 0.3 < (keep != other).float().mean().item() < 0.45  # independent draws: 2pq
    assert keep_mask(SEED, 0, *args, 0.0).all()


def test_dropout_zero_is_exactly_no_dropout_and_seeds_differ():
    q, k, v, *_ = _inputs(32, 4, 2, 8)
    kw = dict(segment_lengths=(16, 32), dilation_rates=(1, 2), mix="longnet", is_causal=True)
    base = ring_torch.ring_dilated_attention(q, k, v, ring_size=2, **kw)
    assert torch.equal(base, ring_torch.ring_dilated_attention(q, k, v, ring_size=2,
                                                               dropout_p=0.0, **kw))
    a = ring_torch.ring_dilated_attention(q, k, v, ring_size=2, dropout_p=0.5, dropout_seed=1, **kw)
    b = ring_torch.ring_dilated_attention(q, k, v, ring_size=2, dropout_p=0.5, dropout_seed=2, **kw)
    assert (a - b).abs().max() > 1e-2 and (a - base).abs().max() > 1e-2


def test_dropout_is_unbiased_on_average():
    """E[out] over seeds is the undropped output (dropout scales kept weights by 1/(1-p))."""
    q, k, v, *_ = _inputs(16, 2, 2, 4, seed=3)
    kw = dict(segment_lengths=(16,), dilation_rates=(1,))
    base = ring_torch.dilated_attention(q, k, v, **kw)
    mean = sum(ring_torch.ring_dilated_attention(q, k, v, ring_size=2, dropout_p=0.5,
                                                 dropout_seed=s, **kw) for s in range(400)) / 400
    assert ((mean - base).norm() / base.norm()).item() < 0.08


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_invalid_dropout(p):
    q, k, v, *_ = _inputs(16, 2, 2, 4)
    with pytest.raises(ValueError, match="dropout_p"):
        ring_torch.ring_dilated_attention(q, k, v, segment_lengths=(16,), dilation_rates=(1,),
                                          ring_size=2, dropout_p=p)
