"""The Pallas block kernel (``ring_jax._pallas``): in Pallas' interpreter here, on the GPU with
``-m cuda``. Held to the float64 XLA kernel (block level, every mask, the LSE cotangent, empty
rows), to the float64 autodiff reference through every entry point that runs blocks (one device,
the simulated ring in both layouts, the sharded ring), and to the dispatch rules of ``auto``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ring_jax
from parity_tests.reference import reference_attention
from ring_jax import _kernels, _pallas
from ring_jax._coords import Mods, aligned_coords

gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (JAX)")
BLOCKS = _pallas.PallasBlocks(32, 16, 16, 32, 32, 16)  # tiles smaller than the rows: every loop runs


@pytest.fixture
def kernel():
    before = ring_jax.get_block_kernel()
    yield ring_jax.set_block_kernel
    ring_jax.set_block_kernel(before)


def _block_inputs(B=2, m=64, H=3, d=16, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k, v, do = (jax.random.normal(x, (B, m, H, d), jnp.float32).astype(dtype) for x in keys[:4])
    dlse = jax.random.normal(keys[4], (B, m, H), jnp.float32)
    docs = np.stack([np.repeat([3, 0, 7, 1], [10, 20, 1, 0 if m < 31 else m - 31])[:m] if m >= 31
                     else np.repeat([3, 0], [10, m - 10]), np.repeat([5, 2], [m - 9, 9])])
    rows = np.arange(B) % 2  # entries alternate between the two documents layouts and lengths
    coords = aligned_coords(B, m, H)._replace(docs=jnp.asarray(docs[rows], jnp.int32), klen=jnp.array([m, 40])[rows])
    return (q, k, v, do, dlse), coords


MODS = {"plain": Mods(), "causal": Mods(causal=True), "documents": Mods(documents=True),
        "causal_documents": Mods(causal=True, documents=True), "padded_keys": Mods(key_mask=True),
        "documents_padded_keys": Mods(documents=True, key_mask=True),
        "dropout": Mods(dropout_rate=0.3, pattern=2), "causal_documents_dropout": Mods(True, 0.5, 1, documents=True)}


def _pallas_block(q, k, v, do, dlse, coords, mods, blocks=BLOCKS, scale=0.3):
    out, lse = _pallas.forward(q, k, v, coords, scale=scale, mods=mods, blocks=blocks)
    return (out, lse, *_pallas.backward(q, k, v, out, lse, do, dlse, coords, scale=scale, mods=mods, blocks=blocks))


def _xla_block(q, k, v, do, dlse, coords, mods, scale=0.3):
    q, k, v, do, dlse = (x.astype(jnp.float64) for x in (q, k, v, do, dlse))
    out, lse = _kernels.XlaKernel().forward(q, k, v, scale, mods, coords)
    return (out, lse, *_kernels.XlaKernel().backward(q, k, v, out, lse, do, dlse, scale, mods, coords))


def _errors(got, ref):
    """Largest |error| of ``(out, lse, dq, dk, dv)``; the LSE's infinities must agree."""
    errors = []
    for a, b in zip(got, ref):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.array_equal(np.isinf(a), np.isinf(b)) and not np.isnan(a).any()
        fin = np.isfinite(b)
        errors.append(float(np.abs(a[fin] - b[fin]).max()))
    return errors


@pytest.mark.parametrize("name", list(MODS))
def test_block_against_float64(name):
    inputs, coords = _block_inputs()
    errors = _errors(_pallas_block(*inputs, coords, MODS[name]), _xla_block(*inputs, coords, MODS[name]))
    assert max(errors) < 2e-5, errors


