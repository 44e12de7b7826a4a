"""ring_torch at any sequence length and with per-example lengths (``seq_lengths``), against the
float64 oracle and autodiff reference (segments ``[s*w, (s+1)*w)`` cut at ``n``; positions
``>= seq_lengths[b]`` are padding: never a key, output 0, LSE ``-inf``, gradients exactly 0).

One device (both executors: ``math`` and the fused ``torch`` backend), the simulated ring
(``ring_size``) and a gloo ring of 2 and 4 processes (one spawn per world size, with a hard
deadline), the modules with ``key_padding_mask``, dropout and a hypothesis fuzz over ``n`` and
the lengths.
"""

from __future__ import annotations

import functools
import os
import traceback
from datetime import timedelta

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ring_torch
from parity_tests._spawn import spawn_ranks
from parity_tests.oracle import dilated_attention as oracle_attention
from parity_tests.reference import reference_attention

# (id, n, h, h_kv, w, r): prime n between segment lengths, n below every w, n between w's with
# MQA, a length every pattern tiles, a prime n past the lcm of the w's (a tiled prefix of 32 and
# a 5-row tail shorter than every w but one).
CONFIGS = [
    ("prime13", 13, 4, 2, (4, 16), (2, 4)),
    ("n_lt_w", 7, 4, 2, (8, 16), (2, 4)),
    ("between_mqa", 20, 4, 1, (8, 16, 32), (1, 2, 4)),
    ("tiled", 32, 4, 2, (8, 16), (1, 2)),
    ("tail", 37, 4, 2, (4, 16), (2, 4)),
]
LENGTHS = {"none": None, "full_and_empty": "n,0", "partial": "n-3,1"}
D = 8


def _lengths(spec, n):
    if spec is None:
        return None
    return [max(0, min(n, eval(x, {"n": n}))) for x in spec.split(",")]  # noqa: S307


def _inputs(n, h, h_kv, d=D, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((batch, n, h, d), (batch, n, h_kv, d), (batch, n, h_kv, d), (batch, n, h, d),
              (batch, n, h))
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _run(fn, q, k, v, dout, dlse):
    """``fn(q, k, v) -> (out, lse)``; returns out, lse, dq, dk, dv of
    ``sum(out * dout) + sum(lse * dlse)`` (``-inf`` LSE rows contribute nothing)."""
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*xs)
    fin = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    ((out.double() * dout).sum() + (fin.double() * dlse).sum()).backward()
    return [out.detach().double(), lse.detach().double()] + [x.grad.double() for x in xs]


@functools.cache
def _expected(n, h, h_kv, w, r, mix, causal, lengths):
    q, k, v, dout, dlse = _inputs(n, h, h_kv)
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal,
              seq_lengths=None if lengths is None else list(lengths))
    out, lse = oracle_attention(q.numpy(), k.numpy(), v.numpy(), **kw)
    ref = _run(lambda *x: reference_attention(*x, **kw), q, k, v, dout, dlse)
    return torch.from_numpy(out), torch.from_numpy(lse), ref


def _check(got, n, h, h_kv, w, r, mix, causal, lengths, atol=1e-10):
    """Values and LSE against the oracle, gradients against the reference, padded gradients
    exactly 0."""
    out, lse, ref = _expected(n, h, h_kv, w, r, mix, causal, None if lengths is None else tuple(lengths))
    assert torch.equal(torch.isfinite(got[1]), torch.isfinite(lse))
    torch.testing.assert_close(got[0], out, atol=atol, rtol=0)
    fin = torch.isfinite(lse)
    torch.testing.assert_close(got[1][fin], lse[fin], atol=atol, rtol=0)
    for g, e in zip(got[2:], ref[2:]):
        torch.testing.assert_close(g, e, atol=10 * atol, rtol=0)
    if lengths is not None:
        for b, length in enumerate(lengths):
            assert not got[0][b, length:].any() and bool(torch.isneginf(got[1][b, length:]).all())
            for g in got[2:]:
                assert not g[b, length:].any(), "padded gradients must be exactly 0"


ONE_DEVICE = [(c, mix, causal, backend, lk) for c in CONFIGS for mix in ("head_groups", "longnet")
              for causal in (False, True) for backend in ("math", "torch") for lk in LENGTHS]


