"""Ring dilated attention: the sequence sharded over a mesh axis, K/V blocks passed around sub-rings.

Per unit (one pattern over some heads), with ``L`` the local length and ``w`` the effective
segment length:

* ``w <= L``: each segment lies on one device, so the unit is computed locally, no communication;
* ``w > L``: a segment spans ``g = w / L`` consecutive devices. Each device sends only its selected
  (strided) K/V rows, one row block per *distinct* (kv head, offset) pair the unit needs, around the
  sub-ring of its ``g`` devices: ``g - 1`` ``ppermute`` hops, partial results merged by LSE in
  float32. Causal: a block from a later device is skipped (``lax.cond``, no compute), a block from an
  earlier device needs no mask, only the device's own block is masked.

The backward (``jax.custom_vjp``) sends K/V around the same sub-ring again, in one buffer with the
float32 dK/dV accumulators travelling beside them, and one last hop takes the accumulators home; every block uses the final global
``(out, lse)`` (``block_attention_bwd``), so no per-hop scores are kept and memory per device does
not grow with the number of devices.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ring_jax._config import DilatedConfig, check_inputs
from ring_jax._dropout import Dropout, DropoutArgs, as_seed, make_dropout
from ring_jax._dilated import attend_unit, gather_rows, merge_by_lse, run_layers, scatter_rows
from ring_jax._kernels import block_attention_bwd, block_attention_fwd
from ring_jax._plan import PLAN_CACHE_SIZE, Unit, get_plan


@dataclasses.dataclass(frozen=True)
class RingUnit:
    """A unit as one device sees it: ``local`` is the unit restricted to the ``L`` local rows."""

    unit: Unit
    local: Unit  # w = min(unit.w, L): the local view, for gathers and scatters
    group: int  # g: devices one segment spans; 1 means no communication
    pair_heads: tuple[int, ...]  # kv head of each distinct (kv head, offset) pair on the wire
    pair_offsets: tuple[int, ...]
    q_to_pair: tuple[int, ...]  # the pair each query head of the unit reads

    def perm(self, num_devices: int) -> tuple[tuple[int, int], ...]:
        """``ppermute`` pairs: each device sends to the next one of its sub-ring."""
        g = self.group
        return tuple((s + j, s + (j + 1) % g) for s in range(0, num_devices, g) for j in range(g))

    def hop_bytes(self, batch: int, head_dim: int, itemsize: int) -> int:
        """Bytes of one forward hop: K and V, ``L / r`` rows of each distinct pair. A backward hop
        carries K, V, dK, dV in the accumulator dtype (the last one dK, dV only)."""
        return 2 * batch * self.local.m * len(self.pair_heads) * head_dim * itemsize


@dataclasses.dataclass(frozen=True)
class RingPlan:
    local_len: int
    num_devices: int
    layers: tuple[tuple[RingUnit, ...], ...]

    @property
    def units(self) -> tuple[RingUnit, ...]:
        return tuple(ru for layer in self.layers for ru in layer)

    def num_permutes(self, with_backward: bool = False) -> int:
        """``sum (g - 1)`` over spanning units; the backward adds ``g`` per unit: ``g - 1`` hops of
        K/V with their dK/dV accumulators, and one hop that takes the accumulators home."""
        return sum(ru.group - 1 + (ru.group if with_backward else 0) for ru in self.units if ru.group > 1)


def get_ring_plan(config: DilatedConfig, local_len: int, num_devices: int, num_heads: int,
                  num_kv_heads: int) -> RingPlan:
    """The memoised ring plan; ``ValueError`` naming pattern, L and P for invalid shardings."""
    plan = get_plan(config, local_len * num_devices, num_heads, num_kv_heads)
    return _build_ring_plan(plan, local_len, num_devices)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _build_ring_plan(plan, local_len, num_devices) -> RingPlan:
    L, P = local_len, num_devices
    layers = []
    for layer in plan.layers:
        units = []
        for u in layer.units:
            where = f"pattern {u.pattern} (w={u.w}, r={u.r}) with local length L={L} on P={P} devices"
            if u.w <= L:
                if L % u.w:
                    raise ValueError(f"{where}: L is not a multiple of w")
                units.append(RingUnit(u, u, 1, (), (), ()))
                continue
            if u.w % L:
                raise ValueError(f"{where}: w is not a multiple of L")
            if L % u.r:
                raise ValueError(f"{where}: L is not a multiple of r")
            pairs = sorted(set(zip(u.kv_heads, u.offsets)))
            q_to_pair = tuple(pairs.index(p) for p in zip(u.kv_heads, u.offsets))
            local = dataclasses.replace(u, w=L)
            units.append(RingUnit(u, local, u.w // L, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs),
                                  q_to_pair))
        layers.append(tuple(units))
    return RingPlan(L, P, tuple(layers))


@dataclasses.dataclass(frozen=True)
class _Hops:
    """Static description of one unit's sub-ring (hashable: a ``custom_vjp`` non-diff argument).

    With ``axis_name`` the ``g`` blocks of a segment live on ``g`` devices of that mesh axis and
    move by ``ppermute``; with ``axis_name=None`` (the simulated ring) they are the leading axis of
    one device's arrays and move by ``roll``. The hop logic is the same code for both."""

    axis_name: Hashable | None
    group: int
    perm: tuple[tuple[int, int], ...]
    q_to_pair: tuple[int, ...]
    causal: bool
    scale: float
    local_len: int  # L: global positions of one block to the next
    pattern: int = 0  # for the dropout hash
    rate: float = 0.0  # dropout


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