@pytest.mark.parametrize("order", ["sorted", "unsorted"])
def test_documents_in_tile_sized_runs(order):
    """Documents that fill whole tiles (whole tiles masked out), in order and with a document that
    comes back later."""
    inputs, coords = _block_inputs()
    runs = [0, 1, 2, 3] if order == "sorted" else [2, 0, 2, 1]
    coords = coords._replace(docs=jnp.asarray(np.repeat(runs, 16)[None].repeat(2, 0), jnp.int32))
    for mods in (Mods(causal=True, documents=True), Mods(documents=True, key_mask=True)):
        errors = _errors(_pallas_block(*inputs, coords, mods, _pallas.PallasBlocks(16, 16, 16, 16, 16, 16)),
                         _xla_block(*inputs, coords, mods))
        assert max(errors) < 2e-5, (mods, errors)


def test_fp16_stays_within_twice_the_xla_error():
    """float16 inputs: the kernels keep scores, softmax statistics and sums in float32, so their
    error is that of a float16 XLA kernel (accumulating in float16 would fail this)."""
    inputs, coords = _block_inputs(m=128, d=32, seed=3)
    mods = Mods(causal=True, documents=True)
    ref = _xla_block(*inputs, coords, mods)
    half = tuple(x.astype(jnp.float16) for x in inputs[:4]) + (inputs[4],)
    ours = _errors(_pallas_block(*half, coords, mods), ref)
    naive = _errors(_kernels.XlaKernel().forward(*half[:3], 0.3, mods, coords)
                    + _kernels.XlaKernel().backward(*half[:3], *ref[:2], half[3], half[4], 0.3, mods, coords), ref)
    for field, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, naive):
        assert a <= 2 * b + 1e-6, (field, a, b)


def test_rows_without_keys_are_empty():
    """Every key padded (length 0), or a document whose queries precede all its keys: ``out = 0``,
    ``lse = -inf``, zero gradients, no NaN."""
    inputs, coords = _block_inputs()
    coords = coords._replace(klen=jnp.zeros(2, jnp.int32))
    got = _pallas_block(*inputs, coords, Mods(key_mask=True))
    assert not np.asarray(got[0]).any() and np.isneginf(np.asarray(got[1])).all()
    for g in got[2:]:
        assert not np.asarray(g).any() and not np.isnan(np.asarray(g)).any()


def test_lse_cotangent_reaches_every_gradient():
    inputs, coords = _block_inputs()
    with_dlse = _pallas_block(*inputs, coords, Mods(causal=True))
    without = _pallas_block(*inputs[:4], jnp.zeros_like(inputs[4]), coords, Mods(causal=True))
    for a, b in zip(with_dlse[2:4], without[2:4]):  # dq, dk depend on dlse; dv does not
        assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def test_tiles():
    assert _pallas.tile(2048, 64) == 64 and _pallas.tile(48, 64) == 16 and _pallas.tile(32, 128) == 32
    assert _pallas.tile(24, 64) is None and _pallas.tile(8, 64) is None  # no tile of 16 or more divides
    assert _pallas.tiles_for(64, 64, _pallas.PallasBlocks()) == ((64, 64),) * 3


def test_rows_no_tile_divides_run_the_xla_kernel():
    inputs, coords = _block_inputs(m=24)
    mods = Mods(causal=True, documents=True)
    pallas, xla = _kernels.PallasKernel(), _kernels.XlaKernel()
    got = pallas.forward(*inputs[:3], 0.3, mods, coords)
    ref = xla.forward(*inputs[:3], 0.3, mods, coords)
    assert all(np.array_equal(a, b) for a, b in zip(got, ref))
    assert all(np.array_equal(a, b) for a, b in zip(pallas.backward(*inputs[:3], *got, *inputs[3:], 0.3, mods, coords),
                                                    xla.backward(*inputs[:3], *ref, *inputs[3:], 0.3, mods, coords)))


