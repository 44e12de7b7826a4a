"""ring_torch.MultiheadDilatedAttention and RingDilatedAttention against a float64 dense
composition: the module's own parameters through ``F.linear``, the float64 autograd reference
attention (dense, bias ``log C``), ``F.layer_norm`` and the output projection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ring_torch
from parity_tests.reference import reference_attention

E, H = 32, 4


def _dense(module: ring_torch.MultiheadDilatedAttention, query, key, value, is_causal):
    """The layer written out densely with the module's parameters."""
    att = module.attention
    b, n, _ = query.shape
    hd = module.head_dim
    q = F.linear(query, module.q_proj.weight, module.q_proj.bias).view(b, n, module.num_heads, hd)
    k = F.linear(key, module.k_proj.weight, module.k_proj.bias).view(b, n, module.num_kv_heads, hd)
    v = F.linear(value, module.v_proj.weight, module.v_proj.bias).view(b, n, module.num_kv_heads,
                                                                        hd)
    out, _ = reference_attention(q, k, v, segment_lengths=att.segment_lengths,
                                 dilation_rates=att.dilation_rates, mix=att.mix,
                                 is_causal=is_causal, softmax_scale=att.softmax_scale)
    out = out.reshape(b, n, module.embed_dim)
    if module.norm is not None:
        out = F.layer_norm(out, (module.embed_dim,), module.norm.weight, module.norm.bias,
                           module.norm.eps)
    return F.linear(out, module.out_proj.weight, module.out_proj.bias)


def _grads(module, fn, inputs, dout):
    module.zero_grad()
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    (out * dout).sum().backward()
    return out.detach(), [x.grad for x in xs], {n: p.grad.clone() for n, p in
                                                module.named_parameters()}


def _module(**kw):
    torch.manual_seed(0)
    kw.setdefault("segment_lengths", (8, 16, 32))
    kw.setdefault("dilation_rates", (1, 2, 4))
    return ring_torch.MultiheadDilatedAttention(E, H, dtype=torch.float64, **kw)


def _check(module, inputs, is_causal, call):
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(inputs[0].shape, generator=g, dtype=torch.float64)
    out, dx, dp = _grads(module, call, inputs, dout)
    ref_out, ref_dx, ref_dp = _grads(module, lambda *x: _dense(module, *_kv(x), is_causal), inputs,
                                     dout)
    assert (out - ref_out).abs().max() <= 1e-10
    for a, b in zip(dx, ref_dx):
        assert (a - b).abs().max() <= 1e-9
    assert dp.keys() == ref_dp.keys()
    for name in dp:
        assert (dp[name] - ref_dp[name]).abs().max() <= 1e-9, name