def _at_hop(drop: DropoutArgs | None, hops: _Hops, t, j):
    """Dropout args of the block in hand at hop ``t``: its keys belong to position ``j - t``."""
    if drop is None:
        return None
    return drop._replace(kpos=drop.qpos + (((j - t) % hops.group) - j) * hops.local_len)


def _attend(q, kv, hops: _Hops, causal: bool, drop: DropoutArgs | None):
    o, lse = block_attention_fwd(q, *_expand(kv, hops), causal, hops.scale, hops.rate, hops.pattern, drop)
    return o.astype(jnp.promote_types(o.dtype, jnp.float32)), lse


def _block_grads(q, kv, out, lse, dout, dlse, hops: _Hops, causal: bool, drop: DropoutArgs | None):
    """float32 ``(dq [b, m, H, d], dkv [b, m, 2, pairs, d])`` of one block, heads summed into pairs."""
    dq, dk, dv = block_attention_bwd(q, *_expand(kv, hops), out, lse, dout, dlse, causal=causal,
                                     scale=hops.scale, keep_acc_dtype=True, rate=hops.rate,
                                     pattern=hops.pattern, drop=drop)
    onehot = np.eye(kv.shape[3])[np.asarray(hops.q_to_pair)].astype(dk.dtype)  # [H, pairs]
    return dq, jnp.einsum("bmshd,hp->bmspd", jnp.stack([dk, dv], axis=2), onehot)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def ring_unit_attention(q, kv, hops: _Hops, drop: DropoutArgs | None = None):
    """``q [b, m, H, d]`` (this device's selected rows), ``kv [b, m, 2, pairs, d]`` → ``(out, lse)``
    over the whole segment, whose ``g`` blocks live on the ``g`` devices of the sub-ring (with
    ``hops.axis_name=None``: all arguments carry a leading block axis ``[g, ...]``). ``drop``: the
    dropout args of the rows' own block (``kpos = qpos``)."""
    return _ring_forward(q, kv, hops, drop)


def _ring_forward(q, kv, hops: _Hops, drop=None):
    own = lambda q, kv, drop: _attend(q, kv, hops, hops.causal, drop)  # noqa: E731
    out, lse = _per_block(own, hops)(q, kv, drop)  # own block: the only masked one

    def step(t, q, kv, out, lse, drop, j):
        def merge(acc):
            o, l = _attend(q, kv, hops, False, _at_hop(drop, hops, t, j))
            return merge_by_lse([acc[0], o], [acc[1], l])

        # Causal: the block of position j - t < 0 (mod g) lies in the future: skipped, no compute.
        return lax.cond(t <= j, merge, lambda acc: acc, (out, lse)) if hops.causal else merge((out, lse))

    def hop(t, carry):
        kv, out, lse = carry
        kv = _shift(kv, hops)  # now holds the block of position j - t
        out, lse = _per_block(functools.partial(step, t), hops)(q, kv, out, lse, drop, _position(hops))
        return kv, out, lse

    # A loop, not unrolled hops: one hop's blocks are live at a time, whatever g is.
    _, out, lse = lax.fori_loop(1, hops.group, hop, (kv, out, lse))
    return out.astype(q.dtype), lse


def _ring_fwd(q, kv, hops, drop=None):
    out, lse = _ring_forward(q, kv, hops, drop)
    return (out, lse), (q, kv, out, lse, drop)


