"""The committed GPU results still load and plot, and the derived numbers the README quotes are
computed the way it says (efficiency, measured peaks)."""

from __future__ import annotations

import os
import shutil

import pytest

from benchmarks import plot_results

RESULTS = os.path.join(os.path.dirname(plot_results.__file__), "results")


def test_plots_regenerate_from_the_committed_results(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    work = tmp_path / "results"
    shutil.copytree(RESULTS, work)
    for png in work.glob("*.png"):
        png.unlink()
    monkeypatch.setattr("sys.argv", ["plot_results", "--results", str(work)])
    plot_results.main()
    assert sorted(p.name for p in work.glob("*.png")) == sorted(p for p in os.listdir(RESULTS) if p.endswith(".png"))


def test_scaling_efficiency_definitions():
    rows = [dict(kind="weak", P=1, t=2.0), dict(kind="weak", P=2, t=2.5),
            dict(kind="strong", P=1, t=8.0), dict(kind="strong", P=2, t=5.0)]
    assert plot_results.efficiency(rows, "weak", "t") == {1: 1.0, 2: 0.8}
    assert plot_results.efficiency(rows, "strong", "t") == {1: 1.0, 2: 0.8}


def test_only_runs_that_raised_the_peak_count_as_measured():
    rows = [dict(section="max_n", n=1, peak_bytes_in_use=10), dict(section="max_n", n=2, peak_bytes_in_use=30),
            dict(section="ab", n=3), dict(section="max_n", n=3, peak_bytes_in_use=30),
            dict(section="max_n", n=4, error="OOM"), dict(section="max_n", n=5, peak_bytes_in_use=40)]
    assert [r["n"] for r in plot_results.set_peak(rows)] == [1, 2, 5]


def test_documents_bars_read_the_runs_the_readme_quotes():
    bars = plot_results.documents_bars(RESULTS)
    assert [round(x, 1) for x in bars["JAX head_groups"]] == [12.6, 118.8, 17.3]
    assert bars["JAX longnet"][1] is None and bars["torch longnet"][1] is None  # out of memory
    assert [round(x) for x in bars["torch head_groups"]] == [14, 554, 21]
