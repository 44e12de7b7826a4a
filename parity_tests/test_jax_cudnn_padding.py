"""On a CUDA GPU (skipped elsewhere): causal padding on the cuDNN block kernel, which is told each
block's real rows (``q_seqlen``/``kv_seqlen``: padded tiles are not computed), on one device and in
the simulated rings. bf16 results
against the float64 reference, within twice the XLA kernel's bf16 error; padded rows exactly 0 and
their q, k, v gradients exactly 0. Part of the GPU set: ``pytest parity_tests/test_jax_cudnn_padding.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ring_jax
from parity_tests.reference import reference_attention
from ring_jax import _cudnn

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not _cudnn.usable(jnp.bfloat16, 64), reason="needs cuDNN on a CUDA GPU")]

W, R = (64, 128, 256), (1, 2, 4)
MODES = {"one_device": {}, "chunks": dict(chunk_size=256), "ring4": dict(ring_size=4),
         "ring4_balanced": dict(ring_size=4, layout="balanced")}


def _grads(fn, q, k, v, g):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(g.astype(out.dtype)))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("n, lengths", [(1000, (1000, 517, 0)), (1024, None)], ids=["lengths", "no_padding"])
def test_causal_padding_on_cudnn(mode, mix, n, lengths, monkeypatch):
    """With lengths (and an n the patterns do not tile), and without any padding: longnet's merge
    sends an LSE cotangent into every local unit, which the rings must carry to the kernel."""
    lens = np.full(3, n) if lengths is None else np.array(lengths)
    rng = np.random.default_rng(0)
    q, k, v, g = (rng.standard_normal((3, n, h, 64)).astype(np.float32) for h in (8, 4, 4, 8))
    kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True, **MODES[mode],
              seq_lengths=None if lengths is None else jnp.asarray(lens))
    qt, kt, vt = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    ref_out, _ = reference_attention(qt, kt, vt, segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True,
                                     seq_lengths=lens)
    (ref_out * torch.tensor(g, dtype=torch.float64)).sum().backward()
    ref = [ref_out.detach().numpy(), qt.grad.numpy(), kt.grad.numpy(), vt.grad.numpy()]

    calls = []
    forward = _cudnn.forward
    monkeypatch.setattr(_cudnn, "forward", lambda *a, **k_: calls.append(a[-1]) or forward(*a, **k_))
    fn = lambda q, k, v: ring_jax.dilated_attention(q, k, v, **kw)  # noqa: E731
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, g)]
    ours = jax.jit(lambda *x: _grads(fn, *x))(*bf)
    # cuDNN ran, told each block's real rows whenever the call has lengths
    assert calls and all((c is not None) == (lengths is not None) for c in calls)
    before = ring_jax.get_block_kernel()
    ring_jax.set_block_kernel("xla")
    try:
        naive = jax.jit(lambda *x: _grads(fn, *x))(*bf)
    finally:
        ring_jax.set_block_kernel(before)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, naive, ref):
        assert _rel(a, r) <= 2 * _rel(b, r) + 1e-4, name
        padded = np.arange(n)[None, :] >= lens[:, None]
        assert not np.asarray(a, np.float32)[padded].any(), name
