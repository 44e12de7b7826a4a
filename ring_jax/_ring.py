"""Ring dilated attention: the sequence sharded over a mesh axis, K/V blocks passed around sub-rings.

Per unit (one pattern over some heads), with ``L`` the local length and ``w`` the effective
segment length:

* ``w <= L``: each segment lies on one device, so the unit is computed locally, no communication;
* ``w > L``: a segment spans ``g = w / L`` consecutive devices. Each device sends only its selected
  (strided) K/V rows, one row block per *distinct* (kv head, offset) pair the unit needs, around the
  sub-ring of its ``g`` devices: ``g - 1`` ``ppermute`` hops, partial results merged by LSE in
  float32. Causal: a block from a later device is skipped (``lax.cond``, no compute), a block from an
  earlier device needs no mask, only the device's own block is masked.

The backward (``jax.custom_vjp``) sends K/V around the same sub-ring again, with float32 dK/dV
accumulators travelling beside them and one last hop home; every block uses the final global
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
        """Bytes of one forward hop: K and V, ``L / r`` rows of each distinct pair."""
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
        """``sum (g - 1)`` over units; the backward adds ``g - 1`` K/V and ``g - 1`` dK/dV hops."""
        hops = sum(ru.group - 1 for ru in self.units)
        return 3 * hops if with_backward else hops


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
    """Static description of one unit's sub-ring (hashable: a ``custom_vjp`` non-diff argument)."""

    axis_name: Hashable
    group: int
    perm: tuple[tuple[int, int], ...]
    q_to_pair: tuple[int, ...]
    causal: bool
    scale: float


def _expand(kv, hops: _Hops):
    """``kv [b, m, 2, pairs, d]`` → ``k, v [b, m, H, d]``: each query head's pair."""
    idx = np.asarray(hops.q_to_pair)
    return jnp.take(kv[:, :, 0], idx, axis=2), jnp.take(kv[:, :, 1], idx, axis=2)


def _attend(q, kv, hops: _Hops, causal: bool):
    o, lse = block_attention_fwd(q, *_expand(kv, hops), causal, hops.scale)
    return o.astype(jnp.promote_types(o.dtype, jnp.float32)), lse


def _block_grads(q, kv, out, lse, dout, dlse, hops: _Hops, causal: bool):
    """float32 ``(dq [b, m, H, d], dkv [b, m, 2, pairs, d])`` of one block, heads summed into pairs."""
    dq, dk, dv = block_attention_bwd(q, *_expand(kv, hops), out, lse, dout, dlse, causal=causal,
                                     scale=hops.scale, keep_acc_dtype=True)
    onehot = np.eye(kv.shape[3])[np.asarray(hops.q_to_pair)].astype(dk.dtype)  # [H, pairs]
    return dq, jnp.einsum("bmshd,hp->bmspd", jnp.stack([dk, dv], axis=2), onehot)


def _position(hops: _Hops):
    """This device's position ``j`` in its sub-ring."""
    return lax.axis_index(hops.axis_name) % hops.group


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def ring_unit_attention(q, kv, hops: _Hops):
    """``q [b, m, H, d]`` (this device's selected rows), ``kv [b, m, 2, pairs, d]`` → ``(out, lse)``
    over the whole segment, whose ``g`` blocks live on the ``g`` devices of the sub-ring."""
    return _ring_forward(q, kv, hops)


def _ring_forward(q, kv, hops: _Hops):
    j = _position(hops)
    out, lse = _attend(q, kv, hops, hops.causal)  # own block: the only masked one
    for t in range(1, hops.group):
        kv = lax.ppermute(kv, hops.axis_name, hops.perm)  # now holds the block of device j - t

        def merge(carry, kv=kv):
            o, l = _attend(q, kv, hops, causal=False)
            return merge_by_lse([carry[0], o], [carry[1], l])

        # Causal: the block of device j - t < 0 (mod g) lies in the future: skipped, no compute.
        out, lse = lax.cond(t <= j, merge, lambda c: c, (out, lse)) if hops.causal else merge((out, lse))
    return out.astype(q.dtype), lse


def _ring_fwd(q, kv, hops):
    out, lse = _ring_forward(q, kv, hops)
    return (out, lse), (q, kv, out, lse)


def _ring_bwd(hops, residuals, cotangents):
    q, kv, out, lse = residuals
    dout, dlse = cotangents
    j = _position(hops)
    dq, dkv_own = _block_grads(q, kv, out, lse, dout, dlse, hops, hops.causal)
    acc = jnp.zeros_like(dkv_own)  # dK/dV of the block in hand, travelling with it
    for t in range(1, hops.group):
        kv = lax.ppermute(kv, hops.axis_name, hops.perm)
        if t > 1:
            acc = lax.ppermute(acc, hops.axis_name, hops.perm)

        def add(carry, kv=kv):
            dq_t, dkv_t = _block_grads(q, kv, out, lse, dout, dlse, hops, causal=False)
            return carry[0] + dq_t, carry[1] + dkv_t

        dq, acc = lax.cond(t <= j, add, lambda c: c, (dq, acc)) if hops.causal else add((dq, acc))
    if hops.group > 1:
        dkv_own = dkv_own + lax.ppermute(acc, hops.axis_name, hops.perm)  # home to the owner
    return dq.astype(q.dtype), dkv_own.astype(kv.dtype)


