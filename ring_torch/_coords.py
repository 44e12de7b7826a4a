"""Global coordinates of one kernel block, and the one place its masks are derived from.

A kernel block is ``q [B, m, H, d]`` against ``k``/``v [B, m, H_kv, d]``: ``B`` folded row blocks
(one per batch entry and segment on one device, or per batch entry and shard in a ring hop) of
``m`` selected rows each. Query row ``i`` of the block starting at ``start`` sits, under head
column ``c``, at global position ``start + offsets[c] + i * rate``; its keys likewise from the
key block's start. A block of several pieces (the balanced layout's slots) has a tuple of starts,
its rows the pieces' rows concatenated. Position and batch tensors are built only when a mask asks for them
(dropout, padding, documents): the fused kernels read nothing but :attr:`BlockCoords.is_causal`.

Padding (:attr:`MaskSpec.lengths`): position ``p`` of batch entry ``b`` is real iff
``p < lengths[b]``. A padded key is hidden from real queries by :func:`block_masks` only where
causality does not already hide it (:attr:`MaskSpec.key_mask`: right padding comes after every
real query, so causal calls need no key mask and keep the fused kernels); padded query rows are
zeroed afterwards by :func:`mask_rows`.

Documents (:attr:`MaskSpec.segment_ids`, packed sequences): a key counts for a query only when
both positions carry the same id. :func:`block_masks` hides the other keys from every query row,
from the rows' global positions (the dilated pattern keeps its global segments and offsets).
torch's fused kernels take no such mask: the Triton rows kernels take it as an id per row
(:func:`row_ids` for a device's rows, :func:`block_ids` for any block, a ring hop's included;
padded keys an id of their own) where the kernel table names them (CUDA); elsewhere a call with
``segment_ids`` runs the math kernel. A row always
keeps its own key on one device (its key block holds its own rows); a ring hop's block may hide
every key of a row, which the math kernel returns as ``out = 0``, ``lse = -inf``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ring_torch._dropout import Dropout, keep_mask, row_hash
from ring_torch._plan import Unit, causal_mask, index_tensor

__all__ = ["MaskSpec", "BlockCoords", "unit_coords", "block_masks", "block_ids", "dropout_rows", "row_ids",
           "real_rows", "mask_rows"]


@dataclass(frozen=True)
class MaskSpec:
    """What one call masks by, and where its local rows sit globally.

    ``is_causal``; ``dropout`` (None: off); ``base``: global position of local row 0 (a ring
    shard starts at ``rank * L``); ``batch_base``: global batch index of local batch entry 0;
    ``lengths``: int64 ``[batch]`` real length of each global batch entry (None: no padding);
    ``key_mask``: whether blocks must hide padded keys (padding with ``is_causal=False``);
    ``pieces``: when the local rows are not one run from ``base`` (the balanced layout), the
    global start of each consecutive run of ``piece_len`` local rows; ``segment_ids``: int64
    ``[global batch, padded global length]`` document id of each position in natural order (None:
    one document), positions past the caller's sequence holding any id (they are padding, hidden
    by causality or the key mask).
    """

    is_causal: bool
    dropout: Dropout | None = None
    base: int = 0
    batch_base: int = 0
    lengths: torch.Tensor | None = None
    key_mask: bool = False
    pieces: tuple[int, ...] | None = None
    piece_len: int = 0
    segment_ids: torch.Tensor | None = None

    def global_start(self, local: int) -> int:
        """Global position of local row ``local``."""
        if self.pieces is None:
            return self.base + local
        return self.pieces[local // self.piece_len] + local % self.piece_len

    def row_positions(self, seq_len: int, device) -> torch.Tensor:
        """``[seq_len]`` int64 global positions of the local rows."""
        local = torch.arange(seq_len, device=device)
        if self.pieces is None:
            return self.base + local
        starts = index_tensor(self.pieces, device)
        return starts[local // self.piece_len] + local % self.piece_len

    @property
    def hides_padding(self) -> bool:
        """True when blocks hide padded keys (padding without causality)."""
        return self.lengths is not None and self.key_mask

    @property
    def needs_key_mask(self) -> bool:
        """True when the kernels must take a per-key mask (padded keys, documents): the math
        kernel, or on one device the Triton rows kernels (by :func:`row_ids`)."""
        return self.hides_padding or self.segment_ids is not None

    @property
    def dropout_p(self) -> float:
        return 0.0 if self.dropout is None else self.dropout.p


@dataclass(frozen=True, eq=False)
class BlockCoords:
    """Global coordinates of one folded kernel block (see the module docstring).

    ``heads``/``offsets``: global query head and offset of each head column ``[H]``;
    ``rows``: selected rows per piece; ``batch``: local batch size ``b``; ``q_starts``: global
    start of each block's rows (one per segment or shard; a tuple per block of several pieces);
    ``k_starts``: the key blocks' starts, None when the keys are the block's own query rows; ``batch_outer``: folded order ``[b, blocks]`` (one device) or
    ``[blocks, b]`` (a ring hop).
    """

    spec: MaskSpec
    pattern: int
    rate: int
    rows: int
    heads: tuple[int, ...]
    offsets: tuple[int, ...]
    batch: int
    q_starts: Sequence[int] = ()
    k_starts: Sequence[int] | None = None
    batch_outer: bool = True

    @property
    def is_causal(self) -> bool:
        """The fused kernels' flag: causal keys that are the block's own query rows give the
        lower triangle; keys of an earlier block (a ring hop) need no mask."""
        return self.spec.is_causal and self.k_starts is None

    @property
    def q_len(self) -> int:
        """Query rows of one block: ``rows`` times its pieces."""
        first = self.q_starts[0]
        return self.rows * (1 if isinstance(first, int) else len(first))

    def at(self, q_starts: Sequence[int], k_starts: Sequence[int] | None) -> BlockCoords:
        """The same unit's coordinates for other row blocks (a ring hop)."""
        return replace(self, q_starts=q_starts, k_starts=k_starts)

    def positions(self, starts: Sequence[int], device) -> torch.Tensor:
        """``[B, H, m]`` int64 global positions of the rows of blocks starting at ``starts``
        (an int per block, or a tuple of its pieces' starts; a ``range``: built on the device,
        no Python work per block)."""
        if isinstance(starts, range):
            start = torch.arange(starts.start, starts.stop, starts.step, dtype=torch.int64,
                                 device=device)[:, None]  # [blocks, 1]
        else:
            pieces = [(s,) if isinstance(s, int) else tuple(s) for s in starts]
            start = torch.tensor(pieces, dtype=torch.int64, device=device)  # [blocks, k]
        offsets = index_tensor(self.offsets, device)  # [H]
        rows = torch.arange(self.rows, device=device) * self.rate  # [m / k]
        pos = start[:, :, None, None] + offsets[None, None, :, None] + rows  # [blocks, k, H, m / k]
        pos = pos.transpose(1, 2).reshape(len(starts), len(self.offsets), -1)  # [blocks, H, m]
        return pos.repeat(self.batch, 1, 1) if self.batch_outer else pos.repeat_interleave(self.batch, 0)

    def batch_index(self, device) -> torch.Tensor:
        """``[B]`` global batch index of each folded block."""
        local = torch.arange(self.batch, device=device)
        blocks = len(self.q_starts)
        local = local.repeat_interleave(blocks) if self.batch_outer else local.repeat(blocks)
        return self.spec.batch_base + local


