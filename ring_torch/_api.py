"""The single-device entry point, :func:`dilated_attention`: checks, the backend, and the spans
a call runs.

A sequence the patterns do not tile (``seq % lcm(w) != 0``, ``seq >= lcm(w)``) runs as two
independent spans: the prefix ``[0, T)``, ``T`` the largest multiple of ``lcm(w)`` (every
segment of every pattern lies inside it or after it), on views of the inputs with no padding,
and the short tail ``[T, seq)`` (fewer than ``lcm(w)`` rows), padded to its own plan length
(:meth:`ring_torch._config.DilatedConfig.padded_length`). The tail's masks (dropout, documents,
padding) see global positions (:attr:`ring_torch._coords.MaskSpec.base`), so the result is that
of the unsplit sequence.

A batch whose ``seq_lengths`` are known on the host may run entry by entry, each entry on its
real rows ``[0, seq_lengths[b])`` alone (:func:`_host_lengths` decides once per call), so no
kernel computes padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ring_torch._config import DilatedConfig, check_segment_ids, check_seq_lengths
from ring_torch._coords import MaskSpec
from ring_torch._dilated import FusedExecutor, make_executor
from ring_torch._dropout import Dropout, make_dropout
from ring_torch._kernels import check_backend, select_backend
from ring_torch._plan import build_plan
from ring_torch._rows import make_padding
from ring_torch._runs import Run, run_fused

__all__ = ["dilated_attention", "resolve_backend", "cached_config"]


# Validated configs by their arguments and the arguments' types (see cached_config).
_CONFIGS: dict = {}


def cached_config(segment_lengths, dilation_rates, mix, is_causal, softmax_scale) -> DilatedConfig:
    """``DilatedConfig(segment_lengths, dilation_rates, mix, is_causal, softmax_scale)``, built
    once per distinct arguments. The key holds every argument's type and the patterns' element
    types, so ``(2.0,)`` or ``(True,)`` never finds the entry of ``(2,)`` and still raises;
    arguments that are not hashable (lists are keyed as tuples; NumPy arrays) are validated
    anew. Invalid arguments raise and are never stored."""
    key = None
    if (type(segment_lengths) in (tuple, list) and type(dilation_rates) in (tuple, list)
            and not torch.compiler.is_compiling()):  # traced: no guards on the table's keys
        key = (tuple(segment_lengths), tuple(dilation_rates), mix, is_causal, softmax_scale,
               tuple(map(type, segment_lengths)), tuple(map(type, dilation_rates)), type(mix),
               type(is_causal), type(softmax_scale))
        try:
            config = _CONFIGS.get(key)
        except TypeError:  # an unhashable element: validation raises below
            config = key = None
        if config is not None:
            return config
    config = DilatedConfig(segment_lengths, dilation_rates, mix, is_causal, softmax_scale)
    if key is not None:
        if len(_CONFIGS) >= 1024:
            _CONFIGS.clear()
        _CONFIGS[key] = config
    return config


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype):
    """``(backend, compute_dtype)``: ``auto`` asks the device for its capability; an explicit
    backend is checked and computes in the input dtype."""
    if backend != "auto":
        check_backend(backend, device.type, dtype)
        return backend, dtype
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return select_backend(device.type, dtype, capability)


# A batch with host-known lengths runs entry by entry (each on its real rows only) when its
# sequences are at least this long (the kernels, not the per-call host work, dominate) ...
PER_EXAMPLE_MIN_SEQ = 1 << 16
# ... and at least this share of its tokens is padding.
PER_EXAMPLE_MIN_PADDING = 0.125


@dataclass(frozen=True)
class _Call:
    """What every run of one call shares: the config, the resolved backend, the scale, the
    dropout, whether the LSE is wanted, the checked ``segment_ids [batch, seq]`` (or None) and
    the inputs' shapes."""

    config: DilatedConfig
    backend: str
    scale: float
    dropout: Dropout | None
    with_lse: bool
    docs: torch.Tensor | None
    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    compute: torch.dtype


