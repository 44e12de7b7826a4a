"""The Triton rows kernels compile for a Hopper GPU (sm90, the card ``ROWS_CONFIGS`` names) on a
machine without one: ``triton.compile`` down to a cubin (``ptxas`` ships with triton), for the
forward (pointer loads and tensor descriptors, writing and merging), dk/dv and dq, with and without
document ids and dropout. The CPU tests run the same bodies in the interpreter, which does not
compile them; this catches what only the compiler refuses.

It runs in a child process: the conftest sets ``TRITON_INTERPRET=1``, under which ``triton.jit``
makes interpreted functions.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ring_torch._triton_rows import triton_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import inspect
import itertools

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import ring_torch._triton_grads as grads
import ring_torch._triton_rows as rows

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = ("scale", "scale_log2", "keep_scale")


def compile_for_sm90(kernel, types, constexprs):
    """A cubin of ``kernel``: ``types`` names the pointer and descriptor arguments, the rest are
    i32 (``threshold`` i64, the scales fp32)."""
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = types.get(name, "fp32" if name in FLOATS else "i64" if name == "threshold" else "i32")
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=TARGET,
                              options=dict(num_warps=4, num_stages=3))
    assert compiled.asm["cubin"], kernel


bf16, ids = "*bf16", dict(I="*i64", IK="*i64", R="*i64", P="*i64")
desc = "tensordesc<bf16[1, 1, 64, 64]>"
for dropout, has_ids in itertools.product((False, True), repeat=2):
    common = dict(HAS_IDS=has_ids, DROPOUT=dropout, D=64, PRECISION="tf32")
    # the table's forward: descriptors, causal, rows written with fill or merged into float32
    for merge in (False, True):
        compile_for_sm90(rows._forward_kernel, dict(Q=desc, K=desc, V=desc, O=desc, Op="*fp32" if merge else bf16,
                                                    L="*fp32", **ids),
                         dict(common, BLOCK_M=64, BLOCK_N=64, CAUSAL=True, EVEN=True, WRITE_LSE=True, FILL=not merge,
                              MERGE=merge, TMA=True, WS=False))
    # a ring hop's block: pointer loads, other key rows, not causal, ragged
    compile_for_sm90(rows._forward_kernel, dict(Q=bf16, K=bf16, V=bf16, O=bf16, Op=bf16, L="*fp32", **ids),
                     dict(common, BLOCK_M=64, BLOCK_N=64, CAUSAL=False, EVEN=False, WRITE_LSE=True, FILL=False,
                          MERGE=False, TMA=False, WS=False))
    for causal in (False, True):
        compile_for_sm90(grads._dkdv_kernel, dict(Q=bf16, K=bf16, V=bf16, DO=bf16, L="*fp32", Delta="*fp32",
                                                  DK="*fp32", DV="*fp32", **ids),
                         dict(common, BLOCK_M=32, BLOCK_N=128, CAUSAL=causal, EVEN=causal, ACCUMULATE=True))
        compile_for_sm90(grads._dq_kernel, dict(Q=bf16, K=bf16, V=bf16, DO=bf16, L="*fp32", Delta="*fp32",
                                                DQ=bf16, **ids),
                         dict(common, BLOCK_M=128, BLOCK_N=64, CAUSAL=causal, EVEN=not causal, ACCUMULATE=False))
print("compiled", flush=True)
'''


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_rows_kernels_compile_for_sm90(tmp_path):
    script = tmp_path / "compile_sm90.py"
    script.write_text(CHILD, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), TRITON_CACHE_DIR=str(tmp_path / "cache"),
               TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-6000:]
