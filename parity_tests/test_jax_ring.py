"""The JAX ring on 8 simulated CPU devices: exactness, gradients, causality, communication, memory."""

from __future__ import annotations

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ring_jax
from parity_tests.frameworks import Case, max_abs_err, run_jax
from parity_tests.test_parity_matrix import check_against_reference

# Patterns mixing local and spanning segments: with n=256, P=4 (L=64) w=16 is local, w=64 is one
# device's shard, w=256 spans all four.
W, R = (16, 64, 256), (1, 2, 4)


def mesh_of(P, explicit=False):
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    return jax.make_mesh((P,), ("sp",), axis_types=(kind,), devices=jax.devices()[:P])


def sharded(mesh):
    return lambda q, k, v, **kw: ring_jax.sharded_dilated_attention(q, k, v, mesh=mesh, return_lse=True, **kw)


@pytest.mark.parametrize("P", [1, 2, 4, 8])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_ring_matches_oracle_float64(P, mix, causal):
    case = Case(256, 6, 3, 8, W, R, mix, causal)
    x = case.inputs()
    fn = sharded(mesh_of(P))
    # Forward and lse within 1e-10, gradients within 1e-9 of the float64 reference.
    check_against_reference(run_jax(case, x, lambda q, k, v: fn(q, k, v, **case.kwargs)), case, x)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_ring_low_precision(mix, dtype):
    case = Case(256, 4, 4, 16, W, R, mix, True, dtype)
    x = case.inputs(seed=3)
    fn = sharded(mesh_of(4))
    check_against_reference(run_jax(case, x, lambda q, k, v: fn(q, k, v, **case.kwargs)), case, x)


@pytest.mark.parametrize("ring_size", [2, 4, 8])
@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_simulated_ring_equals_single_device(mix, ring_size):
    case = Case(256, 6, 3, 8, W, R, mix, True)
    x = case.inputs(seed=2)
    single = run_jax(case, x)
    ring = run_jax(case, x, functools.partial(ring_jax.dilated_attention, return_lse=True, ring_size=ring_size,
                                              **case.kwargs))
    for a, b in zip(ring, single):
        assert max_abs_err(a, b) <= 1e-12


@pytest.mark.parametrize("layout", ["contiguous", "joint", "split"])
@pytest.mark.parametrize("causal", [True, False])
def test_custom_backward_equals_autodiff_of_the_ring(layout, causal):
    """The product backward against plain autodiff through the forward hops (the fallback), for
    the contiguous hop blocks and both balanced ones."""
    from ring_jax._coords import Coords, make_origin, unit_coords
    from ring_jax._kernels import BlockSpec, XlaKernel
    from ring_jax._ring import _Hops, ring_forward, ring_unit_attention
    from ring_jax._ring_plan import CONTIGUOUS, JOINT, SPLIT

    calls, dirs = {"contiguous": (CONTIGUOUS, (1,)), "joint": (JOINT, (1, -1)), "split": (SPLIT, (1, -1))}[layout]
    k = len(dirs)
    mesh = mesh_of(4)
    spec = jax.sharding.PartitionSpec("sp")
    hops = _Hops("sp", 4, ((0, 1), (1, 2), (2, 3), (3, 0)), (0, 0, 1), BlockSpec(XlaKernel(), 0.3, causal=causal),
                 8 // k, 0, calls, dirs)
    kq, kk = jax.random.split(jax.random.PRNGKey(0))
    q = jax.random.normal(kq, (4 * 2, k, 8 // k, 3, 4))  # per device: [b=2, k, m, H=3, d=4]
    kv = jax.random.normal(kk, (4 * 2, k, 8 // k, 2, 2, 4))  # pairs = 2

    def loss(f):
        def per_device(q, kv):
            j = jax.lax.axis_index("sp")
            origin = make_origin(pos_base=j * 8 // k, half_base=None if k == 1 else (7 - j) * 4)
            c = unit_coords(origin, 2, k, 8 // k, 1, (0, 1, 2), (0, 0, 0))
            qpos = c.qpos.reshape(2, k, 3, 8 // k)
            out, lse = f(q, kv, hops, Coords(c.seed, c.batch[::k], c.heads, qpos, qpos))
            return (jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.sin(lse)))[None]

        return lambda q, kv: jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec), out_specs=spec,
                                           check_vma=False)(q, kv).sum()

    ours = jax.jit(jax.grad(loss(ring_unit_attention), argnums=(0, 1)))(q, kv)
    autodiff = jax.jit(jax.grad(loss(ring_forward), argnums=(0, 1)))(q, kv)
    for a, b in zip(ours, autodiff):
        assert max_abs_err(a, b) <= 1e-5 * float(jnp.abs(b).max())


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_causality_under_sharding(mix):
    mesh = mesh_of(4)
    f = jax.jit(lambda q, k, v: ring_jax.sharded_dilated_attention(q, k, v, mesh=mesh, segment_lengths=W,
                                                                    dilation_rates=R, mix=mix, is_causal=True))
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 256, 4, 8), jnp.float64) for i in range(3))
    out = f(q, k, v)
    for shard in (1, 2, 3):  # perturb everything from shard `shard` on: earlier shards must not move
        start = shard * 64
        out2 = f(q, k.at[:, start:].multiply(-3.0), v.at[:, start:].add(100.0))
        assert jnp.array_equal(out[:, :start], out2[:, :start])
        assert not jnp.array_equal(out[:, start:], out2[:, start:])


def test_user_shard_map_with_vma_checks_and_explicit_mesh():
    mesh = mesh_of(4, explicit=True)
    spec = jax.sharding.PartitionSpec(None, "sp")
    kw = dict(segment_lengths=W, dilation_rates=R, mix="longnet", is_causal=True)
    f = jax.shard_map(functools.partial(ring_jax.ring_dilated_attention, axis_name="sp", **kw), mesh=mesh,
                      in_specs=(spec,) * 3, out_specs=spec)  # check_vma defaults to True
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 256, 4, 8), jnp.float64)
    q_sharded = jax.sharding.reshard(q, jax.sharding.NamedSharding(mesh, spec))
    single = jax.jit(lambda q: ring_jax.dilated_attention(q, q, q, **kw))
    assert max_abs_err(jax.jit(f)(q_sharded, q_sharded, q_sharded), single(q)) < 1e-12
    g = jax.jit(jax.grad(lambda q: f(q, q, q).sum()))(q_sharded)
    assert max_abs_err(g, jax.jit(jax.grad(lambda q: single(q).sum()))(q)) < 1e-10
    # sharded_dilated_attention reshards inputs of an explicit mesh itself.
    assert max_abs_err(sharded(mesh)(q, q, q, **kw)[0], single(q)) < 1e-12


