"""The parity matrix: mix x causal x GQA x dtype x config, each framework against the oracle.

Tolerances by dtype are those of ``parity_tests.frameworks.tolerances``. By default every
framework x dtype x mix x causal combination runs twice, once with MHA and once with GQA, on
configs that rotate so that every config meets every framework, dtype and mix; ``PARITY_FULL=1``
runs the whole product (240 cases).
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from parity_tests.frameworks import DTYPES, Case, max_abs_err, reference, run_jax, run_torch, tolerances
from parity_tests.oracle import dilated_attention as oracle

# name: (n, h, h_kv for the GQA variant, d, segment_lengths, dilation_rates)
CONFIGS = {
    "single": (64, 4, 2, 16, (16,), (2,)),
    "longnet_like": (64, 6, 3, 16, (8, 16, 32), (1, 2, 4)),
    "w_gt_n": (64, 4, 2, 16, (32, 128), (2, 4)),
    "h12_over_5": (64, 12, 4, 16, (8, 16, 32, 64, 16), (1, 2, 4, 8, 4)),
    "d64": (32, 4, 1, 64, (8, 32), (1, 2)),
}

RUNNERS = {"jax": run_jax, "torch": run_torch}
MIXES = ("head_groups", "longnet")


def matrix(full: bool) -> list[tuple]:
    """``(config, mix, causal, gqa, dtype, framework)`` rows: the whole product, or the covering subset."""
    names = list(CONFIGS)
    rows = []
    combos = itertools.product(RUNNERS, DTYPES, MIXES, (False, True))
    for i, (framework, dtype, mix, causal) in enumerate(combos):
        for gqa in (False, True):
            configs = names if full else [names[(i + 2 * gqa) % len(names)]]
            rows += [(config, mix, causal, gqa, dtype, framework) for config in configs]
    return rows


def _id(row) -> str:
    config, mix, causal, gqa, dtype, framework = row
    return f"{config}-{mix}-{'causal' if causal else 'full'}-{'gqa' if gqa else 'mha'}-{dtype}-{framework}"


def test_default_matrix_covers_every_combination():
    rows = matrix(full=False)
    assert {r[1:3] + r[4:] for r in rows} == set(itertools.product(MIXES, (False, True), DTYPES, RUNNERS))
    assert {(r[0], r[1], r[5]) for r in rows} == set(itertools.product(CONFIGS, MIXES, RUNNERS))
    assert {(r[0], r[4]) for r in rows} == set(itertools.product(CONFIGS, DTYPES))
    assert {r[3] for r in rows} == {False, True}
    assert len(matrix(full=True)) == 240


def make_case(config, gqa, causal, mix, dtype) -> Case:
    n, h, h_kv, d, w, r = CONFIGS[config]
    return Case(n, h, h_kv if gqa else h, d, w, r, mix, causal, dtype)


def check_against_reference(got, case: Case, x, ref=None) -> dict:
    """Asserts ``got`` matches the float64 reference under the case's dtype rule; returns errors."""
    errs = tolerances(got, case, x, ref)
    for k, (e, bound) in errs.items():
        assert e <= bound, (k, e, bound)
    return errs


@pytest.mark.parametrize("config, mix, causal, gqa, dtype, framework",
                         [pytest.param(*row, id=_id(row)) for row in matrix(os.environ.get("PARITY_FULL") == "1")])
def test_matches_oracle(config, mix, causal, gqa, dtype, framework):
    if framework == "torch":
        pytest.importorskip("ring_torch")
    case = make_case(config, gqa, causal, mix, dtype)
    x = case.inputs()
    got = RUNNERS[framework](case, x)
    ref = reference(case, x)
    # The autodiff reference and the NumPy oracle are two readings of one definition.
    o_out, o_lse = oracle(x.q, x.k, x.v, **case.kwargs)
    assert max_abs_err(ref.out, o_out) <= 1e-12 and max_abs_err(ref.lse, o_lse) <= 1e-12
    check_against_reference(got, case, x, ref)


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("config", CONFIGS)
def test_lse_equal_across_frameworks(config, mix):
    pytest.importorskip("ring_torch")
    case = make_case(config, True, True, mix, "float64")
    x = case.inputs(seed=1)
    a, b = run_jax(case, x), run_torch(case, x)
    assert np.array_equal(np.isinf(a.lse), np.isinf(b.lse))
    assert max_abs_err(a.lse, b.lse) <= 1e-12
    assert max_abs_err(a.out, b.out) <= 1e-12