ring_unit_attention.defvjp(_ring_fwd, _ring_bwd)


def _attend_ring_unit(query, key, value, ru: RingUnit, axis_name, num_devices, causal, scale):
    if ru.group == 1:
        return attend_unit(query, key, value, ru.unit, causal, scale)
    L = query.shape[1]
    pairs = dataclasses.replace(ru.local, offsets=ru.pair_offsets)
    k = gather_rows(key, pairs, ru.pair_heads)  # [b, L/r, pairs, d]
    v = gather_rows(value, pairs, ru.pair_heads)
    q = gather_rows(query, ru.local, ru.unit.heads)  # [b, L/r, H, d]
    hops = _Hops(axis_name, ru.group, ru.perm(num_devices), ru.q_to_pair, causal, scale)
    o, lse = ring_unit_attention(q, jnp.stack([k, v], axis=2), hops)  # kv: [b, L/r, 2, pairs, d]
    return scatter_rows(o, ru.local, L, 0.0), scatter_rows(lse, ru.local, L, -jnp.inf)


def ring_dilated_attention(query, key, value, *, axis_name, segment_lengths, dilation_rates,
                           mix="head_groups", is_causal=False, softmax_scale=None, return_lse=False):
    """Dilated attention over a sequence sharded along ``axis_name``; call inside ``shard_map``.

    Arguments are the local shards: ``query [b, L, h, d]``, ``key/value [b, L, h_kv, d]``, device i
    of the axis holding global positions ``[i*L, (i+1)*L)``. Returns the local shard of
    ``dilated_attention`` on the global sequence (and its LSE ``[b, L, h]`` with ``return_lse``).
    """
    config = DilatedConfig(segment_lengths, dilation_rates, mix, is_causal, softmax_scale)
    _, L, h, h_kv, d = check_inputs(query, key, value)
    P = lax.axis_size(axis_name)
    plan = get_ring_plan(config, L, P, h, h_kv)
    attend = functools.partial(_attend_ring_unit, axis_name=axis_name, num_devices=P, causal=config.is_causal,
                               scale=config.scale(d))
    out, lse = run_layers(query, key, value, plan.layers, attend)
    return (out, lse) if return_lse else out


def simulated_ring_attention(query, key, value, *, ring_size, return_lse=False, **kwargs):
    """The ring on one device: the sequence cut into ``ring_size`` blocks that play the devices of a
    named ``vmap`` axis, so K/V move by the same ``ppermute`` hops and peak memory falls with
    ``ring_size`` (only the blocks of one hop are live at a time)."""
    b, n = query.shape[:2]
    if n % ring_size:
        raise ValueError(f"seq_len={n} is not a multiple of {ring_size=}")

    def split(x):  # [b, n, h, d] -> [R, b, n/R, h, d]
        return jnp.moveaxis(x.reshape(b, ring_size, n // ring_size, *x.shape[2:]), 1, 0)

    def merge(x):  # [R, b, n/R, ...] -> [b, n, ...]
        return jnp.moveaxis(x, 0, 1).reshape(b, n, *x.shape[3:])

    f = functools.partial(ring_dilated_attention, axis_name="_ring", return_lse=True, **kwargs)
    out, lse = jax.vmap(f, axis_name="_ring")(split(query), split(key), split(value))
    return (merge(out), merge(lse)) if return_lse else merge(out)


def sharded_dilated_attention(query, key, value, *, mesh, seq_axis="sp", batch_axis=None, return_lse=False,
                              **kwargs):
    """Global arrays in, global arrays out: ``ring_dilated_attention`` under ``jax.shard_map``.

    The sequence dimension is sharded over ``seq_axis``; ``batch_axis`` (optional) shards the batch
    for data parallelism. Heads stay whole on each device (a head's pattern depends on its index).
    """
    spec = jax.sharding.PartitionSpec(batch_axis, seq_axis, None, None)
    lse_spec = jax.sharding.PartitionSpec(batch_axis, seq_axis, None)
    if jax.sharding.AxisType.Explicit in tuple(mesh.axis_types):  # explicit meshes do not reshard implicitly
        sharding = jax.sharding.NamedSharding(mesh, spec)
        query, key, value = (jax.sharding.reshard(x, sharding) for x in (query, key, value))
    f = functools.partial(ring_dilated_attention, axis_name=seq_axis, return_lse=True, **kwargs)
    out, lse = jax.shard_map(f, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, lse_spec),
                             check_vma=False)(query, key, value)
    return (out, lse) if return_lse else out