def _kv(xs):
    """(query,) -> self-attention; (query, key) -> value = key; (query, key, value)."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    if len(xs) == 2:
        return xs[0], xs[1], xs[1]
    return xs


def _x(n=32, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, E, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("ring_size", [None, 4], ids=["single", "ring4"])
@pytest.mark.parametrize("num_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_self_attention_matches_dense_float64(mix, causal, ring_size, num_kv_heads):
    m = _module(mix=mix, ring_size=ring_size, num_kv_heads=num_kv_heads)
    _check(m, [_x()], causal, lambda x: m(x, is_causal=causal))


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("with_value", [False, True], ids=["value=key", "value"])
@pytest.mark.parametrize("ring_size", [None, 2], ids=["single", "ring2"])
def test_cross_attention_matches_dense_float64(mix, with_value, ring_size):
    m = _module(mix=mix, ring_size=ring_size, num_kv_heads=2)
    inputs = [_x(), _x(seed=1)] + ([_x(seed=2)] if with_value else [])
    _check(m, inputs, False, lambda *x: m(*x))


@pytest.mark.parametrize("bias,layer_norm", [(False, True), (True, False), (False, False)])
def test_without_bias_or_layer_norm(bias, layer_norm):
    m = _module(bias=bias, layer_norm=layer_norm, ring_size=2)
    assert (m.q_proj.bias is None) == (not bias) and (m.norm is None) == (not layer_norm)
    _check(m, [_x()], True, lambda x: m(x, is_causal=True))


def test_parameter_names_and_shapes():
    m = ring_torch.MultiheadDilatedAttention(64, 8, (16, 32), (1, 2), num_kv_heads=2)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {"q_proj.weight": (64, 64), "q_proj.bias": (64,),
                      "k_proj.weight": (16, 64), "k_proj.bias": (16,),
                      "v_proj.weight": (16, 64), "v_proj.bias": (16,),
                      "norm.weight": (64,), "norm.bias": (64,),
                      "out_proj.weight": (64, 64), "out_proj.bias": (64,)}


@pytest.mark.parametrize("gamma_init", [1.0, 0.25])
def test_magneto_init(gamma_init):
    torch.manual_seed(0)
    e = 512
    m = ring_torch.MultiheadDilatedAttention(e, 8, (16,), (1,), gamma_init=gamma_init,
                                             num_kv_heads=8)
    xavier = math.sqrt(2.0 / (e + e))
    for name, gain in (("q_proj", 1.0), ("k_proj", 1.0), ("v_proj", gamma_init),
                       ("out_proj", gamma_init)):
        proj = getattr(m, name)
        assert abs(proj.weight.std().item() / (gain * xavier) - 1) < 0.02, name
        assert abs(proj.weight.mean().item()) < 0.01 * gain * xavier * 10
        assert torch.count_nonzero(proj.bias) == 0
    assert torch.equal(m.norm.weight, torch.ones(e)) and torch.count_nonzero(m.norm.bias) == 0


def test_output_shape_and_dtype_float32():
    m = ring_torch.MultiheadDilatedAttention(E, H, (8, 16), (1, 2), ring_size=2)
    x = torch.randn(3, 32, E)
    out = m(x)
    assert out.shape == (3, 32, E) and out.dtype == torch.float32
    ref = ring_torch.MultiheadDilatedAttention(E, H, (8, 16), (1, 2))
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(out, ref(x), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("args,kwargs,match", [
    ((_x(), _x(n=16)), {}, "same batch, length"),
    ((_x(), _x(), _x(n=16)), {}, "same batch, length"),
    ((_x(),), dict(value=_x()), "value given without key"),
    ((torch.randn(2, 32, E + 1, dtype=torch.float64),), {}, "embed_dim"),
])
def test_forward_errors(args, kwargs, match):
    m = _module()
    with pytest.raises(ValueError, match=match):
        m(*args, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(embed_dim=30, num_heads=4), "multiple of num_heads"),
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(num_heads=2, embed_dim=32), "a head per pattern"),
    (dict(dropout=1.0), "dropout"),
    (dict(comm="mpi"), "unknown comm"),
    (dict(backend="cudnn"), "unknown backend"),
    (dict(ring_size=0), "ring_size"),
])
def test_constructor_errors(kwargs, match):
    args = dict(embed_dim=E, num_heads=H, segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ring_torch.MultiheadDilatedAttention(**args)


def test_dropout_in_training_only_and_reproducible():
    m = _module(dropout=0.2, ring_size=4)
    ref = _module(dropout=0.0)
    x = _x()
    torch.manual_seed(5)
    a = m(x)
    torch.manual_seed(5)
    b = m(x)
    assert torch.equal(a, b)  # the seed comes from torch's RNG
    assert (a - ref(x)).abs().max() > 1e-3
    m.eval()
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=1e-12)


def test_ring_module_lse_and_comm_stats():
    att = ring_torch.RingDilatedAttention((8, 32), (1, 2), mix="longnet", ring_size=4)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 32, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out, lse = att(q, k, v, is_causal=True, return_lse=True)
    ref_out, ref_lse = ring_torch.dilated_attention(q, k, v, segment_lengths=(8, 32),
                                                    dilation_rates=(1, 2), mix="longnet",
                                                    is_causal=True, return_lse=True)
    assert (out - ref_out).abs().max() <= 1e-12 and (lse - ref_lse).abs().max() <= 1e-12
    # w=32 spans all 4 shards of L=8: 3 hops of b * (L/r) * pairs * d * 8 bytes * 2 (K and V);
    # longnet with 4 heads on 4 kv heads at offsets j % 2: 4 distinct pairs.
    hop = 2 * (8 // 2) * 4 * 8 * 8 * 2
    assert att.comm_stats.bytes("forward") == {1: 3 * hop}
    att(q, k, v)
    assert att.comm_stats.bytes("forward") == {1: 6 * hop}  # accumulates
    att.reset_comm_stats()
    assert att.comm_stats.bytes("forward") == {}


@pytest.mark.parametrize("ring_size, error", [("2", TypeError), (2.5, TypeError), (0, ValueError)])
def test_module_ring_size_is_checked_like_the_function(ring_size, error):
    with pytest.raises(error, match=f"ring_size={ring_size!r} must be a positive int or None"):
        ring_torch.RingDilatedAttention((8,), (1,), ring_size=ring_size)


def test_module_timeout_reaches_the_ring(monkeypatch):
    import ring_torch._module as module

    seen = {}
    real = module.ring_dilated_attention
    monkeypatch.setattr(module, "ring_dilated_attention", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    mha = ring_torch.MultiheadDilatedAttention(16, 2, (8,), (1,), timeout=7)
    mha(torch.randn(1, 8, 16))
    assert seen["timeout"] == 7.0
