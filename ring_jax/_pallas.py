"""Flash attention for one block in Pallas: Triton on a CUDA device, Pallas' interpreter elsewhere.

Same contract as the other block kernels (``_kernels``): ``q [B, m, H, d]``, ``k/v [B, m_k, H, d]``
→ ``out [B, m, H, d]``, ``lse [B, m, H]`` float32, and a backward given the rows' (possibly global)
``out``/``lse`` and both cotangents: ``dS = P * (dP - D + dlse)``, so ring hops and merged patterns
get exact gradients. The kernels read ``[b, s, h, d]`` in place (a head is a grid axis, rows are
strided loads), keep every softmax statistic in float32 and take one mask from
``_coords.row_ids``: a score counts where the query's and key's ids (documents, padded keys) are
equal, and below the diagonal when causal. Dropout draws the shared hash (``_dropout``) tile by
tile from each row's hash and each key's position (``_coords.dropout_rows``). Empty rows give
``out = 0``, ``lse = -inf`` and zero gradients.

Three kernels: the forward (grid: query blocks x blocks x heads, a loop over key blocks), dk/dv
(grid over key blocks, a loop over query blocks) and dq (grid over query blocks, a loop over key
blocks); ``D = rowsum(dO * O) - dlse`` is one XLA reduction before them. Tiles live in
:class:`PallasBlocks`. A block whose rows are not a multiple of a tile of at least 16 runs the
XLA kernel instead (decided from the static shape).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ring_jax._coords import Coords, Mods, dropout_rows, ids_meet, row_ids
from ring_jax._dropout import kept

LOG2E = math.log2(math.e)
MIN_TILE = 16


@dataclasses.dataclass(frozen=True)
class PallasBlocks:
    """Tiles (rows) and launch settings of the three kernels; each tile is shrunk to the largest
    power of two that divides the block's rows."""

    block_q: int = 64
    block_k: int = 64
    dkv_block_q: int = 64
    dkv_block_k: int = 64
    dq_block_q: int = 64
    dq_block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    bwd_num_warps: int = 4
    bwd_num_stages: int = 2


def tile(rows: int, want: int) -> int | None:
    """The largest power of two ``<= want`` dividing ``rows``, or None below :data:`MIN_TILE`."""
    t = 1 << (min(want, rows).bit_length() - 1)
    while t >= MIN_TILE and rows % t:
        t //= 2
    return t if t >= MIN_TILE else None


def interpreted() -> bool:
    """Whether the kernels run in Pallas' interpreter (any backend but a CUDA GPU)."""
    return jax.default_backend() != "gpu"