def test_split_kernel_takes_each_half_from_its_kernel():
    inputs, coords = _block_inputs()
    mods = Mods(causal=True)
    split = _kernels.SplitKernel(_kernels.XlaKernel(), _kernels.PallasKernel(blocks=BLOCKS))
    assert split.name == "xla+pallas"
    out, lse = split.forward(*inputs[:3], 0.3, mods, coords)
    ref = _kernels.XlaKernel().forward(*inputs[:3], 0.3, mods, coords)
    assert all(np.array_equal(a, b) for a, b in zip((out, lse), ref))
    grads = split.backward(*inputs[:3], out, lse, *inputs[3:], 0.3, mods, coords)
    pallas = _pallas.backward(*inputs[:3], out, lse, *inputs[3:], coords, scale=0.3, mods=mods, blocks=BLOCKS)
    assert all(np.array_equal(a, b) for a, b in zip(grads, pallas))


def _select(**kw):
    return _kernels.select_kernel(jnp.bfloat16, 64, kw.pop("dropout", False), **kw)


def test_dispatch(kernel, monkeypatch):
    """``pallas`` runs in the interpreter on CPU and refuses what it cannot run, naming it; ``auto``
    takes it only where ``PALLAS_AUTO`` records it faster on the device."""
    kernel("pallas")
    assert _select().name == "pallas"
    assert _kernels.select_kernel(jnp.float32, 16, False).name == "pallas"
    assert _kernels.select_kernel(jnp.float32, 16, True).name == "pallas"  # dropout
    for dtype, d, dropout, match in ((jnp.float64, 16, False, "have float64"), (jnp.float32, 24, False, "have 24")):
        with pytest.raises(ValueError, match=r"block kernel 'pallas' cannot run here.*" + match):
            _kernels.select_kernel(dtype, d, dropout)
    kernel("auto")
    assert _select(documents=True).name == "xla"  # interpreted: never automatic
    # A device where PALLAS_AUTO holds both cases, and cuDNN runs what has no mask.
    monkeypatch.setattr(_kernels, "_pallas_measured", lambda head_dim, case: True)
    monkeypatch.setattr(_kernels.CudnnKernel, "supports", lambda self, dtype, d, mods: not (mods.documents or mods.dropout))
    assert _select(documents=True).name == "pallas"
    assert _select(lse_cotangent=True).name == "cudnn+pallas"
    assert _select().name == "cudnn"
    assert _select(documents=True, dropout=True).name == "pallas"
    monkeypatch.setattr(_kernels, "_pallas_measured", lambda head_dim, case: case != "dropout")
    assert _select(dropout=True).name == "xla" and _select(documents=True).name == "pallas"
    monkeypatch.setattr(_kernels, "_pallas_measured", lambda head_dim, case: True)
    kernel("cudnn")
    assert _select(lse_cotangent=True).name == "cudnn"  # an explicit choice is taken as given
    monkeypatch.setattr(_kernels, "_pallas_measured", lambda head_dim, case: case == "masks")
    kernel("auto")
    assert _select(lse_cotangent=True).name == "cudnn"


def test_pallas_auto_table_is_read_by_capability_and_head_dim(monkeypatch):
    class Card:
        compute_capability = "9.0"

    monkeypatch.setattr(_pallas, "interpreted", lambda: False)
    monkeypatch.setattr(jax, "devices", lambda *a: [Card()])
    monkeypatch.setattr(_kernels, "PALLAS_AUTO", {((9, 0), 64): ("masks",)})
    assert _kernels._pallas_measured(64, "masks") and not _kernels._pallas_measured(64, "lse_backward")
    assert not _kernels._pallas_measured(128, "masks")
    Card.compute_capability = "8.0"
    assert not _kernels._pallas_measured(64, "masks")


# Through the API: m = w / r = 32 rows per block, so the Pallas kernels run (not the fallback).
W, R = (32, 64, 128), (1, 2, 4)


def _mesh(P):
    return jax.make_mesh((P,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:P])


