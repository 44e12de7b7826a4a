"""Ring dilated attention: the sequence sharded over P ranks, K/V row blocks sent around sub-rings.

Rank ``i`` of ``P`` holds global positions ``[i*L, (i+1)*L)``. Per unit (one pattern over some
query heads, each head at its offset; ``w`` the effective segment length ``min(w_i, n)``) the plan
is the one of ``ring_jax._ring`` (same units, same pairs, same hops):

* ``w <= L`` (``L % w == 0``): every segment lies on one rank; the single-device unit runs on the
  local shard, no communication (``backend="torch"`` without dropout: all of a rank's local
  units as one ``FusedDilated`` call, with the single-device layer's own backward).
* ``w > L`` (``w % L == 0``, ``L % r == 0``): a segment spans ``g = w / L`` consecutive ranks
  (sub-ring ``s`` = ranks ``[s*g, (s+1)*g)``). Each rank gathers its selected rows
  ``x_local.view(b, L//r, r, H, d)[:, :, o]`` (``L % r == 0``, so local offset = global offset)
  for each *distinct* ``(kv head, offset)`` pair of the unit (GQA heads are not replicated on the
  wire), K and V in one buffer, and passes it ``g - 1`` hops to the next rank of its sub-ring.
  At hop ``t`` the queries of group-rank ``j`` hold the block of group-rank ``(j - t) mod g``;
  partial ``(out, lse)`` are merged by LSE in float32 or better (NaN-safe). Causal: blocks of
  later ranks (``t > j``) are skipped (no compute, still forwarded), earlier blocks need no mask,
  only the own block is masked.

The backward (:class:`_RingUnitFunction`) sends K/V around the same sub-ring again (``g - 1``
hops); the dK/dV accumulator of the block in hand (float32 or better) starts on the rank that
holds it at hop 1, rides along from hop 2 on (same batched exchange as the K/V) and takes one last
hop home: ``g - 1`` K/V and ``g - 1`` dK/dV messages per rank, ``g`` exchanges. Every block uses
the final global ``(out, lse)`` of its rows (``dS = P * (dP - D + dlse)``, ``P = exp(S - lse)``,
``D = rowsum(dO * O)``, computed blockwise in float32 or better), so no per-hop scores are kept
and memory per rank does not grow with P.

Dropout (``dropout_p > 0``) multiplies each block's probabilities by a mask hashed from global
positions (:mod:`ring_torch._dropout`); the backward regenerates it, so the ring equals the
single-device layer for the same seed.

The same function runs three ways, chosen by its communicator:

* :class:`_DistRing`: ``torch.distributed.batch_isend_irecv`` of ``P2POp`` between sub-ring
  neighbours (only the strided rows of spanning patterns, nothing for local ones);
* :class:`_DistAllGather`: ``all_gather`` of the strided rows inside each sub-ring, the backward
  ``all_reduce`` of the dK/dV of all blocks (kept for comparison);
* :class:`_SimRing`: one process, the sequence viewed as ``R`` shards stacked on a rank axis; a
  hop is a roll of that axis inside each sub-ring, so only one hop's blocks are live at a time.

Tensors inside the ring function carry two leading axes ``[G, gl]``: the sub-rings and the
group-ranks this process holds (``[1, 1]`` in a distributed run, ``[R / g, g]`` simulated).
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass, replace

import torch

from ring_torch._config import DilatedConfig, check_shapes
from ring_torch._dilated import FusedDilated, _lse_merge, _run_pattern, _run_unit, resolve_backend
from ring_torch._dropout import Dropout, keep_mask, make_dropout
from ring_torch._kernels import block_attention, fused_block_grads
from ring_torch._plan import PATTERN_CACHE, DilatedPlan, Unit, build_plan, causal_mask, index_tensor

__all__ = ["RingUnit", "RingPlan", "CommStats", "build_ring_plan", "check_sharding",
           "ring_dilated_attention"]

COMMS = ("ring", "all_gather")


# ----------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RingUnit:
    """One unit as a rank sees it.

    ``heads``: the unit's query heads (absolute), in output order; ``offsets``: each head's offset.
    ``group`` (g): ranks one segment spans; 1 = local, run by the single-device ``local_units``.
    ``pairs``: the distinct ``(kv head, offset)`` pairs on the wire (sorted, as in ring_jax);
    ``q_to_pair``: the pair each query head reads.
    """

    pattern: int
    segment: int  # effective w'
    rate: int
    heads: tuple[int, ...]
    offsets: tuple[int, ...]
    group: int
    pairs: tuple[tuple[int, int], ...]
    q_to_pair: tuple[int, ...]
    local_units: tuple[Unit, ...]

    def rows(self, local_len: int) -> int:
        """Selected rows per rank of a spanning unit: ``L / r``."""
        return local_len // self.rate

    def hop_bytes(self, batch: int, local_len: int, head_dim: int, itemsize: int) -> int:
        """Bytes one rank sends per forward hop: K and V, ``L / r`` rows of each distinct pair."""
        return 2 * batch * self.rows(local_len) * len(self.pairs) * head_dim * itemsize


@dataclass(frozen=True)
class RingPlan:
    plan: DilatedPlan
    local_len: int
    world: int
    units: tuple[RingUnit, ...]  # head_groups: in head order; longnet: one per pattern

    def forward_bytes(self, batch: int, head_dim: int, itemsize: int) -> dict[int, int]:
        """Bytes one rank sends in the forward, per pattern: ``(g - 1)`` hops of
        :meth:`RingUnit.hop_bytes` (0 for local patterns)."""
        sent: dict[int, int] = defaultdict(int)
        for ru in self.units:
            sent[ru.pattern] += (ru.group - 1) * ru.hop_bytes(batch, self.local_len, head_dim,
                                                              itemsize)
        return dict(sent)

    def num_permutes(self, with_backward: bool = False) -> int:
        """Batched sub-ring exchanges per rank: ``g - 1`` forward hops per spanning unit; the
        backward adds ``g``: ``g - 1`` hops of K/V (with the dK/dV accumulators from the second
        on) and one that takes the accumulators home."""
        return sum(ru.group - 1 + (ru.group if with_backward else 0)
                   for ru in self.units if ru.group > 1)


def check_sharding(config: DilatedConfig, local_len: int, world: int):
    """``ValueError`` naming the pattern, ``L`` and ``P`` when the sharding cannot run the plan."""
    L, P, n = local_len, world, local_len * world
    for i, (w, r) in enumerate(zip(config.segment_lengths, config.dilation_rates)):
        we = min(w, n)
        where = f"pattern {i} (w={w}, w'={we}, r={r}) with local length L={L} on P={P} ranks"
        if we <= L:
            if L % we:
                raise ValueError(f"{where}: L is not a multiple of w'")
        else:
            if we % L:
                raise ValueError(f"{where}: w' is not a multiple of L")
            if L % r:
                raise ValueError(f"{where}: L is not a multiple of r")


def _ring_unit(pattern, segment, rate, heads, offsets, group_size, local_len, local_units):
    kv = [j // group_size for j in heads]
    span = segment // local_len if segment > local_len else 1
    if span == 1:
        return RingUnit(pattern, segment, rate, tuple(heads), tuple(offsets), 1, (), (),
                        tuple(local_units))
    pairs = tuple(sorted(set(zip(kv, offsets))))
    q_to_pair = tuple(pairs.index(p) for p in zip(kv, offsets))
    return RingUnit(pattern, segment, rate, tuple(heads), tuple(offsets), span, pairs, q_to_pair,
                    tuple(local_units))


def _build_ring(plan: DilatedPlan, local_len: int, world: int) -> RingPlan:
    group_size = plan.num_heads // plan.num_kv_heads
    units = []
    if plan.mix == "head_groups":
        for u in plan.units:
            heads = range(*u.q_heads)
            units.append(_ring_unit(u.pattern, u.segment, u.rate, heads, [u.offset] * len(heads),
                                    group_size, local_len, (u,)))
    else:
        for i, (w, r) in enumerate(zip(plan.segment_lengths, plan.dilation_rates)):
            heads = range(plan.num_heads)
            units.append(_ring_unit(i, w, r, heads, [j % r for j in heads], group_size, local_len,
                                    plan.pattern_units(i)))
    return RingPlan(plan, local_len, world, tuple(units))


def build_ring_plan(config: DilatedConfig, local_len: int, world: int, num_heads: int,
                    num_kv_heads: int) -> RingPlan:
    """The (cached) ring plan; checks the global sizes, then the sharding, before anything runs."""
    plan = build_plan(config, local_len * world, num_heads, num_kv_heads)
    check_sharding(config, local_len, world)
    key = ("ring", plan, local_len, world)
    return PATTERN_CACHE.get_or_create(key, lambda: _build_ring(plan, local_len, world))


# ----------------------------------------------------------------------------------------------
# Communicators
# ----------------------------------------------------------------------------------------------

class CommStats:
    """Bytes this rank sent, per ``(phase, pattern)``; phase is ``"forward"`` (K/V hops),
    ``"backward_kv"`` (K/V again) or ``"backward_grad"`` (dK/dV accumulators). ``messages``
    counts tensors sent per ``(phase, pattern)``, ``exchanges`` batched ring hops per pattern.

    A simulated ring records the bytes of one rank (all ranks send the same amount)."""

    def __init__(self):
        self.sent: dict[tuple[str, int], int] = defaultdict(int)
        self.messages: dict[tuple[str, int], int] = defaultdict(int)
        self.exchanges: dict[int, int] = defaultdict(int)  # batched ring hops, per pattern

    def add(self, phase: str, pattern: int, nbytes: int):
        self.sent[(phase, pattern)] += int(nbytes)
        self.messages[(phase, pattern)] += 1

    def bytes(self, phase: str = "forward") -> dict[int, int]:
        """``{pattern: bytes}`` of one phase."""
        return {p: b for (ph, p), b in self.sent.items() if ph == phase}

    def reset(self):
        self.sent.clear()
        self.messages.clear()
        self.exchanges.clear()

    def __repr__(self):
        return f"CommStats({dict(self.sent)})"


def _record(stats, pattern, tensors, phases, ranks_per_process):
    if stats is not None:
        stats.exchanges[pattern] += 1
        for t, phase in zip(tensors, phases, strict=True):
            stats.add(phase, pattern, t.numel() * t.element_size() // ranks_per_process)


class _Pending:
    def __init__(self, reqs, recvs):
        self.reqs, self.recvs = reqs, recvs

    def wait(self):
        for req in self.reqs:
            req.wait()
        return self.recvs


class _Done:
    def __init__(self, recvs):
        self.recvs = recvs

    def wait(self):
        return self.recvs


class _DistComm:
    js: tuple[int]
    s: int
    g: int

    def block_ranks(self, t: int) -> torch.Tensor:
        """``[[shard]]``: the shard whose block this rank holds at hop ``t``."""
        return torch.tensor([[self.s * self.g + (self.js[0] - t) % self.g]], dtype=torch.int64)


class _DistRing(_DistComm):
    """Point-to-point hops between sub-ring neighbours (``batch_isend_irecv``)."""

    kind = "ring"

    def __init__(self, group, g: int, stats: CommStats | None, pattern: int):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        rank = dist.get_rank(group)
        s, j = divmod(rank, g)
        self.js, self.s, self.g = (j,), s, g
        self.next = dist.get_global_rank(group, s * g + (j + 1) % g)
        self.prev = dist.get_global_rank(group, s * g + (j - 1) % g)
        self.stats, self.pattern, self.ranks_per_process = stats, pattern, 1

    def shift(self, tensors, phases):
        """Starts sending ``tensors`` to the next rank and receiving the previous rank's, in one
        ``batch_isend_irecv``; ``phases[i]`` labels ``tensors[i]`` in the stats."""
        dist = self.dist
        tensors = [t.contiguous() for t in tensors]
        recvs = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in recvs]
        reqs = dist.batch_isend_irecv(ops)
        _record(self.stats, self.pattern, tensors, phases, 1)
        return _Pending(reqs, recvs)


_SUBGROUPS: dict = {}


class _DistAllGather(_DistComm):
    """``all_gather`` of the strided rows inside each sub-ring; dK/dV by ``all_reduce``."""

    kind = "all_gather"

    def __init__(self, group, g: int, stats: CommStats | None, pattern: int):
        import torch.distributed as dist

        self.dist = dist
        rank = dist.get_rank(group)
        s, j = divmod(rank, g)
        self.js, self.s, self.g = (j,), s, g
        members = tuple(dist.get_global_rank(group, s * g + i) for i in range(g))
        key = (id(group), members)
        if key not in _SUBGROUPS:
            # Only the members create (and synchronise on) their sub-group.
            _SUBGROUPS[key] = dist.new_group(list(members), use_local_synchronization=True)
        self.subgroup = _SUBGROUPS[key]
        self.stats, self.pattern, self.ranks_per_process = stats, pattern, 1

    def gather(self, x: torch.Tensor, phase: str) -> list[torch.Tensor]:
        x = x.contiguous()
        blocks = [torch.empty_like(x) for _ in range(self.g)]
        self.dist.all_gather(blocks, x, group=self.subgroup)
        if self.stats is not None:  # this rank's block reaches g - 1 peers
            self.stats.add(phase, self.pattern, (self.g - 1) * x.numel() * x.element_size())
        return blocks

    def all_reduce(self, x: torch.Tensor, phase: str) -> torch.Tensor:
        x = x.contiguous()
        self.dist.all_reduce(x, group=self.subgroup)
        if self.stats is not None:
            self.stats.add(phase, self.pattern, x.numel() * x.element_size())
        return x


class _SimRing:
    """One process holding all ranks (``[2, G, g, ...]`` buffers): a hop is a roll of the g axis."""

    kind = "ring"

    def __init__(self, g: int, stats: CommStats | None, pattern: int, num_ranks: int):
        self.js, self.g, self.num_ranks = tuple(range(g)), g, num_ranks
        self.stats, self.pattern, self.ranks_per_process = stats, pattern, num_ranks

    def shift(self, tensors, phases):
        _record(self.stats, self.pattern, tensors, phases, self.ranks_per_process)
        # Every buffer is [2, G, g, ...]: group-rank j receives the block of j - 1.
        return _Done([torch.roll(t, 1, dims=2) for t in tensors])

    def block_ranks(self, t: int) -> torch.Tensor:
        """``[G, g]``: the shard whose block each simulated rank holds at hop ``t``."""
        ranks = torch.arange(self.num_ranks, dtype=torch.int64).view(-1, self.g)
        return torch.roll(ranks, t, dims=1)


# ----------------------------------------------------------------------------------------------
# The ring unit: forward and backward
# ----------------------------------------------------------------------------------------------

def _fold(x, lo):
    """``[G, gl, b, m, X, d]`` -> the active group-ranks ``[lo:]`` folded into the batch."""
    return x[:, lo:].reshape(-1, *x.shape[3:])


def _first_active(js, t, causal):
    """Index of the first local group-rank that attends the block of hop ``t`` (causal: the
    block of ``j - t`` is in the future when ``t > j``)."""
    return sum(1 for j in js if j < t) if causal else 0


# Score elements (B * H * rows * keys) one chunk of the block backward materialises at most.
GRAD_CHUNK_ELEMENTS = 1 << 24


def _block_grads(q, k, v, lse, dout, D, dlse, pair_index, num_pairs, scale, causal, keep=None,
                 dropout_p=0.0):
    """Gradients of one block from the rows' *global* ``(out, lse)``, all in float32+.

    ``q``/``dout [B, m, H, d]``, ``k``/``v [B, m, Np, d]``, ``lse``/``D``/``dlse [B, m, H]``.
    Returns ``dq [B, m, H, d]`` and ``dk``, ``dv [B, m, Np, d]``. With dropout (``keep
    [B, H, m, m]``, ``M = keep / (1 - p)``): ``dV = (P M)^T dO``, ``dS = P (M dP - D + dlse)``
    (``D = rowsum(dO * O)`` of the dropped output).

    Query rows are processed in chunks of at most :data:`GRAD_CHUNK_ELEMENTS` scores, so the
    backward never holds an ``m x m`` block for long shards; causal chunks stop at their last
    row's key."""
    ke, ve = k.index_select(2, pair_index), v.index_select(2, pair_index)  # [B, m, H, d]
    B, m, H, d = q.shape
    rows = max(1, GRAD_CHUNK_ELEMENTS // max(1, B * H * m))
    dq = torch.empty_like(q)
    dk_h, dv_h = torch.zeros_like(ke), torch.zeros_like(ve)
    row_terms = (D - dlse).transpose(1, 2).unsqueeze(-1)  # [B, H, m, 1]
    lse_t = lse.transpose(1, 2).unsqueeze(-1)
    for c0 in range(0, m, rows):
        c1 = min(m, c0 + rows)
        kend = c1 if causal else m  # causal: keys after the chunk's last row are all masked
        qc, dc = q[:, c0:c1], dout[:, c0:c1]
        kc, vc = ke[:, :kend], ve[:, :kend]
        s = torch.einsum("bihd,bjhd->bhij", qc, kc) * scale  # [B, H, c, kend]
        if causal:
            s = s.masked_fill(causal_mask(m, s.device)[c0:c1, :kend], float("-inf"))
        p = torch.exp(s - lse_t[:, :, c0:c1])
        dp = torch.einsum("bihd,bjhd->bhij", dc, vc)
        pv = p
        if keep is not None:
            scaled = keep[:, :, c0:c1, :kend].to(p.dtype) / (1.0 - dropout_p)
            dp, pv = dp * scaled, p * scaled
        ds = p * (dp - row_terms[:, :, c0:c1])
        dq[:, c0:c1] = torch.einsum("bhij,bjhd->bihd", ds, kc) * scale
        dk_h[:, :kend] += torch.einsum("bhij,bihd->bjhd", ds, qc) * scale
        dv_h[:, :kend] += torch.einsum("bhij,bihd->bjhd", pv, dc)
    return (dq, *_sum_into_pairs(dk_h, dv_h, pair_index, num_pairs))


def _sum_into_pairs(dk_h, dv_h, pair_index, num_pairs):
    """Per-query-head ``dk``/``dv [B, m, H, d]`` summed into their (kv head, offset) pairs
    ``[B, m, num_pairs, d]`` (the transpose of ``index_select(2, pair_index)``)."""
    B, m, _, d = dk_h.shape
    dk = torch.zeros(B, m, num_pairs, d, dtype=dk_h.dtype, device=dk_h.device)
    return dk.index_add_(2, pair_index, dk_h), torch.zeros_like(dk).index_add_(2, pair_index, dv_h)


def _fused_grads(q, k, v, out, lse, dout, dlse, pair_index, num_pairs, scale, causal):
    """``_block_grads`` by the fused backward kernel of ``backend="torch"`` (no dropout; ``dlse``
    None: zero); operands in the input dtype. Same shapes; float32+ results."""
    grads = fused_block_grads(dout, q, k.index_select(2, pair_index), v.index_select(2, pair_index), out, lse,
                              dlse, scale=scale, is_causal=causal, backend="torch")
    dq, dk_h, dv_h = (x.to(lse.dtype) for x in grads)
    return (dq, *_sum_into_pairs(dk_h, dv_h, pair_index, num_pairs))


@dataclass(frozen=True, eq=False)
class _UnitDropout:
    """Dropout masks of a spanning unit's blocks, from global positions (see ``_dropout``)."""

    dropout: Dropout
    pattern: int
    local_len: int
    rate: int
    heads: torch.Tensor  # [H] global query heads
    offsets: torch.Tensor  # [H] offset of each head (its pair's offset too)

    @property
    def p(self) -> float:
        return self.dropout.p

    def keep(self, comm, t: int, lo: int, b: int, m: int) -> torch.Tensor:
        """``[G * (gl - lo) * b, H, m, m]`` for the active ranks ``[lo:]`` at hop ``t``."""
        dev = self.heads.device
        rows = torch.arange(m, device=dev) * self.rate  # [m]

        def positions(shards):  # [G, gla] -> [G * gla * b, H, m]
            pos = (shards.to(dev)[:, :, None, None, None] * self.local_len
                   + self.offsets[:, None] + rows)  # [G, gla, 1, H, m]
            return pos.expand(*shards.shape, b, len(self.heads), m).reshape(-1, len(self.heads), m)

        qpos = positions(comm.block_ranks(0)[:, lo:])
        kpos = positions(comm.block_ranks(t)[:, lo:])
        batch = self.dropout.batch_base + torch.arange(b, device=dev).repeat(qpos.shape[0] // b)
        return keep_mask(self.dropout.seed, self.pattern, batch, self.heads, qpos, kpos,
                         self.dropout.p)


class _RingUnitFunction(torch.autograd.Function):
    """``q [G, gl, b, m, H, d]``, ``k``/``v [G, gl, b, m, Np, d]`` (the local selected rows) ->
    ``out [G, gl, b, m, H, d]`` (q's dtype), ``lse [G, gl, b, m, H]`` (float32+)."""

    @staticmethod
    def forward(ctx, q, k, v, comm, g, pair_index, scale, causal, backend, drop):
        compute = torch.promote_types(q.dtype, torch.float32)
        G, gl, b, m, H, d = q.shape
        kv = torch.stack([k, v]).contiguous()  # the wire buffer: K and V of every pair
        out = torch.zeros(G, gl, b, m, H, d, dtype=compute, device=q.device)
        lse = torch.full((G, gl, b, m, H), float("-inf"), dtype=compute, device=q.device)
        blocks = comm.gather(kv, "forward") if comm.kind == "all_gather" else None
        for t in range(g):
            pending = None
            if blocks is not None:
                kv = blocks[(comm.js[0] - t) % g]
            elif t < g - 1:
                pending = comm.shift([kv], ["forward"])  # overlaps the compute below
            lo = _first_active(comm.js, t, causal)
            if lo < gl:
                ke = kv[0].index_select(4, pair_index)
                ve = kv[1].index_select(4, pair_index)
                keep = None if drop is None else drop.keep(comm, t, lo, b, m)
                o, l = block_attention(_fold(q, lo), _fold(ke, lo), _fold(ve, lo), scale=scale,
                                       is_causal=causal and t == 0, backend=backend, keep=keep,
                                       dropout_p=0.0 if drop is None else drop.p)
                shape = (G, gl - lo, b, m, H)
                o, l = o.reshape(*shape, d).to(compute), l.reshape(shape).to(compute)
                out[:, lo:], lse[:, lo:] = _lse_merge([out[:, lo:], o], [lse[:, lo:], l])
            if pending is not None:
                (kv,) = pending.wait()
        ctx.save_for_backward(q, k, v, out, lse, pair_index)
        ctx.comm, ctx.g, ctx.scale, ctx.causal, ctx.drop = comm, g, scale, causal, drop
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        return out.to(q.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, pair_index = ctx.saved_tensors
        comm, g, scale, causal, drop = ctx.comm, ctx.g, ctx.scale, ctx.causal, ctx.drop
        compute = out.dtype
        G, gl, b, m, H, d = q.shape
        Np = k.shape[4]
        # Without dropout, each block's gradient is the fused kernel's backward run with the
        # global (out, lse) (exact: the module docstring's formula); else the float32 formula.
        fused = drop is None and ctx.backend == "torch"
        # The fused kernels take operands in the input dtype; the float32 formula in `compute`.
        operand = q.dtype if fused else compute
        dout = torch.zeros(out.shape, dtype=operand, device=out.device) if dout is None else dout.to(operand)
        if dlse is not None or not fused:
            dlse = torch.zeros_like(lse) if dlse is None else dlse.to(compute)
            dlse = torch.where(torch.isfinite(lse), dlse, torch.zeros_like(dlse))
        if fused:
            out_in = out.to(q.dtype)
        else:
            D = (dout * out).sum(-1)  # [G, gl, b, m, H]
            qc = q.to(compute)
        dq = torch.zeros(q.shape, dtype=compute, device=q.device)

        def block(kv, t):
            """Adds to dq in place; returns the ``[2, G, gl, b, m, Np, d]`` dK/dV of the block."""
            kvc = kv.to(operand)
            dkv = torch.zeros(2, G, gl, b, m, Np, d, dtype=compute, device=q.device)
            lo = _first_active(comm.js, t, causal)
            if lo < gl:
                if fused:
                    dq_t, dk_t, dv_t = _fused_grads(
                        _fold(q, lo), _fold(kvc[0], lo), _fold(kvc[1], lo), _fold(out_in, lo), _fold(lse, lo),
                        _fold(dout, lo), None if dlse is None else _fold(dlse, lo), pair_index, Np, scale,
                        causal and t == 0)
                else:
                    keep = None if drop is None else drop.keep(comm, t, lo, b, m)
                    dq_t, dk_t, dv_t = _block_grads(
                        _fold(qc, lo), _fold(kvc[0], lo), _fold(kvc[1], lo), _fold(lse, lo),
                        _fold(dout, lo), _fold(D, lo), _fold(dlse, lo), pair_index, Np, scale,
                        causal and t == 0, keep, 0.0 if drop is None else drop.p)
                dq[:, lo:] += dq_t.reshape(G, gl - lo, b, m, H, d)
                dkv[0, :, lo:] = dk_t.reshape(G, gl - lo, b, m, Np, d)
                dkv[1, :, lo:] = dv_t.reshape(G, gl - lo, b, m, Np, d)
            return dkv

        kv = torch.stack([k, v]).contiguous()
        if comm.kind == "all_gather":
            blocks = comm.gather(kv, "backward_kv")
            j = comm.js[0]
            # Indexed by hop t (the block of j - t), then by source rank for the all-reduce.
            dkv_all = torch.stack([block(blocks[(j - t) % g], t) for t in range(g)])
            order = [(j - src) % g for src in range(g)]  # hop of each source rank
            dkv = comm.all_reduce(dkv_all[order], "backward_grad")[j]
        else:
            dkv = block(kv, 0)  # own block (the only masked one)
            acc = None  # dK/dV of the block in hand, from hop 1 on
            for t in range(1, g):
                # One batched hop: the K/V of the block in hand and, from hop 2 on, its dK/dV.
                if acc is None:
                    (kv,) = comm.shift([kv], ["backward_kv"]).wait()
                else:
                    kv, acc = comm.shift([kv, acc], ["backward_kv", "backward_grad"]).wait()
                contrib = block(kv, t)
                acc = contrib if acc is None else acc + contrib
            if acc is not None:
                (acc,) = comm.shift([acc], ["backward_grad"]).wait()  # home to the owner
                dkv = dkv + acc
        return (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype),
                None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Layer
# ----------------------------------------------------------------------------------------------

def _span_unit(ru: RingUnit, q, k, v, local_len, comm, scale, causal, backend, drop=None):
    """A spanning unit on ``q [b, nl, H, d]`` holding ``nl / L`` shards (1 distributed, R
    simulated); returns ``(out [b, nl, |heads|, d], lse [b, nl, |heads|])``."""
    b, nl, H, d = q.shape
    H_kv = k.shape[2]
    r, L, g = ru.rate, local_len, ru.group
    Rl, m, Hu = nl // L, L // r, len(ru.heads)
    dev = q.device
    idx_q = index_tensor(tuple(o * H + j for j, o in zip(ru.heads, ru.offsets)), dev)
    idx_kv = index_tensor(tuple(o * H_kv + kvh for kvh, o in ru.pairs), dev)
    head0 = ru.heads[0]
    idx_out = index_tensor(tuple(o * Hu + (j - head0) for j, o in zip(ru.heads, ru.offsets)), dev)
    pair_index = index_tensor(ru.q_to_pair, dev)

    def to_ring(x, idx):  # [b, nl, X, d] -> selected rows [G, gl, b, m, |idx|, d]
        rows = x.reshape(b, Rl, m, r * x.shape[2], d).index_select(3, idx)
        return rows.movedim(1, 0).reshape(Rl // len(comm.js), len(comm.js), b, m, len(idx), d)

    out, lse = _RingUnitFunction.apply(to_ring(q, idx_q), to_ring(k, idx_kv), to_ring(v, idx_kv),
                                       comm, g, pair_index, scale, causal, backend, drop)
    out = out.reshape(Rl, b, m, Hu, d).movedim(0, 1)  # [b, Rl, m, Hu, d]
    lse = lse.reshape(Rl, b, m, Hu).movedim(0, 1)
    full_out = out.new_zeros(b, Rl, m, r * Hu, d).index_copy(3, idx_out, out)
    full_lse = lse.new_full((b, Rl, m, r * Hu), float("-inf")).index_copy(3, idx_out, lse)
    return full_out.reshape(b, nl, Hu, d), full_lse.reshape(b, nl, Hu)


def _run_ring_unit(ru, rplan, q, k, v, scale, backend, make_comm, dropout):
    plan = rplan.plan
    if ru.group == 1:  # local: the single-device unit on this shard (dropout at global positions)
        if plan.mix == "head_groups":
            return _run_unit(ru.local_units[0], q, k, v, scale, plan.is_causal, backend, dropout)
        return _run_pattern(plan, ru.pattern, q, k, v, scale, backend, dropout)
    drop = None
    if dropout is not None:
        drop = _UnitDropout(dropout, ru.pattern, rplan.local_len, ru.rate,
                            torch.tensor(ru.heads, device=q.device),
                            torch.tensor(ru.offsets, device=q.device))
    return _span_unit(ru, q, k, v, rplan.local_len, make_comm(ru), scale, plan.is_causal, backend,
                      drop)


def _ring_forward(rplan: RingPlan, q, k, v, scale, backend, make_comm, dropout=None):
    plan = rplan.plan
    # backend "torch" without dropout: every local unit in one fused call (its own backward)
    fused = backend == "torch" and dropout is None and any(ru.group == 1 for ru in rplan.units)
    if fused:  # local compute first, as the unit-by-unit path does, then the ring hops
        units = tuple(u for ru in rplan.units if ru.group == 1 for u in ru.local_units)
        local_plan = replace(plan, seq_len=rplan.local_len, units=units)
        local = FusedDilated.apply(q, k, v, local_plan, scale, True)  # [b, nl, h, d]: 0 / -inf off its heads
    parts = [_run_ring_unit(ru, rplan, q, k, v, scale, backend, make_comm, dropout)
             for ru in rplan.units if not (fused and ru.group == 1)]
    if plan.mix == "head_groups":
        if not fused:  # units in head order
            return parts[0] if len(parts) == 1 else tuple(torch.cat(x, dim=2) for x in zip(*parts))
        if not parts:
            return local
        heads = index_tensor(tuple(j for ru in rplan.units if ru.group > 1 for j in ru.heads), q.device)
        return tuple(full.index_copy(2, heads, torch.cat(x, dim=2)) for full, x in zip(local, zip(*parts)))
    if fused:
        parts.append(local)
    return _lse_merge([o for o, _ in parts], [l for _, l in parts])


_DTYPE_CODES = {torch.float64: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4}


def _check_consistent(group, fields: dict, device: torch.device, shared: dict | None = None,
                      compare: bool = True) -> dict:
    """One small ``all_gather`` of this rank's shapes and config hash; every rank raises the
    same ``ValueError`` when they differ (instead of hanging in a mismatched hop). ``shared``
    values are not compared: every rank gets rank 0's (the dropout seed)."""
    import torch.distributed as dist

    shared = shared or {}
    if dist.get_backend(group) != "nccl":  # NCCL needs device tensors, gloo takes CPU ones
        device = torch.device("cpu")
    values = torch.tensor(list(fields.values()) + list(shared.values()), dtype=torch.int64,
                          device=device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(gathered, values, group=group)
    rows = torch.stack(gathered)[:, :len(fields)]
    if compare and not bool((rows == rows[0]).all()):
        names = list(fields)
        diff = {names[c]: rows[:, c].tolist() for c in range(len(names))
                if not bool((rows[:, c] == rows[0, c]).all())}
        raise ValueError(f"ring ranks disagree on inputs/config (per rank): {diff}")
    first = gathered[0][len(fields):].tolist()
    return dict(zip(shared, first))


def _float_bits(x: float) -> int:
    return torch.tensor([float(x)], dtype=torch.float64).view(torch.int64).item()


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
    """
    from ring_torch._dilated import dilated_attention

    if comm not in COMMS:
        raise ValueError(f"unknown {comm=}; expected one of {COMMS}")
    world = 1
    if process_group is not None:
        import torch.distributed as dist

        world = dist.get_world_size(process_group)
    if ring_size is not None and ring_size < 1:
        raise ValueError(f"{ring_size=} must be positive")
    if world > 1 and ring_size not in (None, 1):
        raise ValueError(f"ring_size={ring_size} is for a single process; a process group of "
                         f"{world} ranks is the ring")
    simulated = world == 1 and ring_size not in (None, 1)
    if world == 1 and not simulated:
        return dilated_attention(query, key, value, segment_lengths=segment_lengths,
                                 dilation_rates=dilation_rates, mix=mix, is_causal=is_causal,
                                 softmax_scale=softmax_scale, return_lse=return_lse,
                                 backend=backend, dropout_p=dropout_p, dropout_seed=dropout_seed)

    config = DilatedConfig(segment_lengths, dilation_rates, mix, is_causal, softmax_scale)
    b, nl, h, h_kv, d = check_shapes(query, key, value)
    P = ring_size if simulated else world
    if simulated:
        if nl % P:
            raise ValueError(f"seq_len={nl} is not a multiple of ring_size={P}")
        L = nl // P
    else:
        L = nl
    dtype = query.dtype
    backend, compute = resolve_backend(backend, query.device, dtype)
    rplan = build_ring_plan(config, L, P, h, h_kv)  # raises before any communication
    dropout = make_dropout(dropout_p, dropout_seed)
    if not simulated and (check_consistency or dropout is not None):
        shared = _check_consistent(process_group, {
            "batch": b, "local_len": L, "heads": h, "kv_heads": h_kv, "head_dim": d,
            "dtype": _DTYPE_CODES.get(dtype, 0), "config": zlib.crc32(repr(
                (config.segment_lengths, config.dilation_rates, mix, bool(is_causal),
                 softmax_scale is None, backend, comm)).encode()),
            "softmax_scale": _float_bits(0.0 if softmax_scale is None else softmax_scale),
            "dropout_p": _float_bits(dropout_p)}, query.device,
            shared={"dropout_seed": 0 if dropout is None else dropout.seed},
            compare=check_consistency)
        if dropout is not None:
            import torch.distributed as dist

            dropout = Dropout(dropout.p, shared["dropout_seed"],
                              base=dist.get_rank(process_group) * L)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale

    if simulated:
        def make_comm(ru):
            return _SimRing(ru.group, stats, ru.pattern, P)
    else:
        cls = _DistRing if comm == "ring" else _DistAllGather

        def make_comm(ru):
            return cls(process_group, ru.group, stats, ru.pattern)

    q, k, v = (x.to(compute) for x in (query, key, value))
    out, lse = _ring_forward(rplan, q, k, v, scale, backend, make_comm, dropout)
    out = out.to(dtype)
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if dtype == torch.float64 else torch.float32)
