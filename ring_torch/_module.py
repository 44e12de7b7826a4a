"""``nn.Module`` wrappers: the (ring) dilated attention core, and LongNet's multi-head layer."""

from __future__ import annotations

import torch
from torch import nn

from ring_torch._config import DilatedConfig, check_ring_size, lengths_from_padding_mask
from ring_torch._kernels import BACKENDS
from ring_torch._comm import COMMS, CommStats
from ring_torch._decode import DecodeCache, decode, init_cache
from ring_torch._layout import check_layout
from ring_torch._ring import ring_dilated_attention

__all__ = ["RingDilatedAttention", "MultiheadDilatedAttention"]


class RingDilatedAttention(nn.Module):
    """Dilated attention over ``[batch, seq, heads, head_dim]`` tensors, on one device or a ring.

    Same definition as :func:`ring_torch.dilated_attention` (held to ``parity_tests.oracle``).
    Where it runs:

    * ``process_group`` with world size ``P > 1``: every rank passes its local shard (global
      positions ``[rank * L, (rank + 1) * L)``, ``L = seq / P``) and gets its shard back.
      ``comm="ring"`` passes the strided K/V rows of spanning patterns between sub-ring neighbours
      (``batch_isend_irecv``); ``comm="all_gather"`` all-gathers them inside each sub-ring. Every
      rank must run the forward and the backward.
    * ``ring_size=R > 1`` in one process: the sequence viewed as ``R`` shards, spanning patterns
      computed hop by hop like the distributed ring (peak memory of one hop), equal to the
      single-device result.
    * otherwise the single-device :func:`ring_torch.dilated_attention`.

    ``layout``: ``"contiguous"`` or ``"balanced"`` (:func:`ring_torch.ring_dilated_attention`):
    with a process group each rank's inputs and outputs are its balanced shard (chunks ``rank``
    and ``2P-1-rank``, :func:`ring_torch.to_balanced`); with ``ring_size`` they stay in natural
    order.

    ``comm_stats`` (:class:`ring_torch.CommStats`) accumulates the bytes this rank sends per
    phase and pattern; :meth:`reset_comm_stats` clears it. ``timeout`` (seconds) bounds each call's
    cross-rank consistency exchange (:func:`ring_torch.ring_dilated_attention`).

    ``dropout``: in training mode, dropout on each pattern's attention probabilities (the LSE is
    that of the undropped weights). The mask is a hash of (seed, pattern, batch, head, query
    position, key position), so single-device, simulated-ring and distributed runs with the same
    seed agree exactly; the seed is drawn from torch's RNG per call (``torch.manual_seed`` makes
    it reproducible; in a process group rank 0's seed is used). Dropout runs the math path (the
    aten fused kernels cannot take the mask), or the Triton rows kernels, which draw it in their
    tiles, on cards in ``ring_torch._kernels.ROWS_TESTED``. In eval mode dropout is off.
    """

    def __init__(self, segment_lengths, dilation_rates, *, mix: str = "head_groups",
                 dropout: float = 0.0, softmax_scale: float | None = None,
                 ring_size: int | None = None, process_group=None, comm: str = "ring",
                 backend: str = "auto", timeout: float = 300.0, layout: str = "contiguous"):
        super().__init__()
        config = DilatedConfig(segment_lengths, dilation_rates, mix, False, softmax_scale)
        self.layout = check_layout(layout)
        ring_size = check_ring_size(ring_size)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{dropout=} must be in [0, 1)")
        if comm not in COMMS:
            raise ValueError(f"unknown {comm=}; expected one of {COMMS}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown {backend=}; expected one of {BACKENDS}")
        if ring_size is not None and process_group is not None:
            raise ValueError(f"{ring_size=} is for one process; with a process_group the group is "
                             f"the ring")
        self.segment_lengths, self.dilation_rates = config.segment_lengths, config.dilation_rates
        self.mix, self.dropout, self.softmax_scale = mix, float(dropout), softmax_scale
        self.ring_size, self.process_group, self.comm, self.backend = (ring_size, process_group,
                                                                       comm, backend)
        self.timeout = float(timeout)
        self.comm_stats = CommStats()

    def reset_comm_stats(self):
        self.comm_stats.reset()

    def extra_repr(self) -> str:
        return (f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
                f"mix={self.mix!r}, dropout={self.dropout}, ring_size={self.ring_size}, "
                f"comm={self.comm!r}, backend={self.backend!r}, layout={self.layout!r}")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                is_causal: bool = False, return_lse: bool = False,
                seq_lengths: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None):
        """Dilated attention of one call.

        Args:
            query: ``[b, seq, h, d]`` (a local shard in a process group).
            key, value: ``[b, seq, h_kv, d]``.
            is_causal: keys after the query are hidden.
            return_lse: also return the log-sum-exp.
            seq_lengths: integer ``[b]`` real (global) lengths, or None: positions beyond are
                right padding (:func:`ring_torch.dilated_attention`).
            segment_ids: integer ``[b, global seq]`` document ids (packed documents; the same
                tensor on every rank of a process group, in natural order), or None: a key
                counts only for queries of its document; runs the masked math kernel
                (:func:`ring_torch.ring_dilated_attention`).

        Returns:
            ``out [b, seq, h, d]``, and ``lse [b, seq, h]`` with ``return_lse``.

        Without a process group or ``ring_size`` the call is :func:`ring_torch.dilated_attention`
        (no host sync; CUDA-graph capturable with ``seq_lengths`` None or on the device).
        """
        dropout_p = self.dropout if self.training else 0.0
        return ring_dilated_attention(
            query, key, value, segment_lengths=self.segment_lengths,
            dilation_rates=self.dilation_rates, mix=self.mix, is_causal=is_causal,
            softmax_scale=self.softmax_scale, return_lse=return_lse, backend=self.backend,
            ring_size=self.ring_size, process_group=self.process_group, comm=self.comm,
            stats=self.comm_stats, dropout_p=dropout_p, seq_lengths=seq_lengths,
            timeout=self.timeout, layout=self.layout, segment_ids=segment_ids)


