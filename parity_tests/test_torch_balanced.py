"""The balanced (zigzag) ring layout of ring_torch in one process: the permutation, the simulated
ring (``ring_size``) against the float64 oracle, dropout and padding equal to the contiguous
layout, the errors, the bytes sent and the per-rank causal work of the schedule."""

from __future__ import annotations

import functools

import pytest
import torch

import ring_torch
from parity_tests.oracle import dilated_attention as oracle_attention
from ring_torch._layout import balanced_order, make_schedule
from ring_torch._ring_plan import build_ring_plan

# n=64: P=4 -> C=8: w'=8 local, 16 split (g=2), 32 split (g=4), 64 joint.
#       P=2 -> C=16: w'=8, 16 local, 32 split (g=2), 64 joint.
MIXED = ("mixed", 64, 8, 2, 8, (8, 16, 32, 64), (1, 2, 2, 4))
JOINT = ("joint", 64, 4, 4, 8, (64,), (2,))
W_GT_N = ("w_gt_n", 64, 4, 2, 8, (16, 128), (2, 4))  # w'=n: a joint pattern, longnet empty rows
CONFIGS = [MIXED, JOINT, W_GT_N]
CASES = [(c, R) for c in CONFIGS for R in (2, 4)]
IDS = [f"{c[0]}-R{R}" for c, R in CASES]


def _inputs(n, h, h_kv, d, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    shapes = ((batch, n, h, d), (batch, n, h_kv, d), (batch, n, h_kv, d), (batch, n, h, d),
              (batch, n, h))
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _run(fn, q, k, v, dout, dlse):
    """``[out, lse, dq, dk, dv]`` of ``fn`` (float64) for the loss ``<out, dout> + <lse, dlse>``
    (finite LSE only)."""
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*xs)
    fin = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    ((out * dout).sum() + (fin * dlse).sum()).backward()
    return [out.detach(), lse.detach()] + [x.grad for x in xs]


def _max_abs(a, b):
    fin = torch.isfinite(b)
    assert torch.equal(fin, torch.isfinite(a))
    return (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0


def _oracle_grads(q, k, v, dout, dlse, seq_lengths=None, **kw):
    """The oracle's ``(out, lse)`` and the gradients of the loss through the float64 autograd
    reference (``parity_tests.reference``), which the oracle test suite holds to the oracle."""
    from parity_tests.reference import reference_attention

    out, lse = oracle_attention(q.numpy(), k.numpy(), v.numpy(), seq_lengths=seq_lengths, **kw)
    kw = dict(kw, seq_lengths=seq_lengths) if seq_lengths is not None else kw
    grads = _run(lambda *x: reference_attention(*x, **kw), q, k, v, dout, dlse)[2:]
    return [torch.from_numpy(out), torch.from_numpy(lse)] + grads


@functools.cache
def _expected(config, mix, causal):
    _, n, h, h_kv, d, w, r = config
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal)
    return _oracle_grads(*_inputs(n, h, h_kv, d), **kw)


def test_round_trip_and_explicit_order():
    x = torch.arange(2 * 24 * 3, dtype=torch.float64).reshape(2, 24, 3)
    for P in (1, 2, 3, 4, 6, 12):
        y = ring_torch.to_balanced(x, P)
        assert torch.equal(ring_torch.from_balanced(y, P), x)
        assert torch.equal(ring_torch.to_balanced(ring_torch.from_balanced(x, P), P), x)
    # P = 4, C = 2 (n = 16): rank 0 = chunks 0, 7; rank 1 = 1, 6; rank 2 = 2, 5; rank 3 = 3, 4.
    pos = torch.arange(16)
    chunks = ring_torch.to_balanced(pos[None], 4).view(8, 2)[:, 0] // 2
    assert chunks.tolist() == [0, 7, 1, 6, 2, 5, 3, 4] == balanced_order(4)
    # any dim; a [batch, seq, heads, head_dim] tensor along dim 1 equals the same along dim -3
    t = torch.randn(2, 16, 3, 4)
    assert torch.equal(ring_torch.to_balanced(t, 4), ring_torch.to_balanced(t, 4, dim=-3))
    assert torch.equal(ring_torch.to_balanced(t.transpose(0, 1), 4, dim=0),
                       ring_torch.to_balanced(t, 4).transpose(0, 1))


