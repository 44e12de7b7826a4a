"""The parity report end to end on CPU (table, JSON, plot, exit status) on a tiny subset, and its
pure parts: row verdicts and the coverage of the default subset."""

import itertools
import json
import math

import pytest

from parity_tests import report
from parity_tests.__main__ import main
from parity_tests.frameworks import DTYPES, Case, run_torch

# n=64 over a ring of 4: L = 16, so w=16 is local and w=64 spans the four devices.
TINY = (64, 4, 2, 16, (16, 64), (1, 2))


def _broken(case, x):
    """ring_torch's one-device result with every output value off by 1e-6: outside every bound."""
    got = run_torch(case, x)
    return got._replace(out=got.out + 1e-6)


@pytest.fixture
def tiny(monkeypatch):
    """The default path's cases replaced by two tiny ones; ``broken`` joins the float64 case."""
    monkeypatch.setitem(report.REPORT_CONFIGS, "tiny", TINY)
    monkeypatch.setitem(report.IMPLEMENTATIONS, "broken", _broken)

    def cases(impls):
        return [report.ReportCase("tiny", report._case("tiny", "float64", "head_groups", True), tuple(impls)),
                report.ReportCase("tiny", report._case("tiny", "bfloat16", "longnet", False), ("torch", "torch_ring"))]

    monkeypatch.setattr(report, "default_cases", cases)
    monkeypatch.setattr(report, "padded_cases", lambda impls, full: [])


def test_report_flags_the_row_outside_its_bound(tiny, tmp_path, capsys):
    out_json, out_png = tmp_path / "report.json", tmp_path / "report.png"
    assert main(["--json", str(out_json), "--png", str(out_png)]) == 1
    printed = capsys.readouterr().out
    rows = json.loads(out_json.read_text())["parity"]
    assert [r["impl"] for r in rows] == ["jax", "jax_ring", "torch", "torch_ring", "broken", "torch", "torch_ring"]
    for r in rows:
        assert {"error", "bound", "kind", "pass", "errors", "bounds"} <= r.keys()
        assert r["kind"] == ("abs" if r["dtype"] == "float64" else "rel")
        assert r["pass"] == (r["impl"] != "broken"), r
        assert r["pass"] == (r["error"] <= r["bound"])
    broken = rows[4]
    assert broken["worst"] == "out" and broken["error"] > broken["bound"] == 1e-10
    assert "FAIL: 6/7 rows within their bounds" in printed
    assert "FAIL broken float64 head_groups causal=True tiny: out" in printed
    assert "wrote " in printed.splitlines()[-1] and str(out_png) in printed.splitlines()[-1]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_passes_and_checks_flops(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(report.REPORT_CONFIGS, "tiny", TINY)
    cases = [report.ReportCase("tiny", report._case("tiny", "float32", "longnet", True), ("torch",))]
    out_json, out_png = tmp_path / "report.json", tmp_path / "report.png"
    assert report.run(cases=cases, out_json=str(out_json), out_png=str(out_png), timing=False)
    assert "PASS: 1/1 rows within their bounds" in capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["parity"][0]["pass"] and data["parity"][0]["kind"] == "rel"
    # Analytic FLOPs of the two plans agree, and double per doubling once n >= max(w) = 256.
    assert all(r["jax_flops"] == r["torch_flops"] for r in data["flops"])
    assert all(r["ratio_per_doubling"] == 2 for r in data["flops"] if r["n"] > 256)


def test_parity_row_verdicts():
    case = Case(*TINY, dtype="float32")
    ok = {k: (1e-7, 2e-5) for k in report.FIELDS}
    row = report.parity_row("tiny", "torch", case, ok)
    assert row["pass"] and row["kind"] == "rel" and row["ratio"] == pytest.approx(5e-3)
    bad = report.parity_row("tiny", "torch", case, {**ok, "dk": (3e-5, 2e-5)})
    assert not bad["pass"] and bad["worst"] == "dk" and bad["error"] == 3e-5 and bad["bound"] == 2e-5
    nan = report.parity_row("tiny", "torch", case, {**ok, "lse": (math.nan, 2e-5)})
    assert not nan["pass"] and nan["worst"] == "lse" and nan["ratio"] == math.inf
    assert "FAIL: 1/2 rows" in report.summary([row, bad])
    table = report.format_table([row, bad])
    assert "PASS" in table and "FAIL" in table and "3.0e-05/2.0e-05" in table and "abs =" in table


def test_default_subset_covers_every_implementation_dtype_mix_and_causal():
    runs = [(impl, rc.case.dtype, rc.case.mix, rc.case.is_causal)
            for rc in report.default_cases() for impl in rc.impls]
    assert len(runs) == len(set(runs)) == 24
    pairs = set(itertools.product(report.MIXES, (False, True)))
    for impl, dtype in itertools.product(report.IMPLEMENTATIONS, DTYPES):
        mine = {(m, c) for i, d, m, c in runs if (i, d) == (impl, dtype)}
        assert {m for m, _ in mine} == set(report.MIXES) and {c for _, c in mine} == {False, True}
    for impl in report.IMPLEMENTATIONS:
        assert {(m, c) for i, _, m, c in runs if i == impl} == pairs
    for dtype in DTYPES:
        assert {(m, c) for _, d, m, c in runs if d == dtype} == pairs
    # Without jax_ring the other implementations keep their cases.
    rest = [(impl, rc.case.dtype, rc.case.mix, rc.case.is_causal)
            for rc in report.default_cases(("jax", "torch", "torch_ring")) for impl in rc.impls]
    assert set(rest) == {r for r in runs if r[0] != "jax_ring"}
    assert len(report.full_cases()) * len(report.IMPLEMENTATIONS) == 96


def test_padded_rows_cover_lengths_on_every_implementation_and_an_odd_length_on_one_device():
    rows = [(rc.config, impl, rc.case.mix, rc.case.is_causal, rc.case.n, rc.case.seq_lengths)
            for rc in report.padded_cases() for impl in rc.impls]
    lengths = [r for r in rows if r[0] == "longnet_like+lengths"]
    assert {r[1] for r in lengths} == set(report.IMPLEMENTATIONS)
    assert {(r[2], r[3]) for r in lengths} == {pair for pair in report.PAIRINGS[0]}
    odd = [r for r in rows if r[0] == "longnet_like_n203+lengths"]
    assert {r[1] for r in odd} == set(report.ONE_DEVICE) and all(r[4] == 203 for r in odd)
    assert all(r[5] is not None and min(r[5]) < r[4] for r in rows)
    documents = [rc for rc in report.padded_cases() if rc.config == "longnet_like+documents"]
    assert {impl for rc in documents for impl in rc.impls} == set(report.IMPLEMENTATIONS)
    assert {(rc.case.mix, rc.case.is_causal) for rc in documents} == set(report.PAIRINGS[1])
    assert all(rc.case.segment_ids.shape == (2, rc.case.n) for rc in documents)
    full = report.padded_cases(full=True)
    assert {rc.case.dtype for rc in full} == set(DTYPES)
