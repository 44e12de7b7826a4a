"""The single-device torch layer as one step of a compiled or captured program: ``torch.compile``
equals eager (bit for bit on the CPU backends that run no codegen), a call reads no tensor value
on the host and does no Python work that grows with the sequence, and (CUDA) it replays from a
``torch.cuda.CUDAGraph``, forward and forward+backward, equal to eager on new inputs."""

from __future__ import annotations

import dataclasses
import gc
import json
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ring_torch
import ring_torch._api as api
import ring_torch._config as config
import ring_torch._dilated as dilated
import ring_torch._dilated_grads as dilated_grads
import ring_torch._plan as plan

def needs_cuda(test):
    """The GPU set (``-m cuda``), skipped without CUDA."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))
W, R = (8, 16, 32), (1, 2, 4)
MIXES = ("head_groups", "longnet")


def _inputs(n=64, h=6, h_kv=3, d=16, b=2, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, x, d, generator=g, dtype=dtype).to(device) for x in (h, h_kv, h_kv)]


def _step(fn, qkv, seed=1):
    """``fn(q, k, v)``'s output and the gradients of a random linear loss of it (and of the LSE
    when ``fn`` returns one) with respect to q, k, v."""
    xs = [x.detach().requires_grad_() for x in qkv]
    res = fn(*xs)
    out, lse = res if isinstance(res, tuple) else (res, None)
    g = torch.Generator().manual_seed(seed)
    loss = (out.float() * torch.randn(out.shape, generator=g).to(out.device)).sum()
    if lse is not None:
        loss = loss + torch.where(torch.isfinite(lse), lse, 0).sum()
    loss.backward()
    return [out.detach()] + ([] if lse is None else [lse.detach()]) + [x.grad for x in xs]


def _attention(**kw):
    return lambda q, k, v: ring_torch.dilated_attention(q, k, v, **kw)


# --- torch.compile on the CPU (CI) ---------------------------------------------------------

@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("return_lse", [False, True])
def test_compile_equals_eager(mix, backend, return_lse):
    """Forward and gradients bit for bit (GQA, causal); without the LSE the backward has no LSE
    cotangent under compile either (dynamo would pass zeros for an unused LSE output, widening
    every backward kernel by the exact-LSE column and moving gradients by an ulp)."""
    torch._dynamo.reset()
    fn = _attention(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True, return_lse=return_lse)
    qkv = _inputs()
    want = _step(fn, qkv)
    got = _step(torch.compile(fn, backend=backend, fullgraph=True), qkv)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_compile_inductor_equals_eager():
    """Default inductor (generated C++ for the copies around the fused kernels), one case."""
    torch._dynamo.reset()
    fn = _attention(segment_lengths=W, dilation_rates=R, mix="head_groups", is_causal=True)
    qkv = _inputs()
    want = _step(fn, qkv)
    got = _step(torch.compile(fn), qkv)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mix", MIXES)
def test_compile_with_the_fused_call_untraced_equals_eager(mix, monkeypatch):
    """Where ``traces_fused`` is False (CUDA), FusedDilated runs eagerly behind a graph break."""
    monkeypatch.setattr(dilated, "traces_fused", lambda device: False)
    torch._dynamo.reset()
    fn = _attention(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True)
    inputs = [x.requires_grad_() for x in _inputs()]  # without gradients no FusedDilated runs
    assert torch._dynamo.explain(fn)(*inputs).graph_break_count >= 1
    torch._dynamo.reset()
    for a, b in zip(_step(torch.compile(fn, backend="aot_eager"), _inputs()), _step(fn, _inputs())):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mix", MIXES)
def test_module_compiles_without_graph_breaks(mix):
    """``MultiheadDilatedAttention`` (through ``RingDilatedAttention``, no process group) traces
    as one graph and equals eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = ring_torch.MultiheadDilatedAttention(32, 4, W, R, num_kv_heads=2, mix=mix)
    x = torch.randn(2, 64, 32)
    explained = torch._dynamo.explain(module)(x, is_causal=True)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()

    def grads(fn):
        module.zero_grad()
        xs = x.clone().requires_grad_()
        out = fn(xs, is_causal=True)
        out.square().sum().backward()
        return [out.detach(), xs.grad] + [p.grad.clone() for p in module.parameters()]

    want = grads(module)
    got = grads(torch.compile(module, backend="aot_eager", fullgraph=True))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# --- host work per call ---------------------------------------------------------------------

aten = torch.ops.aten
# Ops that read a tensor's values on the host (a device sync on an accelerator), build a
# tensor from host data (a host-to-device copy per call on an accelerator), or size their
# output by the data (a sync).
HOST_READS = {aten._local_scalar_dense.default, aten.lift_fresh.default, aten.nonzero.default,
              aten.masked_select.default, aten.repeat_interleave.Tensor, aten._unique2.default,
              aten.unique_dim.default, aten.unique_consecutive.default}


