"""ring_torch with packed documents (``segment_ids [batch, n]``: a key counts only for queries of
the same document; the dilated pattern keeps its global segments and offsets), against the
float64 oracle (out, LSE) and autodiff reference (dq, dk, dv): one device, the simulated ring
(``ring_size`` 2 and 4, both layouts), with ``seq_lengths``, causal or not, both mixes, GQA/MQA;
dropout, the modules, the kernel choice and the errors. Gloo process groups:
``test_torch_documents_dist.py``.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ring_torch
from parity_tests.oracle import dilated_attention as oracle_attention
from parity_tests.reference import reference_attention

D = 8
# Run lengths and ids cycled along each batch entry: documents of 1 token, documents crossing
# segment (8, 16, 32) and shard boundaries, ids unsorted and negative, and id 3 twice in entry 0
# (two separate runs of one id are one document: the definition is equality of ids).
DOC_RUNS = {
    "varied": (((7, 1, 12, 3, 21, 9), (3, 0, 7, -2, 11, 3)),
               ((2, 17, 1, 9, 30), (5, -1, 4, 9, 0))),
    "singletons": (((1,), tuple(range(100))), ((3, 1), (8, 2))),
    "one": (((1000,), (4,)), ((1000,), (-6,))),
}
# (id, n, h, h_kv, w, r): n a multiple of every segment, n not (padded inside), MQA.
CONFIGS = [
    ("n64", 64, 4, 2, (8, 16, 32), (1, 2, 4)),
    ("n53", 53, 4, 2, (8, 16, 32), (1, 2, 4)),
    ("n30-mqa", 30, 4, 1, (4, 16), (2, 4)),
]


def doc_ids(n: int, docs: str = "varied", batch: int = 2) -> torch.Tensor:
    """int64 ``[batch, n]`` document ids of the layout ``docs`` (:data:`DOC_RUNS`)."""
    rows = []
    for lengths, ids in DOC_RUNS[docs][:batch]:
        row, i = [], 0
        while len(row) < n:
            row += [ids[i % len(ids)]] * lengths[i % len(lengths)]
            i += 1
        rows.append(row[:n])
    return torch.tensor(rows, dtype=torch.int64)


def inputs(n, h, h_kv, d=D, batch=2, seed=0):
    """``q, k, v, dout, dlse`` in float64."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((batch, n, h, d), (batch, n, h_kv, d), (batch, n, h_kv, d), (batch, n, h, d),
              (batch, n, h))
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def run(fn, q, k, v, dout, dlse):
    """``fn(q, k, v) -> (out, lse)``; returns out, lse, dq, dk, dv of
    ``sum(out * dout) + sum(lse * dlse)`` over finite LSE."""
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*xs)
    fin = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    ((out.double() * dout).sum() + (fin.double() * dlse).sum()).backward()
    return [out.detach().double(), lse.detach().double()] + [x.grad.double() for x in xs]


@functools.cache
def expected(n, h, h_kv, w, r, mix, causal, lengths, docs):
    """Oracle ``(out, lse)`` and the reference's ``[out, lse, dq, dk, dv]`` (lengths a tuple)."""
    q, k, v, dout, dlse = inputs(n, h, h_kv)
    ids = doc_ids(n, docs)
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal,
              seq_lengths=None if lengths is None else list(lengths))
    out, lse = oracle_attention(q.numpy(), k.numpy(), v.numpy(), segment_ids=ids.numpy(), **kw)
    ref = run(lambda *x: reference_attention(*x, segment_ids=ids, **kw), q, k, v, dout, dlse)
    return torch.from_numpy(out), torch.from_numpy(lse), ref


