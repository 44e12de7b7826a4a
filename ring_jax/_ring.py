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
from ring_jax._layout import from_balanced, to_balanced
from ring_jax._plan import Unit
from ring_jax._ring_plan import CONTIGUOUS, HopCalls, RingUnit, Slots
from ring_jax._rows import attend_unit, gather_rows, merge_by_lse, scatter_rows


@dataclasses.dataclass(frozen=True)
class _Hops:
    """Static description of one unit's sub-ring (hashable: a ``custom_vjp`` non-diff argument).

    With ``axis_name`` the ``group`` devices of a sub-ring are devices of that mesh axis and
    blocks move by ``ppermute``; with ``axis_name=None`` (the simulated ring) they are the
    leading axis of one device's arrays and move by ``roll``."""

    axis_name: Hashable | None
    group: int
    perm: tuple[tuple[int, int], ...]
    q_to_pair: tuple[int, ...]
    spec: BlockSpec
    chunk_len: int  # global positions from one device's chunk to the next device's
    pattern: int = 0
    calls: HopCalls = CONTIGUOUS
    directions: tuple[int, ...] = (1,)  # per chunk: +1 / -1 as its global index rises / falls with the device
    home: tuple[tuple[int, int], ...] = ()  # the backward's last hop (``RingUnit.home_perm``)
    last_group: int = 0  # devices of the last sub-ring when its segment is partial (0: all full)
    num_devices: int = 0


def _position(hops: _Hops):
    """The position ``j`` in the sub-ring of this device (or of each block: ``[g]``)."""
    if hops.axis_name is None:
        return jnp.arange(hops.group)
    return lax.axis_index(hops.axis_name) % hops.group


def _size(hops: _Hops):
    """The size of this device's sub-ring: ``group``, or ``last_group`` on the partial last one."""
    if not hops.last_group:
        return hops.group
    last = lax.axis_index(hops.axis_name) // hops.group == hops.num_devices // hops.group
    return jnp.where(last, hops.last_group, hops.group)


def _shift(x, hops: _Hops, perm=None):
    """One hop: every block moves to the next position of its sub-ring (or along ``perm``)."""
    if hops.axis_name is None:
        return jnp.roll(x, 1, axis=0)
    return lax.ppermute(x, hops.axis_name, hops.perm if perm is None else perm)


def _per_block(f, hops: _Hops):
    return f if hops.axis_name is not None else jax.vmap(f)


def _rows(x, slots: Slots):
    """``[b, k, m, ...]`` → ``[b, s*m, ...]``: the rows of chunks ``[lo, hi)``, in order."""
    lo, hi = slots
    x = x if (lo, hi) == (0, x.shape[1]) else x[:, lo:hi]
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _chunks(x, slots: Slots):
    """Inverse of :func:`_rows`: ``[b, s*m, ...]`` → ``[b, s, m, ...]``."""
    return x.reshape(x.shape[0], slots[1] - slots[0], -1, *x.shape[2:])


def _put(acc, slots: Slots, y, add: bool = False):
    """``acc [b, k, ...]`` with chunks ``[lo, hi)`` replaced by (or, ``add``, increased by) ``y``."""
    lo, hi = slots
    if (lo, hi) == (0, acc.shape[1]):
        return acc + y if add else y
    return acc.at[:, lo:hi].add(y) if add else acc.at[:, lo:hi].set(y)


def _shifts(hops: _Hops, t, j):
    """Global position shift of each chunk of the block in hand at hop ``t``: it came from
    position ``j - t`` (mod the sub-ring's size)."""
    return jnp.asarray(hops.directions) * ((((j - t) % _size(hops)) - j) * hops.chunk_len)


def _hop_cond(hops: _Hops, t, j, calls_fn, acc):
    """``acc`` after hop ``t``'s blocks at position ``j`` (``calls_fn(calls)(acc)``): causal, the
    ``early`` or ``late`` blocks; otherwise the ``same`` ones; none on a partial last sub-ring
    once its blocks have all come by (``t >= last_group``)."""
    if hops.spec.causal:
        acc_fn = lambda a: lax.cond(t <= j, calls_fn(hops.calls.early), calls_fn(hops.calls.late), a)  # noqa: E731
    else:
        acc_fn = calls_fn(hops.calls.same)
    if not hops.last_group:
        return acc_fn(acc)
    return lax.cond(t < _size(hops), acc_fn, lambda a: a, acc)