def _params(num_warps: int, num_stages: int):
    if interpreted():
        return {"interpret": True}
    from jax.experimental.pallas import triton as pltriton

    return {"compiler_params": pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


def _keep(q_ids, k_ids, q_start, k_start, rows: int, cols: int, causal: bool, key_mask: bool):
    """Boolean ``[rows, cols]`` of the scores that take part in a tile at ``(q_start, k_start)``,
    or None when all do (the one mask of every kernel here)."""
    keep = None
    if causal:
        keep = (q_start + jnp.arange(rows))[:, None] >= (k_start + jnp.arange(cols))[None, :]
    if q_ids is not None:
        same = ids_meet(q_ids, k_ids, key_mask)
        keep = same if keep is None else keep & same
    return keep


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _dropped(x, q_hash, k_pos, rate: float):
    """``x * keep / (1 - rate)`` of a tile with dropout (``_dropout.kept`` of the rows' hashes and the
    keys' positions), else ``x``."""
    if q_hash is None:
        return x
    return jnp.where(kept(q_hash[:, None], k_pos[None, :], rate), x * (1.0 / (1.0 - rate)), 0.0)


def _row_refs(refs, masked: bool, rate: float):
    """``(q_ids, k_ids, q_hash, k_pos, *outputs)`` of a kernel's trailing refs (None where absent)."""
    refs = list(refs)
    ids = (refs.pop(0), refs.pop(0)) if masked else (None, None)
    drop = (refs.pop(0), refs.pop(0)) if rate else (None, None)
    return (*ids, *drop, *refs)


def _load(ref, index=...):
    return None if ref is None else ref[index]


def _forward_kernel(q_ref, k_ref, v_ref, *refs, scale, causal, key_mask, rate, bq, bk, masked):
    q_ids_ref, k_ids_ref, q_hash_ref, k_pos_ref, o_ref, lse_ref = _row_refs(refs, masked, rate)
    i = pl.program_id(0)
    q = q_ref[...]  # [bq, d]
    q_ids, q_hash = _load(q_ids_ref), _load(q_hash_ref)

    def body(j, carry):
        acc, top, total = carry
        keys = pl.ds(j * bk, bk)
        s = _dot(q, k_ref[keys, :].T) * (scale * LOG2E)  # [bq, bk], log2 domain
        keep = _keep(q_ids, _load(k_ids_ref, keys), i * bq, j * bk, bq, bk, causal, key_mask)
        if keep is not None:
            s = jnp.where(keep, s, -jnp.inf)
        new_top = jnp.maximum(top, jnp.max(s, axis=1))
        shift = jnp.where(new_top == -jnp.inf, 0.0, new_top)  # a row with no key yet stays at 0
        p = jnp.exp2(s - shift[:, None])
        alpha = jnp.exp2(top - shift)
        v = v_ref[keys, :]
        pv = _dot(_dropped(p, q_hash, _load(k_pos_ref, keys), rate).astype(v.dtype), v)
        return acc * alpha[:, None] + pv, new_top, total * alpha + jnp.sum(p, axis=1)

    stop = jax.lax.div((i + 1) * bq + bk - 1, jnp.asarray(bk, i.dtype)) if causal else k_ref.shape[0] // bk
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, top, total = jax.lax.fori_loop(0, stop, body, init)
    some = total > 0
    o_ref[...] = (acc / jnp.where(some, total, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(some, (top + jnp.log2(jnp.where(some, total, 1.0))) / LOG2E, -jnp.inf)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, causal, key_mask, rate, bq, bk,
                masked):
    q_ids_ref, k_ids_ref, q_hash_ref, k_pos_ref, dk_ref, dv_ref = _row_refs(refs, masked, rate)
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]  # [bk, d]
    k_ids, k_pos = _load(k_ids_ref), _load(k_pos_ref)

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do, q_hash = q_ref[rows, :], do_ref[rows, :], _load(q_hash_ref, rows)
        p = jnp.exp2(_dot(q, k.T) * (scale * LOG2E) - lse_ref[rows][:, None])  # [bq, bk]
        keep = _keep(_load(q_ids_ref, rows), k_ids, i * bq, j * bk, bq, bk, causal, key_mask)
        if keep is not None:
            p = jnp.where(keep, p, 0.0)
        dv = dv + _dot(_dropped(p, q_hash, k_pos, rate).astype(do.dtype).T, do)
        ds = p * (_dropped(_dot(do, v.T), q_hash, k_pos, rate) - delta_ref[rows][:, None])
        return dk + _dot(ds.astype(q.dtype).T, q), dv

    start = jax.lax.div(j * bk, jnp.asarray(bq, j.dtype)) if causal else 0
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(start, q_ref.shape[0] // bq, body, (zeros, zeros))
    dk_ref[...] = dk * scale
    dv_ref[...] = dv


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, causal, key_mask, rate, bq, bk, masked):
    q_ids_ref, k_ids_ref, q_hash_ref, k_pos_ref, dq_ref = _row_refs(refs, masked, rate)
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]  # [bq, d]
    lse, delta = lse_ref[...], delta_ref[...]
    q_ids, q_hash = _load(q_ids_ref), _load(q_hash_ref)

    def body(j, dq):
        keys = pl.ds(j * bk, bk)
        k = k_ref[keys, :]
        p = jnp.exp2(_dot(q, k.T) * (scale * LOG2E) - lse[:, None])
        keep = _keep(q_ids, _load(k_ids_ref, keys), i * bq, j * bk, bq, bk, causal, key_mask)
        if keep is not None:
            p = jnp.where(keep, p, 0.0)
        dp = _dropped(_dot(do, v_ref[keys, :].T), q_hash, _load(k_pos_ref, keys), rate)
        return dq + _dot((p * (dp - delta[:, None])).astype(k.dtype), k)

    stop = jax.lax.div((i + 1) * bq + bk - 1, jnp.asarray(bk, i.dtype)) if causal else k_ref.shape[0] // bk
    dq_ref[...] = jax.lax.fori_loop(0, stop, body, jnp.zeros(q.shape, jnp.float32)) * scale


def _tiled(block: int, d: int | None = None):
    """A BlockSpec of ``block`` rows of one head of ``[B, rows, H(, d)]``, the tile index on grid axis 0."""
    shape = (None, block, None) if d is None else (None, block, None, d)
    return pl.BlockSpec(shape, (lambda t, b, h: (b, t, h)) if d is None else (lambda t, b, h: (b, t, h, 0)))


def _whole(rows: int, d: int | None = None):
    """A BlockSpec of all rows of one head (the loop side)."""
    if d is None:
        return pl.BlockSpec((None, rows, None), lambda t, b, h: (b, 0, h))
    return pl.BlockSpec((None, rows, None, d), lambda t, b, h: (b, 0, h, 0))