def check(got, n, h, h_kv, w, r, mix, causal, lengths, docs, atol=1e-10):
    """Out and LSE against the oracle, gradients against the reference, padded rows exactly
    ``0`` / ``-inf`` with zero gradients."""
    lengths = None if lengths is None else tuple(lengths)
    out, lse, ref = expected(n, h, h_kv, w, r, mix, causal, lengths, docs)
    assert torch.equal(torch.isfinite(got[1]), torch.isfinite(lse))
    torch.testing.assert_close(got[0], out, atol=atol, rtol=0)
    fin = torch.isfinite(lse)
    torch.testing.assert_close(got[1][fin], lse[fin], atol=atol, rtol=0)
    for name, g, e in zip(("dq", "dk", "dv"), got[2:], ref[2:]):
        torch.testing.assert_close(g, e, atol=10 * atol, rtol=0, msg=name)
    for b, length in enumerate(lengths or ()):
        assert not got[0][b, length:].any() and bool(torch.isneginf(got[1][b, length:]).all())
        for g in got[2:]:
            assert not g[b, length:].any(), "padded gradients must be exactly 0"


def _lengths(n, kind):
    return {"none": None, "partial": (n - 11, n), "empty": (0, n - 1)}[kind]


ONE = [(c, mix, causal, lk) for c in CONFIGS for mix in ("head_groups", "longnet")
       for causal in (False, True) for lk in ("none", "partial")]


@pytest.mark.parametrize("config,mix,causal,lk", ONE,
                         ids=[f"{c[0]}-{m}-{'causal' if ca else 'full'}-{lk}" for c, m, ca, lk in ONE])
def test_one_device_matches_oracle(config, mix, causal, lk):
    _, n, h, h_kv, w, r = config
    lengths = _lengths(n, lk)
    q, k, v, dout, dlse = inputs(n, h, h_kv)
    got = run(lambda *x: ring_torch.dilated_attention(
        *x, segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal, return_lse=True,
        seq_lengths=lengths, segment_ids=doc_ids(n)), q, k, v, dout, dlse)
    check(got, n, h, h_kv, w, r, mix, causal, lengths, "varied")