ENTRIES = {
    "one_device": lambda q, k, v, **kw: ring_jax.dilated_attention(q, k, v, return_lse=True, **kw),
    "ring_size2": lambda q, k, v, **kw: ring_jax.dilated_attention(q, k, v, return_lse=True, ring_size=2, **kw),
    "ring_size2_balanced": lambda q, k, v, **kw: ring_jax.dilated_attention(
        q, k, v, return_lse=True, ring_size=2, layout="balanced", **kw),
    "mesh2": lambda q, k, v, **kw: ring_jax.sharded_dilated_attention(q, k, v, mesh=_mesh(2), return_lse=True, **kw),
}


def _api_inputs(n=256, seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((2, n, 4, 16), (2, n, 2, 16), (2, n, 2, 16), (2, n, 4, 16), (2, n, 4))
    return tuple(rng.standard_normal(s).astype(np.float32) for s in shapes)


def _api_reference(q, k, v, dout, dlse, kw):
    qt, kt, vt = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    out, lse = reference_attention(qt, kt, vt, **kw)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    ((out * torch.from_numpy(dout).double()).sum() + (finite * torch.from_numpy(dlse).double()).sum()).backward()
    return tuple(t.detach().numpy() for t in (out, lse, qt.grad, kt.grad, vt.grad))


def _api_run(fn, q, k, v, dout, dlse):
    """``(out, lse, dq, dk, dv)`` of ``fn`` under one ``jax.jit`` (no LSE cotangent on empty rows)."""
    def run(q, k, v, dout, dlse):
        (out, lse), vjp = jax.vjp(fn, q, k, v)
        return (out, lse, *vjp((dout, jnp.where(jnp.isfinite(lse), dlse, 0.0))))

    return jax.jit(run)(*(jnp.asarray(x) for x in (q, k, v, dout, dlse)))


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_entry_points_with_documents_against_reference(kernel, entry, mix):
    n = 256
    q, k, v, dout, dlse = _api_inputs(n)
    ids = np.stack([np.repeat([3, 0, 7, 1], [70, 90, 1, 95]), np.repeat([5, 2], [200, 56])])
    lens = None if entry == "mesh2" else np.array([n - 37, n])
    kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True)
    kernel("pallas")
    got = _api_run(lambda q, k, v: ENTRIES[entry](q, k, v, segment_ids=jnp.asarray(ids),
                                                  seq_lengths=lens, **kw), q, k, v, dout, dlse)
    errors = _errors(got, _api_reference(q, k, v, dout, dlse, dict(kw, segment_ids=ids, seq_lengths=lens)))
    assert max(errors) < 5e-5, errors


@pytest.mark.parametrize("entry", ["one_device", "ring_size2_balanced"])
def test_dropout_draws_the_xla_kernels_mask(kernel, entry):
    """The same seed gives the same dropped weights as the XLA kernel (the shared hash, drawn in the
    kernel tile by tile), forward and backward, with documents and lengths."""
    q, k, v, dout, dlse = _api_inputs(seed=4)
    ids = np.repeat([[0, 1], [2, 2]], [100, 156], axis=1)
    kw = dict(segment_lengths=W, dilation_rates=R, mix="longnet", is_causal=True, dropout_rate=0.25,
              dropout_seed=11, segment_ids=jnp.asarray(ids), seq_lengths=np.array([230, 256]))
    results = {}
    for name in ("xla", "pallas"):
        kernel(name)
        results[name] = _api_run(lambda q, k, v: ENTRIES[entry](q, k, v, **kw), q, k, v, dout, dlse)
    errors = _errors(results["pallas"], results["xla"])
    assert max(errors) < 5e-5, errors
    kernel("pallas")
    other = _api_run(lambda q, k, v: ENTRIES[entry](q, k, v, **dict(kw, dropout_seed=12)), q, k, v, dout, dlse)
    assert np.abs(np.asarray(other[0]) - np.asarray(results["pallas"][0])).max() > 1e-2  # the seed matters


