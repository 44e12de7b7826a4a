"""Ring dilated attention: the sequence sharded over P ranks, K/V row blocks sent around sub-rings.

Rank ``i`` of ``P`` holds global positions ``[i*L, (i+1)*L)``. The ring plan
(:mod:`ring_torch._ring_plan`, the units, pairs and hops of ``ring_jax._ring``) splits the units:

* ``w <= L`` (``L % w == 0``): every segment lies on one rank; all of a rank's local units run
  on its shard as one sub-plan by the call's executor (:mod:`ring_torch._dilated`), no
  communication.
* ``w > L`` (``w % L == 0``, ``L % r == 0``): a segment spans ``g = w / L`` consecutive ranks
  (sub-ring ``s`` = ranks ``[s*g, (s+1)*g)``). Each rank gathers its selected rows
  ``x_local.view(b, L//r, r, H, d)[:, :, o]`` (``L % r == 0``, so local offset = global offset)
  for each *distinct* ``(kv head, offset)`` pair of the unit (GQA heads are not replicated on the
  wire), K and V in one buffer; the ring unit (:mod:`ring_torch._ring_unit`) attends the blocks
  hop by hop as its communicator (:mod:`ring_torch._comm`) delivers them: ``g - 1`` K/V messages
  per rank forward, ``g - 1`` K/V and ``g - 1`` dK/dV messages in ``g`` exchanges backward.

``head_groups`` units fill in their own heads; ``longnet`` patterns are merged by their LSE.
Dropout (``dropout_p > 0``) draws each block's mask from global positions
(:mod:`ring_torch._dropout`), so the ring equals the single-device layer for the same seed.
"""

from __future__ import annotations

import zlib
from dataclasses import replace

import torch

from ring_torch._comm import (COMMS, DTYPE_CODES, CommStats, check_consistent, float_bits,
                              make_communicator)
from ring_torch._config import DilatedConfig, check_ring_size, check_shapes
from ring_torch._coords import BlockCoords, MaskSpec
from ring_torch._dilated import dilated_attention, make_executor, resolve_backend
from ring_torch._dropout import Dropout, make_dropout
from ring_torch._plan import index_tensor
from ring_torch._ring_plan import RingPlan, RingUnit, build_ring_plan
from ring_torch._ring_unit import RingUnitFunction
from ring_torch._rows import assemble_heads, from_ring, lse_merge, to_ring

__all__ = ["ring_dilated_attention"]


def _span_unit(ru: RingUnit, q, k, v, local_len, comm, scale, kernel, spec: MaskSpec):
    """A spanning unit on ``q [b, nl, H, d]`` holding ``nl / L`` shards (1 distributed, R
    simulated); returns ``(out [b, nl, |heads|, d], lse [b, nl, |heads|])``."""
    b, nl, H, d = q.shape
    H_kv, Hu, dev = k.shape[2], len(ru.heads), q.device
    idx_q = index_tensor(tuple(o * H + j for j, o in zip(ru.heads, ru.offsets)), dev)
    idx_kv = index_tensor(tuple(o * H_kv + kvh for kvh, o in ru.pairs), dev)
    head0 = ru.heads[0]
    idx_out = index_tensor(tuple(o * Hu + (j - head0) for j, o in zip(ru.heads, ru.offsets)), dev)
    pair_index = index_tensor(ru.q_to_pair, dev)
    rows = [to_ring(x, idx, ru.rate, local_len, len(comm.js))
            for x, idx in ((q, idx_q), (k, idx_kv), (v, idx_kv))]  # [G, gl, b, m, X, d]
    coords = BlockCoords(spec, ru.pattern, ru.rate, local_len // ru.rate, ru.heads, ru.offsets, b,
                         batch_outer=False)
    out, lse = RingUnitFunction.apply(*rows, comm, pair_index, scale, kernel, coords)
    return from_ring(out, lse, idx_out, ru.rate, Hu)


def _ring_forward(rplan: RingPlan, q, k, v, scale, executor, spec: MaskSpec, make_comm):
    """``(out [b, nl, h, d], lse [b, nl, h])`` (float32+ where merged) of every ring unit."""
    plan = rplan.plan
    local_units = tuple(u for ru in rplan.units if ru.group == 1 for u in ru.local_units)
    local = None
    if local_units:  # local compute first, then the ring hops
        local_plan = replace(plan, seq_len=rplan.local_len, units=local_units)
        local = executor.run(local_plan, q, k, v, scale, spec, merged_out=True)  # 0 / -inf off its heads
    spans = [ru for ru in rplan.units if ru.group > 1]
    parts = [_span_unit(ru, q, k, v, rplan.local_len, make_comm(ru.group, ru.pattern), scale,
                        executor.kernel, spec) for ru in spans]
    if not plan.merged:
        return assemble_heads(local, parts, [ru.heads for ru in spans])
    parts += [] if local is None else [local]
    return lse_merge([o for o, _ in parts], [l for _, l in parts])


def _ring_world(comm: str, ring_size: int | None, process_group) -> tuple[int, bool]:
    """``(ranks, simulated)`` of a call; ``ranks == 1``: no ring. Raises on invalid choices."""
    if comm not in COMMS:
        raise ValueError(f"unknown {comm=}; expected one of {COMMS}")
    world = 1
    if process_group is not None:
        import torch.distributed as dist

        world = dist.get_world_size(process_group)
    ring_size = check_ring_size(ring_size)
    if world > 1 and ring_size not in (None, 1):
        raise ValueError(f"ring_size={ring_size} is for a single process; a process group of "
                         f"{world} ranks is the ring")
    if world > 1:
        return world, False
    return (1, False) if ring_size in (None, 1) else (ring_size, True)


