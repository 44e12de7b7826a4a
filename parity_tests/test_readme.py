"""README.md is true as written: every ```python block runs, in order, in one fresh process on CPU,
and the sections come in the order the README promises (what it is, install, quickstart, the
report, API, definition, layout, performance)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SECTIONS = ["Install", "Quickstart", "The parity report", "API", "The definition", "Layout", "Performance"]
# Words that date a README (they belong in benchmarks/results/README.md, with their dates).
DATED = ["this morning", "previous commit", "earlier today", "not yet measured", "another lease", "of issue "]


def _text(path: str = README) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a Markdown text, in order."""
    return re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.S | re.M)


def script(blocks: list[str]) -> str:
    """One script running the blocks in order; a failure names its block."""
    parts = []
    for i, block in enumerate(blocks, 1):
        parts.append(f"print('--- README python block {i} of {len(blocks)}', flush=True)\n{block}")
    return "\n".join(parts)


def run_blocks(blocks: list[str], tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    path = tmp_path / "readme_blocks.py"
    path.write_text(script(blocks), encoding="utf-8")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # the README sets the simulated device count itself
    return subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_readme_python_blocks_run_in_order(tmp_path):
    blocks = python_blocks(_text())
    assert blocks, "README.md has no ```python block"
    proc = run_blocks(blocks, tmp_path)
    assert proc.returncode == 0, (f"README python blocks failed (exit {proc.returncode})\n"
                                  f"--- stdout (last block reached) ---\n{proc.stdout[-3000:]}\n"
                                  f"--- stderr ---\n{proc.stderr[-6000:]}")


def test_a_broken_block_fails(tmp_path):
    """The runner reports a failing block (else the test above could pass vacuously)."""
    proc = run_blocks(["x = 1", "assert x == 2, 'broken on purpose'"], tmp_path, timeout=60)
    assert proc.returncode != 0 and "broken on purpose" in proc.stderr
    assert "block 2 of 2" in proc.stdout


def test_python_blocks_are_not_empty_and_complete():
    for i, block in enumerate(python_blocks(_text()), 1):
        assert block.strip(), f"python block {i} is empty"
        assert "..." not in block, f"python block {i} has '...': it cannot run as written"


def test_sections_in_order():
    text = _text()
    heads = re.findall(r"^## (.+?)\s*$", text, flags=re.M)
    assert heads == SECTIONS, heads
    intro = text[:text.index("\n## ")].strip().splitlines()
    assert intro[0].startswith("# ") and len([l for l in intro[1:] if l.strip()]) <= 5, intro
    quick = text[text.index("\n## Quickstart"):text.index("\n## The parity report")]
    for sub in ("### JAX", "### Flax NNX", "### Flax Linen", "### PyTorch"):
        assert sub in quick, sub


def test_no_dated_wording():
    text = _text().lower()
    for word in DATED:
        assert word not in text, f"README.md says {word!r}: dated notes belong in benchmarks/results/README.md"


def test_linked_files_exist():
    for target in re.findall(r"\]\(([^)#:]+)\)", _text()):
        assert os.path.exists(os.path.join(ROOT, target)), target


@pytest.mark.parametrize("name", ["README.md"])
def test_results_readme_files_exist(name):
    """Every JSON/PNG the measurement history names is committed under benchmarks/results/."""
    path = os.path.join(ROOT, "benchmarks", "results", name)
    names = set(re.findall(r"`([\w.-]+\.(?:json|png))`", _text(path)))
    assert names
    missing = [n for n in names if not os.path.exists(os.path.join(ROOT, "benchmarks", "results", n))]
    assert not missing, missing


def test_layout_table_matches_the_packages():
    """The Layout table names every module of both packages, and only modules that exist."""
    text = _text()
    layout = text[text.index("\n## Layout"):text.index("\n## Performance")]
    rows = [line.split("|")[1:-1] for line in layout.splitlines()
            if line.startswith("| ") and not line.startswith(("| step", "| ---"))]
    for col, pkg in ((1, "ring_jax"), (2, "ring_torch")):
        named = {f for row in rows for f in re.findall(r"`(\w+\.py)`", row[col])}
        present = {f for f in os.listdir(os.path.join(ROOT, pkg)) if f.endswith(".py") and f != "__init__.py"}
        assert named == present, (pkg, "not in the table:", sorted(present - named), "no such file:", sorted(named - present))