def test_non_causal_padding_takes_the_key_mask(kernel):
    n = 192  # padded to 256 inside: the last 64 keys, and those past each length, are masked
    q, k, v, dout, dlse = _api_inputs(n, seed=2)
    lens = np.array([150, n])
    kw = dict(segment_lengths=W, dilation_rates=R, mix="longnet", is_causal=False)
    kernel("pallas")
    got = _api_run(lambda q, k, v: ring_jax.dilated_attention(q, k, v, return_lse=True, seq_lengths=lens, **kw),
                   q, k, v, dout, dlse)
    errors = _errors(got, _api_reference(q, k, v, dout, dlse, dict(kw, seq_lengths=lens)))
    assert max(errors) < 5e-5, errors


# ---- on the GPU -------------------------------------------------------------------------------


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fin = np.isfinite(b)
    return float(np.linalg.norm(a[fin] - b[fin]) / np.linalg.norm(b[fin]))


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("name", list(MODS))
def test_cuda_block_bf16_within_twice_xla(name):
    inputs, coords = _block_inputs(B=4, m=1024, H=4, d=64)
    mods = MODS[name]
    with jax.default_matmul_precision("highest"):
        ref = _xla_block(*inputs, coords, mods)
    low = tuple(x.astype(jnp.bfloat16) for x in inputs[:4]) + (inputs[4],)
    blocks = _pallas.PallasBlocks()
    ours = [_rel(a, b) for a, b in zip(_pallas_block(*low, coords, mods, blocks=blocks), ref)]
    xla = _kernels.XlaKernel()
    out, lse = xla.forward(*low[:3], 0.3, mods, coords)
    naive = [_rel(a, b) for a, b in zip((out, lse, *xla.backward(*low[:3], out, lse, *low[3:], 0.3, mods, coords)), ref)]
    for field, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, naive):
        assert a <= 2 * b, (field, a, b)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("documents", [True, False], ids=["documents", "plain"])
@pytest.mark.parametrize("entry", ["one_device", "ring_size2"])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_cuda_auto_documents_and_rings(kernel, entry, mix, documents):
    """On a device ``PALLAS_AUTO`` lists, ``auto`` takes Pallas for documents and the cuDNN
    forward with the Pallas backward for rings; bf16 errors within 2x the XLA kernel's."""
    n = 8192
    q, k, v, dout, dlse = _api_inputs(n)
    ids = np.repeat(np.arange(3), [3000, 4000, n - 7000])[None].repeat(2, 0)
    kw = dict(segment_lengths=(2048, 4096), dilation_rates=(1, 2), mix=mix, is_causal=True,
              segment_ids=jnp.asarray(ids) if documents else None)
    fn = lambda q, k, v: ENTRIES[entry](q, k, v, **kw)  # noqa: E731
    kernel("xla")
    with jax.default_matmul_precision("highest"):
        ref = _api_run(fn, q, k, v, dout, dlse)
    low = tuple(x.astype(jnp.bfloat16) for x in (q, k, v)) + (dout.astype(jnp.bfloat16), dlse)
    naive = [_rel(a, b) for a, b in zip(_api_run(fn, *low), ref)]
    kernel("auto")
    measured = _kernels._pallas_measured(64, "masks")
    spec = _kernels.make_spec(jnp.bfloat16, 64, 0.125, True, 0.0, documents=True)
    assert spec.kernel.name == ("pallas" if measured else "xla")
    ring = _kernels.make_spec(jnp.bfloat16, 64, 0.125, True, 0.0, lse_cotangent=True)
    assert ring.kernel.name == ("cudnn+pallas" if _kernels._pallas_measured(64, "lse_backward") else "cudnn")
    ours = [_rel(a, b) for a, b in zip(_api_run(fn, *low), ref)]
    for field, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, naive):
        assert a <= 2 * b, (field, a, b)


def test_blocks_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _pallas.PallasBlocks().block_q = 32