def _call_coords(coords: Coords, qs: Slots, ks: Slots, shifts) -> Coords:
    """The kernel's coordinates of the block (query chunks ``qs``, key chunks ``ks`` shifted by
    ``shifts``, None for the own rows) from the own rows' ``qpos [b, k, H, m]``."""
    def flat(p, slots):  # [b, k, H, m] -> [b, H, s*m]
        p = p[:, slots[0]:slots[1]]
        return jnp.moveaxis(p, 1, 2).reshape(p.shape[0], p.shape[2], -1)

    kpos = coords.qpos if shifts is None else coords.qpos + shifts[None, :, None, None]
    return coords._replace(qpos=flat(coords.qpos, qs), kpos=flat(kpos, ks))


def _expand(kv, hops: _Hops):
    """``kv [b, m, 2, pairs, d]`` → ``k, v [b, m, H, d]``: each query head's pair."""
    idx = np.asarray(hops.q_to_pair)
    return jnp.take(kv[:, :, 0], idx, axis=2), jnp.take(kv[:, :, 1], idx, axis=2)


def _mods(hops: _Hops, own: bool):
    """The own rows are the only masked block; other blocks lie wholly in the past."""
    return hops.spec.mods(hops.pattern, causal=hops.spec.causal and own)


def _attend(q, kv, hops: _Hops, own: bool, coords: Coords):
    o, lse = hops.spec.forward(q, *_expand(kv, hops), _mods(hops, own), coords)
    return o.astype(jnp.promote_types(o.dtype, jnp.float32)), lse


def _attend_calls(calls, q, kv, acc, hops: _Hops, coords: Coords, shifts):
    """The blocks ``calls`` of ``q [b, k, m, H, d]`` over ``kv [b, k, m, 2, pairs, d]`` merged into
    ``acc = (out, lse)`` by LSE; ``shifts=None``: the own rows (``acc`` None), each query chunk set once."""
    out, lse = acc if acc is not None else (None, None)
    pieces = []
    for qs, ks in calls:
        o, l = _attend(_rows(q, qs), _rows(kv, ks), hops, shifts is None, _call_coords(coords, qs, ks, shifts))
        if shifts is None:
            pieces.append((_chunks(o, qs), _chunks(l, qs)))
            continue
        o, l = merge_by_lse([_rows(out, qs), o], [_rows(lse, qs), l])
        out, lse = _put(out, qs, _chunks(o, qs)), _put(lse, qs, _chunks(l, qs))
    if shifts is None:
        return tuple(jnp.concatenate(x, axis=1) if len(x) > 1 else x[0] for x in zip(*pieces))
    return out, lse


def _block_grads(q, kv, out, lse, dout, dlse, hops: _Hops, own: bool, coords: Coords):
    """float32 ``(dq [b, m, H, d], dkv [b, m_k, 2, pairs, d])`` of one block, heads summed into pairs."""
    dq, dk, dv = hops.spec.backward(q, *_expand(kv, hops), out, lse, dout, dlse, _mods(hops, own), coords)
    onehot = np.eye(kv.shape[3])[np.asarray(hops.q_to_pair)].astype(dk.dtype)  # [H, pairs]
    return dq, jnp.einsum("bmshd,hp->bmspd", jnp.stack([dk, dv], axis=2), onehot)


def _grad_calls(calls, q, kv, res, grads, hops: _Hops, coords: Coords, shifts):
    """The blocks ``calls``' gradients added into ``grads = (dq [b, k, m, H, d], dkv [b, k, m, 2,
    pairs, d])``; ``res = (out, lse, dout, dlse)`` of the own rows; ``shifts=None``: the own rows."""
    dq, dkv = grads
    for qs, ks in calls:
        dq_t, dkv_t = _block_grads(_rows(q, qs), _rows(kv, ks), *(_rows(x, qs) for x in res), hops,
                                   shifts is None, _call_coords(coords, qs, ks, shifts))
        dq, dkv = _put(dq, qs, _chunks(dq_t, qs), add=True), _put(dkv, ks, _chunks(dkv_t, ks), add=True)
    return dq, dkv


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def ring_unit_attention(q, kv, hops: _Hops, coords: Coords):
    """``q [b, k, m, H, d]`` (this device's selected rows in its ``k`` chunks), ``kv [b, k, m, 2,
    pairs, d]`` → ``(out, lse)`` over the whole segment(s), whose chunks live on the devices of the
    sub-ring (with ``hops.axis_name=None``: all arguments carry a leading block axis ``[g, ...]``).
    ``coords``: those of the own rows, ``qpos [b, k, H, m]`` (keys = queries)."""
    return ring_forward(q, kv, hops, coords)