def _ring_bwd(hops, residuals, cotangents):
    q, kv, out, lse, drop = residuals
    dout, dlse = cotangents
    grads = functools.partial(_block_grads, hops=hops)
    own = lambda *a: grads(*a[:-1], causal=hops.causal, drop=a[-1])  # noqa: E731
    dq, dkv_own = _per_block(own, hops)(q, kv, out, lse, dout, dlse, drop)
    # K, V and the dK/dV accumulator of the block in hand travel as one buffer [b, m, 4, pairs, d]
    # (K/V upcast to the accumulator dtype, exactly): one permute a hop, and no operand XLA could
    # share with the forward's hops, which would keep the whole segment's K/V alive until here.
    buf = jnp.concatenate([kv.astype(dkv_own.dtype), jnp.zeros_like(dkv_own)], axis=-3)

    def step(t, q, buf, out, lse, dout, dlse, dq, drop, j):
        def add(acc):
            dq_t, dkv_t = grads(q, buf[:, :, :2].astype(kv.dtype), out, lse, dout, dlse, causal=False,
                                drop=_at_hop(drop, hops, t, j))
            return acc[0] + dq_t, acc[1] + dkv_t

        # Causal: the block of position j - t < 0 (mod g) lies in the future: no compute.
        dq, acc = lax.cond(t <= j, add, lambda acc: acc, (dq, buf[:, :, 2:])) if hops.causal else add((dq, buf[:, :, 2:]))
        return jnp.concatenate([buf[:, :, :2], acc], axis=2), dq

    def hop(t, carry):
        buf, dq = carry
        buf = _shift(buf, hops)  # the block of position j - t, with its dK/dV so far
        return _per_block(functools.partial(step, t), hops)(q, buf, out, lse, dout, dlse, dq, drop, _position(hops))

    if hops.group > 1:
        buf, dq = lax.fori_loop(1, hops.group, hop, (buf, dq))
        dkv_own = dkv_own + _shift(buf[..., 2:, :, :], hops)  # dK/dV home to their owner
    return dq.astype(q.dtype), dkv_own.astype(kv.dtype), None


ring_unit_attention.defvjp(_ring_fwd, _ring_bwd)


def _pairs_unit(ru: RingUnit, unit: Unit) -> Unit:
    """``unit`` with the distinct (kv head, offset) pairs in place of its heads: gathers K/V once."""
    return dataclasses.replace(unit, heads=ru.pair_heads, kv_heads=ru.pair_heads, offsets=ru.pair_offsets)


def _hops(ru: RingUnit, axis_name, num_devices, causal, scale, dropout: Dropout | None) -> _Hops:
    return _Hops(axis_name, ru.group, ru.perm(num_devices) if axis_name is not None else (), ru.q_to_pair, causal,
                 scale, ru.local.w, ru.unit.pattern, 0.0 if dropout is None else dropout.rate)


def _attend_ring_unit(query, key, value, ru: RingUnit, axis_name, num_devices, causal, scale, dropout):
    """A unit on this device's shard: local, or over its sub-ring of devices."""
    if ru.group == 1:
        return attend_unit(query, key, value, ru.unit, causal, scale, dropout)
    b, L = query.shape[:2]
    pairs = _pairs_unit(ru, ru.local)
    k = gather_rows(key, pairs, ru.pair_heads)  # [b, L/r, pairs, d]
    v = gather_rows(value, pairs, ru.pair_heads)
    q = gather_rows(query, ru.local, ru.unit.heads)  # [b, L/r, H, d]
    hops = _hops(ru, axis_name, num_devices, causal, scale, dropout)
    drop = None if dropout is None else dropout.block_args(b, 1, L, ru.unit.r, ru.unit.heads, ru.unit.offsets)
    o, lse = ring_unit_attention(q, jnp.stack([k, v], axis=2), hops, drop)  # kv: [b, L/r, 2, pairs, d]
    return scatter_rows(o, ru.local, L, 0.0), scatter_rows(lse, ru.local, L, -jnp.inf)