@pytest.mark.parametrize("config,mix,causal,backend,lengths", ONE_DEVICE,
                         ids=[f"{c[0]}-{m}-{'causal' if ca else 'full'}-{b}-{lk}"
                              for c, m, ca, b, lk in ONE_DEVICE])
def test_one_device_matches_oracle(config, mix, causal, backend, lengths):
    _, n, h, h_kv, w, r = config
    lengths = _lengths(LENGTHS[lengths], n)
    q, k, v, dout, dlse = _inputs(n, h, h_kv)
    sl = None if lengths is None else torch.tensor(lengths)
    got = _run(lambda *x: ring_torch.dilated_attention(
        *x, segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal, return_lse=True,
        backend=backend, seq_lengths=sl), q, k, v, dout, dlse)
    _check(got, n, h, h_kv, w, r, mix, causal, lengths)


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", ["math", "torch"])
def test_seq_lengths_all_n_equals_none(mix, causal, backend):
    """``seq_lengths`` all ``n`` gives exactly the result of no ``seq_lengths`` where the kernel
    is the same (math; fused causal); non-causal ``torch`` runs the math kernel with the key
    mask, equal to rounding."""
    _, n, h, h_kv, w, r = CONFIGS[3]
    q, k, v, dout, dlse = _inputs(n, h, h_kv)
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal, return_lse=True,
              backend=backend)
    plain = _run(lambda *x: ring_torch.dilated_attention(*x, **kw), q, k, v, dout, dlse)
    full = _run(lambda *x: ring_torch.dilated_attention(*x, seq_lengths=torch.tensor([n, n]), **kw),
                q, k, v, dout, dlse)
    for a, b in zip(full, plain):
        if backend == "math" or causal:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal,fused", [(True, True), (False, False)])