def ring_forward(q, kv, hops: _Hops, coords: Coords):
    """The ring unit's forward hops (autodiff through them is the reference for the backward)."""
    own = lambda q, kv, c: _attend_calls(hops.calls.same, q, kv, None, hops, c, None)  # noqa: E731
    out, lse = _per_block(own, hops)(q, kv, coords)

    def step(t, q, kv, out, lse, coords, j):
        def run(calls):
            return lambda acc: _attend_calls(calls, q, kv, acc, hops, coords, _shifts(hops, t, j))

        # Causal: keys from an earlier position (t <= j) or a later one (mod g); contiguous: a later
        # position's block lies in the future, no compute.
        return _hop_cond(hops, t, j, run, (out, lse))

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
    res = (out, lse, dout, dlse)
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)

    def own(q, kv, res, c):
        zeros = (jnp.zeros(q.shape, acc_dtype), jnp.zeros(kv.shape, acc_dtype))
        return _grad_calls(hops.calls.same, q, kv, res, zeros, hops, c, None)

    dq, dkv_own = _per_block(own, hops)(q, kv, res, coords)
    # K/V (in their own dtype) and the dK/dV accumulator of the block in hand travel as one buffer
    # (pack_hop): one permute a hop, and no operand XLA could share with the forward's hops, which
    # would keep the whole segment's K/V alive until here.
    buf = pack_hop(kv, jnp.zeros_like(dkv_own))

    def step(t, q, buf, res, dq, coords, j):
        kv_t, acc = unpack_hop(buf, kv.dtype, acc_dtype)

        def run(calls):
            return lambda g: _grad_calls(calls, q, kv_t, res, g, hops, coords, _shifts(hops, t, j))

        dq, acc = _hop_cond(hops, t, j, run, (dq, acc))  # the forward's blocks
        return pack_hop(kv_t, acc), dq

    def hop(t, carry):
        buf, dq = carry
        buf = _shift(buf, hops)  # the block of position j - t, with its dK/dV so far
        return _per_block(functools.partial(step, t), hops)(q, buf, res, dq, coords, _position(hops))

    if hops.group > 1:
        buf, dq = lax.fori_loop(1, hops.group, hop, (buf, dq))
        home = _shift(unpack_hop(buf, kv.dtype, acc_dtype)[1], hops, hops.home or None)
        dkv_own = dkv_own + home  # dK/dV home to their owner
    return dq.astype(q.dtype), dkv_own.astype(kv.dtype), None


ring_unit_attention.defvjp(_ring_fwd, _ring_bwd)


def _pairs_unit(ru: RingUnit, unit: Unit) -> Unit:
    """``unit`` with the distinct (kv head, offset) pairs in place of its heads: gathers K/V once."""
    return dataclasses.replace(unit, heads=ru.pair_heads, kv_heads=ru.pair_heads, offsets=ru.pair_offsets)


def _hops(ru: RingUnit, axis_name, num_devices, spec: BlockSpec) -> _Hops:
    sharded = axis_name is not None
    return _Hops(axis_name, ru.group, ru.perm(num_devices) if sharded else (), ru.q_to_pair, spec,
                 ru.local.w, ru.unit.pattern, ru.calls, ru.directions, ru.home_perm(num_devices) if sharded else (),
                 ru.last_group, num_devices)