def _span(call: _Call, batch: slice, batch_base: int, start: int, stop: int, lengths, device):
    """The :class:`ring_torch._runs.Run` of the rows ``[start, stop)`` of the entries
    ``batch`` (the first ``batch_base``), attending only each other (``start`` a multiple of
    every ``w``, ``stop`` one too or the end of the entries' rows), and its executor.
    ``lengths``: int64 ``[batch]`` (global) or None."""
    config = call.config
    docs = None if call.docs is None else call.docs[:, :stop]
    padding = make_padding(lengths, call.batch, stop, start + config.padded_length(stop - start),
                           config.is_causal, device, docs)
    plan = build_plan(config, padding.padded_len - start, call.heads, call.kv_heads)
    spec = MaskSpec(config.is_causal, call.dropout, base=start, batch_base=batch_base, **padding.mask_fields())
    executor = make_executor(call.backend, device, call.compute, call.head_dim, call.dropout,
                             spec.needs_key_mask, rows_masks=True)
    row_lengths = None  # local rows at or past them are zeroed by the executor
    if padding.mask_rows:
        row_lengths = padding.lengths if start == 0 else (padding.lengths - start).clamp_(min=0)
    return Run(plan, batch, start, stop, padding.padded_len - stop, spec, row_lengths), executor


def _spans(call: _Call, entries, device):
    """``[(run, executor)]`` of ``entries`` (``(batch slice, first entry, real rows, lengths)``):
    each one span, or its tiled prefix and short tail (:meth:`DilatedConfig.tiled_prefix`)."""
    runs = []
    for batch, base, length, lengths in entries:
        cut = call.config.tiled_prefix(length)
        bounds = [(0, length)] if cut in (0, length) else [(0, cut), (cut, length)]
        runs += [_span(call, batch, base, start, stop, lengths, device) for start, stop in bounds]
    return runs


def _stitched(call: _Call, runs, q, k, v):
    """``(out, lse or None)`` of ``runs`` run one by one by their executors (any kernel): the
    inputs cut by ``split`` (one ``cat`` each in the backward), the results joined by ``cat``,
    rows no run covers ``0`` / ``-inf``."""
    b, n, h, d = q.shape
    whole = len(runs) and runs[0][0].batch == slice(None)
    entries = [(q, k, v)] if whole else list(zip(*(x.split(1) for x in (q, k, v))))
    results = {}
    for index, xs in enumerate(entries):
        mine = [(r, e) for r, e in runs if whole or r.batch.start == index]
        if not mine:
            continue
        sizes = [r.stop - r.start for r, _ in mine]
        pieces = list(zip(*(x.split(sizes + [n - sum(sizes)], dim=1) for x in xs)))
        parts = []
        for (run, executor), piece in zip(mine, pieces):
            padded = [F.pad(x, (0, 0, 0, 0, 0, run.pad)) if run.pad else x for x in piece]
            o, l = executor.run(run.plan, *padded, call.scale, run.spec, with_lse=call.with_lse,
                                row_lengths=run.row_lengths)
            parts.append((o[:, :run.stop - run.start], None if l is None else l[:, :run.stop - run.start]))
        results[index] = parts
    dtypes = next(((o.dtype, None if l is None else l.dtype) for parts in results.values() for o, l in parts))
    outs, lses = [], []
    for index in range(len(entries)):
        parts = results.get(index, [])
        rows = sum(o.shape[1] for o, _ in parts)
        entry = b if whole else 1
        outs.append(torch.cat([o for o, _ in parts] + [q.new_zeros(entry, n - rows, h, d, dtype=dtypes[0])], 1))
        if dtypes[1] is not None:
            blank_lse = q.new_full((entry, n - rows, h), float("-inf"), dtype=dtypes[1])
            lses.append(torch.cat([l for _, l in parts] + [blank_lse], 1))
    return torch.cat(outs), (torch.cat(lses) if lses else None)