def test_causal_padding_keeps_the_fused_kernel(monkeypatch, causal, fused):
    """Right padding needs no key mask under causality: the fused executor still runs; a
    non-causal call with padding takes the math kernel."""
    import ring_torch._api as api
    import ring_torch._dilated as dilated

    made = []
    original = api.make_executor

    def spy(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(api, "make_executor", spy)
    q, k, v, *_ = _inputs(13, 4, 2)
    ring_torch.dilated_attention(q, k, v, segment_lengths=(4, 16), dilation_rates=(2, 4),
                                 is_causal=causal, backend="torch", seq_lengths=torch.tensor([13, 5]))
    assert isinstance(made[0], dilated.FusedExecutor) is fused
    assert made[0].kernel.name == ("torch" if fused else "math")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lengths", [None, [37, 34]], ids=["none", "lengths"])
def test_untiled_n_runs_an_unpadded_prefix_and_a_padded_tail(monkeypatch, causal, lengths):
    """``n = 37`` with ``lcm(w) = 16``: the prefix ``[0, 32)`` runs on views with no padding
    (so the fused kernel even without causality, unless ``seq_lengths`` ask for a key mask),
    the tail ``[32, 37)`` padded to its own plan length 40 - 32 = 8; when both take the fused
    kernel they run as one ``FusedRuns`` node."""
    import ring_torch._api as api
    import ring_torch._runs as runs

    made, fused = [], []
    spans, apply = api._spans, runs.FusedRuns.apply

    def spy(*args):
        made.extend(spans(*args))
        return made[-2:]

    def spy_apply(*args):
        fused.append(args[3])
        return apply(*args)

    monkeypatch.setattr(api, "_spans", spy)
    monkeypatch.setattr(runs.FusedRuns, "apply", spy_apply)
    _, n, h, h_kv, w, r = CONFIGS[4]
    q, k, v, dout, dlse = _inputs(n, h, h_kv)
    sl = None if lengths is None else torch.tensor(lengths)
    got = _run(lambda *x: ring_torch.dilated_attention(
        *x, segment_lengths=w, dilation_rates=r, is_causal=causal, return_lse=True, backend="torch",
        seq_lengths=sl), q, k, v, dout, dlse)
    _check(got, n, h, h_kv, w, r, "head_groups", causal, lengths)
    assert [(run.start, run.stop, run.pad) for run, _ in made] == [(0, 32, 0), (32, 37, 3)]
    key_mask = not causal and lengths is not None
    kernels = ["math" if key_mask else "torch", "torch" if causal else "math"]
    assert [e.kernel.name for _, e in made] == kernels
    assert len(fused) == (kernels == ["torch", "torch"])


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", ["math", "torch"])
def test_cotangents_of_padded_rows_are_ignored(mix, causal, backend):
    """Padded rows are constants (out 0, LSE -inf): cotangents given there (``autograd.grad``
    with explicit ``grad_outputs``, no loss that zeroes them) change no gradient."""
    _, n, h, h_kv, w, r = CONFIGS[0]
    q, k, v, dout, dlse = _inputs(n, h, h_kv)
    lengths = torch.tensor([9, 4])
    real = torch.arange(n)[None, :] < lengths[:, None]  # [b, n]

    def grads(dout, dlse):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out, lse = ring_torch.dilated_attention(*xs, segment_lengths=w, dilation_rates=r, mix=mix,
                                                is_causal=causal, return_lse=True, backend=backend,
                                                seq_lengths=lengths)
        return torch.autograd.grad((out, lse), xs, (dout, dlse))

    zeroed = grads(torch.where(real[:, :, None, None], dout, 0), torch.where(real[:, :, None], dlse, 0))
    for a, b in zip(grads(dout, dlse), zeroed):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_padding_content_never_matters(mix, causal):
    """Any finite values in the padded positions of q, k and v give exactly the results of
    other values: outputs, LSE and gradients of the real positions, padded gradients 0."""
    _, n, h, h_kv, w, r = CONFIGS[0]
    q, k, v, dout, dlse = _inputs(n, h, h_kv)
    lengths = torch.tensor([9, 4])
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal, return_lse=True,
              seq_lengths=lengths)
    clean = _run(lambda *x: ring_torch.dilated_attention(*x, **kw), q, k, v, dout, dlse)
    real = (torch.arange(n)[None, :] < lengths[:, None])[:, :, None, None]
    q2, k2, v2 = (torch.where(real, x, 1e3 * torch.randn_like(x)) for x in (q, k, v))
    other = _run(lambda *x: ring_torch.dilated_attention(*x, **kw), q2, k2, v2, dout, dlse)
    for a, b in zip(other, clean):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_mask_unchanged_on_real_positions(mix, causal):
    """Dropout with padding: the real rows equal the unpadded call on the real prefix with the
    same seed (the keep-mask hashes global positions), values and gradients."""
    n, m, h, h_kv, w, r = 20, 11, 4, 2, (8, 16), (1, 2)
    q, k, v, dout, dlse = _inputs(n, h, h_kv)
    kw = dict(segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal, return_lse=True,
              dropout_p=0.3, dropout_seed=7)
    padded = _run(lambda *x: ring_torch.dilated_attention(*x, seq_lengths=torch.tensor([m, m]), **kw),
                  q, k, v, dout, dlse)
    prefix = _run(lambda *x: ring_torch.dilated_attention(*x, **kw),
                  *(x[:, :m] for x in (q, k, v, dout, dlse)))
    for a, b in zip(padded, prefix):
        torch.testing.assert_close(a[:, :m], b, atol=1e-12, rtol=0)
    for g in padded[2:]:
        assert not g[:, m:].any()
    # The full-length entry of a mixed batch is the unpadded call's.
    mixed = _run(lambda *x: ring_torch.dilated_attention(*x, seq_lengths=torch.tensor([n, m]), **kw),
                 q, k, v, dout, dlse)
    plain = _run(lambda *x: ring_torch.dilated_attention(*x, **kw), q, k, v, dout, dlse)
    for a, b in zip(mixed, plain):
        torch.testing.assert_close(a[0], b[0], atol=1e-12, rtol=0)


def _brute_padded_length(w, r, n):
    N = n
    while not all((N % wi == 0) if wi <= N else (N % ri == 0) for wi, ri in zip(w, r)):
        N += 1
    return N


@pytest.mark.parametrize("w,r", [((4, 16), (2, 4)), ((8, 16, 32), (1, 2, 4)), ((6, 10), (3, 5)),
                                 ((2048, 4096, 8192, 16384), (1, 2, 4, 8))])
def test_padded_length_is_the_smallest(w, r):
    config = ring_torch.DilatedConfig(w, r)
    for n in list(range(1, 80)) + [1000, 4097, 20000]:
        assert config.padded_length(n) == _brute_padded_length(w, r, n), n