def test_permutation_length_error_names_the_values():
    with pytest.raises(ValueError, match=r"seq_len=12.*num_devices=4"):
        ring_torch.to_balanced(torch.zeros(1, 12, 2), 4)
    with pytest.raises(ValueError, match=r"seq_len=10.*num_devices=3"):
        ring_torch.from_balanced(torch.zeros(10, 2), 3, dim=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_simulated_balanced_ring_equals_oracle(case, mix, causal):
    (_, n, h, h_kv, d, w, r), R = case
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal)
    got = _run(lambda *x: ring_torch.ring_dilated_attention(
        *x, return_lse=True, ring_size=R, layout="balanced", **kw), *_inputs(n, h, h_kv, d))
    for name, a, b, tol in zip(("out", "lse", "dq", "dk", "dv"), got, _expected(case[0], mix, causal),
                               (1e-10, 1e-10, 1e-9, 1e-9, 1e-9)):
        assert _max_abs(a, b) <= tol, name


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_equals_the_contiguous_layout(causal):
    _, n, h, h_kv, d, w, r = MIXED
    xs = _inputs(n, h, h_kv, d, seed=3)

    def run(layout, seed):
        return _run(lambda *x: ring_torch.ring_dilated_attention(
            *x, segment_lengths=w, dilation_rates=r, mix="longnet", is_causal=causal,
            return_lse=True, ring_size=4, layout=layout, dropout_p=0.3, dropout_seed=seed), *xs)

    balanced, contiguous = run("balanced", 7), run("contiguous", 7)
    for a, b in zip(balanced, contiguous):  # the same masks: equal up to the merge order
        assert _max_abs(a, b) <= 1e-12
    other = run("contiguous", 8)  # another seed moves the result: the comparison has teeth
    assert (balanced[0] - other[0]).abs().max() > 1e-3


@pytest.mark.parametrize("n", [64, 53])
@pytest.mark.parametrize("R", [2, 4])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_seq_lengths(n, R, causal):
    """Global lengths (0, partial, n): real rows equal the oracle, padded rows out 0 / LSE -inf,
    zero gradients on padded positions; equal to the contiguous layout."""
    _, _, h, h_kv, d, w, r = MIXED
    kw = dict(segment_lengths=w, dilation_rates=r, mix="longnet", is_causal=causal)
    lengths = torch.tensor([0, 37, n])
    xs = _inputs(n, h, h_kv, d, seed=5, batch=3)
    got = _run(lambda *x: ring_torch.ring_dilated_attention(
        *x, return_lse=True, ring_size=R, layout="balanced", seq_lengths=lengths, **kw), *xs)
    want = _oracle_grads(*xs, seq_lengths=lengths.numpy(), **kw)
    for name, a, b, tol in zip(("out", "lse", "dq", "dk", "dv"), got, want,
                               (1e-10, 1e-10, 1e-9, 1e-9, 1e-9)):
        assert _max_abs(a, b) <= tol, name
    padded = torch.arange(n)[None, :] >= lengths[:, None]  # [b, n]
    assert (got[0][padded] == 0).all() and torch.isneginf(got[1][padded]).all()
    for grad in got[2:]:
        assert (grad[padded] == 0).all()
    contiguous = _run(lambda *x: ring_torch.ring_dilated_attention(
        *x, return_lse=True, ring_size=R, seq_lengths=lengths, **kw), *xs)
    for a, b in zip(got, contiguous):
        assert _max_abs(a, b) <= 1e-12


