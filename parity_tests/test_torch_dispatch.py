"""Backend dispatch (``backend="auto"``) with mocked devices, and import hygiene."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from ring_torch._api import resolve_backend
import ring_torch._kernels as kernels
from ring_torch import dilated_attention, select_backend

f64, f32, f16, bf16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

# (device type, dtype, capability) -> (backend, compute dtype); xformers is never auto (measured slower)
TABLE = [
    ("cpu", f64, None, ("math", f64)),
    ("cpu", f32, None, ("torch", f32)),
    ("cpu", bf16, None, ("torch", bf16)),
    ("cpu", f16, None, ("torch", f16)),
    ("cuda", f64, (9, 0), ("math", f64)),
    # Pascal (GTX 1080): no flash, no bf16 math; half inputs are computed in float32.
    ("cuda", f16, (6, 1), ("torch", f32)),
    ("cuda", bf16, (6, 1), ("torch", f32)),
    ("cuda", f32, (6, 1), ("torch", f32)),
    ("cuda", f16, (7, 5), ("torch", f32)),
    ("cuda", bf16, (8, 0), ("torch", bf16)),
    ("cuda", f16, (9, 0), ("torch", f16)),
    ("cuda", f32, (9, 0), ("torch", f32)),
]


@pytest.mark.parametrize("device,dtype,capability,expected", TABLE,
                         ids=[f"{t[0]}-{t[1]}-{t[2]}" for t in TABLE])
def test_select_backend_table(device, dtype, capability, expected):
    assert select_backend(device, dtype, capability) == expected


def test_select_backend_needs_capability_on_cuda():
    with pytest.raises(ValueError, match="compute capability"):
        select_backend("cuda", f32, None)


@pytest.mark.parametrize("dtype,expected", [(f64, "math"), (f32, "torch"), (bf16, "torch")])
def test_auto_uses_the_table_on_cpu(dtype, expected, monkeypatch):
    seen = []

    def spy(real):
        def forward(self, q, *args):
            seen.append((self.name, q.dtype))
            return real(self, q, *args)
        return forward

    for kernel in kernels.KERNELS.values():  # the backend of every kernel call
        monkeypatch.setattr(kernel, "forward", spy(kernel.forward))
    q = torch.randn(1, 16, 2, 8, dtype=dtype)
    dilated_attention(q, q, q, segment_lengths=(8, 16), dilation_rates=(1, 2))
    assert seen and all(s == (expected, dtype) for s in seen)


@pytest.mark.parametrize("capability,dtype,expected", [
    ((6, 1), f16, ("torch", f32)),
    ((6, 1), bf16, ("torch", f32)),
    ((8, 0), bf16, ("torch", bf16)),
    ((9, 0), f16, ("torch", f16)),
    ((9, 0), f64, ("math", f64)),
])
def test_auto_on_mocked_cuda_device(capability, dtype, expected, monkeypatch):
    """Auto takes one fact from a CUDA device, its capability (xformers, even when it works, is
    never chosen: it never beat backend torch): mock it, and a working xformers."""
    asked = []

    def fake_capability(device=None):
        asked.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", fake_capability)
    monkeypatch.setattr(kernels, "xformers_available", lambda: True)
    assert resolve_backend("auto", torch.device("cuda", 1), dtype) == expected
    assert asked == [torch.device("cuda", 1)]


@pytest.mark.parametrize("dtype,head_dim,capability,cudnn,expected", [
    (bf16, 64, (9, 0), True, "cudnn"), (f16, 128, (9, 0), True, "cudnn"), (bf16, 8, (10, 0), True, "cudnn"),
    (bf16, 64, (9, 0), False, "flash"),  # a torch without cuDNN 9
    (bf16, 256, (9, 0), True, "flash"), (bf16, 136, (9, 0), True, "flash"),  # cuDNN: head_dim <= 128
    (f16, 128, (8, 0), True, "flash"), (bf16, 256, (8, 6), True, "flash"),  # cuDNN: sm90+
    (f32, 64, (9, 0), True, "efficient"),  # neither takes fp32
    (f16, 64, (7, 5), True, "efficient"), (f16, 64, (6, 1), True, "efficient"),  # flash needs sm80
    (bf16, 60, (9, 0), True, "efficient"), (bf16, 288, (9, 0), True, "efficient"),  # head_dim % 8, <= 256
])
def test_cuda_kernel_table(dtype, head_dim, capability, cudnn, expected):
    assert kernels.cuda_kernel(dtype, head_dim, capability, cudnn) == expected
    assert expected in kernels.CUDA_ATEN


@pytest.mark.parametrize("name", ["_AtenFlashCUDA", "_AtenCudnnCUDA"])
@pytest.mark.parametrize("head_dim", [64, 136])
def test_cuda_kernel_calls_match_the_aten_schemas(name, head_dim):
    # The aten forward/backward on meta tensors: argument order, the None cumulative lengths,
    # the saved tensors, and saved_from_lse's layout go through (the numbers are checked on
    # CUDA, test_torch_cuda); head_dim 136 is a widened backward (cuDNN's goes to flash).
    aten = getattr(kernels, name)
    q, k, v = (torch.empty(2, 128, 4, head_dim, device="meta", dtype=bf16) for _ in range(3))
    out, lse, saved = aten.forward(q, k, v, 0.125, True)
    assert out.shape == q.shape and lse.shape == (2, 128, 4) and lse.dtype == f32
    for s in (saved, (saved[0].transpose(1, 2).contiguous(), *saved[1:])):
        grads = aten.backward(torch.empty_like(out), q, k, v, out, s, 0.125, True)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_explicit_backend_computes_in_input_dtype():
    assert resolve_backend("math", torch.device("cpu"), bf16) == ("math", bf16)
    with pytest.raises(ValueError, match="backend='torch' on cuda does not support"):
        resolve_backend("torch", torch.device("cuda"), f64)


def test_broken_xformers_is_unavailable_and_does_not_break_import(monkeypatch):
    kernels.xformers_available.cache_clear()
    for name in [m for m in sys.modules if m.startswith("xformers.")] + ["xformers"]:
        monkeypatch.setitem(sys.modules, name, None)  # import of xformers now raises, even if loaded
    try:
        assert kernels.xformers_available() is False
    finally:
        kernels.xformers_available.cache_clear()


class _FakeFmha:
    """``xformers.ops.fmha`` of a build that imports but whose kernels do (not) run."""

    def __init__(self, runs: bool):
        self.runs, self.calls = runs, 0

    def memory_efficient_attention_forward_requires_grad(self, q, k, v, attn_bias, scale):
        self.calls += 1
        if not self.runs:
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")
        return torch.zeros_like(q), torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    def memory_efficient_attention_backward(self, dout, out, lse, q, k, v, attn_bias, scale):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def test_xformers_that_imports_but_cannot_run_is_unavailable(monkeypatch):
    """The probe runs a tiny call: an importable build whose op raises NotImplementedError is
    not available, so backend="auto" never picks it; the answer is cached."""
    assert kernels.xformers_runs(_FakeFmha(runs=False), torch.device("cpu")) is False
    assert kernels.xformers_runs(_FakeFmha(runs=True), torch.device("cpu")) is True
    fake = _FakeFmha(runs=False)
    ops = types.ModuleType("xformers.ops")
    ops.fmha = fake
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    original = kernels.xformers_runs  # the same probe, on the CPU this test has
    monkeypatch.setattr(kernels, "xformers_runs", lambda fmha, device: original(fmha, torch.device("cpu")))
    kernels.xformers_available.cache_clear()
    try:
        assert kernels.xformers_available() is False
        assert kernels.xformers_available() is False
        assert fake.calls == 1  # cached: probed once
        ops.fmha = _FakeFmha(runs=True)  # a build whose kernels run
        kernels.xformers_available.cache_clear()
        assert kernels.xformers_available() is True
    finally:
        kernels.xformers_available.cache_clear()


def test_ring_torch_imports_without_jax_or_xformers():
    code = ("import sys; sys.modules['jax'] = None; sys.modules['xformers'] = None\n"
            "import ring_torch, torch\n"
            "q = torch.randn(1, 8, 2, 4)\n"
            "ring_torch.dilated_attention(q, q, q, segment_lengths=(8,), dilation_rates=(2,))\n"
            "assert sys.modules['jax'] is None\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", [bf16, torch.float16, f32, torch.float64])
@pytest.mark.parametrize("start", [0, 1], ids=["aligned", "odd_offset"])
def test_copy_rows_and_dense_equal_the_plain_copy(dtype, start):
    # Strided unit rows (offset 1 of r = 2, two heads) written into a zero buffer and back; an
    # odd head offset cannot be read as 8-byte words and takes the plain copy.
    from ring_torch._aten import copy_rows_, dense
    x = torch.randn(2, 64, 8, 16, generator=torch.Generator().manual_seed(0)).to(dtype)

    def rows(t):
        return t.reshape(2, 4, 8, 2, 8, 16)[:, :, :, 1, 2:4, start:start + 8].reshape(8, 8, 2, 8)

    got = dense(rows(x))
    assert got.is_contiguous() and torch.equal(got, rows(x))
    y = torch.zeros_like(x)
    copy_rows_(rows(y), got)
    expected = torch.zeros_like(x)
    rows(expected).copy_(rows(x))
    assert torch.equal(y, expected)
    mixed = torch.zeros(8, 8, 2, 8, dtype=torch.float64)
    assert torch.equal(copy_rows_(mixed, got), got.double())  # dtype conversion: the plain copy


def test_copy_rows_takes_the_plain_copy_where_words_do_not_fit():
    # An odd stride (head_dim 16 of a 17-wide float32 buffer), and a copy autograd records:
    # both go through the plain copy, the second with its gradient.
    from ring_torch._aten import _as_words, copy_rows_
    src = torch.randn(4, 8, 2, 17)[..., :16]
    assert not _as_words(src)
    assert torch.equal(copy_rows_(torch.zeros(4, 8, 2, 16), src), src)
    x = torch.randn(4, 8, 2, 16, dtype=bf16, requires_grad=True)
    out = torch.zeros(4, 8, 2, 16, dtype=bf16)
    copy_rows_(out, x * 2)
    out.float().sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2))
