"""Invalid arguments of concepts both frameworks share raise the same exception type with the
same message in ``ring_jax`` and ``ring_torch``, naming the argument, before any compute."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

import ring_jax  # noqa: E402
import ring_jax._api as jax_api  # noqa: E402
import ring_torch  # noqa: E402
import ring_torch._kernels as torch_kernels  # noqa: E402

GOOD = dict(segment_lengths=(8, 16), dilation_rates=(1, 2))
SHAPE = (1, 16, 4, 8)  # [b, n, h, d]


def _inputs(framework, shape=SHAPE, kv_shape=None, dtype="float32"):
    kv_shape = kv_shape or shape
    if framework == "jax":
        return jnp.zeros(shape, dtype), jnp.zeros(kv_shape, dtype), jnp.zeros(kv_shape, dtype)
    dt = getattr(torch, dtype)
    return torch.zeros(shape, dtype=dt), torch.zeros(kv_shape, dtype=dt), torch.zeros(kv_shape, dtype=dt)


@pytest.fixture
def no_compute(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("validation must happen before any compute")

    for kernel in torch_kernels.KERNELS.values():
        monkeypatch.setattr(kernel, "forward", fail)
    for name in ("one_device_mode", "simulated_ring_attention", "run_layers"):
        monkeypatch.setattr(jax_api, name, fail)


def _call(framework, kwargs, **input_kw):
    q, k, v = _inputs(framework, **input_kw)
    kwargs = {**GOOD, **kwargs}
    if framework == "jax":
        return ring_jax.dilated_attention(q, k, v, **kwargs)
    if "ring_size" in kwargs:
        return ring_torch.ring_dilated_attention(q, k, v, **kwargs)
    return ring_torch.dilated_attention(q, k, v, **kwargs)


# (id, keyword overrides, input keywords, exception, the exact message)
FLOAT = "expected a floating dtype (float16, bfloat16, float32, float64)"
CASES = [
    ("int32_inputs", {}, dict(dtype="int32"), TypeError, f"query has dtype int32; {FLOAT}"),
    ("bool_inputs", {}, dict(dtype="bool"), TypeError, f"query has dtype bool; {FLOAT}"),
    ("seq_len_zero", {}, dict(shape=(1, 0, 4, 8)), ValueError, "seq_len=0 must be positive"),
    ("head_dim_zero", {}, dict(shape=(1, 16, 4, 0)), ValueError, "head_dim=0 must be positive"),
    ("num_heads_zero", {}, dict(shape=(1, 16, 0, 8)), ValueError, "num_heads=0 must be positive"),
    ("num_kv_heads_zero", {}, dict(kv_shape=(1, 16, 0, 8)), ValueError,
     "num_kv_heads=0 must be positive"),
    ("w_float", dict(segment_lengths=(8.5,), dilation_rates=(1,)), {}, TypeError,
     "segment_lengths=(8.5,) must be a tuple or list of ints: 8.5 is a float"),
    ("w_float_truncating", dict(segment_lengths=(64.9,), dilation_rates=(1,)), {}, TypeError,
     "segment_lengths=(64.9,) must be a tuple or list of ints: 64.9 is a float"),
    ("r_float", dict(segment_lengths=(8,), dilation_rates=(1.7,)), {}, TypeError,
     "dilation_rates=(1.7,) must be a tuple or list of ints: 1.7 is a float"),
    ("w_bool", dict(segment_lengths=(8, True)), {}, TypeError,
     "segment_lengths=(8, True) must be a tuple or list of ints: True is a bool"),
    ("w_scalar", dict(segment_lengths=256, dilation_rates=(1,)), {}, TypeError,
     "segment_lengths=256 must be a tuple or list of ints"),
    ("w_string", dict(segment_lengths="16", dilation_rates=(1,)), {}, TypeError,
     "segment_lengths='16' must be a tuple or list of ints"),
    ("w_zero", dict(segment_lengths=(0, 16)), {}, ValueError,
     "segment length w=0 must be positive (segment_lengths=(0, 16))"),
    ("r_negative", dict(dilation_rates=(1, -2)), {}, ValueError,
     "dilation rate r=-2 must be positive (dilation_rates=(1, -2))"),
    ("lengths_differ", dict(dilation_rates=(1,)), {}, ValueError,
     "segment_lengths=(8, 16) and dilation_rates=(1,) must be non-empty and of equal length"),
    ("unknown_mix", dict(mix="sum"), {}, ValueError,
     "unknown mix='sum'; expected one of ('head_groups', 'longnet')"),
    ("scale_nan", dict(softmax_scale=float("nan")), {}, ValueError,
     "softmax_scale=nan must be a finite positive number or None"),
    ("scale_inf", dict(softmax_scale=float("inf")), {}, ValueError,
     "softmax_scale=inf must be a finite positive number or None"),
    ("scale_zero", dict(softmax_scale=0), {}, ValueError,
     "softmax_scale=0 must be a finite positive number or None"),
    ("scale_negative", dict(softmax_scale=-0.5), {}, ValueError,
     "softmax_scale=-0.5 must be a finite positive number or None"),
    ("scale_string", dict(softmax_scale="0.5"), {}, TypeError,
     "softmax_scale='0.5' must be a finite positive number or None"),
    ("causal_string", dict(is_causal="False"), {}, TypeError,
     "is_causal='False' must be a bool (True or False)"),
    ("causal_int", dict(is_causal=1), {}, TypeError, "is_causal=1 must be a bool (True or False)"),
    ("ring_size_zero", dict(ring_size=0), {}, ValueError, "ring_size=0 must be a positive int or None"),
    ("ring_size_negative", dict(ring_size=-2), {}, ValueError,
     "ring_size=-2 must be a positive int or None"),
    ("ring_size_float", dict(ring_size=2.5), {}, TypeError,
     "ring_size=2.5 must be a positive int or None"),
    ("ring_size_string", dict(ring_size="2"), {}, TypeError,
     "ring_size='2' must be a positive int or None"),
    ("heads_not_multiple", {}, dict(kv_shape=(1, 16, 3, 8)), ValueError,
     "num_heads=4 is not a multiple of num_kv_heads=3"),
    ("too_few_heads", dict(segment_lengths=(4, 8, 16), dilation_rates=(1, 1, 1)),
     dict(shape=(1, 16, 2, 8)), ValueError,
     "mix='head_groups' needs a head per pattern: num_heads=2 < num_patterns=3"),
]


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("kwargs,input_kw,error,message", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_same_error_in_both_frameworks(framework, kwargs, input_kw, error, message, no_compute):
    with pytest.raises(error) as info:
        _call(framework, kwargs, **input_kw)
    assert type(info.value) is error
    assert str(info.value) == message


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_valid_variants_are_accepted(framework):
    """NumPy integers, NumPy bools, lists and integral scales pass the checks."""
    out = _call(framework, dict(segment_lengths=[np.int64(8), 16], dilation_rates=(np.int32(1), 2),
                                is_causal=np.bool_(True), softmax_scale=np.float32(0.5)))
    assert tuple(out.shape) == SHAPE
    out = _call(framework, dict(softmax_scale=1, ring_size=np.int64(2)))
    assert tuple(out.shape) == SHAPE


def test_torch_refuses_numpy_inputs():
    q, k, v = _inputs("torch")
    with pytest.raises(TypeError, match=r"^key must be a torch.Tensor, got numpy.ndarray$"):
        ring_torch.dilated_attention(q, k.numpy(), v, **GOOD)


def test_jax_refuses_non_arrays():
    q, k, v = _inputs("jax")
    with pytest.raises(TypeError, match=r"^value must be an array, got builtins.list$"):
        ring_jax.dilated_attention(q, k, v.tolist(), **GOOD)


def test_jax_attention_fn_checks():
    with pytest.raises(TypeError, match=r"^ring_size='2' must be a positive int or None$"):
        ring_jax.make_attention_fn((8,), (1,), ring_size="2")
    with pytest.raises(ValueError, match=r"^ring_size=-2 must be a positive int or None$"):
        ring_jax.make_attention_fn((8,), (1,), ring_size=-2)
    fn = ring_jax.make_attention_fn((8, 16), (1, 2))
    q, k, v = _inputs("jax")
    with pytest.raises(TypeError, match=r"^is_causal='False' must be a bool \(True or False\)$"):
        fn(q, k, v, is_causal="False")


def _mesh(size, names=("sp",)):
    devices = np.array(jax.devices()[:size])
    return jax.sharding.Mesh(devices.reshape(size, *([1] * (len(names) - 1))), names)


@pytest.mark.parametrize("kwargs,shape,message", [
    (dict(seq_axis="sp"), (1, 20, 4, 8),
     "seq_len=20 is not a multiple of the size 8 of mesh axis seq_axis='sp'"),
    (dict(seq_axis="sp", batch_axis="sp"), (8, 32, 4, 8),
     "batch_axis='sp' and seq_axis='sp' must be different mesh axes"),
    (dict(seq_axis="seq"), (1, 32, 4, 8), "seq_axis='seq' is not an axis of the mesh (axes: ('sp',))"),
    (dict(seq_axis="sp", batch_axis="dp"), (1, 32, 4, 8),
     "batch_axis='dp' is not an axis of the mesh (axes: ('sp',))"),
])
def test_jax_mesh_errors_name_the_axis(kwargs, shape, message, no_compute):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = _mesh(8)
    q, k, v = _inputs("jax", shape=shape)
    with pytest.raises(ValueError) as info:
        ring_jax.sharded_dilated_attention(q, k, v, mesh=mesh, segment_lengths=(8,), dilation_rates=(1,),
                                           **kwargs)
    assert str(info.value) == message