def unit_coords(unit: Unit, spec: MaskSpec, batch: int, seq_len: int) -> BlockCoords:
    """Coordinates of a single-device unit's rows ``[b * S, m, H, d]`` (``S = n / w'``
    segments, keys = the segment's own rows)."""
    heads = tuple(range(*unit.q_heads))
    if spec.pieces is None:  # a range: no Python work per segment
        starts = range(spec.base, spec.base + seq_len, unit.segment)
    else:
        starts = [spec.global_start(s) for s in range(0, seq_len, unit.segment)]
    return BlockCoords(spec, unit.pattern, unit.rate, unit.rows, heads, (unit.offset,) * len(heads),
                       batch, starts)


def block_masks(coords: BlockCoords, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Every mask of one block, from its coordinates: ``(hide, keep)``.

    ``hide``: boolean, broadcastable to ``[B, H, m_q, m_k]``, True where a score is masked out
    (causal: the cached upper triangle; padding with :attr:`MaskSpec.hides_padding`: keys at
    or beyond their batch entry's length, for real query rows only; documents: keys whose
    ``segment_ids`` differ from the query's);
    ``keep [B, H, m_q, m_k]``: dropout's keep-mask on the probabilities. None where nothing is
    masked.
    """
    hide = causal_mask(coords.q_len, device) if coords.is_causal else None
    keep = None
    drop, spec = coords.spec.dropout, coords.spec
    if drop is None and not spec.needs_key_mask:
        return hide, None
    qpos = coords.positions(coords.q_starts, device)
    kpos = qpos if coords.k_starts is None else coords.positions(coords.k_starts, device)
    batch = coords.batch_index(device)
    if spec.hides_padding:
        length = spec.lengths.to(device)[batch][:, None, None, None]  # [B, 1, 1, 1]
        padded = (kpos[:, :, None, :] >= length) & (qpos[:, :, :, None] < length)  # [B, H, m_q, m_k]
        hide = padded if hide is None else padded | hide
    if spec.segment_ids is not None:
        ids = spec.segment_ids.to(device)
        rows = batch[:, None, None]  # [B, 1, 1]
        q_doc, k_doc = ids[rows, qpos], ids[rows, kpos]  # [B, H, m_q], [B, H, m_k]
        other = q_doc[:, :, :, None] != k_doc[:, :, None, :]  # [B, H, m_q, m_k]
        hide = other if hide is None else other | hide
    if drop is not None:
        heads = index_tensor(coords.heads, device)
        keep = keep_mask(drop.seed, coords.pattern, batch, heads, qpos, kpos, drop.p)
    return hide, keep


# The id of padded rows in row_ids: no document id equals it (ids are user values; this one is
# reserved).
PADDING_ID = torch.iinfo(torch.int64).min


def row_ids(spec: MaskSpec, batch: int, seq_len: int, device) -> torch.Tensor:
    """``[batch, seq_len]`` int64: the id of each local row, such that a key counts for a query
    exactly where their ids are equal, as :func:`block_masks` hides keys on one device: the
    ``segment_ids`` (0 without them) and, where blocks hide padded keys, :data:`PADDING_ID` on
    padded rows (padded queries then see padded keys only; their rows are zeroed afterwards)."""
    positions = spec.row_positions(seq_len, device)
    entries = torch.arange(spec.batch_base, spec.batch_base + batch, device=device)
    if spec.segment_ids is None:
        ids = torch.zeros(batch, seq_len, dtype=torch.int64, device=device)
    else:
        ids = spec.segment_ids.to(device)[entries[:, None], positions[None, :]]
    if spec.hides_padding:
        ids = ids.masked_fill(~real_rows(spec.lengths.to(device)[entries], positions), PADDING_ID)
    return ids


def _by_head(coords: BlockCoords, x: torch.Tensor) -> torch.Tensor:
    """``[B, H, m]`` -> ``[B, m]`` where every head column sits at one offset, else ``[B, m, H]``."""
    return x[:, 0] if len(set(coords.offsets)) == 1 else x.transpose(1, 2)


def block_ids(coords: BlockCoords, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ids by which kernels that take them (the Triton rows kernels) mask a block, as
    :func:`row_ids` gives a device's rows: ``(query ids, key ids)``, int64 ``[B, m]`` and
    ``[B, m_k]`` (``[B, m, H]``, ``[B, m_k, H]`` where head columns sit at different offsets); a
    key counts for a real query exactly where :func:`block_masks` keeps it (save causality). None
    where blocks need no key mask."""
    spec = coords.spec
    if not spec.needs_key_mask:
        return None
    batch = coords.batch_index(device)[:, None, None]  # [B, 1, 1]

    def ids(starts):
        pos = coords.positions(starts, device)  # [B, H, m]
        out = torch.zeros_like(pos) if spec.segment_ids is None else spec.segment_ids.to(device)[batch, pos]
        if spec.hides_padding:
            out = out.masked_fill(pos >= spec.lengths.to(device)[batch], PADDING_ID)
        return _by_head(coords, out)

    q_ids = ids(coords.q_starts)
    return q_ids, q_ids if coords.k_starts is None else ids(coords.k_starts)


def dropout_rows(coords: BlockCoords, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Dropout of a block for kernels that draw it themselves (the Triton rows kernels):
    ``(row_hash [B, m, H], kpos)``, int64, the mask :func:`block_masks` draws split into its
    per-row part and the key positions (``[B, m_k]``, or ``[B, m_k, H]`` where head columns sit
    at different offsets); None without dropout."""
    drop = coords.spec.dropout
    if drop is None:
        return None
    qpos = coords.positions(coords.q_starts, device)  # [B, H, m]
    kpos = qpos if coords.k_starts is None else coords.positions(coords.k_starts, device)
    hashes = row_hash(drop.seed, coords.pattern, coords.batch_index(device), index_tensor(coords.heads, device), qpos)
    return hashes.transpose(1, 2), _by_head(coords, kpos)


def real_rows(lengths: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[b, seq_len]`` bool, True where the global position ``positions[i]`` of batch entry
    ``b`` is real (``< lengths[b]``); ``lengths`` int64 ``[b]``, ``positions [seq_len]``."""
    pos = positions.to(lengths.device)
    return pos[None, :] < lengths[:, None]


def mask_rows(out: torch.Tensor, lse: torch.Tensor | None, real: torch.Tensor):
    """``out [b, n, h, d]`` zeroed and ``lse [b, n, h]`` (None: not asked for, stays None) set
    to ``-inf`` on padded rows (``real [b, n]`` False), by ``torch.where``: their cotangents
    become exactly 0."""
    out = torch.where(real[:, :, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    if lse is not None:
        lse = torch.where(real[:, :, None], lse, torch.full((), float("-inf"), dtype=lse.dtype, device=lse.device))
    return out, lse
