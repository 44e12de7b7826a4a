"""Random valid ring configurations (hypothesis): the simulated ring against the float64 autograd
reference (values, LSE and gradients including the LSE cotangent)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ring_torch
from parity_tests.reference import reference_attention


@st.composite
def ring_problems(draw):
    # Powers of two keep every sharding valid: w' = min(w, n) and L = n / R are powers of two, so
    # one divides the other; r is drawn <= min(w', L) so it divides both.
    n = 2 ** draw(st.integers(3, 6))
    R = 2 ** draw(st.integers(1, min(3, n.bit_length() - 2)))
    L = n // R
    K = draw(st.integers(1, 3))
    w = tuple(2 ** draw(st.integers(0, 7)) for _ in range(K))
    r = tuple(2 ** draw(st.integers(0, min(wi, n, L).bit_length() - 1)) for wi in w)
    h_kv = draw(st.sampled_from([1, 2, 3]))
    h = h_kv * draw(st.integers(max(1, -(-K // h_kv)), 3))
    return dict(n=n, R=R, h=h, h_kv=h_kv, d=draw(st.sampled_from([4, 8])), segment_lengths=w,
                dilation_rates=r, mix=draw(st.sampled_from(["head_groups", "longnet"])),
                is_causal=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


def _run(fn, inputs, dout, dlse):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out, lse = fn(*xs)
    fin = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    ((out * dout).sum() + (fin * dlse).sum()).backward()
    return [out.detach(), lse.detach()] + [x.grad for x in xs]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ring_problems())
def test_random_ring_configs_match_reference(p):
    g = torch.Generator().manual_seed(p["seed"])
    n, h, h_kv, d = p["n"], p["h"], p["h_kv"], p["d"]
    shapes = ((2, n, h, d), (2, n, h_kv, d), (2, n, h_kv, d), (2, n, h, d), (2, n, h))
    q, k, v, dout, dlse = (torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    kw = {key: p[key] for key in ("segment_lengths", "dilation_rates", "mix", "is_causal")}
    stats = ring_torch.CommStats()
    ring = _run(lambda *x: ring_torch.ring_dilated_attention(*x, ring_size=p["R"], return_lse=True,
                                                             stats=stats, **kw),
                (q, k, v), dout, dlse)
    ref = _run(lambda *x: reference_attention(*x, **kw), (q, k, v), dout, dlse)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ring, ref):
        fin = torch.isfinite(b)
        assert torch.equal(fin, torch.isfinite(a)), name
        assert (a[fin] - b[fin]).abs().max().item() <= 1e-9, name
    # Messages exactly for the spanning patterns (w' > L), none for local ones.
    L = n // p["R"]
    spanning = {i for i, wi in enumerate(p["segment_lengths"]) if min(wi, n) > L}
    assert {pattern for _, pattern in stats.sent} == spanning