def _attend_simulated_unit(query, key, value, ru: RingUnit, causal, scale, dropout):
    """A unit on the whole sequence of one device, spanning units cut into ``g`` ring blocks."""
    if ru.group == 1:
        return attend_unit(query, key, value, ru.unit, causal, scale, dropout)
    (b, n), g, u = query.shape[:2], ru.group, ru.unit

    def blocks(x):  # [b*S, m, ...] -> [g, b*S, m/g, ...]: block j = the rows of ring position j
        return jnp.moveaxis(x.reshape(x.shape[0], g, x.shape[1] // g, *x.shape[2:]), 1, 0)

    def unblock(x):  # inverse of blocks
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape(x.shape[0], -1, *x.shape[3:])

    pairs = _pairs_unit(ru, ru.unit)
    kv = jnp.stack([gather_rows(key, pairs, ru.pair_heads), gather_rows(value, pairs, ru.pair_heads)], axis=2)
    q = gather_rows(query, ru.unit, ru.unit.heads)  # [b*S, m, H, d]
    hops = _hops(ru, None, g, causal, scale, dropout)
    drop = None
    if dropout is not None:  # positions [B, H, m] -> [g, B, H, m/g]; the rest repeated per block
        args = dropout.block_args(b, n // u.w, u.w, u.r, u.heads, u.offsets)
        qpos = jnp.moveaxis(blocks(jnp.moveaxis(args.qpos, 2, 1)), 2, 3)
        drop = args._replace(**{f: jnp.broadcast_to(getattr(args, f), (g, *jnp.shape(getattr(args, f))))
                                for f in ("seed", "batch", "heads")}, qpos=qpos, kpos=qpos)
    o, lse = ring_unit_attention(blocks(q), blocks(kv), hops, drop)
    return scatter_rows(unblock(o), ru.unit, n, 0.0), scatter_rows(unblock(lse), ru.unit, n, -jnp.inf)


def ring_dilated_attention(query, key, value, *, axis_name, segment_lengths, dilation_rates,
                           mix="head_groups", is_causal=False, softmax_scale=None, return_lse=False,
                           dropout_rate=0.0, dropout_seed=None, batch_axis=None):
    """Dilated attention over a sequence sharded along ``axis_name``; call inside ``shard_map``.

    Arguments are the local shards: ``query [b, L, h, d]``, ``key/value [b, L, h_kv, d]``, device i
    of the axis holding global positions ``[i*L, (i+1)*L)``. Returns the local shard of
    ``dilated_attention`` on the global sequence (and its LSE ``[b, L, h]`` with ``return_lse``).
    Dropout as in ``dilated_attention``; ``batch_axis``, if the batch is sharded too, makes the
    dropout mask use global batch indices.
    """
    config = DilatedConfig(segment_lengths, dilation_rates, mix, is_causal, softmax_scale)
    b, L, h, h_kv, d = check_inputs(query, key, value)
    P = lax.axis_size(axis_name)
    plan = get_ring_plan(config, L, P, h, h_kv)
    dropout = make_dropout(dropout_rate, dropout_seed)
    if dropout is not None:
        dropout = dropout._replace(pos_base=lax.axis_index(axis_name) * L,
                                   batch_base=0 if batch_axis is None else lax.axis_index(batch_axis) * b)
    attend = functools.partial(_attend_ring_unit, axis_name=axis_name, num_devices=P, causal=config.is_causal,
                               scale=config.scale(d), dropout=dropout)
    out, lse = run_layers(query, key, value, plan.layers, attend)
    return (out, lse) if return_lse else out


def simulated_ring_attention(query, key, value, config: DilatedConfig, ring_size: int, dropout=None):
    """The ring on one device: ``(out, lse)`` with the sequence cut into ``ring_size`` blocks that
    play the devices, K/V blocks moving by the same hops (``roll`` for ``ppermute``) with the same
    merges; peak memory falls with ``ring_size``, since one hop's blocks are live at a time."""
    _, n, h, h_kv, d = check_inputs(query, key, value)
    if n % ring_size:
        raise ValueError(f"seq_len={n} is not a multiple of {ring_size=}")
    plan = get_ring_plan(config, n // ring_size, ring_size, h, h_kv)
    attend = functools.partial(_attend_simulated_unit, causal=config.is_causal, scale=config.scale(d),
                               dropout=dropout)
    return run_layers(query, key, value, plan.layers, attend)


def sharded_dilated_attention(query, key, value, *, mesh, seq_axis="sp", batch_axis=None, return_lse=False,
                              dropout_seed=None, **kwargs):
    """Global arrays in, global arrays out: ``ring_dilated_attention`` under ``jax.shard_map``.

    The sequence dimension is sharded over ``seq_axis``; ``batch_axis`` (optional) shards the batch
    for data parallelism. Heads stay whole on each device (a head's pattern depends on its index).
    """
    P = jax.sharding.PartitionSpec
    spec, lse_spec = P(batch_axis, seq_axis, None, None), P(batch_axis, seq_axis, None)
    if jax.sharding.AxisType.Explicit in tuple(mesh.axis_types):  # explicit meshes do not reshard implicitly
        sharding = jax.sharding.NamedSharding(mesh, spec)
        query, key, value = (jax.sharding.reshard(x, sharding) for x in (query, key, value))
    seed = jnp.uint32(0) if dropout_seed is None else as_seed(dropout_seed)  # an explicit, replicated input

    def f(q, k, v, seed):
        return ring_dilated_attention(q, k, v, axis_name=seq_axis, batch_axis=batch_axis, return_lse=True,
                                      dropout_seed=None if dropout_seed is None else seed, **kwargs)

    out, lse = jax.shard_map(f, mesh=mesh, in_specs=(spec, spec, spec, P()), out_specs=(spec, lse_spec),
                             check_vma=False)(query, key, value, seed)
    return (out, lse) if return_lse else out
