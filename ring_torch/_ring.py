"""Ring dilated attention: the sequence sharded over P ranks, K/V row blocks sent around sub-rings.

Rank ``i`` of ``P`` holds global positions ``[i*L, (i+1)*L)``. The ring plan
(:mod:`ring_torch._ring_plan`, the units, pairs and hops of ``ring_jax._ring``) splits the units:

* ``w <= L`` (``L % w == 0``): every segment lies on one rank; all of a rank's local units run
  on its shard as one sub-plan by the call's executor (:mod:`ring_torch._dilated`), no
  communication.
* ``w > L`` (``w % L == 0``, ``L % r == 0``): a segment spans ``g = w / L`` consecutive ranks
  (sub-ring ``s`` = ranks ``[s*g, (s+1)*g)``; when ``n % w != 0`` the last one, holding the
  partial last segment, has ``g' = (n % w) / L`` ranks and runs as a ring of ``g'``). Each
  rank gathers its selected rows ``x_local.view(b, L//r, r, H, d)[:, :, o]`` (``L % r == 0``,
  so local offset = global offset) for each *distinct* ``(kv head, offset)`` pair of the unit
  (GQA heads are not replicated on the wire), K and V in one buffer; the ring unit (:mod:`ring_torch._ring_unit`) attends the blocks
  hop by hop as its communicator (:mod:`ring_torch._comm`) delivers them: ``g - 1`` K/V messages
  per rank forward, ``g - 1`` K/V and ``g - 1`` dK/dV messages in ``g`` exchanges backward
  (``g`` the size of the rank's sub-ring).

``layout="balanced"`` (:mod:`ring_torch._layout`): rank ``i`` holds the chunks ``i`` and
``2P-1-i`` of ``C = n / (2P)`` tokens; ``w' <= C`` is local, spanning units run on sub-rings of
``P`` ranks (``w' = n``) or ``w' / C`` ranks and their schedule gives every rank equal causal work
per hop. The layout is decided once per call: it picks the ring plan, each unit's schedule and
the mask coordinates.

``head_groups`` units fill in their own heads; ``longnet`` patterns are merged by their LSE.
Dropout (``dropout_p > 0``) draws each block's mask from global positions
(:mod:`ring_torch._dropout`), so the ring equals the single-device layer for the same seed.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np

import torch

from ring_torch._comm import COMMS, CommStats, make_communicator
from ring_torch._consistency import check_consistent
from ring_torch._config import (DilatedConfig, check_ring_size, check_segment_ids, check_seq_lengths,
                                check_shapes)
from ring_torch._coords import BlockCoords, MaskSpec
from ring_torch._api import dilated_attention, resolve_backend
from ring_torch._dilated import make_executor
from ring_torch._dropout import Dropout, make_dropout
from ring_torch._layout import balanced_order, check_layout, from_balanced, to_balanced
from ring_torch._plan import index_tensor
from ring_torch._ring_plan import RingPlan, RingUnit, build_ring_plan, ring_padded_length
from ring_torch._ring_unit import RingUnitFunction
from ring_torch._rows import (Padding, assemble_heads, from_ring, lse_merge, make_padding,
                              pad_inputs, to_ring, unpad_outputs)

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
    schedule = ru.schedule_of(comm.g)  # the sub-ring of this rank: whole, or the partial last one
    rows = [to_ring(x, idx, ru.rate, local_len, len(comm.js))
            for x, idx in ((q, idx_q), (k, idx_kv), (v, idx_kv))]  # [G, gl, b, m, X, d]
    coords = BlockCoords(spec, ru.pattern, ru.rate, local_len // ru.rate // schedule.pieces,
                         ru.heads, ru.offsets, b, batch_outer=False)  # rows per piece
    out, lse = RingUnitFunction.apply(*rows, comm, pair_index, scale, kernel, coords, schedule)
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


def _world_size(process_group) -> int:
    if process_group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(process_group)


def _ring_world(comm: str, ring_size, world: int) -> tuple[int, bool]:
    """``(ranks, simulated)`` of a call; ``ranks == 1``: no ring. Raises on invalid choices."""
    if comm not in COMMS:
        raise ValueError(f"unknown {comm=}; expected one of {COMMS}")
    ring_size = check_ring_size(ring_size)
    if world > 1 and ring_size not in (None, 1):
        raise ValueError(f"ring_size={ring_size} is for a single process; a process group of "
                         f"{world} ranks is the ring")
    if world > 1:
        return world, False
    return (1, False) if ring_size in (None, 1) else (ring_size, True)


@dataclass(frozen=True)
class _Prepared:
    """A validated call: ring size, layout, config, plan, backend, dropout and padding."""

    ranks: int
    simulated: bool
    layout: str = "contiguous"
    config: DilatedConfig | None = None
    rplan: RingPlan | None = None
    backend: str = ""
    compute: torch.dtype | None = None
    local_len: int = 0
    dropout: Dropout | None = None
    padding: Padding | None = None


def _prepare(query, key, value, config_args: dict, backend: str, comm: str, ring_size, world: int,
             dropout_p: float, dropout_seed, seq_lengths, layout: str, segment_ids=None) -> _Prepared:
    """Every local check of a call (``ValueError`` / ``TypeError``), nothing communicated. A
    simulated ring pads the sequence to :func:`ring_padded_length`; a process group's length
    ``n = L * P`` is the caller's."""
    layout = check_layout(layout)
    ranks, simulated = _ring_world(comm, ring_size, world)
    if ranks == 1:
        return _Prepared(1, False, layout)
    config = DilatedConfig(**config_args)
    b, nl, h, h_kv, _ = check_shapes(query, key, value)
    n = nl if simulated else nl * ranks
    lengths = check_seq_lengths(seq_lengths, b, n, query.device)
    docs = check_segment_ids(segment_ids, b, n, query.device)
    N = ring_padded_length(config, n, ranks, layout) if simulated else n
    L = N // ranks
    backend, compute = resolve_backend(backend, query.device, query.dtype)
    rplan = build_ring_plan(config, L, ranks, h, h_kv, layout)
    dropout = make_dropout(dropout_p, dropout_seed)
    padding = make_padding(lengths, b, n, N, config.is_causal, query.device, docs)
    return _Prepared(ranks, simulated, layout, config, rplan, backend, compute, L, dropout, padding)


