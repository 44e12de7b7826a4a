"""The single-device entry point, :func:`dilated_attention`: checks, the backend, and the spans
a call runs.

A sequence the patterns do not tile (``seq % lcm(w) != 0``, ``seq >= lcm(w)``) runs as two
independent spans: the prefix ``[0, T)``, ``T`` the largest multiple of ``lcm(w)`` (every
segment of every pattern lies inside it or after it), on views of the inputs with no padding,
and the short tail ``[T, seq)`` (fewer than ``lcm(w)`` rows), padded to its own plan length
(:meth:`ring_torch._config.DilatedConfig.padded_length`). The tail's masks (dropout, documents,
padding) see global positions (:attr:`ring_torch._coords.MaskSpec.base`), so the result is that
of the unsplit sequence.
"""

from __future__ import annotations

import torch

from ring_torch._config import DilatedConfig, check_segment_ids, check_seq_lengths
from ring_torch._coords import MaskSpec
from ring_torch._dilated import make_executor
from ring_torch._dropout import Dropout, make_dropout
from ring_torch._kernels import check_backend, select_backend
from ring_torch._plan import build_plan
from ring_torch._rows import cut_padding, make_padding, pad_inputs

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


def _attend_span(config: DilatedConfig, backend: str, q, k, v, start: int, lengths, docs, scale: float,
                 dropout: Dropout | None, with_lse: bool):
    """``(out [b, t, h, d], lse [b, t, h] or None)`` of the rows ``[start, start + t)`` of
    ``q [b, t, h, d]``, ``k``/``v [b, t, h_kv, d]`` (compute dtype) against each other alone:
    ``start`` a multiple of every ``w``, and ``start + t`` one too or the caller's ``seq``.
    ``lengths`` (int64 ``[b]``, global) and ``docs`` (``[b, seq]``) as checked, or None."""
    b, t, h, d = q.shape
    stop = start + t
    padding = make_padding(lengths, b, stop, start + config.padded_length(t), config.is_causal,
                           q.device, docs)
    plan = build_plan(config, padding.padded_len - start, h, k.shape[2])
    spec = MaskSpec(config.is_causal, dropout, base=start, **padding.mask_fields())
    executor = make_executor(backend, q.device, q.dtype, d, dropout, spec.needs_key_mask)
    q, k, v = pad_inputs(padding, [q, k, v])
    row_lengths = None  # local rows at or past them are zeroed by the executor
    if padding.mask_rows:
        row_lengths = padding.lengths if start == 0 else (padding.lengths - start).clamp_(min=0)
    return cut_padding(padding, *executor.run(plan, q, k, v, scale, spec, with_lse=with_lse,
                                              row_lengths=row_lengths))


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
            their q, k, v exactly 0. They may hold any finite values (a NaN there reaches real rows as ``0 * NaN``). Causal
            padding keeps the fused kernels; non-causal padding hides padded keys in the math
            kernel. A ``seq`` the patterns do not tile runs its tiled prefix on the fused
            kernels and only the short tail padded (see the module docstring).
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
    inputs they are checked on the host and copied to the device in every call, which a capture
    cannot hold. With ``dropout_p > 0`` the seed is a host integer of the call
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
    scale = config.scale(d)
    dropout = make_dropout(dropout_p, dropout_seed)
    xs = [x.to(compute) for x in (query, key, value)]
    cut = config.tiled_prefix(n)
    if cut in (0, n):
        out, lse = _attend_span(config, backend, *xs, 0, lengths, docs, scale, dropout, return_lse)
    else:  # the tiled prefix (views) and the short padded tail, independent of each other
        prefix, rest = zip(*(x.split([cut, n - cut], dim=1) for x in xs))
        parts = [_attend_span(config, backend, *span, start, lengths, docs, scale, dropout, return_lse)
                 for span, start in ((prefix, 0), (rest, cut))]
        out = torch.cat([o for o, _ in parts], dim=1)
        lse = None if parts[0][1] is None else torch.cat([l for _, l in parts], dim=1)
    out = out.to(dtype)
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if dtype == torch.float64 else torch.float32)
