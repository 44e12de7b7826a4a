"""The README's first command, end to end on CPU: table, JSON and plot."""

import json

from parity_tests.__main__ import main


def test_quick_report_writes_json_and_png(tmp_path, capsys):
    out_json, out_png = tmp_path / "report.json", tmp_path / "report.png"
    assert main(["--quick", "--json", str(out_json), "--png", str(out_png)]) == 0
    printed = capsys.readouterr().out
    assert "within bounds" in printed and "torch_ring" in printed
    report = json.loads(out_json.read_text())
    assert {r["impl"] for r in report["parity"]} == {"jax", "jax_ring", "torch", "torch_ring"}
    assert all(r["ok"] for r in report["parity"])
    # Analytic FLOPs of the two plans agree, and double per doubling once n >= max(w) = 256.
    assert all(r["jax_flops"] == r["torch_flops"] for r in report["flops"])
    assert all(r["ratio_per_doubling"] == 2 for r in report["flops"] if r["n"] > 256)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