@pytest.mark.parametrize("docs", ["singletons", "one"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("ring_size", [None, 4])
def test_extreme_documents(docs, causal, ring_size):
    """Entry 0 with every token its own document (each row attends itself only) and entry 1 of
    short runs; one document per entry equals the call without ``segment_ids``."""
    _, n, h, h_kv, w, r = CONFIGS[1]
    q, k, v, dout, dlse = inputs(n, h, h_kv)
    kw = dict(segment_lengths=w, dilation_rates=r, mix="longnet", is_causal=causal, return_lse=True,
              ring_size=ring_size)
    got = run(lambda *x: ring_torch.ring_dilated_attention(*x, segment_ids=doc_ids(n, docs), **kw),
              q, k, v, dout, dlse)
    check(got, n, h, h_kv, w, r, "longnet", causal, None, docs)
    if docs == "one":
        plain = run(lambda *x: ring_torch.ring_dilated_attention(*x, backend="math", **kw),
                    q, k, v, dout, dlse)
        for a, b in zip(got, plain):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


RINGS = [(c, R, layout, mix, causal) for c in CONFIGS[:2] for R in (2, 4)
         for layout in ("contiguous", "balanced") for mix in ("head_groups", "longnet")
         for causal in (False, True)]


@pytest.mark.parametrize("config,ring_size,layout,mix,causal", RINGS,
                         ids=[f"{c[0]}-R{R}-{lay}-{m}-{'causal' if ca else 'full'}"
                              for c, R, lay, m, ca in RINGS])
def test_simulated_ring_matches_oracle(config, ring_size, layout, mix, causal):
    """``ring_size`` with documents crossing shard boundaries (padded to a length the ring runs
    where ``n`` does not shard), with ``seq_lengths``."""
    _, n, h, h_kv, w, r = config
    lengths = _lengths(n, "partial")
    q, k, v, dout, dlse = inputs(n, h, h_kv)
    got = run(lambda *x: ring_torch.ring_dilated_attention(
        *x, segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal, return_lse=True,
        seq_lengths=lengths, segment_ids=doc_ids(n), ring_size=ring_size, layout=layout),
        q, k, v, dout, dlse)
    check(got, n, h, h_kv, w, r, mix, causal, lengths, "varied")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_random_ids(data):
    """Random ``n``, ids (few distinct values, so documents interleave), lengths, mix,
    causality, ring size and layout."""
    n = data.draw(st.integers(1, 40))
    h, h_kv, w, r = 4, 2, (4, 16), (2, 4)
    ids = data.draw(st.lists(st.lists(st.integers(-2, 2), min_size=n, max_size=n), min_size=2, max_size=2))
    lengths = data.draw(st.none() | st.lists(st.integers(0, n), min_size=2, max_size=2))
    mix = data.draw(st.sampled_from(["head_groups", "longnet"]))
    causal = data.draw(st.booleans())
    ring_size = data.draw(st.sampled_from([None, 2, 3]))
    layout = data.draw(st.sampled_from(["contiguous", "balanced"]))
    q, k, v, dout, dlse = inputs(n, h, h_kv)
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal, seq_lengths=lengths)
    got = run(lambda *x: ring_torch.ring_dilated_attention(
        *x, return_lse=True, segment_ids=ids, ring_size=ring_size, layout=layout, **kw),
        q, k, v, dout, dlse)
    out, lse = oracle_attention(q.numpy(), k.numpy(), v.numpy(), segment_ids=np.array(ids), **kw)
    ref = run(lambda *x: reference_attention(*x, segment_ids=torch.tensor(ids), **kw), q, k, v, dout, dlse)
    assert torch.equal(torch.isfinite(got[1]), torch.isfinite(torch.from_numpy(lse)))
    torch.testing.assert_close(got[0], torch.from_numpy(out), atol=1e-10, rtol=0)
    for g, e in zip(got[2:], ref[2:]):
        torch.testing.assert_close(g, e, atol=1e-9, rtol=0)


# --- Kernel choice -------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("ring_size", [None, 2])
def test_segment_ids_run_the_math_kernel(monkeypatch, causal, ring_size):
    """``backend="torch"`` keeps the fused executor without ``segment_ids`` (causal, no
    padding) and runs the math kernel with them, decided once per call; the results agree."""
    import ring_torch._api as api
    import ring_torch._dilated as dilated
    import ring_torch._ring as ring

    made = []

    def spy(original):
        def make(*args, **kwargs):
            made.append(original(*args, **kwargs))
            return made[-1]
        return make

    original = dilated.make_executor
    monkeypatch.setattr(api, "make_executor", spy(original))
    monkeypatch.setattr(ring, "make_executor", spy(original))
    n, h, h_kv, w, r = 32, 4, 2, (8, 16), (1, 2)
    q, k, v, *_ = (x.float() for x in inputs(n, h, h_kv))
    kw = dict(segment_lengths=w, dilation_rates=r, is_causal=causal, backend="torch", return_lse=True,
              ring_size=ring_size)
    with_docs = ring_torch.ring_dilated_attention(q, k, v, segment_ids=doc_ids(n, "one"), **kw)
    without = ring_torch.ring_dilated_attention(q, k, v, **kw)
    assert len(made) == 2 and made[0].kernel.name == "math"
    assert isinstance(made[0], dilated.AutogradExecutor)
    assert made[1].kernel.name == "torch" and isinstance(made[1], dilated.FusedExecutor)
    for a, b in zip(with_docs, without):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_block_masks_hide_other_documents():
    """The document test lives in ``block_masks``: a block of a ring hop hides exactly the keys
    of other documents, from the rows' global positions."""
    from ring_torch._coords import BlockCoords, MaskSpec, block_masks

    ids = torch.tensor([[3, 3, 0, 0, 7, 7, 7, 3]])
    spec = MaskSpec(is_causal=False, segment_ids=ids)
    assert spec.needs_key_mask and not spec.hides_padding
    coords = BlockCoords(spec, pattern=0, rate=2, rows=2, heads=(0, 1), offsets=(0, 1), batch=1,
                         q_starts=[4], k_starts=[0], batch_outer=False)
    hide, keep = block_masks(coords, torch.device("cpu"))
    assert keep is None
    q_pos = torch.tensor([[4, 6], [5, 7]])  # [H, m]: start 4, offset o, rate 2
    k_pos = torch.tensor([[0, 2], [1, 3]])
    expected = ids[0][q_pos][:, :, None] != ids[0][k_pos][:, None, :]
    assert torch.equal(hide, expected[None])


# --- Dropout -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("ring_size", [None, 4])
def test_dropout_with_one_document_is_the_plain_call(mix, causal, ring_size):
    """Equal ids everywhere: dropout results identical to the call without ``segment_ids``
    (the keep-mask of kept scores is unchanged); differing ids change them."""
    _, n, h, h_kv, w, r = CONFIGS[1]
    q, k, v, dout, dlse = inputs(n, h, h_kv)
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal, return_lse=True,
              dropout_p=0.3, dropout_seed=5, ring_size=ring_size, seq_lengths=(n, n - 7))
    plain = run(lambda *x: ring_torch.ring_dilated_attention(*x, **kw), q, k, v, dout, dlse)
    same = run(lambda *x: ring_torch.ring_dilated_attention(
        *x, segment_ids=torch.full((2, n), 9), **kw), q, k, v, dout, dlse)
    for a, b in zip(same, plain):
        assert torch.equal(a, b)
    docs = run(lambda *x: ring_torch.ring_dilated_attention(*x, segment_ids=doc_ids(n), **kw),
               q, k, v, dout, dlse)
    assert not torch.allclose(docs[0], plain[0])


