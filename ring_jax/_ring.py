"""The ring unit: a spanning unit's K/V row blocks passed around its sub-ring, with its own backward.

A segment of a spanning unit lies on ``g`` consecutive devices (``_ring_plan``). Each device keeps
its query rows and passes its selected K/V rows around the sub-ring: ``g - 1`` ``ppermute`` hops,
partial results merged by LSE in float32. Causal: a block from a later device is skipped
(``lax.cond``, no compute), a block from an earlier device needs no mask, only the device's own
block is masked.

The backward (``jax.custom_vjp``) sends K/V around the same sub-ring again, in their own dtype, in
one buffer with the float32 dK/dV accumulators travelling beside them (bf16/fp16 K/V and the
accumulators' bits as unsigned ints: :func:`pack_hop`), and one last hop takes the accumulators home;
every block uses the final global ``(out, lse)``, so no per-hop scores are kept and memory per
device does not grow with the number of devices.

The same hop code runs sharded (``axis_name``: blocks on devices, ``ppermute``) and simulated on
one device (``axis_name=None``: blocks on a leading axis, ``roll``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ring_jax._coords import Coords, Origin, unit_coords
from ring_jax._kernels import BlockSpec
from ring_jax._plan import Unit
from ring_jax._ring_plan import RingUnit
from ring_jax._rows import attend_unit, gather_rows, merge_by_lse, scatter_rows


@dataclasses.dataclass(frozen=True)
class _Hops:
    """Static description of one unit's sub-ring (hashable: a ``custom_vjp`` non-diff argument).

    With ``axis_name`` the ``g`` blocks of a segment live on ``g`` devices of that mesh axis and
    move by ``ppermute``; with ``axis_name=None`` (the simulated ring) they are the leading axis of
    one device's arrays and move by ``roll``."""

    axis_name: Hashable | None
    group: int
    perm: tuple[tuple[int, int], ...]
    q_to_pair: tuple[int, ...]
    spec: BlockSpec
    local_len: int  # L: global positions of one block to the next
    pattern: int = 0


def _position(hops: _Hops):
    """The position ``j`` in the sub-ring of this device (or of each block: ``[g]``)."""
    if hops.axis_name is None:
        return jnp.arange(hops.group)
    return lax.axis_index(hops.axis_name) % hops.group


def _shift(x, hops: _Hops):
    """One hop: every block moves to the next position of its sub-ring."""
    if hops.axis_name is None:
        return jnp.roll(x, 1, axis=0)
    return lax.ppermute(x, hops.axis_name, hops.perm)


def _per_block(f, hops: _Hops):
    return f if hops.axis_name is not None else jax.vmap(f)


def _expand(kv, hops: _Hops):
    """``kv [b, m, 2, pairs, d]`` → ``k, v [b, m, H, d]``: each query head's pair."""
    idx = np.asarray(hops.q_to_pair)
    return jnp.take(kv[:, :, 0], idx, axis=2), jnp.take(kv[:, :, 1], idx, axis=2)


def _at_hop(coords: Coords, hops: _Hops, t, j) -> Coords:
    """Coordinates of the block in hand at hop ``t``: its keys belong to position ``j - t``."""
    return coords.keys_shifted((((j - t) % hops.group) - j) * hops.local_len)


def _mods(hops: _Hops, own: bool):
    """The own block is the only masked one; earlier blocks lie wholly in the past."""
    return hops.spec.mods(hops.pattern, causal=hops.spec.causal and own)


def _attend(q, kv, hops: _Hops, own: bool, coords: Coords):
    o, lse = hops.spec.forward(q, *_expand(kv, hops), _mods(hops, own), coords)
    return o.astype(jnp.promote_types(o.dtype, jnp.float32)), lse


def _block_grads(q, kv, out, lse, dout, dlse, hops: _Hops, own: bool, coords: Coords):
    """float32 ``(dq [b, m, H, d], dkv [b, m, 2, pairs, d])`` of one block, heads summed into pairs."""
    dq, dk, dv = hops.spec.backward(q, *_expand(kv, hops), out, lse, dout, dlse, _mods(hops, own), coords)
    onehot = np.eye(kv.shape[3])[np.asarray(hops.q_to_pair)].astype(dk.dtype)  # [H, pairs]
    return dq, jnp.einsum("bmshd,hp->bmspd", jnp.stack([dk, dv], axis=2), onehot)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def ring_unit_attention(q, kv, hops: _Hops, coords: Coords):
    """``q [b, m, H, d]`` (this device's selected rows), ``kv [b, m, 2, pairs, d]`` → ``(out, lse)``
    over the whole segment, whose ``g`` blocks live on the ``g`` devices of the sub-ring (with
    ``hops.axis_name=None``: all arguments carry a leading block axis ``[g, ...]``). ``coords``:
    those of the rows' own block (keys = queries)."""
    return ring_forward(q, kv, hops, coords)