def _attend(call: _Call, q, k, v, lengths, each):
    """``(out, lse or None)`` of the call: as one batch (``each`` None; ``lengths`` the device
    lengths or None) or entry by entry on the real rows ``each``; pieces (spans, entries) that
    all take the fused kernel run as one :class:`ring_torch._runs.FusedRuns` node."""
    n = q.shape[1]
    if each is None:
        entries = [(slice(None), 0, n, lengths)]
    else:
        entries = [(slice(i, i + 1), i, length, None) for i, length in enumerate(each) if length]
    runs = _spans(call, entries, q.device)
    if len(runs) == 1 and each is None:
        (run, executor), = runs
        xs = [F.pad(x, (0, 0, 0, 0, 0, run.pad)) if run.pad else x for x in (q, k, v)]
        o, l = executor.run(run.plan, *xs, call.scale, run.spec, with_lse=call.with_lse,
                            row_lengths=run.row_lengths)
        return o[:, :n], (None if l is None else l[:, :n])
    if all(isinstance(e, FusedExecutor) for _, e in runs) and not torch.compiler.is_compiling():
        return run_fused([r for r, _ in runs], q, k, v, call.scale, runs[0][1].kernel, call.with_lse)
    return _stitched(call, runs, q, k, v)


def _host_lengths(seq_lengths, batch: int, seq_len: int) -> tuple[int, ...] | None:
    """The checked ``seq_lengths`` as ints when the caller gave them on the host (a list, an
    array, a CPU tensor) and the batch gains from running entry by entry
    (:data:`PER_EXAMPLE_MIN_SEQ`, :data:`PER_EXAMPLE_MIN_PADDING`); else None (also while
    ``torch.compile`` traces, where the values would become guards)."""
    if (seq_lengths is None or batch < 2 or seq_len < PER_EXAMPLE_MIN_SEQ
            or torch.compiler.is_compiling()
            or (isinstance(seq_lengths, torch.Tensor) and seq_lengths.device.type != "cpu")):
        return None
    values = tuple(int(x) for x in torch.as_tensor(np.asarray(seq_lengths)).tolist())
    return values if 0 < sum(values) <= (1 - PER_EXAMPLE_MIN_PADDING) * batch * seq_len else None