def _rows(coords: Coords, mods: Mods):
    """The per-row operands, query side then key side, each ``[B, rows, H]``: the ids of
    ``_coords.row_ids`` (documents, padded keys) and the dropout hashes and key positions of
    ``_coords.dropout_rows``; ``()`` for what a call does not have."""
    pairs = [x for x in (row_ids(coords, mods), dropout_rows(coords, mods)) if x is not None]
    return tuple(jnp.swapaxes(x, 1, 2) for pair in pairs for x in pair)


def _row_specs(operands, query_spec, key_spec):
    """The BlockSpecs of :func:`_rows`' operands: query side, key side, alternating."""
    return [query_spec, key_spec] * (len(operands) // 2)


def tiles_for(m: int, m_k: int, blocks: PallasBlocks):
    """``(forward, dkv, dq)`` tile pairs for ``m`` query and ``m_k`` key rows, or None if any is missing."""
    pairs = ((blocks.block_q, blocks.block_k), (blocks.dkv_block_q, blocks.dkv_block_k),
             (blocks.dq_block_q, blocks.dq_block_k))
    tiles = tuple((tile(m, a), tile(m_k, b)) for a, b in pairs)
    return None if any(t is None for pair in tiles for t in pair) else tiles


@functools.partial(jax.jit, static_argnames=("scale", "mods", "blocks"))
def forward(q, k, v, coords: Coords, *, scale: float, mods: Mods, blocks: PallasBlocks = PallasBlocks()):
    """``(out [B, m, H, d], lse [B, m, H] float32)`` of one block (``tiles_for`` must not be None)."""
    B, m, H, d = q.shape
    m_k = k.shape[1]
    (bq, bk), _, _ = tiles_for(m, m_k, blocks)
    rows = _rows(coords, mods)
    kernel = functools.partial(_forward_kernel, scale=scale, causal=mods.causal, key_mask=mods.key_mask,
                               rate=mods.dropout_rate, bq=bq, bk=bk, masked=mods.documents or mods.key_mask)
    in_specs = [_tiled(bq, d), _whole(m_k, d), _whole(m_k, d)] + _row_specs(rows, _tiled(bq), _whole(m_k))
    return pl.pallas_call(
        kernel, grid=(m // bq, B, H), in_specs=in_specs, out_specs=[_tiled(bq, d), _tiled(bq)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, m, H), jnp.float32)],
        name="dilated_block_forward", **_params(blocks.num_warps, blocks.num_stages))(q, k, v, *rows)


@functools.partial(jax.jit, static_argnames=("scale", "mods", "blocks"))
def backward(q, k, v, out, lse, dout, dlse, coords: Coords, *, scale: float, mods: Mods,
             blocks: PallasBlocks = PallasBlocks()):
    """``(dq, dk, dv)`` float32 of one block from the rows' ``out``, ``lse`` (float32 ``[B, m, H]``)
    and cotangents (``dlse=None``: zero)."""
    B, m, H, d = q.shape
    m_k = k.shape[1]
    _, (kq, kk), (qq, qk) = tiles_for(m, m_k, blocks)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, m, H]
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    lse2 = jnp.where(jnp.isfinite(lse), lse.astype(jnp.float32) * LOG2E, jnp.inf)  # empty rows: P = 0
    rows = _rows(coords, mods)
    operands = (q, k, v, dout.astype(q.dtype), lse2, delta, *rows)
    settings = dict(scale=scale, causal=mods.causal, key_mask=mods.key_mask, rate=mods.dropout_rate,
                    masked=mods.documents or mods.key_mask)
    launch = _params(blocks.bwd_num_warps, blocks.bwd_num_stages)
    f32 = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)  # noqa: E731
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, bq=kq, bk=kk, **settings), grid=(m_k // kk, B, H),
        in_specs=[_whole(m, d), _tiled(kk, d), _tiled(kk, d), _whole(m, d), _whole(m), _whole(m)]
        + _row_specs(rows, _whole(m), _tiled(kk)),
        out_specs=[_tiled(kk, d), _tiled(kk, d)], out_shape=[f32(k), f32(v)],
        name="dilated_block_dkv", **launch)(*operands)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, bq=qq, bk=qk, **settings), grid=(m // qq, B, H),
        in_specs=[_tiled(qq, d), _whole(m_k, d), _whole(m_k, d), _tiled(qq, d), _tiled(qq), _tiled(qq)]
        + _row_specs(rows, _tiled(qq), _whole(m_k)),
        out_specs=_tiled(qq, d), out_shape=f32(q), name="dilated_block_dq", **launch)(*operands)
    return dq, dk, dv