def test_gqa_float32_torch_kernel():
    """The fused CPU kernel (float32) on the balanced blocks, rectangular ones included."""
    _, n, h, h_kv, d, w, r = MIXED
    q, k, v, dout, dlse = _inputs(n, h, h_kv, d)
    kw = dict(segment_lengths=w, dilation_rates=r, mix="longnet", is_causal=True)
    got = _run(lambda *x: ring_torch.ring_dilated_attention(
        *x, return_lse=True, ring_size=4, layout="balanced", backend="torch", **kw),
        *(x.float() for x in (q, k, v)), dout.float(), dlse.float())
    want = _expected(MIXED, "longnet", True)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        rel = ((a.double() - b).norm() / b.norm()).item() if name != "lse" else _max_abs(a.double(), b)
        assert rel <= 2e-5, name


def test_modules_take_the_layout():
    _, n, h, h_kv, d, w, r = MIXED
    q, k, v, _, _ = _inputs(n, h, h_kv, d)
    att = ring_torch.RingDilatedAttention(w, r, mix="longnet", ring_size=4, layout="balanced")
    assert "layout='balanced'" in repr(att)
    ref = ring_torch.dilated_attention(q, k, v, segment_lengths=w, dilation_rates=r, mix="longnet",
                                       is_causal=True)
    assert _max_abs(att(q, k, v, is_causal=True), ref) <= 1e-12
    assert att.comm_stats.bytes()  # the spanning patterns sent their blocks
    torch.manual_seed(0)
    mha = ring_torch.MultiheadDilatedAttention(h * d, h, w, r, num_kv_heads=h_kv, ring_size=4,
                                               layout="balanced", dtype=torch.float64)
    x = torch.randn(2, n, h * d, dtype=torch.float64)
    out = mha(x, is_causal=True)
    mha.attention.ring_size, mha.attention.layout = None, "contiguous"
    assert _max_abs(out, mha(x, is_causal=True)) <= 1e-12
    for cls_args in ((ring_torch.RingDilatedAttention, (w, r)),
                     (ring_torch.MultiheadDilatedAttention, (h * d, h, w, r))):
        with pytest.raises(ValueError, match="layout='zigzag'"):
            cls_args[0](*cls_args[1], layout="zigzag")


def test_errors():
    _, n, h, h_kv, d, w, r = MIXED
    q, k, v, _, _ = _inputs(n, h, h_kv, d)
    kw = dict(segment_lengths=w, dilation_rates=r)
    for ring_size in (None, 4):
        with pytest.raises(ValueError, match="layout='zigzag'"):
            ring_torch.ring_dilated_attention(q, k, v, ring_size=ring_size, layout="zigzag", **kw)
    # P=3, n=48 -> C=8: w'=16 spans g=2 chunks, neither 2P=6 nor a divisor of 3.
    from ring_torch._ring_plan import check_sharding

    with pytest.raises(ValueError, match=r"pattern 1 .*n=48, chunk C=8 on P=3.*g=w'/C=2.*"
                                         r"layout=\"contiguous\""):
        check_sharding(ring_torch.DilatedConfig((8, 16), (1, 1)), 16, 3, "balanced")
    # a simulated ring pads such an n further, to a length the balanced layout holds (n=96: both
    # patterns local), and equals the contiguous layout
    q3, k3, v3, _, _ = _inputs(48, 2, 2, 8)
    outs = [ring_torch.ring_dilated_attention(q3, k3, v3, segment_lengths=(8, 16), dilation_rates=(1, 1),
                                              ring_size=3, layout=layout) for layout in ("balanced", "contiguous")]
    assert torch.allclose(outs[0], outs[1], atol=1e-12)
    config = ring_torch.DilatedConfig(w, r, "head_groups", True)
    with pytest.raises(ValueError, match=r"n=36 is not a multiple of 2P=8 \(P=4 ranks\)"):
        build_ring_plan(config, 9, 4, h, h_kv, layout="balanced")
    with pytest.raises(ValueError, match=r"pattern 0 .*C=6 on P=4.*C is not a multiple of w'.*contiguous"):
        build_ring_plan(ring_torch.DilatedConfig((4, 48), (1, 2), "head_groups"), 12, 4, 2, 2,
                        layout="balanced")
    with pytest.raises(ValueError, match=r"pattern 1 .*C is not a multiple of r"):
        build_ring_plan(ring_torch.DilatedConfig((8, 64), (1, 16), "head_groups"), 16, 4, 2, 2,
                        layout="balanced")