def test_invalid_shardings_name_pattern_L_and_P():
    q = jnp.zeros((1, 96, 2, 8))
    with pytest.raises(ValueError, match=r"pattern 0 \(w=24, r=1\) with n=96, local length L=16 on P=6 devices: "
                                         r"w is not a multiple of L"):
        ring_jax.get_ring_plan(ring_jax.DilatedConfig((24,), (1,)), 16, 6, 2, 2)
    with pytest.raises(ValueError, match=r"pattern 1 \(w=64, r=8\) with n=64, local length L=4 on P=16 devices: "
                                         r"L is not a multiple of r"):
        ring_jax.get_ring_plan(ring_jax.DilatedConfig((4, 64), (1, 8)), 4, 16, 2, 2)
    with pytest.raises(ValueError, match=r"pattern 0 \(w=8, r=1\) with n=96, local length L=12 on P=8 devices: "
                                         r"L is not a multiple of w"):
        ring_jax.get_ring_plan(ring_jax.DilatedConfig((8,), (1,)), 12, 8, 2, 2)
    with pytest.raises(ValueError, match=r"pattern 0 \(w=32, r=1\) with n=96, local length L=12 on P=8 devices: "
                                         r"w is not a multiple of L"):
        ring_jax.get_ring_plan(ring_jax.DilatedConfig((32,), (1,)), 12, 8, 2, 2)
    # A partial last segment spanning devices runs (test_jax_partial_ring); the balanced layout refuses it.
    assert ring_jax.get_ring_plan(ring_jax.DilatedConfig((32,), (1,)), 16, 3, 2, 2).units[0].last_group == 1
    # A simulated ring pads the sequence to a length the ring can cut (here 480 and 128).
    for w, ring_size in ((96, 5), (32, 8)):
        kw = dict(segment_lengths=(w,), dilation_rates=(1,))
        q = jax.random.normal(jax.random.PRNGKey(0), (1, 96, 2, 8), jnp.float64)
        assert max_abs_err(ring_jax.dilated_attention(q, q, q, ring_size=ring_size, **kw),
                           ring_jax.dilated_attention(q, q, q, **kw)) < 1e-12


def test_ring_plan_is_built_once_per_shape():
    mesh = mesh_of(2)
    kw = dict(segment_lengths=(20, 40), dilation_rates=(2, 4))  # a config no other test uses
    f = jax.jit(lambda q: ring_jax.sharded_dilated_attention(q, q, q, mesh=mesh, **kw))
    before = ring_jax.build_count()
    for _ in range(5):
        f(jnp.ones((1, 80, 2, 4)))
    assert ring_jax.build_count() == before + 1
    f(jnp.ones((1, 160, 2, 4)))
    assert ring_jax.build_count() == before + 2


# --- communication, read off the compiled HLO ---------------------------------------------------

_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2}


def executed_permutes(hlo: str) -> collections.Counter:
    """Collective-permutes the program executes, by operand shape: loop bodies count once per trip."""
    comps, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name = head.group(1)
            comps[name] = []
            if line.startswith("ENTRY"):
                entry = name
        elif name is not None:
            comps[name].append(line)

    @functools.cache
    def count(comp):
        total = collections.Counter()
        for line in comps[comp]:
            permute = re.search(r"= (\w+\[[\d,]*\])\S* collective-permute(?:-start)?\(", line)
            if permute:
                total[permute.group(1)] += 1
            loop = re.search(r"\bwhile\(.*body=%?([\w.\-]+)", line)
            if loop:
                trips = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
                assert trips, "a loop without a known trip count"
                for shape, k in count(loop.group(1)).items():
                    total[shape] += int(trips.group(1)) * k
            for called in re.findall(r"(?:to_apply|calls)=%?([\w.\-]+)", line):
                total.update(count(called))
        return total

    return count(entry)