def attend_sharded_unit(query, key, value, ru: RingUnit, axis_name, num_devices, spec: BlockSpec, origin: Origin):
    """A unit on this device's shard ``[b, L, ...]`` (``ru.slots`` chunks of ``c = L / slots``
    rows): local, or over its sub-ring of devices; ``(out [b, L, H, d], lse [b, L, H])``."""
    if ru.group == 1:
        return attend_unit(query, key, value, ru.unit, spec, origin)
    (b, L), k = query.shape[:2], ru.slots
    chunks = lambda x: x.reshape(b * k, L // k, *x.shape[2:])  # noqa: E731  # [b*k, c, ...]
    by_chunk = lambda x: x.reshape(b, k, *x.shape[1:])  # noqa: E731  # [b*k, ...] -> [b, k, ...]
    pairs = _pairs_unit(ru, ru.local)
    kv = jnp.stack([gather_rows(chunks(x), pairs, ru.pair_heads) for x in (key, value)], axis=2)  # [b*k, m, 2, p, d]
    q = gather_rows(chunks(query), ru.local, ru.unit.heads)  # [b*k, m, H, d]
    c = unit_coords(origin, b, k, L // k, ru.unit.r, ru.unit.heads, ru.unit.offsets)  # qpos [b*k, H, m]
    first = lambda x: None if x is None else by_chunk(x)[:, 0]  # noqa: E731
    coords = Coords(c.seed, first(c.batch), c.heads, by_chunk(c.qpos), by_chunk(c.qpos), first(c.klen), c.docs)
    o, lse = ring_unit_attention(by_chunk(q), by_chunk(kv), _hops(ru, axis_name, num_devices, spec), coords)
    o, lse = o.reshape(b * k, *o.shape[2:]), lse.reshape(b * k, *lse.shape[2:])
    unchunk = lambda x: x.reshape(b, L, *x.shape[2:])  # noqa: E731
    return unchunk(scatter_rows(o, ru.local, L // k, 0.0)), unchunk(scatter_rows(lse, ru.local, L // k, -jnp.inf))


def _attend_simulated_balanced(query, key, value, ru: RingUnit, spec: BlockSpec, origin: Origin, P: int):
    """A spanning unit of the balanced layout on one device: the natural-order sequence put in
    balanced order, the ``P`` simulated devices' chunks ``[G, b * P/G, 2, m, ...]`` (sub-rings in
    the batch), the hops, and the rows scattered back in natural order."""
    (b, N), G, u = query.shape[:2], ru.group, ru.unit
    C, S = N // (2 * P), P // G

    def blocks(x):  # natural [b, N, ...] -> [G, b*S, 2, C, ...]: device s*G + a at [a, b*S + s]
        x = to_balanced(x, P).reshape(b, S, G, 2, C, *x.shape[2:])
        return jnp.moveaxis(x, 2, 0).reshape(G, b * S, 2, C, *x.shape[5:])

    def natural(y, fill):  # [G, b*S, 2, m, ...] rows -> natural [b, N, ...]
        y = jnp.moveaxis(y.reshape(G, b, S, *y.shape[2:]), 0, 2).reshape(b * 2 * P, *y.shape[3:])
        return from_balanced(scatter_rows(y, ru.local, C, fill).reshape(b, N, *y.shape[2:]), P)

    def rows(x, unit, heads):  # [G, B, 2, C, hx, d] -> [G, B, 2, m, H, d]
        return gather_rows(x.reshape(-1, *x.shape[3:]), unit, heads).reshape(*x.shape[:3], C // u.r, len(heads), -1)

    pairs = _pairs_unit(ru, ru.local)
    kv = jnp.stack([rows(blocks(x), pairs, ru.pair_heads) for x in (key, value)], axis=4)  # [G, B, 2, m, 2, p, d]
    q = rows(blocks(query), ru.local, u.heads)
    j = jnp.arange(S)[None, :] * G + jnp.arange(G)[:, None]  # [G, S]: the simulated device
    base = origin.pos_base + jnp.stack([j * C, (2 * P - 1 - j) * C], axis=-1)  # [G, S, 2]
    within = jnp.arange(C // u.r)[None, :] * u.r + jnp.asarray(u.offsets)[:, None]  # [H, m]
    qpos = jnp.broadcast_to(base[:, None, :, :, None, None] + within, (G, b, S, 2, *within.shape))
    qpos = qpos.reshape(G, b * S, 2, *within.shape)  # [G, b*S, 2, H, m]
    batch = origin.batch_base + jnp.repeat(jnp.arange(b), S)  # [b*S]
    klen = None if origin.lengths is None else origin.lengths[batch]
    tile = lambda x: None if x is None else jnp.broadcast_to(x, (G, *jnp.shape(x)))  # noqa: E731
    coords = Coords(tile(origin.seed), tile(batch), tile(jnp.asarray(u.heads)), qpos, qpos, tile(klen),
                    tile(origin.docs))
    o, lse = ring_unit_attention(q, kv, _hops(ru, None, G, spec), coords)
    return natural(o, 0.0), natural(lse, -jnp.inf)


def attend_simulated_unit(query, key, value, ru: RingUnit, spec: BlockSpec, origin: Origin, num_devices: int = 1):
    """A unit on the whole sequence of one device, spanning units cut into ``g`` ring blocks (the
    balanced layout's: ``num_devices`` devices of two chunks)."""
    if ru.group == 1:
        return attend_unit(query, key, value, ru.unit, spec, origin)
    if ru.slots == 2:
        return _attend_simulated_balanced(query, key, value, ru, spec, origin, num_devices)
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
    qpos = jnp.moveaxis(blocks(jnp.moveaxis(c.qpos, 2, 1)), 2, 3)[:, :, None]  # [B, H, m] -> [g, B, 1, H, m/g]
    tile = lambda x: None if x is None else jnp.broadcast_to(x, (g, *jnp.shape(x)))  # noqa: E731
    coords = Coords(tile(c.seed), tile(c.batch), tile(c.heads), qpos, qpos, tile(c.klen), tile(c.docs))
    one = lambda x: blocks(x)[:, :, None]  # noqa: E731  # one chunk per block: [g, B, 1, m/g, ...]
    o, lse = ring_unit_attention(one(q), one(kv), _hops(ru, None, g, spec), coords)
    return scatter_rows(unblock(o[:, :, 0]), ru.unit, n, 0.0), scatter_rows(unblock(lse[:, :, 0]), ru.unit, n, -jnp.inf)