@pytest.mark.parametrize("R", [2, 4])
def test_bytes_per_pattern(R):
    """Joint patterns send what contiguous sends; a split one ``g - 1`` hops of the shard's rows."""
    _, n, h, h_kv, d, w, r = MIXED
    q, k, v, _, _ = _inputs(n, h, h_kv, d)
    sent = {}
    for layout in ("balanced", "contiguous"):
        stats = ring_torch.CommStats()
        ring_torch.ring_dilated_attention(q, k, v, segment_lengths=w, dilation_rates=r,
                                          ring_size=R, layout=layout, stats=stats, mix="longnet")
        sent[layout] = stats.bytes("forward")
    config = ring_torch.DilatedConfig(w, r, "longnet")
    L = n // R
    rplan = build_ring_plan(config, L, R, h, h_kv, layout="balanced")
    plan_bytes = {p: b for p, b in rplan.forward_bytes(2, d, 8).items() if b}
    assert sent["balanced"] == plan_bytes
    C = L // 2
    for i, (wi, ri) in enumerate(zip(w, r)):
        pairs = len({(j // (h // h_kv), j % ri) for j in range(h)})
        hop = 2 * 2 * (L // ri) * pairs * d * 8  # K and V, L / r rows per pair, float64
        if wi == n:  # joint: P - 1 hops, as contiguous
            assert sent["balanced"][i] == sent["contiguous"][i] == (R - 1) * hop
        elif wi > C:  # split: g - 1 hops
            assert sent["balanced"][i] == (wi // C - 1) * hop
        else:
            assert i not in sent["balanced"]


def _rank_work(w: int, L: int, P: int, layout: str) -> list[float] | None:
    """Per-rank work (score elements over all hops) of one causal pattern ``w`` (r=1) from its
    ring plan's schedule; None when the layout cannot run it or it is local."""
    from ring_torch._ring_plan import sharding_error

    config = ring_torch.DilatedConfig((w,), (1,), "head_groups", True)
    if layout == "contiguous" and sharding_error(config, L, P) is not None:
        return None
    (ru,) = build_ring_plan(config, L, P, 1, 1, layout).units
    return None if ru.group == 1 else [ru.schedule.work(rank % ru.group) for rank in range(P)]


@pytest.mark.parametrize("P", range(2, 17))
def test_causal_work_is_balanced(P):
    """Every spanning pattern (``w' = n``, and ``w' = gC`` for each divisor ``g >= 2`` of P):
    balanced max / mean per-rank work <= 1.1 (exactly 1); contiguous > 1.1 wherever it spans 2
    ranks or more, the same total work."""
    C = 4
    n = 2 * P * C
    spanned = 0
    for w in [n] + [g * C for g in range(2, P + 1) if P % g == 0]:
        balanced = _rank_work(w, 2 * C, P, "balanced")
        assert max(balanced) / (sum(balanced) / P) <= 1.1, (w, balanced)
        assert max(balanced) == min(balanced)
        contiguous = _rank_work(w, 2 * C, P, "contiguous")
        if contiguous is not None:
            spanned += 1
            assert max(contiguous) / (sum(contiguous) / P) > 1.1, (w, contiguous)
            assert sum(balanced) == sum(contiguous)  # no block skipped that counts, none twice
    assert spanned >= 1  # w' = n always spans every rank in contiguous
    joint = make_schedule("joint", P, P, C, True)
    assert all(len(joint.table[t][a]) == 1 for t in range(P) for a in range(P))