def dilated_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                      segment_lengths, dilation_rates, mix: str = "head_groups",
                      is_causal: bool = False, softmax_scale: float | None = None,
                      return_lse: bool = False, backend: str = "auto",
                      dropout_p: float = 0.0, dropout_seed: int | None = None,
                      seq_lengths: torch.Tensor | None = None,
                      segment_ids: torch.Tensor | None = None):
    """Dilated attention of ``query [batch, seq, heads, head_dim]`` against
    ``key``/``value [batch, seq, kv_heads, head_dim]`` (``heads % kv_heads == 0``).

    Pattern i cuts the sequence into segments ``[s*w_i, (s+1)*w_i)`` (the last one cut at
    ``seq``) and keeps the positions ``(p % w_i) % r_i == offset`` (``w_i % r_i == 0``; any
    ``seq >= 1``). ``mix="head_groups"``: heads form K contiguous groups, group i runs pattern i
    at offset ``i % r_i``. ``mix="longnet"``: head j runs every pattern at offset ``j % r_i``,
    merged by log-sum-exp (LongNet Eq. 10).

    Args:
        query: ``[batch, seq, heads, head_dim]``, a floating dtype.
        key, value: ``[batch, seq, kv_heads, head_dim]``, the query's dtype and device.
        segment_lengths, dilation_rates: the patterns ``(w_i)``, ``(r_i)``, tuples of ints.
        mix: ``"head_groups"`` or ``"longnet"``.
        is_causal: keys after the query are hidden.
        softmax_scale: the score scale (default ``head_dim ** -0.5``).
        return_lse: also return the log-sum-exp.
        backend: ``"auto"`` (see :func:`ring_torch.select_backend`), ``"math"``, ``"torch"`` or
            ``"xformers"``.
        dropout_p: dropout on each pattern's attention probabilities, with the counter-based
            mask of :mod:`ring_torch._dropout` (a hash of seed, pattern, batch, head and the two
            positions), so the ring computes the same mask. It runs the math path; the LSE is
            that of the undropped weights.
        dropout_seed: the mask's seed (default: a draw from torch's RNG).
        seq_lengths: an integer ``[batch]`` tensor (any device; ``0 <= len <= seq``; lists
            accepted) or None (all ``seq``): positions ``p >= seq_lengths[b]`` are right
            padding, never a key; their output is 0, their LSE ``-inf`` and the gradients of
            their q, k, v exactly 0. They may hold any finite values (a NaN there reaches
            real rows as ``0 * NaN``). Causal padding keeps the fused kernels; non-causal
            padding hides padded keys in the math kernel. Given on the host (a list, an array,
            a CPU tensor) for ``seq >= PER_EXAMPLE_MIN_SEQ`` (65,536) with at least
            ``PER_EXAMPLE_MIN_PADDING`` (1/8) of the batch's tokens padding, the batch runs
            entry by entry on each entry's real rows only (no work on padding, any causality,
            the fused kernels kept); on the device it runs as one batch.
            A ``seq`` the patterns do not tile runs its tiled prefix on the fused kernels and
            only the short tail padded (see the module docstring).
        segment_ids: an integer ``[batch, seq]`` tensor (any device and integers, negative ones
            too; lists accepted) or None (one document): packed documents, position ``p`` attends
            key ``q`` only if ``segment_ids[b, p] == segment_ids[b, q]``, on top of the pattern
            (whose segments and offsets keep their global positions: it does not restart per
            document), causality and ``seq_lengths``. Dropout masks of the kept scores are
            unchanged. The fused ``torch``/``xformers`` kernels take no such mask yet: a call
            with ``segment_ids`` runs the masked math kernel, whatever ``backend``.

    Returns:
        ``out [batch, seq, heads, head_dim]`` in the input dtype, and with ``return_lse`` also
        ``lse [batch, seq, heads]`` (natural log; float64 for float64 inputs, else float32;
        ``-inf`` and ``out = 0`` where a position attends to nothing).

    Host work, CUDA graphs and ``torch.compile``: a call reads no tensor value on the host (no
    device sync), builds no tensor from host data once its plan and index caches are warm (its
    first call with these shapes fills them), and its Python work and kernel launches depend on
    the plan, not on ``seq``; so forward and forward+backward can be captured in a
    ``torch.cuda.CUDAGraph`` after a warm-up call and replayed on new values copied into the
    static inputs. ``seq_lengths`` on the query's device are data like the inputs (clamped to
    ``[0, seq]``, not checked) and can be captured; given as a list or a CPU tensor for CUDA
    inputs they are checked on the host and copied to the device in every call (and may run the
    batch entry by entry, see ``seq_lengths``), which a capture cannot hold. With ``dropout_p > 0`` the seed is a host integer of the call
    (``dropout_seed=None`` draws it from torch's CPU RNG), so a replay repeats the captured mask.
    Under ``torch.compile`` the call traces as one graph on the CPU; elsewhere its fused kernels
    run eagerly behind a graph break (:func:`traces_fused`).

    Raises:
        TypeError: an argument of the wrong type (tensors of a non-floating dtype, a non-bool
            ``is_causal``, patterns that are not ints, ``seq_lengths`` or ``segment_ids`` not an
            int tensor).
        ValueError: a wrong value. All checks run before any compute.
    """
    config = cached_config(segment_lengths, dilation_rates, mix, is_causal, softmax_scale)
    b, n, h, h_kv, d = config.validate_inputs(query, key, value)
    lengths = check_seq_lengths(seq_lengths, b, n, query.device)
    docs = check_segment_ids(segment_ids, b, n, query.device)
    dtype = query.dtype
    backend, compute = resolve_backend(backend, query.device, dtype)
    call = _Call(config, backend, config.scale(d), make_dropout(dropout_p, dropout_seed), return_lse, docs,
                 b, n, h, h_kv, d, compute)
    xs = [x.to(compute) for x in (query, key, value)]
    out, lse = _attend(call, *xs, lengths, _host_lengths(seq_lengths, b, n))
    out = out.to(dtype)
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if dtype == torch.float64 else torch.float32)