def ring_forward(q, kv, hops: _Hops, coords: Coords):
    """The ring unit's forward hops (autodiff through them is the reference for the backward)."""
    own = lambda q, kv, c: _attend(q, kv, hops, True, c)  # noqa: E731
    out, lse = _per_block(own, hops)(q, kv, coords)

    def step(t, q, kv, out, lse, coords, j):
        def merge(acc):
            o, l = _attend(q, kv, hops, False, _at_hop(coords, hops, t, j))
            return merge_by_lse([acc[0], o], [acc[1], l])

        # Causal: the block of position j - t < 0 (mod g) lies in the future: skipped, no compute.
        return lax.cond(t <= j, merge, lambda acc: acc, (out, lse)) if hops.spec.causal else merge((out, lse))

    def hop(t, carry):
        kv, out, lse = carry
        kv = _shift(kv, hops)  # now holds the block of position j - t
        out, lse = _per_block(functools.partial(step, t), hops)(q, kv, out, lse, coords, _position(hops))
        return kv, out, lse

    # A loop, not unrolled hops: one hop's blocks are live at a time, whatever g is.
    _, out, lse = lax.fori_loop(1, hops.group, hop, (kv, out, lse))
    return out.astype(q.dtype), lse


def _ring_fwd(q, kv, hops, coords):
    out, lse = ring_forward(q, kv, hops, coords)
    return (out, lse), (q, kv, out, lse, coords)


def _uint(dtype):
    return jnp.dtype(f"uint{8 * jnp.dtype(dtype).itemsize}")


def pack_hop(kv, acc):
    """One backward hop's buffer ``[..., 2 + 2, pairs, d]``-worth: K/V in their own dtype and the
    dK/dV accumulators in theirs, as one array so a hop is one ``ppermute``. Same dtypes: stacked
    on the K/V axis. K/V narrower (bf16/fp16 with float32 accumulators): both bit-cast to unsigned
    ints of K/V's width, the accumulators' bits along the last axis (``[..., 2, pairs, d + d *
    ratio]``): exact, and K/V travel at their own width (12 bytes an element pair for bf16 instead
    of 16 with K/V upcast)."""
    if kv.dtype == acc.dtype:
        return jnp.concatenate([kv, acc], axis=-3)
    u = _uint(kv.dtype)
    bits = lax.bitcast_convert_type(acc, u)  # [..., d, ratio]
    return jnp.concatenate([lax.bitcast_convert_type(kv, u), bits.reshape(*acc.shape[:-1], -1)], axis=-1)


def unpack_hop(buf, kv_dtype, acc_dtype):
    """``(kv, acc)`` of a :func:`pack_hop` buffer."""
    if jnp.dtype(kv_dtype) == jnp.dtype(acc_dtype):
        return buf[..., :2, :, :], buf[..., 2:, :, :]
    ratio = jnp.dtype(acc_dtype).itemsize // jnp.dtype(kv_dtype).itemsize
    d = buf.shape[-1] // (1 + ratio)
    kv = lax.bitcast_convert_type(buf[..., :d], kv_dtype)
    acc = lax.bitcast_convert_type(buf[..., d:].reshape(*buf.shape[:-1], d, ratio), acc_dtype)
    return kv, acc


def _ring_bwd(hops, residuals, cotangents):
    q, kv, out, lse, coords = residuals
    dout, dlse = cotangents
    own = lambda *a: _block_grads(*a[:-1], hops=hops, own=True, coords=a[-1])  # noqa: E731
    dq, dkv_own = _per_block(own, hops)(q, kv, out, lse, dout, dlse, coords)
    acc_dtype = dkv_own.dtype
    # K/V (in their own dtype) and the dK/dV accumulator of the block in hand travel as one buffer
    # (pack_hop): one permute a hop, and no operand XLA could share with the forward's hops, which
    # would keep the whole segment's K/V alive until here.
    buf = pack_hop(kv, jnp.zeros_like(dkv_own))

    def step(t, q, buf, out, lse, dout, dlse, dq, coords, j):
        kv_t, acc = unpack_hop(buf, kv.dtype, acc_dtype)

        def add(a):
            dq_t, dkv_t = _block_grads(q, kv_t, out, lse, dout, dlse, hops, False, _at_hop(coords, hops, t, j))
            return a[0] + dq_t, a[1] + dkv_t

        # Causal: the block of position j - t < 0 (mod g) lies in the future: no compute.
        dq, acc = lax.cond(t <= j, add, lambda a: a, (dq, acc)) if hops.spec.causal else add((dq, acc))
        return pack_hop(kv_t, acc), dq

    def hop(t, carry):
        buf, dq = carry
        buf = _shift(buf, hops)  # the block of position j - t, with its dK/dV so far
        return _per_block(functools.partial(step, t), hops)(q, buf, out, lse, dout, dlse, dq, coords,
                                                            _position(hops))

    if hops.group > 1:
        buf, dq = lax.fori_loop(1, hops.group, hop, (buf, dq))
        dkv_own = dkv_own + _shift(unpack_hop(buf, kv.dtype, acc_dtype)[1], hops)  # dK/dV home to their owner
    return dq.astype(q.dtype), dkv_own.astype(kv.dtype), None