def _bytes(shape: str) -> int:
    dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", shape).groups()
    return _DTYPE_BYTES[dtype] * int(np.prod([int(x) for x in dims.split(",") if x]))


def _compiled_permutes(P, L, cfg, h=6, h_kv=3, d=16, b=2, grad=False):
    mesh = mesh_of(P)
    f = lambda q, k, v: ring_jax.sharded_dilated_attention(q, k, v, mesh=mesh, **cfg).astype(jnp.float32).sum()  # noqa: E731
    if grad:
        f = jax.grad(f, argnums=(0, 1, 2))
    q, k = jnp.zeros((b, L * P, h, d), jnp.float32), jnp.zeros((b, L * P, h_kv, d), jnp.float32)
    return executed_permutes(jax.jit(f).lower(q, k, k).compile().as_text())


@pytest.mark.parametrize("mix", ["head_groups", "longnet"])
def test_communication_is_what_the_plan_says(mix):
    P, L, b, d = 4, 64, 2, 16
    cfg = dict(segment_lengths=(16, 64, 256), dilation_rates=(1, 2, 4), mix=mix, is_causal=True)
    plan = ring_jax.get_ring_plan(ring_jax.DilatedConfig(**cfg), L, P, 6, 3)
    fwd = _compiled_permutes(P, L, cfg)
    assert sum(fwd.values()) == plan.num_permutes() == sum(ru.group - 1 for ru in plan.units)
    # Every forward hop carries K and V: L/r rows of each distinct (kv head, offset) pair.
    expected = collections.Counter()
    for ru in plan.units:
        if ru.group > 1:
            shape = f"f32[{b},{ru.slots},{L // ru.slots // ru.unit.r},2,{len(ru.pair_heads)},{d}]"
            expected[shape] += ru.group - 1
            assert _bytes(shape) == ru.hop_bytes(b, d, 4)
    assert fwd == expected
    both = _compiled_permutes(P, L, cfg, grad=True)
    assert sum(both.values()) == plan.num_permutes(with_backward=True)


def test_gqa_pairs_are_not_replicated_on_the_wire():
    # head_groups, 8 query heads over 2 kv heads, 2 patterns: each group of 4 query heads reads one
    # kv head at one offset, so one pair a group goes on the wire, not four.
    plan = ring_jax.get_ring_plan(ring_jax.DilatedConfig((128, 128), (2, 2)), 32, 4, 8, 2)
    assert [len(ru.pair_heads) for ru in plan.units] == [1, 1]
    fwd = _compiled_permutes(4, 32, dict(segment_lengths=(128, 128), dilation_rates=(2, 2)), h=8, h_kv=2, b=1)
    assert fwd == collections.Counter({"f32[1,1,16,2,1,16]": 2 * 3})


def test_local_patterns_communicate_nothing():
    cfg = dict(segment_lengths=(16, 32), dilation_rates=(1, 2), mix="longnet", is_causal=True)
    assert sum(_compiled_permutes(4, 64, cfg, grad=True).values()) == 0


def test_bytes_per_device_do_not_grow_with_n_at_fixed_L():
    cfg = dict(segment_lengths=(16, 1024), dilation_rates=(1, 4), mix="longnet")
    per_hop = [set(_compiled_permutes(P, 64, cfg)) for P in (2, 4, 8)]
    assert per_hop[0] == per_hop[1] == per_hop[2] == {"f32[2,1,16,2,6,16]"}


def _temp_bytes(f, *args):
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_simulated_ring_memory_falls_with_ring_size():
    x = jnp.ones((1, 2048, 2, 64), jnp.float32)
    kw = dict(segment_lengths=(2048,), dilation_rates=(1,), is_causal=True)
    temp = {R: _temp_bytes(jax.grad(lambda q: ring_jax.dilated_attention(q, q, q, ring_size=R, **kw).sum()), x)
            for R in (1, 4, 8, 16)}
    assert temp[1] > temp[4] > temp[8] > temp[16], temp


def test_ring_memory_per_device_does_not_grow_with_P():
    cfg = dict(segment_lengths=(16, 2048), dilation_rates=(1, 4), mix="longnet", is_causal=True)
    temp = {}
    for P in (2, 4, 8):
        mesh = mesh_of(P)
        f = jax.grad(lambda q: ring_jax.sharded_dilated_attention(q, q, q, mesh=mesh, **cfg).sum())
        temp[P] = _temp_bytes(f, jnp.ones((2, 256 * P, 4, 16), jnp.float32))
    assert max(temp.values()) <= 1.05 * min(temp.values()), temp
