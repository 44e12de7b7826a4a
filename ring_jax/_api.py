"""The public functions: validate once, decide the mode once (one pass, kept rows, chunks, a
simulated ring, a sharded ring), choose the block kernel once, and call the step that runs it."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ring_jax._chunked import chunked_attention
from ring_jax._config import DilatedConfig, check_inputs, check_ring_size, check_segment_ids, check_seq_lengths
from ring_jax._coords import Origin, make_origin, real_rows
from ring_jax._dilated import kept_rows_attention, keeps_rows, saved_attention
from ring_jax._dropout import as_seed, check_dropout
from ring_jax._kernels import BlockSpec, make_spec
from ring_jax._layout import check_layout, shard_from_balanced, shard_to_balanced
from ring_jax._plan import Plan, get_plan, padded_length
from ring_jax._ring import attend_sharded_unit, attend_simulated_unit
from ring_jax._ring_plan import balanced_padded_length, get_ring_plan
from ring_jax._rows import run_layers


def check_chunk_type(chunk_size) -> None:
    """``ValueError`` unless ``chunk_size`` is None or a positive int (what needs no shapes)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                   or chunk_size <= 0):
        raise ValueError(f"{chunk_size=} must be a positive int or None")


def check_chunk_size(chunk_size: int | None, seq_len: int, config: DilatedConfig) -> int:
    """``chunk_size`` (``seq_len`` when None) if every segment of every pattern lies inside one chunk."""
    check_chunk_type(chunk_size)
    if chunk_size is None:
        return seq_len
    if seq_len % chunk_size:
        raise ValueError(f"{seq_len=} is not a multiple of {chunk_size=}")
    for w in config.segment_lengths:
        if chunk_size % min(w, seq_len):
            raise ValueError(f"{chunk_size=} is not a multiple of the segment length w={min(w, seq_len)} "
                             f"({seq_len=}): a segment would cross chunks")
    return int(chunk_size)


def one_device_mode(plan: Plan, seq_len: int):
    """The single-device ``custom_vjp`` for ``plan`` (the plan of one chunk) on ``seq_len`` tokens."""
    if plan.seq_len != seq_len:
        return chunked_attention
    return kept_rows_attention if keeps_rows(plan) else saved_attention


def _compiled(fn, static_argnums: tuple[int, ...], *inputs):
    """``fn`` itself inside a caller's transformation; for concrete ``inputs`` (an eager call),
    ``fn`` under ``jax.jit``: one compiled program per plan and kernel instead of op-by-op
    dispatch. Traced calls stay unwrapped: a nested ``jit`` would keep an extra sequence-sized
    buffer in a caller's compiled backward."""
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(inputs)):
        return fn
    return _jitted(fn, static_argnums)


@functools.cache
def _jitted(fn, static_argnums: tuple[int, ...]):
    return jax.jit(fn, static_argnums=static_argnums)


def _spec(config: DilatedConfig, query, rate: float, padded: bool = False, documents: bool = False,
          lengths: bool = False, lse_cotangent: bool = False) -> BlockSpec:
    """The call's block spec; ``padded``: some keys are padding, masked unless the call is causal
    (padding then lies after every real query); ``documents``: the call has ``segment_ids``;
    ``lengths``: it has ``seq_lengths`` (a causal call's kernel may then skip padded rows);
    ``lse_cotangent``: the blocks' backward gets an LSE cotangent (a ring, or ``return_lse``)."""
    causal = config.is_causal
    return make_spec(query.dtype, query.shape[-1], config.scale(query.shape[-1]), causal, rate,
                     padded and not causal, documents, lengths and causal, lse_cotangent)


def _docs(segment_ids, length: int):
    """int32 ``[batch, length]`` document ids, padded past the sequence with -1 (padding rows are
    masked as padding already), or None."""
    if segment_ids is None:
        return None
    ids = jnp.asarray(segment_ids).astype(jnp.int32)
    return jnp.pad(ids, [(0, 0), (0, length - ids.shape[1])], constant_values=-1)