ring_unit_attention.defvjp(_ring_fwd, _ring_bwd)


def _pairs_unit(ru: RingUnit, unit: Unit) -> Unit:
    """``unit`` with the distinct (kv head, offset) pairs in place of its heads: gathers K/V once."""
    return dataclasses.replace(unit, heads=ru.pair_heads, kv_heads=ru.pair_heads, offsets=ru.pair_offsets)


def _hops(ru: RingUnit, axis_name, num_devices, spec: BlockSpec) -> _Hops:
    return _Hops(axis_name, ru.group, ru.perm(num_devices) if axis_name is not None else (), ru.q_to_pair, spec,
                 ru.local.w, ru.unit.pattern)


def attend_sharded_unit(query, key, value, ru: RingUnit, axis_name, num_devices, spec: BlockSpec, origin: Origin):
    """A unit on this device's shard ``[b, L, ...]``: local, or over its sub-ring of devices;
    ``(out [b, L, H, d], lse [b, L, H])``."""
    if ru.group == 1:
        return attend_unit(query, key, value, ru.unit, spec, origin)
    b, L = query.shape[:2]
    pairs = _pairs_unit(ru, ru.local)
    k = gather_rows(key, pairs, ru.pair_heads)  # [b, L/r, pairs, d]
    v = gather_rows(value, pairs, ru.pair_heads)
    q = gather_rows(query, ru.local, ru.unit.heads)  # [b, L/r, H, d]
    coords = unit_coords(origin, b, 1, L, ru.unit.r, ru.unit.heads, ru.unit.offsets)
    o, lse = ring_unit_attention(q, jnp.stack([k, v], axis=2), _hops(ru, axis_name, num_devices, spec), coords)
    return scatter_rows(o, ru.local, L, 0.0), scatter_rows(lse, ru.local, L, -jnp.inf)


def attend_simulated_unit(query, key, value, ru: RingUnit, spec: BlockSpec, origin: Origin):
    """A unit on the whole sequence of one device, spanning units cut into ``g`` ring blocks."""
    if ru.group == 1:
        return attend_unit(query, key, value, ru.unit, spec, origin)
    (b, n), g, u = query.shape[:2], ru.group, ru.unit

    def blocks(x):  # [b*S, m, ...] -> [g, b*S, m/g, ...]: block j = the rows of ring position j
        return jnp.moveaxis(x.reshape(x.shape[0], g, x.shape[1] // g, *x.shape[2:]), 1, 0)

    def unblock(x):  # inverse of blocks
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape(x.shape[0], -1, *x.shape[3:])

    pairs = _pairs_unit(ru, ru.unit)
    kv = jnp.stack([gather_rows(key, pairs, ru.pair_heads), gather_rows(value, pairs, ru.pair_heads)], axis=2)
    q = gather_rows(query, ru.unit, ru.unit.heads)  # [b*S, m, H, d]
    c = unit_coords(origin, b, n // u.w, u.w, u.r, u.heads, u.offsets)
    qpos = jnp.moveaxis(blocks(jnp.moveaxis(c.qpos, 2, 1)), 2, 3)  # [B, H, m] -> [g, B, H, m/g]
    tile = lambda x: None if x is None else jnp.broadcast_to(x, (g, *jnp.shape(x)))  # noqa: E731
    coords = Coords(tile(c.seed), tile(c.batch), tile(c.heads), qpos, qpos, tile(c.klen))
    o, lse = ring_unit_attention(blocks(q), blocks(kv), _hops(ru, None, g, spec), coords)
    return scatter_rows(unblock(o), ru.unit, n, 0.0), scatter_rows(unblock(lse), ru.unit, n, -jnp.inf)