def _mask_spec(prepared: _Prepared, rank: int) -> MaskSpec:
    """Where this process's rows sit globally: rank ``rank``'s shard (a process group) or the
    ``R`` shards of a simulated ring, each in the call's layout."""
    P, L, padding = prepared.ranks, prepared.local_len, prepared.padding
    pieces, piece_len = None, 0
    if prepared.layout == "balanced":
        order = balanced_order(P)
        chunks = order if prepared.simulated else order[2 * rank:2 * rank + 2]
        pieces, piece_len = tuple(c * (L // 2) for c in chunks), L // 2
    return MaskSpec(prepared.config.is_causal, prepared.dropout, base=rank * L, pieces=pieces,
                    piece_len=piece_len, **padding.mask_fields())


def _canonical(x):
    """A value as compared across ranks: lists as tuples, NumPy scalars as Python ones."""
    if isinstance(x, (list, tuple)):
        return tuple(_canonical(v) for v in x)
    if isinstance(x, np.generic):
        return x.item()
    return x


def _fingerprint(query, key, args: dict) -> tuple[dict, dict]:
    """``(codes, values)`` of this rank's call for the consistency exchange: int64 codes of the
    local shapes, the dtype and every argument that must agree, and their readable values.
    Never raises, whatever the arguments are (it runs before they are validated)."""
    def dims(x):
        return tuple(x.shape) if isinstance(x, torch.Tensor) and x.dim() == 4 else (-1,) * 4

    (b, n, h, d), h_kv = dims(query), dims(key)[2]
    values = dict(batch=b, local_len=n, heads=h, kv_heads=h_kv, head_dim=d,
                  dtype=str(getattr(query, "dtype", type(query).__name__)).removeprefix("torch."))
    values.update({name: _canonical(v) for name, v in args.items()})
    codes = {name: v if type(v) is int else zlib.crc32(repr(v).encode()) for name, v in values.items()}
    return codes, values


def _shared_seed(process_group, dropout: Dropout | None, timeout: float) -> Dropout | None:
    """The dropout with rank 0's seed (one exchange, nothing compared)."""
    if dropout is None:
        return None
    shared = check_consistent(process_group, {}, torch.device("cpu"), compare=False,
                              shared={"dropout_seed": dropout.seed}, timeout=timeout)
    return Dropout(dropout.p, shared["dropout_seed"])


def _checked(process_group, query, key, value, config_args: dict, backend: str, comm: str,
             ring_size, world: int, dropout_p: float, dropout_seed, timeout: float,
             seq_lengths, layout: str, segment_ids=None) -> _Prepared:
    """:func:`_prepare` on every rank, then the consistency exchange *before* raising: a rank
    whose own arguments are invalid still reaches it, so every rank raises (a rank raising alone
    would leave the others waiting in their first hop). Shares rank 0's dropout seed."""
    args = dict(config_args, backend=backend, ring_size=ring_size, comm=comm, dropout_p=dropout_p,
                seq_lengths_given=seq_lengths is not None, layout=layout,
                segment_ids_given=segment_ids is not None)
    codes, values = _fingerprint(query, key, args)
    try:
        prepared, error = _prepare(query, key, value, config_args, backend, comm, ring_size, world,
                                   dropout_p, dropout_seed, seq_lengths, layout, segment_ids), None
    except (ValueError, TypeError) as e:
        prepared, error = None, e
    dropout = None if prepared is None else prepared.dropout
    device = query.device if isinstance(query, torch.Tensor) else torch.device("cpu")
    shared = check_consistent(process_group, codes, device,
                              shared={"dropout_seed": 0 if dropout is None else dropout.seed},
                              error=error, values=values, timeout=timeout)
    if dropout is None:
        return prepared
    return replace(prepared, dropout=Dropout(dropout.p, shared["dropout_seed"]))


def ring_dilated_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                           segment_lengths, dilation_rates, mix: str = "head_groups",
                           is_causal: bool = False, softmax_scale: float | None = None,
                           return_lse: bool = False, backend: str = "auto",
                           ring_size: int | None = None, process_group=None,
                           comm: str = "ring", stats: CommStats | None = None,
                           check_consistency: bool = True, dropout_p: float = 0.0,
                           dropout_seed: int | None = None, timeout: float = 300.0,
                           seq_lengths: torch.Tensor | None = None, layout: str = "contiguous",
                           segment_ids: torch.Tensor | None = None):
    """Dilated attention (the definition of :func:`ring_torch.dilated_attention`) over a ring.

    * ``process_group`` with world size ``P > 1``: each rank passes its local shard
      ``[batch, n / P, heads, head_dim]`` of global positions ``[rank * L, (rank + 1) * L)`` and
      gets its shard of the output (and LSE). ``comm="ring"``: point-to-point hops between
      sub-ring neighbours; ``comm="all_gather"``: all-gather inside each sub-ring. Every rank
      must call the forward and the backward. ``n`` is the caller's: a pattern whose segments
      span ranks (``w' > L``) needs ``w' % L == 0`` and ``L % r == 0``, and runs on sub-rings
      of ``g = w' / L`` consecutive ranks; when ``n % w' != 0`` its last segment
      ``[n - n % w', n)`` is partial and runs on the last ``(n % w') / L`` ranks, a ring of
      their own (contiguous layout only); a local pattern needs ``L % w' == 0``.
    * ``ring_size=R > 1`` (single process): the full sequence viewed as ``R`` shards, spanning
      patterns computed hop by hop exactly as the distributed ring (bounded memory); any ``n``
      and ``R``: the sequence is padded to the smallest length ``R`` shards can run
      (:func:`ring_torch._ring_plan.ring_padded_length`) and the result cut back.
    * otherwise: :func:`ring_torch.dilated_attention` (``layout`` is then only validated).

    ``layout``: ``"contiguous"`` (the default: rank ``i`` holds ``[i*L, (i+1)*L)``) or
    ``"balanced"`` (:func:`ring_torch.to_balanced`): with a process group rank ``i`` passes, and
    gets back its shards of out and LSE in, the balanced order: chunk ``i`` then chunk
    ``2P-1-i`` of ``C = n / (2P)`` tokens, so causal work is equal on every rank; with
    ``ring_size=R`` the inputs and outputs stay in natural order (permuted inside, after padding
    ``n`` to the smallest length the balanced layout of ``R`` shards holds). Its rules:
    ``n % (2P) == 0``, the contiguous rules on ``2P`` chunks of ``C``, and every pattern with
    ``w' > C`` spans ``g = w' / C`` chunks with ``g == 2P`` or ``P % g == 0`` and no partial
    last segment (``n % w' == 0``; else a ``ValueError`` naming the pattern, ``n``, ``C`` and
    ``P``). Outputs, LSE, gradients and dropout masks are those of the contiguous layout (the
    same global definition). Per hop a
    rank sends the K/V of its whole shard, so a pattern with ``w' = n`` sends what the
    contiguous layout sends (``P - 1`` hops) and a split one takes ``g - 1`` hops; ``comm``
    ``"ring"`` and ``"all_gather"`` both run it.

    Checks in a process group (``check_consistency=True``, the default): every rank validates
    its own arguments (its sharding too: ``ValueError`` naming pattern, ``L`` and ``P``)
    *without raising yet*, then one small ``all_gather`` exchanges each rank's ok / error status
    and codes of its local shapes, dtype and every pattern, mix, causality, scale, backend,
    ``comm``, ``ring_size``, ``layout`` and ``dropout_p`` argument, and whether ``seq_lengths``
    and ``segment_ids`` are given. If any rank failed or any field differs,
    every rank raises: a ``ValueError`` (:class:`ring_torch.RingCheckError`) naming each
    differing field with its per-rank values and each failing rank's error, or, when every rank
    failed alike, its own error. Only then is any block sent.

    ``timeout`` (seconds, default 300) bounds the wait for the consistency exchange (each of its
    one or two ``all_gather``s, through ``Work.wait(timeout)``): a rank that never calls (or calls
    with another group) makes the others raise ``TimeoutError`` instead of hanging; the process
    group is then unusable. It does not bound the hops of the forward and backward, which wait
    under the process group's own timeout (``init_process_group(timeout=...)``).

    ``check_consistency=False`` skips the exchange (except, with dropout, one ``all_gather`` of
    rank 0's seed) and with it these guarantees: a rank whose arguments are invalid raises alone
    while the others wait in their first hop until the process group times out, and ranks with
    different shapes or configs exchange mismatched messages (gloo aborts the process on
    mismatched sizes; results are undefined).

    ``stats`` (a :class:`CommStats`) records the bytes this rank sends, per phase and pattern.

    ``dropout_p > 0``: dropout on the attention probabilities with the position-hashed mask of
    :func:`ring_torch.dilated_attention` (same mask in every mode, so results agree exactly with
    the single-device layer for the same ``dropout_seed``); blocks then run the math path, or the
    Triton rows kernels on cards in ``ring_torch._kernels.ROWS_TESTED``. In a
    process group every rank uses rank 0's seed (shared by the consistency ``all_gather``).

    ``seq_lengths``: integer ``[batch]``, the *global* real length of each batch entry (the
    same tensor on every rank of a process group), as in :func:`ring_torch.dilated_attention`:
    positions ``>= seq_lengths[b]`` are never a key, their rows give ``out = 0``,
    ``lse = -inf`` and zero gradients. Causal calls keep the fused kernels; non-causal ones hide
    padded keys per block from the block's global positions (the math kernel).

    ``segment_ids``: integer ``[batch, n]`` document ids of the *global* sequence in natural
    order (the same tensor on every rank of a process group, whatever the layout; with
    ``ring_size`` the full sequence), as in :func:`ring_torch.dilated_attention`: a key counts
    only for queries of its document; each block reads its rows' ids at their global positions.
    Every block then runs the masked math kernel (no fused kernel takes the mask yet).

    Returns ``out [batch, n_local, heads, head_dim]`` in the input dtype, and with
    ``return_lse`` also ``lse [batch, n_local, heads]`` (float64 for float64 inputs, else
    float32).
    """
    config_args = dict(segment_lengths=segment_lengths, dilation_rates=dilation_rates, mix=mix,
                       is_causal=is_causal, softmax_scale=softmax_scale)
    world = _world_size(process_group)
    if world > 1 and check_consistency:
        prepared = _checked(process_group, query, key, value, config_args, backend, comm,
                            ring_size, world, dropout_p, dropout_seed, timeout, seq_lengths, layout,
                            segment_ids)
    else:
        prepared = _prepare(query, key, value, config_args, backend, comm, ring_size, world,
                            dropout_p, dropout_seed, seq_lengths, layout, segment_ids)
        if world > 1:
            prepared = replace(prepared, dropout=_shared_seed(process_group, prepared.dropout, timeout))
    if prepared.ranks == 1:
        return dilated_attention(query, key, value, segment_lengths=segment_lengths,
                                 dilation_rates=dilation_rates, mix=mix, is_causal=is_causal,
                                 softmax_scale=softmax_scale, return_lse=return_lse,
                                 backend=backend, dropout_p=dropout_p, dropout_seed=dropout_seed,
                                 seq_lengths=seq_lengths, segment_ids=segment_ids)
    config, rplan, padding = prepared.config, prepared.rplan, prepared.padding
    backend, compute, L, simulated = prepared.backend, prepared.compute, prepared.local_len, prepared.simulated
    d, dtype, R = query.shape[-1], query.dtype, prepared.ranks
    rank = 0
    if not simulated:
        import torch.distributed as dist

        rank = dist.get_rank(process_group)
    scale = config.scale(d)
    spec = _mask_spec(prepared, rank)
    executor = make_executor(backend, query.device, compute, d, prepared.dropout, spec.needs_key_mask)
    make_comm = make_communicator(comm, process_group, R if simulated else None, L, stats)
    q, k, v = pad_inputs(padding, [x.to(compute) for x in (query, key, value)])
    permute = simulated and prepared.layout == "balanced"  # natural order in and out
    if permute:
        q, k, v = (to_balanced(x, R) for x in (q, k, v))
    out, lse = _ring_forward(rplan, q, k, v, scale, executor, spec, make_comm)
    if permute:
        out, lse = from_balanced(out, R), from_balanced(lse, R)
    out, lse = unpad_outputs(padding, out, lse, None if simulated else spec)
    out = out.to(dtype)
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if dtype == torch.float64 else torch.float32)
