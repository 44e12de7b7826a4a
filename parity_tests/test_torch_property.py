"""Random valid configurations (hypothesis) against the oracle and the autograd reference."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity_tests.oracle import dilated_attention as oracle_attention
from parity_tests.reference import reference_attention
from ring_torch import dilated_attention


@st.composite
def problems(draw):
    # Powers of two keep every pattern valid: r <= w' divides w', and w' = min(w, n) divides n.
    n = 2 ** draw(st.integers(2, 6))
    K = draw(st.integers(1, 3))
    w = tuple(2 ** draw(st.integers(0, 7)) for _ in range(K))
    r = tuple(2 ** draw(st.integers(0, min(wi, n).bit_length() - 1)) for wi in w)
    h_kv = draw(st.sampled_from([1, 2, 3]))
    h = h_kv * draw(st.integers(max(1, -(-K // h_kv)), 4))
    return dict(n=n, h=h, h_kv=h_kv, d=draw(st.sampled_from([4, 8])), segment_lengths=w,
                dilation_rates=r, mix=draw(st.sampled_from(["head_groups", "longnet"])),
                is_causal=draw(st.booleans()), backend=draw(st.sampled_from(["math", "torch"])),
                seed=draw(st.integers(0, 2 ** 16)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_random_configs_match_oracle_and_reference(p):
    g = torch.Generator().manual_seed(p["seed"])
    n, h, h_kv, d = p["n"], p["h"], p["h_kv"], p["d"]
    q0 = torch.randn(2, n, h, d, generator=g, dtype=torch.float64)
    k0 = torch.randn(2, n, h_kv, d, generator=g, dtype=torch.float64)
    v0 = torch.randn(2, n, h_kv, d, generator=g, dtype=torch.float64)
    w_out = torch.randn(2, n, h, d, generator=g, dtype=torch.float64)
    w_lse = torch.randn(2, n, h, generator=g, dtype=torch.float64)
    kw = {key: p[key] for key in ("segment_lengths", "dilation_rates", "mix", "is_causal")}

    def run(fn):
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        out, lse = fn(q, k, v)
        loss = (out * w_out).sum() + torch.where(torch.isfinite(lse), lse * w_lse, 0.0).sum()
        loss.backward()
        return out.detach(), lse.detach(), q.grad, k.grad, v.grad

    got = run(lambda *x: dilated_attention(*x, return_lse=True, backend=p["backend"], **kw))
    want = run(lambda *x: reference_attention(*x, **kw))
    ref_out, ref_lse = oracle_attention(q0.numpy(), k0.numpy(), v0.numpy(), **kw)
    np.testing.assert_allclose(got[0].numpy(), ref_out, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(np.isneginf(got[1].numpy()), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(got[1].numpy()[finite], ref_lse[finite], rtol=0, atol=1e-10)
    for a, b in zip(got[2:], want[2:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