class HostReads(TorchDispatchMode):
    """Raises at any op of :data:`HOST_READS` (and at ``tolist``/``numpy``, which skip the
    dispatcher); counts every op dispatched."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise AssertionError(f"host read of tensor data: {func}")
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _refuse(*args, **kwargs):
    raise AssertionError("host read of tensor data: tolist/numpy")


def _guarded(call) -> int:
    """Ops ``call()`` dispatches with :class:`HostReads` on (after one warm-up call: the caches
    of plans and index tensors are filled)."""
    call()
    with pytest.MonkeyPatch.context() as mp, HostReads() as mode:
        mp.setattr(torch.Tensor, "tolist", _refuse)
        mp.setattr(torch.Tensor, "numpy", _refuse)
        call()
    return mode.ops


CASES = {  # calls without seq_lengths: the fused kernels, and the masked math path
    "fused": dict(is_causal=True, backend="torch"),
    "fused_full": dict(is_causal=False, backend="torch"),
    "untiled": dict(is_causal=True, backend="torch", n=60),
    "math_dropout": dict(is_causal=False, backend="math", dropout_p=0.25, dropout_seed=3),
    "documents": dict(is_causal=True, backend="torch", segment_ids=True),
}


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_call_reads_no_tensor_values_on_the_host(case, mix):
    """Forward and backward: what would be a host sync on a GPU never runs (CUDA checks the
    same with ``torch.cuda.set_sync_debug_mode``, test below)."""
    kw = dict(CASES[case])
    qkv = _inputs(n=kw.pop("n", 64))
    if kw.pop("segment_ids", False):
        kw["segment_ids"] = torch.arange(qkv[0].shape[1]).expand(2, -1) // 20
    assert _guarded(lambda: _step(_attention(segment_lengths=W, dilation_rates=R, mix=mix, **kw), qkv)) > 0


def test_the_host_read_check_catches_a_planted_read(monkeypatch):
    """The check above can fail: a planted ``.item()``, ``.tolist()`` or ``torch.tensor``."""
    real = dilated.blank
    fn = _attention(segment_lengths=W, dilation_rates=R, is_causal=True)
    plants = (lambda q: q.sum().item(), lambda q: q[0, 0, 0].tolist(),
              lambda q: torch.tensor([1, 2], device=q.device))
    for plant in plants:
        monkeypatch.setattr(dilated, "blank", lambda q, *a, plant=plant, **k: (plant(q), real(q, *a, **k))[1])
        with pytest.raises(AssertionError, match="host read"):
            _guarded(lambda: fn(*_inputs()))


def _fresh_caches():
    """Empties the caches (an equal key left by an earlier test is compared by ``__eq__``)."""
    plan.PATTERN_CACHE.clear()
    plan.MASK_CACHE.clear()
    config._padded_length.cache_clear()
    dilated_grads._sums.cache_clear()
    api._CONFIGS.clear()


def _python_calls(call) -> int:
    """Python function calls made by ``call()`` (after emptying the caches and a warm-up call;
    the garbage collector off, so no finaliser of earlier objects runs inside)."""
    _fresh_caches()
    call()
    calls = [0]

    def profile(frame, event, arg):
        if event == "call":
            calls[0] += 1

    gc.collect()
    gc.disable()
    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
        gc.enable()
    return calls[0]


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("backend", ["torch", "math"])
def test_host_work_does_not_grow_with_the_sequence(mix, backend):
    """Same plan (every segment <= n), 8x the segments: the same Python calls and the same
    dispatched ops, forward and backward."""
    def call(n):
        return lambda: _step(_attention(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True,
                                        backend=backend), _inputs(n=n, d=8))

    assert _python_calls(call(64)) == _python_calls(call(512))
    assert _guarded(call(64)) == _guarded(call(512))


def test_the_growth_check_catches_per_segment_python_work(monkeypatch):
    """The check above can fail: coordinates listing every segment's start are caught."""
    real = dilated.unit_coords

    def listed(unit, spec, batch, seq_len):
        starts = [spec.global_start(s) for s in range(0, seq_len, unit.segment)]
        return dataclasses.replace(real(unit, spec, batch, seq_len), q_starts=starts)

    monkeypatch.setattr(dilated, "unit_coords", listed)
    call = lambda n: lambda: _attention(segment_lengths=W, dilation_rates=R, is_causal=True)(*_inputs(n=n))  # noqa: E731
    assert _python_calls(call(64)) < _python_calls(call(512))


