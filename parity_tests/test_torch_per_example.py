"""ring_torch's per-example runs: a batch whose ``seq_lengths`` the caller gives on the host runs
entry by entry on each entry's real rows (``ring_torch._api._attend_each``) when the sequences
are long and enough of the batch is padding. The thresholds are lowered here so small shapes take
that path; the results are held to the float64 oracle and to the batched path (dropout and
documents included)."""

from __future__ import annotations

import pytest
import torch

import ring_torch
import ring_torch._api as api
from parity_tests.test_torch_padding import CONFIGS, _check, _inputs, _run


@pytest.fixture
def per_example(monkeypatch):
    """Every call with host lengths and some padding runs entry by entry; returns the list of
    per-entry ``batch_base`` values the calls ran."""
    monkeypatch.setattr(api, "PER_EXAMPLE_MIN_SEQ", 1)
    ran = []
    spans = api._spans

    def spy(call, entries, device):
        ran.extend((base, length) for _, base, length, _ in entries)
        return spans(call, entries, device)

    monkeypatch.setattr(api, "_spans", spy)
    return ran


CASES = [(c, mix, causal, backend) for c in (CONFIGS[0], CONFIGS[2], CONFIGS[4])
         for mix in ("head_groups", "longnet") for causal in (False, True) for backend in ("math", "torch")]


@pytest.mark.parametrize("config,mix,causal,backend", CASES,
                         ids=[f"{c[0]}-{m}-{'causal' if ca else 'full'}-{b}" for c, m, ca, b in CASES])
def test_per_example_matches_oracle(per_example, config, mix, causal, backend):
    """Values and LSE against the oracle, gradients against the reference, padded rows 0 /
    ``-inf`` with exactly zero gradients; one run per non-empty entry, on its real rows."""
    _, n, h, h_kv, w, r = config
    lengths = [n - 3, 0, 1, n][: 3 if n % 2 else 4]
    q, k, v, dout, dlse = (x.repeat_interleave(2, 0)[: len(lengths)] for x in _inputs(n, h, h_kv))
    got = _run(lambda *x: ring_torch.dilated_attention(
        *x, segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal, return_lse=True,
        backend=backend, seq_lengths=lengths), q, k, v, dout, dlse)
    assert per_example == [(i, m) for i, m in enumerate(lengths) if m]
    from parity_tests.oracle import dilated_attention as oracle
    from parity_tests.reference import reference_attention

    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal, seq_lengths=lengths)
    out, lse = oracle(q.numpy(), k.numpy(), v.numpy(), **kw)
    ref = _run(lambda *x: reference_attention(*x, **kw), q, k, v, dout, dlse)
    fin = torch.isfinite(torch.from_numpy(lse))
    assert torch.equal(torch.isfinite(got[1]), fin)
    torch.testing.assert_close(got[0], torch.from_numpy(out), atol=1e-10, rtol=0)
    torch.testing.assert_close(got[1][fin], torch.from_numpy(lse)[fin], atol=1e-10, rtol=0)
    for g, e in zip(got[2:], ref[2:]):
        torch.testing.assert_close(g, e, atol=1e-9, rtol=0)
    for b, length in enumerate(lengths):
        assert not got[0][b, length:].any() and bool(torch.isneginf(got[1][b, length:]).all())
        for g in got[2:]:
            assert not g[b, length:].any(), "padded gradients must be exactly 0"


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_per_example_equals_the_batched_call_with_dropout_and_documents(monkeypatch, mix, causal):
    """The same call (dropout, ``segment_ids``) batched (lengths on the device path, i.e. a
    tensor the per-example rule declines) and entry by entry: equal values, LSE and gradients,
    so the per-entry runs hash the global batch index and positions into the dropout mask."""
    _, n, h, h_kv, w, r = CONFIGS[4]
    q, k, v, dout, dlse = (x.repeat_interleave(2, 0)[:3] for x in _inputs(n, h, h_kv))
    lengths = [n, 20, 33]
    ids = (torch.arange(n) // 11).expand(3, n)
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal, return_lse=True,
              dropout_p=0.3, dropout_seed=5, segment_ids=ids)
    batched = _run(lambda *x: ring_torch.dilated_attention(*x, seq_lengths=lengths, **kw), q, k, v, dout, dlse)
    monkeypatch.setattr(api, "PER_EXAMPLE_MIN_SEQ", 1)
    each = _run(lambda *x: ring_torch.dilated_attention(*x, seq_lengths=torch.tensor(lengths), **kw),
                q, k, v, dout, dlse)
    assert api._host_lengths(lengths, 3, n) == tuple(lengths)
    for a, b in zip(each, batched):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    plain = _run(lambda *x: ring_torch.dilated_attention(*x, seq_lengths=lengths, **{**kw, "dropout_p": 0.0}),
                 q, k, v, dout, dlse)
    assert (each[0] - plain[0]).abs().max() > 0.1  # dropout did something


def test_per_example_rule(monkeypatch):
    """Entry by entry only for host lengths, two or more entries, long sequences, enough
    padding, and not while ``torch.compile`` traces."""
    n = api.PER_EXAMPLE_MIN_SEQ
    assert api._host_lengths([n, n // 2], 2, n) == (n, n // 2)
    assert api._host_lengths(torch.tensor([n, n // 2]), 2, n) == (n, n // 2)
    assert api._host_lengths(None, 2, n) is None
    assert api._host_lengths([n // 2], 1, n) is None  # one entry: the batched call is one run
    assert api._host_lengths([n // 2, n // 2], 2, n // 2) is None  # short: host work dominates
    assert api._host_lengths([n, n - 8], 2, n) is None  # little padding
    assert api._host_lengths(torch.tensor([n, 0], device="meta"), 2, n) is None  # on a device
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert api._host_lengths([n, 0], 2, n) is None


def test_per_example_without_lse_and_in_inference(monkeypatch, per_example):
    """``return_lse=False`` and no autograd: the output of the batched call."""
    _, n, h, h_kv, w, r = CONFIGS[4]
    q, k, v = (x.repeat_interleave(2, 0)[:3] for x in _inputs(n, h, h_kv)[:3])
    kw = dict(segment_lengths=w, dilation_rates=r, is_causal=True, backend="torch", seq_lengths=[n, 0, 30])
    with torch.no_grad():
        each = ring_torch.dilated_attention(q, k, v, **kw)
        assert per_example == [(0, n), (2, 30)]
        monkeypatch.setattr(api, "PER_EXAMPLE_MIN_SEQ", 1 << 30)
        batched = ring_torch.dilated_attention(q, k, v, **kw)
    assert len(per_example) == 3  # the batched call: one run of all entries
    torch.testing.assert_close(each, batched, atol=1e-12, rtol=0)