@pytest.mark.parametrize("seq_lengths,error,match", [
    (torch.tensor([1.0, 2.0]), TypeError, r"seq_lengths has dtype float32; expected an integer"),
    (torch.tensor([True, False]), TypeError, r"seq_lengths has dtype bool"),
    (torch.tensor([[3, 3]]), ValueError, r"seq_lengths must have shape \[batch\]=\(2,\), got \(1, 2\)"),
    (torch.tensor([3]), ValueError, r"seq_lengths must have shape \[batch\]=\(2,\), got \(1,\)"),
    (torch.tensor([14, 3]), ValueError, r"seq_lengths=\[14, 3\] must lie in \[0, seq_len=13\]"),
    (torch.tensor([-1, 3]), ValueError, r"seq_lengths=\[-1, 3\] must lie in \[0, seq_len=13\]"),
])
@pytest.mark.parametrize("ring_size", [None, 2])
def test_seq_lengths_errors(seq_lengths, error, match, ring_size):
    q, k, v, *_ = _inputs(13, 4, 2)
    with pytest.raises(error, match=match):
        ring_torch.ring_dilated_attention(q, k, v, segment_lengths=(4, 16), dilation_rates=(2, 4),
                                          seq_lengths=seq_lengths, ring_size=ring_size)


def test_seq_lengths_accepts_lists_and_int32():
    q, k, v, *_ = _inputs(13, 4, 2)
    kw = dict(segment_lengths=(4, 16), dilation_rates=(2, 4))
    a = ring_torch.dilated_attention(q, k, v, seq_lengths=[13, 5], **kw)
    b = ring_torch.dilated_attention(q, k, v, seq_lengths=torch.tensor([13, 5], dtype=torch.int32), **kw)
    assert torch.equal(a, b)


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_any_n_and_lengths(data):
    """Any ``n``, lengths, mix and causality, one device and the simulated ring: the oracle's
    values and LSE, the reference's gradients."""
    _, _, h, h_kv, w, r = data.draw(st.sampled_from(CONFIGS[:3]))  # n past lcm(w) = 16 splits (4, 16)
    n = data.draw(st.integers(1, 40))
    lengths = data.draw(st.none() | st.lists(st.integers(0, n), min_size=2, max_size=2))
    mix = data.draw(st.sampled_from(["head_groups", "longnet"]))
    causal = data.draw(st.booleans())
    ring_size = data.draw(st.sampled_from([None, 2, 3]))
    backend = data.draw(st.sampled_from(["math", "torch"]))
    per_example = data.draw(st.booleans())  # host lengths entry by entry (one device only)
    q, k, v, dout, dlse = _inputs(n, h, h_kv)
    sl = None if lengths is None else torch.tensor(lengths)
    import ring_torch._api as api

    threshold = api.PER_EXAMPLE_MIN_SEQ
    api.PER_EXAMPLE_MIN_SEQ = 1 if per_example else threshold
    try:
        got = _run(lambda *x: ring_torch.ring_dilated_attention(
            *x, segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal, return_lse=True,
            backend=backend, seq_lengths=sl, ring_size=ring_size), q, k, v, dout, dlse)
    finally:
        api.PER_EXAMPLE_MIN_SEQ = threshold
    _check(got, n, h, h_kv, w, r, mix, causal, lengths)


# --- Rings -------------------------------------------------------------------------------------

RING = [(c, R, mix, causal) for c in CONFIGS for R in (2, 3, 4) for mix in ("head_groups", "longnet")
        for causal in (False, True)]


@pytest.mark.parametrize("config,ring_size,mix,causal", RING,
                         ids=[f"{c[0]}-R{R}-{m}-{'causal' if ca else 'full'}" for c, R, m, ca in RING])
def test_simulated_ring_pads_any_n(config, ring_size, mix, causal):
    """``ring_size`` with any ``n`` (padded to a length ``R`` shards can run) and lengths."""
    _, n, h, h_kv, w, r = config
    lengths = _lengths(LENGTHS["partial"], n)
    q, k, v, dout, dlse = _inputs(n, h, h_kv)
    backend = "torch" if causal else "math"
    got = _run(lambda *x: ring_torch.ring_dilated_attention(
        *x, segment_lengths=w, dilation_rates=r, mix=mix, is_causal=causal, return_lse=True,
        backend=backend, seq_lengths=torch.tensor(lengths), ring_size=ring_size), q, k, v, dout, dlse)
    _check(got, n, h, h_kv, w, r, mix, causal, lengths)