def test_host_benchmark_runs_on_cpu(tmp_path):
    """``benchmarks.torch_host`` end to end on tiny CPU sizes."""
    from benchmarks import torch_host

    out = tmp_path / "host.json"
    torch_host.main(["--device", "cpu", "--n", "256", "--heads", "4", "--head-dim", "8", "--calls", "2",
                     "--repeats", "1", "--warmup", "1", "--compile-backend", "eager", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert not [row for row in rows if "error" in row]
    assert {(row["mix"], row["name"], row["direction"]) for row in rows} == {
        (mix, name, direction) for mix in MIXES for name in ("kernels", "layer", "compiled")
        for direction in ("fwd", "fwdbwd")}
    assert all(row["host_ms"] > 0 and row["wall_ms"] > 0 and row["host_over_kernels"] > 0 for row in rows)


# --- CUDA: graph capture, sync-free calls, inductor (run on a GPU; skipped elsewhere) --------

def _capture(step, warmup=3):
    """``(graph, outputs)``: ``step()`` warmed up on a side stream, then captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


GPU_W, GPU_R = (256, 512, 1024, 2048), (1, 2, 4, 8)  # the anchors' pattern, scaled to n = 2048


def _gpu_inputs(seed, n=2048, h=8, h_kv=2, d=64):
    return _inputs(n=n, h=h, h_kv=h_kv, d=d, b=1, dtype=torch.bfloat16, device="cuda", seed=seed)


@needs_cuda
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "seq_lengths"])
def test_cuda_graph_forward_and_backward_replay(mix, causal, padded):
    """Forward and forward+backward captured once, replayed on new values copied into the
    static inputs (and static ``seq_lengths`` on the device): equal to eager on those values.
    bf16, GQA 8/2; non-causal padding runs the masked math kernel."""
    kw = dict(segment_lengths=GPU_W, dilation_rates=GPU_R, mix=mix, is_causal=causal)
    static = [x.requires_grad_() for x in _gpu_inputs(0)]
    lengths = torch.tensor([1500], device="cuda") if padded else None
    dout = torch.randn_like(static[0])

    def forward():
        with torch.no_grad():
            return ring_torch.dilated_attention(*static, seq_lengths=lengths, **kw)

    def both():
        for x in static:
            x.grad = None
        out = ring_torch.dilated_attention(*static, seq_lengths=lengths, **kw)
        out.backward(dout)
        return [out.detach()] + [x.grad for x in static]

    fwd_graph, fwd_out = _capture(forward)
    both_graph, both_out = _capture(both)
    for seed in (1, 2):
        new = _gpu_inputs(seed)
        with torch.no_grad():
            for x, y in zip(static, new):
                x.copy_(y)
            if padded:
                lengths.fill_(700 * seed)
        fwd_graph.replay()
        both_graph.replay()
        xs = [y.requires_grad_() for y in new]
        out = ring_torch.dilated_attention(*xs, seq_lengths=lengths.clone() if padded else None, **kw)
        out.backward(dout)
        torch.cuda.synchronize()
        assert _rel(fwd_out, out) <= 1e-3  # the same kernels on the same values
        assert _rel(both_out[0], out) <= 1e-3
        for got, x in zip(both_out[1:], xs):
            assert _rel(got, x.grad) <= 1e-2  # flash backward accumulates dq atomically


@needs_cuda
@pytest.mark.parametrize("mix", MIXES)
def test_cuda_graph_module_replay(mix):
    """``MultiheadDilatedAttention`` forward+backward (input and parameter gradients) from a
    graph, replayed on new inputs, against eager."""
    torch.manual_seed(0)
    module = ring_torch.MultiheadDilatedAttention(512, 8, GPU_W, GPU_R, num_kv_heads=2, mix=mix,
                                                  device="cuda", dtype=torch.bfloat16)
    static = torch.randn(1, 2048, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def both():
        module.zero_grad(set_to_none=True)
        static.grad = None
        out = module(static, is_causal=True)
        out.float().square().mean().backward()
        return [out.detach(), static.grad] + [p.grad for p in module.parameters()]

    graph, captured = _capture(both)
    new = torch.randn_like(static)
    with torch.no_grad():
        static.copy_(new)
    graph.replay()
    got = [t.clone() for t in captured]
    module.zero_grad(set_to_none=True)
    x = new.clone().requires_grad_()
    out = module(x, is_causal=True)
    out.float().square().mean().backward()
    want = [out.detach(), x.grad] + [p.grad for p in module.parameters()]
    for a, b in zip(got, want):
        assert _rel(a, b) <= 1e-2


@needs_cuda
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cuda_call_does_not_synchronise(mix, causal):
    """A warm forward+backward under ``set_sync_debug_mode("error")``: a sync would raise."""
    kw = dict(segment_lengths=GPU_W, dilation_rates=GPU_R, mix=mix, is_causal=causal)
    fn = _attention(**kw)
    qkv = _gpu_inputs(0)
    _step(fn, qkv)  # warm-up: plans, index tensors, the kernels' RNG state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        xs = [x.detach().requires_grad_() for x in qkv]
        out = fn(*xs)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@needs_cuda
@pytest.mark.parametrize("mix", MIXES)
def test_cuda_compile_equals_eager(mix):
    """Default ``torch.compile`` (inductor) on CUDA against eager: forward and gradients (traced
    FusedDilated gave zero head_groups gradients here: ``_dilated.traces_fused``)."""
    torch._dynamo.reset()
    fn = _attention(segment_lengths=GPU_W, dilation_rates=GPU_R, mix=mix, is_causal=True)
    qkv = _gpu_inputs(0)
    want = _step(fn, qkv)
    got = _step(torch.compile(fn), qkv)
    for a, b in zip(got, want):
        assert _rel(a, b) <= 1e-2