def _lengths(seq_lengths, batch: int, seq_len: int, padded: bool):
    """int32 ``[batch]`` lengths clipped to ``[0, seq_len]``; ``seq_len`` for every entry when only
    the padding to a longer layout needs them; None when every position is real."""
    if seq_lengths is None:
        return jnp.full((batch,), seq_len, jnp.int32) if padded else None
    return jnp.clip(jnp.asarray(seq_lengths), 0, seq_len).astype(jnp.int32)


def pad_to(x, length: int):
    """``[b, n, ...]`` zero-padded along the sequence to ``length`` tokens."""
    n = x.shape[1]
    return x if n == length else jnp.pad(x, [(0, 0), (0, length - n)] + [(0, 0)] * (x.ndim - 2))


def finish(result, with_lse: bool, origin: Origin, seq_len: int):
    """``out`` (and ``lse``) with padded rows set to 0 (``-inf``), cut to ``seq_len`` tokens. The
    ``where`` also zeroes those rows' cotangents, so padded q, k, v get no gradient."""
    out, lse = result if with_lse else (result, None)
    real = real_rows(origin, out.shape[0], out.shape[1])  # [b, N] or None
    if real is not None:
        out = jnp.where(real[..., None, None], out, jnp.zeros((), out.dtype))
        lse = None if lse is None else jnp.where(real[..., None], lse, -jnp.inf)
    if out.shape[1] != seq_len:
        out, lse = out[:, :seq_len], None if lse is None else lse[:, :seq_len]
    return (out, lse) if with_lse else out


def one_device_attention(mode, plan: Plan, spec: BlockSpec, with_lse: bool, padded_len: int, query, key, value,
                         origin: Origin):
    """One device: the inputs padded to ``padded_len`` tokens, ``mode`` (the ``custom_vjp`` of
    :func:`one_device_mode`), padded rows zeroed and the result cut back to the input length."""
    q, k, v = (pad_to(x, padded_len) for x in (query, key, value))
    result = mode(plan, spec, with_lse, q, k, v, origin)
    return finish(result, with_lse, origin, query.shape[1])