@pytest.mark.parametrize("n,w,r,ring_size", [(64, (8, 32), (1, 2), 3), (64, (8, 32), (1, 32), 4),
                                             (64, (24,), (1,), 4), (13, (4, 16), (2, 4), 4)])
def test_simulated_ring_equals_one_device_where_n_does_not_shard(n, w, r, ring_size):
    """Shardings the ring plan refuses at ``n`` itself (``n % R``, ``L % r``, ``w' % L``) run
    padded, equal to the single-device layer."""
    q, k, v, dout, dlse = _inputs(n, 4, 2)
    kw = dict(segment_lengths=w, dilation_rates=r, mix="longnet", return_lse=True)
    ring = _run(lambda *x: ring_torch.ring_dilated_attention(*x, ring_size=ring_size, **kw),
                q, k, v, dout, dlse)
    one = _run(lambda *x: ring_torch.dilated_attention(*x, **kw), q, k, v, dout, dlse)
    for a, b in zip(ring, one):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_ring_padded_length():
    from ring_torch._ring_plan import ring_padded_length, sharding_error

    config = ring_torch.DilatedConfig((8, 32), (1, 2))
    for R in (2, 3, 4, 8):
        for n in range(1, 70):
            N = ring_padded_length(config, n, R)
            assert N >= n and N % R == 0 and sharding_error(config, N // R, R) is None
            assert all(M % R or sharding_error(config, M // R, R) is not None
                       or config.padded_length(M) != M for M in range(n, N))


SPAWN_DEADLINE_S = 150
# (name, world, n, h, h_kv, w, r, mix, causal, comm, lengths, kind)
SPAN4 = dict(n=64, h=6, h_kv=3, w=(8, 32, 64), r=(1, 2, 4))
SPAN2 = dict(n=32, h=4, h_kv=2, w=(8, 32), r=(1, 2))
DIST_CASES = {}
for _world, _cfg, _lengths_ in ((4, SPAN4, (50, 7)), (2, SPAN2, (20, 32))):
    for _mix in ("head_groups", "longnet"):
        for _causal in (False, True):
            _name = f"p{_world}-{_mix}-{'causal' if _causal else 'full'}"
            DIST_CASES[_name] = dict(world=_world, **_cfg, mix=_mix, causal=_causal, comm="ring",
                                     lengths=_lengths_, kind="grad")
DIST_CASES["p4-allgather-full"] = dict(world=4, **SPAN4, mix="longnet", causal=False,
                                       comm="all_gather", lengths=(33, 0), kind="grad")
DIST_CASES["p4-dropout"] = dict(world=4, **SPAN4, mix="longnet", causal=False, comm="ring",
                                lengths=(50, 7), kind="dropout")
# w'=48 > L=16 and n=64 is no multiple of 48: the partial last segment runs on rank 3 alone.
DIST_CASES["p4-partial-span"] = dict(world=4, n=64, h=2, h_kv=2, w=(8, 48), r=(1, 2),
                                     mix="head_groups", causal=False, comm="ring", lengths=(50, 7),
                                     kind="grad")
DIST_CASES["p2-lengths-on-one-rank"] = dict(world=2, **SPAN2, mix="head_groups", causal=True,
                                            comm="ring", lengths=(20, 32), kind="mismatch")
DIST_CASES["p4-module-kpm"] = dict(world=4, **SPAN4, mix="longnet", causal=False, comm="ring",
                                   lengths=(50, 7), kind="module")


def _shard(x, rank, world):
    L = x.shape[1] // world
    return x[:, rank * L:(rank + 1) * L]


def _dist_kwargs(case):
    return dict(segment_lengths=case["w"], dilation_rates=case["r"], mix=case["mix"],
                is_causal=case["causal"])


def _dist_case(name, rank, world):
    import torch.distributed as dist

    case = DIST_CASES[name]
    q, k, v, dout, dlse = (_shard(x, rank, world) for x in _inputs(case["n"], case["h"], case["h_kv"]))
    lengths = None if case["lengths"] is None else torch.tensor(case["lengths"])
    kw = dict(_dist_kwargs(case), process_group=dist.group.WORLD, comm=case["comm"],
              return_lse=True, seq_lengths=lengths)
    if case["kind"] == "module":  # the global key_padding_mask on every rank
        module = _module(case, process_group=dist.group.WORLD)
        module._causal = case["causal"]
        mask = torch.arange(case["n"])[None, :] >= lengths[:, None]
        return _module_run(module, *(_shard(x, rank, world) for x in _module_inputs(case)), mask,
                           mask_kw="key_padding_mask")
    if case["kind"] in ("error", "mismatch"):
        if case["kind"] == "mismatch" and rank == 1:
            kw["seq_lengths"] = None
        try:
            ring_torch.ring_dilated_attention(q, k, v, **kw)
        except ValueError as e:
            return {"error": str(e)}
        return {"error": None}
    if case["kind"] == "dropout":
        kw.update(dropout_p=0.25, dropout_seed=11)
    got = _run(lambda *x: ring_torch.ring_dilated_attention(*x, **kw), q, k, v, dout, dlse)
    return dict(zip(("out", "lse", "dq", "dk", "dv"), got))


def _worker(rank, world, init_file, out_dir, names):
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    results = {}
    for name in names:
        try:
            results[name] = _dist_case(name, rank, world)
        except Exception:  # recorded; the comparing test reports it
            results[name] = {"exception": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@functools.cache
def _dist_results(world):
    """Every case of ``world`` in one spawn, under a hard deadline; each rank's results."""
    names = [name for name, c in DIST_CASES.items() if c["world"] == world]
    return spawn_ranks(_worker, world, names, deadline_s=SPAWN_DEADLINE_S, label="padding tests")


def _per_rank(name):
    per_rank = [res[name] for res in _dist_results(DIST_CASES[name]["world"])]
    for rank, res in enumerate(per_rank):
        assert "exception" not in res, f"rank {rank}:\n{res['exception']}"
    return per_rank


GRAD_DIST = [name for name, c in DIST_CASES.items() if c["kind"] == "grad"]


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
@pytest.mark.parametrize("name", GRAD_DIST)
def test_process_group_seq_lengths_match_oracle(name):
    case = DIST_CASES[name]
    per_rank = _per_rank(name)
    got = [torch.cat([r[key] for r in per_rank], dim=1) for key in ("out", "lse", "dq", "dk", "dv")]
    _check(got, case["n"], case["h"], case["h_kv"], case["w"], case["r"], case["mix"],
           case["causal"], list(case["lengths"]))


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
def test_process_group_dropout_with_lengths_equals_one_device():
    case = DIST_CASES["p4-dropout"]
    per_rank = _per_rank("p4-dropout")
    q, k, v, dout, dlse = _inputs(case["n"], case["h"], case["h_kv"])
    one = _run(lambda *x: ring_torch.dilated_attention(
        *x, **_dist_kwargs(case), return_lse=True, seq_lengths=torch.tensor(case["lengths"]),
        dropout_p=0.25, dropout_seed=11), q, k, v, dout, dlse)
    for key, expected in zip(("out", "lse", "dq", "dk", "dv"), one):
        torch.testing.assert_close(torch.cat([r[key] for r in per_rank], dim=1), expected,
                                   atol=1e-12, rtol=0)


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
def test_process_group_seq_lengths_on_some_ranks_only_is_refused():
    for res in _per_rank("p2-lengths-on-one-rank"):
        assert "disagree" in res["error"] and "seq_lengths_given: [True, False]" in res["error"]


# --- Modules -----------------------------------------------------------------------------------


def _module(case, **kw):
    torch.manual_seed(0)
    return ring_torch.MultiheadDilatedAttention(
        case["h"] * D, case["h"], case["w"], case["r"], num_kv_heads=case["h_kv"], mix=case["mix"],
        dtype=torch.float64, **kw)


def _module_inputs(case):
    g = torch.Generator().manual_seed(1)
    shape = (2, case["n"], case["h"] * D)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2)]


def _module_run(module, x, dout, lengths=None, mask_kw="seq_lengths"):
    """Output, input gradient and parameter gradients of ``sum(module(x) * dout)``."""
    case_lengths = lengths
    x = x.clone().requires_grad_()
    module.zero_grad()
    kw = {}
    if case_lengths is not None:
        kw[mask_kw] = case_lengths
    out = module(x, is_causal=module._causal, **kw)
    (out * dout).sum().backward()
    return {"out": out.detach(), "dx": x.grad,
            "params": {n: p.grad.clone() for n, p in module.named_parameters()}}


MODULE = [(mix, causal) for mix in ("head_groups", "longnet") for causal in (False, True)]


@pytest.mark.parametrize("mix,causal", MODULE, ids=[f"{m}-{'causal' if c else 'full'}" for m, c in MODULE])
@pytest.mark.parametrize("ring_size,per_example", [(None, False), (None, True), (3, False)],
                         ids=["one_device", "per_example", "ring3"])
def test_module_padding_equals_each_example_alone(monkeypatch, mix, causal, ring_size, per_example):
    """A padded batch: each example's real rows (outputs and input gradients) equal the module
    on that example alone, unpadded; padded inputs get zero gradients; ``key_padding_mask``
    (right padding) gives exactly the ``seq_lengths`` result (``per_example``: the host lengths
    run the batch entry by entry, the threshold lowered to this size)."""
    if per_example:
        import ring_torch._api as api

        monkeypatch.setattr(api, "PER_EXAMPLE_MIN_SEQ", 1)
    case = dict(n=13, h=4, h_kv=2, w=(4, 16), r=(2, 4), mix=mix)
    module = _module(case, ring_size=ring_size)
    module._causal = causal
    x, dout = _module_inputs(case)
    lengths = torch.tensor([13, 6])
    padded = _module_run(module, x, dout, lengths)
    mask = torch.arange(13)[None, :] >= lengths[:, None]
    masked = _module_run(module, x, dout, mask, mask_kw="key_padding_mask")
    for key in ("out", "dx"):
        assert torch.equal(padded[key], masked[key])
    for b, m in enumerate(lengths.tolist()):
        alone = _module_run(module, x[b:b + 1, :m], dout[b:b + 1, :m])
        torch.testing.assert_close(padded["out"][b:b + 1, :m], alone["out"], atol=1e-10, rtol=0)
        torch.testing.assert_close(padded["dx"][b:b + 1, :m], alone["dx"], atol=1e-10, rtol=0)
        assert not padded["dx"][b, m:].any()


def test_module_mask_errors():
    case = dict(n=13, h=4, h_kv=2, w=(4, 16), r=(2, 4), mix="head_groups")
    module = _module(case)
    x, _ = _module_inputs(case)
    holes = torch.zeros(2, 13, dtype=torch.bool)
    holes[1, 3] = True  # padding before a real position
    with pytest.raises(ValueError, match=r"key_padding_mask is not right padding: row 1 has "
                                         r"padding \(True\) at position 3 followed by a real"):
        module(x, key_padding_mask=holes)
    with pytest.raises(ValueError, match="not both"):
        module(x, key_padding_mask=torch.zeros(2, 13, dtype=torch.bool), seq_lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[batch, seq\]=\(2, 13\)"):
        module(x, key_padding_mask=torch.zeros(2, 12, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        module(x, key_padding_mask=torch.zeros(2, 13))
    with pytest.raises(ValueError, match="not supported with a cache"):
        module.eval()(x[:, :1], cache=module.init_cache(2), seq_lengths=torch.tensor([1, 1]))


@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
def test_process_group_module_with_key_padding_mask():
    """The module in a process group with the global ``key_padding_mask``: outputs and input
    gradients concatenate, parameter gradients add up, to the single-process module's."""
    case = DIST_CASES["p4-module-kpm"]
    per_rank = _per_rank("p4-module-kpm")
    module = _module(case)
    module._causal = case["causal"]
    ref = _module_run(module, *_module_inputs(case), torch.tensor(case["lengths"]))
    torch.testing.assert_close(torch.cat([r["out"] for r in per_rank], 1), ref["out"], atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.cat([r["dx"] for r in per_rank], 1), ref["dx"], atol=1e-9, rtol=0)
    for name, grad in ref["params"].items():
        torch.testing.assert_close(sum(r["params"][name] for r in per_rank), grad, atol=1e-9, rtol=0)
