"""Block-kernel dispatch: the cuDNN adapter's guard and the XLA fallback (CPU here)."""

import jax
import jax.numpy as jnp
import pytest

import ring_jax
from ring_jax import _cudnn


@pytest.fixture
def kernel():
    before = ring_jax.get_block_kernel()
    yield ring_jax.set_block_kernel
    ring_jax.set_block_kernel(before)


def test_auto_falls_back_to_xla_where_cudnn_cannot_run(kernel):
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 64, 4, 16), jnp.bfloat16)
    kw = dict(segment_lengths=(16, 64), dilation_rates=(1, 2), is_causal=True)
    assert not _cudnn.usable(q.dtype, 16)  # no CUDA backend in this suite
    kernel("auto")
    auto = ring_jax.dilated_attention(q, q, q, **kw)
    kernel("xla")
    assert jnp.array_equal(auto, ring_jax.dilated_attention(q, q, q, **kw))


def test_explicit_cudnn_refuses_loudly(kernel):
    q = jnp.zeros((1, 64, 4, 16), jnp.float32)
    kernel("cudnn")
    with pytest.raises(ValueError, match=r"block kernel 'cudnn' cannot run here: needs a CUDA backend \(have 'cpu'\), "
                                         r"bf16/f16 inputs \(have float32\)"):
        ring_jax.dilated_attention(q, q, q, segment_lengths=(16,), dilation_rates=(1,))
    with pytest.raises(ValueError, match="block kernel 'flash' is not one of"):
        kernel("flash")


def test_adapter_version_gate(monkeypatch):
    _cudnn._module.cache_clear()
    monkeypatch.setattr(jax, "__version__", "0.99.0")
    assert _cudnn._module() is None  # outside the tested range: never touched
    _cudnn._module.cache_clear()
    monkeypatch.undo()
    assert _cudnn._module() is not None  # the private module exists in the installed JAX


def test_adapter_needs_compute_capability_8(monkeypatch):
    """The cuDNN flash kernels need Ampere or newer: an older card (Pascal, Volta) takes XLA."""

    class Card:
        def __init__(self, capability):
            self.compute_capability = capability

    assert _cudnn.compute_capability(Card("9.0")) == (9, 0)
    assert _cudnn.compute_capability(Card("6.1")) == (6, 1)
    assert _cudnn.compute_capability(Card(None)) is None  # a CPU device has no capability
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for capability, expected in (("6.1", False), ("7.0", False), ("8.0", True), ("9.0", True)):
        monkeypatch.setattr(jax, "devices", lambda capability=capability: [Card(capability)])
        assert _cudnn.usable(jnp.bfloat16, 64) is expected, capability