def _local_len(seq_len: int, ranks: int, simulated: bool) -> int:
    """``L``: rows per rank (a simulated ring splits the whole sequence it was given)."""
    if not simulated:
        return seq_len
    if seq_len % ranks:
        raise ValueError(f"seq_len={seq_len} is not a multiple of ring_size={ranks}")
    return seq_len // ranks


def _agree(process_group, config: DilatedConfig, query, sizes: dict, backend: str, comm: str,
           dropout_p: float, dropout: Dropout | None, compare: bool) -> Dropout | None:
    """The consistency ``all_gather`` (:func:`ring_torch._comm.check_consistent`); returns the
    dropout with rank 0's seed."""
    fingerprint = (config.segment_lengths, config.dilation_rates, config.mix, config.is_causal,
                   config.softmax_scale is None, backend, comm)
    fields = {**sizes, "dtype": DTYPE_CODES.get(query.dtype, 0),
              "config": zlib.crc32(repr(fingerprint).encode()),
              "softmax_scale": float_bits(0.0 if config.softmax_scale is None else config.softmax_scale),
              "dropout_p": float_bits(dropout_p)}
    shared = check_consistent(process_group, fields, query.device,
                              shared={"dropout_seed": 0 if dropout is None else dropout.seed},
                              compare=compare)
    return None if dropout is None else Dropout(dropout.p, shared["dropout_seed"])


def ring_dilated_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                           segment_lengths, dilation_rates, mix: str = "head_groups",
                           is_causal: bool = False, softmax_scale: float | None = None,
                           return_lse: bool = False, backend: str = "auto",
                           ring_size: int | None = None, process_group=None,
                           comm: str = "ring", stats: CommStats | None = None,
                           check_consistency: bool = True, dropout_p: float = 0.0,
                           dropout_seed: int | None = None):
    """Dilated attention (the definition of :func:`ring_torch.dilated_attention`) over a ring.

    * ``process_group`` with world size ``P > 1``: each rank passes its local shard
      ``[batch, n / P, heads, head_dim]`` of global positions ``[rank * L, (rank + 1) * L)`` and
      gets its shard of the output (and LSE). ``comm="ring"``: point-to-point hops between
      sub-ring neighbours; ``comm="all_gather"``: all-gather inside each sub-ring. Every rank
      must call the forward and the backward. Before the first message every rank checks its
      sharding (``ValueError`` naming pattern, ``L`` and ``P``), then one small ``all_gather``
      checks that all ranks agree on shapes, dtype and config (``ValueError`` on every rank).
    * ``ring_size=R > 1`` (single process): the full sequence viewed as ``R`` shards, spanning
      patterns computed hop by hop exactly as the distributed ring (bounded memory).
    * otherwise: :func:`ring_torch.dilated_attention`.

    ``stats`` (a :class:`CommStats`) records the bytes this rank sends, per phase and pattern.

    ``dropout_p > 0``: dropout on the attention probabilities with the position-hashed mask of
    :func:`ring_torch.dilated_attention` (same mask in every mode, so results agree exactly with
    the single-device layer for the same ``dropout_seed``); blocks then run the math path. In a
    process group every rank uses rank 0's seed (shared by the consistency ``all_gather``).

    Returns ``out [batch, n_local, heads, head_dim]`` in the input dtype, and with
    ``return_lse`` also ``lse [batch, n_local, heads]`` (float64 for float64 inputs, else
    float32).
    """
    ranks, simulated = _ring_world(comm, ring_size, process_group)
    if ranks == 1:
        return dilated_attention(query, key, value, segment_lengths=segment_lengths,
                                 dilation_rates=dilation_rates, mix=mix, is_causal=is_causal,
                                 softmax_scale=softmax_scale, return_lse=return_lse,
                                 backend=backend, dropout_p=dropout_p, dropout_seed=dropout_seed)
    config = DilatedConfig(segment_lengths, dilation_rates, mix, is_causal, softmax_scale)
    b, nl, h, h_kv, d = check_shapes(query, key, value)
    L = _local_len(nl, ranks, simulated)
    dtype = query.dtype
    backend, compute = resolve_backend(backend, query.device, dtype)
    rplan = build_ring_plan(config, L, ranks, h, h_kv)  # raises before any communication
    dropout = make_dropout(dropout_p, dropout_seed)
    base = 0
    if not simulated:
        import torch.distributed as dist

        base = dist.get_rank(process_group) * L
        if check_consistency or dropout is not None:
            sizes = {"batch": b, "local_len": L, "heads": h, "kv_heads": h_kv, "head_dim": d}
            dropout = _agree(process_group, config, query, sizes, backend, comm, dropout_p,
                             dropout, compare=check_consistency)
    scale = config.scale(d)
    executor = make_executor(backend, query.device, compute, d, dropout)
    make_comm = make_communicator(comm, process_group, ranks if simulated else None, L, stats)
    q, k, v = (x.to(compute) for x in (query, key, value))
    spec = MaskSpec(config.is_causal, dropout, base=base)
    out, lse = _ring_forward(rplan, q, k, v, scale, executor, spec, make_comm)
    out = out.to(dtype)
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if dtype == torch.float64 else torch.float32)
