"""Communicators of the ring: how the K/V blocks of a spanning unit travel around its sub-ring,
and how their dK/dV come home. Each owns its forward and backward exchange:

* :class:`_DistRing`: ``torch.distributed.batch_isend_irecv`` of ``P2POp`` between sub-ring
  neighbours; the backward sends K/V around again (``g - 1`` hops), the dK/dV accumulator of the
  block in hand rides along from hop 2 on and takes one last hop home (``g`` exchanges).
* :class:`_DistAllGather`: ``all_gather`` of the blocks inside each sub-ring; the backward
  ``all_reduce``s the dK/dV of all blocks (kept for comparison).
* :class:`_SimRing`: one process, the sequence viewed as ``R`` shards stacked on a rank axis; a
  hop is a roll of that axis inside each sub-ring (only one hop's blocks are live at a time).

Buffers carry two leading axes ``[G, gl]`` after the K/V axis: the sub-rings and the group-ranks
this process holds (``[1, 1]`` distributed, ``[R / g, g]`` simulated). Which blocks a rank
computes at each hop is the unit's schedule (:mod:`ring_torch._layout`), not the communicator's.

A distributed communicator of a unit with sub-rings of ``group`` ranks runs the sub-ring holding
its rank (:func:`ring_torch._layout.sub_ring_of`): ``g = group``, or on the partial last one
``g = P % group`` ranks, a ring of its own size (``g - 1`` hops, sub-group of ``g`` ranks); its
``g`` is what the ring unit loops over and picks the schedule by.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterator

import torch

from ring_torch._layout import sub_ring_of, sub_rings

__all__ = ["COMMS", "CommStats", "make_communicator"]

COMMS = ("ring", "all_gather")


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
    """Counts one batched exchange and the bytes of each tensor (per rank)."""
    if stats is not None:
        stats.exchanges[pattern] += 1
        for t, phase in zip(tensors, phases, strict=True):
            stats.add(phase, pattern, t.numel() * t.element_size() // ranks_per_process)


class _Pending:
    """Receives of a started ``batch_isend_irecv``; :meth:`wait` returns them."""

    def __init__(self, reqs, recvs):
        self.reqs, self.recvs = reqs, recvs

    def wait(self):
        for req in self.reqs:
            req.wait()
        return self.recvs


class _Done:
    """Receives already in hand (the simulated ring)."""

    def __init__(self, recvs):
        self.recvs = recvs

    def wait(self):
        return self.recvs


class _Comm:
    """What the ring unit asks of a communicator. ``js``: the group-ranks this process holds,
    ``g``: the sub-ring size, ``local_len``: rows per rank."""

    js: tuple[int, ...]
    g: int
    local_len: int

    def block_shards(self, t: int) -> tuple[tuple[int, ...], ...]:
        """``[G][gl]``: the shard whose block each held group-rank has at hop ``t``."""
        raise NotImplementedError

    def block_starts(self, t: int, lo: int) -> tuple[int, ...]:
        """Global start position of the block each held group-rank ``[lo:]`` has at hop ``t``
        (sub-rings outer)."""
        return tuple(s * self.local_len for row in self.block_shards(t) for s in row[lo:])

    def forward_blocks(self, kv: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """``(t, block)`` per hop ``t < g``, from this rank's own ``kv [2, G, gl, ...]`` on."""
        raise NotImplementedError

    def backward_exchange(self, kv: torch.Tensor,
                          block_grads: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        """The dK/dV ``[2, G, gl, ...]`` of this rank's own ``kv``: ``block_grads(block, t)`` is
        the dK/dV of the block held at hop ``t``, summed at the block's owner."""
        raise NotImplementedError


class _ShiftComm(_Comm):
    """The hop-by-hop exchange over :meth:`shift` (point-to-point or simulated)."""

    def shift(self, tensors, phases):
        raise NotImplementedError

    def forward_blocks(self, kv):
        for t in range(self.g):
            pending = self.shift([kv], ["forward"]) if t < self.g - 1 else None  # overlaps the compute
            yield t, kv
            if pending is not None:
                (kv,) = pending.wait()

    def backward_exchange(self, kv, block_grads):
        dkv = block_grads(kv, 0)  # own block (the only masked one)
        acc = None  # dK/dV of the block in hand, from hop 1 on
        for t in range(1, self.g):
            # One batched hop: the K/V of the block in hand and, from hop 2 on, its dK/dV.
            if acc is None:
                (kv,) = self.shift([kv], ["backward_kv"]).wait()
            else:
                kv, acc = self.shift([kv, acc], ["backward_kv", "backward_grad"]).wait()
            contrib = block_grads(kv, t)
            acc = contrib if acc is None else acc + contrib
        if acc is not None:
            (acc,) = self.shift([acc], ["backward_grad"]).wait()  # home to the owner
            dkv = dkv + acc
        return dkv


class _DistComm:
    """The sub-ring of this rank in a process group: its first rank ``first``, its size ``g``
    (``group``, or fewer on a partial last sub-ring), and this rank's position ``j`` in it."""

    def _place(self, group, g: int, local_len: int, stats, pattern: int):
        rank = self.dist.get_rank(group)
        self.first, self.g = sub_ring_of(rank, self.dist.get_world_size(group), g)
        self.js, self.local_len = (rank - self.first,), local_len
        self.stats, self.pattern = stats, pattern

    def block_shards(self, t):
        return ((self.first + (self.js[0] - t) % self.g,),)

    def member(self, i: int) -> int:
        """The global rank of position ``i`` (mod ``g``) of this sub-ring."""
        return self.dist.get_global_rank(self.group, self.first + i % self.g)


class _DistRing(_DistComm, _ShiftComm):
    """Point-to-point hops between sub-ring neighbours (``batch_isend_irecv``)."""

    def __init__(self, group, g: int, stats: CommStats | None, pattern: int, local_len: int):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self._place(group, g, local_len, stats, pattern)
        j = self.js[0]
        self.next, self.prev = self.member(j + 1), self.member(j - 1)

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


def _sub_ring_groups(dist, group, g: int):
    """The process groups of the sub-rings of ``g`` ranks of ``group`` (:func:`sub_rings`:
    group ranks ``[s*g, (s+1)*g)``, the last one shorter when ``g`` does not divide the group's
    size), keyed by first rank, or None where they cannot be created safely (then the exchange
    runs point to point).

    ``g`` at least the group's size: the group itself. A group spanning every process: all
    sub-groups of the partition, of equal size or not, are created by every rank, in the same
    order and without local synchronisation (``new_group`` is then a collective of all processes
    and its names do not depend on groups a rank created before), once per ``(group, g)``. A
    group of only some processes cannot create sub-groups without the other processes, so it
    gets None."""
    size = dist.get_world_size(group)
    if g >= size:
        return {0: group}
    key = (id(group), g)
    if key not in _SUBGROUPS:
        if size == dist.get_world_size():
            _SUBGROUPS[key] = {
                first: dist.new_group([dist.get_global_rank(group, first + i) for i in range(n)])
                for first, n in sub_rings(size, g)}
        else:
            _SUBGROUPS[key] = None
    return _SUBGROUPS[key]


class _DistAllGather(_DistComm, _Comm):
    """``all_gather`` of the blocks inside each sub-ring; dK/dV by ``all_reduce``. Inside a
    process group of only some processes (no sub-groups, :func:`_sub_ring_groups`) the same
    exchanges run point to point with ``batch_isend_irecv``."""

    def __init__(self, group, g: int, stats: CommStats | None, pattern: int, local_len: int):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self._place(group, g, local_len, stats, pattern)
        self.members = tuple(self.member(i) for i in range(self.g))
        subgroups = _sub_ring_groups(dist, group, g)
        self.subgroup = None if subgroups is None else subgroups[self.first]

    def _exchange(self, sends: list[torch.Tensor], template: torch.Tensor) -> list[torch.Tensor]:
        """Point to point: ``sends[i]`` to sub-ring rank ``i``; returns what each rank sent here
        (own entry: ``sends[j]``)."""
        j, dist = self.js[0], self.dist
        recvs = [sends[j] if i == j else torch.empty_like(template) for i in range(self.g)]
        ops = []
        for i, peer in enumerate(self.members):
            if i != j:
                ops += [dist.P2POp(dist.isend, sends[i].contiguous(), peer, self.group),
                        dist.P2POp(dist.irecv, recvs[i], peer, self.group)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        return recvs

    def gather(self, x: torch.Tensor, phase: str) -> list[torch.Tensor]:
        x = x.contiguous()
        if self.g == 1:  # a sub-ring of one rank (a partial last segment): nothing to send
            return [x]
        if self.subgroup is None:
            blocks = self._exchange([x] * self.g, x)
        else:
            blocks = [torch.empty_like(x) for _ in range(self.g)]
            self.dist.all_gather(blocks, x, group=self.subgroup)
        if self.stats is not None:  # this rank's block reaches g - 1 peers
            self.stats.add(phase, self.pattern, (self.g - 1) * x.numel() * x.element_size())
        return blocks

    def all_reduce(self, x: torch.Tensor, phase: str) -> torch.Tensor:
        x = x.contiguous()
        if self.g == 1:
            return x
        if self.subgroup is None:  # [g, ...]: entry i is for rank i; each rank keeps its own sum
            x = torch.stack(self._exchange(list(x), x[0])).sum(0, keepdim=True).expand_as(x)
        else:
            self.dist.all_reduce(x, group=self.subgroup)
        if self.stats is not None:
            self.stats.add(phase, self.pattern, x.numel() * x.element_size())
        return x

    def forward_blocks(self, kv):
        blocks = self.gather(kv, "forward")
        for t in range(self.g):
            yield t, blocks[(self.js[0] - t) % self.g]

    def backward_exchange(self, kv, block_grads):
        blocks = self.gather(kv, "backward_kv")
        j, g = self.js[0], self.g
        # Indexed by hop t (the block of j - t), then by source rank for the all-reduce.
        dkv_all = torch.stack([block_grads(blocks[(j - t) % g], t) for t in range(g)])
        order = [(j - src) % g for src in range(g)]  # hop of each source rank
        return self.all_reduce(dkv_all[order], "backward_grad")[j]


class _SimRing(_ShiftComm):
    """One process holding all ranks (``[2, G, g, ...]`` buffers): a hop is a roll of the g axis."""

    def __init__(self, g: int, stats: CommStats | None, pattern: int, num_ranks: int, local_len: int):
        if num_ranks % g:
            raise ValueError(f"a simulated ring of {num_ranks} shards runs whole sub-rings of "
                             f"{g=} ranks only (pad n to ring_padded_length)")
        self.js, self.g, self.num_ranks, self.local_len = tuple(range(g)), g, num_ranks, local_len
        self.stats, self.pattern = stats, pattern

    def shift(self, tensors, phases):
        _record(self.stats, self.pattern, tensors, phases, self.num_ranks)
        # Every buffer is [2, G, g, ...]: group-rank j receives the block of j - 1.
        return _Done([torch.roll(t, 1, dims=2) for t in tensors])

    def block_shards(self, t):
        g = self.g
        return tuple(tuple(s * g + (j - t) % g for j in range(g)) for s in range(self.num_ranks // g))


def make_communicator(comm: str, process_group, simulated_ranks: int | None, local_len: int,
                      stats: CommStats | None) -> Callable[[int, int], _Comm]:
    """``(g, pattern) -> communicator`` of a spanning unit with sub-rings of ``g`` ranks:
    simulated over ``simulated_ranks`` shards in this process (whole sub-rings only), else
    ``comm`` (``"ring"`` or ``"all_gather"``) in ``process_group`` on the sub-ring of this rank
    (the partial last one included)."""
    if simulated_ranks is not None:
        return lambda g, pattern: _SimRing(g, stats, pattern, simulated_ranks, local_len)
    cls = _DistRing if comm == "ring" else _DistAllGather
    return lambda g, pattern: cls(process_group, g, stats, pattern, local_len)