@pytest.mark.parametrize("layout", ["contiguous", "balanced"])
def test_dropout_with_documents_ring_equals_one_device(layout):
    """Dropout and documents: the simulated ring draws the single-device mask (same seed)."""
    _, n, h, h_kv, w, r = CONFIGS[0]
    q, k, v, dout, dlse = inputs(n, h, h_kv)
    kw = dict(segment_lengths=w, dilation_rates=r, mix="longnet", is_causal=True, return_lse=True,
              dropout_p=0.25, dropout_seed=3, segment_ids=doc_ids(n), seq_lengths=(50, 64))
    one = run(lambda *x: ring_torch.dilated_attention(*x, **kw), q, k, v, dout, dlse)
    ring = run(lambda *x: ring_torch.ring_dilated_attention(*x, ring_size=4, layout=layout, **kw),
               q, k, v, dout, dlse)
    for a, b in zip(ring, one):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


# --- Modules -------------------------------------------------------------------------------------


def _module(h=4, h_kv=2, w=(8, 16, 32), r=(1, 2, 4), **kw):
    torch.manual_seed(0)
    return ring_torch.MultiheadDilatedAttention(h * D, h, w, r, num_kv_heads=h_kv, mix="longnet",
                                                dtype=torch.float64, **kw)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("ring_size", [None, 4])
def test_module_equals_functional_on_projections(causal, ring_size):
    """``MultiheadDilatedAttention.forward(..., segment_ids=)``: the functional call on the
    projected inputs (out and input gradients), with ``key_padding_mask`` too."""
    n, h, h_kv = 53, 4, 2
    mha = _module(ring_size=ring_size)
    x = torch.randn(2, n, h * D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ids = doc_ids(n)
    lengths = torch.tensor([n, 40])
    mask = torch.arange(n)[None, :] >= lengths[:, None]
    xa = x.clone().requires_grad_()
    got = mha(xa, is_causal=causal, segment_ids=ids, key_padding_mask=mask)
    got.sum().backward()
    xb = x.clone().requires_grad_()
    q = mha.q_proj(xb).view(2, n, h, D)
    k, v = (p(xb).view(2, n, h_kv, D) for p in (mha.k_proj, mha.v_proj))
    att = ring_torch.dilated_attention(q, k, v, segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4),
                                       mix="longnet", is_causal=causal, seq_lengths=lengths,
                                       segment_ids=ids)
    want = mha.out_proj(mha.norm(att.reshape(2, n, h * D)))
    want.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-12, rtol=0)
    plain = mha(x, is_causal=causal, key_padding_mask=mask)
    assert not torch.allclose(plain[:, :40], got[:, :40].detach())