class MultiheadDilatedAttention(nn.Module):
    """LongNet's multi-head dilated attention layer: ``(batch, seq, embed_dim)`` in and out.

    ``q = q_proj(query)``, ``k = k_proj(key)``, ``v = v_proj(value)`` (``k``/``v`` project to
    ``num_kv_heads * head_dim``: grouped-query attention), split into heads, dilated attention
    (:class:`RingDilatedAttention`, so the ring options apply), heads concatenated, then
    ``LayerNorm(embed_dim)`` (the "sub-LN" of MAGNETO / LongNet, when ``layer_norm``) and
    ``out_proj``. Self-attention when ``key`` and ``value`` are None; cross-attention when given
    (same batch and length as ``query``: each position attends the key positions its pattern
    selects; ``value`` defaults to ``key``).

    Initialisation (MAGNETO, as LongNet/torchscale and dilated-attention-pytorch):
    ``xavier_normal_`` with gain 1 on ``q_proj``/``k_proj`` and gain ``gamma_init`` on
    ``v_proj``/``out_proj``, biases zero, LayerNorm weight 1 and bias 0.

    ``dropout``: attention-probability dropout in training mode (see
    :class:`RingDilatedAttention`). ``layout``: the ring layout (see
    :class:`RingDilatedAttention`); with a process group and ``"balanced"`` each rank's
    ``query`` (and output) is its balanced shard, ``seq_lengths``/``key_padding_mask`` stay
    global and in natural order.

    Parameter names: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``norm`` (None without
    ``layer_norm``). In a process group every rank holds the full parameters and its shard of
    the sequence; the projections and the LayerNorm act per position, so parameter gradients
    are per-rank partial sums (all-reduce them, as data parallelism over the sequence would).

    Cached decoding: ``cache = mha.init_cache(batch)``, then ``y, cache = mha(x, cache=cache)``
    with the next tokens ``x [batch, t, embed_dim]`` (causal self-attention, no dropout, no
    autograd through the attention); the projections and the LayerNorm run on those tokens only.
    """

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths, dilation_rates, *,
                 num_kv_heads: int | None = None, dropout: float = 0.0, bias: bool = True,
                 layer_norm: bool = True, layer_norm_eps: float = 1e-5, gamma_init: float = 1.0,
                 mix: str = "head_groups", softmax_scale: float | None = None,
                 ring_size: int | None = None, process_group=None, comm: str = "ring",
                 backend: str = "auto", timeout: float = 300.0, layout: str = "contiguous",
                 device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"{embed_dim=} must be a positive multiple of {num_heads=}")
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"{num_heads=} must be a multiple of {num_kv_heads=}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.gamma_init = float(gamma_init)
        kv_dim = num_kv_heads * self.head_dim
        factory = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.norm = (nn.LayerNorm(embed_dim, eps=layer_norm_eps, **factory) if layer_norm
                     else None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.attention = RingDilatedAttention(
            segment_lengths, dilation_rates, mix=mix, dropout=dropout,
            softmax_scale=softmax_scale, ring_size=ring_size, process_group=process_group,
            comm=comm, backend=backend, timeout=timeout, layout=layout)
        self._check_heads()
        self.reset_parameters()

    def _check_heads(self):
        K = len(self.attention.segment_lengths)
        if self.attention.mix == "head_groups" and self.num_heads < K:
            raise ValueError(f"mix='head_groups' needs a head per pattern: "
                             f"num_heads={self.num_heads} < num_patterns={K}")

    def reset_parameters(self):
        """MAGNETO: xavier_normal_ gain 1 on q/k, gain ``gamma_init`` on v/out; zero biases."""
        nn.init.xavier_normal_(self.q_proj.weight)
        nn.init.xavier_normal_(self.k_proj.weight)
        nn.init.xavier_normal_(self.v_proj.weight, gain=self.gamma_init)
        nn.init.xavier_normal_(self.out_proj.weight, gain=self.gamma_init)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.norm is not None:
            self.norm.reset_parameters()

    def _world(self) -> int:
        """Ranks of the process group (1 without one): the global length is ``seq * world``."""
        group = self.attention.process_group
        if group is None:
            return 1
        import torch.distributed as dist

        return dist.get_world_size(group)

    @property
    def comm_stats(self) -> CommStats:
        return self.attention.comm_stats

    def init_cache(self, batch: int, dtype=None, device=None) -> DecodeCache:
        """An empty :class:`ring_torch.DecodeCache` for ``batch`` sequences (default dtype and
        device: those of ``q_proj.weight``); its size does not depend on the length decoded."""
        weight = self.q_proj.weight
        return init_cache(batch, self.num_heads, self.num_kv_heads, self.head_dim,
                          self.attention.segment_lengths, self.attention.dilation_rates,
                          mix=self.attention.mix, dtype=dtype or weight.dtype,
                          device=device if device is not None else weight.device)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None,
                value: torch.Tensor | None = None, is_causal: bool = False,
                cache: DecodeCache | None = None, seq_lengths: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None):
        """The layer on one batch.

        Args:
            query: ``[b, seq, embed_dim]`` (a local shard in a process group).
            key, value: the query's shape (cross-attention), or None (self-attention).
            is_causal: keys after the query are hidden.
            cache: a :class:`ring_torch.DecodeCache`: ``query`` holds the next ``seq`` tokens of
                a causal self-attention, the cache is advanced in place.
            seq_lengths: integer ``[b]``, each example's real (global) length: later positions
                are right padding, never attended (their attention rows are 0, so their outputs
                are ``out_proj(norm(0))``, and the gradients reaching their inputs 0).
            key_padding_mask: bool ``[b, global seq]``, True = padding (torch's convention;
                the same mask on every rank of a process group): accepted when it is right
                padding, converted to ``seq_lengths``; ``ValueError`` otherwise, and with
                ``seq_lengths`` too.
            segment_ids: integer ``[b, global seq]`` document ids of packed sequences (the same
                tensor on every rank of a process group, natural order), or None (one document):
                a position attends only keys of its own document (:class:`RingDilatedAttention`;
                the masked math kernel).

        Returns:
            ``[b, seq, embed_dim]``; with ``cache`` ``(out, cache)``.

        Without ``key_padding_mask`` (which is read on the host: one sync) and with
        ``seq_lengths`` None or on the device, a call without a process group or ``ring_size``
        does not synchronise and can be captured in a CUDA graph
        (:func:`ring_torch.dilated_attention`).
        """
        if cache is not None and (key is not None or value is not None):
            raise ValueError("cache= is causal self-attention: pass key=None, value=None")
        if key_padding_mask is not None and seq_lengths is not None:
            raise ValueError("pass seq_lengths or key_padding_mask, not both")
        if cache is not None and (key_padding_mask is not None or seq_lengths is not None):
            raise ValueError("cache= decodes unpadded sequences: seq_lengths and key_padding_mask "
                             "are not supported with a cache")
        if cache is not None and segment_ids is not None:
            raise ValueError("cache= decodes one document per sequence: segment_ids is not "
                             "supported with a cache")
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must be [batch, seq, embed_dim={self.embed_dim}], got "
                             f"{tuple(query.shape)}")
        if key is None and value is not None:
            raise ValueError("value given without key")
        if key is None:
            key = value = query
        elif value is None:
            value = key
        for name, x in (("key", key), ("value", value)):
            if x.shape != query.shape:
                raise ValueError(f"cross-attention needs {name} of the query's shape "
                                 f"{tuple(query.shape)} (same batch, length and embed_dim), got "
                                 f"{tuple(x.shape)}")
        b, n, _ = query.shape
        if key_padding_mask is not None:
            seq_lengths = lengths_from_padding_mask(key_padding_mask, b, n * self._world())
        q = self.q_proj(query).view(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(key).view(b, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(value).view(b, n, self.num_kv_heads, self.head_dim)
        if cache is None:
            out = self.attention(q, k, v, is_causal=is_causal, seq_lengths=seq_lengths,
                                 segment_ids=segment_ids)
        else:
            out, cache = decode(q, k, v, cache, self.attention.softmax_scale)
        out = out.reshape(b, n, self.embed_dim)
        if self.norm is not None:
            out = self.norm(out)
        out = self.out_proj(out)
        return out if cache is None else (out, cache)
