"""``benchmarks.kernel_table`` on CPU (w shrunk, tiny n, one repeat): the JSON's floors are the
faster framework per mix and direction, each ratio is the layer's time over that floor, the printed
table is the JSON's, ``--table-from`` reprints it, the plot is written; plus the kernel-call shapes
against both libraries' plans and the table's formatting of failed cells."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")
pytest.importorskip("matplotlib")

from benchmarks import kernel_table as kt  # noqa: E402
from benchmarks._floors import unit_shapes  # noqa: E402
from benchmarks.timing import Sweep  # noqa: E402


def _main(*argv) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        kt.main(list(argv))
    return buf.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kernel_table")
    out, png = tmp / "t.json", tmp / "t.png"
    stdout = _main("--device", "cpu", "--n", "1K", "--repeats", "1", "--warmup", "1",
                   "--out", str(out), "--plot", str(png))
    return json.loads(out.read_text()), stdout, out, png


def test_json_floors_and_ratios_are_consistent(run):
    data = run[0]
    meta = data["meta"]
    assert {"device", "date", "torch", "jax", "flax", "command", "pattern"} <= set(meta)
    assert meta["pattern"]["segment_lengths"] == list(kt.W_CPU) and meta["jax_floor_implementation"] == "xla"
    assert "--device cpu" in meta["command"]
    [row] = data["rows"]
    assert row["n"] == 1024 and row["errors"] == {}
    for mix in ("hg", "ln"):
        assert row[f"jax_{mix}_temp_b_per_tok"] > 0
        for dr in ("fwd", "fwdbwd"):
            both = {fw: row[f"floor_{mix}_{fw}_{dr}_ms"] for fw in ("jax", "torch")}
            assert all(math.isfinite(t) and t > 0 for t in both.values())
            floor = row[f"floor_{mix}_{dr}_ms"]
            assert floor == min(both.values()) and both[row[f"floor_{mix}_{dr}_by"]] == floor
            for impl in ("jax", "torch"):
                t = row[f"{impl}_{mix}_{dr}_ms"]
                assert math.isfinite(t) and t > 0
                assert row[f"{impl}_{mix}_ratio_{dr}"] == pytest.approx(t / floor, rel=1e-12)


def test_printed_table_is_the_jsons(run):
    data, stdout, out, _ = run
    text = kt.table(data)
    assert stdout.rstrip().endswith(text)
    line = next(x for x in text.splitlines() if x.startswith("| 1K |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == 6
    r = data["rows"][0]
    assert cells[1].startswith(f"{kt._ms(r['floor_hg_fwd_ms'])} / {kt._ms(r['floor_hg_fwdbwd_ms'])} (longnet ")
    for cell, (impl, mix, _) in zip(cells[2:], kt.COLUMNS):
        assert cell == f"{r[f'{impl}_{mix}_ratio_fwd']:.2f}× / {r[f'{impl}_{mix}_ratio_fwdbwd']:.2f}×"
    assert _main("--table-from", str(out)).rstrip() == text


def test_plot_is_written(run):
    png = run[3]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
@pytest.mark.parametrize("n", [1024, 4096, 65536])
def test_kernel_calls_are_the_plans_units(mix, n):
    import ring_jax
    import ring_torch

    shapes = unit_shapes(n, mix, kt.W, kt.R, kt.H)
    tp = ring_torch.build_plan(ring_torch.DilatedConfig(kt.W, kt.R, mix, True), n, kt.H, kt.H)
    assert shapes == [(n // u.segment, u.num_heads, u.rows) for u in tp.units]
    jp = ring_jax.get_plan(ring_jax.DilatedConfig(kt.W, kt.R, mix, True), n, kt.H, kt.H)
    assert shapes == [(n // u.w, u.offsets.count(o), u.m) for u in jp.units for o in sorted(set(u.offsets))]
    # every head on every pattern (longnet), each head once (head groups)
    assert sum(h for _, h, _ in shapes) == kt.H * (len(kt.W) if mix == "longnet" else 1)


def test_finish_takes_the_faster_floor_per_direction_and_table_marks_failures(tmp_path):
    sweep = Sweep(str(tmp_path / "s.json"), 60, {})
    row = kt.Row(sweep, 4 * 2 ** 20)
    times = dict(floor_hg_torch_fwd_ms=10.0, floor_hg_jax_fwd_ms=12.0, floor_hg_torch_fwdbwd_ms=50.0,
                 floor_hg_jax_fwdbwd_ms=40.0, floor_ln_torch_fwd_ms=42.7, floor_ln_torch_fwdbwd_ms=183.2,
                 jax_hg_fwd_ms=15.0, jax_hg_fwdbwd_ms=48.0, torch_hg_fwd_ms=20.0, torch_hg_fwdbwd_ms=100.0,
                 jax_ln_fwd_ms=77.0, torch_ln_fwd_ms=104.0, torch_ln_fwdbwd_ms=366.4)
    for key, t in times.items():
        row.cell(key, lambda t=t: t)
    row.cell("floor_ln_jax_fwd_ms", lambda: 1 / 0)
    row.cell("jax_ln_fwdbwd_ms", lambda: (_ for _ in ()).throw(RuntimeError("RESOURCE_EXHAUSTED: Out of memory")))
    with contextlib.redirect_stdout(io.StringIO()):
        row.finish()
    d = json.loads((tmp_path / "s.json").read_text())["rows"][0]
    assert (d["floor_hg_fwd_ms"], d["floor_hg_fwd_by"]) == (10.0, "torch")
    assert (d["floor_hg_fwdbwd_ms"], d["floor_hg_fwdbwd_by"]) == (40.0, "jax")
    assert (d["floor_ln_fwd_ms"], d["floor_ln_fwd_by"]) == (42.7, "torch")  # JAX's failed: not a floor
    assert d["jax_hg_ratio_fwd"] == 1.5 and d["torch_hg_ratio_fwdbwd"] == 2.5 and d["jax_ln_ratio_fwdbwd"] is None
    assert d["errors"]["floor_ln_jax_fwd_ms"].startswith("ZeroDivisionError")
    line = kt.table({"rows": [d]}).splitlines()[2]
    assert line == ("| 4M | 10 / 40 (longnet 42.7 / 183) | 1.50× / 1.20× | 2.00× / 2.50× | 1.80× / OOM "
                    "| 2.44× / 2.00× |")


def test_lengths_parse_and_label():
    assert kt.parse_n("16K,256K,1M,4M") == [16384, 262144, 2 ** 20, 2 ** 22]
    assert kt.parse_n("4096") == [4096]
    assert [kt.label_n(n) for n in (16384, 2 ** 22, 1000)] == ["16K", "4M", "1000"]
