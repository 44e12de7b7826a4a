"""Every invalid input raises ValueError naming the offending values, before any compute."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import ring_torch._kernels as kernels
from ring_torch import DilatedConfig, dilated_attention


def _qkv(b=1, n=16, h=4, h_kv=2, d=8, dtype=torch.float32):
    return (torch.zeros(b, n, h, d, dtype=dtype), torch.zeros(b, n, h_kv, d, dtype=dtype),
            torch.zeros(b, n, h_kv, d, dtype=dtype))


GOOD = dict(segment_lengths=(8, 16), dilation_rates=(1, 2))

# (id, inputs, keyword overrides, regex the message must match)
CASES = [
    ("lengths_differ", _qkv(), dict(segment_lengths=(8, 16), dilation_rates=(1,)),
     r"segment_lengths=\(8, 16\) and dilation_rates=\(1,\)"),
    ("empty", _qkv(), dict(segment_lengths=(), dilation_rates=()), r"non-empty"),
    ("w_zero", _qkv(), dict(segment_lengths=(0, 16)), r"segment length w=0 must be positive"),
    ("w_negative", _qkv(), dict(segment_lengths=(-8, 16)), r"w=-8 must be positive"),
    ("r_zero", _qkv(), dict(dilation_rates=(1, 0)), r"dilation rate r=0 must be positive"),
    ("w_not_multiple_of_r", _qkv(), dict(segment_lengths=(8, 12), dilation_rates=(1, 8)),
     r"w=12 is not a multiple of r=8: every segment length must be a multiple of its dilation rate"),
    ("head_groups_too_few_heads", _qkv(h=2, h_kv=1),
     dict(segment_lengths=(4, 8, 16), dilation_rates=(1, 1, 1)),
     r"num_heads=2 < num_patterns=3"),
    ("h_not_multiple_of_h_kv", _qkv(h=4, h_kv=3), {}, r"num_heads=4 is not a multiple of "
                                                       r"num_kv_heads=3"),
    ("batch_mismatch", (torch.zeros(2, 16, 4, 8), *_qkv(b=1)[1:]), {}, r"differ in batch, seq"),
    ("seq_mismatch", (torch.zeros(1, 32, 4, 8), *_qkv()[1:]), {}, r"differ in batch, seq"),
    ("head_dim_mismatch", (torch.zeros(1, 16, 4, 4), *_qkv()[1:]), {}, r"differ in batch, seq"),
    ("key_value_shapes", (*_qkv()[:2], torch.zeros(1, 16, 2, 4)), {}, r"key shape .* != value"),
    ("dtype_mismatch", (_qkv()[0].double(), *_qkv()[1:]), {},
     r"dtypes differ: query torch.float64"),
    ("rank_3", (torch.zeros(16, 4, 8), *_qkv()[1:]), {}, r"query must be 4-D"),
    ("rank_5", (*_qkv()[:2], torch.zeros(1, 1, 16, 2, 8)), {}, r"value must be 4-D"),
    ("unknown_mix", _qkv(), dict(mix="sum"), r"unknown mix='sum'"),
    ("unknown_backend", _qkv(), dict(backend="flash"), r"unknown backend='flash'"),
    ("xformers_on_cpu", _qkv(), dict(backend="xformers"), r"backend='xformers' needs CUDA"),
]


@pytest.mark.parametrize("inputs,overrides,message", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_error_message(inputs, overrides, message, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("validation must happen before any compute")

    for kernel in kernels.KERNELS.values():  # every kernel's forward
        monkeypatch.setattr(kernel, "forward", no_compute)
    with pytest.raises(ValueError, match=message):
        dilated_attention(*inputs, **{**GOOD, **overrides})


def test_int_dtypes_are_type_errors_for_every_backend():
    for backend in ("auto", "torch", "math"):
        with pytest.raises(TypeError, match=r"query has dtype int32; expected a floating dtype"):
            dilated_attention(*_qkv(dtype=torch.int32), backend=backend, **GOOD)


def test_config_is_frozen_and_normalised():
    config = DilatedConfig([8, 16], [1, 2], is_causal=np.bool_(True))
    assert config.segment_lengths == (8, 16) and config.dilation_rates == (1, 2)
    assert config.is_causal is True
    with pytest.raises(Exception):
        config.mix = "longnet"


def test_valid_inputs_still_run():
    q, k, v = _qkv()
    assert dilated_attention(q, k, v, **GOOD).shape == q.shape


def test_messages_are_fstring_style():
    with pytest.raises(ValueError) as info:
        DilatedConfig((8,), (3,))
    assert re.search(r"w=8 .* r=3", str(info.value))