def simulated_ring_attention(query, key, value, config: DilatedConfig, ring_size: int, spec: BlockSpec,
                             origin: Origin, padded_len: int | None = None, layout: str = "contiguous"):
    """The ring on one device: ``(out, lse)`` with the sequence (padded to ``padded_len`` tokens, a
    multiple of ``ring_size``) cut into ``ring_size`` blocks that play the devices, K/V blocks moving
    by the same hops (``roll`` for ``ppermute``) with the same merges; peak memory falls with
    ``ring_size``, since one hop's blocks are live at a time."""
    _, n, h, h_kv, _ = check_inputs(query, key, value)
    N = n if padded_len is None else padded_len
    plan = get_ring_plan(config, N // ring_size, ring_size, h, h_kv, layout)
    attend = functools.partial(attend_simulated_unit, spec=spec, origin=origin, num_devices=ring_size)
    result = run_layers(*(pad_to(x, N) for x in (query, key, value)), plan.layers, attend)
    return finish(result, True, origin, n)


def dilated_attention(query, key, value, *, segment_lengths, dilation_rates, mix="head_groups",
                      is_causal=False, softmax_scale=None, return_lse=False, ring_size=None,
                      dropout_rate=0.0, dropout_seed=None, chunk_size=None, seq_lengths=None,
                      layout="contiguous", segment_ids=None):
    """Dilated attention (LongNet) on one device.

    Args:
      query: ``[batch, seq, heads, head_dim]``; any ``seq >= 1`` (segments ``[s*w, (s+1)*w)`` cut at
        ``seq``: computed on the inputs zero-padded to a length every pattern tiles, padding masked;
        without ``chunk_size`` or ``ring_size`` only the tail past the longest prefix that is a
        multiple of ``lcm(w)`` is padded, the prefix runs unpadded).
      key, value: ``[batch, seq, kv_heads, head_dim]``, ``heads % kv_heads == 0`` (GQA).
      segment_lengths, dilation_rates: the patterns ``(w_1..w_K)``, ``(r_1..r_K)``: static Python
        ints (part of the compiled program, never traced), each ``w`` a multiple of its ``r``.
      mix: ``"head_groups"`` (head group i uses pattern i) or ``"longnet"`` (every head uses
        every pattern, merged by LSE: LongNet Eq. 10).
      is_causal: keys after the query position are excluded.
      softmax_scale: defaults to ``head_dim ** -0.5``.
      return_lse: also return the natural-log LSE ``[batch, seq, heads]`` (float32; float64 for
        float64 inputs; ``-inf`` on rows with no key).
      ring_size: if > 1, run the ring algorithm on this one device with the sequence cut into
        ``ring_size`` blocks (same result, peak memory falling with ``ring_size``).
      dropout_rate, dropout_seed: dropout on each pattern's attention probabilities, the mask a
        hash of (seed, pattern, batch, head, query and key position): the same on one device, in
        any ring and in ``ring_torch`` for the same seed. ``dropout_seed``: an int or a uint32
        scalar (e.g. ``jax.random.bits(key, dtype=jnp.uint32)``). The LSE is not affected.
      chunk_size: if set, compute the sequence ``chunk_size`` tokens at a time in a loop, forward
        and backward (a multiple of every segment length, so chunks are independent; the sequence
        is padded to a multiple of it). Only q, k, v are kept for the backward, which recomputes
        each chunk's forward: peak memory is q, k, v, their gradients and ``out``'s cotangent plus
        one chunk's temporaries, for one extra forward pass. Not with ``ring_size``.
      seq_lengths: optional integer ``[batch]`` (may be traced: one compiled program for all
        values): positions ``p >= seq_lengths[b]`` are padding, never a key; their output rows are
        0 (LSE ``-inf``) and their q, k, v get zero gradients. Values are clipped to ``[0, seq]``.
      layout: with ``ring_size``, how the simulated devices hold the sequence: ``"contiguous"``
        or ``"balanced"`` (as :func:`ring_dilated_attention`; arrays stay in natural order).
      segment_ids: optional integer ``[batch, seq]`` (packed documents; may be traced): a query
        attends only keys with its id, on top of the pattern (whose segments keep their global
        positions). Blocks then run the masked XLA kernel (cuDNN takes no document mask).

    Returns:
      ``out [batch, seq, heads, head_dim]`` in the input dtype (rows with no key are 0), or
      ``(out, lse)``.
    """
    config = DilatedConfig(segment_lengths, dilation_rates, mix, is_causal, softmax_scale)
    b, n, h, h_kv, _ = check_inputs(query, key, value)
    seq_lengths = check_seq_lengths(seq_lengths, b)
    segment_ids = check_segment_ids(segment_ids, b, n)
    rate = check_dropout(dropout_rate, dropout_seed)
    ring_size = check_ring_size(ring_size)
    ring = ring_size is not None and ring_size > 1
    if ring and chunk_size is not None:
        raise ValueError(f"{chunk_size=} and {ring_size=}: pick one way of cutting the sequence")
    check_chunk_type(chunk_size)
    config.validate_shapes(n, h, h_kv)  # errors name the whole sequence, not a chunk
    layout = check_layout(layout)
    if ring and layout == "balanced":
        N = balanced_padded_length(config, n, ring_size)
    else:
        N = padded_length(config, n, chunk_size or 1, ring_size if ring else 1)
    padded = seq_lengths is not None or N > n
    origin = make_origin(dropout_seed if rate else None, lengths=_lengths(seq_lengths, b, n, padded),
                         docs=_docs(segment_ids, N))
    spec = _spec(config, query, rate, padded, segment_ids is not None, seq_lengths is not None,
                 ring or bool(return_lse))
    if ring:
        run = _compiled(simulated_ring_attention, (3, 4, 5, 7, 8), query, key, value, origin)
        out, lse = run(query, key, value, config, ring_size, spec, origin, N, layout)
        return (out, lse) if return_lse else out
    cut = n - n % math.lcm(*config.segment_lengths)
    if chunk_size is None and N > n and cut > 0:  # the tiled prefix unpadded, only the tail padded
        spans = tuple(_span(config, query, key, rate, segment_ids is not None, seq_lengths is not None, start, stop,
                            bool(return_lse)) for start, stop in ((0, cut), (cut, n)))
        run = _compiled(spans_attention, (0, 1), query, key, value, origin)
        return run(spans, bool(return_lse), query, key, value, origin)
    plan = get_plan(config, check_chunk_size(chunk_size, N, config), h, h_kv)  # the plan of one chunk
    run = _compiled(one_device_attention, (0, 1, 2, 3, 4), query, key, value, origin)
    return run(one_device_mode(plan, N), plan, spec, bool(return_lse), N, query, key, value, origin)


def _span(config: DilatedConfig, query, key, rate: float, documents: bool, lengths: bool, start: int, stop: int,
          lse_cotangent: bool):
    """``(start, stop, mode, plan, spec, padded_len, padded)`` of the rows ``[start, stop)`` run
    alone (``start`` a multiple of every ``w``): padded to their own plan length ``padded_len``;
    ``padded``: the span needs the call's lengths (given, or rows appended)."""
    t = stop - start
    N = padded_length(config, t)
    padded = lengths or N > t
    plan = get_plan(config, N, query.shape[2], key.shape[2])
    return (start, stop, one_device_mode(plan, N), plan,
            _spec(config, query, rate, padded, documents, lengths, lse_cotangent), N, padded)


def spans_attention(spans, with_lse: bool, query, key, value, origin: Origin):
    """One device, the sequence cut into independent spans (no segment of any pattern crosses a
    cut; :func:`_span`), each run by :func:`one_device_attention` from its global position and
    the results concatenated."""
    parts = []
    for start, stop, mode, plan, spec, N, padded in spans:
        here = origin.at(start) if padded else origin.at(start)._replace(lengths=None)
        xs = (x[:, start:stop] for x in (query, key, value))
        parts.append(one_device_attention(mode, plan, spec, with_lse, N, *xs, here))
    if not with_lse:
        return jnp.concatenate(parts, axis=1)
    return tuple(jnp.concatenate(z, axis=1) for z in zip(*parts))


def ring_dilated_attention(query, key, value, *, axis_name, segment_lengths, dilation_rates,
                           mix="head_groups", is_causal=False, softmax_scale=None, return_lse=False,
                           dropout_rate=0.0, dropout_seed=None, batch_axis=None, seq_lengths=None,
                           layout="contiguous", segment_ids=None):
    """Dilated attention over a sequence sharded along ``axis_name``; call inside ``shard_map``.

    Args:
      query: the local shard ``[batch, L, heads, head_dim]``. ``layout="contiguous"``: device ``i``
        of the axis holds global positions ``[i*L, (i+1)*L)``; ``"balanced"``: it holds chunks ``i``
        and ``2P-1-i`` of ``C = L/2`` positions (:func:`ring_jax.to_balanced` makes that order). A
        pattern whose segments span devices needs ``w % L == 0`` and ``L % r == 0``; with
        ``n % w != 0`` (contiguous layout) its last segment spans fewer devices and runs as a ring
        of its own size.
      key, value: local shards ``[batch, L, kv_heads, head_dim]``.
      axis_name: the mesh axis the sequence is sharded over.
      segment_lengths, dilation_rates, mix, is_causal, softmax_scale, return_lse, dropout_rate,
        dropout_seed: as in :func:`dilated_attention`.
      batch_axis: if the batch is sharded too, its mesh axis (the dropout mask then uses global
        batch indices).
      seq_lengths: optional integer ``[global batch]``, the same array on every device (as in
        :func:`dilated_attention`, clipped to ``[0, n]``); with ``batch_axis`` each device reads
        the entries of its batch shard.
      layout: ``"contiguous"`` (default) or ``"balanced"``: causal work equal on every device
        (the README's "Balanced layout" says which patterns then communicate); rules: ``n %
        (2P) == 0``, the contiguous rules on ``2P`` chunks, and each pattern spanning chunks has
        ``w >= n`` or ``w / C`` dividing ``P``.
      segment_ids: optional integer ``[global batch, n]`` document ids of the global sequence in
        natural order, the same array on every device (as in :func:`dilated_attention`).

    Returns:
      The local shard of ``dilated_attention`` on the global sequence, ``[batch, L, heads,
      head_dim]`` (and its LSE ``[batch, L, heads]`` with ``return_lse``), in ``layout``'s order.
    """
    config = DilatedConfig(segment_lengths, dilation_rates, mix, is_causal, softmax_scale)
    b, L, h, h_kv, _ = check_inputs(query, key, value)
    P = lax.axis_size(axis_name)
    global_batch = b * (1 if batch_axis is None else lax.axis_size(batch_axis))
    seq_lengths = check_seq_lengths(seq_lengths, global_batch)
    segment_ids = check_segment_ids(segment_ids, global_batch, L * P)
    plan = get_ring_plan(config, L, P, h, h_kv, layout)
    rate = check_dropout(dropout_rate, dropout_seed)
    j = lax.axis_index(axis_name)
    bases = (j * L, None) if layout == "contiguous" else (j * (L // 2), (2 * P - 1 - j) * (L // 2))
    origin = make_origin(dropout_seed if rate else None, 0 if batch_axis is None else lax.axis_index(batch_axis) * b,
                         bases[0], _lengths(seq_lengths, global_batch, L * P, False), bases[1],
                         _docs(segment_ids, L * P))
    attend = functools.partial(attend_sharded_unit, axis_name=axis_name, num_devices=P,
                               spec=_spec(config, query, rate, seq_lengths is not None, segment_ids is not None,
                                          seq_lengths is not None, lse_cotangent=True),
                               origin=origin)
    result = finish(run_layers(query, key, value, plan.layers, attend), True, origin, L)
    return result if return_lse else result[0]


def check_mesh_axes(query, key, value, mesh, seq_axis, batch_axis) -> None:
    """``ValueError`` unless ``seq_axis`` (and ``batch_axis``) are axes of ``mesh`` whose sizes
    divide the sequence length (and the batch)."""
    b, n, *_ = check_inputs(query, key, value)
    axes = tuple(mesh.axis_names)
    for name, axis, size, dim in (("seq_axis", seq_axis, n, "seq_len"), ("batch_axis", batch_axis, b, "batch")):
        if axis is None and name == "batch_axis":
            continue
        if axis not in axes:
            raise ValueError(f"{name}={axis!r} is not an axis of the mesh (axes: {axes})")
        if size % mesh.shape[axis]:
            raise ValueError(f"{dim}={size} is not a multiple of the size {mesh.shape[axis]} of mesh axis "
                             f"{name}={axis!r}")
    if batch_axis is not None and batch_axis == seq_axis:
        raise ValueError(f"{batch_axis=} and {seq_axis=} must be different mesh axes")


def sharded_dilated_attention(query, key, value, *, mesh, seq_axis="sp", batch_axis=None, return_lse=False,
                              dropout_seed=None, seq_lengths=None, layout="contiguous", segment_ids=None,
                              **kwargs):
    """Global arrays in, global arrays out: :func:`ring_dilated_attention` under ``jax.shard_map``.

    Args:
      query: ``[batch, seq, heads, head_dim]`` (global).
      key, value: ``[batch, seq, kv_heads, head_dim]`` (global).
      mesh: a ``jax.sharding.Mesh`` (``jax.make_mesh((P,), ("sp",))``; Explicit or Auto axes).
      seq_axis: the mesh axis the sequence is sharded over (``seq % mesh.shape[seq_axis] == 0``).
      batch_axis: optional mesh axis that shards the batch (data parallelism). Heads stay whole on
        each device (a head's pattern depends on its index).
      return_lse, dropout_seed, seq_lengths, **kwargs: as in :func:`dilated_attention` (patterns,
        mix, causal, scale, dropout rate); ``seq_lengths [batch]`` and ``segment_ids [batch,
        seq]`` are replicated on every device.
      layout: ``"contiguous"`` or ``"balanced"`` (:func:`ring_dilated_attention`). The arrays stay
        in natural order either way: with ``"balanced"`` each device's shard is moved to its
        balanced chunks and back inside the program (two ``ppermute``s of half a shard for each
        of q, k, v and out, lse). To keep data in balanced order, permute once with
        :func:`ring_jax.to_balanced` and call :func:`ring_dilated_attention` in your ``shard_map``.

    Returns:
      ``out [batch, seq, heads, head_dim]`` (and ``lse [batch, seq, heads]``), sharded like the inputs.
    """
    check_mesh_axes(query, key, value, mesh, seq_axis, batch_axis)
    seq_lengths = check_seq_lengths(seq_lengths, query.shape[0])
    lengths = jnp.zeros((query.shape[0],), jnp.int32) if seq_lengths is None else jnp.asarray(seq_lengths)
    segment_ids = check_segment_ids(segment_ids, *query.shape[:2])
    docs = jnp.zeros((1, 1), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
    if jax.sharding.AxisType.Explicit in tuple(mesh.axis_types):  # explicit meshes do not reshard implicitly
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axis, seq_axis, None, None))
        query, key, value = (jax.sharding.reshard(x, sharding) for x in (query, key, value))
    seed = jnp.uint32(0) if dropout_seed is None else as_seed(dropout_seed)  # an explicit, replicated input
    static = tuple(sorted((name, tuple(x) if isinstance(x, list) else x) for name, x in kwargs.items()))
    program = _sharded_program(mesh, seq_axis, batch_axis, dropout_seed is not None, seq_lengths is not None,
                               segment_ids is not None, check_layout(layout), static)
    out, lse = _compiled(program, (), query, key, value, seed, lengths, docs)(query, key, value, seed, lengths, docs)
    return (out, lse) if return_lse else out


@functools.cache
def _sharded_program(mesh, seq_axis, batch_axis, with_seed: bool, with_lengths: bool, with_docs: bool, layout: str,
                     static: tuple):
    """The ``shard_map`` of :func:`ring_dilated_attention` for one mesh and configuration (one
    function object per configuration, so an eager call's ``jit`` is compiled once)."""
    P = jax.sharding.PartitionSpec
    spec, lse_spec = P(batch_axis, seq_axis, None, None), P(batch_axis, seq_axis, None)
    num = mesh.shape[seq_axis]

    def f(q, k, v, seed, lengths, docs):
        if layout == "balanced":
            q, k, v = (shard_to_balanced(x, seq_axis, num) for x in (q, k, v))
        out, lse = ring_dilated_attention(q, k, v, axis_name=seq_axis, batch_axis=batch_axis, return_lse=True,
                                          dropout_seed=seed if with_seed else None, layout=layout,
                                          seq_lengths=lengths if with_lengths else None,
                                          segment_ids=docs if with_docs else None, **dict(static))
        if layout == "balanced":
            out, lse = (shard_from_balanced(x, seq_axis, num) for x in (out, lse))
        return out, lse

    return jax.shard_map(f, mesh=mesh, in_specs=(spec, spec, spec, P(), P(), P()), out_specs=(spec, lse_spec),
                         check_vma=False)