def test_ring_module_forwards_segment_ids():
    """``RingDilatedAttention.forward(..., segment_ids=)`` equals the oracle."""
    _, n, h, h_kv, w, r = CONFIGS[1]
    q, k, v, *_ = inputs(n, h, h_kv)
    module = ring_torch.RingDilatedAttention(w, r, mix="longnet", ring_size=2, layout="balanced")
    out, lse = module(q, k, v, is_causal=True, return_lse=True, segment_ids=doc_ids(n))
    e_out, e_lse, _ = expected(n, h, h_kv, w, r, "longnet", True, None, "varied")
    torch.testing.assert_close(out, e_out, atol=1e-10, rtol=0)
    torch.testing.assert_close(lse, e_lse, atol=1e-10, rtol=0)


# --- Errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("segment_ids,error,match", [
    (torch.zeros(2, 12, dtype=torch.int64), ValueError,
     r"segment_ids must have shape \[batch, seq\]=\(2, 13\) \(the global sequence\), got \(2, 12\)"),
    (torch.zeros(13, dtype=torch.int64), ValueError, r"segment_ids must have shape .* got \(13,\)"),
    (torch.zeros(1, 13, dtype=torch.int64), ValueError, r"segment_ids must have shape .* got \(1, 13\)"),
    (torch.zeros(2, 13), TypeError, r"segment_ids has dtype float32; expected an integer array"),
    (torch.zeros(2, 13, dtype=torch.bool), TypeError, r"segment_ids has dtype bool"),
    ([[0.5] * 13] * 2, TypeError, r"segment_ids has dtype float64"),
])
@pytest.mark.parametrize("ring_size", [None, 2])
def test_segment_ids_errors(segment_ids, error, match, ring_size):
    q, k, v, *_ = inputs(13, 4, 2)
    with pytest.raises(error, match=match):
        ring_torch.ring_dilated_attention(q, k, v, segment_lengths=(4, 16), dilation_rates=(2, 4),
                                          segment_ids=segment_ids, ring_size=ring_size)


def test_segment_ids_accept_lists_int32_and_negative_values():
    q, k, v, *_ = inputs(13, 4, 2)
    kw = dict(segment_lengths=(4, 16), dilation_rates=(2, 4))
    ids = doc_ids(13)
    a = ring_torch.dilated_attention(q, k, v, segment_ids=ids, **kw)
    b = ring_torch.dilated_attention(q, k, v, segment_ids=ids.to(torch.int32).tolist(), **kw)
    c = ring_torch.dilated_attention(q, k, v, segment_ids=ids.to(torch.int32), **kw)
    d = ring_torch.dilated_attention(q, k, v, segment_ids=ids - 1000, **kw)  # same partition
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


def test_module_segment_ids_errors():
    mha = _module()
    x = torch.randn(2, 13, 4 * D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[batch, seq\]=\(2, 13\)"):
        mha(x, segment_ids=torch.zeros(2, 14, dtype=torch.int64))
    with pytest.raises(TypeError, match="segment_ids has dtype float32"):
        mha(x, segment_ids=torch.zeros(2, 13))
    with pytest.raises(ValueError, match="segment_ids is not supported with a cache"):
        mha.eval()(x[:, :1], cache=mha.init_cache(2), segment_ids=torch.zeros(2, 1, dtype=torch.int64))
